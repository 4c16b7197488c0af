"""Where records wait for a broker: a bounded queue in memory, or a spool on disk.

Both keep records in order and hand them out one at a time: ``peek`` the oldest, ``ack``
it once delivered (a record that was peeked and not acked is handed out again). When
full, the oldest are dropped and counted in ``dropped``.

The spool is a folder of append-only segment files and a read position::

    0000000000000001.seg   records: u32 length | u32 crc32 | u16 topic length | topic | body
    0000000000000002.seg   (the newest: appended to)
    position               u64 segment | u64 offset | u32 crc32, rewritten at each ack

A segment is deleted once read to its end; when the spool would exceed ``max_bytes`` the
oldest segment is dropped whole and its unread records counted. The position survives a
restart, so what was not delivered is sent on the next start, in order; a record delivered
just before a crash (its ack not yet written) is sent again. A write torn by a crash is
cut off at the next open. Records reach the OS at each append (they survive the process,
not a power cut: no fsync per record).
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import zlib
from collections import deque
from pathlib import Path

from crossl_stream.errors import ConfigError
from crossl_stream.logs import RateLimited

log = logging.getLogger(__name__)
FRAME = struct.Struct("<II")  # payload length, crc32 of the payload
TOPIC = struct.Struct("<H")
POSITION = struct.Struct("<QQI")  # segment, offset, crc32 of the two
SUFFIX = ".seg"


class MemoryQueue:
    """Owns up to ``size`` records waiting (plus the one handed out); the oldest dropped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.dropped = 0
        self._queue: deque[tuple[str, bytes]] = deque()
        self._head: tuple[str, bytes] | None = None  # handed out, not yet acked

    def __len__(self) -> int:
        return len(self._queue) + (self._head is not None)

    def put(self, topic: str, body: bytes) -> None:
        self._queue.append((topic, body))
        if len(self._queue) > self.size:
            self._queue.popleft()
            self.dropped += 1

    def peek(self) -> tuple[str, bytes] | None:
        if self._head is None and self._queue:
            self._head = self._queue.popleft()
        return self._head

    def ack(self) -> None:
        self._head = None

    def close(self) -> int:
        """Drop what is left (counted); how many that was."""
        left = len(self)
        self.dropped += left
        self._queue.clear()
        self._head = None
        return left

    def describe(self) -> str:
        return "memory"


class Spool:
    """Owns a folder of segment files: records appended, read in order, bounded in bytes."""

    def __init__(self, folder: Path, max_bytes: int = 64 << 20, segment_bytes: int | None = None):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(1024, max_bytes // 8)
        self.dropped = 0
        self._limited = RateLimited(log, 30.0)
        self._sizes: dict[int, int] = {}  # segment -> bytes (a few segments: bounded)
        self._counts: dict[int, int] = {}  # segment -> records
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._pos_fd = os.open(self.folder / "position", os.O_RDWR | os.O_CREAT, 0o600)
            self._open_segments()
        except OSError as exc:
            raise ConfigError(
                f"spool {self.folder}: cannot be used ({exc.strerror or exc})"
            ) from None
        self._write_fd: int | None = None
        self._read_fd: int | None = None
        self._read_seg = -1
        self._head: tuple[int, int, int, tuple[str, bytes]] | None = None  # seg, at, next

    # -- state on disk ------------------------------------------------------------------

    def _open_segments(self) -> None:
        segments = sorted(int(p.stem) for p in self.folder.glob(f"*{SUFFIX}") if p.stem.isdigit())
        seg, offset = self._read_position()
        if not segments or seg < segments[0] or seg > segments[-1]:
            seg, offset = (segments[0] if segments else 1), 0
        for old in [s for s in segments if s < seg]:  # read to the end before a crash
            self._path(old).unlink(missing_ok=True)
        segments = [s for s in segments if s >= seg]
        self.pending = 0
        self._read_index = 0  # records of the position's segment before the position
        for s in segments:
            count, size, before, start = self._scan(s, offset if s == seg else 0)
            self._sizes[s], self._counts[s] = size, count
            if s == seg:
                offset = start  # on a record's start, whatever the position said
                self._read_index = before
            self.pending += count - (before if s == seg else 0)
        self._seg, self._offset = seg, offset
        self._last = segments[-1] if segments else seg
        self._sizes.setdefault(self._last, 0)
        self._counts.setdefault(self._last, 0)
        if self.pending:
            log.info("spool %s: %d records waiting from before", self.folder, self.pending)

    def _scan(self, seg: int, until: int) -> tuple[int, int, int, int]:
        """Records in a segment, its valid size (a torn or corrupt tail cut off), how many
        records lie before offset ``until`` and where the first one after it starts."""
        path = self._path(seg)
        data = path.read_bytes()
        at = count = before = 0
        start = None
        while at + FRAME.size <= len(data):
            length, crc = FRAME.unpack_from(data, at)
            end = at + FRAME.size + length
            if end > len(data) or zlib.crc32(data[at + FRAME.size : end]) != crc:
                break
            if at < until:
                before += 1
            elif start is None:
                start = at
            count += 1
            at = end
        if at != len(data):
            log.warning(
                "spool %s: %d bytes at the end of %s cut off (a write torn by a crash, or damaged)",
                self.folder,
                len(data) - at,
                path.name,
            )
            with open(path, "r+b") as f:
                f.truncate(at)
        return count, at, before, at if start is None else start

    def _read_position(self) -> tuple[int, int]:
        raw = os.pread(self._pos_fd, POSITION.size, 0)
        if len(raw) == POSITION.size:
            seg, offset, crc = POSITION.unpack(raw)
            if zlib.crc32(raw[:16]) == crc:
                return seg, offset
        return 0, 0

    def _write_position(self) -> None:
        raw = struct.pack("<QQ", self._seg, self._offset)
        os.pwrite(self._pos_fd, raw + struct.pack("<I", zlib.crc32(raw)), 0)

    def _path(self, seg: int) -> Path:
        return self.folder / f"{seg:016d}{SUFFIX}"

    # -- the queue ----------------------------------------------------------------------

    def __len__(self) -> int:
        return self.pending

    @property
    def bytes(self) -> int:
        return sum(self._sizes.values())

    def put(self, topic: str, body: bytes) -> None:
        """Append a record (OSError: the disk refused it); the oldest dropped when full."""
        t = topic.encode()
        payload = TOPIC.pack(len(t)) + t + body
        frame = FRAME.pack(len(payload), zlib.crc32(payload)) + payload
        if len(frame) > self.max_bytes:
            self.dropped += 1
            return
        if self._sizes[self._last] and self._sizes[self._last] + len(frame) > self.segment_bytes:
            self._rotate()
        while self.bytes + len(frame) > self.max_bytes:
            self._drop_oldest()
        if self._write_fd is None:
            self._write_fd = os.open(
                self._path(self._last), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
        written = os.write(self._write_fd, frame)  # unbuffered: with the OS at once
        if written != len(frame):  # the disk filled mid-record: no torn record stays
            os.ftruncate(self._write_fd, self._sizes[self._last])
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {self.folder}")
        self._sizes[self._last] += len(frame)
        self._counts[self._last] += 1
        self.pending += 1

    def peek(self) -> tuple[str, bytes] | None:
        if self._head is not None:
            return self._head[3]
        while True:
            size = self._sizes.get(self._seg, 0)
            if self._offset < size:
                break
            if self._seg >= self._last:
                return None
            self._retire(self._seg)  # read to its end: gone
        if self._read_seg != self._seg:
            self._close_read()
            self._read_fd = os.open(self._path(self._seg), os.O_RDONLY)
            self._read_seg = self._seg
        at = self._offset
        length, crc = FRAME.unpack(os.pread(self._read_fd, FRAME.size, at))
        payload = os.pread(self._read_fd, length, at + FRAME.size)
        if len(payload) != length or zlib.crc32(payload) != crc:
            # damaged on disk: what follows in this segment cannot be framed; it is dropped,
            # counted, and reading goes on with the next segment
            unread = self._counts.get(self._seg, 0) - self._read_index
            log.error(
                "%s: a damaged record at byte %d; %d records dropped", self.describe(), at, unread
            )
            self.dropped += unread
            self.pending -= unread
            self._sizes[self._seg] = at
            self._counts[self._seg] = self._read_index
            if self._seg == self._last:  # new records go right after the last good one
                with open(self._path(self._seg), "r+b") as f:
                    f.truncate(at)
            return self.peek()
        (n,) = TOPIC.unpack_from(payload)
        record = payload[TOPIC.size : TOPIC.size + n].decode(), payload[TOPIC.size + n :]
        self._head = (self._seg, at, at + FRAME.size + length, record)
        return record

    def ack(self) -> None:
        """The record ``peek`` gave was delivered: the position moves past it, on disk."""
        if self._head is None:
            return
        seg, at, end, _ = self._head
        self._head = None
        if (seg, at) != (self._seg, self._offset):
            self.pending -= 1  # its segment was dropped meanwhile (not counted there)
            return
        self._offset = end
        self._read_index += 1
        self.pending -= 1
        self._write_position()

    def close(self) -> int:
        """Release the files; what is left stays for the next start. How many that is."""
        if self._head is not None and self._head[0] != self._seg:
            self.dropped += 1  # handed out from a dropped segment, never delivered
            self.pending -= 1
        self._head = None
        self._close_read()
        for fd in (self._write_fd, self._pos_fd):
            if fd is not None:
                os.close(fd)
        self._write_fd = None
        self._pos_fd = -1
        return self.pending

    def describe(self) -> str:
        return f"spool {self.folder}"

    # -- segments -----------------------------------------------------------------------

    def _rotate(self) -> None:
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        self._last += 1
        self._sizes[self._last] = 0
        self._counts[self._last] = 0

    def _drop_oldest(self) -> None:
        """The spool is full: the oldest segment goes, its unread records counted."""
        if self._seg >= self._last:
            self._rotate()  # never drop the segment being written; start another
        seg = self._seg
        unread = self._counts.get(seg, 0) - self._read_index
        if self._head is not None and self._head[0] == seg:
            unread -= 1  # handed out: it is still delivered from memory
        self.dropped += max(0, unread)
        self.pending -= max(0, unread)
        self._limited.warning(
            "full",
            "spool %s full (%d bytes): the oldest undelivered records dropped, %d so far",
            self.folder,
            self.max_bytes,
            self.dropped,
        )
        self._retire(seg)

    def _retire(self, seg: int) -> None:
        if self._read_seg == seg:
            self._close_read()
        self._path(seg).unlink(missing_ok=True)
        self._sizes.pop(seg, None)
        self._counts.pop(seg, None)
        self._seg, self._offset, self._read_index = seg + 1, 0, 0
        self._sizes.setdefault(self._seg, 0)
        self._counts.setdefault(self._seg, 0)
        self._write_position()

    def _close_read(self) -> None:
        if self._read_fd is not None:
            os.close(self._read_fd)
        self._read_fd = None
        self._read_seg = -1
