"""Surrogate training/evaluation tasks executed on Dask workers.

Everything in here is a plain, picklable, module-level function with no Dask
dependency: the orchestrator submits ``train``/``evaluate`` by reference and the
worker imports this module. Model state travels between rounds as ``bytes``
(a ``torch.save`` of a plain dict), so any worker can continue any campaign.

State blob layout (``STATE_FORMAT_VERSION`` 1)::

    {
        "format_version": 1,
        "model_spec": "models.mlp:MLP",
        "model_kwargs": {...},            # as passed by the caller
        "n_inputs": int, "n_outputs": int,
        "model": model.state_dict(),      # includes normalisation buffers
        "optimizer": optimizer.state_dict(),
        "epochs_done": int,               # cumulative over all rounds
        "rounds_done": int,
        "normalisation_fitted": bool,
    }

Normalisation is fitted once, on the first round's data, and then frozen: the
network weights learned so far live in that normalised space, so refitting on
every warm start would silently shift the function the network represents
(set ``hparams["refit_normalisation"] = True`` to opt in anyway).
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from torch import nn

from orchestrator.config import HparamsConfig
from orchestrator.training import devices
from orchestrator.userref import load_ref, split_ref

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1

#: Defaults tuned on the sin(x) reference case (see benchmarks/surrogate_rounds.py):
#: a short full-batch Adam phase (robust from any start, its moments are carried
#: across rounds) followed by a full-batch L-BFGS polish (fast, precise
#: convergence on the small, smooth, noise-free data sets simulations produce).
DEFAULT_HPARAMS: dict[str, Any] = HparamsConfig().model_dump()
"""The defaults of ``training.hparams``, declared (with docs and bounds) in :class:`HparamsConfig`."""

_LOSSES = {"mse": nn.MSELoss, "smooth_l1": nn.SmoothL1Loss}

_EVAL_CACHE_SIZE = 8
_eval_cache: OrderedDict[tuple[str, str, str], nn.Module] = OrderedDict()
_eval_cache_lock = threading.Lock()


# --------------------------------------------------------------------------- #
# model spec / construction
# --------------------------------------------------------------------------- #
def resolve_model_class(spec: str) -> type[nn.Module]:
    """Import ``"package.module:Class"`` and return the class.

    Raises:
        ValueError: if the spec is malformed, not importable, or not an
            ``nn.Module`` subclass.
    """
    try:
        module_name, attr = split_ref(spec)
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"invalid model spec {spec!r}: expected 'package.module:ClassName'") from exc
    try:
        cls = load_ref(spec)
    except ImportError as exc:
        raise ValueError(
            f"invalid model spec {spec!r}: cannot import module {module_name!r} ({exc})"
        ) from exc
    except AttributeError:
        raise ValueError(
            f"invalid model spec {spec!r}: module {module_name!r} has no attribute {attr!r}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"invalid model spec {spec!r}: {attr!r} is not a torch.nn.Module subclass")
    return cls


def _build_model(spec: str, model_kwargs: dict[str, Any], n_inputs: int, n_outputs: int) -> nn.Module:
    """Instantiate ``spec`` with ``model_kwargs`` plus ``n_inputs``/``n_outputs``."""
    cls = resolve_model_class(spec)
    kwargs = dict(model_kwargs)
    for key, value in (("n_inputs", n_inputs), ("n_outputs", n_outputs)):
        if key in kwargs and int(kwargs[key]) != value:
            raise ValueError(f"model_kwargs[{key!r}]={kwargs[key]} but the data/state has {key}={value}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ValueError(f"cannot construct {spec} with kwargs {kwargs}: {exc}") from exc


# --------------------------------------------------------------------------- #
# state (de)serialisation
# --------------------------------------------------------------------------- #
def _to_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (nested dicts, lists) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _serialise(blob: dict[str, Any]) -> bytes:
    """``torch.save`` a state blob into bytes."""
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return buffer.getvalue()


def _deserialise(state: bytes) -> dict[str, Any]:
    """Inverse of :func:`_serialise`; validates the blob layout."""
    if not isinstance(state, (bytes, bytearray, memoryview)):
        raise TypeError(f"state must be bytes, got {type(state).__name__}")
    try:
        blob = torch.load(io.BytesIO(bytes(state)), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises a variety of errors on garbage
        raise ValueError(f"state bytes are not a valid training state: {exc}") from exc
    if not isinstance(blob, dict) or blob.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError("state bytes are not a training state of format version " f"{STATE_FORMAT_VERSION}")
    return blob


def _restore_model(blob: dict[str, Any], spec: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """Build the model described by ``blob`` and load its weights."""
    if blob["model_spec"] != spec:
        raise ValueError(f"state was produced by model {blob['model_spec']!r}, not {spec!r}")
    model = _build_model(spec, model_kwargs, int(blob["n_inputs"]), int(blob["n_outputs"]))
    try:
        model.load_state_dict(blob["model"])
    except RuntimeError as exc:
        raise ValueError(f"state does not match {spec} with kwargs {model_kwargs}: {exc}") from exc
    return model


def load_model(state: bytes, model: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """Rebuild a trained model (in eval mode) from ``train``'s state bytes."""
    restored = _restore_model(_deserialise(state), model, model_kwargs)
    restored.eval()
    return restored


# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def _load_array(path: str, n_inputs: int) -> np.ndarray:
    """Load one ``.npy`` training file and validate its shape and values."""
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot read training data file {path!r}: {exc}") from exc
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = getattr(array, "shape", None)
        raise ValueError(f"training data file {path!r} must hold a 2-D array, got shape {shape}")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(f"training data file {path!r} has non-real dtype {array.dtype}")
    if array.shape[1] <= n_inputs:
        raise ValueError(
            f"training data file {path!r} has {array.shape[1]} columns; need n_inputs={n_inputs} "
            "input columns plus at least one output column"
        )
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"training data file {path!r} contains NaN or infinite values")
    return array


def load_training_data(data_paths: list[str], n_inputs: int) -> tuple[np.ndarray, np.ndarray]:
    """Load and concatenate all files; return ``(x, y)`` as float64 arrays."""
    if n_inputs < 1:
        raise ValueError(f"n_inputs must be >= 1, got {n_inputs}")
    if not data_paths:
        raise ValueError("no training data files given")
    arrays: list[np.ndarray] = []
    for path in data_paths:
        array = _load_array(str(path), n_inputs)
        if arrays and array.shape[1] != arrays[0].shape[1]:
            raise ValueError(
                f"training data file {path!r} has {array.shape[1]} columns, "
                f"but {data_paths[0]!r} has {arrays[0].shape[1]}"
            )
        arrays.append(array)
    data = np.concatenate(arrays, axis=0)
    if data.shape[0] == 0:
        raise ValueError(f"training data files contain no rows: {list(data_paths)}")
    return data[:, :n_inputs], data[:, n_inputs:]


# --------------------------------------------------------------------------- #
# training
# --------------------------------------------------------------------------- #
def _merge_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Defaults overlaid with ``hparams``; unknown keys are rejected."""
    unknown = set(hparams) - set(DEFAULT_HPARAMS)
    if unknown:
        raise ValueError(f"unknown hparams {sorted(unknown)}; known: {sorted(DEFAULT_HPARAMS)}")
    merged = {**DEFAULT_HPARAMS, **hparams}
    if merged["loss"] not in _LOSSES:
        raise ValueError(f"unknown loss {merged['loss']!r}; expected one of {sorted(_LOSSES)}")
    if int(merged["epochs"]) < 0 or float(merged["lr"]) <= 0:
        raise ValueError(f"need epochs >= 0 and lr > 0, got {merged['epochs']}, {merged['lr']}")
    return merged


def _loss_pair(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and target in the space the loss is computed in.

    Models exposing ``forward_normalised``/``normalise_outputs`` (like
    :class:`models.mlp.MLP`) are trained on standardised outputs so the loss is
    scale-free; any other module is trained on raw outputs.
    """
    forward_normalised = getattr(model, "forward_normalised", None)
    normalise_outputs = getattr(model, "normalise_outputs", None)
    if callable(forward_normalised) and callable(normalise_outputs):
        return forward_normalised(x), normalise_outputs(y)
    return model(x), y


def _cosine_lr(step: int, total: int, lr: float, final_factor: float) -> float:
    """Cosine decay from ``lr`` to ``lr * final_factor`` over ``total`` steps."""
    if total <= 1:
        return lr
    progress = step / (total - 1)
    return lr * (final_factor + (1.0 - final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


class Reduce:
    """How the loss and gradients of one process combine with its data-parallel peers.

    This one is a single process: its shard is all the data, nothing is exchanged.
    :class:`orchestrator.training.ddp_worker.AllReduce` sums over a process group,
    each rank's loss weighted by its share of the rows, so the sum is the full-data
    loss and its gradient (the arithmetic of single-process training, up to rounding).
    """

    weight = 1.0

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows this process computes gradients on."""
        return x, y

    def grads(self, model: nn.Module) -> None:
        """Combine the parameters' gradients with the peers' (sum of weighted gradients)."""

    def value(self, loss: torch.Tensor) -> torch.Tensor:
        """The combined (full-data) value of a weighted loss."""
        return loss


SINGLE = Reduce()


def _run_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    hp: dict[str, Any],
    generator: torch.Generator,
    reduce: Reduce = SINGLE,
) -> None:
    """Run ``hp["epochs"]`` passes over ``(x, y)`` with a cosine lr schedule."""
    n = x.shape[0]
    batch = n if int(hp["batch_size"] or 0) <= 0 else min(int(hp["batch_size"]), n)
    per_epoch = math.ceil(n / batch)
    total = int(hp["epochs"]) * per_epoch
    loss_fn = _LOSSES[hp["loss"]]()
    clip = float(hp["grad_clip"] or 0.0)
    step = 0
    model.train()
    for _ in range(int(hp["epochs"])):
        order = torch.randperm(n, generator=generator) if batch < n else None
        for start in range(0, n, batch):
            idx = order[start : start + batch] if order is not None else slice(None)
            for group in optimizer.param_groups:
                group["lr"] = _cosine_lr(step, total, float(hp["lr"]), float(hp["lr_final_factor"]))
            optimizer.zero_grad(set_to_none=True)
            pred, target = _loss_pair(model, x[idx], y[idx])
            loss = loss_fn(pred, target) * reduce.weight
            if not torch.isfinite(reduce.value(loss.detach().clone())):
                raise FloatingPointError(f"training diverged: non-finite loss at step {step}")
            loss.backward()
            reduce.grads(model)
            if clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            step += 1


def _full_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict[str, Any]) -> torch.Tensor:
    """Full-batch objective: training loss plus the L2 term Adam's weight decay implies."""
    pred, target = _loss_pair(model, x, y)
    loss: torch.Tensor = _LOSSES[hp["loss"]]()(pred, target)
    decay = float(hp["weight_decay"])
    if decay > 0:
        loss = loss + 0.5 * decay * sum(p.pow(2).sum() for p in model.parameters())
    return loss


def _polish_lbfgs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict[str, Any], reduce: Reduce = SINGLE
) -> None:
    """Full-batch L-BFGS refinement; reverted if it diverges or makes things worse.

    L-BFGS curvature pairs describe the current data set only, so its history
    is deliberately not carried across rounds (the model weights are).
    """
    iters = int(hp["lbfgs_iters"] or 0)
    if iters <= 0:
        return
    model.train()
    snapshot = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        before = float(reduce.value(_full_loss(model, x, y, hp) * reduce.weight))
    optimizer = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=iters,
        max_eval=iters * 5 // 4,
        history_size=int(hp["lbfgs_history"]),
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = _full_loss(model, x, y, hp) * reduce.weight
        torch.autograd.backward(loss)
        reduce.grads(model)
        return reduce.value(loss.detach().clone())

    optimizer.step(closure)
    with torch.no_grad():
        after = float(reduce.value(_full_loss(model, x, y, hp) * reduce.weight))
    if not math.isfinite(after) or after > before:
        logger.warning("L-BFGS polish did not improve the loss (%.3g -> %.3g); reverting", before, after)
        model.load_state_dict(snapshot)


@torch.no_grad()
def _snapshot_if_warm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, hp: dict[str, Any], warm: bool
) -> tuple[float, dict[str, torch.Tensor]] | None:
    """Loss and weights at the start of a warm-started round (``None`` if fresh)."""
    if not warm:
        return None
    return float(_full_loss(model, x, y, hp)), copy.deepcopy(model.state_dict())


@torch.no_grad()
def _keep_best(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    hp: dict[str, Any],
    start: tuple[float, dict[str, torch.Tensor]] | None,
) -> None:
    """Revert to the round's starting weights if training made the loss worse.

    Guarantees that warm-start retraining never degrades the fit of the data
    it is given (e.g. a restarted lr schedule kicking a converged model).
    """
    if start is None:
        return
    start_loss, start_weights = start
    end_loss = float(_full_loss(model, x, y, hp))
    if not math.isfinite(end_loss) or end_loss > start_loss:
        logger.info(
            "round ended worse than it started (%.3g > %.3g); keeping start weights", end_loss, start_loss
        )
        model.load_state_dict(start_weights)


@torch.no_grad()
def _final_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_name: str) -> dict[str, float]:
    """Full-data loss (training space) and RMSE (raw output units)."""
    model.eval()
    pred, target = _loss_pair(model, x, y)
    loss = float(_LOSSES[loss_name]()(pred, target))
    rmse = float(torch.sqrt(torch.mean((model(x).double() - y.double()) ** 2)))
    return {"train_loss": loss, "train_rmse": rmse}


def _make_optimizer(
    model: nn.Module, hp: dict[str, Any], saved: dict[str, Any] | None
) -> torch.optim.Optimizer:
    """Adam over the model parameters, restoring ``saved`` state if given."""
    optimizer = torch.optim.Adam(
        model.parameters(), lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"])
    )
    if saved is not None:
        optimizer.load_state_dict(saved)
        for group in optimizer.param_groups:
            group["weight_decay"] = float(hp["weight_decay"])
    return optimizer


def _prepare(
    state: bytes | None, spec: str, model_kwargs: dict[str, Any], n_inputs: int, n_outputs: int, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Fresh (seeded) or restored model plus the previous blob (empty if fresh)."""
    if state is None:
        with torch.random.fork_rng(devices=[]):  # seed init without touching the worker's global RNG
            torch.manual_seed(int(seed) % 2**63)
            return _build_model(spec, model_kwargs, n_inputs, n_outputs), {}
    blob = _deserialise(state)
    if (int(blob["n_inputs"]), int(blob["n_outputs"])) != (n_inputs, n_outputs):
        raise ValueError(
            f"state has n_inputs={blob['n_inputs']}, n_outputs={blob['n_outputs']} but data has "
            f"n_inputs={n_inputs}, n_outputs={n_outputs}"
        )
    return _restore_model(blob, spec, model_kwargs), blob


def train(
    state: bytes | None,
    data_paths: list[str],
    model: str,
    model_kwargs: dict[str, Any],
    hparams: dict[str, Any],
    n_inputs: int,
    seed: int,
    device: str = "cpu",
    reduce: Reduce = SINGLE,
) -> tuple[bytes, dict[str, float]]:
    """Train (or warm-start and continue training) a surrogate on all data files.

    Args:
        state: Bytes from a previous ``train`` call, or ``None`` for a fresh
            model initialised from ``seed``.
        data_paths: ``.npy`` float 2-D arrays; columns ``[:n_inputs]`` are
            inputs, the remaining columns are outputs.
        model: Import spec ``"package.module:Class"``; the class is constructed
            as ``Class(n_inputs=..., n_outputs=..., **model_kwargs)``.
        model_kwargs: Extra constructor arguments (plain JSON-like values).
        hparams: Overrides for :data:`DEFAULT_HPARAMS`.
        n_inputs: Number of input columns.
        seed: Seeds initialisation (fresh start) and mini-batch shuffling.
        device: ``training.device`` (``auto`` | ``cpu`` | ``cuda``); the saved
            state holds CPU tensors whatever the device.
        reduce: Combines gradients with data-parallel peers (:mod:`.ddp_worker`).

    Returns:
        ``(new_state_bytes, metrics)`` with metrics ``train_loss``,
        ``train_rmse``, ``n_samples``, ``train_seconds``, ``epochs``,
        ``epochs_done`` and ``rounds_done``.
    """
    started = time.perf_counter()
    hp = _merge_hparams(hparams)
    torch.set_num_threads(max(1, int(hp["num_threads"])))
    x_np, y_np = load_training_data(data_paths, n_inputs)
    net, blob = _prepare(state, model, model_kwargs, n_inputs, y_np.shape[1], seed)
    fitted = bool(blob.get("normalisation_fitted", False))
    fit_normalisation = getattr(net, "fit_normalisation", None)
    if callable(fit_normalisation) and (not fitted or hp["refit_normalisation"]):
        fit_normalisation(x_np, y_np)
        fitted = True
    dev = devices.resolve(device)
    net.to(dev)
    optimizer = _make_optimizer(net, hp, blob.get("optimizer"))
    epochs_done = int(blob.get("epochs_done", 0))
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + epochs_done) % 2**63)
    x, y = torch.from_numpy(x_np).float().to(dev), torch.from_numpy(y_np).float().to(dev)
    start = _snapshot_if_warm(net, x, y, hp, warm=state is not None)
    xs, ys = reduce.shard(x, y)
    _run_epochs(net, optimizer, xs, ys, hp, generator, reduce)
    _polish_lbfgs(net, xs, ys, hp, reduce)
    _keep_best(net, x, y, hp, start)
    metrics = _final_metrics(net, x, y, hp["loss"])
    epochs_total = epochs_done + int(hp["epochs"])
    rounds_total = int(blob.get("rounds_done", 0)) + 1
    new_blob = {
        "format_version": STATE_FORMAT_VERSION,
        "model_spec": model,
        "model_kwargs": dict(model_kwargs),
        "n_inputs": n_inputs,
        "n_outputs": int(y_np.shape[1]),
        "model": _to_cpu(net.state_dict()),
        "optimizer": _to_cpu(optimizer.state_dict()),
        "epochs_done": epochs_total,
        "rounds_done": rounds_total,
        "normalisation_fitted": fitted,
    }
    metrics.update(
        n_samples=float(x_np.shape[0]),
        epochs=float(hp["epochs"]),
        epochs_done=float(epochs_total),
        rounds_done=float(rounds_total),
        train_seconds=time.perf_counter() - started,
        rows_per_s=float(x_np.shape[0]) * max(1, int(hp["epochs"])) / max(time.perf_counter() - started, 1e-9),
    )
    logger.info(
        "trained %s round %d on %d samples (%s): loss=%.3g rmse=%.3g in %.2fs",
        model, rounds_total, x_np.shape[0], devices.describe(dev), metrics["train_loss"], metrics["train_rmse"],
        metrics["train_seconds"],
    )
    return _serialise(new_blob), metrics


# --------------------------------------------------------------------------- #
# evaluation
# --------------------------------------------------------------------------- #
def _cache_key(state: bytes, model: str, model_kwargs: dict[str, Any]) -> tuple[str, str, str]:
    """Hashable identity of a (state, model, kwargs) triple."""
    kwargs_key = json.dumps(model_kwargs, sort_keys=True, default=repr)
    return hashlib.sha256(bytes(state)).hexdigest(), model, kwargs_key


def _cached_model(state: bytes, model: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """``load_model`` with a small per-process LRU cache (evaluate only)."""
    key = _cache_key(state, model, model_kwargs)
    with _eval_cache_lock:
        if key in _eval_cache:
            _eval_cache.move_to_end(key)
            return _eval_cache[key]
    net = load_model(state, model, model_kwargs)
    with _eval_cache_lock:
        _eval_cache[key] = net
        while len(_eval_cache) > _EVAL_CACHE_SIZE:
            _eval_cache.popitem(last=False)
    return net


def _as_input_tensor(xs: list[list[float]], n_inputs: int) -> torch.Tensor:
    """Validate query points and convert them to a ``(m, n_inputs)`` tensor."""
    array = np.asarray(xs, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != n_inputs:
        raise ValueError(f"xs must be a list of points with {n_inputs} inputs each, got shape {array.shape}")
    return torch.from_numpy(array).float()


def evaluate(
    state: bytes, model: str, model_kwargs: dict[str, Any], xs: list[list[float]]
) -> list[list[float]]:
    """Predict raw outputs for query points ``xs`` (one inner list per point)."""
    torch.set_num_threads(1)
    net = _cached_model(state, model, model_kwargs)
    n_inputs = int(getattr(net, "n_inputs", 0)) or int(_deserialise(state)["n_inputs"])
    if len(xs) == 0:
        return []
    with torch.no_grad():
        out = net(_as_input_tensor(xs, n_inputs))
    result: list[list[float]] = out.double().tolist()
    return result


def warm_up(
    model: str, model_kwargs: dict[str, Any], n_inputs: int, n_outputs: int, device: str = "cpu"
) -> float:
    """Pay a fresh worker's one-time costs (torch's lazy imports, the first optimizer
    step, on the training device) before the first real training needs it; refuses
    ``device: cuda`` on a worker without a GPU. Returns the seconds it took."""
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    dev = devices.resolve(device)
    net = _build_model(model, model_kwargs, n_inputs, n_outputs).to(dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.zeros(4, n_inputs, dtype=torch.float32, device=dev)
    loss = net(x).pow(2).mean()
    loss.backward()
    opt.step()
    lbfgs = torch.optim.LBFGS(net.parameters(), max_iter=1)

    def closure() -> torch.Tensor:
        lbfgs.zero_grad()
        value: torch.Tensor = net(x).pow(2).mean()
        value.backward()
        return value

    lbfgs.step(closure)
    return time.perf_counter() - t0


def register_model(
    state: bytes | list[bytes], model: str, model_kwargs: dict[str, Any], tracking_uri: str, run_id: str, name: str,
    columns: tuple[list[str], list[str]] | None = None, key: str | None = None,
) -> tuple[str, str]:
    """Load the checkpoint (or an ensemble's member checkpoints, registered as one
    :class:`models.ensemble.Ensemble`) and register it under ``name`` in the campaign's MLflow run,
    with the campaign's column names (``inputs``, ``outputs`` tags) when given."""
    from orchestrator.tracking import Tracker, column_tags
    from orchestrator.training.serving import register_model

    states = state if isinstance(state, list) else [state]
    module = load_model(states[0], model, model_kwargs)
    if len(states) > 1:
        from models.ensemble import Ensemble

        module = Ensemble([load_model(s, model, model_kwargs) for s in states])
    tags = column_tags(*columns) if columns else {}
    registered = register_model(Tracker.attach(tracking_uri, run_id), module, name, tags=tags, key=key)
    return registered.name, registered.version

# --------------------------------------------------------------------------- #
# ensembles
# --------------------------------------------------------------------------- #
def evaluate_ensemble(
    states: list[bytes], model: str, model_kwargs: dict[str, Any], xs: list[list[float]]
) -> tuple[list[list[float]], list[list[float]]]:
    """The members' mean and spread (population standard deviation) at each point of ``xs``.

    One member gives its own prediction and a spread of zero.
    """
    if not states:
        raise ValueError("evaluate_ensemble needs at least one member state")
    if len(xs) == 0:
        return [], []
    preds = np.stack([np.asarray(evaluate(s, model, model_kwargs, xs), dtype=np.float64) for s in states])
    mean: list[list[float]] = preds.mean(axis=0).tolist()
    spread: list[list[float]] = preds.std(axis=0).tolist()
    return mean, spread
