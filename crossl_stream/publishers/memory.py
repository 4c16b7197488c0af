"""Memory publisher: keeps every prediction record (summaries, tests, notebooks)."""

from __future__ import annotations

from typing import Any

from crossl_stream.inference import Prediction
from crossl_stream.publishers.base import Publisher


class MemoryPublisher(Publisher):
    """Owns a list of prediction records, in publishing order."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[dict[str, Any]] = []

    def send(self, prediction: Prediction) -> None:
        self.records.append(prediction.record())
