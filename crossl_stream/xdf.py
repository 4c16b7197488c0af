"""A small XDF writer, so recordings made or cut by this project open in pyxdf, MNE and
LabRecorder's tools, and a reader that keeps what a cut-off recording holds.

Layout (XDF 1.0): the magic ``XDF:``, then chunks of [length-of-length byte][length][tag]
[content]; a file header, one header per stream, sample chunks, clock offsets and one footer
per stream. The length counts the tag (2 bytes) and the content.

Reading is pyxdf's work; :func:`read_xdf` only decides what it is given. pyxdf (1.17) copes
badly with a file that stops mid-chunk: a cut inside a header, a chunk's tag or a clock
offset raises; a cut inside a sample chunk drops that chunk with a logged error, except when
it falls inside the last sample, whose values then come back silently wrong (stale bytes of
the previous sample) or, for a marker, cut short. So :func:`read_xdf` walks the chunk
lengths first and hands pyxdf only the whole chunks.
"""

from __future__ import annotations

import io
import logging
import math
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from xml.sax.saxutils import escape

import numpy as np

from crossl_stream.errors import DatasetError

log = logging.getLogger(__name__)

FILE_HEADER, STREAM_HEADER, SAMPLES, CLOCK_OFFSET, BOUNDARY, STREAM_FOOTER = 1, 2, 3, 4, 5, 6
MAGIC = b"XDF:"
_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\Z")


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


def _file_header_xml(header: Mapping[str, str] | None) -> str:
    extra = []
    for key, value in (header or {}).items():
        if not _XML_NAME.match(key) or key.lower().startswith("xml") or key == "version":
            raise ValueError(f"file header field {key!r}: not a usable XML element name")
        extra.append(f"<{key}>{escape(str(value))}</{key}>")
    return f'<?xml version="1.0"?><info><version>1.0</version>{"".join(extra)}</info>'


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


def _numeric_records(s: XdfStream) -> np.ndarray:
    """Every sample of a numeric stream as it lies in a chunk: a timestamp-size byte (8),
    the float64 timestamp, the float32 values; packed, little-endian."""
    values = np.asarray(s.samples)
    dtype = np.dtype([("n", "u1"), ("t", "<f8"), ("v", "<f4", (values.shape[1],))])
    records = np.empty(len(values), dtype)
    records["n"] = 8
    records["t"] = np.asarray(s.timestamps, dtype=np.float64)
    records["v"] = values
    return records


def _samples(stream_id: int, s: XdfStream, lo: int, hi: int, records: np.ndarray | None) -> bytes:
    parts = [struct.pack("<I", stream_id), _varlen(hi - lo)]
    if records is not None:
        parts.append(records[lo:hi].tobytes())
    else:
        for i in range(lo, hi):
            text = s.samples[i].encode("utf-8")
            parts.append(struct.pack("<Bd", 8, float(s.timestamps[i])) + _varlen(len(text)) + text)
    return _chunk(SAMPLES, b"".join(parts))


def write_xdf(
    path: str | Path,
    streams: Sequence[XdfStream],
    chunk_samples: int = 32,
    header: Mapping[str, str] | None = None,
) -> Path:
    """Write ``streams`` to ``path``; samples of all streams interleave in time order.

    ``header`` adds fields to the file header (``{"subject": "mg"}`` becomes
    ``<subject>mg</subject>``); pyxdf returns them in its file header's ``info``.
    """
    path = Path(path)
    file_header = _chunk(FILE_HEADER, _file_header_xml(header).encode())
    for s in streams:
        if len(s.timestamps) != len(s.samples):
            raise ValueError(
                f"stream {s.name!r}: {len(s.timestamps)} timestamps for {len(s.samples)} samples"
            )
    records = [None if s.is_markers else _numeric_records(s) for s in streams]
    pieces = []
    for sid, s in enumerate(streams, 1):
        for lo in range(0, len(s.timestamps), chunk_samples):
            hi = min(lo + chunk_samples, len(s.timestamps))
            pieces.append((float(s.timestamps[hi - 1]), sid, lo, hi))
    with open(path, "wb") as f:
        f.write(MAGIC + file_header)
        for sid, s in enumerate(streams, 1):
            f.write(_chunk(STREAM_HEADER, struct.pack("<I", sid) + _header_xml(s).encode()))
        for _, sid, lo, hi in sorted(pieces):
            f.write(_samples(sid, streams[sid - 1], lo, hi, records[sid - 1]))
        for sid, s in enumerate(streams, 1):
            for collected, offset in s.clock_offsets:
                f.write(_chunk(CLOCK_OFFSET, struct.pack("<Idd", sid, collected, offset)))
            first = float(s.timestamps[0]) if len(s.timestamps) else 0.0
            last = float(s.timestamps[-1]) if len(s.timestamps) else 0.0
            footer = (
                f'<?xml version="1.0"?><info><first_timestamp>{first}</first_timestamp>'
                f"<last_timestamp>{last}</last_timestamp>"
                f"<sample_count>{len(s.timestamps)}</sample_count></info>"
            )
            f.write(_chunk(STREAM_FOOTER, struct.pack("<I", sid) + footer.encode()))
    return path


@dataclass
class XdfContents:
    """What :func:`read_xdf` found.

    ``streams`` is pyxdf's list of stream dicts (clock offsets applied, not dejittered);
    ``header`` the file header's fields (``version``, ``subject``, ...) as strings;
    ``truncated_at`` None for a whole recording, else the newest timestamp read (when not
    even one sample was, the newest stream's ``created_at``, nan if no header gives it).
    """

    streams: list[dict[str, Any]]
    header: dict[str, str]
    truncated_at: float | None = None


@dataclass
class _Layout:
    end: int  # offset just after the last whole chunk
    size: int
    stream_ids: list[int]
    footers: set[int]
    problem: str  # why the walk stopped before ``size``, "" when it did not


def _open(path: Path) -> tuple[BinaryIO, int]:
    """The file's bytes (decompressed for .xdfz / .xdf.gz, as far as they go) and its size."""
    if path.suffix == ".xdfz" or path.suffixes[-2:] == [".xdf", ".gz"]:
        data = zlib.decompressobj(wbits=31).decompress(path.read_bytes())
        return io.BytesIO(data), len(data)
    return open(path, "rb"), path.stat().st_size


def _walk(f: BinaryIO, size: int) -> _Layout:
    """Follow the chunk lengths from just after the magic to the last whole chunk."""
    layout = _Layout(len(MAGIC), size, [], set(), "")
    pos = len(MAGIC)
    while pos < size:
        f.seek(pos)
        head = f.read(1)
        width = head[0]
        if width not in (1, 4, 8):
            layout.problem = f"bad chunk length at byte {pos}"
            break
        raw = f.read(width + 6)  # length, tag, stream id (when the chunk has one)
        if len(raw) < width + 2:
            break
        length = int.from_bytes(raw[:width], "little")
        tag = int.from_bytes(raw[width : width + 2], "little")
        if length < 2 or not FILE_HEADER <= tag <= STREAM_FOOTER:
            layout.problem = f"bad chunk (tag {tag}, length {length}) at byte {pos}"
            break
        end = pos + 1 + width + length
        if end > size:
            break
        if tag in (STREAM_HEADER, STREAM_FOOTER):
            if length < 6:
                layout.problem = f"stream chunk without a stream id at byte {pos}"
                break
            sid = int.from_bytes(raw[width + 2 : width + 6], "little")
            if tag == STREAM_HEADER:
                layout.stream_ids.append(sid)
            else:
                layout.footers.add(sid)
        pos = layout.end = end
    return layout


def _newest(streams: list[dict[str, Any]]) -> float:
    stamps = [float(np.max(s["time_stamps"])) for s in streams if len(s["time_stamps"])]
    if stamps:
        return max(stamps)
    created = []
    for s in streams:
        try:
            created.append(float(s["info"]["created_at"][0]))
        except (KeyError, IndexError, TypeError, ValueError):
            continue
    return max(created) if created else math.nan


def _quiet_segments(record: logging.LogRecord) -> bool:
    """Drop pyxdf's "Segments and clock-segments differ": segments are a dejittering
    notion, and without dejittering pyxdf says it for any stream with clock offsets."""
    return "clock-segments differ" not in record.getMessage()


def read_xdf(path: str | Path) -> XdfContents:
    """Read an XDF recording with pyxdf, timestamps as recorded (``dejitter_timestamps``
    off), keeping everything a cut-off recording holds.

    A recording that ends inside a chunk (or holds a chunk whose length makes no sense), or
    whose streams lack their footers (LabRecorder killed while recording), is truncated: it
    is read up to its last whole chunk before that point, ``truncated_at`` says where it
    stops and a warning is logged. A file that is not XDF, or has no stream header, raises
    :class:`DatasetError`.
    """
    import pyxdf

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: recording not found")
    try:
        f, size = _open(path)
    except (OSError, zlib.error) as exc:
        raise DatasetError(f"{path}: cannot read the file ({exc})") from exc
    with f:
        if f.read(len(MAGIC)) != MAGIC:
            raise DatasetError(f"{path}: not an XDF file (it does not start with 'XDF:')")
        layout = _walk(f, size)
        if not layout.stream_ids:
            why = layout.problem or f"{size} bytes"
            raise DatasetError(f"{path}: not an XDF recording (no stream header; {why})")
        whole = layout.end == size
        missing = [sid for sid in layout.stream_ids if sid not in layout.footers]
        if whole:
            source: Any = str(path)
        else:
            f.seek(0)
            source = io.BytesIO(f.read(layout.end))
    pyxdf_log = logging.getLogger("pyxdf.pyxdf")
    pyxdf_log.addFilter(_quiet_segments)
    try:
        streams, fileheader = pyxdf.load_xdf(source, dejitter_timestamps=False, verbose=False)
    except Exception as exc:  # pyxdf raises bare Exceptions on damaged files
        raise DatasetError(f"{path}: not a readable XDF recording ({exc})") from exc
    finally:
        pyxdf_log.removeFilter(_quiet_segments)
    info = (fileheader or {}).get("info") if isinstance(fileheader, dict) else None
    header = {
        key: "" if values[0] is None else str(values[0])
        for key, values in (info if isinstance(info, dict) else {}).items()
        if isinstance(values, list) and values and not isinstance(values[0], dict)
    }
    if whole and not missing:
        return XdfContents(streams, header, None)
    stop = _newest(streams)
    if not whole:
        why = layout.problem or "cut off"
        how = f"{why}; read {layout.end} of {size} bytes"
    else:
        how = f"no footer for {len(missing)} of {len(layout.stream_ids)} streams"
    log.warning("%s: truncated recording (%s); it stops at %.3f s", path, how, stop)
    return XdfContents(streams, header, stop)
