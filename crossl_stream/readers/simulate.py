"""Simulator: synthetic EEG-, EMG- and IMU-like streams with jitter and dropouts."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Sequence
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

    def _schedule(self) -> list[tuple[float, SimulatedSensor, np.ndarray]]:
        """Every chunk as (delivery time, sensor, sample times), in delivery order."""
        rng = np.random.default_rng(self.seed)
        events = []
        for s in self.specs:
            t = np.arange(0.0, self.duration_s, 1.0 / s.rate_hz)
            for a, length in s.dropouts:
                t = t[(t < a) | (t >= a + length)]
            per_chunk = max(1, round(s.chunk_s * s.rate_hz))
            for i in range(0, len(t), per_chunk):
                times = t[i : i + per_chunk]
                delivery = times[-1] + 1.0 / s.rate_hz + rng.uniform(0, s.jitter_s)
                events.append((delivery, s, times))
        events.sort(key=lambda e: e[0])
        return events

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
        for i, (delivery, s, times) in enumerate(self._schedule()):
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
