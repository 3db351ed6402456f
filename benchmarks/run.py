"""Run every benchmark in this folder and record its figures.

Each ``bench_*.py`` module here defines ``run(record)``; it measures its own
baseline in the same run and calls ``record(key, value, note)`` for every
figure (ratios against that baseline, fractions, latencies). Figures are
printed as they come and written to ``benchmarks/results.json``.

    python benchmarks/run.py              # all
    python benchmarks/run.py launch spawn # only bench_launch.py, bench_spawn.py
    BENCH_NOTE="box shared with other jobs" python benchmarks/run.py peer   # a note on every figure
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.json"


def load(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(HERE.parent))
    wanted = set(argv)
    benches = [p for p in sorted(HERE.glob("bench_*.py")) if not wanted or p.stem.removeprefix("bench_") in wanted]
    results: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    figures = results.setdefault("figures", {})
    failed = []

    context = os.environ.get("BENCH_NOTE")  # e.g. "the box was shared with other jobs": said with every figure

    def record(key: str, value: float, note: str = "") -> None:
        if context:
            note = f"{note} [{context}]" if note else f"[{context}]"
        figures[key] = {"value": value, "note": note, "measured": time.strftime("%Y-%m-%dT%H:%M:%S")}
        print(f"{key:32s} {value:12.4g}   {note}", flush=True)

    for path in benches:
        print(f"== {path.stem}", flush=True)
        t0 = time.monotonic()
        try:
            load(path).run(record)
        except Exception:
            traceback.print_exc()
            failed.append(path.stem)
        print(f"   ({time.monotonic() - t0:.1f} s)", flush=True)
    results["machine"] = {"host": platform.node(), "python": platform.python_version()}
    RESULTS.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"wrote {RESULTS}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
