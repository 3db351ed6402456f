"""The exact answer of the sine example (sim-cheap, sim-expensive), for
``python -m orchestrator accuracy RUN_DIR --truth examples/sine/truth.py``."""

import numpy as np
from numpy.typing import NDArray


def truth(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """y = sin(x), rows (x,) in, one column y out."""
    out: NDArray[np.float64] = np.sin(x[:, :1])
    return out
