"""Simulator: synthetic EEG-, EMG- and IMU-like streams with jitter and dropouts."""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from crossl_stream.clock import host_clock
from crossl_stream.readers.base import Chunk, Reader, SensorInfo

Kind = Literal["eeg", "emg", "imu"]


@dataclass(frozen=True)
class SimulatedSensor:
    """One synthetic sensor: its signal kind, rate, chunking, timing faults and dropouts."""

    name: str
    channels: int
    rate_hz: float
    kind: Kind = "imu"
    chunk_s: float = 0.02
    jitter_s: float = 0.0  # uniform jitter on each chunk's delivery
    dropouts: tuple[tuple[float, float], ...] = field(default=())  # (start_s, length_s)


def _signal(kind: Kind, t: np.ndarray, channels: int, rng: np.random.Generator) -> np.ndarray:
    phase = np.arange(channels) * 0.7
    if kind == "eeg":  # 10 Hz alpha over noise, tens of microvolts
        x = 20 * np.sin(2 * math.pi * 10 * t[:, None] + phase) + rng.normal(
            0, 8, (len(t), channels)
        )
    elif kind == "emg":  # noise bursts gated at 0.5 Hz
        gate = 0.2 + (np.sin(2 * math.pi * 0.5 * t) > 0)
        x = rng.normal(0, 50, (len(t), channels)) * gate[:, None]
    else:  # gravity on one axis plus slow movement
        x = 0.3 * np.sin(2 * math.pi * 1.2 * t[:, None] + phase) + rng.normal(
            0, 0.02, (len(t), channels)
        )
        x[:, 0] += 1.0
    return x.astype(np.float32)


class Simulator(Reader):
    """Owns a set of simulated sensors and plays them for ``duration_s``.

    ``speed=None`` runs on a virtual clock as fast as possible; a number plays at that
    multiple of real time. Either way the stream clock starts at ``start``, so the same
    seed gives the same chunks at any speed.

    >>> sim = Simulator([SimulatedSensor("imu", 3, 50.0, chunk_s=0.1)], duration_s=1.0)
    >>> chunks = asyncio.run(sim.collect())
    >>> len(chunks), chunks[0].values.shape
    (10, (5, 3))
    """

    def __init__(
        self,
        sensors: Sequence[SimulatedSensor],
        duration_s: float,
        speed: float | None = None,
        seed: int = 0,
        start: float = 1000.0,
    ) -> None:
        self.specs = list(sensors)
        self.sensors = {s.name: SensorInfo(s.name, s.channels, s.rate_hz) for s in sensors}
        self.duration_s = duration_s
        self.speed = speed
        self.seed = seed
        self.start = start
        self._wall0: float | None = None

    def _schedule(self) -> Iterator[tuple[float, int, np.ndarray]]:
        """Every chunk as (delivery time, sensor index, sample times), in delivery order,
        made as it is needed: a simulation of days holds no schedule in memory. A sensor's
        chunks arrive in order (jitter delays a chunk, never reorders them)."""
        streams = [self._sensor_schedule(i, s) for i, s in enumerate(self.specs)]
        return heapq.merge(*streams, key=lambda e: (e[0], e[1]))

    def _sensor_schedule(
        self, index: int, s: SimulatedSensor
    ) -> Iterator[tuple[float, int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, index])
        period = 1.0 / s.rate_hz
        per_chunk = max(1, round(s.chunk_s * s.rate_hz))
        n = math.ceil(self.duration_s / period)  # as many samples as np.arange would give
        block = max(64 * per_chunk, 4096)
        pending = np.empty(0)
        delivered = -np.inf
        for k in range(0, n, block):
            t = np.arange(k, min(n, k + block)) * period
            for a, length in s.dropouts:
                t = t[(t < a) | (t >= a + length)]
            t = np.concatenate([pending, t])
            full = len(t) if k + block >= n else len(t) // per_chunk * per_chunk
            for i in range(0, full, per_chunk):
                times = t[i : i + per_chunk]
                delivery = times[-1] + period + rng.uniform(0, s.jitter_s)
                delivered = max(delivered, delivery)
                yield delivered, index, times
            pending = t[full:]

    live = False

    def now(self) -> float | None:
        """The simulated clock while paced; None at max speed or before playing."""
        if self.speed is None or self._wall0 is None:
            return None
        return self.start + (host_clock() - self._wall0) * self.speed

    def to_host(self, t: float) -> float | None:
        if self.speed is None or self._wall0 is None:
            return None
        return self._wall0 + (t - self.start) / self.speed

    async def chunks(self) -> AsyncIterator[Chunk]:
        rng = np.random.default_rng(self.seed + 1)
        self._wall0 = wall0 = host_clock()
        for i, (delivery, index, times) in enumerate(self._schedule()):
            s = self.specs[index]
            if self.speed is not None:
                delay = wall0 + delivery / self.speed - host_clock()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif i % 256 == 0:
                await asyncio.sleep(0)  # as fast as possible, but let the consumers batch
            values = _signal(s.kind, times, s.channels, rng)
            yield Chunk(s.name, values, self.start + times, self.start + delivery, host_clock())

    async def collect(self) -> list[Chunk]:
        """All chunks as a list (for tests and offline use)."""
        return [c async for c in self.chunks()]
