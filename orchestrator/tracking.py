"""Experiment tracking for a campaign: the only module that talks to MLflow.

One MLflow run is opened per campaign, in the experiment named in the configuration:

* **params** -- the resolved configuration, flattened to dotted keys
  (:func:`flatten_params`), values stringified and truncated to MLflow's limit;
* **metrics** -- one batch per round, logged with ``step=round``;
* **artifacts** -- files such as ``loop.yml``, ``events.jsonl``, a report PNG and
  ``summary.json``;
* **model** -- on success the final surrogate is logged (pickle format) and
  registered under a given name, so it can be loaded back with
  :func:`orchestrator.training.serving.load_registered_model` (torch lives under ``training/``).

Design notes:

* Everything goes through an :class:`mlflow.tracking.MlflowClient` built with an
  explicit tracking and registry URI; the global ("fluent") MLflow state -- active
  run, active experiment, global tracking URI -- is never read or changed. Two MLflow
  paths that silently use the global URI (and create ``./mlflow.db`` in the current
  directory) are avoided: registering with a ``models:/<model_id>`` source and
  downloading a ``models:/<name>/<version>`` URI.
* ``mlflow`` is imported lazily (importing MLflow costs 1-1.5 s), so
  importing this module is cheap and :class:`Tracker` does no I/O until
  :meth:`Tracker.start`.
* MLflow is kept quiet: its loggers are set to ``WARNING`` (unless the user set
  ``MLFLOW_LOGGING_LEVEL``), and GitPython's "git executable not found" warning, the
  run-URL banner printed for HTTP servers and the usage telemetry are off by default
  (:data:`QUIET_ENV`, set in ``os.environ`` only while MLflow is called and only where
  the user set nothing; importing this module changes nothing).
* Every failure inside MLflow is re-raised as :class:`TrackingError` naming the
  tracking URI and what to do about it. An ``http(s)://`` server is probed first
  (5 s timeout) because MLflow itself retries an unreachable server for minutes.

Timings (2-core box, loaded, sqlite store, fresh process): the first
:meth:`Tracker.start` on a new database takes 2-3 s (importing MLflow and
SQLAlchemy ~1.5 s, creating the schema ~1-2 s); a start on an existing database
~1-2 s (imports and store set-up; ~0.02-0.07 s once MLflow is loaded);
:func:`orchestrator.training.serving.register_model` for a small model ~0.5 s the first time in a process,
~0.05 s afterwards (pip requirements are pinned explicitly, which avoids MLflow's
~4 s requirement-inference subprocess); metrics batches and :meth:`Tracker.finish`
take a few milliseconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from orchestrator.errors import TrackingError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

ModelSave = Callable[[str, Any], None]
"""Writes a model's MLflow directory at a path, given the ``mlflow.models.Model`` metadata to save with it."""

__all__ = [
    "MAX_PARAM_KEY_LENGTH",
    "MAX_PARAM_VALUE_LENGTH",
    "ModelSave",
    "RegisteredModel",
    "Tracker",
    "TrackingError",
    "default_tracking_uri",
    "flatten_params",
    "model_alias",
    "registered_versions",
    "sqlite_path",
]

logger = logging.getLogger(__name__)

#: Variables that keep MLflow quiet, set only while MLflow runs (:func:`_mlflow_env`; a user's own
#: settings win): MLflow's loggers at WARNING; GitPython (MLflow's source-version tag) quiet
#: without git; no "View run ... at: <url>" banner from set_terminated; no usage telemetry
#: from compute nodes (often without outbound network).
QUIET_ENV = {
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

#: MLflow's limit on the length of a param value (``mlflow.utils.validation``).
MAX_PARAM_VALUE_LENGTH = 6000
#: MLflow's limit on the length of a param/metric key.
MAX_PARAM_KEY_LENGTH = 250
#: MLflow's per-request limits for ``log_batch``.
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000

_TRUNCATION_MARK = "...[truncated]"
_INVALID_KEY_CHARS = re.compile(r"[^\w\-./ :]")
_HTTP_PROBE_TIMEOUT_S = 5.0
_RunStatus = Literal["FINISHED", "FAILED", "KILLED"]
_T = TypeVar("_T")


@dataclass(frozen=True)
class RegisteredModel:
    """A version of a model in the MLflow model registry."""

    name: str
    version: str

    @property
    def uri(self) -> str:
        """The ``models:/<name>/<version>`` URI of this model version."""
        return f"models:/{self.name}/{self.version}"


# --------------------------------------------------------------------------------------
# Module-level helpers
# --------------------------------------------------------------------------------------


def default_tracking_uri(run_root: Path) -> str:
    """Return the sqlite tracking URI used for a campaign rooted at ``run_root``.

    The database is ``<run_root>/mlflow.db`` (absolute path); artifacts of experiments
    created by :class:`Tracker` go next to it, in ``<run_root>/mlartifacts``.
    """
    return f"sqlite:///{Path(run_root).expanduser().absolute() / 'mlflow.db'}"


def _stringify(value: Any) -> str:
    """Render a config value as a param string (JSON-like for sequences)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        import json

        return json.dumps(list(value), default=str)
    return str(value)


def _truncate(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    return text[: limit - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK


def flatten_params(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested mapping into MLflow params.

    Nested mappings become dotted keys (``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``);
    sequences are rendered as JSON (``[1, 2]`` -> ``"[1, 2]"``), other values with
    ``str()``; an empty mapping becomes ``"{}"``. Characters MLflow refuses in keys
    are replaced with ``_``. Values longer than :data:`MAX_PARAM_VALUE_LENGTH` and
    keys longer than :data:`MAX_PARAM_KEY_LENGTH` are truncated (ending in
    ``...[truncated]``).

    Args:
        d: The (possibly nested) mapping, e.g. a resolved configuration.
        prefix: Prepended to every key, joined with a dot.

    Returns:
        A flat ``{key: value}`` dict of strings, in the mapping's iteration order.
    """
    out: dict[str, str] = {}
    for raw_key, value in d.items():
        key = f"{prefix}.{raw_key}" if prefix else str(raw_key)
        if isinstance(value, Mapping):
            if value:
                out.update(flatten_params(value, key))
                continue
            value = "{}"
        safe_key = _truncate(_INVALID_KEY_CHARS.sub("_", key), MAX_PARAM_KEY_LENGTH)
        out[safe_key] = _truncate(_stringify(value), MAX_PARAM_VALUE_LENGTH)
    return out


@contextlib.contextmanager
def _mlflow_env() -> Iterator[None]:
    """:data:`QUIET_ENV` in os.environ while MLflow is called (user settings win), restored after."""
    added = {k: v for k, v in QUIET_ENV.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _configure_mlflow_logging() -> None:
    """Set MLflow's loggers to WARNING unless the user chose a level."""
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        # a locked sqlite database is logged there with a whole traceback; ours says it in one line
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@contextlib.contextmanager
def _quiet(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Temporarily raise the level of the named loggers (restored afterwards)."""
    loggers = [logging.getLogger(name) for name in names]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved, strict=True):
            lg.setLevel(old)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), or None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    raw = uri.removeprefix("sqlite:///").split("?", 1)[0]
    if not raw or raw == ":memory:":
        return None
    return Path(raw).absolute()


SCHEMA_LOCK_WAIT_S = 30.0
"""The longest ``<db>.lock`` is waited for: a schema is created in seconds, so a holder past this is stuck
(a stopped process, a hung file system) and the wait ends with a passing fault that names it."""


def ready_store(uri: str, wait_s: float = SCHEMA_LOCK_WAIT_S) -> None:
    """For a sqlite URI, make sure its database exists whole before MLflow opens it; others: no-op.

    Holds ``<db>.lock`` (fcntl) meanwhile: two campaigns creating one schema at once corrupt
    it (alembic's temporary tables are left behind). Waits at most ``wait_s`` for it, then raises a
    (transient) TrackingError naming the process that holds it.
    """
    path = sqlite_path(uri)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = Path(f"{path}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _flock_within(fd, wait_s):
            raise TrackingError(f"the MLflow database {path} is still locked after {wait_s:.0f} s: {lock} is held "
                                f"by {lock_holder(fd)}; end that process (or wait for it) and resume")
        _whole_schema(path)
    finally:
        os.close(fd)


def _flock_within(fd: int, wait_s: float) -> bool:
    """Take an exclusive flock on ``fd`` within ``wait_s`` seconds. flock has no timeout and no event
    to wait on, and a thread blocked in it cannot be called back: tries with a back-off (10 ms to 0.5 s)."""
    import fcntl

    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
            delay = min(0.5, delay * 2)


def lock_holder(fd: int) -> str:
    """Who holds a lock on the file open as ``fd``: "pid N (its command line)"."""
    from orchestrator.store import flock_holder

    pid = flock_holder(fd)
    if pid is None:
        return "another process (not named in /proc/locks)"
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        cmd = " ".join(raw.decode(errors="replace").split())  # one line, whatever the argv holds
    except OSError:
        cmd = ""
    return f"pid {pid}" + (f" ({cmd[:120]})" if cmd else "")


def _schema_finished(path: Path) -> bool:
    """Whether the sqlite file at ``path`` holds a schema MLflow finished creating (alembic stamped it)."""
    import sqlite3

    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name IN "
                           "('alembic_version', 'experiments')").fetchall()
        if len(rows) < 2:
            return False
        return bool(con.execute("SELECT count(*) FROM alembic_version").fetchone()[0] > 0)
    finally:
        con.close()


def _whole_schema(path: Path) -> None:
    """Make sure ``path`` is a whole MLflow database, created atomically (called under the schema lock).

    MLflow creates and migrates a new sqlite file's schema in place, in many steps; a coordinator
    killed in between (SIGTERM, SIGKILL, the walltime) leaves a file every later open fails on
    ("table jobs already exists"). So a new database is built next to it and renamed into place
    whole. A file left unfinished that way by an earlier version (no alembic stamp, no runs) is set
    aside as ``<db>.unfinished-<time>`` and rebuilt.
    """
    for stale in path.parent.glob(f".{path.name}.init-*"):  # a builder killed before its rename
        stale.unlink(missing_ok=True)
    if path.exists() and path.stat().st_size > 0:
        try:
            if _schema_finished(path):
                return
        except Exception as exc:  # not a database at all: MLflow's own error says so, with the hint
            logger.debug("%s: not checked (%s)", path, exc)
            return
        aside = path.with_name(f"{path.name}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
        logger.warning("MLflow database %s was left half-created by an interrupted campaign; "
                       "set aside as %s and created again", path, aside.name)
        os.replace(path, aside)
    tmp = path.with_name(f".{path.name}.init-{os.getpid()}")
    with _wrap("create the tracking database", f"sqlite:///{path}"), _sqlalchemy_quiet():
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = SqlAlchemyStore(f"sqlite:///{tmp}", (path.parent / "mlartifacts").as_uri())  # type: ignore[no-untyped-call]
        store.engine.dispose()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)


def _hint(uri: str) -> str:
    """What to check when MLflow fails for ``uri``."""
    if uri.startswith("sqlite:"):
        db = sqlite_path(uri)
        where = f" ({db})" if db else ""
        return (
            f"check that the database file{where} and its directory are writable, that it is "
            "an MLflow database, and that it was not created by a newer MLflow version"
        )
    if uri.startswith(("http://", "https://")):
        return (
            "check that the MLflow server is running and reachable from this host "
            "(e.g. `mlflow server --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1`), "
            "or use a local sqlite:///<path>/mlflow.db URI"
        )
    return "use a sqlite:///<absolute path>/mlflow.db URI or an http(s):// MLflow server"


@contextlib.contextmanager
def _sqlalchemy_quiet() -> Iterator[None]:
    """MLflow 3.17's sqlite store uses an ORM option SQLAlchemy 2.1 deprecates: not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*``noload`` loader strategy is deprecated", category=DeprecationWarning
        )
        yield


@contextlib.contextmanager
def _wrap(action: str, uri: str) -> Iterator[None]:
    """Re-raise any exception from MLflow as a :class:`TrackingError`; MLflow runs with :data:`QUIET_ENV`."""
    try:
        with _mlflow_env():
            yield
    except TrackingError:
        raise
    except Exception as exc:  # MlflowException, SQLAlchemy, requests, OS errors ...
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrackingError(
            f"MLflow could not {action} (tracking URI {uri}): {message}; {_hint(uri)}"
        ) from exc


def _check_uri(uri: str) -> None:
    """Reject URIs this project cannot use before MLflow tries (and maybe hangs)."""
    if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql", "databricks")):
        return
    if uri.startswith(("http://", "https://")):
        _probe_http(uri)
        return
    if "://" not in uri or uri.startswith("file:"):
        error = TrackingError(f"tracking URI {uri!r} is a file store, which this MLflow installation refuses; "
                              "use a database URI such as sqlite:///<absolute path>/mlflow.db")
    else:
        error = TrackingError(f"unsupported tracking URI {uri!r}; {_hint(uri)}")
    error.transient = False  # no retry makes it supported
    raise error


def _probe_http(uri: str) -> None:
    """Fail fast if an MLflow server is unreachable (MLflow itself retries ~minutes)."""
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # the server answered (maybe 401/404): it is reachable
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"MLflow server at {uri} is not reachable ({reason}); {_hint(uri)}") from exc


def _make_client(uri: str) -> MlflowClient:
    """Build a client bound to ``uri`` for both tracking and the model registry."""
    _check_uri(uri)
    with _wrap("import mlflow", uri):
        from mlflow.tracking import MlflowClient
    _configure_mlflow_logging()
    ready_store(uri)
    with _wrap("open the tracking store", uri), _sqlalchemy_quiet():
        return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _error_code(exc: BaseException) -> str | None:
    """The MLflow error code of ``exc`` (e.g. ``RESOURCE_DOES_NOT_EXIST``), if any."""
    code = getattr(exc, "error_code", None)
    return code if isinstance(code, str) else None


def _chunks(items: Sequence[_T], size: int) -> Iterator[Sequence[_T]]:
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _now_ms() -> int:
    """Current time in milliseconds since the epoch (MLflow timestamps)."""
    return int(time.time() * 1000)


# --------------------------------------------------------------------------------------
# Tracker
# --------------------------------------------------------------------------------------


class Tracker:
    """Records one campaign as one MLflow run.

    Typical use::

        tracker = Tracker(default_tracking_uri(run_root), "heat-surrogate", "campaign-42")
        run_id = tracker.start(config)              # or start(config, run_id=...) to resume
        for round_ in ...:
            tracker.log_metrics({"val_rmse": rmse}, step=round_)
        tracker.log_artifact(run_root / "events.jsonl")
        register_model(tracker, model, "heat-surrogate")  # orchestrator.training.serving
        tracker.finish("FINISHED")

    Args:
        tracking_uri: MLflow tracking (and registry) URI, e.g. from
            :func:`default_tracking_uri`.
        experiment: Experiment name; created on :meth:`start` if missing.
        run_name: Display name of a new run.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._run_id: str | None = None

    @classmethod
    def attach(cls, tracking_uri: str, run_id: str) -> Tracker:
        """A tracker bound to an existing, started run (e.g. on a worker that registers its model)."""
        client = _make_client(tracking_uri)
        with _wrap(f"fetch run {run_id}", tracking_uri):
            run = client.get_run(run_id)
        tracker = cls(tracking_uri, "", str(run.info.run_name or ""))
        tracker._client = client
        tracker._experiment_id = str(run.info.experiment_id)
        tracker._run_id = run_id
        return tracker

    @property
    def run_id(self) -> str | None:
        """The id of the run, once :meth:`start` has returned."""
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The id of the experiment, once :meth:`start` has returned."""
        return self._experiment_id

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, params: Mapping[str, Any], run_id: str | None = None) -> str:
        """Open the campaign's run and log its parameters.

        Creates the experiment if needed. With ``run_id`` (``--resume``) the existing
        run is reopened (status back to ``RUNNING``) and later metrics append to it;
        params it already has are kept (MLflow params are immutable: changed values
        are skipped with a warning) and new ones are added.

        Args:
            params: The resolved configuration; nested mappings are flattened with
                :func:`flatten_params`.
            run_id: Id of a run of this experiment to resume.

        Returns:
            The run id.

        Raises:
            TrackingError: The store is unusable, the experiment is deleted, or the
                run to resume does not exist / belongs to another experiment.
        """
        if self._run_id is not None:
            raise TrackingError(f"tracker already started (run {self._run_id})")
        client = self._client or _make_client(self.tracking_uri)
        self._client = client
        experiment_id = self._ensure_experiment(client)
        flat = flatten_params(params)
        if run_id is None:
            new_run_id = self._create_run(client, experiment_id)
            to_log = flat
        else:
            new_run_id, to_log = self._reopen_run(client, experiment_id, run_id, flat)
        self._experiment_id = experiment_id
        self._run_id = new_run_id
        from mlflow.entities import Param

        batch = [Param(key, value) for key, value in to_log.items()]
        try:
            with _wrap(f"log {len(batch)} params to run {new_run_id}", self.tracking_uri):
                for chunk in _chunks(batch, _MAX_PARAMS_PER_BATCH):
                    client.log_batch(new_run_id, params=chunk, synchronous=True)
        except TrackingError:
            with contextlib.suppress(Exception):
                client.set_terminated(new_run_id, "FAILED")
            self._run_id = None
            raise
        logger.debug("tracking run %s in experiment %s", new_run_id, experiment_id)
        return new_run_id

    def _ensure_experiment(self, client: MlflowClient) -> str:
        """Return the id of the experiment, creating it if needed."""
        uri = self.tracking_uri
        with _wrap(f"look up experiment {self.experiment!r}", uri):
            experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"experiment {self.experiment!r} in {uri} is deleted; restore it "
                    f"(`mlflow experiments restore --experiment-id {experiment.experiment_id}`) "
                    "or choose another experiment name"
                )
            return str(experiment.experiment_id)
        db = sqlite_path(uri)
        location = (db.parent / "mlartifacts").as_uri() if db is not None else None
        from mlflow.exceptions import MlflowException

        with _wrap(f"create experiment {self.experiment!r}", uri):
            try:
                return str(client.create_experiment(self.experiment, artifact_location=location))
            except MlflowException as exc:  # created concurrently by another process
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
                return str(experiment.experiment_id)

    def _create_run(self, client: MlflowClient, experiment_id: str) -> str:
        """Create a new run with MLflow's default context tags (user, source, git)."""
        tags: dict[str, str] = {}
        try:
            from mlflow.tracking.context.registry import resolve_tags

            with _quiet("mlflow", "git"), _mlflow_env():
                tags = {str(k): str(v) for k, v in resolve_tags().items()}
        except Exception:  # context tags are a nicety; never fail a campaign for them
            logger.debug("could not resolve MLflow context tags", exc_info=True)
        with _wrap(f"create a run in experiment {self.experiment!r}", self.tracking_uri):
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        return str(run.info.run_id)

    def _reopen_run(
        self, client: MlflowClient, experiment_id: str, run_id: str, flat: dict[str, str]
    ) -> tuple[str, dict[str, str]]:
        """Validate and reopen ``run_id``; return it and the params still to log."""
        uri = self.tracking_uri
        from mlflow.exceptions import MlflowException

        with _wrap(f"fetch run {run_id} to resume it", uri):
            try:
                run = client.get_run(run_id)
            except MlflowException as exc:
                if _error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
                raise TrackingError(
                    f"cannot resume: run {run_id} does not exist in {uri}; check the run id "
                    "and the tracking URI"
                ) from exc
        if run.info.experiment_id != experiment_id:
            raise TrackingError(
                f"cannot resume: run {run_id} belongs to experiment id {run.info.experiment_id}, "
                f"not to {self.experiment!r} (id {experiment_id}) in {uri}"
            )
        if run.info.lifecycle_stage == "deleted":
            raise TrackingError(
                f"cannot resume: run {run_id} in {uri} is deleted; restore it "
                f"(`mlflow runs restore --run-id {run_id}`) or start a new run"
            )
        existing = run.data.params
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            logger.warning(
                "resumed run %s keeps its original values for changed params "
                "(MLflow params are immutable): %s",
                run_id,
                ", ".join(changed),
            )
        if run.info.status != "RUNNING":
            with _wrap(f"reopen run {run_id}", uri):
                client.update_run(run_id, status="RUNNING")
        return run_id, {k: v for k, v in flat.items() if k not in existing}

    def _require_run(self, what: str) -> tuple[MlflowClient, str]:
        """The client and run id, or a TrackingError if :meth:`start` was not called."""
        if self._client is None or self._run_id is None:
            raise TrackingError(f"cannot {what}: Tracker.start() has not been called")
        return self._client, self._run_id

    # -- logging -------------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log one value per metric at ``step`` (the round number), in one batch.

        Raises:
            TrackingError: A value is not a number, or MLflow failed.
        """
        client, run_id = self._require_run("log metrics")
        if not metrics:
            return
        from mlflow.entities import Metric

        timestamp = _now_ms()
        batch: list[Metric] = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError) as exc:
                raise TrackingError(f"metric {key!r} at step {step} is not a number: {value!r}") from exc
            batch.append(Metric(key, number, timestamp, int(step)))
        with _wrap(f"log {len(batch)} metrics at step {step}", self.tracking_uri):
            for chunk in _chunks(batch, _MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags; ``mlflow.note.content`` is the description the UI shows on the run's page."""
        client, run_id = self._require_run("set tags")
        from mlflow.entities import RunTag

        with _wrap(f"set {len(tags)} tags", self.tracking_uri):
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file (or a whole directory) into the run's artifacts.

        Args:
            path: Local file or directory.
            artifact_path: Directory inside the run's artifacts (default: the root).

        Raises:
            TrackingError: ``path`` does not exist, or MLflow failed.
        """
        client, run_id = self._require_run("log an artifact")
        local = Path(path)
        if not local.exists():
            raise TrackingError(f"cannot log artifact {local}: no such file or directory")
        with _wrap(f"log artifact {local}", self.tracking_uri):
            if local.is_dir():
                client.log_artifacts(run_id, str(local), artifact_path)
            else:
                client.log_artifact(run_id, str(local), artifact_path)

    def register_saved(
        self, save: ModelSave, name: str, artifact_path: str = "model", tags: Mapping[str, str] | None = None,
        key: str | None = None,
    ) -> RegisteredModel:
        """Log a model as an MLflow model of this run and register a new version.

        ``save(path, mlflow_model)`` writes the MLflow model directory (the flavour's part:
        :func:`orchestrator.training.serving.register_model` saves a torch module with
        ``mlflow.pytorch``, so torch stays under ``training/``).

        Args:
            save: Writes the model's MLflow directory at the path it is given.
            name: Registered model name; created on first use.
            artifact_path: Name of the logged model inside the run.

        Returns:
            The registered name and the new version (``"1"``, ``"2"``, ...).

        Raises:
            TrackingError: Saving, uploading or registering failed.
        """
        client, run_id = self._require_run("register a model")
        if key is not None:
            with _wrap(f"look up versions of {name!r} from run {run_id}", self.tracking_uri):
                earlier = _versions_of_run(client, name, run_id, key)
            if earlier:  # a resumed registration (the coordinator was killed after it): never a second version
                logger.info("model %s version %s is already registered from run %s", name, earlier[0], run_id)
                return RegisteredModel(name=name, version=earlier[0])
            tags = {**(tags or {}), REGISTRATION_KEY: key}
        experiment_id = self._experiment_id
        assert experiment_id is not None
        uri = self.tracking_uri
        from mlflow.entities import LoggedModelOutput
        from mlflow.exceptions import MlflowException
        from mlflow.models import Model

        with _wrap(f"create a logged model {artifact_path!r} for run {run_id}", uri):
            logged = client.create_logged_model(
                experiment_id, name=artifact_path, source_run_id=run_id, model_type="pytorch"
            )
        model_id = str(logged.model_id)
        try:
            with tempfile.TemporaryDirectory(prefix="mlflow-model-") as tmp:
                local = os.path.join(tmp, "model")
                with _wrap("save the model", uri), _quiet("mlflow"):
                    mlflow_model = Model(
                        artifact_path=logged.artifact_location,
                        run_id=run_id,
                        model_uuid=model_id,
                        model_id=model_id,
                    )
                    save(local, mlflow_model)
                with _wrap(f"upload the model of run {run_id}", uri):
                    client.log_model_artifacts(model_id, local)
            with _wrap(f"link the model to run {run_id}", uri):
                client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
                client.finalize_logged_model(model_id, "READY")
        except TrackingError:
            with contextlib.suppress(Exception):
                client.finalize_logged_model(model_id, "FAILED")
            raise

        with _wrap(f"register model {name!r}", uri):
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                    raise
            # The source is the logged model's artifact location, not "models:/<model_id>":
            # MLflow's sqlite registry resolves the latter with a *global* MlflowClient
            # (wrong store, and it creates ./mlflow.db in the current directory).
            # The registry's page of the version names the campaign run that made it (the run id alone
            # is a link the UI shows as an opaque id).
            version = client.create_model_version(
                name,
                source=str(logged.artifact_location),
                run_id=run_id,
                model_id=model_id,
                tags={"campaign_run": self.run_name, "campaign_run_id": run_id, **(tags or {})},
                description=f"Surrogate trained by campaign run {self.run_name} (MLflow run {run_id}).",
            )
        registered = RegisteredModel(name=name, version=str(version.version))
        logger.info("registered model %s version %s", name, registered.version)
        return registered

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point registry alias ``alias`` of model ``name`` at ``version`` (e.g. the champion).

        Raises:
            TrackingError: MLflow failed (unknown name or version).
        """
        client, _ = self._require_run("set a model alias")
        with _wrap(f"set alias {alias!r} of model {name!r} to version {version}", self.tracking_uri):
            client.set_registered_model_alias(name, alias, str(version))

    def finish(self, status: _RunStatus) -> None:
        """Close the run with ``status``. A no-op if :meth:`start` never succeeded.

        Raises:
            ValueError: ``status`` is not FINISHED, FAILED or KILLED.
            TrackingError: MLflow failed.
        """
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        if self._client is None or self._run_id is None:
            logger.debug("Tracker.finish(%s) without a started run: nothing to do", status)
            return
        with _wrap(f"end run {self._run_id} as {status}", self.tracking_uri):
            self._client.set_terminated(self._run_id, status)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _registered_names(client: MlflowClient) -> list[str]:
    """Names of all registered models (all pages), sorted."""
    names: list[str] = []
    token: str | None = None
    while True:
        page = client.search_registered_models(max_results=1000, page_token=token)
        names.extend(str(m.name) for m in page)
        token = page.token
        if not token:
            return sorted(names)


def _model_versions(client: MlflowClient, name: str) -> list[str]:
    """Versions registered under ``name``, ascending ([] if the name is unknown)."""
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    versions = client.search_model_versions(f"name='{escaped}'")
    return [str(v) for v in sorted(int(mv.version) for mv in versions if mv.name == name)]


def column_tags(inputs: Sequence[str], outputs: Sequence[str]) -> dict[str, str]:
    """A registered version's tags naming its columns (names are identifiers: a comma never occurs)."""
    return {"inputs": ",".join(inputs), "outputs": ",".join(outputs)}


def column_names(tracking_uri: str, name: str, version: str) -> tuple[list[str], list[str]] | None:
    """The input and output names a version was registered with, or None (an older version, or a failure).

    Best effort: a prediction is worth printing with generic column names.
    """
    client = _make_client(tracking_uri)
    try:
        with _wrap(f"read tags of model {name!r} version {version}", tracking_uri):
            tags = client.get_model_version(name, version).tags
    except TrackingError:
        return None
    if "inputs" not in tags or "outputs" not in tags:
        return None
    return tags["inputs"].split(","), tags["outputs"].split(",")


REGISTRATION_KEY = "registration_key"
"""A version's tag naming which registration of its campaign made it (see :meth:`Tracker.register_saved`)."""


def _versions_of_run(client: MlflowClient, name: str, run_id: str, key: str) -> list[str]:
    """Versions of ``name`` registered from MLflow run ``run_id`` under ``key``, ascending."""
    escaped = name.replace("\\", "\\\\").replace("'", "\\'")
    found = client.search_model_versions(f"name='{escaped}' and run_id='{run_id}'")
    return [str(v) for v in sorted(int(mv.version) for mv in found
                                   if mv.name == name and mv.run_id == run_id and mv.tags.get(REGISTRATION_KEY) == key)]


def registered_versions(tracking_uri: str, name: str) -> tuple[list[str], list[str]]:
    """The versions registered under ``name`` (ascending) and, when there are none, every registered name.

    Raises:
        TrackingError: The store is unusable or the lookup failed.
    """
    client = _make_client(tracking_uri)
    with _wrap(f"list versions of model {name!r}", tracking_uri):
        versions = _model_versions(client, name)
        return versions, [] if versions else _registered_names(client)


def model_alias(tracking_uri: str, name: str, alias: str) -> str | None:
    """The version registry alias ``alias`` of model ``name`` points at, or None if it is not set.

    Raises:
        TrackingError: The store is unusable.
    """
    client = _make_client(tracking_uri)
    from mlflow.exceptions import MlflowException

    with _wrap(f"look up alias {alias!r} of model {name!r}", tracking_uri):
        try:
            return str(client.get_model_version_by_alias(name, alias).version)
        except MlflowException as exc:
            if _error_code(exc) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise


def own_artifact(client: MlflowClient, tracking_uri: str, name: str, version: str) -> str:
    """Where version ``version`` of ``name`` is stored, once shown to be its campaign's own artifact.

    Refused, in one line (:class:`TrackingError`): a version registered from no run or from a run
    that is not in this store, a source outside its run's experiment's artifact root, and, for
    a sqlite store, a source outside the store's own ``mlartifacts/`` or in a directory that
    another user may write. (Another account that reached the store could otherwise point the
    champion at a model of its own.)
    """
    from mlflow.exceptions import MlflowException

    what = f"model {name!r} version {version} in {tracking_uri}"
    mv = client.get_model_version(name, version)
    try:
        run = client.get_run(str(mv.run_id)) if mv.run_id else None
    except MlflowException:
        run = None
    if run is None:
        raise TrackingError(f"{what} comes from no run of this store (run id {mv.run_id!r}); refusing to load it")
    root = str(client.get_experiment(run.info.experiment_id).artifact_location)
    location = str(client.get_model_version_download_uri(name, version))
    db = sqlite_path(tracking_uri)
    if db is not None:
        _private_under(location, db.parent / "mlartifacts", what)
    if not _is_under(location, root):
        raise TrackingError(f"{what}: its source {location} is not an artifact of its run's experiment "
                            f"(under {root}); refusing to load it")
    return location


def _local(uri: str) -> Path | None:
    """The resolved path of a ``file:`` URI or a plain path; None for other schemes."""
    from urllib.parse import unquote, urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    return Path(unquote(parsed.path)).resolve()


def _is_under(location: str, root: str) -> bool:
    here, top = _local(location), _local(root)
    if here is not None and top is not None:
        return here.is_relative_to(top)
    parts = location.split("/")
    return ".." not in parts and location.startswith(root.rstrip("/") + "/")


def _private_under(location: str, root: Path, what: str) -> None:
    """``location`` lies in ``root`` and no directory from ``root`` down to it may be written by another user."""
    here = _local(location)
    if here is None or not here.is_relative_to(root.resolve()):
        raise TrackingError(f"{what}: its source {location} is not in this store's own artifacts ({root}); "
                            "refusing to load it")
    for directory in [*reversed(here.parents), here]:
        if not directory.is_relative_to(root.resolve()) or not directory.exists():
            continue
        st = directory.stat()
        if _others_may_write(st):
            raise TrackingError(f"{what}: {directory} may be written by another user (owner uid {st.st_uid}, "
                                f"mode {st.st_mode & 0o777:o}); refusing to load a model from it")


def _others_may_write(st: os.stat_result) -> bool:
    """Not ours, writable by others, or writable by a group that is not our own private one (umask 002)."""
    import grp
    import pwd

    if st.st_uid != os.getuid() or st.st_mode & 0o002:
        return True
    if not st.st_mode & 0o020:
        return False
    try:
        members = grp.getgrgid(st.st_gid).gr_mem
    except KeyError:
        return True
    return bool(members) or st.st_gid != pwd.getpwuid(os.getuid()).pw_gid
