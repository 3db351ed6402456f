"""Fully connected surrogate network with built-in input/output normalisation.

The :class:`MLP` maps *raw* inputs to *raw* outputs. Internally it standardises
inputs with ``x_mean``/``x_std`` and de-standardises outputs with
``y_mean``/``y_std``. These statistics are registered buffers, so they travel
with ``state_dict()`` and a model restored from bytes on another Dask worker
behaves identically.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
}

#: Standard deviations below this are treated as zero (constant column).
_MIN_STD = 1e-8


def _make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` (case-insensitive)."""
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        known = ", ".join(sorted(_ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; expected one of: {known}") from None


def _column_stats(values: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std of a 2-D array; constant columns get std 1."""
    data = torch.as_tensor(np.asarray(values), dtype=torch.float64)
    if data.ndim == 1:
        data = data.unsqueeze(1)
    if data.ndim != 2 or data.shape[0] == 0:
        raise ValueError(f"expected a non-empty 2-D array, got shape {tuple(data.shape)}")
    mean = data.mean(dim=0)
    std = data.std(dim=0, unbiased=False)
    std = torch.where(std < _MIN_STD, torch.ones_like(std), std)
    return mean, std


class MLP(nn.Module):
    """Multi-layer perceptron ``raw x -> raw y`` with normalisation buffers.

    Args:
        n_inputs: Number of input features.
        n_outputs: Number of output features.
        hidden: Width of every hidden layer.
        layers: Number of hidden layers (``0`` gives a linear model).
        activation: One of ``tanh``, ``relu``, ``gelu``, ``silu``, ``softplus``.
    """

    x_mean: torch.Tensor
    x_std: torch.Tensor
    y_mean: torch.Tensor
    y_std: torch.Tensor

    def __init__(
        self,
        n_inputs: int = 1,
        n_outputs: int = 1,
        hidden: int = 64,
        layers: int = 3,
        activation: str = "tanh",
    ) -> None:
        super().__init__()
        if n_inputs < 1 or n_outputs < 1:
            raise ValueError(f"n_inputs and n_outputs must be >= 1, got {n_inputs}, {n_outputs}")
        if layers < 0 or (layers > 0 and hidden < 1):
            raise ValueError(f"invalid architecture: layers={layers}, hidden={hidden}")
        self.n_inputs = n_inputs
        self.n_outputs = n_outputs
        self.net = self._build(n_inputs, n_outputs, hidden, layers, activation)
        self.register_buffer("x_mean", torch.zeros(n_inputs))
        self.register_buffer("x_std", torch.ones(n_inputs))
        self.register_buffer("y_mean", torch.zeros(n_outputs))
        self.register_buffer("y_std", torch.ones(n_outputs))

    @staticmethod
    def _build(n_in: int, n_out: int, hidden: int, layers: int, activation: str) -> nn.Sequential:
        """Create the ``Linear -> act -> ... -> Linear`` stack."""
        modules: list[nn.Module] = []
        width = n_in
        for _ in range(layers):
            modules += [nn.Linear(width, hidden), _make_activation(activation)]
            width = hidden
        modules.append(nn.Linear(width, n_out))
        return nn.Sequential(*modules)

    @torch.no_grad()
    def fit_normalisation(
        self, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray
    ) -> None:
        """Set the normalisation buffers from training inputs ``x`` and outputs ``y``.

        Constant columns get a std of 1 so they never cause division by zero.
        """
        x_mean, x_std = _column_stats(x)
        y_mean, y_std = _column_stats(y)
        if x_mean.numel() != self.n_inputs or y_mean.numel() != self.n_outputs:
            raise ValueError(
                f"data has {x_mean.numel()} inputs / {y_mean.numel()} outputs, "
                f"model expects {self.n_inputs} / {self.n_outputs}"
            )
        for name, value in (("x_mean", x_mean), ("x_std", x_std), ("y_mean", y_mean), ("y_std", y_std)):
            buffer = getattr(self, name)
            buffer.copy_(value.to(dtype=buffer.dtype))
        logger.debug("normalisation fitted: x_mean=%s x_std=%s", x_mean.tolist(), x_std.tolist())

    def normalise_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Map raw inputs to the standardised space the network sees."""
        return (x - self.x_mean) / self.x_std

    def normalise_outputs(self, y: torch.Tensor) -> torch.Tensor:
        """Map raw outputs to the standardised space the network predicts."""
        return (y - self.y_mean) / self.y_std

    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        """Predict standardised outputs from raw inputs (used for the training loss)."""
        out: torch.Tensor = self.net(self.normalise_inputs(x))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict raw outputs of shape ``(batch, n_outputs)`` from raw inputs ``(batch, n_inputs)``."""
        return self.forward_normalised(x) * self.y_std + self.y_mean
