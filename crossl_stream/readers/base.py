"""The reader protocol: one async iterator of chunks, already on the host time base."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np

from crossl_stream.clock import host_clock


@dataclass(frozen=True)
class SensorInfo:
    """What a reader promises about one sensor stream."""

    name: str
    channels: int
    rate_hz: float


@dataclass
class Chunk:
    """Samples of one sensor: values [n, channels] float32 and timestamps [n] on the stream
    clock that drives the windows (the host clock live, a virtual one in replay); ``arrival``
    is when the chunk arrived on that clock, ``received`` the host clock then (for latency)."""

    sensor: str
    values: np.ndarray
    timestamps: np.ndarray
    arrival: float
    received: float
    subject: str = ""  # whose sensor, when one reader serves several people (MQTT wildcards)


class Reader(ABC):
    """Owns its sources (streams, files, a broker connection) and yields their chunks."""

    sensors: dict[str, SensorInfo]

    @abstractmethod
    def chunks(self) -> AsyncIterator[Chunk]:
        """Chunks in arrival order, until the source ends or the task is cancelled."""

    def now(self) -> float | None:
        """The current time on the clock that drives the windows (the host clock for live
        sources), or None when that clock only moves with the data (a virtual clock)."""
        return host_clock()
