"""The publisher protocol."""

from __future__ import annotations

from abc import ABC, abstractmethod

from crossl_stream.clock import host_clock
from crossl_stream.inference import Prediction


class Publisher(ABC):
    """Owns one destination for predictions; ``publish`` stamps the total latency first."""

    def publish(self, prediction: Prediction) -> None:
        """Stamp ``latency_ms.total`` (receipt of the window's data -> now) and send."""
        prediction.latency_ms["total"] = 1000 * (host_clock() - prediction.t_last_arrival)
        self.send(prediction)

    @abstractmethod
    def send(self, prediction: Prediction) -> None:
        """Deliver one prediction."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect, before the first prediction (network publishers)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release the destination."""

    async def aclose(self) -> None:
        """Flush and release, waiting for what is in flight (default: ``close``)."""
        self.close()
