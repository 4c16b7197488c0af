"""MQTT publisher: prediction records to a per-subject topic, a retained status, a last will."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

from crossl_stream.broker import Broker
from crossl_stream.inference import Prediction
from crossl_stream.publishers.base import Publisher

log = logging.getLogger(__name__)
_STOP = ("", b"")  # queued by aclose: publish the offline status and disconnect


class MqttPublisher(Publisher):
    """Owns a broker connection and a bounded queue of records waiting for it.

    Each record goes to ``topic`` with ``{subject}`` filled in (``default`` for a pipeline
    of one subject). ``status_topic`` holds a retained ``{"state": "online", ...}`` while the
    pipeline runs; the broker's last will sets it ``offline`` if the pipeline dies, and a
    clean stop sets it ``offline`` itself. While the broker is away the queue holds up to
    ``queue_size`` records (the oldest dropped, counted) and the connection is retried.
    """

    def __init__(
        self,
        broker: Broker,
        model_id: str,
        topic: str = "crossl/{subject}/predictions",
        status_topic: str = "crossl/status",
        qos: int = 1,
        queue_size: int = 1024,
        backoff_s: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        super().__init__()
        self.broker = broker
        self.model_id = model_id
        self.topic = topic
        self.status_topic = status_topic
        self.qos = qos
        self.backoff_s = backoff_s
        self.queue: asyncio.Queue[tuple[str, bytes]] | None = None
        self.queue_size = queue_size
        self.sent = 0
        self.dropped = 0
        self._task: asyncio.Task | None = None

    def _status(self, state: str) -> bytes:
        return json.dumps(
            {"state": state, "model": self.model_id, "since": time.time()}, separators=(",", ":")
        ).encode()

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    def send(self, prediction: Prediction) -> None:
        if self.queue is None:
            raise RuntimeError("MqttPublisher.start() was not awaited")
        if self.queue.qsize() >= self.queue_size:
            self.queue.get_nowait()
            self.dropped += 1
        topic = self.topic.format(subject=prediction.subject or "default")
        record = json.dumps(prediction.record(), separators=(",", ":")).encode()
        self.queue.put_nowait((topic, record))

    async def aclose(self) -> None:
        if self.queue is None or self._task is None:
            return
        self.queue.put_nowait(_STOP)  # after what is queued
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 10.0)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            log.warning("MQTT: %d records not delivered at shutdown", self.queue.qsize())
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        import aiomqtt

        will = aiomqtt.Will(self.status_topic, self._status("offline"), qos=1, retain=True)
        delay = self.backoff_s[0]
        pending: tuple[str, bytes] | None = None  # taken from the queue, not yet delivered
        while True:
            try:
                async with self.broker.client(will=will) as client:
                    await client.publish(self.status_topic, self._status("online"), 1, True)
                    delay = self.backoff_s[0]
                    while True:
                        item = pending if pending is not None else await self.queue.get()
                        pending = item
                        if item is _STOP:
                            await client.publish(
                                self.status_topic, self._status("offline"), 1, True
                            )
                            return
                        await client.publish(item[0], item[1], qos=self.qos)
                        pending = None
                        self.sent += 1
            except Exception as exc:  # MqttError, or TLS / socket errors: retry, never die
                log.warning("MQTT publisher: %r; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_s[1])
