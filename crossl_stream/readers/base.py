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
    """Owns its sources (streams, files, a broker connection) and yields their chunks.

    The whole contract, for every kind of source::

        async with reader:                  # opens what it needs (default: nothing)
            async for chunk in reader.chunks():
                ...

    ``live`` readers (LSL, MQTT) stamp samples on the host clock; recorded ones (replay,
    simulator) play at ``speed`` times real time, or on a virtual clock as fast as possible
    (``speed`` None). ``health`` says where each source stands, ``stats`` what was counted
    (for metrics), ``report`` the same in one line for a summary.
    """

    sensors: dict[str, SensorInfo]
    live: bool = True
    speed: float | None = 1.0

    async def __aenter__(self):
        await self.open()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Acquire what ``chunks`` needs before the first one."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release it; called once the chunks are no longer read."""

    @abstractmethod
    def chunks(self) -> AsyncIterator[Chunk]:
        """Chunks in arrival order, until the source ends or the task is cancelled."""

    def now(self) -> float | None:
        """The current time on the clock that drives the windows (the host clock for live
        sources), or None when that clock only moves with the data (a virtual clock)."""
        return host_clock()

    def to_host(self, t: float) -> float | None:
        """Host-clock time of ``t`` on the window clock (None: a virtual clock)."""
        return t

    def forget(self, subject: str) -> None:  # noqa: B027 - optional hook
        """Drop what is kept about a subject that left (clock fits, sequence numbers)."""

    def describe(self) -> str:
        """What plays, at what pace: one line."""
        pace = "live" if self.live else _pace(self.speed)
        return f"{type(self).__name__.lower()} ({', '.join(self.sensors)}) {pace}"

    def health(self) -> dict[str, dict[str, object]]:
        """Per source: its state and why (default: nothing beyond the windower's view)."""
        return {}

    def stats(self) -> dict[str, int | dict[str, int]]:
        """Counters for metrics (name -> count, or -> {label: count}); keys fixed per kind."""
        return {}

    def report(self) -> str:
        """One line for a summary ('' when there is nothing to say)."""
        return ""


def _pace(speed: float | None) -> str:
    return "as fast as possible" if speed is None else f"at {speed:g}x real time"
