#!/usr/bin/env bash
# docs/compare-front.png, made by `compare` from a run of examples/front (5 seeds by default),
# never by hand: the table goes to WORKDIR/compare.md, the figures to WORKDIR/compare.json.
#
#   scripts/compare-front.sh                 # seeds 1-5 (hours on a 2-core box)
#   SEEDS=1 scripts/compare-front.sh         # one seed
set -euo pipefail
cd "$(dirname "$0")/.."
seeds=${SEEDS:-1-5}
work=${WORKDIR:-runs/compare-front-docs}
exec .venv/bin/python -m orchestrator compare examples/front/loop.yml --strategies uniform,ensemble \
    --seeds "$seeds" --set target.max_rounds=40 --workdir "$work" --png docs/compare-front.png
