"""Torch-free helpers for ensembles of surrogates (the coordinator imports these).

Member ``k`` of a round seeded ``s`` trains from :func:`member_seed` (member 0 keeps
``s``, so an ensemble of one is the single model it replaces), warm-started from its
own previous state.
"""

from __future__ import annotations

from collections.abc import Sequence


def member_seed(seed: int, member: int) -> int:
    """Seed of ensemble member ``member`` for a round seeded ``seed``."""
    return seed if member == 0 else (int(seed) * 1_000_003 + 7_919 * member) % 2**31


def merge_metrics(per_member: Sequence[dict[str, float]]) -> dict[str, float]:
    """The members' mean of every metric, the worst ``train_rmse`` as ``train_rmse_max``,
    and the slowest member's time as ``train_seconds`` (they ran side by side)."""
    if len(per_member) == 1:
        return dict(per_member[0])
    keys = set.intersection(*(set(m) for m in per_member))
    merged = {k: sum(m[k] for m in per_member) / len(per_member) for k in keys}
    if "train_rmse" in keys:
        merged["train_rmse_max"] = max(m["train_rmse"] for m in per_member)
    if "train_seconds" in keys:
        merged["train_seconds"] = max(m["train_seconds"] for m in per_member)
    merged["members"] = float(len(per_member))
    return merged
