"""LSL reader: one thread per inlet, resolving, pulling and recovering without blocking the
other sensors; chunks reach the asyncio side through a queue.

Timestamps come out of liblsl already on this host's clock (clock-offset correction,
``clocksync``) and smoothed (``dejitter``) unless a stream's config turns them off. liblsl's
``local_clock`` and ``time.monotonic`` are the same clock on Linux (CLOCK_MONOTONIC), so
they share the windower's time base.

Import pylsl only after ``LSLAPICFG`` names the config that keeps discovery where it must be
(tools/lsl_api.cfg keeps it on this machine).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import numpy as np

from crossl_stream.clock import host_clock
from crossl_stream.readers.base import Chunk, Reader, SensorInfo
from crossl_stream.states import StreamState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LslSelector:
    """Which LSL stream feeds a sensor, and how its timestamps are processed."""

    name: str | None = None
    type: str | None = None
    source_id: str | None = None
    predicate: str | None = None  # an XPath 1.0 predicate over the stream info, as liblsl takes
    clocksync: bool = True
    dejitter: bool = True
    buffer_s: int = 2  # inlet buffer: small, so a stalled consumer does not build a backlog

    def xpath(self) -> str:
        """The liblsl resolve predicate."""
        fields = (("name", self.name), ("type", self.type), ("source_id", self.source_id))
        parts = [f"{key}={_quoted(value)}" for key, value in fields if value is not None]
        if self.predicate:
            parts.append(f"({self.predicate})")
        if not parts:
            raise ValueError("an LSL stream needs a name, type, source_id or predicate")
        return " and ".join(parts)

    def describe(self) -> str:
        """The selection as configured, for messages: ``name='EEG', type='EEG'``."""
        fields = (
            ("name", self.name),
            ("type", self.type),
            ("source_id", self.source_id),
            ("predicate", self.predicate),
        )
        return ", ".join(f"{key}={value!r}" for key, value in fields if value is not None)


def _quoted(value: str) -> str:
    """An XPath 1.0 string literal (it has no escapes: pick the quote the value lacks)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"an LSL selector cannot hold both kinds of quote: {value!r}")


FORMATS = {1: "float32", 2: "double64", 3: "string", 4: "int32", 5: "int16", 6: "int8", 7: "int64"}


def describe_stream(stream, host: bool = False) -> str:
    """``'EEG-1' (type EEG, 32 ch @ 250 Hz, source_id 'amp-7')`` for a pylsl StreamInfo."""
    rate = stream.nominal_srate()
    pace = f"{rate:g} Hz" if rate > 0 else "irregular rate"
    where = f", host {stream.hostname()!r}" if host else ""
    return (
        f"{stream.name()!r} (type {stream.type() or '-'}, {stream.channel_count()} ch @ {pace}, "
        f"source_id {stream.source_id()!r}{where})"
    )


class LslReader(Reader):
    """Owns one inlet thread per sensor, and the queue their chunks come through.

    A stream that is absent is resolved again every ``resolve_s``; one still not found
    ``connect_grace_s`` after the start is named in a warning with the streams that are
    visible (again at most every ``missing_every_s`` while it stays missing). A matching
    stream whose shape or nominal rate (by more than 1%) does not fit the sensor is not
    connected: logged once as an error, counted, and the search goes on (a stream that fits
    may appear). A stream that delivers nothing for ``watchdog_s`` (a few expected chunk
    intervals) is logged STALE, and after ``lost_s`` its inlet is dropped and the stream
    resolved anew (liblsl itself would wait 15 s). ``states`` holds each sensor's
    connection state.
    """

    missing_every_s = 60.0  # how often a stream still missing is named again
    max_refused = 1024  # streams remembered as refused, per sensor

    def __init__(
        self,
        sensors: Mapping[str, tuple[SensorInfo, LslSelector]],
        watchdog_s: float | Mapping[str, float] = 0.1,
        lost_s: float = 5.0,
        resolve_s: float = 0.5,
        max_chunk: int = 1024,
        queue_size: int = 4096,
        connect_grace_s: float = 2.0,
    ) -> None:
        self.sensors = {name: info for name, (info, _) in sensors.items()}
        self.selectors = {name: sel for name, (_, sel) in sensors.items()}
        for sel in self.selectors.values():
            sel.xpath()  # refuse an empty selector now, not in a thread
        wd = watchdog_s if isinstance(watchdog_s, Mapping) else dict.fromkeys(sensors, watchdog_s)
        self.watchdog_s = {name: float(wd.get(name, 0.1)) for name in sensors}
        self.lost_s = lost_s
        self.resolve_s = resolve_s
        self.max_chunk = max_chunk
        self.states = dict.fromkeys(sensors, StreamState.CONNECTING)
        self.transitions: collections.deque[tuple[float, str, StreamState]] = collections.deque(
            [(host_clock(), name, StreamState.CONNECTING) for name in sensors], maxlen=1000
        )  # (host time, sensor, new state), the newest last
        self.errors: dict[str, int] = dict.fromkeys(sensors, 0)  # refused streams, lost inlets
        self.rate_refused: dict[str, int] = dict.fromkeys(sensors, 0)  # streams at another rate
        self.found = dict.fromkeys(sensors, False)  # whether a stream was ever connected
        self.connect_grace_s = connect_grace_s
        self._refused: dict[str, set[str]] = {name: set() for name in sensors}  # stream uids
        self.queue_size = queue_size
        self._sources: dict[str, str] = {}  # the source_id each sensor read last
        self.dropped_chunks = 0  # the oldest chunks dropped while the pipeline fell behind
        self._stop = threading.Event()

    async def chunks(self) -> AsyncIterator[Chunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Chunk] = asyncio.Queue(self.queue_size)

        def enqueue(chunk: Chunk) -> None:  # on the loop: a stalled consumer loses the oldest
            if queue.full():
                queue.get_nowait()
                self.dropped_chunks += 1
            queue.put_nowait(chunk)

        def hand_over(chunk: Chunk) -> None:  # in an inlet thread
            if not self._stop.is_set():
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    loop.call_soon_threadsafe(enqueue, chunk)

        self._stop.clear()
        threads = [
            threading.Thread(
                target=self._run, args=(name, hand_over), name=f"lsl-{name}", daemon=True
            )
            for name in self.sensors
        ]
        for thread in threads:
            thread.start()
        try:
            while True:
                yield await queue.get()
        finally:
            self._stop.set()
            for thread in threads:  # each wakes within its pull timeout (< 2 s)
                await asyncio.to_thread(thread.join, 3.0)

    def report(self) -> str:
        """One line for a summary."""
        states = ", ".join(f"{n} {s.value}" for n, s in self.states.items())
        errors = {n: e for n, e in self.errors.items() if e}
        line = f"lsl: {states}; refused or lost streams {errors or 'none'}"
        rates = {n: c for n, c in self.rate_refused.items() if c}
        if rates:
            line += f"; streams refused for their nominal rate {rates}"
        never = [f"{n} ({self.selectors[n].describe()})" for n, f in self.found.items() if not f]
        if never:
            line += f"; never found: {', '.join(never)}"
        return f"{line}; chunks dropped behind {self.dropped_chunks}"

    # -- one thread per sensor ------------------------------------------------------------

    def _set_state(self, name: str, state: StreamState, why: str = "") -> None:
        if self.states[name] != state:
            self.states[name] = state
            self.transitions.append((host_clock(), name, state))
            log.info("LSL %s: %s%s", name, state.value, f" ({why})" if why else "")

    def _run(self, name: str, hand_over) -> None:
        started = host_clock()
        note_at = started + self.connect_grace_s
        while not self._stop.is_set():
            try:
                self._attempt(name, hand_over)
            except Exception as exc:  # pylsl errors of every kind: count, wait, try again
                self.errors[name] += 1
                log.warning("LSL %s: %r; resolving again", name, exc)
                self._stop.wait(self.resolve_s)
            if not self.found[name] and not self._stop.is_set() and host_clock() >= note_at:
                self._note_missing(name, host_clock() - started)
                note_at = host_clock() + self.missing_every_s

    def _note_missing(self, name: str, waited: float) -> None:
        """Warn that no stream was found for ``name``, listing the streams that are seen."""
        import pylsl

        visible = sorted(
            pylsl.resolve_streams(min(max(self.resolve_s, 0.2), 1.0)),
            key=lambda s: (s.name(), s.type(), s.source_id()),
        )
        shown = ", ".join(describe_stream(s) for s in visible[:12]) or "none"
        if len(visible) > 12:
            shown += f", and {len(visible) - 12} more"
        refused = len(self._refused[name])
        wanted = self.selectors[name].describe()
        what = (
            f"no LSL stream that matches {wanted} fits it ({refused} refused: see above)"
            if refused
            else f"no LSL stream matches {wanted}"
        )
        log.warning("sensor %r: %s after %.1f s; visible: %s", name, what, waited, shown)

    def _resolve(self, name: str):
        """The stream to read: the source read before when it is back, else any match that
        fits the sensor; None: none (yet)."""
        import pylsl

        xpath = self.selectors[name].xpath()
        source = self._sources.get(name)
        if source is not None:
            found = pylsl.resolve_bypred(f"{xpath} and source_id={_quoted(source)}", 1, 0.2)
            stream = next((s for s in found if self._fits(name, s)), None)
            if stream is not None:
                return stream
        # wait for one more match than those refused already (or resolve_s)
        found = pylsl.resolve_bypred(xpath, 1 + len(self._refused[name]), self.resolve_s)
        stream = next((s for s in found if self._fits(name, s)), None)
        if stream is None and found:
            self._stop.wait(max(self.resolve_s, 1.0))  # only streams that do not fit: no spin
        return stream

    def _fits(self, name: str, stream) -> bool:
        """Whether ``stream`` can feed sensor ``name``: its channel count and a numeric
        format, and a nominal rate within 1% of the sensor's (0: irregular, not compared).
        A stream that does not fit is logged and counted once."""
        import pylsl

        info = self.sensors[name]
        shape = stream.channel_count() == info.channels
        shape = shape and stream.channel_format() != pylsl.cf_string
        rate = stream.nominal_srate()
        rate_ok = rate <= 0 or abs(rate - info.rate_hz) <= 0.01 * info.rate_hz
        if shape and rate_ok:
            return True
        refused = self._refused[name]
        uid = stream.uid()
        if uid in refused:
            return False
        if len(refused) >= self.max_refused:
            refused.clear()
        refused.add(uid)
        if not shape:
            self.errors[name] += 1
            log.error(
                "LSL %s: stream %s has %d channels of format %s; the sensor needs %d numeric "
                "channels: not read",
                name,
                describe_stream(stream, host=True),
                stream.channel_count(),
                FORMATS.get(stream.channel_format(), stream.channel_format()),
                info.channels,
            )
        else:
            self.rate_refused[name] += 1
            log.error(
                "LSL %s: stream %s has a nominal rate of %g Hz, but sensors.%s.rate_hz is %g "
                "Hz: not connected (its samples would be windowed at the wrong rate); still "
                "looking for a stream that fits",
                name,
                describe_stream(stream, host=True),
                rate,
                name,
                info.rate_hz,
            )
        return False

    def _attempt(self, name: str, hand_over) -> None:
        """Resolve, open and read one stream until it is lost or the reader stops."""
        import pylsl

        selector = self.selectors[name]
        flags = (pylsl.proc_clocksync if selector.clocksync else 0) | (
            pylsl.proc_dejitter if selector.dejitter else 0
        )
        self._set_state(name, StreamState.CONNECTING)
        stream = self._resolve(name)  # one that fits the sensor: shape and nominal rate
        if stream is None:
            return
        self.found[name] = True
        inlet = pylsl.StreamInlet(
            stream, max_buflen=selector.buffer_s, recover=True, processing_flags=flags
        )
        try:
            if stream.source_id():
                self._sources[name] = stream.source_id()
            self._pull(name, inlet, stream, hand_over)
        except pylsl.util.LostError:
            self.errors[name] += 1
            log.warning("LSL %s: stream %r lost; resolving again", name, stream.name())
        finally:
            with contextlib.suppress(Exception):
                inlet.close_stream()

    def _pull(self, name: str, inlet, stream, hand_over) -> None:
        import pylsl

        inlet.open_stream(timeout=2.0)
        if self.selectors[name].clocksync:
            inlet.time_correction(timeout=2.0)  # the first call blocks: make it here
        dtype = np.float32 if stream.channel_format() == pylsl.cf_float32 else np.float64
        if stream.channel_format() not in (pylsl.cf_float32, pylsl.cf_double64):
            dtype = None  # integer formats: pylsl allocates, converted below
        dest = None if dtype is None else np.empty((self.max_chunk, stream.channel_count()), dtype)
        rate = stream.nominal_srate()
        log.info(
            "LSL %s: reading %r (%s, %d ch at %g Hz, source_id %r)",
            name,
            stream.name(),
            stream.type(),
            stream.channel_count(),
            rate,
            stream.source_id(),
        )
        last = host_clock()
        watchdog = self.watchdog_s[name]
        while not self._stop.is_set():
            values, stamps = inlet.pull_chunk(
                timeout=min(watchdog / 2, 0.05),
                max_samples=self.max_chunk,
                dest_obj=dest,
                min_samples=1,
                as_numpy=True,
            )
            now = host_clock()
            if len(stamps):
                last = now
                self._set_state(name, StreamState.LIVE)
                chunk = np.array(values, dtype=np.float32)  # owned: dest is reused
                hand_over(Chunk(name, chunk, stamps, now, now))
                continue
            silent = now - last
            if silent > self.lost_s:
                self.errors[name] += 1
                self._set_state(name, StreamState.LOST, f"nothing for {silent:.1f} s")
                return  # resolve again: the source may come back under a new session
            if silent > watchdog:
                self._set_state(name, StreamState.STALE, f"nothing for {silent * 1000:.0f} ms")
