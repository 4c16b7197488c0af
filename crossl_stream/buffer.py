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
        self.counters = BufferCounters()

    def __len__(self) -> int:
        return min(self._count, self.capacity)

    @property
    def latest_time(self) -> float:
        """Timestamp of the newest sample (-inf when empty)."""
        return float(self._times[(self._count - 1) % self.capacity]) if self._count else -np.inf

    @property
    def oldest_time(self) -> float:
        """Timestamp of the oldest sample still held (-inf when empty)."""
        if not self._count:
            return -np.inf
        return float(self._times[(self._count - len(self)) % self.capacity])

    def write(self, values: np.ndarray, timestamps: np.ndarray) -> None:
        """Append a chunk ([n, channels], [n]); refuse samples whose time does not advance."""
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
            return
        # A sample is kept when its time exceeds every earlier one (in the buffer or the chunk).
        finite = np.isfinite(timestamps)
        floor = np.where(finite, timestamps, -np.inf)
        previous = np.maximum.accumulate(np.concatenate(([self.latest_time], floor[:-1])))
        keep = finite & (timestamps > previous)
        if not keep.all():
            self.counters.out_of_order += int(n - keep.sum())
            values, timestamps = values[keep], timestamps[keep]
            n = len(timestamps)
            if n == 0:
                return
        if n > self.capacity:
            self._count_evicted(timestamps[: n - self.capacity])
            values, timestamps = values[-self.capacity :], timestamps[-self.capacity :]
            n = self.capacity
        evict = len(self) + n - self.capacity
        if evict > 0:
            oldest = self._count - len(self)
            self._count_evicted(self._gather(self._times, oldest, oldest + evict))
        head = self._count % self.capacity
        first = min(n, self.capacity - head)
        self._values[head : head + first] = values[:first]
        self._times[head : head + first] = timestamps[:first]
        if first < n:
            self._values[: n - first] = values[first:]
            self._times[: n - first] = timestamps[first:]
        self._count += n
        self.counters.written += n

    def first_time_at_or_after(self, t: float) -> float:
        """Timestamp of the oldest held sample at or after ``t`` (inf when there is none)."""
        i = self._first_index_at_or_after(t)
        return float(self._times[i % self.capacity]) if i < self._count else np.inf

    def release(self, before: float) -> None:
        """Mark samples older than ``before`` as consumed: evicting them is no loss."""
        self._released = max(self._released, before)

    def read(self, start: float, end: float) -> tuple[np.ndarray, np.ndarray]:
        """Copies of (timestamps, values) with ``start <= t < end``, oldest first."""
        lo = self._first_index_at_or_after(start)
        hi = self._first_index_at_or_after(end)
        if hi <= lo:
            return np.empty(0), np.empty((0, self.channels), dtype=np.float32)
        return self._gather(self._times, lo, hi), self._gather(self._values, lo, hi)

    # -- internals: logical index i is the i-th sample ever stored ------------------------

    def _count_evicted(self, times: np.ndarray) -> None:
        self.counters.overwritten += int(np.count_nonzero(times >= self._released))

    def _gather(self, array: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """A copy of logical samples [lo, hi) of ``array`` (at most two slices)."""
        a, b = lo % self.capacity, (hi - 1) % self.capacity + 1
        if a < b:
            return array[a:b].copy()
        return np.concatenate((array[a:], array[:b]))

    def _first_index_at_or_after(self, t: float) -> int:
        """Smallest logical index whose time is >= t (the end index when none is)."""
        n = len(self)
        oldest = self._count - n
        p0 = oldest % self.capacity
        len1 = min(n, self.capacity - p0)  # [p0, p0 + len1) then [0, n - len1)
        i = int(np.searchsorted(self._times[p0 : p0 + len1], t))
        if i < len1:
            return oldest + i
        return oldest + len1 + int(np.searchsorted(self._times[: n - len1], t))
