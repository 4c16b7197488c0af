"""Replay: plays the streams of an XDF recording as chunks, with their own timestamps.

Timestamps are kept as recorded (jitter, gaps, chunking) after pyxdf's clock-offset
correction; no dejittering. String marker streams are kept as markers; which of them are
labels is up to the label rules (``crossl_stream.labels``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from crossl_stream.clock import host_clock
from crossl_stream.errors import DatasetError
from crossl_stream.readers.base import Chunk, Reader, SensorInfo
from crossl_stream.xdf import read_xdf

log = logging.getLogger(__name__)
YIELD_EVERY = 256  # chunks between yields to the event loop at max speed


_LAST: dict = {}  # the recording loaded last and its file's identity (path, mtime, size)


def max_speed_chunk_s(stale_s: float) -> float:
    """Chunk length of a max-speed replay: windows do not depend on chunking as long as
    chunks come closer than ``stale_s``, and fewer chunks are faster."""
    return min(0.25, stale_s / 2)


class Recording:
    """Owns the numeric streams and the marker streams of one XDF file.

    >>> from crossl_stream.training.datasets import shipped_recording
    >>> rec = Recording.load(shipped_recording())
    >>> sorted(rec.streams), rec.types["acc"], rec.markers[0][1]
    (['acc', 'gyro'], 'Accelerometer', 'label:FEL')
    """

    def __init__(
        self,
        streams: dict[str, tuple[np.ndarray, np.ndarray, float]],
        markers: list[tuple[float, str]],
        path: Path,
        dropped: dict[str, int] | None = None,
        types: dict[str, str] | None = None,
        header: dict[str, str] | None = None,
        marker_streams: dict[str, list[tuple[float, str]]] | None = None,
    ) -> None:
        self.streams = streams  # name -> (timestamps [n], values [n, c] float32, nominal rate)
        self.markers = markers  # every marker stream's (time, text), in time order
        if marker_streams is None:  # markers given without their streams' names
            marker_streams = {"markers": markers} if markers else {}
        self.marker_streams = marker_streams
        self.path = path
        self.dropped = dropped or {}  # samples cut after a clock jump, per stream
        self.types = types or {}  # stream name -> stream type ("" when the file gives none)
        self.header = header or {}  # the file header's fields (subject, session, ...)
        self.truncated_at: float | None = None  # where a cut-off file stops

    @classmethod
    def load(cls, path: str | Path, max_gap_s: float = 600.0) -> Recording:
        """Read ``path`` with pyxdf; numeric streams by name, string streams as markers.

        A file cut off while recording plays what it holds: ``truncated_at`` says where it
        stops (a warning says so too). A stream whose clock jumps forward by more than
        ``max_gap_s`` between two samples (a reset, or a switch to Unix time) is cut at the
        jump; the cut is logged and counted in ``dropped``. Backward steps are left to the
        ring buffers, which refuse and count them.
        """
        path = Path(path)
        if not path.is_file():
            raise DatasetError(f"recording not found: {path}")
        stat = path.stat()  # the file read last is read once: replay matches, then plays it
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, max_gap_s)
        if _LAST.get("key") == key:
            return _LAST["recording"]
        contents = read_xdf(path)  # a cut-off file gives what it holds, with a warning
        streams, markers, dropped, types, marker_streams = {}, [], {}, {}, {}
        for s in contents.streams:
            info = s["info"]
            name = info["name"][0]
            if info["channel_format"][0] == "string":
                mine = [
                    (float(t), str(v[0]))
                    for t, v in zip(s["time_stamps"], s["time_series"], strict=True)
                ]
                marker_streams.setdefault(name, []).extend(mine)
                markers += mine
                continue
            values = np.asarray(s["time_series"], dtype=np.float32)
            if values.ndim != 2 or not len(values):
                log.warning("%s: stream %r has no samples; skipped", path, name)
                continue
            t = np.asarray(s["time_stamps"], np.float64)
            jumps = np.flatnonzero(np.diff(t) > max_gap_s)
            if len(jumps):
                cut = int(jumps[0]) + 1
                dropped[name] = len(t) - cut
                log.warning(
                    "%s: stream %r clock jumps %+.1f s after sample %d; the %d samples after "
                    "it are dropped",
                    path,
                    name,
                    t[cut] - t[cut - 1],
                    cut,
                    len(t) - cut,
                )
                t, values = t[:cut], values[:cut]
            streams[name] = (t, values, float(info["nominal_srate"][0]))
            types[name] = str((info.get("type") or [""])[0] or "")
        if not streams:
            raise DatasetError(f"{path}: no numeric stream (is it an XDF recording?)")
        markers.sort(key=lambda m: m[0])  # markers at one time keep their recorded order
        for mine in marker_streams.values():
            mine.sort(key=lambda m: m[0])
        recording = cls(streams, markers, path, dropped, types, contents.header, marker_streams)
        recording.truncated_at = contents.truncated_at
        _LAST.update(key=key, recording=recording)
        return recording

    def describe_streams(self) -> str:
        """The numeric streams, for error messages: name, type, channels and rate."""
        return ", ".join(
            f"{name!r} (type {self.types.get(name) or '-'!r}, {x.shape[1]} ch @ {rate:g} Hz)"
            for name, (_, x, rate) in self.streams.items()
        )

    @property
    def start(self) -> float:
        return min(t[0] for t, _, _ in self.streams.values())

    @property
    def end(self) -> float:
        return max(t[-1] for t, _, _ in self.streams.values())


class Replay(Reader):
    """Owns a recording and plays the streams named by ``sensors`` (sensor -> stream name).

    ``speed=None`` plays as fast as possible on the recording's own clock (virtual time); a
    number paces chunks at that multiple of real time. ``dropouts`` removes samples of a
    sensor over (start, length) seconds from the recording start, to rehearse a sensor loss;
    ``section`` = (from, to) seconds from the start plays only that part.
    """

    def __init__(
        self,
        recording: Recording,
        sensors: Mapping[str, str] | Sequence[str],
        speed: float | None = None,
        chunk_s: float = 0.04,
        dropouts: Mapping[str, Sequence[tuple[float, float]]] | None = None,
        section: tuple[float, float] | None = None,
    ) -> None:
        names = dict(sensors) if isinstance(sensors, Mapping) else {s: s for s in sensors}
        missing = {s: n for s, n in names.items() if n not in recording.streams}
        if missing:
            raise DatasetError(
                f"{recording.path}: no stream named {sorted(missing.values())} "
                f"(for sensors {sorted(missing)}); the recording has {sorted(recording.streams)}"
            )
        self.recording = recording
        self.names = names
        self.speed = speed
        self.chunk_s = chunk_s
        self.dropouts = {k: list(v) for k, v in (dropouts or {}).items()}
        self.section = section or (0.0, np.inf)
        unknown = sorted(set(self.dropouts) - set(names))
        if unknown:
            raise DatasetError(f"dropouts for unknown sensors {unknown}")
        self.sensors = {
            s: SensorInfo(s, recording.streams[n][1].shape[1], recording.streams[n][2])
            for s, n in names.items()
        }
        self._wall0: float | None = None
        self._origin = recording.start

    def schedule(self) -> list[tuple[float, str, np.ndarray, np.ndarray]]:
        """Every chunk to play: (arrival on the recording's clock, sensor, timestamps,
        values), in arrival order; chunk edges lie on the recording's clock, so every
        speed, and offline windowing, cut the same chunks."""
        start = self.recording.start
        events = []
        for sensor, name in self.names.items():
            t, x, _ = self.recording.streams[name]
            keep = (t >= start + self.section[0]) & (t < start + self.section[1])
            for a, length in self.dropouts.get(sensor, []):
                keep &= ~((t >= start + a) & (t < start + a + length))
            t, x = t[keep], x[keep]
            if not len(t):
                continue
            edges = np.searchsorted(t, np.arange(start, t[-1] + self.chunk_s, self.chunk_s)[1:])
            for lo, hi in zip(np.r_[0, edges[:-1]], edges, strict=True):
                if hi > lo:
                    events.append((float(t[hi - 1]), sensor, t[lo:hi], x[lo:hi]))
        events.sort(key=lambda e: e[0])
        return events

    live = False

    def now(self) -> float | None:
        """The recording's clock while paced; None at max speed or before playing."""
        if self.speed is None or self._wall0 is None:
            return None
        return self._origin + (host_clock() - self._wall0) * self.speed

    def to_host(self, t: float) -> float | None:
        if self.speed is None or self._wall0 is None:
            return None
        return self._wall0 + (t - self._origin) / self.speed

    def describe(self) -> str:
        rec = self.recording
        pace = "as fast as possible" if self.speed is None else f"at {self.speed:g}x real time"
        return (
            f"replaying {rec.path.name} ({rec.end - rec.start:.0f} s, streams "
            f"{', '.join(self.names.values())}) {pace}"
        )

    async def chunks(self) -> AsyncIterator[Chunk]:
        self._wall0 = wall0 = host_clock()
        # paced from the start of the section played, on the recording's clock
        start = self._origin = self.recording.start + self.section[0]
        for i, (arrival, sensor, t, x) in enumerate(self.schedule()):
            if self.speed is not None:
                delay = wall0 + (arrival - start) / self.speed - host_clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif i % YIELD_EVERY == 0:
                await asyncio.sleep(0)  # as fast as possible, but let the consumers batch
            yield Chunk(sensor, x, t, arrival, host_clock())


def replay_from_config(rc, ctx) -> Replay:
    """The Replay a ``kind: replay`` reader config describes (``ctx``: the pipeline's
    BuildContext): its recording loaded, each sensor's stream found (the config's name,
    else the sensor's name, else the stream the model was trained on, by name or type),
    and channel counts and nominal rates checked against the sensors."""
    from crossl_stream.errors import ConfigError
    from crossl_stream.training.datasets import data_cache, shipped_recording
    from crossl_stream.training.spec import find_stream

    cfg = ctx.cfg
    if rc.path is None:
        path = shipped_recording()
    else:  # {data}: the data cache
        path = ctx.resolve(Path(str(rc.path).replace("{data}", str(data_cache()))))
    recording = Recording.load(path)
    names = {}
    for s in cfg.reader_sensors(rc):
        trained = ctx.known.get(cfg.modality_of(s), {})
        if s in rc.streams:  # named in the config: that stream or an error
            names[s] = find_stream(recording, s, [rc.streams[s]])
        else:
            names[s] = find_stream(recording, s, [s, trained.get("stream")], trained.get("type"))
    dropouts: dict[str, list[tuple[float, float]]] = {}
    for d in rc.dropouts:
        dropouts.setdefault(d.sensor, []).append((d.start_s, d.length_s))
    end = rc.start_s + rc.duration_s if rc.duration_s else np.inf
    chunk_s = rc.chunk_s
    if chunk_s is None:  # windows do not depend on chunking while chunks come < stale_s
        stale = min(cfg.sensors[s].stale_s or cfg.window.stale_s for s in names)
        chunk_s = 0.04 if rc.speed != "max" else max_speed_chunk_s(stale)
    reader = Replay(
        recording,
        names,
        None if rc.speed == "max" else float(rc.speed),
        chunk_s=chunk_s,
        dropouts=dropouts,
        section=(rc.start_s, end),
    )
    for sensor, info in reader.sensors.items():
        want = cfg.sensors[sensor]
        if info.channels != want.channels:
            raise ConfigError(
                f"{ctx.source}: sensors.{sensor}.channels: {want.channels}, but stream "
                f"{names[sensor]!r} of {path.name} has {info.channels}"
            )
        if info.rate_hz > 0 and abs(info.rate_hz - want.rate_hz) > 0.01 * want.rate_hz:
            raise ConfigError(  # nominal rate 0: an irregular stream, nothing to compare
                f"{ctx.source}: sensors.{sensor}.rate_hz: {want.rate_hz:g} Hz, but stream "
                f"{names[sensor]!r} of {path.name} has a nominal rate of {info.rate_hz:g} Hz"
            )
    return reader
