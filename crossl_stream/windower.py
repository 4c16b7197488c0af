"""Windower: aligns sensors on the host clock into fixed, masked windows.

Window ends lie on a fixed grid (multiples of the hop on the host clock), so the same samples
give the same windows whether they arrive live, in a fast replay, or all at once. A window
``[t_end - W, t_end)`` is emitted once the watermark passes ``t_end``:

    watermark = min over LIVE sensors of (newest timestamp) - allowed lateness

A sensor that is stale or lost leaves the watermark, so it never blocks the others; its part
of a window is masked when too little of the window is covered by its samples. At start-up,
sensors that have not delivered yet hold the watermark for a short grace period.

Live and replay give the same windows as long as no sensor is judged stale merely because
its chunks are far apart: ``stale_s`` must exceed every sensor's longest chunk interval.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from crossl_stream.buffer import RingBuffer
from crossl_stream.clock import host_clock
from crossl_stream.errors import InputError
from crossl_stream.model.specs import ModalitySpec


class StreamState(str, Enum):
    """Where a sensor stands, judged from the age of its newest sample."""

    CONNECTING = "connecting"  # no sample yet
    LIVE = "live"
    STALE = "stale"  # silent for longer than stale_s: out of the watermark
    LOST = "lost"  # silent for longer than lost_s


@dataclass
class Window:
    """One aligned window, as the inference worker consumes it.

    ``data[m]`` is [channels, samples] float32 on the modality's target grid (zeros when
    masked); ``available[m]`` says whether the model may use it.
    """

    seq: int
    t_end: float
    data: dict[str, np.ndarray]
    available: dict[str, bool]
    coverage: dict[str, float]
    states: dict[str, StreamState]
    t_last_arrival: float  # host clock: receipt of the data that completed this window
    t_emitted: float = field(default=0.0, compare=False)  # host clock: when it was cut


@dataclass
class WindowerCounters:
    """What the windower refused or masked, for logs and metrics."""

    windows: int = 0
    empty_windows: int = 0  # no modality available: not emitted
    masked: dict[str, int] = field(default_factory=dict)
    nan_samples: dict[str, int] = field(default_factory=dict)
    future_samples: dict[str, int] = field(default_factory=dict)


class Windower:
    """Owns one ring buffer per modality and the window grid over them.

    >>> acc = ModalitySpec(name="acc", channels=1, rate_hz=10, samples=20)
    >>> w = Windower([acc], hop_s=1.0, lateness_s=0.0)
    >>> t = np.arange(0, 5, 0.1)
    >>> w.push("acc", t[:, None].astype(np.float32), t, arrival=5.0)
    >>> [win.t_end for win in w.poll(now=5.0)]
    [2.0, 3.0, 4.0]
    """

    def __init__(
        self,
        modalities: Sequence[ModalitySpec],
        hop_s: float,
        lateness_s: float = 0.05,
        stale_s: float = 0.5,
        lost_s: float = 5.0,
        min_coverage: float = 0.8,
        source_rates: Mapping[str, float] | None = None,
        gap_periods: float = 2.0,
        buffer_s: float | None = None,
        max_future_s: float = 1.0,
        connect_grace_s: float = 2.0,
    ) -> None:
        if not modalities:
            raise ValueError("the windower needs at least one modality")
        lengths = {m.name: m.window_s for m in modalities}
        if max(lengths.values()) - min(lengths.values()) > 1e-9:
            raise ValueError(f"modalities disagree on the window length: {lengths}")
        if hop_s <= 0 or lateness_s < 0 or not 0 < min_coverage <= 1:
            raise ValueError("need hop_s > 0, lateness_s >= 0 and 0 < min_coverage <= 1")
        self.modalities = list(modalities)
        self.window_s = modalities[0].window_s
        self.hop_s = hop_s
        self.lateness_s = lateness_s
        self.stale_s = stale_s
        self.lost_s = lost_s
        self.min_coverage = min_coverage
        self.max_future_s = max_future_s
        self.connect_grace_s = connect_grace_s
        self._started = np.inf  # arrival of the first sample of any sensor
        rates = dict(source_rates or {})
        unknown = sorted(set(rates) - {m.name for m in modalities})
        if unknown:
            raise ValueError(f"source_rates for unknown sensors {unknown}")
        self.source_rates = {m.name: float(rates.get(m.name, m.rate_hz)) for m in modalities}
        self._tolerance = {n: gap_periods / r for n, r in self.source_rates.items()}
        span = buffer_s or (2 * self.window_s + lateness_s + lost_s)
        self.buffers = {
            m.name: RingBuffer(
                m.channels, math.ceil(span * self.source_rates[m.name] * 1.25) + 16, name=m.name
            )
            for m in modalities
        }
        self._grid = {m.name: np.arange(m.samples) / m.rate_hz - self.window_s for m in modalities}
        self._receipt_ts: dict[str, list[float]] = {n: [] for n in self.buffers}
        self._receipt_at: dict[str, list[float]] = {n: [] for n in self.buffers}
        self._next_end: float | None = None
        self._seq = 0
        self.counters = WindowerCounters(
            masked=dict.fromkeys(self.buffers, 0),
            nan_samples=dict.fromkeys(self.buffers, 0),
            future_samples=dict.fromkeys(self.buffers, 0),
        )

    def push(
        self,
        name: str,
        values: np.ndarray,
        timestamps: np.ndarray,
        arrival: float,
        received: float | None = None,
    ) -> None:
        """Add a chunk ([n, channels], host timestamps [n]) that arrived at time ``arrival``.

        ``arrival`` is on the clock that drives the windows (the host clock live, a virtual
        clock in replay); ``received`` is the host clock at receipt, for latency (default: now).
        Samples stamped more than ``max_future_s`` after their arrival are refused and counted
        (a clock that jumped, or a Unix-epoch clock where the host clock was expected).
        """
        buffer = self.buffers.get(name)
        if buffer is None:
            raise InputError(f"unknown sensor {name!r}; the windower has {list(self.buffers)}")
        timestamps = np.asarray(timestamps, dtype=np.float64)
        future = timestamps > arrival + self.max_future_s
        if future.any():
            self.counters.future_samples[name] += int(future.sum())
            keep = ~future
            values, timestamps = np.asarray(values)[keep], timestamps[keep]
        before = buffer.counters.written
        buffer.write(values, timestamps)
        bad = ~np.isfinite(np.asarray(values, dtype=np.float32)).all(axis=1)
        self.counters.nan_samples[name] += int(bad.sum())
        if buffer.counters.written > before:
            # Newest timestamp of each chunk and its host receipt time, for window latency.
            self._receipt_ts[name].append(buffer.latest_time)
            self._receipt_at[name].append(host_clock() if received is None else received)
            self._started = min(self._started, arrival)

    def states(self, now: float) -> dict[str, StreamState]:
        """Each sensor's state at host time ``now``."""
        out = {}
        for name, buffer in self.buffers.items():
            age = now - buffer.latest_time
            if not len(buffer):
                out[name] = StreamState.CONNECTING
            elif age <= self.stale_s:
                out[name] = StreamState.LIVE
            elif age <= self.lost_s:
                out[name] = StreamState.STALE
            else:
                out[name] = StreamState.LOST
        return out

    def watermark(self, now: float) -> float:
        """Newest time up to which every live sensor is complete (-inf: none is live).

        For ``connect_grace_s`` after the first sample, a sensor that has not delivered yet
        holds the watermark, so a slow start is not mistaken for a missing sensor.
        """
        return self._watermark(now, self.states(now))

    def _watermark(self, now: float, states: dict[str, StreamState]) -> float:
        waiting = StreamState.CONNECTING in states.values()
        if waiting and now - self._started < self.connect_grace_s:
            return -np.inf
        live = [self.buffers[n].latest_time for n, s in states.items() if s == StreamState.LIVE]
        return min(live) - self.lateness_s if live else -np.inf

    def poll(self, now: float) -> list[Window]:
        """Every window whose end the watermark has passed, oldest first."""
        states = self.states(now)  # once per poll: this runs for every chunk
        return self._emit(self._watermark(now, states), states)

    def flush(self) -> list[Window]:
        """At the end of a stream: every window up to the newest sample of any sensor."""
        newest = max(b.latest_time for b in self.buffers.values())
        return self._emit(newest, self.states(newest))

    def _emit(self, mark: float, states: dict[str, StreamState]) -> list[Window]:
        if mark == -np.inf:
            return []
        if self._next_end is None:
            # The first window is the first on the hop grid that fits after the oldest sample
            # of any sensor: it depends on the data, not on which chunk arrived first.
            first = min(b.oldest_time for b in self.buffers.values() if len(b))
            self._next_end = math.ceil((first + self.window_s) / self.hop_s) * self.hop_s
        out = []
        self._skip_silence(mark)
        while self._next_end <= mark + 1e-9:
            window = self._build(self._next_end, states)
            self._next_end = round((self._next_end + self.hop_s) / self.hop_s) * self.hop_s
            if window is not None:
                out.append(window)
        release = self._next_end - self.window_s - max(self._tolerance.values())
        for name, buffer in self.buffers.items():
            buffer.release(release)
            old = bisect.bisect_left(self._receipt_ts[name], release) - 1
            if old > 0:
                del self._receipt_ts[name][:old], self._receipt_at[name][:old]
        return out

    def _skip_silence(self, mark: float) -> None:
        """Jump over due grid ends whose windows hold no sample at all (after a long
        silence), counting them as empty instead of resampling each one."""
        if mark - self._next_end < self.window_s:
            return  # the usual case, checked per chunk: at most a window's worth is due
        start = self._next_end - self.window_s - max(self._tolerance.values())
        first = min(b.first_time_at_or_after(start) for b in self.buffers.values())
        first_end = (math.floor(first / self.hop_s) + 1) * self.hop_s if first < np.inf else np.inf
        last_due = math.floor((mark + 1e-9) / self.hop_s) * self.hop_s
        skipped = round((min(first_end, last_due + self.hop_s) - self._next_end) / self.hop_s)
        if skipped > 0:
            self.counters.empty_windows += skipped
            self._next_end = round(self._next_end / self.hop_s + skipped) * self.hop_s

    def _receipt_of(self, name: str, t_end: float) -> float:
        """Host receipt time of the data that completed the window ending at ``t_end``: the
        first chunk reaching ``t_end``, or the newest one when none does (end of stream)."""
        i = bisect.bisect_left(self._receipt_ts[name], t_end)
        return self._receipt_at[name][min(i, len(self._receipt_at[name]) - 1)]

    def _build(self, t_end: float, states: dict[str, StreamState]) -> Window | None:
        data, available, coverage = {}, {}, {}
        newest_arrival = -np.inf
        for m in self.modalities:
            grid = t_end + self._grid[m.name]
            x, cov = self._resample(m, grid)
            coverage[m.name] = cov
            available[m.name] = cov >= self.min_coverage
            data[m.name] = x if available[m.name] else np.zeros_like(x)
            if available[m.name]:
                newest_arrival = max(newest_arrival, self._receipt_of(m.name, t_end))
            else:
                self.counters.masked[m.name] += 1
        if not any(available.values()):
            self.counters.empty_windows += 1
            return None
        self._seq += 1
        self.counters.windows += 1
        return Window(
            self._seq, t_end, data, available, coverage, dict(states), newest_arrival, host_clock()
        )

    def _resample(self, m: ModalitySpec, grid: np.ndarray) -> tuple[np.ndarray, float]:
        """Linear interpolation of the buffered samples onto ``grid``; coverage = fraction of
        grid points with a sample within the gap tolerance."""
        tol = self._tolerance[m.name]
        t, x = self.buffers[m.name].read(grid[0] - tol, grid[-1] + 1.0 / m.rate_hz)
        finite = np.isfinite(x).all(axis=1)  # NaN / Inf samples were counted in push
        if not finite.all():
            t, x = t[finite], x[finite]
        out = np.zeros((m.channels, len(grid)), dtype=np.float32)
        if len(t) == 0:
            return out, 0.0
        right = np.searchsorted(t, grid, side="left").clip(1, len(t) - 1) if len(t) > 1 else None
        if right is None:
            out[:] = x[0][:, None]
            near = np.abs(grid - t[0])
        else:
            left = right - 1
            span = t[right] - t[left]
            w = np.clip((grid - t[left]) / span, 0.0, 1.0)
            out[:] = (x[left] * (1 - w)[:, None] + x[right] * w[:, None]).T
            near = np.minimum(np.abs(grid - t[left]), np.abs(t[right] - grid))
        return out, float(np.mean(near <= tol))
