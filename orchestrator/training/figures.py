"""The picture of one training round, drawn on a Dask worker (torch and matplotlib live there).

Surrogate against truth: for one input, the surrogate's curve with the training data
so far (the truth, sampled by the sims) and the checked points (the check sims'
truths), passes and failures marked; for two inputs, the surrogate as a 2-D map
(one panel per output) with the data points and the checked points, passed and
failed, where they lie; for more inputs, the curve along the first input (the
others at the middle of their ranges), the data projected onto it. One PNG per
round, returned as bytes to the coordinator, which files it in the run directory
and MLflow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

GRID_POINTS = 200
MAP_POINTS = 120
"""Grid points per axis of a two-input map."""


def round_figure(
    state: bytes, model: str, model_kwargs: dict[str, Any], data_paths: Sequence[str],
    checks: Sequence[tuple[list[float], list[float], bool]], lo: Sequence[float], hi: Sequence[float],
    names: tuple[list[str], list[str]], title: str,
) -> bytes:
    """A PNG: the surrogate in ``state`` on a slice, with the data so far and the checked points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from orchestrator.training.tasks import load_model

    inputs, outputs = names
    net = load_model(state, model, model_kwargs)
    data = _data(data_paths, len(inputs) + len(outputs))
    if len(inputs) == 2:
        fig = _map(plt, net, torch, data, checks, lo, hi, names)
    else:
        fig = _slice(plt, net, torch, data, checks, lo, hi, names)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _slice(plt: Any, net: Any, torch: Any, data: np.ndarray, checks: Sequence[tuple[list[float], list[float], bool]],
           lo: Sequence[float], hi: Sequence[float], names: tuple[list[str], list[str]]) -> Any:
    """The surrogate's curve along the first input, data and checks over it."""
    inputs, outputs = names
    grid = np.tile((np.asarray(lo) + np.asarray(hi)) / 2, (GRID_POINTS, 1))
    grid[:, 0] = np.linspace(lo[0], hi[0], GRID_POINTS)
    with torch.no_grad():
        pred = net(torch.as_tensor(grid, dtype=torch.float32)).double().numpy()
    fig, axes = plt.subplots(1, len(outputs), figsize=(6.4 * len(outputs), 4.2), squeeze=False)
    for j, ax in enumerate(axes[0]):
        col = len(inputs) + j
        if data.size:
            ax.scatter(data[:, 0], data[:, col], s=4, c="0.7", label=f"data so far ({len(data)} rows)")
        ax.plot(grid[:, 0], pred[:, j], c="C0", lw=2, label="surrogate")
        for ok in (True, False):
            pts = [(x[0], t[j]) for x, t, good in checks if good is ok]
            if pts:
                xs, ts = zip(*pts, strict=True)
                ax.scatter(xs, ts, marker="o" if ok else "x", c="C2" if ok else "C3", s=36, zorder=3,
                           label=f"checks {'passed' if ok else 'failed'} ({len(pts)})")
        ax.set_xlabel(inputs[0] + ("" if len(inputs) == 1 else " (others at mid-range)"))
        ax.set_ylabel(outputs[j])
        ax.legend(fontsize=7, loc="best")
    return fig


def _map(plt: Any, net: Any, torch: Any, data: np.ndarray, checks: Sequence[tuple[list[float], list[float], bool]],
         lo: Sequence[float], hi: Sequence[float], names: tuple[list[str], list[str]]) -> Any:
    """The surrogate over the two inputs, a panel per output: data points and checks where they lie."""
    inputs, outputs = names
    a, b = np.linspace(lo[0], hi[0], MAP_POINTS), np.linspace(lo[1], hi[1], MAP_POINTS)
    ga, gb = np.meshgrid(a, b)
    with torch.no_grad():
        pred = net(torch.as_tensor(np.column_stack([ga.ravel(), gb.ravel()]), dtype=torch.float32)).double().numpy()
    fig, axes = plt.subplots(1, len(outputs), figsize=(6.0 * len(outputs), 4.8), squeeze=False)
    for j, ax in enumerate(axes[0]):
        mesh = ax.pcolormesh(ga, gb, pred[:, j].reshape(ga.shape), cmap="coolwarm", shading="auto")
        fig.colorbar(mesh, ax=ax, label=f"surrogate {outputs[j]}")
        if data.size:
            ax.scatter(data[:, 0], data[:, 1], s=3, c="k", alpha=0.5, label=f"data ({len(data)} rows)")
        _checks_on_map(ax, checks)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_xlabel(inputs[0])
        ax.set_ylabel(inputs[1])
        ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
    return fig


def _checks_on_map(ax: Any, checks: Sequence[tuple[list[float], list[float], bool]]) -> None:
    for ok in (True, False):
        pts = np.array([x[:2] for x, _, good in checks if good is ok]).reshape(-1, 2)
        if pts.size:
            ax.scatter(pts[:, 0], pts[:, 1], marker="o" if ok else "X", s=40 if ok else 70, zorder=3,
                       facecolors="none" if ok else "yellow", edgecolors="limegreen" if ok else "k",
                       linewidths=1.5 if ok else 0.8, label=f"checks {'passed' if ok else 'failed'} ({len(pts)})")


def _data(paths: Sequence[str], ncols: int) -> np.ndarray:
    arrays = [np.load(p, allow_pickle=False) for p in paths]
    arrays = [a for a in arrays if a.ndim == 2 and a.shape[1] == ncols]
    return np.concatenate(arrays) if arrays else np.empty((0, ncols))
