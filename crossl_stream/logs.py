"""Logging for people and for log collectors: text or one JSON object per line, and a
rate limit for faults that repeat (one line per interval with a count, not one per window)."""

from __future__ import annotations

import json
import logging
import time
from typing import Literal

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts``, ``level``, ``logger``, ``msg``, any ``extra=``
    fields, and ``exc`` (the traceback text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value if isinstance(value, int | float | str | bool) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(fmt: Literal["text", "json"] = "text", verbose: bool = False) -> None:
    """Configure the root logger once: ``text`` for a terminal, ``json`` for a daemon."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


class RateLimited:
    """Owns the last time each kind of fault was logged: the first occurrence is logged, then
    at most one line per ``every_s`` saying how many happened since. Kinds are few (a
    publisher, a reason), and at most ``max_kinds`` are remembered.

    >>> import logging
    >>> limited = RateLimited(logging.getLogger("demo"), every_s=60)
    >>> [limited.warning("jsonl", "write failed: %s", "disk full") for _ in range(3)]
    [True, False, False]
    >>> limited.suppressed("jsonl")
    2
    """

    def __init__(self, logger: logging.Logger, every_s: float = 10.0, max_kinds: int = 256):
        self.logger = logger
        self.every_s = every_s
        self.max_kinds = max_kinds
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def suppressed(self, kind: str) -> int:
        """How many of ``kind`` were not logged since its last line."""
        return self._count.get(kind, 0)

    def log(self, level: int, kind: str, msg: str, *args, **kwargs) -> bool:
        """Log ``msg`` for ``kind`` unless one was logged less than ``every_s`` ago; returns
        whether it was logged."""
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            self._count[kind] = self._count.get(kind, 0) + 1
            return False
        if last is None and len(self._last) >= self.max_kinds:
            self._last.clear()
            self._count.clear()
        since = self._count.pop(kind, 0)
        if since:
            msg = f"{msg} ({since} more since the last report)"
        self._last[kind] = now
        self.logger.log(level, msg, *args, **kwargs)
        return True

    def warning(self, kind: str, msg: str, *args, **kwargs) -> bool:
        return self.log(logging.WARNING, kind, msg, *args, **kwargs)

    def error(self, kind: str, msg: str, *args, **kwargs) -> bool:
        return self.log(logging.ERROR, kind, msg, *args, **kwargs)
