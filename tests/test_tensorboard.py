"""tracking.tensorboard_dir: event files written by tensorboardX, read back by TensorBoard's own reader."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from orchestrator.loop.pictures import TensorBoardFile


def png(width: int, height: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    fig.add_subplot().plot([0, 1], [1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def test_scalars_and_images_read_back_by_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardFile(tmp_path / "tb")
    picture = png(320, 240)
    for step in (1, 2, 3):
        tb.scalars({"round/train_rmse": 1.0 / step, "round/data_points": 128.0 * step}, step)
    tb.image("round", picture, 2)
    # flushed per call: readable while the campaign runs, before close
    (path,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    acc = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    rmse = [(s.step, s.value) for s in acc.Scalars("round/train_rmse")]
    assert rmse == [(1, 1.0), (2, 0.5), (3, pytest.approx(1.0 / 3))]
    assert [s.value for s in acc.Scalars("round/data_points")] == [128.0, 256.0, 384.0]
    (image,) = acc.Images("round")
    assert (image.step, image.width, image.height) == (2, 320, 240)
    assert image.encoded_image_string == picture
    tb.close()
