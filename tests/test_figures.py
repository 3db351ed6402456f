"""Round figures: a two-input model is drawn as a 2-D map with its data and its checks where
they lie (a failed check is a yellow cross, a colour the map's palette never uses)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from orchestrator.training.figures import round_figure
from orchestrator.training.tasks import train

NAMES = (["x", "y"], ["u"])
KW = {"hidden": 8, "layers": 1, "activation": "tanh"}


def _image(png: bytes) -> np.ndarray:
    import matplotlib.image

    img: np.ndarray = matplotlib.image.imread(io.BytesIO(png), format="png")
    return img


def _yellow(img: np.ndarray) -> int:
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(((r > 0.9) & (g > 0.9) & (b < 0.2)).sum())


def _model(tmp_path: Path) -> tuple[bytes, str]:
    xs = np.random.default_rng(0).uniform(0, 1, size=(64, 2))
    path = tmp_path / "d.npy"
    np.save(path, np.hstack([xs, np.tanh((xs[:, 1:] - 0.5) / 0.1)]))
    state, _ = train(None, [str(path)], "models.mlp:MLP", KW, {"epochs": 5, "lbfgs_iters": 0}, 2, 0)
    return state, str(path)


def test_two_inputs_are_a_map_with_failed_checks_marked_where_they_lie(tmp_path: Path) -> None:
    state, data = _model(tmp_path)
    passed = [([0.2, 0.2], [-1.0], True), ([0.8, 0.9], [1.0], True)]
    png = round_figure(state, "models.mlp:MLP", KW, [data], passed, [0, 0], [1, 1], NAMES, "round 1")
    assert _yellow(_image(png)) == 0
    failed = [*passed, ([0.5, 0.5], [0.0], False)]
    img = _image(round_figure(state, "models.mlp:MLP", KW, [data], failed, [0, 0], [1, 1], NAMES, "round 1"))
    ys, xs = np.nonzero((img[..., 0] > 0.9) & (img[..., 1] > 0.9) & (img[..., 2] < 0.2))
    assert xs.size > 0
    # the map's axes: the failed check at (0.5, 0.5) sits mid-panel, not in a legend corner
    h, w = img.shape[:2]
    assert 0.25 * w < np.median(xs) < 0.75 * w and 0.25 * h < np.median(ys) < 0.75 * h


def test_one_input_stays_a_curve(tmp_path: Path) -> None:
    xs = np.linspace(-3, 3, 40)[:, None]
    np.save(tmp_path / "s.npy", np.hstack([xs, np.sin(xs)]))
    state, _ = train(None, [str(tmp_path / "s.npy")], "models.mlp:MLP", KW, {"epochs": 5, "lbfgs_iters": 0}, 1, 0)
    png = round_figure(state, "models.mlp:MLP", KW, [str(tmp_path / "s.npy")], [([0.0], [0.0], False)],
                       [-3], [3], (["x"], ["y"]), "round 1")
    img = _image(png)
    assert img.shape[0] < img.shape[1]  # the curve's wide panel, no colour bar


def test_a_picture_is_drawn_at_the_lowest_priority_in_a_thread_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25: the round's picture (a core for most of a second) yields to the checks' ranks starting beside it:
    drawn in a thread at nice 19 that ends with it; the worker's own thread keeps its priority for training, and a
    failure reaches the task as it was raised."""
    import os
    import threading

    from orchestrator.training import figures, remote

    seen: dict[str, int] = {}

    def fake(*args: object) -> bytes:
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["thread"] = threading.get_native_id()
        if args == ("boom",):
            raise ValueError("no picture")
        return b"png"

    monkeypatch.setattr(figures, "round_figure", fake)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert remote.figure("ok") == b"png"
    assert seen["nice"] == remote.FIGURE_NICE and seen["thread"] != threading.get_native_id()
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    with pytest.raises(ValueError, match="no picture"):
        remote.figure("boom")
