"""The exact answer of the front example (sims/front.h, at loop.yml's --width 0.02), for
``python -m orchestrator accuracy RUN_DIR --truth examples/front/truth.py``."""

import numpy as np
from numpy.typing import NDArray

WIDTH = 0.02
"""loop.yml's ``--width`` of both sims."""


def truth(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """u(x, y) = tanh((y - 0.5 - 0.2 sin(2 pi x)) / WIDTH), rows (x, y) in, one column u out."""
    c = 0.5 + 0.2 * np.sin(2.0 * np.pi * x[:, 0])
    out: NDArray[np.float64] = np.tanh((x[:, 1] - c) / WIDTH)[:, None]
    return out
