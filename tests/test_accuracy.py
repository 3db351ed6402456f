"""True accuracy on a dense grid (orchestrator.accuracy): the examples' truths match their
C sims, the measure counts what it says, and `accuracy RUN_DIR` measures a real checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from orchestrator import accuracy
from orchestrator.cli import main
from orchestrator.config import flat_dict, load_config
from orchestrator.errors import UsageError
from orchestrator.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _sim(tmp_path: Path, argv: list[str]) -> np.ndarray:
    out = tmp_path / "out.npy"
    subprocess.run([str(BIN / argv[0]), *argv[1:], "--out", str(out)], check=True, capture_output=True, timeout=60)
    return np.load(out)


def test_front_truth_is_the_sims_answer(tmp_path: Path) -> None:
    truth = accuracy.load_truth(ROOT / "examples/front/truth.py")
    pts = np.random.default_rng(3).uniform(0, 1, size=(40, 2))
    (tmp_path / "points.txt").write_text("\n".join(f"{float(a)!r} {float(b)!r}" for a, b in pts) + "\n")
    rows = _sim(tmp_path, ["sim-front-gen", "--points", str(tmp_path / "points.txt"), "--width", "0.02"])
    np.testing.assert_allclose(truth(rows[:, :2]), rows[:, 2:], atol=1e-12)


def test_oscillator_and_sine_truths_are_the_sims_answers(tmp_path: Path) -> None:
    osc = accuracy.load_truth(f"{ROOT}/examples/oscillator/truth.py:truth")
    for t, zeta in [(0.7, 0.05), (4.2, 0.3), (9.9, 0.5)]:
        row = _sim(tmp_path, ["sim-oscillator-check", "--t", str(t), "--zeta", str(zeta), "--steps", "1000"])
        assert abs(osc(row[:, :2])[0, 0] - row[0, 2]) < 1e-6
    sine = accuracy.load_truth(ROOT / "examples/sine/truth.py")
    row = _sim(tmp_path, ["sim-cheap", "--x", "2.9"])
    assert abs(sine(row[:, :1])[0, 0] - row[0, 1]) < 1e-12


def ramp(x: np.ndarray) -> np.ndarray:
    """Flat at -1 and 1, a steep ramp for |x - 0.5| < 0.1."""
    out: np.ndarray = np.clip((x[:, :1] - 0.5) / 0.1, -1.0, 1.0)
    return out


def test_measure_counts_the_domain_and_the_varying_region() -> None:
    xs, _ = accuracy.grid([0.0], [1.0], 1001)
    x = xs[:, 0]
    exact = accuracy.measure(ramp, ramp, [0.0], [1.0], 0.05, 1001)
    assert (exact.within, exact.within_varying, exact.rmse, exact.max_error) == (1.0, 1.0, 0.0, 0.0)
    steep = np.abs(x - 0.5) < 0.1
    assert abs(exact.varying_points - steep.sum()) <= 2  # the ramp's two kinks, by finite differences
    # wrong by 0.5 on the flat left quarter only: the varying region is untouched
    off_flat = accuracy.measure(lambda p: ramp(p) + 0.5 * (p[:, :1] < 0.25), ramp, [0.0], [1.0], 0.05, 1001)
    assert off_flat.within == pytest.approx(np.mean(x >= 0.25))
    assert off_flat.within_varying == 1.0 and off_flat.max_error == 0.5
    assert off_flat.rmse == pytest.approx(np.sqrt(np.mean((x < 0.25) * 0.25)))
    # a model that is a step where the truth ramps: right on the flats, wrong inside the ramp
    step = accuracy.measure(lambda p: np.sign(p[:, :1] - 0.5), ramp, [0.0], [1.0], 0.05, 1001)
    assert step.within_varying is not None and step.within_varying < 0.1
    assert step.within == pytest.approx(np.mean(np.abs(np.sign(x - 0.5) - ramp(xs)[:, 0]) < 0.05))


def test_a_flat_truth_has_no_varying_region() -> None:
    acc = accuracy.measure(lambda p: np.zeros((p.shape[0], 1)), lambda p: np.ones((p.shape[0], 1)),
                           [0.0, 0.0], [1.0, 2.0], 0.1, 400)
    assert (acc.points, acc.within, acc.varying_points, acc.within_varying) == (400, 0.0, 0, None)


def test_load_truth_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        accuracy.load_truth(tmp_path / "nope.py")
    (tmp_path / "t.py").write_text("def other(x):\n    return x\n")
    with pytest.raises(UsageError, match="has no function 'truth'"):
        accuracy.load_truth(tmp_path / "t.py")
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    with pytest.raises(UsageError, match="RuntimeError: boom"):
        accuracy.load_truth(tmp_path / "bad.py")


def test_final_checkpoint_is_the_last_version_with_its_members(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with pytest.raises(UsageError, match="no model checkpoints"):
        accuracy.final_checkpoint(tmp_path)
    for name in ["model-0001.pt", "model-0002-m1.pt", "model-0002.pt", "model-0002-m2.pt", "stray.pt"]:
        (tmp_path / "models" / name).write_bytes(b"")
    v, paths = accuracy.final_checkpoint(tmp_path)
    assert v == 2 and [p.name for p in paths] == ["model-0002.pt", "model-0002-m1.pt", "model-0002-m2.pt"]
    assert [p.name for p in accuracy.final_checkpoint(tmp_path, 1)[1]] == ["model-0001.pt"]
    with pytest.raises(UsageError, match=r"versions \[1, 2\]"):
        accuracy.final_checkpoint(tmp_path, 7)


def test_accuracy_command_measures_a_run_dirs_final_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.training.tasks import train

    loop = ROOT / "examples/front/loop.yml"
    cfg = load_config(loop)
    store = RunStore.create(tmp_path, cfg.name, loop)
    store.write_state({"config": flat_dict(cfg)})
    truth = accuracy.load_truth(ROOT / "examples/front/truth.py")
    xs = np.random.default_rng(0).uniform(0, 1, size=(300, 2))
    np.save(tmp_path / "d.npy", np.hstack([xs, truth(xs)]))
    kwargs = dict(cfg.training.model_kwargs)
    state, _ = train(None, [str(tmp_path / "d.npy")], cfg.training.model, kwargs, {"epochs": 20}, 2, 1)
    store.save_model(1, state)
    assert main(["accuracy", str(store.root), "--truth", str(ROOT / "examples/front/truth.py"), "--json",
                 "--points", "2500"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = accuracy.measure(accuracy.checkpoint_predictor([store.models_dir / "model-0001.pt"], cfg.training.model,
                                                          kwargs), truth, [0, 0], [1, 1], 0.1, 2500)
    assert got["version"] == 1 and got["points"] == 2500 and got["tolerance"] == 0.1
    assert got["within"] == pytest.approx(want.within) and got["rmse"] == pytest.approx(want.rmse)
    assert 0 < got["within"] < 1 and got["within_varying"] < got["within"]  # 20 epochs: the front is not learnt


def test_accuracy_command_refuses_a_missing_truth_in_one_line(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accuracy", str(tmp_path), "--truth", str(tmp_path / "none.py")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --truth") and "\n" not in err


def test_share_varying_counts_the_points_on_the_ramp() -> None:
    pts = np.array([[0.45], [0.55], [0.2], [0.9]])
    assert accuracy.share_varying(pts, ramp, [0.0], [1.0], [2.0]) == 0.5
    assert accuracy.share_varying(np.empty((0, 1)), ramp, [0.0], [1.0], [2.0]) is None
