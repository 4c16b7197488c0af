"""Play a recording as device payloads over MQTT: one topic per stream, own rate and clock.

A device does not stop when its broker goes away, and neither does the player: it keeps
its real-time pace, says once why it cannot publish, retries the broker with backoff in the
background, and counts the samples it could not send (``unsent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from crossl_stream.broker import Backoff, Broker, Link, session
from crossl_stream.readers.payload import Format, encode_binary, encode_json
from crossl_stream.readers.replay import Recording, Replay

log = logging.getLogger(__name__)


class MqttPlayer:
    """Owns a replay of a recording and publishes each chunk as a device would.

    Topics follow ``topic`` (``{subject}`` and ``{stream}`` filled in); payloads carry a
    sequence number per stream and device timestamps on the device's own clock, which starts
    at ``device_epoch`` when the recording starts (a device clock unrelated to the host's).
    It plays in real time only, as a device does: played k times faster, its clock would run
    k times faster than the host's, and the reader's clock fit would squeeze its samples
    k times closer together. Sequence numbers count the messages made, sent or not (a
    reader sees what the broker lost as a gap).
    """

    def __init__(
        self,
        recording: Recording,
        broker: Broker,
        chunk_s: float = 0.04,
        topic: str = "wearables/{subject}/{stream}",
        subject: str = "s01",
        fmt: Format = "binary",
        qos: int = 0,
        device_epoch: float = 50_000.0,
        section: tuple[float, float] | None = None,
        backoff_s: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        broker.ssl_context()  # BrokerError (a config error) now, not mid-play
        self.recording = recording
        self.broker = broker
        self.names = sorted(recording.streams)
        self.replay = Replay(recording, self.names, 1.0, chunk_s=chunk_s, section=section)
        self.topic = topic
        self.subject = subject
        self.encode = encode_binary if fmt == "binary" else encode_json
        self.qos = qos
        self.backoff_s = backoff_s
        self.device_offset = device_epoch - recording.start
        self.published = dict.fromkeys(self.names, 0)  # samples
        self.unsent = dict.fromkeys(self.names, 0)  # samples not published: no broker
        self.messages = dict.fromkeys(self.names, 0)  # also each stream's next seq
        self.link = Link(broker, "MQTT player", log, every_s=30.0)
        self._client = None  # connected, or None
        self._publishing: asyncio.Task | None = None  # the task awaiting a publish, if any
        self._given_up = False  # _give_up cancelled that publish

    @property
    def lost(self) -> int:
        """Samples that could not be published (all streams)."""
        return sum(self.unsent.values())

    async def play(self) -> dict[str, int]:
        """Play once (sequence numbers from 0, as a device that starts); return the samples
        published per stream (``unsent``: those that were not; the caller says how many)."""
        self.messages = dict.fromkeys(self.names, 0)
        lost, tried = asyncio.Event(), asyncio.Event()
        keeper = asyncio.create_task(self._keep_connected(lost, tried))
        try:
            with contextlib.suppress(asyncio.TimeoutError):  # the first attempt, then play
                await asyncio.wait_for(tried.wait(), 10.0)
            async for chunk in self.replay.chunks():
                seq = self.messages[chunk.sensor]
                self.messages[chunk.sensor] = seq + 1
                client = self._client
                if client is None:
                    self.unsent[chunk.sensor] += len(chunk.values)
                    continue
                t0 = float(chunk.timestamps[0]) + self.device_offset
                topic = self.topic.format(subject=self.subject, stream=chunk.sensor)
                try:
                    await self._publish(client, topic, self.encode(seq, t0, chunk.values))
                except Exception as exc:  # the broker went away: count, go on at pace
                    self.unsent[chunk.sensor] += len(chunk.values)
                    log.debug("MQTT player: publish failed: %r", exc)
                    if self._client is client:
                        self._client = None
                        lost.set()
                    continue
                self.published[chunk.sensor] += len(chunk.values)
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            self._client = None
        return self.published

    async def _publish(self, client, topic: str, payload: bytes) -> None:
        """``client.publish`` in this task (a task of its own would start it a loop turn
        later, after aiomqtt may have closed the socket), ended by ``_give_up`` with
        ConnectionError."""
        task = asyncio.current_task()
        self._publishing = task
        try:
            await client.publish(topic, payload, qos=self.qos)
        except asyncio.CancelledError:
            if not self._given_up:
                raise  # cancelled from outside: the play ends
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancel is handled here
                task.uncancel()
            raise ConnectionError("publish given up: the connection ended") from None
        finally:
            self._publishing, self._given_up = None, False

    def _give_up(self) -> None:
        """End the publish under way now: its connection ended. aiomqtt leaves a publish
        on a lost connection waiting for a confirmation that never comes (10 s by
        default), and a broker that dies between two turns of the event loop would hold
        the device's pace that long. At QoS 1 and 2 a message given up on may still have
        reached the broker."""
        if self._publishing is not None and not self._given_up:
            self._given_up = True
            self._publishing.cancel()

    async def _keep_connected(self, lost: asyncio.Event, tried: asyncio.Event) -> None:
        """Hold a connection for ``play``; retry with backoff while there is none
        (``tried``: set once the first attempt is over, either way)."""
        backoff = Backoff(*self.backoff_s)
        while True:
            try:
                client = self.broker.client()
                async with session(client):
                    self._client = client
                    tried.set()
                    self.link.up()
                    lost.clear()
                    # a publish that fails says the connection is gone; so does the reading
                    watch = asyncio.create_task(_drain(client))
                    waiter = asyncio.create_task(lost.wait())
                    try:
                        await asyncio.wait({watch, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        self._client = None
                        self._give_up()
                        watch.cancel()
                        waiter.cancel()
                        await asyncio.gather(watch, waiter, return_exceptions=True)
                    exc = watch.exception() if watch.done() and not watch.cancelled() else None
                    raise exc or ConnectionError("Disconnected: a publish failed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._client = None
                delay = backoff.after(exc, self.link.stable)
                self.link.down(exc, delay)
                tried.set()
                await asyncio.sleep(delay)


async def _drain(client) -> None:
    """Iterate a client's messages (none are subscribed): ends with MqttError on a lost
    connection."""
    async for _ in client.messages:
        pass
