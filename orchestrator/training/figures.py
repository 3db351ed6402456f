"""The picture of one training round, drawn on a Dask worker (torch and matplotlib live there).

Surrogate against truth on a slice of the domain: the surrogate's curve along the
first input (the other inputs at the middle of their ranges), the training data so
far (the truth, sampled by the generate sims; projected onto the slice when there are
several inputs), and the checked points (the check sims' truths), passes and failures
marked. One PNG per round, returned as bytes to the coordinator, which files it in
the run directory and MLflow.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

GRID_POINTS = 200


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
    grid = np.tile((np.asarray(lo) + np.asarray(hi)) / 2, (GRID_POINTS, 1))
    grid[:, 0] = np.linspace(lo[0], hi[0], GRID_POINTS)
    with torch.no_grad():
        pred = net(torch.as_tensor(grid, dtype=torch.float32)).double().numpy()
    fig, axes = plt.subplots(1, len(outputs), figsize=(6.4 * len(outputs), 4.2), squeeze=False)
    data = _data(data_paths, len(inputs) + len(outputs))
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
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _data(paths: Sequence[str], ncols: int) -> np.ndarray:
    arrays = [np.load(p, allow_pickle=False) for p in paths]
    arrays = [a for a in arrays if a.ndim == 2 and a.shape[1] == ncols]
    return np.concatenate(arrays) if arrays else np.empty((0, ncols))
