"""A trained model out of the registry and on points: the torch side of ``predict`` and ``--steps evaluate``.

Torch is imported here (lazily, inside functions), never by the coordinator's modules:
:mod:`orchestrator.predict` and the Dask tasks (:mod:`orchestrator.training.remote`)
call these.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from orchestrator.errors import TrackingError
from orchestrator.tracking import (
    RegisteredModel,
    Tracker,
    _make_client,
    _wrap,
    own_artifact,
    registered_versions,
)

if TYPE_CHECKING:
    import torch

Array = NDArray[np.float64]

__all__ = ["evaluate", "load_registered_model", "n_inputs_of", "register_model", "spread_of"]


def register_model(
    tracker: Tracker, module: torch.nn.Module, name: str, artifact_path: str = "model",
    tags: Mapping[str, str] | None = None, key: str | None = None,
) -> RegisteredModel:
    """Log ``module`` as an MLflow model of ``tracker``'s run and register a new version
    (:meth:`~orchestrator.tracking.Tracker.register_saved`; ``key``: at most one version per key and run).

    The module is saved with ``mlflow.pytorch`` in pickle format (its class must be
    importable where it is loaded). A module with tensors off the CPU is copied to
    the CPU first; ``module`` itself is never modified.
    """
    import mlflow.pytorch

    to_save = module
    if any(t.device.type != "cpu" for t in [*module.parameters(), *module.buffers()]):
        to_save = copy.deepcopy(module).cpu()

    def save(local: str, mlflow_model: Any) -> None:
        mlflow.pytorch.save_model(to_save, local, mlflow_model=mlflow_model, serialization_format="pickle",
                                  pip_requirements=mlflow.pytorch.get_default_pip_requirements())

    return tracker.register_saved(save, name, artifact_path, tags, key)


def load_registered_model(tracking_uri: str, name: str, version: str | int | None = None) -> torch.nn.Module:
    """Load a registered PyTorch model version (on the CPU, in eval mode).

    Args:
        tracking_uri: The MLflow tracking/registry URI the model was registered in.
        name: Registered model name.
        version: Version to load; the latest version if None.

    Returns:
        The module. Its class must be importable in this process. Only a version that is its
        campaign's own artifact is followed (:func:`own_artifact`), and it is unpickled with
        torch's weights-only loader admitting only torch module classes (:func:`load_weights_only`).

    Raises:
        TrackingError: The name or version is unknown (the message lists the registered
            names or that model's versions), or loading failed.
    """
    versions, names = registered_versions(tracking_uri, name)
    client = _make_client(tracking_uri)
    if not versions:
        if name in names:
            raise TrackingError(f"registered model {name!r} in {tracking_uri} has no versions")
        listing = ", ".join(repr(n) for n in names) if names else "(none)"
        raise TrackingError(
            f"no registered model named {name!r} in {tracking_uri}; registered models: {listing}"
        )
    chosen = versions[-1] if version is None else str(version).strip()
    if chosen not in versions:
        raise TrackingError(
            f"registered model {name!r} in {tracking_uri} has no version {chosen}; "
            f"available versions: {', '.join(versions)}"
        )
    import mlflow.artifacts

    model_uri = f"models:/{name}/{chosen}"
    with tempfile.TemporaryDirectory(prefix="mlflow-load-") as tmp:
        with _wrap(f"download {model_uri}", tracking_uri):
            # Resolve the storage location with our client: downloading "models:/..."
            # directly makes MLflow use the *global* registry URI (./mlflow.db).
            location = own_artifact(client, tracking_uri, name, chosen)
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=tmp, tracking_uri=tracking_uri
            )
        module = load_weights_only(Path(local) / "data" / "model.pth", model_uri)
    module.eval()
    return module


def load_weights_only(path: Path, model_uri: str) -> torch.nn.Module:
    """The module pickled at ``path`` (an MLflow pytorch model's ``data/model.pth``), unpickled by torch's
    weights-only loader with no class admitted but ``torch.nn.Module`` subclasses: a pickle that names a
    function or any other class (code to run) is refused before any of it executes."""
    import importlib

    import torch

    def module_class(qualified: str) -> type:
        parts = qualified.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj: Any = importlib.import_module(".".join(parts[:cut]))
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except (ImportError, AttributeError):
                continue
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
                return obj
            break
        raise TrackingError(f"{model_uri} names {qualified}, which is not an importable torch module class; "
                            "refusing to unpickle it (it could run code)")

    if not path.is_file():
        raise TrackingError(f"{model_uri} holds no data/model.pth (not a pickled torch module); refusing to load it")
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        allowed: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [module_class(q) for q in unsafe]
        with torch.serialization.safe_globals(allowed):
            module = torch.load(path, map_location="cpu", weights_only=True)
    except TrackingError:
        raise
    except Exception as exc:  # torch raises many kinds on a garbage or hostile file
        raise TrackingError(f"cannot load {model_uri}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(module, torch.nn.Module):
        raise TrackingError(f"{model_uri} is not a torch.nn.Module (got {type(module).__name__})")
    return module
def n_inputs_of(model: torch.nn.Module) -> int | None:
    """The input width the model declares (MLP's ``n_inputs``), or its first Linear layer's."""
    declared = getattr(model, "n_inputs", None)
    if isinstance(declared, int):
        return declared
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            return int(module.in_features)
    return None


def spread_of(model: torch.nn.Module, points: Array) -> Array | None:
    """An ensemble's spread at ``points`` (models.ensemble.Ensemble), None for a single model."""
    mean_and_spread = getattr(model, "mean_and_spread", None)
    if not callable(mean_and_spread):
        return None
    import torch

    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    with torch.no_grad():
        _, spread = mean_and_spread(torch.from_numpy(points).to(dtype))
    result: Array = spread.double().reshape(points.shape[0], -1).numpy()
    return result


def evaluate(model: torch.nn.Module, points: Array) -> Array:
    """The model's forward on ``points``, in the dtype of its weights, as float64."""
    import torch

    params = list(model.parameters())
    dtype = params[0].dtype if params else torch.float32
    with torch.no_grad():
        out = model(torch.from_numpy(points).to(dtype))
    result: Array = out.double().reshape(points.shape[0], -1).numpy()
    return result
