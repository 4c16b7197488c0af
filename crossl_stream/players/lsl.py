"""Play a recording as live LSL outlets: one per stream, its own rate, name and channels."""

from __future__ import annotations

import logging

from crossl_stream.clock import host_clock
from crossl_stream.readers.replay import Recording, Replay

log = logging.getLogger(__name__)


class LslPlayer:
    """Owns one LSL outlet per numeric stream of a recording and one for its markers.

    Samples keep their recorded spacing (jitter, gaps) and are stamped on this host's LSL
    clock: recording time + (the host time the playback started - the recording's start).
    It plays in real time only: a faster play would have to stamp samples closer together
    than their rate says (or stamp them in the future), and a model fed that would see
    another signal.
    """

    def __init__(
        self,
        recording: Recording,
        chunk_s: float = 0.02,
        source_prefix: str = "crossl-play",
        streams: list[str] | None = None,
        section: tuple[float, float] | None = None,
    ) -> None:
        import pylsl

        self.recording = recording
        self.names = streams or sorted(recording.streams)
        self.replay = Replay(recording, self.names, 1.0, chunk_s=chunk_s, section=section)
        self.outlets = {}
        for name in self.names:
            _, values, rate = recording.streams[name]
            info = pylsl.StreamInfo(
                name, name, values.shape[1], rate, pylsl.cf_float32, f"{source_prefix}-{name}"
            )
            self.outlets[name] = pylsl.StreamOutlet(info)
        markers = pylsl.StreamInfo(
            "markers",
            "Markers",
            1,
            pylsl.IRREGULAR_RATE,
            pylsl.cf_string,
            f"{source_prefix}-markers",
        )
        self.marker_outlet = pylsl.StreamOutlet(markers)
        self.pushed = dict.fromkeys(self.names, 0)

    async def play(self) -> dict[str, int]:
        """Play once, in real time; return the samples pushed per stream."""
        offset = None
        markers = list(self.recording.markers)
        m = 0
        async for chunk in self.replay.chunks():
            if offset is None:
                offset = host_clock() - chunk.arrival  # recording clock -> LSL clock
            while m < len(markers) and markers[m][0] <= chunk.arrival:
                t, text = markers[m]
                self.marker_outlet.push_sample([text], float(t + offset))
                m += 1
            stamps = chunk.timestamps + offset  # the recorded spacing, jitter and all
            self.outlets[chunk.sensor].push_chunk(chunk.values, stamps.tolist())
            self.pushed[chunk.sensor] += len(chunk.values)
        return self.pushed
