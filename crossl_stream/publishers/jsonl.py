"""JSONL publisher: one prediction record per line, flushed as it is written."""

from __future__ import annotations

import json
from pathlib import Path

from crossl_stream.inference import Prediction
from crossl_stream.publishers.base import Publisher


class JsonlPublisher(Publisher):
    """Owns an open JSONL file, appended to."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def send(self, prediction: Prediction) -> None:
        self._file.write(json.dumps(prediction.record(), separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
