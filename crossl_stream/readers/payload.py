"""Device payloads over MQTT: a JSON format and a compact binary one.

JSON, one message per chunk::

    {"seq": 17, "t0": 5123.250, "values": [[0.01, -0.98, 0.12], [0.02, -0.97, 0.11]]}

``t0`` is the device time (seconds) of the first sample, the others follow at the sensor's
nominal rate; ``ts`` (one device time per sample) may replace it; with neither, the sensor
must be configured ``clock: receipt``. ``seq`` is optional and counts messages.

Binary, little-endian: a 17-byte header, then the samples as float32, sample after sample::

    u8 version (1) | u32 seq | f64 t0 | u16 samples | u16 channels | f32 x samples*channels

>>> blob = encode_binary(7, 12.5, np.ones((2, 3), np.float32))
>>> p = decode(blob, "binary", channels=3)
>>> p.seq, p.t0, p.values.shape
(7, 12.5, (2, 3))
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

from crossl_stream.errors import InputError

Format = Literal["json", "binary"]
HEADER = struct.Struct("<BIdHH")
VERSION = 1
MAX_SEQ = 2**53  # a JSON seq beyond this is no message count (and no double holds it exactly)


class PayloadError(InputError):
    """A payload that cannot be used; ``reason`` is a short key for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Payload:
    """One decoded message: samples [n, channels] float32 and their device times."""

    values: np.ndarray
    seq: int | None = None
    t0: float | None = None  # device time of the first sample
    ts: np.ndarray | None = None  # or one device time per sample

    def device_times(self, rate_hz: float) -> np.ndarray | None:
        """Device time of every sample (None: the payload carries none)."""
        if self.ts is not None:
            return self.ts
        if self.t0 is None:
            return None
        return self.t0 + np.arange(len(self.values)) / rate_hz


def encode_binary(seq: int, t0: float, values: np.ndarray) -> bytes:
    """The binary format of one chunk."""
    values = np.ascontiguousarray(values, dtype="<f4")
    n, c = values.shape
    return HEADER.pack(VERSION, seq & 0xFFFFFFFF, t0, n, c) + values.tobytes()


def encode_json(seq: int, t0: float, values: np.ndarray) -> bytes:
    """The JSON format of one chunk."""
    return json.dumps({"seq": seq, "t0": t0, "values": np.asarray(values).tolist()}).encode()


def decode(data: bytes, fmt: Format, channels: int) -> Payload:
    """Parse and check one message; PayloadError says what is wrong."""
    payload = _decode_binary(data) if fmt == "binary" else _decode_json(data)
    n, c = payload.values.shape
    if c != channels:
        raise PayloadError("channels", f"{c} channels, the sensor has {channels}")
    if n == 0:
        raise PayloadError("empty", "no samples")
    if not np.isfinite(payload.values).all():
        raise PayloadError("nan", "NaN or Inf among the values")
    times = [payload.t0] if payload.ts is None else payload.ts
    if payload.t0 is not None or payload.ts is not None:
        if not np.isfinite(np.asarray(times, dtype=np.float64)).all():
            raise PayloadError("timestamp", "a timestamp is NaN or Inf")
        if payload.ts is not None and len(payload.ts) != n:
            raise PayloadError("timestamp", f"{len(payload.ts)} timestamps for {n} samples")
    return payload


def _decode_binary(data: bytes) -> Payload:
    if len(data) < HEADER.size:
        raise PayloadError("short", f"{len(data)} bytes, the header alone is {HEADER.size}")
    version, seq, t0, n, c = HEADER.unpack_from(data)
    if version != VERSION:
        raise PayloadError("version", f"format version {version}, expected {VERSION}")
    if len(data) != HEADER.size + 4 * n * c:
        raise PayloadError(
            "short" if len(data) < HEADER.size + 4 * n * c else "long",
            f"{len(data)} bytes for {n} samples x {c} channels",
        )
    values = np.frombuffer(data, dtype="<f4", offset=HEADER.size).reshape(n, c)
    return Payload(values.astype(np.float32), seq, t0)


def _decode_json(data: bytes) -> Payload:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError("json", f"not JSON ({exc})") from None
    except RecursionError:
        raise PayloadError("json", "not JSON (nested too deep)") from None
    if not isinstance(obj, dict) or "values" not in obj:
        raise PayloadError("json", "expected an object with 'values'")
    unknown = sorted(set(obj) - {"seq", "t0", "ts", "values"})
    if unknown:
        raise PayloadError("json", f"unknown keys {unknown}")
    try:
        with np.errstate(over="ignore"):  # a value beyond float32: inf, refused as nan below
            values = np.asarray(obj["values"], dtype=np.float32)
        ts = None if obj.get("ts") is None else np.asarray(obj["ts"], dtype=np.float64)
        t0 = None if obj.get("t0") is None else float(obj["t0"])
        seq = None if obj.get("seq") is None else int(obj["seq"])
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise PayloadError("json", f"bad field ({exc})") from None
    if seq is not None and not 0 <= seq <= MAX_SEQ:
        raise PayloadError("json", f"seq {seq} is not a message count (0 to 2**53)")
    if values.ndim != 2:
        raise PayloadError("shape", f"values of shape {list(values.shape)}, expected [n, ch]")
    if ts is not None and ts.ndim != 1:
        raise PayloadError("timestamp", "ts must be a list of numbers")
    return Payload(values, seq, t0, ts)
