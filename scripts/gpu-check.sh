#!/usr/bin/env bash
# The GPU check of issue 16, for a machine with an NVIDIA GPU and a CUDA build of torch:
#   1. the training tests with device: cuda (tests/test_ddp.py's GPU tests and the rest of it),
#   2. training throughput of one Dask worker on the GPU against one on the CPU (rows/s),
# figures written as JSON to $1 (default gpu-check.json). Usage, from the repository root:
#   make setup && scripts/gpu-check.sh [OUT.json]
# The project's own venv holds the CPU torch wheel; on a GPU box install a CUDA torch
# into it first (pip install torch==<same version> --index-url <your CUDA wheel index>).
set -euo pipefail
out=${1:-gpu-check.json}
py=${PYTHON:-.venv/bin/python}
if ! "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: torch sees no CUDA GPU here (torch $("$py" -c 'import torch; print(torch.__version__)')); run it on a GPU machine with a CUDA torch" >&2
    exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
status=0
"$py" -m pytest tests/test_ddp.py tests/test_training_tasks.py -q -p no:cacheprovider || status=$?
"$py" benchmarks/bench_ddp.py cuda "$tmp/cuda.json"
"$py" benchmarks/bench_ddp.py cpu "$tmp/cpu.json"
"$py" - "$tmp/cuda.json" "$tmp/cpu.json" "$out" "$status" <<'PY'
import json, sys, torch
cuda, cpu = (json.load(open(p)) for p in sys.argv[1:3])
figures = {
    "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
    "tests_exit_status": int(sys.argv[4]),
    "rows_per_s_cuda": cuda["rows_per_s"], "rows_per_s_cpu": cpu["rows_per_s"],
    "gpu_over_cpu_worker": cuda["rows_per_s"] / cpu["rows_per_s"],
    "training": {"rows": cuda["rows"], "epochs": cuda["epochs"], "model": "models.mlp:MLP 3x256"},
}
open(sys.argv[3], "w").write(json.dumps(figures, indent=2) + "\n")
print(json.dumps(figures, indent=2))
PY
exit "$status"
