"""Signals routed into the running event loop, harmless once it has ended.

asyncio's ``add_signal_handler`` puts the default handlers back when the loop closes, so a
second Ctrl-C or SIGTERM that lands while the process is printing its summary or exiting
turns a clean exit into 130 / 143. These handlers stay installed: they call back into the
loop while it runs and do nothing after.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable


def on_signals(signals: Iterable[signal.Signals], callback: Callable[[], object]) -> None:
    """Call ``callback`` on the running loop whenever one of ``signals`` arrives."""
    loop = asyncio.get_running_loop()

    def handler(signum, frame) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the run is over
            loop.call_soon_threadsafe(callback)

    for sig in signals:
        signal.signal(sig, handler)
