"""Pictures of every training round: drawn on a Dask worker, filed in the run dir, MLflow and TensorBoard.

After each training (the first rounds and continual mode's challengers) the
campaign asks for one figure (:mod:`orchestrator.training.figures`: the surrogate
on a slice, or as a 2-D map for two inputs, the checked points, the data so far),
and at a met target one more, ``final.png``, with the final version's checks and
what they certify. It is drawn on a
worker while the loop goes on, written to ``<run dir>/figures/round-NNNN.png``,
uploaded to the campaign's MLflow run under ``figures/`` and, with
``tracking.tensorboard_dir``, written with the round's scalars to a TensorBoard
event file (written by ``tensorboardX``: :class:`TensorBoardFile`). A failed picture is a warning, never
the campaign's end. The coordinator only moves bytes: no torch, no matplotlib here.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from orchestrator.config import LoopConfig, tensorboard_dir
from orchestrator.errors import ConfigError
from orchestrator.store import atomic_write_bytes
from orchestrator.training.backends import Trainer

log = logging.getLogger(__name__)

Upload = Callable[[Path, str], Awaitable[None]]


class Pictures:
    """One campaign's round figures."""

    def __init__(self, cfg: LoopConfig, root: Path, trainer: Trainer, upload: Upload,
                 ready: Callable[[], Awaitable[None]]) -> None:
        self.cfg = cfg
        self.root = root
        self.trainer = trainer
        self.upload = upload
        self.ready = ready
        self.enabled = cfg.tracking.figures
        self.checked: list[tuple[int, list[float], list[float], bool, int]] = []
        """(campaign time, x, truth, passed, model version) of every check: a figure shows its own time's."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._tb = None
        if cfg.tracking.tensorboard_dir:
            logdir = tensorboard_dir(cfg.tracking.tensorboard_dir, root)
            try:
                self._tb = TensorBoardFile(logdir)
            except (NotADirectoryError, FileExistsError, PermissionError) as exc:  # a file on the way, no access
                raise ConfigError(f"tracking.tensorboard_dir: {cfg.tracking.tensorboard_dir!r}: cannot write "
                                  f"event files in {logdir}: {exc.strerror}") from exc

    def add_check(self, x: list[float], truth: list[float], ok: bool, clock: int = 0, version: int = 0) -> None:
        self.checked.append((clock, list(x), list(truth), ok, version))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self._tb is not None:
            self._tb.scalars(values, step)

    def round(self, version: int, model: bytes, files: list[str], title: str, clock: int = 0) -> None:
        """Draw round ``version``'s figure in the background, with the checks made at campaign time ``clock``."""
        if not self.enabled:
            return
        checks = [(x, t, ok) for c, x, t, ok, _ in self.checked if c == clock]
        self._start(self._draw(f"round-{version:04d}.png", version, model, [str(self.root / f) for f in files],
                               title, checks))

    def final(self, version: int, model: bytes, files: list[str], statement: str) -> None:
        """The final model's figure, ``figures/final.png``: the checks of that version, titled with what
        they certify (``statement``)."""
        if not self.enabled:
            return
        checks = [(x, t, ok) for _, x, t, ok, v in self.checked if v == version]
        title = f"{self.cfg.name}: final model v{version}\n{statement}"
        self._start(self._draw("final.png", version, model, [str(self.root / f) for f in files], title, checks))

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _draw(self, name: str, version: int, model: bytes, paths: list[str],
                    title: str, checks: list[tuple[list[float], list[float], bool]]) -> None:
        cfg = self.cfg
        try:
            await self.ready()
            png = await self.trainer.figure(model, paths, checks, [i.lo for i in cfg.inputs],
                                            [i.hi for i in cfg.inputs], (cfg.input_names, list(cfg.outputs)), title)
            path = self.root / "figures" / name
            path.parent.mkdir(exist_ok=True)
            atomic_write_bytes(path, png)
            if self._tb is not None:
                self._tb.image(name.removesuffix(".png").split("-")[0], png, version)
            await self.upload(path, "figures")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a picture is never worth the campaign
            log.warning("figure of round %s: %s", version, exc)

    async def drain(self) -> None:
        """Wait for the figures still being drawn (before the workers stop)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._tb is not None:
            self._tb.close()


class TensorBoardFile:
    """One TensorBoard event file in ``logdir`` (created), written by tensorboardX's synchronous
    ``EventsWriter`` (no writer thread) and flushed per call, so ``tensorboard --logdir DIR``
    reads it while the campaign runs."""

    def __init__(self, logdir: Path) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        logdir.mkdir(parents=True, exist_ok=True)
        self._writer: Any = EventsWriter(str(logdir / "events"))

    def _write(self, summary: Any, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self._writer.write_event(Event(wall_time=time.time(), step=step, summary=summary))
        self._writer.flush()

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        self._write(Summary(value=[Summary.Value(tag=tag, simple_value=float(v)) for tag, v in values.items()]), step)

    def image(self, tag: str, png: bytes, step: int) -> None:
        """An already encoded PNG, as it is (no decoding and re-encoding)."""
        from tensorboardX.proto.summary_pb2 import Summary

        width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self._write(Summary(value=[Summary.Value(tag=tag, image=image)]), step)

    def close(self) -> None:
        self._writer.close()
