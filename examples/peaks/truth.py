"""The exact answer of the peaks example (sims/sim-peaks.c), for
``python -m orchestrator accuracy RUN_DIR --truth examples/peaks/truth.py``."""

import numpy as np
from numpy.typing import NDArray

PEAKS = ((0.30, 0.70, 1.0), (0.70, 0.60, 0.8), (0.55, 0.25, -0.6))
"""(x, y, height) of each peak."""
SIGMA = 0.05


def truth(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """u(x, y) = sum of h exp(-((x - a)^2 + (y - b)^2) / (2 SIGMA^2)), rows (x, y) in, one column u out."""
    u = np.zeros(x.shape[0])
    for a, b, h in PEAKS:
        u += h * np.exp(-((x[:, 0] - a) ** 2 + (x[:, 1] - b) ** 2) / (2.0 * SIGMA**2))
    return u[:, None]
