"""Which rows a sim returned may join the data: rows that would poison the training are refused.

A table that passed :func:`orchestrator.results.check_table` (finite, the right shape) can still
hold a value no training survives: one finite but huge output (1e300 from a broken solver) turns
the loss non-finite or squashes every other row into one value after normalisation. Three rules,
from ``acceptance`` in loop.yml, refuse such rows before they are written to ``data/``:

* a declared range ``[lo, hi]`` per output (``acceptance.ranges``);
* a magnitude no float32 training can hold (``acceptance.max_abs``);
* a robust outlier rule (``acceptance.outlier_k``): further from the median than ``outlier_k``
  robust scales (1.4826 x the median absolute deviation, or where larger the 90% quantile of the
  absolute deviations / 1.6449) of the data accepted so far and the run's own rows together, per
  output; neither is moved by a few wild rows, so one huge value cannot hide itself.

Pure functions of arrays; the sim runner drops the refused rows and says why in the run's
``sim_end`` event (a run left with no row is a failed run, retried as usual).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

MAD_SCALE = 1.4826
"""The median absolute deviation times this estimates a normal distribution's standard deviation."""
Q90_SCALE = 1.6449
"""A normal distribution's 90% quantile of absolute deviations, in standard deviations."""
MIN_REFERENCE = 8
"""Fewer values than this (accepted and the run's own) and the outlier rule does not judge."""
MAX_REFERENCE = 20_000
"""The outlier rule's reference: at most this many of the most recently accepted rows."""


@dataclass(frozen=True)
class Refusal:
    """Rows of one table refused, and why (one line)."""

    rows: np.ndarray
    """Boolean mask over the table's rows: True where refused."""
    reason: str

    @property
    def count(self) -> int:
        return int(self.rows.sum())


def _first(table: np.ndarray, bad: np.ndarray, names: Sequence[str], col: int, n_in: int) -> str:
    row = int(np.argmax(bad))
    return f"row {row}: {names[col]}={table[row, n_in + col]:.6g}"


def refused_rows(table: np.ndarray, n_in: int, outputs: Sequence[str], reference: np.ndarray, *,
                 ranges: Mapping[str, tuple[float, float]], max_abs: float, outlier_k: float | None
                 ) -> Refusal | None:
    """The rows of ``table`` (inputs then outputs) that the rules refuse, or None.

    ``reference``: the outputs of the data accepted so far (rows x outputs).

    >>> t = np.array([[0.0, 0.1], [1.0, 1e300], [2.0, -0.3]])
    >>> r = refused_rows(t, 1, ["y"], np.zeros((0, 1)), ranges={}, max_abs=3.4e38, outlier_k=1e3)
    >>> r.rows.tolist(), r.reason
    ([False, True, False], 'y beyond the magnitude float32 training holds (3.4e+38): row 1: y=1e+300')
    """
    out = table[:, n_in:]
    bad = np.zeros(table.shape[0], dtype=bool)
    reasons: list[str] = []
    for col, name in enumerate(outputs):
        values = out[:, col]
        lo, hi = ranges.get(name, (-np.inf, np.inf))
        checks = [((values < lo) | (values > hi), f"{name} outside its declared range [{lo:g}, {hi:g}]"),
                  (np.abs(values) > max_abs, f"{name} beyond the magnitude float32 training holds ({max_abs:g})")]
        if outlier_k is not None:
            checks.append(_outliers(values, reference[-MAX_REFERENCE:, col], name, outlier_k))
        for mask, why in checks:
            fresh = mask & ~bad
            if fresh.any():
                reasons.append(f"{why}: {_first(table, fresh, outputs, col, n_in)}")
                bad |= mask
    return Refusal(bad, "; ".join(reasons)) if bad.any() else None


def _outliers(values: np.ndarray, reference: np.ndarray, name: str, k: float) -> tuple[np.ndarray, str]:
    both = np.concatenate([reference, values])
    if both.size < MIN_REFERENCE:
        return np.zeros(values.shape, dtype=bool), ""
    median = float(np.median(both))
    dev = np.abs(both - median)
    # the MAD is ~0 where over half the values sit on one plateau (a front's +-1): then the 90% quantile's
    # deviation, which a few wild rows (under 10%) do not move either, is the scale
    scale = max(MAD_SCALE * float(np.median(dev)), float(np.quantile(dev, 0.9, method="lower")) / Q90_SCALE)
    if not scale > 0 or not np.isfinite(scale):  # 90% of the values or more are equal: no scale to judge by
        return np.zeros(values.shape, dtype=bool), ""
    return (np.abs(values - median) > k * scale,
            f"{name} an outlier (more than {k:g} robust scales of {scale:.3g} from the median {median:.6g})")
