"""States that readers, the windower and the health endpoint share."""

from __future__ import annotations

from enum import Enum


class StreamState(str, Enum):
    """Where a sensor stands, judged from the age of its newest sample."""

    CONNECTING = "connecting"  # no usable sample yet
    LIVE = "live"
    STALE = "stale"  # silent for longer than stale_s: out of the watermark
    LOST = "lost"  # silent for longer than lost_s
