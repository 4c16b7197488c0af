"""Windower: aligns sensors on the host clock into fixed, masked windows.

Window ends lie on a fixed grid (multiples of the hop on the host clock), so the same samples
give the same windows whether they arrive live, in a fast replay, or all at once. A window
``[t_end - W, t_end)`` is emitted once the watermark passes ``t_end``:

    watermark = min over LIVE sensors of (newest finite sample's time) - allowed lateness

Each modality is resampled onto its target grid (multiples of the target period) by linear
interpolation between the nearest finite samples on either side, which is ``np.interp`` of the
whole stream, held at its ends; a grid point is covered when a sample lies within the gap
tolerance (``gap_periods`` source periods). Resampled points that no later sample can change
are kept, so overlapping windows resample each point once (when the hop is a whole number of
target periods).

A sensor that is stale or lost leaves the watermark, so it never blocks the others; its part
of a window is masked when too little of the window is covered by its samples. At start-up,
sensors that have not delivered yet hold the watermark for a short grace period. When no
sensor is live, a live clock still moves the watermark (``now`` minus the longest
``stale_s`` and the lateness), so windows keep coming while every sensor is away.

With ``emit_empty`` every window position on the grid is emitted: one no sensor covered
comes out with every modality unavailable (the pipeline publishes it as such); without it
(offline windowing) such positions are only counted.

Live and replay give the same windows as long as no sensor is judged stale merely because
its chunks are far apart: ``stale_s`` must exceed every sensor's longest chunk interval.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from crossl_stream.buffer import RingBuffer
from crossl_stream.clock import host_clock
from crossl_stream.errors import InputError
from crossl_stream.model.specs import Mark, ModalitySpec
from crossl_stream.states import StreamState

if TYPE_CHECKING:
    from crossl_stream.config import WindowConfig

MAX_RECEIPTS = 8192  # chunk receipt times kept per sensor while no window is cut
MAX_EMPTY_BURST = 7200  # empty windows emitted at once after a silence; more are counted
_EPOCHS = itertools.count(1)  # runs of kept grid points, unique in the process


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
    subject: str = ""  # whose sensors (one windower per subject)
    marks: dict[str, Mark | None] = field(default_factory=dict, compare=False)


@dataclass
class WindowerCounters:
    """What the windower refused or masked, for logs and metrics."""

    windows: int = 0
    empty_windows: int = 0  # no modality available (emitted as such with emit_empty)
    unpublished_empty: int = 0  # empty windows beyond MAX_EMPTY_BURST after one silence
    masked: dict[str, int] = field(default_factory=dict)
    nan_samples: dict[str, int] = field(default_factory=dict)
    future_samples: dict[str, int] = field(default_factory=dict)


class _Resampler:
    """Owns one modality's target grid: each grid point is the linear interpolation of the
    nearest finite samples before and after it (held at the ends), and counts as covered when
    a sample lies within ``tol`` of it.

    Grid points lie at multiples of the target period on the stream clock. A point that no
    later sample can change (a finite sample at or after it is in) is kept, so overlapping
    windows resample each point once and a window is a slice of the kept points.
    """

    def __init__(self, spec: ModalitySpec, buffer: RingBuffer, tol: float, hop_s: float) -> None:
        self.spec = spec
        self.buffer = buffer
        self.tol = tol
        self.final = -np.inf  # newest finite sample: grid points up to it are final
        self.last_bad = -np.inf  # newest NaN / Inf sample
        hop_points = hop_s * spec.rate_hz
        # windows share grid points only when the hop is a whole number of target periods
        self.aligned = abs(hop_points - round(hop_points)) < 1e-6
        capacity = 2 * spec.samples + 4 * max(1, round(hop_points))
        self._values = np.zeros((spec.channels, capacity), dtype=np.float32)
        self._near = np.zeros(capacity, dtype=bool)
        self._k0 = 0  # grid index of column 0
        self._kept = 0  # columns [0, kept) hold final points
        self._epoch = next(_EPOCHS)  # renewed whenever the kept points start over

    def window(self, t_end: float) -> tuple[np.ndarray, float, Mark | None]:
        """The window ending at ``t_end``: [channels, samples] float32, its coverage, and
        its mark (None when windows share no grid points)."""
        n = self.spec.samples
        if not self.aligned:
            grid = t_end - self.spec.window_s + np.arange(n) / self.spec.rate_hz
            x, near = self._interpolate(grid)
            return np.ascontiguousarray(x), float(np.count_nonzero(near)) / n, None
        k_end = round(t_end * self.spec.rate_hz)
        k_start = k_end - n
        if not self._k0 <= k_start <= self._k0 + self._kept:
            self._k0, self._kept = k_start, 0  # the first window, or after a skipped silence
            self._epoch = next(_EPOCHS)
            self._values = np.zeros_like(self._values)  # windows handed out keep the old
        if k_end - self._k0 > self._near.size:  # slide the kept points to the front
            a = k_start - self._k0
            values = np.zeros_like(self._values)  # a new array: handed-out views stay valid
            values[:, : self._kept - a] = self._values[:, a : self._kept]
            self._values = values
            self._near[: self._kept - a] = self._near[a : self._kept]
            self._k0, self._kept = k_start, self._kept - a
        k_new = self._k0 + self._kept
        if k_new < k_end:
            grid = np.arange(k_new, k_end) / self.spec.rate_hz
            x, near = self._interpolate(grid)
            self._values[:, self._kept : k_end - self._k0] = x
            self._near[self._kept : k_end - self._k0] = near
            self._kept += int(np.searchsorted(grid, self.final, side="right"))
        a = k_start - self._k0
        coverage = float(np.count_nonzero(self._near[a : a + n])) / n
        mark = Mark(self._epoch, k_start, k_end <= self._k0 + self._kept)
        if not mark.final:  # its last points may be recomputed in place: a copy
            return self._values[:, a : a + n].copy(), coverage, mark
        view = self._values[:, a : a + n]  # final points are never written again
        view.flags.writeable = False
        return view, coverage, mark

    def _interpolate(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Values [channels, len(grid)] at ``grid`` and whether a sample is within tol.

        This runs once per modality per window: it keeps to few numpy calls.
        """
        buf = self.buffer
        lo, hi = buf.index_at(grid[0]) - 1, buf.index_at(grid[-1]) + 1
        t, x = buf.read_index(lo, hi, copy=False)
        if len(t) and t[0] <= self.last_bad:  # NaN / Inf rows may be in range: skip them
            t, x = self._finite_neighbours(grid, lo, hi)
        if len(t) < 2:
            if not len(t):
                shape = (self.spec.channels, len(grid))
                return np.zeros(shape, np.float32), np.zeros(len(grid), bool)
            return np.repeat(x.T, len(grid), axis=1), np.abs(grid - t[0]) <= self.tol
        right = t.searchsorted(grid)
        inside = t[0] < grid[0] and t[-1] >= grid[-1]
        if not inside:  # grid points beyond the first or last sample: held
            right = right.clip(1, len(t) - 1)
        left = right - 1
        t_left, t_right = t.take(left), t.take(right)
        since = grid - t_left
        until = t_right - grid
        w = since / (t_right - t_left)
        if not inside:
            w = w.clip(0.0, 1.0)
            np.abs(since, out=since)
            np.abs(until, out=until)
        x_left = x.take(left, axis=0)
        out = x.take(right, axis=0)
        out -= x_left
        out *= w.astype(np.float32)[:, None]
        out += x_left
        return out.T, np.minimum(since, until) <= self.tol

    def _finite_neighbours(
        self, grid: np.ndarray, lo: int, hi: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The finite samples of [lo, hi), widened until they bracket ``grid`` where the
        buffer allows."""
        buf = self.buffer
        oldest = buf.count - len(buf)
        while True:
            t, x = buf.read_index(lo, hi)
            finite = np.isfinite(x).all(axis=1)
            t, x = t[finite], x[finite]
            left_ok = lo <= oldest or (len(t) > 0 and t[0] < grid[0])
            right_ok = hi >= buf.count or (len(t) > 0 and t[-1] >= grid[-1])
            if left_ok and right_ok:
                return t, x
            width = hi - lo
            lo, hi = (lo if left_ok else lo - width), (hi if right_ok else hi + width)


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
        stale_s: float | Mapping[str, float] = 0.5,
        lost_s: float = 5.0,
        min_coverage: float = 0.8,
        source_rates: Mapping[str, float] | None = None,
        gap_periods: float = 2.0,
        buffer_s: float | None = None,
        max_future_s: float = 1.0,
        connect_grace_s: float = 2.0,
        emit_empty: bool = False,
    ) -> None:
        if not modalities:
            raise ValueError("the windower needs at least one modality")
        self._params = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.subject = ""
        lengths = {m.name: m.window_s for m in modalities}
        if max(lengths.values()) - min(lengths.values()) > 1e-9:
            raise ValueError(f"modalities disagree on the window length: {lengths}")
        if hop_s <= 0 or lateness_s < 0 or not 0 < min_coverage <= 1:
            raise ValueError("need hop_s > 0, lateness_s >= 0 and 0 < min_coverage <= 1")
        self.modalities = list(modalities)
        self.window_s = modalities[0].window_s
        self.hop_s = hop_s
        self.lateness_s = lateness_s
        names = [m.name for m in modalities]
        stale = dict(stale_s) if isinstance(stale_s, Mapping) else dict.fromkeys(names, stale_s)
        unknown = sorted(set(stale) - set(names))
        if unknown:
            raise ValueError(f"stale_s for unknown sensors {unknown}")
        self.stale_s = {n: float(stale.get(n, 0.5)) for n in names}  # per sensor
        self.lost_s = lost_s
        self.min_coverage = min_coverage
        self.max_future_s = max_future_s
        self.connect_grace_s = connect_grace_s
        self.emit_empty = emit_empty
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
        self._resamplers = {
            m.name: _Resampler(m, self.buffers[m.name], self._tolerance[m.name], hop_s)
            for m in modalities
        }
        self._newest = -np.inf  # newest finite sample of any sensor
        self._silent_s = max(self.stale_s.values()) + lateness_s  # no sensor live: mark lag
        self._zeros = {m.name: np.zeros((m.channels, m.samples), np.float32) for m in modalities}
        for zeros in self._zeros.values():
            zeros.flags.writeable = False  # shared by every empty window
        self._receipt_ts: dict[str, list[float]] = {n: [] for n in self.buffers}
        self._receipt_at: dict[str, list[float]] = {n: [] for n in self.buffers}
        self._next_end: float | None = None
        self._seq = 0
        self.counters = WindowerCounters(
            masked=dict.fromkeys(self.buffers, 0),
            nan_samples=dict.fromkeys(self.buffers, 0),
            future_samples=dict.fromkeys(self.buffers, 0),
        )

    @classmethod
    def from_config(
        cls,
        modalities: Sequence[ModalitySpec],
        window: WindowConfig,
        source_rates: Mapping[str, float],
        stale_s: Mapping[str, float | None] | None = None,
        emit_empty: bool = False,
    ) -> Windower:
        """The windower a ``window:`` config section describes, for the pipeline and for
        cutting training windows offline alike (so both cut the same windows);
        ``stale_s`` overrides ``window.stale_s`` per modality."""
        stale = {m.name: (stale_s or {}).get(m.name) or window.stale_s for m in modalities}
        return cls(
            modalities,
            hop_s=window.hop_s,
            lateness_s=window.lateness_s,
            stale_s=stale,
            lost_s=window.lost_s,
            min_coverage=window.min_coverage,
            source_rates=source_rates,
            max_future_s=window.max_future_s,
            connect_grace_s=window.connect_grace_s,
            emit_empty=emit_empty,
        )

    def fresh(self, subject: str) -> Windower:
        """A new, empty windower with the same settings, for another subject's sensors."""
        windower = Windower(**self._params)
        windower.subject = subject
        return windower

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
        before = buffer.counters.written
        future = buffer.write(values, timestamps, until=arrival + self.max_future_s)
        if future:
            self.counters.future_samples[name] += future
        new = buffer.counters.written - before
        if not new:
            return
        resampler = self._resamplers[name]
        if np.isfinite(np.add.reduce(values, axis=None)):  # one pass; overflow -> exact check
            resampler.final = buffer.latest_time
        else:
            t, x = buffer.read_index(buffer.count - new, buffer.count)
            finite = np.isfinite(x).all(axis=1)
            if finite.all():
                resampler.final = buffer.latest_time
            else:  # NaN / Inf rows stay in the buffer, counted here, skipped by the resampler
                self.counters.nan_samples[name] += int(new - finite.sum())
                resampler.last_bad = float(t[~finite][-1])
                if finite.any():
                    resampler.final = max(resampler.final, float(t[finite][-1]))
        # Newest timestamp of each chunk and its host receipt time, for window latency.
        if len(self._receipt_ts[name]) > MAX_RECEIPTS:  # no window for long: keep the newest
            del (
                self._receipt_ts[name][: MAX_RECEIPTS // 2],
                self._receipt_at[name][: MAX_RECEIPTS // 2],
            )
        self._receipt_ts[name].append(buffer.latest_time)
        self._receipt_at[name].append(host_clock() if received is None else received)
        self._started = min(self._started, arrival)
        self._newest = max(self._newest, resampler.final)

    @property
    def newest(self) -> float:
        """The newest finite sample of any sensor (-inf: none yet)."""
        return self._newest

    def states(self, now: float) -> dict[str, StreamState]:
        """Each sensor's state at host time ``now``, from the age of its newest usable
        (finite) sample: a sensor sending only NaN is as good as silent."""
        out = {}
        for name, resampler in self._resamplers.items():
            age = now - resampler.final
            if resampler.final == -np.inf:
                out[name] = StreamState.CONNECTING
            elif age <= self.stale_s[name]:
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
        live = [self._resamplers[n].final for n, s in states.items() if s == StreamState.LIVE]
        if live:
            return min(live) - self.lateness_s
        if self._newest == -np.inf:
            return -np.inf  # nothing ever arrived: no grid yet
        return now - self._silent_s  # every sensor away: the clock moves the windows on

    def poll(self, now: float) -> list[Window]:
        """Every window whose end the watermark has passed, oldest first."""
        if (
            self._next_end is not None
            and self._newest - self.lateness_s < self._next_end - 1e-9
            and now - self._silent_s < self._next_end - 1e-9
        ):
            return []  # the usual case: no window can be due yet
        states = self.states(now)  # once per poll: this runs for every chunk
        return self._emit(self._watermark(now, states), states)

    def flush(self) -> list[Window]:
        """At the end of a stream: every window whose last grid point the newest sample of
        any sensor has reached (a window ``[t - W, t)`` needs no sample at ``t`` itself)."""
        newest = self._newest
        last_point = min(1.0 / m.rate_hz for m in self.modalities)
        return self._emit(newest + last_point - 1e-9, self.states(newest))

    def _emit(self, mark: float, states: dict[str, StreamState]) -> list[Window]:
        if mark == -np.inf:
            return []
        if self._next_end is None:
            # The first window is the first on the hop grid that fits after the oldest sample
            # of any sensor: it depends on the data, not on which chunk arrived first.
            first = min(b.oldest_time for b in self.buffers.values() if len(b))
            self._next_end = math.ceil((first + self.window_s) / self.hop_s) * self.hop_s
        out = []
        before = self._next_end
        self._skip_silence(mark, states, out)
        while self._next_end <= mark + 1e-9:
            window = self._build(self._next_end, states)
            self._next_end = round((self._next_end + self.hop_s) / self.hop_s) * self.hop_s
            if window is not None:
                out.append(window)
        if self._next_end != before:
            self._release()
        return out

    def _release(self) -> None:
        """Mark what no future window needs as consumed; forget old receipt times."""
        release = self._next_end - self.window_s - max(self._tolerance.values())
        for name, buffer in self.buffers.items():
            buffer.release(release)
            old = bisect.bisect_left(self._receipt_ts[name], release) - 1
            if old > 0:
                del self._receipt_ts[name][:old], self._receipt_at[name][:old]

    def _skip_silence(self, mark: float, states: dict[str, StreamState], out: list) -> None:
        """Jump over due grid ends whose windows hold no sample at all (after a long
        silence), counting them as empty instead of resampling each one; with
        ``emit_empty`` they go to ``out`` as empty windows (at most MAX_EMPTY_BURST)."""
        if mark - self._next_end < self.window_s:
            return  # the usual case, checked per chunk: at most a window's worth is due
        start = self._next_end - self.window_s - max(self._tolerance.values())
        first = min(b.first_time_at_or_after(start) for b in self.buffers.values())
        first_end = (math.floor(first / self.hop_s) + 1) * self.hop_s if first < np.inf else np.inf
        last_due = math.floor((mark + 1e-9) / self.hop_s) * self.hop_s
        skipped = round((min(first_end, last_due + self.hop_s) - self._next_end) / self.hop_s)
        if skipped > 0:
            self.counters.empty_windows += skipped
            if self.emit_empty:
                emitted = min(skipped, MAX_EMPTY_BURST)
                self.counters.unpublished_empty += skipped - emitted
                first = round(self._next_end / self.hop_s) + skipped - emitted
                for k in range(first, first + emitted):
                    out.append(self._empty(k * self.hop_s, states))
            self._next_end = round(self._next_end / self.hop_s + skipped) * self.hop_s

    def _empty(
        self, t_end: float, states: dict[str, StreamState], coverage: dict | None = None
    ) -> Window:
        """A window no sensor covered: every modality unavailable, shared zeros as data."""
        self._seq += 1
        names = list(self._zeros)
        return Window(
            self._seq,
            t_end,
            dict(self._zeros),
            dict.fromkeys(names, False),
            coverage or dict.fromkeys(names, 0.0),
            dict(states),
            -np.inf,  # no data completed it
            host_clock(),
            self.subject,
        )

    def _receipt_of(self, name: str, t_end: float) -> float:
        """Host receipt time of the data that completed the window ending at ``t_end``: the
        first chunk reaching ``t_end``, or the newest one when none does (end of stream)."""
        i = bisect.bisect_left(self._receipt_ts[name], t_end)
        return self._receipt_at[name][min(i, len(self._receipt_at[name]) - 1)]

    def _build(self, t_end: float, states: dict[str, StreamState]) -> Window | None:
        data, available, coverage, marks = {}, {}, {}, {}
        newest_arrival = -np.inf
        for m in self.modalities:
            x, cov, mark = self._resamplers[m.name].window(t_end)
            coverage[m.name] = cov
            available[m.name] = cov >= self.min_coverage
            data[m.name] = x if available[m.name] else np.zeros_like(x)
            marks[m.name] = mark if available[m.name] else None
            if available[m.name]:
                newest_arrival = max(newest_arrival, self._receipt_of(m.name, t_end))
        if not any(available.values()):
            self.counters.empty_windows += 1
            return self._empty(t_end, states, coverage) if self.emit_empty else None
        for name, used in available.items():  # masked: in windows that are emitted
            if not used:
                self.counters.masked[name] += 1
        self._seq += 1
        self.counters.windows += 1
        return Window(
            self._seq,
            t_end,
            data,
            available,
            coverage,
            dict(states),
            newest_arrival,
            host_clock(),
            self.subject,
            marks,
        )
