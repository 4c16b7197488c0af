"""MQTT reader: device payloads from a broker (aiomqtt), mapped onto the host clock.

Each sensor has a topic; ``+`` / ``#`` wildcards in it stand for subjects, so one reader
serves many wearables (``wearables/+/acc``: the subject is what ``+`` matched) and each
subject gets windows of its own. Device timestamps go through an offset + drift fit per
(subject, sensor) (``DeviceClock``); sequence gaps, duplicates (a QoS 1 redelivery) and
malformed payloads are counted and logged with their topic, and never stop the reader. The
connection is retried with exponential backoff and jitter and the topics subscribed again; a
broker that refuses the login or a certificate that is not trusted is said once, in one
line, and in ``health``.

A wildcard topic lets anyone who may publish name a subject: with an ``Admission``, nothing
is kept about a subject (clock fit, sequence number) before it is admitted, and what a
refused subject sends is dropped (the admission counts it). Nothing is kept per message:
counters only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from crossl_stream.admission import Admission
from crossl_stream.broker import Backoff, Broker, Link, session
from crossl_stream.clock import DeviceClock, host_clock
from crossl_stream.logs import RateLimited
from crossl_stream.readers.base import Chunk, Reader, SensorInfo
from crossl_stream.readers.payload import Format, PayloadError, decode

log = logging.getLogger(__name__)
REORDER = 64  # a sequence number this far back (and on the device's clock) is a duplicate
MAX_GAP_MESSAGES = 1_000_000  # a forward jump beyond this (or 10 min of samples) is a jump,
MAX_GAP_S = 600.0  # not that many lost messages: counted as seq_jumps, not seq_gaps


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
    seq_jumps: int = 0  # a sequence that leapt too far forward to be lost messages
    duplicates: int = 0
    restarts: int = 0  # a sequence that went far back: the device started again
    connects: int = 0
    subjects: int = 0  # subjects admitted and seen (each time one comes back after forget)
    dropped: int = 0  # messages received faster than they were read: the oldest dropped


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
    """Owns the broker subscription of a set of sensors and the clock fit of each device.

    ``admission``: who may have state here (None: anyone). ``max_queued``: messages received
    and not yet read that are held (beyond: the oldest dropped, counted).
    """

    def __init__(
        self,
        broker: Broker,
        sensors: Mapping[str, tuple[SensorInfo, MqttTopic]],
        qos: int = 1,
        admission: Admission | None = None,
        backoff_s: tuple[float, float] = (0.2, 30.0),
        clock_kwargs: Mapping[str, float] | None = None,
        max_queued: int = 10_000,
        log_every_s: float = 30.0,
    ) -> None:
        broker.ssl_context()  # a CA file that is not PEM: BrokerError now, not at each retry
        self.broker = broker
        self.sensors = {name: info for name, (info, _) in sensors.items()}
        self.topics = {name: topic for name, (_, topic) in sensors.items()}
        self.qos = qos
        self.admission = admission
        self.backoff_s = backoff_s
        self.max_queued = max_queued
        self.counters = MqttCounters()
        self.link = Link(broker, "MQTT reader", log, log_every_s)
        self._clock_kwargs = dict(clock_kwargs or {})
        self._clocks: dict[tuple[str, str], DeviceClock] = {}
        self._seq: dict[tuple[str, str], int] = {}
        self._known: set[str] = set()  # subjects with state here (admitted ones only)
        self._limited = RateLimited(log, log_every_s)

    async def chunks(self) -> AsyncIterator[Chunk]:
        backoff = Backoff(*self.backoff_s)
        filters = sorted({t.topic for t in self.topics.values()})
        while True:
            try:
                client = self.broker.client(queue_type=_bounded(self.max_queued, self._overflow))
                async with session(client):
                    for topic in filters:
                        granted = await client.subscribe(topic, qos=self.qos)
                        if any(getattr(g, "value", g) >= 0x80 for g in granted):
                            self._limited.error(
                                f"suback:{topic}",
                                "MQTT reader: broker %s refused the subscription to %s (check "
                                "the broker's ACL for broker.username)",
                                self.broker.address,
                                topic,
                            )
                    self.counters.connects += 1
                    self.link.up()
                    log.info("MQTT reader: subscribed to %s", filters)
                    async for message in client.messages:
                        try:
                            chunk = self.to_chunk(str(message.topic), bytes(message.payload))
                        except Exception as exc:  # a case the checks missed: count, go on
                            self._refuse("error", str(message.topic), repr(exc))
                            continue
                        if chunk is not None:
                            yield chunk
            except Exception as exc:  # MqttError, TLS, BrokerError...: say why, retry, never die
                delay = backoff.after(exc, self.link.stable)
                self.link.down(exc, delay)
                await asyncio.sleep(delay)

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
        if "" in captured:
            self._refuse("topic", topic, "an empty level where the topic names the subject")
            return None
        if self.admission is not None and not self.admission.admit(subject):
            return None  # nothing kept about it; the admission counted the refusal
        key = (subject, sensor)
        last = self._seq.get(key) if payload.seq is not None else None
        if last is not None and payload.seq <= last:
            clock = self._clocks.get(key)
            fits = times is None or clock is None or clock.fits(float(times[-1]), received)
            if last - payload.seq <= REORDER and fits:
                self.counters.duplicates += 1  # a redelivery, or a late message
                return None
            # far back: the device restarted (its sequence and its clock begin again)
            self.counters.restarts += 1
            self._limited.warning(
                f"restart:{subject}",
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
                gap = payload.seq - last - 1
                if gap > MAX_GAP_MESSAGES or gap * n > MAX_GAP_S * info.rate_hz:
                    self.counters.seq_jumps += 1  # not lost messages: a counter that leapt
                else:
                    self.counters.seq_gaps += gap
            self._seq[key] = payload.seq
        if subject not in self._known:
            self._known.add(subject)
            self.counters.subjects += 1
        return Chunk(sensor, payload.values, stamps, received, received, subject)

    def forget(self, subject: str) -> None:
        """Drop what is kept about a subject (clock fits, sequence numbers)."""
        for key in [k for k in self._clocks if k[0] == subject]:
            del self._clocks[key]
        for key in [k for k in self._seq if k[0] == subject]:
            del self._seq[key]
        self._known.discard(subject)

    def health(self) -> dict[str, dict[str, object]]:
        """``broker``: connected, connecting, or why not (refused: a login, a certificate;
        unreachable, lost, ...)."""
        return {"broker": self.link.health()}

    def stats(self) -> dict[str, int | dict[str, int]]:
        """Counters for metrics."""
        c = self.counters
        return {
            "messages": c.messages,
            "malformed": dict(c.malformed),
            "unrouted": c.unrouted,
            "seq_gaps": c.seq_gaps,
            "seq_jumps": c.seq_jumps,
            "duplicates": c.duplicates,
            "restarts": c.restarts,
            "connects": c.connects,
            "subjects": c.subjects,
            "dropped": c.dropped,
        }

    def report(self) -> str:
        """One line for a summary."""
        c = self.counters
        refused = self.admission.refused if self.admission is not None else {}
        return (
            f"mqtt: {c.messages} messages from {c.subjects} subjects, malformed "
            f"{c.malformed or 'none'}, subjects refused {refused or 'none'}, sequence gaps "
            f"{c.seq_gaps} (jumps {c.seq_jumps}), duplicates {c.duplicates}, device restarts "
            f"{c.restarts}, dropped {c.dropped}, connections {c.connects}"
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
        # every one counted; the log says it once per interval and reason, with a count
        self._limited.warning(
            f"refused:{reason}", "MQTT %s: payload refused (%s), %d so far", topic, detail, count
        )

    def _overflow(self) -> None:
        self.counters.dropped += 1
        self._limited.warning(
            "overflow",
            "MQTT reader: messages arrive faster than they are read; the oldest dropped "
            "(%d so far)",
            self.counters.dropped,
        )


def _bounded(limit: int, on_drop: Callable[[], None]):
    """A factory of aiomqtt message queues that hold ``limit`` messages and, when full, drop
    the oldest and say so through ``on_drop`` (aiomqtt would log each one it discards)."""

    class Bounded(asyncio.Queue):
        def put_nowait(self, item) -> None:
            if self.qsize() >= limit:
                self.get_nowait()
                on_drop()
            super().put_nowait(item)

    def make(maxsize: int = 0) -> asyncio.Queue:
        return Bounded()  # unbounded for asyncio; bounded by put_nowait above

    return make
