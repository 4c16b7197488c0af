"""JSONL publisher: one prediction record per line, flushed as it is written."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from crossl_stream.errors import ConfigError
from crossl_stream.inference import Prediction
from crossl_stream.publishers.base import Publisher


class JsonlPublisher(Publisher):
    """Owns an open JSONL file, written unbuffered: a line is on disk or it failed whole
    (a full disk leaves no half line and nothing queued to fail again at close). A file
    that already holds something is refused unless ``append`` (then the records go after
    it), so that a second run cannot silently mix its predictions into the first one's.
    Opened here, so that a path that cannot be written is a ConfigError (naming it) before
    anything streams."""

    def __init__(self, path: str | Path, append: bool = False) -> None:
        super().__init__()
        self.path = Path(path)
        self.append = append
        if self.path.is_dir():
            raise ConfigError(
                f"predictions file {self.path} is a folder; give a file path, e.g. "
                f"{self.path / 'predictions.jsonl'}"
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"predictions file {self.path}: cannot create its folder {self.path.parent}: "
                f"{exc.strerror or exc}"
            ) from None
        try:
            self._file = self.path.open("ab", buffering=0)
        except OSError as exc:
            raise ConfigError(
                f"predictions file {self.path}: cannot open it for writing: {exc.strerror or exc}"
            ) from None
        size = self._file.tell()  # append mode starts at the end: what is already there
        if size and not append:
            self._file.close()
            raise ConfigError(
                f"predictions file {self.path} already exists and is not empty ({size} bytes); "
                "pass --append (CLI) or append: true (config) to add to it, or choose another "
                "path"
            )

    def send(self, prediction: Prediction) -> None:
        line = (json.dumps(prediction.record(), separators=(",", ":")) + "\n").encode()
        written = self._file.write(line)
        if written != len(line):  # a short write: the disk filled up mid-line
            self._file.truncate(self._file.tell() - written)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {self.path}")

    def close(self) -> None:
        self._file.close()
