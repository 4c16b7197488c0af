"""The publisher protocol: one destination for prediction records."""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

from crossl_stream.clock import host_clock
from crossl_stream.inference import Prediction
from crossl_stream.logs import RateLimited

log = logging.getLogger(__name__)


@dataclass
class PublisherCounters:
    """What one publisher was given, delivered, failed to deliver and dropped."""

    given: int = 0
    sent: int = 0
    failed: int = 0  # a delivery that raised (a full disk, a closed outlet)
    dropped: int = 0  # dropped undelivered (a full store-and-forward queue, shutdown)


class Publisher(ABC):
    """Owns one destination for predictions.

    The whole contract::

        async with publisher:          # start(): connect; aclose(): flush and release
            publisher.publish(prediction)

    ``publish`` stamps the total latency, then ``send``s; a ``send`` that raises is a fault:
    counted, logged once per ``log_every_s`` with a count, and remembered in ``health``
    (the pipeline goes on with the other publishers). Publishers that deliver later (MQTT)
    set ``deferred`` and count ``sent`` and ``dropped`` themselves.
    """

    deferred = False
    log_every_s = 10.0

    def __init__(self) -> None:
        # a short name for logs and metrics: jsonl, mqtt, ... (the pipeline numbers repeats)
        self.name = type(self).__name__.removesuffix("Publisher").lower()
        self.counters = PublisherCounters()
        self.failing_since: float | None = None  # host clock of the first failure in a row
        self.last_error: str | None = None
        self._limited = RateLimited(log, self.log_every_s)

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def log_every(self, seconds: float) -> None:
        """Log a repeating failure at most once per ``seconds``."""
        self.log_every_s = seconds
        self._limited.every_s = seconds

    def publish(self, prediction: Prediction) -> bool:
        """Stamp ``latency_ms.total`` (receipt of the window's data -> now) and send;
        False (counted, logged at a limited rate) when the destination failed."""
        counters = self.counters
        if prediction.t_last_arrival > -math.inf:  # a window no data completed has no total
            prediction.latency_ms["total"] = 1000 * (host_clock() - prediction.t_last_arrival)
        counters.given += 1
        try:
            self.send(prediction)
        except Exception as exc:
            counters.failed += 1
            self.fault(exc)
            return False
        if not self.deferred:
            counters.sent += 1
            self.failing_since = None
        return True

    def fault(self, exc: BaseException | str) -> None:
        """Note a failed delivery: health shows it, the log says it once per interval."""
        text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
        self.last_error = text
        if self.failing_since is None:
            self.failing_since = host_clock()
        self._limited.error(self.name, "publisher %s failed: %s", self.name, text)

    def health(self) -> dict[str, object]:
        """``state`` (ok, or failing since when), the counters and the last error."""
        c = self.counters
        state = "ok" if self.failing_since is None else "failing"
        out: dict[str, object] = {
            "state": state,
            "given": c.given,
            "sent": c.sent,
            "failed": c.failed,
            "dropped": c.dropped,
        }
        if self.failing_since is not None:
            out["failing_for_s"] = round(host_clock() - self.failing_since, 3)
        if self.last_error:
            out["error"] = self.last_error
        return out

    @property
    def lost(self) -> int:
        """Records given that were not delivered: failed or dropped."""
        return self.counters.failed + self.counters.dropped

    @abstractmethod
    def send(self, prediction: Prediction) -> None:
        """Deliver one prediction (or queue it, for a ``deferred`` publisher)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect, before the first prediction (network publishers)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release the destination."""

    async def aclose(self, timeout: float | None = None) -> None:
        """Flush and release, waiting at most ``timeout`` s for what is in flight (default:
        ``close``)."""
        self.close()
