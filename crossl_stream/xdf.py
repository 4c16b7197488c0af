"""A small XDF writer, so recordings made or cut by this project open in pyxdf, MNE and
LabRecorder's tools. Reading is left to pyxdf.

Layout (XDF 1.0): the magic ``XDF:``, then chunks of [length-of-length byte][length][tag]
[content]; a file header, one header per stream, sample chunks, clock offsets and one footer
per stream.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

FILE_HEADER, STREAM_HEADER, SAMPLES, CLOCK_OFFSET, BOUNDARY, STREAM_FOOTER = 1, 2, 3, 4, 5, 6


@dataclass
class XdfStream:
    """One stream to write: numeric [n, channels] float32 samples, or a list of strings for a
    marker stream (``nominal_srate`` 0)."""

    name: str
    type: str
    timestamps: np.ndarray
    samples: np.ndarray | Sequence[str]
    nominal_srate: float
    source_id: str = ""
    channel_labels: Sequence[str] = ()
    unit: str = ""
    clock_offsets: list[tuple[float, float]] = field(default_factory=list)

    @property
    def is_markers(self) -> bool:
        return not isinstance(self.samples, np.ndarray)

    @property
    def channel_count(self) -> int:
        return 1 if self.is_markers else int(self.samples.shape[1])


def _varlen(n: int) -> bytes:
    if n < 256:
        return struct.pack("<BB", 1, n)
    if n < 2**32:
        return struct.pack("<BI", 4, n)
    return struct.pack("<BQ", 8, n)


def _chunk(tag: int, content: bytes) -> bytes:
    return _varlen(len(content) + 2) + struct.pack("<H", tag) + content


def _header_xml(s: XdfStream) -> str:
    channels = "".join(
        f"<channel><label>{escape(label)}</label><unit>{escape(s.unit)}</unit></channel>"
        for label in s.channel_labels
    )
    desc = f"<desc><channels>{channels}</channels></desc>" if channels else "<desc/>"
    fmt = "string" if s.is_markers else "float32"
    return (
        f'<?xml version="1.0"?><info><name>{escape(s.name)}</name><type>{escape(s.type)}</type>'
        f"<channel_count>{s.channel_count}</channel_count>"
        f"<nominal_srate>{s.nominal_srate}</nominal_srate><channel_format>{fmt}</channel_format>"
        f"<source_id>{escape(s.source_id)}</source_id><version>1.1</version>"
        f"<created_at>{float(s.timestamps[0]) if len(s.timestamps) else 0.0}</created_at>"
        f"{desc}</info>"
    )


def _samples(stream_id: int, s: XdfStream, lo: int, hi: int) -> bytes:
    parts = [struct.pack("<I", stream_id), _varlen(hi - lo)]
    for i in range(lo, hi):
        parts.append(struct.pack("<Bd", 8, float(s.timestamps[i])))
        if s.is_markers:
            text = s.samples[i].encode("utf-8")
            parts.append(_varlen(len(text)) + text)
        else:
            parts.append(np.asarray(s.samples[i], dtype="<f4").tobytes())
    return _chunk(SAMPLES, b"".join(parts))


def write_xdf(path: str | Path, streams: Sequence[XdfStream], chunk_samples: int = 32) -> Path:
    """Write ``streams`` to ``path``; samples of all streams interleave in time order."""
    path = Path(path)
    out = [
        b"XDF:",
        _chunk(FILE_HEADER, b'<?xml version="1.0"?><info><version>1.0</version></info>'),
    ]
    for sid, s in enumerate(streams, 1):
        if len(s.timestamps) != len(s.samples):
            raise ValueError(
                f"stream {s.name!r}: {len(s.timestamps)} timestamps for {len(s.samples)} samples"
            )
        out.append(_chunk(STREAM_HEADER, struct.pack("<I", sid) + _header_xml(s).encode()))
    pieces = []
    for sid, s in enumerate(streams, 1):
        for lo in range(0, len(s.timestamps), chunk_samples):
            hi = min(lo + chunk_samples, len(s.timestamps))
            pieces.append((float(s.timestamps[hi - 1]), sid, lo, hi))
    for _, sid, lo, hi in sorted(pieces):
        out.append(_samples(sid, streams[sid - 1], lo, hi))
    for sid, s in enumerate(streams, 1):
        for collected, offset in s.clock_offsets:
            out.append(_chunk(CLOCK_OFFSET, struct.pack("<Idd", sid, collected, offset)))
        first = float(s.timestamps[0]) if len(s.timestamps) else 0.0
        last = float(s.timestamps[-1]) if len(s.timestamps) else 0.0
        footer = (
            f'<?xml version="1.0"?><info><first_timestamp>{first}</first_timestamp>'
            f"<last_timestamp>{last}</last_timestamp>"
            f"<sample_count>{len(s.timestamps)}</sample_count></info>"
        )
        out.append(_chunk(STREAM_FOOTER, struct.pack("<I", sid) + footer.encode()))
    path.write_bytes(b"".join(out))
    return path
