"""The one host time base.

Every sample carries a host timestamp once it leaves its reader, and every latency stamp is
taken on the same clock: ``time.monotonic()``, which on Linux is CLOCK_MONOTONIC, the clock
liblsl's ``local_clock()`` reads, so LSL timestamps and host stamps compare directly.
"""

from __future__ import annotations

import time


def host_clock() -> float:
    """Seconds on the host's monotonic clock (the LSL clock on Linux).

    >>> a = host_clock(); b = host_clock(); b >= a
    True
    """
    return time.monotonic()
