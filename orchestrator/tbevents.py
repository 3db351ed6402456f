"""TensorBoard event files, written without TensorFlow or the ``tensorboard`` package.

An event file is a sequence of records (``uint64 length, uint32 masked crc32c of the
length, data, uint32 masked crc32c of the data``), each an ``Event`` protocol buffer
(``tensorflow/core/util/event.proto``): ``wall_time`` (1, double), ``step`` (2, int64),
``file_version`` (3, string) or ``summary`` (5) holding ``Value``s with a ``tag`` (1)
and a ``simple_value`` (2, float) or an ``image`` (4: height 1, width 2, colorspace 3,
encoded PNG 4). That is all a scalar and an image need, so the few bytes are written
here (about 50 lines) instead of pulling in the ``tensorboard`` package (grpcio,
protobuf, werkzeug) for the coordinator; ``tensorboard --logdir DIR`` reads them.
:func:`read_events` parses them back (tests, and a check without TensorBoard).
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

_POLY = 0x82F63B78
_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, *, summary: bytes | None = None, file_version: str | None = None) -> bytes:
    out = b"\x09" + struct.pack("<d", time.time()) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _field(3, file_version.encode())
    if summary is not None:
        out += _field(5, summary)
    return out


def _png_size(png: bytes) -> tuple[int, int]:
    width, height = struct.unpack(">II", png[16:24])
    return int(width), int(height)


class EventWriter:
    """One event file in ``logdir`` (created), appended to and flushed per call."""

    def __init__(self, logdir: Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._f = self.path.open("ab")
        self._write(_event(0, file_version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        self._f.write(header + struct.pack("<I", _masked(header)) + data + struct.pack("<I", _masked(data)))
        self._f.flush()

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        summary = b"".join(_field(1, _field(1, k.encode()) + b"\x15" + struct.pack("<f", float(v)))
                           for k, v in values.items())
        self._write(_event(step, summary=summary))

    def image(self, tag: str, png: bytes, step: int) -> None:
        width, height = _png_size(png)
        image = b"\x08" + _varint(height) + b"\x10" + _varint(width) + b"\x18" + _varint(4) + _field(4, png)
        self._write(_event(step, summary=_field(1, _field(1, tag.encode()) + _field(4, image))))

    def close(self) -> None:
        self._f.close()


# -- reading back ---------------------------------------------------------------------


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = struct.unpack("<d", buf[i:i + 8])[0], i + 8
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i:i + 4])[0], i + 4
        elif wire == 2:
            size, i = _read_varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def read_events(path: Path) -> list[dict[str, Any]]:
    """Every event of a file as {step, scalars: {tag: value}, images: {tag: png}}; checks every CRC."""
    data = path.read_bytes()
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(data):
        header = data[i:i + 8]
        (size,) = struct.unpack("<Q", header)
        if struct.unpack("<I", data[i + 8:i + 12])[0] != _masked(header):
            raise ValueError(f"{path}: bad length CRC at byte {i}")
        body = data[i + 12:i + 12 + size]
        if struct.unpack("<I", data[i + 12 + size:i + 16 + size])[0] != _masked(body):
            raise ValueError(f"{path}: bad data CRC at byte {i}")
        i += 16 + size
        event: dict[str, Any] = {"step": 0, "scalars": {}, "images": {}}
        for number, _, value in _fields(body):
            if number == 2:
                event["step"] = value
            elif number == 5:
                for _, _, v in _fields(value):
                    parts = {n: x for n, _, x in _fields(v)}
                    tag = parts[1].decode()
                    if 2 in parts:
                        event["scalars"][tag] = parts[2]
                    elif 4 in parts:
                        event["images"][tag] = {n: x for n, _, x in _fields(parts[4])}[4]
        out.append(event)
    return out
