"""Tests of the Dask-side surrogate tasks (real torch, no mocks).

Covers model-spec and data validation, the bytes round trip, warm-start
semantics, a 2-input fit, and the sin(x) reference convergence requirement
(median <= 6 training rounds to 5 successes over 5 seeds).
"""

from __future__ import annotations

import io
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from orchestrator.training.tasks import DEFAULT_HPARAMS, evaluate, load_model, train

MODEL = "models.mlp:MLP"
#: Cheap settings for tests that check mechanics rather than accuracy.
FAST: dict[str, Any] = {"epochs": 20, "lbfgs_iters": 20}


def _save(path: Path, array: np.ndarray) -> str:
    np.save(path, array)
    return str(path)


def _sine_rows(rng: np.random.Generator, n: int = 256) -> np.ndarray:
    x = rng.uniform(-np.pi, np.pi, size=n)
    return np.column_stack([x, np.sin(x)])


def _blob(state: bytes) -> dict[str, Any]:
    loaded: dict[str, Any] = torch.load(io.BytesIO(state), weights_only=True)
    return loaded


@pytest.fixture
def sine_file(tmp_path: Path) -> str:
    return _save(tmp_path / "sine.npy", _sine_rows(np.random.default_rng(0)))


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("models.mlp.MLP", "expected 'package.module:ClassName'"),
        ("models.mlp:", "expected 'package.module:ClassName'"),
        ("no_such_package_xyz.mod:Net", "cannot import module"),
        ("models.mlp:NoSuchClass", "has no attribute 'NoSuchClass'"),
        ("models.mlp:logger", "not a torch.nn.Module subclass"),
    ],
)
def test_bad_model_spec_raises_value_error(sine_file: str, spec: str, fragment: str) -> None:
    with pytest.raises(ValueError, match="invalid model spec") as info:
        train(None, [sine_file], spec, {}, FAST, n_inputs=1, seed=0)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (np.arange(5.0), "2-D"),  # 1-D array
        (np.ones((4, 1)), "columns"),  # no output column for n_inputs=1
        (np.array([[0.0, np.nan]]), "NaN"),
        (b"this is not a numpy file", "cannot read"),
    ],
)
def test_malformed_npy_error_names_the_path(
    tmp_path: Path, sine_file: str, content: np.ndarray | bytes, fragment: str
) -> None:
    bad = tmp_path / "bad_rank3.npy"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        np.save(bad, content)
    with pytest.raises(ValueError, match=fragment) as info:
        train(None, [sine_file, str(bad)], MODEL, {}, FAST, n_inputs=1, seed=0)
    assert str(bad) in str(info.value)


def test_unknown_hparam_and_mismatched_kwargs_rejected(sine_file: str) -> None:
    with pytest.raises(ValueError, match="unknown hparams"):
        train(None, [sine_file], MODEL, {}, {"epoch": 3}, n_inputs=1, seed=0)
    with pytest.raises(ValueError, match="n_inputs"):
        train(None, [sine_file], MODEL, {"n_inputs": 2}, FAST, n_inputs=1, seed=0)


def test_train_evaluate_round_trip_through_bytes(sine_file: str) -> None:
    kwargs = {"hidden": 16, "layers": 2}
    state, metrics = train(None, [sine_file], MODEL, kwargs, FAST, n_inputs=1, seed=3)
    assert isinstance(state, bytes)
    for key in ("train_loss", "train_rmse", "n_samples", "train_seconds", "epochs"):
        assert np.isfinite(metrics[key]), key
    assert metrics["n_samples"] == 256

    xs = [[-1.0], [0.0], [2.5]]
    preds = evaluate(state, MODEL, kwargs, xs)
    assert len(preds) == 3 and all(len(p) == 1 and isinstance(p[0], float) for p in preds)
    module = load_model(state, MODEL, kwargs)
    with torch.no_grad():
        direct = module(torch.tensor(xs, dtype=torch.float32)).double().tolist()
    assert np.allclose(preds, direct)
    # normalisation buffers travel in the state_dict
    assert float(module.x_std) == pytest.approx(np.std(np.load(sine_file)[:, 0]), rel=1e-5)
    assert evaluate(state, MODEL, kwargs, []) == []


def test_training_is_deterministic_given_seed(sine_file: str) -> None:
    hp = {**FAST, "batch_size": 64}
    xs = [[0.3], [-2.0]]
    a = evaluate(train(None, [sine_file], MODEL, {}, hp, 1, seed=7)[0], MODEL, {}, xs)
    b = evaluate(train(None, [sine_file], MODEL, {}, hp, 1, seed=7)[0], MODEL, {}, xs)
    c = evaluate(train(None, [sine_file], MODEL, {}, hp, 1, seed=8)[0], MODEL, {}, xs)
    assert a == b
    assert a != c


def test_warm_start_continues(tmp_path: Path, sine_file: str) -> None:
    state1, m1 = train(None, [sine_file], MODEL, {}, FAST, n_inputs=1, seed=1)
    state2, m2 = train(state1, [sine_file], MODEL, {}, FAST, n_inputs=1, seed=2)
    b1, b2 = _blob(state1), _blob(state2)
    assert (b1["epochs_done"], b2["epochs_done"]) == (FAST["epochs"], 2 * FAST["epochs"])
    assert b2["rounds_done"] == 2 and b2["optimizer"]["state"]
    assert m2["train_loss"] <= m1["train_loss"] * (1 + 1e-6)

    # normalisation is fitted once and frozen: new data shifts no buffers
    shifted = _save(tmp_path / "shifted.npy", _sine_rows(np.random.default_rng(5)) + np.array([1.0, 0.5]))
    b3 = _blob(train(state2, [sine_file, shifted], MODEL, {}, FAST, n_inputs=1, seed=3)[0])
    for name in ("x_mean", "x_std", "y_mean", "y_std"):
        assert torch.equal(b3["model"][name], b1["model"][name]), name
    assert b3["rounds_done"] == 3


def test_two_input_function_fits(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    x = rng.uniform(-2.0, 2.0, size=(400, 2))
    y = np.sin(x[:, 0]) * np.cos(x[:, 1])
    path = _save(tmp_path / "xz.npy", np.column_stack([x, y]))
    kwargs = {"hidden": 32, "layers": 2}
    hp = {"epochs": 50, "lbfgs_iters": 200}
    state, metrics = train(None, [path], MODEL, kwargs, hp, n_inputs=2, seed=0)
    assert metrics["train_rmse"] < 0.02
    q = rng.uniform(-1.8, 1.8, size=(100, 2))
    pred = np.array(evaluate(state, MODEL, kwargs, q.tolist()))
    assert pred.shape == (100, 1)
    assert np.sqrt(np.mean((pred[:, 0] - np.sin(q[:, 0]) * np.cos(q[:, 1])) ** 2)) < 0.03


def _rounds_to_target(seed: int, workdir: Path, successes_needed: int = 5, max_rounds: int = 12) -> int:
    """The reference loop: 256 new rows, retrain on all, check 1 random x; count rounds."""
    rng = np.random.default_rng(seed)
    state: bytes | None = None
    paths: list[str] = []
    successes = 0
    for round_no in range(1, max_rounds + 1):
        paths.append(_save(workdir / f"s{seed}_r{round_no}.npy", _sine_rows(rng)))
        state, metrics = train(state, paths, MODEL, {}, {}, n_inputs=1, seed=seed)
        assert metrics["train_seconds"] < 10.0  # generous: the box is shared; target is < ~3 s
        q = float(rng.uniform(-np.pi, np.pi))
        if abs(evaluate(state, MODEL, {}, [[q]])[0][0] - np.sin(q)) < 0.05:
            successes += 1
        if successes >= successes_needed:
            return round_no
    return max_rounds + 1


def test_sine_reference_converges_within_six_rounds(tmp_path: Path) -> None:
    assert DEFAULT_HPARAMS["lbfgs_iters"] > 0
    rounds = [_rounds_to_target(seed, tmp_path) for seed in range(1, 6)]
    assert statistics.median(rounds) <= 6, rounds
