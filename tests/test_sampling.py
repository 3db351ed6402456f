"""Sampling strategies: chosen points reach the sims, a user's strategy, bad output, resume."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from orchestrator import rundeck, sampling
from orchestrator.config import LoopConfig
from orchestrator.errors import SamplingError
from orchestrator.launchers.mpiexec import find_mpiexec
from tests.conftest import REPO, sim, write_loop


def front_loop(**policy: Any) -> dict[str, Any]:
    """The front example, made quick: little data, few checks, no sim work time, no MLflow."""
    cfg: dict[str, Any] = yaml.safe_load((REPO / "examples/front/loop.yml").read_text())
    cfg["sims"]["generate"]["args"] = ["--points", "{points_file}"]
    cfg["policy"].update({"checks_per_round": 2, "points_per_run": 12, "candidates": 200, **policy})
    # the count rule, per version, as quick as it goes (the example itself certifies 95%/95%)
    cfg["target"] = {"tolerance": cfg["target"]["tolerance"], "successes": 2, "per_version": True, "max_rounds": 2}
    cfg["training"].update({"workers": 1, "hparams": {"epochs": 20, "lbfgs_iters": 20}})
    cfg["resources"] = {"sim_slots": 4}
    cfg["tracking"] = {"enabled": False}
    return cfg


# -- pure ---------------------------------------------------------------------------------


def request(count: int = 4, d: int = 2) -> sampling.SampleRequest:
    empty = np.empty((0, d))
    return sampling.SampleRequest(count, np.zeros(d), np.ones(d), empty, None, None, empty, np.empty((0, 1)),
                                  empty, empty, np.random.default_rng(0))


def test_latin_hypercube_has_one_point_per_stratum() -> None:
    pts = sampling.latin_hypercube(np.random.default_rng(3), 10, 3)
    for axis in range(3):
        assert sorted((pts[:, axis] * 10).astype(int)) == list(range(10))


def test_ensemble_strategy_keeps_points_apart_and_away_from_pending() -> None:
    rng = np.random.default_rng(1)
    cand = rng.uniform(size=(500, 2))
    spread = np.exp(-((cand - 0.5) ** 2).sum(axis=1) / 0.01)[:, None]  # all the doubt at the centre
    pending = np.array([[0.5, 0.5]])
    req = sampling.SampleRequest(8, np.zeros(2), np.ones(2), cand, spread * 0, spread, cand[:10], spread[:10],
                                 pending, np.empty((0, 2)), rng, 1)
    pts = sampling.ensemble(req, min_separation=0.05)
    assert pts.shape == (8, 2)
    dist = np.linalg.norm(np.vstack([pts, pending])[:, None] - np.vstack([pts, pending])[None], axis=2)
    assert dist[np.triu_indices(9, 1)].min() >= 0.05
    assert np.linalg.norm(pts - 0.5, axis=1).max() < 0.2  # still where the members disagree


@pytest.mark.parametrize(("raw", "message"), [
    (np.array([[0.5, 0.5]] * 3 + [[0.5, 2.0]]), "outside the domain"),
    (np.full((4, 2), np.nan), "NaN"),
    (np.full((3, 2), 0.5), r"shape \(3, 2\); expected \(4, 2\)"),
])
def test_bad_points_are_refused_naming_the_strategy(raw: Any, message: str) -> None:
    with pytest.raises(SamplingError, match=message) as err:
        sampling.validate_points(raw, request(), "mine:pick")
    assert "'mine:pick'" in str(err.value) and "\n" not in str(err.value)


# -- chosen points through a real MPI sim ------------------------------------------------------


@pytest.mark.integration
def test_points_file_reaches_every_rank_exactly_once(tmp_path: Path) -> None:
    points = np.random.default_rng(5).uniform(size=(13, 2))
    path = rundeck.write_points(tmp_path / "points.txt", points)
    out = tmp_path / "out.npy"
    env = {**os.environ, "SIMKIT_VERBOSE": "1", "SIMKIT_EXPECT_RANKS": "4"}
    proc = subprocess.run([find_mpiexec(), "-n", "4", str(sim("sim-front-gen")), "--points", str(path),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    table = np.load(out)
    assert table.shape == (13, 3)
    assert np.array_equal(table[:, :2], points)  # every point once, in order, bit for bit
    shares = sorted((int(m[1]), int(m[2]), int(m[3])) for m in
                    re.finditer(r"rank (\d) of 4: points (\d+)\.\.(\d+) of 13", proc.stderr))
    assert [s[0] for s in shares] == [0, 1, 2, 3]  # every rank got a share
    assert [(a, b) for _, a, b in shares] == [(0, 3), (3, 6), (6, 9), (9, 13)]


# -- a user's strategy in a real campaign -------------------------------------------------------

RECORDING = '''
import json
from pathlib import Path
import numpy as np
from orchestrator.sampling import SampleRequest

LOG = Path(__file__).with_name("calls.jsonl")

def pick(req: SampleRequest) -> np.ndarray:
    pts = req.lo + req.rng.uniform(size=(req.count, req.lo.size)) * (req.hi - req.lo)
    call = {"count": req.count, "candidates": list(req.candidates.shape),
            "mean": None if req.mean is None else list(req.mean.shape),
            "spread": None if req.spread is None else list(req.spread.shape),
            "x": list(req.x.shape), "y": list(req.y.shape), "pending": list(req.pending.shape),
            "rng": type(req.rng).__name__, "version": req.model_version, "points": pts.tolist()}
    with LOG.open("a") as f:
        f.write(json.dumps(call) + "\\n")
    return pts

def outside(req: SampleRequest) -> np.ndarray:
    return np.full((req.count, 2), 2.0)

def nan(req: SampleRequest) -> np.ndarray:
    return np.full((req.count, 2), np.nan)

def short(req: SampleRequest) -> np.ndarray:
    return np.full((req.count - 1, 2), 0.5)

def raises(req: SampleRequest) -> np.ndarray:
    raise KeyError('no such column')
'''


def run_campaign(loop: Path, work: Path, **kwargs: Any) -> Any:
    from orchestrator.runner import run

    return asyncio.run(run(loop, workdir=work, new=True, **kwargs))


@pytest.mark.integration
def test_user_strategy_gets_the_documented_arguments_and_its_points_are_run(tmp_path: Path) -> None:
    (tmp_path / "mystrategy.py").write_text(RECORDING)
    cfg = front_loop(sampling="mystrategy:pick", first_round="uniform", ensemble_size=2)
    cfg["target"].update(tolerance=1e-9, max_rounds=3)  # every check fails: later runs are chosen with a model
    loop = write_loop(tmp_path, cfg)
    result = run_campaign(loop, tmp_path / "runs")
    assert result.status.value == "stopped"
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert calls and all(c["count"] == 12 and c["rng"] == "Generator" for c in calls)
    first, later = calls[0], [c for c in calls if c["version"] >= 1]
    assert first["version"] == 0 and first["mean"] is None and first["candidates"] == [0, 2]
    assert later, calls
    assert later[0]["candidates"] == [200, 2] and later[0]["mean"] == [200, 1] and later[0]["spread"] == [200, 1]
    assert later[0]["x"][0] == later[0]["y"][0] > 0 and later[0]["x"][1] == 2
    run_dir = Path(result.summary["run_dir"])
    files = sorted(run_dir.glob("sims/generate-*/points.txt"))
    ran = [np.loadtxt(f).tolist() for f in files]
    assert ran == [c["points"] for c in calls][: len(ran)]  # bit for bit: repr round-trips
    data = [np.load(f)[:, :2].tolist() for f in sorted((run_dir / "data").glob("generate-*.npy"))]
    assert all(d in ran for d in data)


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["outside", "nan", "short", "raises"])
def test_bad_strategy_output_stops_the_campaign_in_one_line(tmp_path: Path, bad: str) -> None:
    (tmp_path / "mystrategy.py").write_text(RECORDING)
    loop = write_loop(tmp_path, front_loop(sampling=f"mystrategy:{bad}", first_round="uniform"))
    proc = subprocess.run([os.sys.executable, "-m", "orchestrator", "run", str(loop), "--workdir",
                           str(tmp_path / "runs"), "--no-live"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"sampling strategy 'mystrategy:{bad}'" in errors[0], proc.stderr[-2000:]


@pytest.mark.integration
def test_resume_keeps_the_ensemble_and_the_strategy_rng(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.loop.campaign import Campaign
    from orchestrator.progress import Progress
    from orchestrator.runner import build_campaign, open_run

    cfg = front_loop(sampling="ensemble", ensemble_size=2)
    cfg["target"]["tolerance"] = 1e-9
    loop = write_loop(tmp_path, cfg)
    # Interrupt right after the first training, as a signal would.
    original = Campaign._on_train

    def train_then_stop(self: Campaign, result: Any) -> None:
        original(self, result)
        self._interrupt.set()

    monkeypatch.setattr(Campaign, "_on_train", train_then_stop)
    first = run_campaign(loop, tmp_path / "runs")
    assert first.status.value == "interrupted"
    run_dir = Path(first.summary["run_dir"])
    saved = json.loads((run_dir / "state.json").read_text())
    assert len(saved["member_files"]) == 2 and saved["sampling_rng"]
    monkeypatch.setattr(Campaign, "_on_train", original)

    c2, store, state, _ = open_run(None, None, [], run_dir, False, Progress(enabled=False))
    assert state is not None
    resumed = build_campaign(c2, store, None, Progress(enabled=False), state=state, tracking=False)
    assert resumed.members == [(run_dir / f).read_bytes() for f in saved["member_files"]]
    fresh = np.random.default_rng()
    fresh.bit_generator.state = saved["sampling_rng"]
    assert resumed.sampler.rng.uniform(size=3).tolist() == fresh.uniform(size=3).tolist()
    store.close()

    second = run_campaign(None, None, resume=run_dir)  # type: ignore[arg-type]
    assert second.status.value == "stopped" and second.summary["rounds"] == 2
    assert len(list((run_dir / "models").glob("model-0002*.pt"))) == 2


def test_config_refuses_an_ensemble_of_one() -> None:
    cfg = front_loop(sampling="ensemble", ensemble_size=1)
    with pytest.raises(ValueError, match="ensemble_size >= 2"):
        LoopConfig.model_validate(cfg)


def test_compare_table_and_seeds() -> None:
    from orchestrator.compare import Outcome, format_table, parse_seeds

    assert parse_seeds("1-3,7") == [1, 2, 3, 7]
    rows = [Outcome("uniform", 1, "target_met", True, 8, 256, 8, 40.0, 50.0, "r"),
            Outcome("ensemble", 1, "target_met", True, 4, 128, 4, 30.0, 40.0, "r")]
    table = format_table(rows, ["uniform", "ensemble"])
    assert "| median | ensemble | 4 | 0 | 128 | 4 | 30 | 1/1 |" in table  # runs, checks, rows, rounds, s
    assert "| ratio | ensemble/uniform | 0.50 | - | 0.50 | 0.50 | 0.75 | |" in table


def test_predict_prints_an_ensembles_mean_and_spread() -> None:
    import torch

    from models.ensemble import Ensemble
    from orchestrator.predict import ModelRef, Prediction, format_table
    from orchestrator.training.serving import evaluate, spread_of

    members = [torch.nn.Linear(1, 1) for _ in range(2)]
    for k, m in enumerate(members):
        torch.nn.init.constant_(m.weight, 1.0 + k)
        torch.nn.init.zeros_(m.bias)
    model = Ensemble(members)
    pts = np.array([[1.0], [2.0]])
    mean, spread = evaluate(model, pts), spread_of(model, pts)
    assert mean.tolist() == [[1.5], [3.0]] and spread is not None and spread.tolist() == [[0.5], [1.0]]
    table = format_table(Prediction(ModelRef("m", "1"), pts, mean, spread=spread))
    assert table.splitlines()[0].split() == ["x0", "y0", "y0_spread"]
