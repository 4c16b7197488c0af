"""MQTT reader: device payloads from a broker (aiomqtt), mapped onto the host clock.

Each sensor has a topic; ``+`` / ``#`` wildcards in it stand for subjects, so one reader
serves many wearables (``wearables/+/acc``: the subject is what ``+`` matched) and each
subject gets windows of its own. Device timestamps go through an offset + drift fit per
(subject, sensor) (``DeviceClock``); sequence gaps, duplicates (a QoS 1 redelivery) and
malformed payloads are counted and logged with their topic, and never stop the reader. The
connection is retried with exponential backoff and the topics subscribed again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from crossl_stream.broker import Broker
from crossl_stream.clock import DeviceClock, host_clock
from crossl_stream.readers.base import Chunk, Reader, SensorInfo
from crossl_stream.readers.payload import Format, PayloadError, decode

log = logging.getLogger(__name__)
REORDER = 64  # a sequence number this far back (and on the device's clock) is a duplicate


@dataclass(frozen=True)
class MqttTopic:
    """One sensor's topic (wildcards allowed), payload format and clock."""

    topic: str
    format: Format = "json"
    receipt_clock: bool = False  # stamp samples on arrival instead of by the device clock


@dataclass
class MqttCounters:
    """What the reader received, refused and survived."""

    messages: int = 0
    malformed: dict[str, int] = field(default_factory=dict)  # by reason
    unrouted: int = 0
    seq_gaps: int = 0  # messages missing between two received ones
    duplicates: int = 0
    restarts: int = 0  # a sequence that went far back: the device started again
    connects: int = 0
    subjects: set[str] = field(default_factory=set)


def match(pattern: str, topic: str) -> list[str] | None:
    """What the wildcards of ``pattern`` matched in ``topic`` (None: no match).

    >>> match("wearables/+/acc", "wearables/s07/acc")
    ['s07']
    >>> match("lab/#", "lab/a/b"), match("lab/+", "lab/a/b")
    (['a/b'], None)
    """
    p, t = pattern.split("/"), topic.split("/")
    captured = []
    for i, level in enumerate(p):
        if level == "#":
            captured.append("/".join(t[i:]))
            return captured
        if i >= len(t):
            return None
        if level == "+":
            captured.append(t[i])
        elif level != t[i]:
            return None
    return captured if len(p) == len(t) else None


class MqttReader(Reader):
    """Owns the broker subscription of a set of sensors and the clock fit of each device."""

    def __init__(
        self,
        broker: Broker,
        sensors: Mapping[str, tuple[SensorInfo, MqttTopic]],
        qos: int = 1,
        backoff_s: tuple[float, float] = (0.2, 10.0),
        clock_kwargs: Mapping[str, float] | None = None,
    ) -> None:
        self.broker = broker
        self.sensors = {name: info for name, (info, _) in sensors.items()}
        self.topics = {name: topic for name, (_, topic) in sensors.items()}
        self.qos = qos
        self.backoff_s = backoff_s
        self.counters = MqttCounters()
        self._clock_kwargs = dict(clock_kwargs or {})
        self._clocks: dict[tuple[str, str], DeviceClock] = {}
        self._seq: dict[tuple[str, str], int] = {}

    async def chunks(self) -> AsyncIterator[Chunk]:
        import aiomqtt

        delay = self.backoff_s[0]
        while True:
            try:
                async with self.broker.client() as client:
                    for topic in {t.topic for t in self.topics.values()}:
                        await client.subscribe(topic, qos=self.qos)
                    self.counters.connects += 1
                    log.info(
                        "MQTT %s:%d: subscribed to %s",
                        self.broker.host,
                        self.broker.port,
                        sorted({t.topic for t in self.topics.values()}),
                    )
                    delay = self.backoff_s[0]
                    async for message in client.messages:
                        try:
                            chunk = self.to_chunk(str(message.topic), bytes(message.payload))
                        except Exception as exc:  # a case the checks missed: count, go on
                            self._refuse("error", str(message.topic), repr(exc))
                            continue
                        if chunk is not None:
                            yield chunk
            except aiomqtt.MqttError as exc:
                log.warning(
                    "MQTT %s:%d: %s; retrying in %.1f s",
                    self.broker.host,
                    self.broker.port,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_s[1])

    def to_chunk(self, topic: str, data: bytes, received: float | None = None) -> Chunk | None:
        """One message -> a chunk on the host clock, or None (counted and logged)."""
        received = host_clock() if received is None else received
        self.counters.messages += 1
        routed = self._route(topic)
        if routed is None:
            self.counters.unrouted += 1
            return None
        sensor, spec, captured = routed
        info = self.sensors[sensor]
        subject = "/".join(captured)
        try:
            payload = decode(data, spec.format, info.channels)
            times = payload.device_times(info.rate_hz)
            if times is None and not spec.receipt_clock:
                raise PayloadError("timestamp", "no t0 or ts, and the sensor's clock is device")
        except PayloadError as exc:
            self._refuse(exc.reason, topic, str(exc))
            return None
        key = (subject, sensor)
        if "" in captured:
            self._refuse("topic", topic, "an empty level where the topic names the subject")
            return None
        last = self._seq.get(key) if payload.seq is not None else None
        if last is not None and payload.seq <= last:
            clock = self._clocks.get(key)
            fits = times is None or clock is None or clock.fits(float(times[-1]), received)
            if last - payload.seq <= REORDER and fits:
                self.counters.duplicates += 1  # a redelivery, or a late message
                return None
            # far back: the device restarted (its sequence and its clock begin again)
            self.counters.restarts += 1
            log.warning(
                "MQTT %s: sequence went back from %d to %d: device restart",
                topic,
                last,
                payload.seq,
            )
            self._clocks.pop(key, None)
            last = None
        n = len(payload.values)
        if spec.receipt_clock:
            stamps = received - np.arange(n - 1, -1, -1, dtype=np.float64) / info.rate_hz
        else:
            clock = self._clocks.get(key)
            if clock is None:
                clock = self._clocks[key] = DeviceClock(**self._clock_kwargs)
            if not clock.observe(float(times[-1]), received):
                self._refuse("clock", topic, f"device time {times[-1]:.3f} does not fit the clock")
                return None
            stamps = clock.map(times)
        if payload.seq is not None:  # only an accepted message moves the sequence on
            if last is not None and payload.seq > last + 1:
                self.counters.seq_gaps += payload.seq - last - 1
            self._seq[key] = payload.seq
        if subject not in self.counters.subjects:
            self.counters.subjects.add(subject)
        return Chunk(sensor, payload.values, stamps, received, received, subject)

    def forget(self, subject: str) -> None:
        """Drop what is kept about a subject (clock fits, sequence numbers)."""
        for key in [k for k in self._clocks if k[0] == subject]:
            del self._clocks[key]
        for key in [k for k in self._seq if k[0] == subject]:
            del self._seq[key]

    def report(self) -> str:
        """One line for a summary."""
        c = self.counters
        return (
            f"mqtt: {c.messages} messages from {len(c.subjects)} subjects, malformed "
            f"{c.malformed or 'none'}, sequence gaps {c.seq_gaps}, duplicates {c.duplicates}, "
            f"device restarts {c.restarts}, connections {c.connects}"
        )

    def _route(self, topic: str) -> tuple[str, MqttTopic, list[str]] | None:
        for sensor, spec in self.topics.items():
            captured = match(spec.topic, topic)
            if captured is not None:
                return sensor, spec, captured
        return None

    def _refuse(self, reason: str, topic: str, detail: str) -> None:
        count = self.counters.malformed.get(reason, 0) + 1
        self.counters.malformed[reason] = count
        if count <= 10 or count % 100 == 0:  # every one counted; the log is rate-limited
            log.warning("MQTT %s: payload refused (%s), %d so far", topic, detail, count)
