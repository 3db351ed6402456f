"""A surrogate for the worker-kill test: the sine MLP whose ddp rank 1 stops to be killed, once.

In a training pass inside a ``torch.distributed`` group, rank 1 writes
``$ORCH_TEST_HOLD_DIR/held-<pid>`` and waits there (its peer waits in the
gradient all-reduce) until ``$ORCH_TEST_HOLD_DIR/released`` exists. The test
writes ``released`` and SIGKILLs the pid, so the kill lands inside a ddp round
for sure; the retried round's new rank 1 sees ``released`` and trains on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models.mlp import MLP

HOLD_LIMIT_S = 120.0
"""A held rank gives up (and fails its round) after this, so a broken test cannot hang."""


def _hold(directory: Path) -> None:
    mark = directory / f"held-{os.getpid()}"
    partial = directory / f".partial-{os.getpid()}"  # a name the test's ``held-*`` never matches
    partial.write_text(str(os.getpid()))
    partial.rename(mark)
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (directory / "released").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank held for {HOLD_LIMIT_S:g} s and was not killed")
        time.sleep(0.01)


class HeldMLP(MLP):
    """:class:`models.mlp.MLP` whose ddp rank 1 waits to be killed in its first training pass."""

    def forward_normalised(self, x: torch.Tensor) -> torch.Tensor:
        hold = os.environ.get("ORCH_TEST_HOLD_DIR")
        if (hold and self.training and dist.is_initialized() and dist.get_rank() == 1
                and not (Path(hold) / "released").exists()):
            _hold(Path(hold))
        return super().forward_normalised(x)
