"""MQTT publisher: prediction records to a per-subject topic, a retained status, a last will.

Store and forward: ``send`` never waits for the broker and never fails because of it. Each
record waits in a bounded queue in memory, or in a spool on disk when ``spool`` names a
folder (``crossl_stream.publishers.spool``), and a task delivers them in order, one at a
time (QoS 1: the next after the broker's PUBACK, so a broker lost mid-way gets at most the
one in flight twice). ``counters.sent`` counts PUBACKs; ``counters.dropped`` what a full
queue or spool dropped, the oldest first, and what a stop left undelivered in memory.

The connection is retried with exponential backoff and jitter. On every (re)connect the
client registers its last will (a retained ``offline`` on ``status_topic``) and publishes a
retained ``online``; it also reads its own status topic, and if it reads ``offline`` while it
is connected (the will of a connection the broker found dead after this one began, a value
a persistent broker kept) it publishes ``online`` again. Reading also notices a lost
connection at once, even with nothing to send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path

from crossl_stream.broker import Backoff, Broker, Link, session
from crossl_stream.clock import host_clock
from crossl_stream.errors import ConfigError
from crossl_stream.inference import Prediction
from crossl_stream.publishers.base import Publisher
from crossl_stream.publishers.spool import MemoryQueue, Spool

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 10.0  # a PUBACK that does not come by then: the connection is dead


class MqttPublisher(Publisher):
    """Owns a broker connection and the records waiting for it.

    Each record goes to ``topic`` with ``{subject}`` filled in (``default`` for a pipeline
    of one subject). ``status_topic`` holds a retained ``{"state": "online", ...}`` while the
    pipeline runs; the broker's last will sets it ``offline`` if the pipeline dies, and a
    clean stop sets it ``offline`` itself.
    """

    deferred = True

    def __init__(
        self,
        broker: Broker,
        model_id: str,
        topic: str = "crossl/{subject}/predictions",
        status_topic: str = "crossl/status",
        qos: int = 1,
        queue_size: int = 10000,
        spool: Path | None = None,
        spool_max_bytes: int = 64 << 20,
        backoff_s: tuple[float, float] = (0.2, 30.0),
        log_every_s: float = 30.0,
    ) -> None:
        super().__init__()
        broker.ssl_context()  # a CA file that is not PEM: BrokerError now, not at each retry
        try:
            topic.format(subject="s")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                f"publisher mqtt: topic {topic!r}: only {{subject}} may be filled in ({exc!r})"
            ) from None
        self.broker = broker
        self.model_id = model_id
        self.topic = topic
        self.status_topic = status_topic
        self.qos = qos
        self.queue_size = queue_size
        self.backoff_s = backoff_s
        self.store: MemoryQueue | Spool = (
            Spool(Path(spool), spool_max_bytes) if spool is not None else MemoryQueue(queue_size)
        )
        self.link = Link(broker, "MQTT publisher", log, log_every_s)
        self.republished = 0  # times a stray offline status was answered with online
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._closing = False
        self._drain_until = float("inf")  # monotonic: stop delivering, say offline, go
        self._closed = False

    def _status(self, state: str) -> bytes:
        return json.dumps(
            {"state": state, "model": self.model_id, "since": time.time()}, separators=(",", ":")
        ).encode()

    async def start(self) -> None:
        """Start delivering; records a spool kept from an earlier run count as given."""
        if self._task is None:
            self.counters.given += len(self.store)  # so that sent never exceeds given
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="mqtt-publisher")

    def send(self, prediction: Prediction) -> None:
        """Queue the record (never waits; a full queue drops its oldest, counted)."""
        if self._closed:
            self.counters.dropped += 1
            return
        topic = self.topic.format(subject=prediction.subject or "default")
        record = json.dumps(prediction.record(), separators=(",", ":")).encode()
        self.store.put(topic, record)  # OSError (a spool's disk): a fault, counted by publish
        self.counters.dropped = self.store.dropped
        if self._wake is not None:
            self._wake.set()

    @property
    def pending(self) -> int:
        """Records waiting for the broker."""
        return len(self.store)

    def health(self) -> dict[str, object]:
        """``state`` of the connection (connected, connecting, refused, unreachable, lost,
        error, closed), ``why`` not connected, ``pending`` records, and the counters."""
        out = super().health()
        out.pop("state", None)
        link = self.link.health()
        state = "closed" if self._closed else link["state"]
        return {"state": state, "why": link["why"], "pending": self.pending, **out}

    def close(self) -> None:
        """Release the queue or spool of a publisher that never started (a pipeline whose
        build failed); a started one stops with ``aclose``."""
        if self._task is None and not self._closed:
            self._closed = True
            self.store.close()
            self.counters.dropped = self.store.dropped

    async def aclose(self, timeout: float | None = None) -> None:
        """Deliver what can be within ``timeout`` s (default 5), publish ``offline`` if
        connected, stop. What is left is dropped (memory, counted) or stays in the spool."""
        if self._closed:
            return
        timeout = 5.0 if timeout is None else max(0.0, timeout)
        began = time.monotonic()
        hard = began + timeout
        # keep a little of the time for the offline status and the disconnect
        self._drain_until = hard - min(0.25, timeout / 4)
        self._closing = True
        task = self._task
        if task is not None:
            self._wake.set()
            await asyncio.wait({task}, timeout=max(0.0, hard - time.monotonic()))
            if not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.1)
            if task.done() and not task.cancelled() and task.exception() is not None:
                self.fault(task.exception())  # a bug: said, never a traceback at shutdown
        self._closed = True
        left = len(self.store)
        where = self.store.describe()
        self.store.close()
        self.counters.dropped = self.store.dropped
        if left and isinstance(self.store, Spool):
            log.warning(
                "MQTT publisher: %d records not delivered to %s; they stay in %s and are sent "
                "at the next start",
                left,
                self.broker.address,
                where,
            )
        elif left:
            log.warning(
                "MQTT publisher: %d records not delivered to %s within %.1f s; dropped",
                left,
                self.broker.address,
                timeout,
            )

    # -- the delivery task --------------------------------------------------------------

    async def _run(self) -> None:
        import aiomqtt

        backoff = Backoff(*self.backoff_s)
        will = aiomqtt.Will(self.status_topic, self._status("offline"), qos=1, retain=True)
        while True:
            if self._closing and (not self.store.peek() or time.monotonic() >= self._drain_until):
                return
            try:
                client = self.broker.client(will=will, timeout=CALL_TIMEOUT_S)
                await self._session(client)  # returns once closed cleanly, or raises
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # MqttError, TLS, BrokerError...: say why, retry, never die
                delay = backoff.after(exc, self.link.stable)
                if self._closing:
                    delay = min(delay, max(0.0, self._drain_until - time.monotonic()))
                self._failing(self.link.down(exc, delay))  # logged there, once per cause
            await self._pause(delay)

    async def _session(self, client) -> None:
        """One connection: online, then records until closing, then offline; a lost
        connection raises."""
        async with session(client):
            await client.publish(self.status_topic, self._status("online"), 1, True)
            await client.subscribe(self.status_topic, qos=1)
            self.link.up()
            self.failing_since = None
            self.last_error = None
            watch = asyncio.create_task(self._watch(client))
            deliver = asyncio.create_task(self._deliver(client))
            try:
                done, _ = await asyncio.wait({watch, deliver}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (watch, deliver):
                    t.cancel()
                await asyncio.gather(watch, deliver, return_exceptions=True)
            if deliver in done and deliver.exception() is None:  # closing: all sent, or time
                remaining = max(0.05, self._drain_until + 0.2 - time.monotonic())
                await client.publish(
                    self.status_topic, self._status("offline"), 1, True, timeout=remaining
                )
                self.link.state, self.link.why = "closed", None
                return
            (task,) = done if len(done) == 1 else (deliver,)
            raise task.exception() or RuntimeError("MQTT delivery stopped")

    async def _deliver(self, client) -> None:
        """Records in order, each once the broker acknowledged the one before."""
        while True:
            item = self.store.peek()
            if item is None:
                if self._closing:
                    return
                self._wake.clear()
                if self.store.peek() is None:
                    await self._wake.wait()
                continue
            if self._closing and time.monotonic() >= self._drain_until:
                return
            timeout = CALL_TIMEOUT_S
            if self._closing:
                timeout = max(0.05, self._drain_until - time.monotonic())
            try:
                await client.publish(item[0], item[1], qos=self.qos, timeout=timeout)
            except Exception:
                if self._closing and time.monotonic() >= self._drain_until:
                    return  # out of time, not of connection: offline still goes out
                raise
            self.store.ack()
            self.counters.sent += 1

    async def _watch(self, client) -> None:
        """Read the own status topic: a disconnect ends this at once (MqttError); an
        ``offline`` read while connected is answered with ``online``."""
        async for message in client.messages:
            if str(message.topic) != self.status_topic or self._closing:
                continue
            try:
                state = json.loads(bytes(message.payload)).get("state")
            except (ValueError, AttributeError):
                state = None
            if state == "offline":
                self.republished += 1
                log.info(
                    "MQTT publisher: %s read offline while connected (a stale last will); "
                    "online again",
                    self.status_topic,
                )
                await client.publish(self.status_topic, self._status("online"), 1, True)

    def _failing(self, text: str) -> None:
        """Health shows the broker away (the daemon counts how long); not a log line."""
        self.last_error = text
        if self.failing_since is None:
            self.failing_since = host_clock()

    async def _pause(self, delay: float) -> None:
        """Wait ``delay`` s before the next attempt; a stop cuts it short."""
        deadline = time.monotonic() + delay
        while not self._closing:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
        remaining = min(deadline, self._drain_until) - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)
