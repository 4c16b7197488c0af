"""Play a recording as device payloads over MQTT: one topic per stream, own rate and clock."""

from __future__ import annotations

from crossl_stream.broker import Broker
from crossl_stream.readers.payload import Format, encode_binary, encode_json
from crossl_stream.readers.replay import Recording, Replay


class MqttPlayer:
    """Owns a replay of a recording and publishes each chunk as a device would.

    Topics follow ``topic`` (``{subject}`` and ``{stream}`` filled in); payloads carry a
    sequence number per stream and device timestamps on the device's own clock, which starts
    at ``device_epoch`` when the recording starts (a device clock unrelated to the host's).
    It plays in real time only, as a device does: played k times faster, its clock would run
    k times faster than the host's, and the reader's clock fit would squeeze its samples
    k times closer together.
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
    ) -> None:
        self.recording = recording
        self.broker = broker
        self.names = sorted(recording.streams)
        self.replay = Replay(recording, self.names, 1.0, chunk_s=chunk_s, section=section)
        self.topic = topic
        self.subject = subject
        self.encode = encode_binary if fmt == "binary" else encode_json
        self.qos = qos
        self.device_offset = device_epoch - recording.start
        self.published = dict.fromkeys(self.names, 0)  # samples
        self.messages = dict.fromkeys(self.names, 0)  # also each stream's next seq

    async def play(self) -> dict[str, int]:
        """Play once (sequence numbers from 0, as a device that starts); return the samples
        published per stream."""
        self.messages = dict.fromkeys(self.names, 0)
        async with self.broker.client() as client:
            async for chunk in self.replay.chunks():
                seq = self.messages[chunk.sensor]
                t0 = float(chunk.timestamps[0]) + self.device_offset
                topic = self.topic.format(subject=self.subject, stream=chunk.sensor)
                await client.publish(topic, self.encode(seq, t0, chunk.values), qos=self.qos)
                self.messages[chunk.sensor] = seq + 1
                self.published[chunk.sensor] += len(chunk.values)
        return self.published
