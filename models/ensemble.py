"""An ensemble of trained surrogates as one module: the mean is the prediction.

Registered in MLflow in place of a single model when ``policy.ensemble_size`` > 1;
``predict`` prints the members' spread (:meth:`Ensemble.mean_and_spread`) beside the mean.
"""

from __future__ import annotations

import torch
from torch import nn


class Ensemble(nn.Module):
    """Members with the same inputs and outputs; ``forward`` is their mean."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        declared = getattr(members[0], "n_inputs", None)
        if isinstance(declared, int):
            self.n_inputs = declared

    def mean_and_spread(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The members' mean and population standard deviation at ``x``."""
        preds = torch.stack([m(x) for m in self.members])
        return preds.mean(dim=0), preds.std(dim=0, unbiased=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mean_and_spread(x)[0]
