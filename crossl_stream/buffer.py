"""RingBuffer: one sensor's recent samples, preallocated, written in place, read by time."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossl_stream.errors import InputError


@dataclass
class BufferCounters:
    """What a buffer had to refuse or lose, for logs and metrics."""

    written: int = 0
    out_of_order: int = 0  # timestamp not after the previous one (late, duplicate, NaN, Inf)
    overwritten: int = 0  # evicted by newer samples before the consumer released them


class RingBuffer:
    """Owns one sensor's last ``capacity`` samples ([capacity, channels] float32) and their
    host timestamps (float64, strictly increasing).

    Writes copy a chunk in at most two slices; reads return only the requested time range.
    Samples whose timestamp does not advance are refused and counted, never reordered.

    >>> buf = RingBuffer(channels=2, capacity=4)
    >>> buf.write(np.arange(12, dtype=np.float32).reshape(6, 2), np.arange(6.0))
    0
    >>> t, x = buf.read(3.0, 10.0)
    >>> t.tolist(), x[:, 0].tolist(), buf.counters.overwritten
    ([3.0, 4.0, 5.0], [6.0, 8.0, 10.0], 2)
    """

    def __init__(self, channels: int, capacity: int, name: str = "") -> None:
        if channels <= 0 or capacity <= 0:
            raise ValueError(
                f"ring buffer needs channels > 0 and capacity > 0, got {channels}, {capacity}"
            )
        self.name = name or "buffer"
        self.channels = channels
        self.capacity = capacity
        self._values = np.zeros((capacity, channels), dtype=np.float32)
        self._times = np.zeros(capacity, dtype=np.float64)
        self._count = 0  # samples ever stored; the newest is at (count - 1) % capacity
        self._released = -np.inf
        self._latest = -np.inf
        self._held = 0  # samples held: min(count, capacity)
        self.counters = BufferCounters()

    def __len__(self) -> int:
        return self._held

    @property
    def latest_time(self) -> float:
        """Timestamp of the newest sample (-inf when empty)."""
        return self._latest

    @property
    def oldest_time(self) -> float:
        """Timestamp of the oldest sample still held (-inf when empty)."""
        if not self._count:
            return -np.inf
        return float(self._times[(self._count - self._held) % self.capacity])

    @property
    def count(self) -> int:
        """Samples ever stored: the logical index one past the newest."""
        return self._count

    def write(self, values: np.ndarray, timestamps: np.ndarray, until: float = np.inf) -> int:
        """Append a chunk ([n, channels], [n]); refuse samples whose time does not advance.

        Samples stamped after ``until`` are refused too (a clock that jumped ahead); their
        number is returned, for the caller to count, and they are not counted here.
        """
        values = np.asarray(values)
        timestamps = np.asarray(timestamps, dtype=np.float64)
        if values.ndim != 2 or values.shape[1] != self.channels:
            raise InputError(
                f"{self.name}: chunk of shape {list(values.shape)}, expected "
                f"[samples, {self.channels}]"
            )
        if timestamps.shape != (values.shape[0],):
            raise InputError(
                f"{self.name}: {timestamps.size} timestamps for {values.shape[0]} samples"
            )
        n = len(timestamps)
        if n == 0:
            return 0
        future = 0
        # Fast path (almost every chunk): increasing, after the newest, finite, not ahead.
        last = timestamps[-1]
        ordered = timestamps[0] > self._latest and last <= until and last != np.inf
        if not (ordered and (n == 1 or (timestamps[1:] > timestamps[:-1]).all())):
            ahead = timestamps > until
            future = int(ahead.sum())
            # A sample is kept when its time exceeds every earlier one (held or in the chunk).
            finite = np.isfinite(timestamps) & ~ahead
            floor = np.where(finite, timestamps, -np.inf)
            previous = np.maximum.accumulate(np.concatenate(([self._latest], floor[:-1])))
            keep = finite & (timestamps > previous)
            self.counters.out_of_order += int(n - future - keep.sum())
            values, timestamps = values[keep], timestamps[keep]
            n = len(timestamps)
            if n == 0:
                return future
        if n > self.capacity:
            self._count_evicted(timestamps[: n - self.capacity])
            values, timestamps = values[-self.capacity :], timestamps[-self.capacity :]
            n = self.capacity
        evict = self._held + n - self.capacity
        if evict > 0:
            oldest = self._count - self._held
            newest_evicted = self._times[(oldest + evict - 1) % self.capacity]
            if newest_evicted >= self._released:  # else every evicted sample was consumed
                self._count_evicted(self._gather(self._times, oldest, oldest + evict))
        head = self._count % self.capacity
        first = min(n, self.capacity - head)
        self._values[head : head + first] = values[:first]
        self._times[head : head + first] = timestamps[:first]
        if first < n:
            self._values[: n - first] = values[first:]
            self._times[: n - first] = timestamps[first:]
        self._count += n
        self._held = min(self._count, self.capacity)
        self._latest = float(timestamps[-1])
        self.counters.written += n
        return future

    def first_time_at_or_after(self, t: float) -> float:
        """Timestamp of the oldest held sample at or after ``t`` (inf when there is none)."""
        i = self._first_index_at_or_after(t)
        return float(self._times[i % self.capacity]) if i < self._count else np.inf

    def release(self, before: float) -> None:
        """Mark samples older than ``before`` as consumed: evicting them is no loss."""
        self._released = max(self._released, before)

    def read(self, start: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (timestamps, values) with ``start <= t < end``, oldest first."""
        return self.read_index(self.index_at(start), self.index_at(end))

    def read_index(self, lo: int, hi: int, copy: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(timestamps, values) of logical samples [lo, hi), clipped to those held.

        With ``copy=False`` they may be views into the buffer, valid until the next write.
        """
        lo, hi = max(lo, self._count - self._held), min(hi, self._count)
        if hi <= lo:
            return np.empty(0), np.empty((0, self.channels), dtype=np.float32)
        return self._gather(self._times, lo, hi, copy), self._gather(self._values, lo, hi, copy)

    def index_at(self, t: float) -> int:
        """Logical index of the oldest held sample at or after ``t`` (``count`` when none)."""
        return self._first_index_at_or_after(t)

    # -- internals: logical index i is the i-th sample ever stored ------------------------

    def _count_evicted(self, times: np.ndarray) -> None:
        self.counters.overwritten += int(np.count_nonzero(times >= self._released))

    def _gather(self, array: np.ndarray, lo: int, hi: int, copy: bool = True) -> np.ndarray:
        """Logical samples [lo, hi) of ``array`` (at most two slices): a copy, or a view
        when ``copy`` is false and they lie in one slice."""
        a, b = lo % self.capacity, (hi - 1) % self.capacity + 1
        if a < b:
            return array[a:b].copy() if copy else array[a:b]
        return np.concatenate((array[a:], array[:b]))

    def _first_index_at_or_after(self, t: float) -> int:
        """Smallest logical index whose time is >= t (the end index when none is)."""
        n = self._held
        oldest = self._count - n
        p0 = oldest % self.capacity
        len1 = min(n, self.capacity - p0)  # [p0, p0 + len1) then [0, n - len1)
        i = int(self._times[p0 : p0 + len1].searchsorted(t))
        if i < len1:
            return oldest + i
        return oldest + len1 + int(self._times[: n - len1].searchsorted(t))
