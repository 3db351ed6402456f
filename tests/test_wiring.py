"""One wiring for every way a campaign runs: `run`, `--resume`, `--steps`, continual mode, the benchmarks.

Every example runs `--steps generate,train,evaluate` (a chosen-points sim and a template-driven
third-party code included), and the code has exactly one place that builds a Campaign.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import REPO, fast_loop, write_loop

LAMMPS = Path("/usr/bin/lmp")
EXAMPLES = ["sine", "front", "peaks", "oscillator", "drift", "lammps-lj"]
FAST = ["--set", "steps.generate_runs=2", "--set", "steps.evaluate_checks=2", "--set", "tracking.enabled=false",
        "--set", "training.hparams.epochs=5", "--set", "training.hparams.lbfgs_iters=5"]


def steps(example: str, work: Path) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "run", f"examples/{example}/loop.yml", "--workdir",
                           str(work), "--steps", "generate,train,evaluate", "--no-live", *FAST],
                          capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    run_dir = proc.stdout.strip().splitlines()[-1].removeprefix("run dir: ")
    summary: dict[str, Any] = json.loads((Path(run_dir) / "summary.json").read_text())
    return summary


def test_every_example_is_in_the_steps_test() -> None:
    """A new example joins EXAMPLES, so its --steps are run too."""
    assert sorted(EXAMPLES) == sorted(p.parent.name for p in (REPO / "examples").glob("*/loop.yml"))


@pytest.mark.integration
@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_runs_its_steps(example: str, tmp_path: Path) -> None:
    if example == "lammps-lj" and not LAMMPS.exists():
        pytest.skip(f"{LAMMPS} is missing: run `scripts/bootstrap.sh --test-deps` as root (apt-get install lammps)")
    from orchestrator.config import load_config

    cfg = load_config(REPO / "examples" / example / "loop.yml", [])
    s = steps(example, tmp_path / "w")
    run_dir = Path(s["run_dir"])
    assert len(s["data_files"]) == 2 and s["model_file"] is not None
    tables = [np.load(run_dir / f) for f in s["data_files"]]
    assert all(t.shape[1] == cfg.n_columns and np.isfinite(t).all() for t in tables)
    lo = np.array([i.lo for i in cfg.inputs])
    hi = np.array([i.hi for i in cfg.inputs])
    for t in tables:  # every generated input lies in the domain
        assert ((t[:, :len(lo)] >= lo) & (t[:, :len(lo)] <= hi)).all()
    assert s["data_points"] == sum(t.shape[0] for t in tables)
    if cfg.chosen_points:  # one row per chosen point, and the points file the sim read is in its run dir
        assert all(t.shape[0] == cfg.points_per_generate for t in tables)
        files = sorted((run_dir / "sims").rglob("points.txt"))
        chosen = np.concatenate([np.loadtxt(f, ndmin=2) for f in files])
        assert len(files) == 2 and chosen.shape == (2 * cfg.points_per_generate, len(lo))
        given = np.concatenate(tables)[:, :len(lo)]
        assert np.allclose(np.sort(chosen, axis=0), np.sort(given, axis=0))
    ev = s["evaluation"]
    assert ev["checks"] == 2 and ev["model_file"] == s["model_file"]
    assert np.isfinite(ev["max_error"]) and len(ev["points"]) == 2


def campaign_calls(path: Path) -> list[str]:
    """The functions of ``path`` that construct a Campaign (``Campaign(...)``), by name."""
    tree = ast.parse(path.read_text())
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and ast.unparse(node.func).split(".")[-1] == "Campaign":
                found.append(fn.name)
    return found


def calls_of(path: Path, function: str) -> set[str]:
    """Names called inside ``function`` of ``path``."""
    tree = ast.parse(path.read_text())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function)
    return {ast.unparse(n.func).split(".")[-1] for n in ast.walk(fn) if isinstance(n, ast.Call)}


def test_one_wiring_function_builds_every_campaign() -> None:
    sources = [p for d in ("orchestrator", "benchmarks", "tests") for p in (REPO / d).rglob("*.py")]
    builders = {f"{p.relative_to(REPO)}:{fn}" for p in sources for fn in campaign_calls(p)}
    assert builders == {"orchestrator/runner.py:build_campaign"}
    entry_points = {"orchestrator/runner.py": "run", "orchestrator/steps.py": "run_steps",
                    "benchmarks/bench_scale.py": "measure", "benchmarks/bench_pipeline.py": "_throughput"}
    for path, fn in entry_points.items():
        assert "build_campaign" in calls_of(REPO / path, fn), f"{path}:{fn} does not call build_campaign"


def test_the_finder_sees_a_second_wiring(tmp_path: Path) -> None:
    stray = tmp_path / "stray.py"
    stray.write_text("def wire(cfg):\n    return campaign.Campaign(cfg, None, None, None, resumed=False)\n")
    assert campaign_calls(stray) == ["wire"]


@pytest.mark.integration
def test_steps_go_through_build_campaign(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator import runner
    from orchestrator.cli import main

    built: list[str] = []
    original = runner.build_campaign

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append("resumed" if kwargs.get("state") is not None else "fresh")
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "build_campaign", counting)
    cfg = fast_loop()
    cfg["tracking"] = {"enabled": False}
    cfg["steps"] = {"generate_runs": 1}
    loop = write_loop(tmp_path, cfg)
    assert main(["run", str(loop), "--workdir", str(tmp_path / "w"), "--steps", "generate", "--no-live"]) == 0
    assert built == ["fresh"]
