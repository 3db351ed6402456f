"""lazydynamo: torch's optimizers without importing torch._dynamo, the same numbers, and torch's own
behaviour back once dynamo is imported. Each case in a fresh interpreter (torch._dynamo, once
imported, stays)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRAIN = r"""
import json, sys
import numpy as np
import torch
from orchestrator.training import lazydynamo, tasks

hooked = lazydynamo.install() if sys.argv[1] == "install" else 0
path = sys.argv[2]
rng = np.random.default_rng(0)
x = rng.uniform(-3, 3, size=80)
np.save(path, np.column_stack([x, np.sin(x)]))
hp = {"epochs": 4, "lbfgs_iters": 3}
tasks.warm_up("models.mlp:MLP", {}, 1, 1)
state, m1 = tasks.train(None, [path], "models.mlp:MLP", {}, hp, 1, 3)
state, m2 = tasks.train(state, [path], "models.mlp:MLP", {}, hp, 1, 3)  # the optimizer's state restored
pred = tasks.evaluate(state, "models.mlp:MLP", {}, [[0.5], [1.5]])
print(json.dumps({"hooked": hooked, "dynamo": "torch._dynamo" in sys.modules,
                  "loss": [m1["train_loss"], m2["train_loss"]], "pred": pred}))
"""

COMPILED = r"""
import json, sys
import torch
from orchestrator.training import lazydynamo

hooked = lazydynamo.install()
import torch._dynamo  # a user's model compiles: torch's own wrappers from here on

def run():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([w], lr=0.1)

    @torch.compile(backend="eager")
    def step():
        loss = (w * torch.arange(3.0)).pow(2).sum()
        loss.backward()
        opt.step()  # torch's disable: a graph break, run eagerly
        opt.zero_grad()
        return loss

    return [float(step()) for _ in range(3)], w.detach().tolist()

losses, weights = run()
counters = torch._dynamo.utils.counters
steps = sum(n for why, n in counters["graph_break"].items() if "torch._dynamo.graph_break()" in why)
print(json.dumps({"hooked": hooked, "losses": losses, "weights": weights, "torch_step_breaks": steps,
                  "unimplemented": len(counters["unimplemented"])}))
"""


def _run(script: str, *args: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_training_with_the_hooks_never_imports_dynamo_and_gives_the_same_numbers(tmp_path: Path) -> None:
    """Issue 25: a worker's training (Adam, the LBFGS polish, a restored optimizer state, evaluation)
    imports torch._dynamo without the hooks (1.2-1.7 s) and not with them, with identical results.
    A torch whose wrappers change shape fails here (dynamo imported), not silently."""
    plain = _run(TRAIN, "plain", str(tmp_path / "a.npy"))
    hooked = _run(TRAIN, "install", str(tmp_path / "b.npy"))
    assert plain["dynamo"] is True  # what the hooks are for: torch imports it at the first optimizer
    assert hooked["dynamo"] is False, hooked
    assert isinstance(hooked["hooked"], int) and hooked["hooked"] >= 14  # every optimizer's step, the wrappers
    assert hooked["loss"] == plain["loss"] and hooked["pred"] == plain["pred"], (hooked, plain)


def test_once_dynamo_is_imported_a_compiled_optimizer_step_runs_as_torch_runs_it() -> None:
    """The hooks hand over to torch's own torch._dynamo.disable once dynamo is imported: an optimizer
    step inside a compiled function breaks the graph and runs eagerly, with the numbers of plain eager."""
    got = _run(COMPILED)
    assert isinstance(got["hooked"], int) and got["hooked"] > 0
    # torch's own step wrapper ran under the compiler (its graph_break() calls), and nothing was traced
    # that torch keeps the compiler out of
    assert isinstance(got["torch_step_breaks"], int) and got["torch_step_breaks"] > 0, got
    assert got["unimplemented"] == 0, got
    w = [1.0, 1.0, 1.0]
    m, v = [0.0] * 3, [0.0] * 3
    losses = []
    for t in range(1, 4):  # Adam by hand, lr 0.1, betas (0.9, 0.999), eps 1e-8
        losses.append(sum((wi * i) ** 2 for i, wi in enumerate(w)))
        g = [2 * wi * i * i for i, wi in enumerate(w)]
        m = [0.9 * mi + 0.1 * gi for mi, gi in zip(m, g, strict=True)]
        v = [0.999 * vi + 0.001 * gi * gi for vi, gi in zip(v, g, strict=True)]
        w = [wi - 0.1 * (mi / (1 - 0.9**t)) / ((vi / (1 - 0.999**t)) ** 0.5 + 1e-8)
             for wi, mi, vi in zip(w, m, v, strict=True)]
    assert got["losses"] == [pytest_approx(x) for x in losses], got
    assert got["weights"] == [pytest_approx(x) for x in w], got


def pytest_approx(x: float) -> object:
    return pytest.approx(x, rel=1e-5, abs=1e-6)
