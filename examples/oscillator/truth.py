"""The exact answer of the oscillator example, for
``python -m orchestrator accuracy RUN_DIR --truth examples/oscillator/truth.py``.

The sims integrate x'' + 2 zeta x' + x = 0, x(0) = 1, x'(0) = -zeta with RK4; for
zeta < 1 the solution is x(t) = exp(-zeta t) cos(sqrt(1 - zeta^2) t).
"""

import numpy as np
from numpy.typing import NDArray


def truth(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rows (t, zeta) in, one column x out."""
    t, zeta = x[:, 0], x[:, 1]
    out: NDArray[np.float64] = (np.exp(-zeta * t) * np.cos(np.sqrt(1.0 - zeta**2) * t))[:, None]
    return out
