"""The XDF writer (file header fields, byte layout) and the tolerant reader."""

from __future__ import annotations

import logging
import struct

import numpy as np
import pytest
import pyxdf

from crossl_stream.errors import DatasetError
from crossl_stream.xdf import (
    SAMPLES,
    STREAM_HEADER,
    XdfStream,
    _chunk,
    _header_xml,
    _varlen,
    read_xdf,
    write_xdf,
)


def _streams(n: int = 100) -> list[XdfStream]:
    rng = np.random.default_rng(3)
    t = 100.0 + np.arange(n) / 50 + rng.normal(0, 1e-3, n)
    return [
        XdfStream(
            "acc",
            "Accelerometer",
            t,
            rng.normal(size=(n, 3)).astype(np.float32),
            50.0,
            "src-acc",
            ["x", "y", "z"],
            "g",
            [(100.0, 0.0), (101.0, 0.0)],
        ),
        XdfStream("one", "Misc", t[::4], rng.normal(size=(len(t[::4]), 1)), 12.5),
        XdfStream("labels", "Markers", np.array([100.0, 100.9, 101.5]), ["a", "é<&>", "b"], 0.0),
    ]


def _old_write(streams: list[XdfStream], chunk_samples: int) -> bytes:
    """The writer as it was before numeric chunks were packed with numpy: one struct per
    sample. Kept here to prove the bytes did not change."""

    def samples(sid: int, s: XdfStream, lo: int, hi: int) -> bytes:
        parts = [struct.pack("<I", sid), _varlen(hi - lo)]
        for i in range(lo, hi):
            parts.append(struct.pack("<Bd", 8, float(s.timestamps[i])))
            if s.is_markers:
                text = s.samples[i].encode("utf-8")
                parts.append(_varlen(len(text)) + text)
            else:
                parts.append(np.asarray(s.samples[i], dtype="<f4").tobytes())
        return _chunk(SAMPLES, b"".join(parts))

    out = [b"XDF:", _chunk(1, b'<?xml version="1.0"?><info><version>1.0</version></info>')]
    for sid, s in enumerate(streams, 1):
        out.append(_chunk(STREAM_HEADER, struct.pack("<I", sid) + _header_xml(s).encode()))
    pieces = []
    for sid, s in enumerate(streams, 1):
        for lo in range(0, len(s.timestamps), chunk_samples):
            hi = min(lo + chunk_samples, len(s.timestamps))
            pieces.append((float(s.timestamps[hi - 1]), sid, lo, hi))
    for _, sid, lo, hi in sorted(pieces):
        out.append(samples(sid, streams[sid - 1], lo, hi))
    for sid, s in enumerate(streams, 1):
        for collected, offset in s.clock_offsets:
            out.append(_chunk(4, struct.pack("<Idd", sid, collected, offset)))
        first, last = float(s.timestamps[0]), float(s.timestamps[-1])
        footer = (
            f'<?xml version="1.0"?><info><first_timestamp>{first}</first_timestamp>'
            f"<last_timestamp>{last}</last_timestamp>"
            f"<sample_count>{len(s.timestamps)}</sample_count></info>"
        )
        out.append(_chunk(6, struct.pack("<I", sid) + footer.encode()))
    return b"".join(out)


def _chunks(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, end, tag) of every chunk after the magic."""
    out, pos = [], 4
    while pos < len(data):
        width = data[pos]
        length = int.from_bytes(data[pos + 1 : pos + 1 + width], "little")
        tag = int.from_bytes(data[pos + 1 + width : pos + 3 + width], "little")
        out.append((pos, pos + 1 + width + length, tag))
        pos += 1 + width + length
    return out


@pytest.mark.parametrize("chunk_samples", [1, 7, 32])
def test_vectorised_writer_writes_the_same_bytes(tmp_path, chunk_samples):
    path = write_xdf(tmp_path / "new.xdf", _streams(), chunk_samples)
    assert path.read_bytes() == _old_write(_streams(), chunk_samples)


def test_header_fields_round_trip_through_pyxdf(tmp_path):
    header = {"subject": "mg", "session": "1", "note": "a<b & c>"}
    path = write_xdf(tmp_path / "h.xdf", _streams(), header=header)
    _, fileheader = pyxdf.load_xdf(str(path), dejitter_timestamps=False, verbose=False)
    assert {k: v[0] for k, v in fileheader["info"].items()} == {"version": "1.0", **header}
    got = read_xdf(path)
    assert got.header == {"version": "1.0", **header}
    assert got.truncated_at is None
    with pytest.raises(ValueError, match="XML element name"):
        write_xdf(tmp_path / "bad.xdf", _streams(), header={"two words": "x"})


def test_whole_file_reads_everything_without_warning(tmp_path, caplog):
    streams = _streams()
    path = write_xdf(tmp_path / "whole.xdf", streams, 10)
    with caplog.at_level(logging.WARNING):
        got = read_xdf(path)
    assert not caplog.records
    assert got.truncated_at is None
    by_name = {s["info"]["name"][0]: s for s in got.streams}
    np.testing.assert_array_equal(by_name["acc"]["time_stamps"], streams[0].timestamps)
    np.testing.assert_array_equal(by_name["acc"]["time_series"], streams[0].samples)
    assert [v[0] for v in by_name["labels"]["time_series"]] == ["a", "é<&>", "b"]


def _sample_count(data: bytes, pos: int) -> int:
    """The sample count of the sample chunk at ``pos``."""
    pos += 1 + data[pos] + 2 + 4  # length-of-length, length, tag, stream id
    return int.from_bytes(data[pos + 1 : pos + 1 + data[pos]], "little")


def _cuts(data: bytes) -> dict[str, int]:
    chunks = _chunks(data)
    headers = [c for c in chunks if c[2] == STREAM_HEADER]
    samples = [c for c in chunks if c[2] == SAMPLES]
    tail = next(c for c in chunks if c[2] in (4, 6))  # first clock offset or footer
    mid = samples[len(samples) // 2]
    last_stream_header_end = headers[-1][1]
    marker = next(c for c in samples if int.from_bytes(data[c[0] + 4 : c[0] + 8], "little") == 3)
    return {
        "inside the last stream header": headers[-1][0] + 20,
        "just after the stream headers": last_stream_header_end,
        "inside a chunk's tag": mid[0] + 2,
        "inside a sample chunk": (mid[0] + mid[1]) // 2,
        "inside a chunk's last sample": mid[1] - 2,
        "inside a marker chunk's last string": marker[1] - 1,
        "at a chunk boundary, no footers": tail[0],
        "inside the footers": tail[0] + 10,
    }


@pytest.mark.parametrize(
    "where",
    [
        "inside the last stream header",
        "just after the stream headers",
        "inside a chunk's tag",
        "inside a sample chunk",
        "inside a chunk's last sample",
        "inside a marker chunk's last string",
        "at a chunk boundary, no footers",
        "inside the footers",
    ],
)
def test_truncated_file_gives_the_readable_prefix(tmp_path, caplog, where):
    streams = _streams()
    data = write_xdf(tmp_path / "whole.xdf", streams, 10).read_bytes()
    cut = _cuts(data)[where]
    path = tmp_path / "cut.xdf"
    path.write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="crossl_stream.xdf"):
        got = read_xdf(path)
    assert got.truncated_at is not None
    assert any(str(path) in r.getMessage() for r in caplog.records)
    # everything read is a prefix of what was written, up to the last whole chunk
    whole = [c for c in _chunks(data) if c[1] <= cut and c[2] == SAMPLES]
    newest = -np.inf
    for s in got.streams:
        src = next(x for x in streams if x.name == s["info"]["name"][0])
        n = len(s["time_stamps"])
        np.testing.assert_array_equal(s["time_stamps"], src.timestamps[:n])
        if n and not src.is_markers:
            np.testing.assert_array_equal(s["time_series"], src.samples[:n].astype(np.float32))
            newest = max(newest, src.timestamps[n - 1])
        elif n:
            assert [v[0] for v in s["time_series"]] == list(src.samples[:n])
            newest = max(newest, src.timestamps[n - 1])
    read = sum(len(s["time_stamps"]) for s in got.streams)
    written = sum(_sample_count(data, c[0]) for c in whole)
    assert read == written if whole else read == 0
    if whole:
        assert got.truncated_at == newest
    else:  # no sample: where the streams were created
        assert got.truncated_at == pytest.approx(streams[0].timestamps[0])
    if "footers" in where:
        assert got.truncated_at == max(s.timestamps[-1] for s in streams)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "not an XDF file"),
        (b"PK\x03\x04 a zip file, not a recording", "not an XDF file"),
        (b"XDF:junk that is not made of chunks", "no stream header"),
    ],
)
def test_not_a_recording_raises_naming_the_path(tmp_path, content, reason):
    path = tmp_path / "junk.xdf"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=reason) as err:
        read_xdf(path)
    assert str(path) in str(err.value)


def test_file_header_only_has_no_stream_header(tmp_path):
    data = write_xdf(tmp_path / "whole.xdf", _streams()).read_bytes()
    path = tmp_path / "header-only.xdf"
    path.write_bytes(data[: _chunks(data)[0][1]])
    with pytest.raises(DatasetError, match="no stream header"):
        read_xdf(path)
    with pytest.raises(DatasetError, match="not found"):
        read_xdf(tmp_path / "absent.xdf")
