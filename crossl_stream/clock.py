"""The one host time base, and device clocks mapped onto it.

Every sample carries a host timestamp once it leaves its reader, and every latency stamp is
taken on the same clock: ``time.monotonic()``, which on Linux is CLOCK_MONOTONIC, the clock
liblsl's ``local_clock()`` reads, so LSL timestamps and host stamps compare directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np


def host_clock() -> float:
    """Seconds on the host's monotonic clock (the LSL clock on Linux).

    >>> a = host_clock(); b = host_clock(); b >= a
    True
    """
    return time.monotonic()


@dataclass
class ClockCounters:
    """What a device clock mapping had to reject or restart."""

    pairs: int = 0
    outliers: int = 0  # messages whose stamp did not fit the current mapping
    refits: int = 0  # mapping started again after a run of outliers (a clock that jumped)


class DeviceClock:
    """Owns the mapping of one device's clock onto the host clock: offset + drift.

    Each message gives a pair (device time of its newest sample, host receipt time); receipt =
    device time + offset + a transport delay that is never negative and often small. The fit
    follows the lower envelope: the least-delayed pair of each ``bin_s`` of device time, and a
    least-squares line through those minima over the last ``window_s`` (drift once the pairs
    span ``min_span_s``). A pair stamped more than ``max_error_s`` after its receipt, or more
    than ``max_late_s`` before it, is an outlier, counted and not used (a late delivery after
    a network stall is not: its samples keep their device times); ``refit_after`` outliers
    in a row mean the device clock jumped (a reset, or a switch of epoch), and the mapping
    starts again from the new pairs.

    >>> clock = DeviceClock()
    >>> for k in range(50):  # a device 1000 s behind, delays of 2 ms and more
    ...     _ = clock.observe(k * 0.1, 1000.0 + k * 0.1 + 0.002 + (k % 3) * 0.01)
    >>> round(float(clock.map(np.array([10.0]))[0]), 3)
    1010.002
    """

    def __init__(
        self,
        window_s: float = 60.0,
        bin_s: float = 1.0,
        min_span_s: float = 10.0,
        max_error_s: float = 0.5,
        refit_after: int = 5,
        max_late_s: float = 10.0,
    ) -> None:
        self.window_s = window_s
        self.bin_s = bin_s
        self.min_span_s = min_span_s
        self.max_error_s = max_error_s
        self.max_late_s = max_late_s
        self.refit_after = refit_after
        self.counters = ClockCounters()
        self._bins: dict[int, tuple[float, float]] = {}  # bin -> (device t, receipt - device)
        self._offset = np.nan  # at device time _ref
        self._drift = 0.0
        self._ref = 0.0
        self._misfits = 0

    @property
    def ready(self) -> bool:
        """Whether a mapping exists (after the first pair)."""
        return not np.isnan(self._offset)

    def fits(self, device_t: float, received: float) -> bool:
        """Whether the pair agrees with the mapping: stamped no more than ``max_error_s``
        after its receipt, nor more than ``max_late_s`` before it (late deliveries after a
        network stall fit; a clock that jumped does not)."""
        if not self.ready:
            return True
        delay = received - float(self.map(np.array([device_t]))[0])
        return -self.max_error_s <= delay <= self.max_late_s

    def observe(self, device_t: float, received: float) -> bool:
        """Add one (device time, host receipt) pair; False when it was an outlier."""
        if not (np.isfinite(device_t) and np.isfinite(received)):
            self.counters.outliers += 1
            return False
        if self.ready and not self.fits(device_t, received):
            self.counters.outliers += 1
            self._misfits += 1
            if self._misfits < self.refit_after:
                return False
            self.counters.refits += 1  # the device clock jumped: start again
            self._bins.clear()
        self._misfits = 0
        self.counters.pairs += 1
        key = int(device_t // self.bin_s)
        lag = received - device_t
        if key not in self._bins or lag < self._bins[key][1]:
            self._bins[key] = (device_t, lag)
        newest = max(self._bins)
        for old in [k for k in self._bins if k < newest - self.window_s / self.bin_s]:
            del self._bins[old]
        self._fit()
        return True

    def map(self, device_t: np.ndarray) -> np.ndarray:
        """Device times -> host times."""
        return device_t + self._offset + self._drift * (device_t - self._ref)

    def _fit(self) -> None:
        t = np.array([p[0] for p in self._bins.values()])
        lag = np.array([p[1] for p in self._bins.values()])
        self._ref = float(t.max())
        if len(t) >= 3 and t.max() - t.min() >= self.min_span_s:
            drift, offset = np.polyfit(t - self._ref, lag, 1)
            # the line through the minima; shifted down onto the lowest of them
            offset += min(0.0, float(np.min(lag - (offset + drift * (t - self._ref)))))
            self._offset, self._drift = float(offset), float(drift)
        else:
            self._offset, self._drift = float(lag.min()), 0.0
