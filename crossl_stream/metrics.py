"""Running counts and latency histograms of one pipeline: what the end-of-run summary, the
health endpoint and Prometheus all read. Nothing here grows with the number of predictions:
counters are integers, latencies go into fixed buckets.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# Latency bucket upper bounds (ms): 0.1 ms to 60 s, 48 per decade (about 5% apart), so a
# quantile read back from the buckets is within a few % of the true one. Prometheus gets
# every EXPORT_EVERY-th bound (12 per decade): fewer series, the same counts at those bounds.
BUCKETS_MS = tuple(float(f"{b:.4g}") for b in 0.1 * 10 ** (np.arange(0, 278) / 48))
EXPORT_EVERY = 4
STAGES = ("window", "queue", "infer", "total", "age")
"""window: data received -> window cut; queue: cut -> inference started; infer: the forward
pass; total: data received -> published; age: window end (host clock) -> published."""


class Histogram:
    """Owns fixed buckets of observations: counts, sum and the largest value seen.

    >>> h = Histogram()
    >>> for v in (1.0, 2.0, 3.0, 100.0):
    ...     h.observe(v)
    >>> h.count, round(h.quantile(0.5), 1), h.max
    (4, 2.1, 100.0)
    """

    def __init__(self, bounds: tuple[float, ...] = BUCKETS_MS) -> None:
        self.bounds = bounds
        self._edges = np.asarray(bounds)
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # the last: beyond bounds
        self.sum = 0.0
        self.count = 0
        self.max = -math.inf

    def observe(self, value: float) -> None:
        """Count ``value`` in its bucket (a non-finite value is ignored)."""
        if not math.isfinite(value):
            return
        self.counts[int(self._edges.searchsorted(value))] += 1
        self.sum += value
        self.count += 1
        if value > self.max:
            self.max = value

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, interpolated within its bucket (nan when empty)."""
        if not self.count:
            return math.nan
        rank = q * self.count
        cum = np.cumsum(self.counts)
        i = int(cum.searchsorted(rank, side="left"))
        if i >= len(self.bounds):
            return self.max
        lo = self.bounds[i - 1] if i else 0.0
        below = cum[i - 1] if i else 0
        inside = self.counts[i]
        frac = (rank - below) / inside if inside else 1.0
        return float(min(lo + frac * (self.bounds[i] - lo), self.max))

    def cumulative(self, every: int = 1) -> Iterator[tuple[float, int]]:
        """(upper bound, observations at or below it) at every ``every``-th bound, ending
        with (inf, count)."""
        total = 0
        last = len(self.bounds)
        for i, (bound, n) in enumerate(zip((*self.bounds, math.inf), self.counts, strict=True)):
            total += int(n)
            if i == last or i % every == 0:
                yield bound, total


@dataclass
class Counts:
    """The pipeline's counters. Keys of the dicts are few and fixed by config (sensors,
    reasons, sensor states), never subjects or payload content."""

    chunks: int = 0
    samples: dict[str, int] = field(default_factory=dict)  # by sensor
    refused_chunks: dict[str, int] = field(default_factory=dict)  # by reason
    windows: int = 0  # window positions cut: predicted, empty or dropped
    empty_windows: int = 0  # no sensor usable: published as such, not predicted
    masked: dict[str, int] = field(default_factory=dict)  # "sensor:state" -> predicted windows
    empty: dict[str, int] = field(default_factory=dict)  # "sensor:state" -> empty windows
    dropped_windows: int = 0  # dropped by the drop_oldest backpressure policy
    predictions: int = 0
    published: int = 0  # records handed to the publishers (predictions and empty windows)


class Metrics:
    """Owns the counters and latency histograms of one pipeline, and the time of its last
    published record (host clock)."""

    def __init__(self) -> None:
        self.counts = Counts()
        self.latency = {stage: Histogram() for stage in STAGES}
        self.last_published: float | None = None
        self.started: float | None = None

    def add(self, table: dict[str, int], key: str, n: int = 1) -> None:
        """``table[key] += n`` for one of the dicts of ``counts``."""
        table[key] = table.get(key, 0) + n

    def observe(self, latency_ms: dict[str, float]) -> None:
        """Add one record's per-stage latencies (ms) to their histograms."""
        for stage, value in latency_ms.items():
            hist = self.latency.get(stage)
            if hist is not None:
                hist.observe(value)

    def percentiles(self, stage: str, qs: tuple[float, ...] = (0.5, 0.99)) -> list[float]:
        """Quantiles of one stage's latency (ms), read from its buckets."""
        return [self.latency[stage].quantile(q) for q in qs]
