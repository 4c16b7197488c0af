"""LSL reader: one thread per inlet, resolving, pulling and recovering without blocking the
other sensors; chunks reach the asyncio side through a queue.

Timestamps come out of liblsl already on this host's clock (clock-offset correction,
``clocksync``) and smoothed (``dejitter``) unless a stream's config turns them off. liblsl's
``local_clock`` and ``time.monotonic`` are the same clock on Linux (CLOCK_MONOTONIC), so
they share the windower's time base.

Import pylsl only after ``LSLAPICFG`` names the config that keeps discovery where it must be
(tools/lsl_api.cfg keeps it on this machine). That config also sets how often liblsl resolves
and how soon a new inlet has its clock offset, which bound how fast a stream that comes back is
read again (0.2-0.45 s with it, over 1 s with liblsl's defaults): docs/lsl-exposure.md.
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


def _release(handle, destroy: str) -> None:
    """Free the liblsl object behind a pylsl handle now, not whenever the garbage collector
    gets to it (its ``__del__`` then frees NULL, which liblsl ignores)."""
    if handle is None:
        return
    import ctypes

    from pylsl.lib import lib

    obj, handle.obj = handle.obj, ctypes.c_void_p()
    if obj:
        getattr(lib, destroy)(obj)


class LslReader(Reader):
    """Owns one inlet thread per sensor, and the queue their chunks come through.

    Each thread keeps a ``pylsl.ContinuousResolver`` on its sensor's predicate for its whole
    life: liblsl asks for matching streams in the background (every 0.3 s with
    tools/lsl_api.cfg), and the thread looks at what it saw every ``poll_s``. While
    connecting, the first stream that fits is opened: the source read before when it is back,
    else the newest. A connected stream that delivers nothing for ``watchdog_s`` (a few
    expected chunk intervals) is logged STALE, and while it stays silent the thread looks for
    its replacement: a fitting stream with another uid, of the same source_id or created on the
    same host after the silence began (the producer came back as a new outlet). It switches to
    it at once. Without one, after ``lost_s`` the inlet is dropped (LOST) and the stream
    resolved anew (liblsl itself would wait 15 s). A stream left behind is not picked again for
    ``forget_s`` (the time after which the resolver forgets a stream that stopped answering).

    A stream still not found ``connect_grace_s`` after the start is named in a warning with
    the streams that are visible (again at most every ``missing_every_s`` while it stays
    missing). A matching stream whose shape or nominal rate (by more than 1%) does not fit the
    sensor is not connected: logged once as an error, counted, and the search goes on (a
    stream that fits may appear). ``states`` holds each sensor's connection state,
    ``transitions`` the latest changes, ``health()`` and ``stats()`` the rest.
    """

    missing_every_s = 60.0  # how often a stream still missing is named again
    max_refused = 1024  # streams remembered as refused, per sensor
    poll_s = 0.05  # how often the continuous resolver's results are looked at
    forget_s = 1.5  # the resolver forgets a stream that has not answered for this long
    open_s = 2.0  # how long opening an inlet (and its first clock offset) may take

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
        self.resolve_s = resolve_s  # how long one resolve waits before the thread looks around
        self.max_chunk = max_chunk
        now = host_clock()
        self.states = dict.fromkeys(sensors, StreamState.CONNECTING)
        self.transitions: collections.deque[tuple[float, str, StreamState]] = collections.deque(
            [(now, name, StreamState.CONNECTING) for name in sensors], maxlen=1000
        )  # (host time, sensor, new state), the newest last
        self._since = dict.fromkeys(sensors, now)  # when each sensor entered its state
        self.errors: dict[str, int] = dict.fromkeys(sensors, 0)  # refused streams, lost inlets
        self.rate_refused: dict[str, int] = dict.fromkeys(sensors, 0)  # streams at another rate
        self.refused_streams: dict[str, int] = dict.fromkeys(sensors, 0)  # shape or rate
        self.reconnects: dict[str, int] = dict.fromkeys(sensors, 0)  # inlets after the first
        self.found = dict.fromkeys(sensors, False)  # whether a stream was ever connected
        self.connect_grace_s = connect_grace_s
        self._refused: dict[str, set[str]] = {name: set() for name in sensors}  # stream uids
        self._left: dict[str, dict[str, float]] = {name: {} for name in sensors}  # uid -> until
        self._current: dict[str, str | None] = dict.fromkeys(sensors)  # the stream read now
        self._opened = dict.fromkeys(sensors, 0)  # inlets opened
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
            for thread in threads:  # each wakes within 0.1 s (1 s while naming a missing one)
                await asyncio.to_thread(thread.join, 3.0)

    def health(self) -> dict[str, dict[str, object]]:
        now = host_clock()
        return {
            name: {
                "state": self.states[name].value,
                "stream": self._current[name],
                "for_s": round(now - self._since[name], 3),
                "reconnects": self.reconnects[name],
            }
            for name in self.sensors
        }

    def stats(self) -> dict[str, int | dict[str, int]]:
        return {
            "reconnects": dict(self.reconnects),
            "refused_streams": dict(self.refused_streams),
            "dropped_chunks": self.dropped_chunks,
        }

    def report(self) -> str:
        """One line for a summary."""
        states = ", ".join(f"{n} {s.value}" for n, s in self.states.items())
        errors = {n: e for n, e in self.errors.items() if e}
        line = f"lsl: {states}; refused or lost streams {errors or 'none'}"
        rates = {n: c for n, c in self.rate_refused.items() if c}
        if rates:
            line += f"; streams refused for their nominal rate {rates}"
        again = {n: c for n, c in self.reconnects.items() if c}
        if again:
            line += f"; reconnected {again}"
        never = [f"{n} ({self.selectors[n].describe()})" for n, f in self.found.items() if not f]
        if never:
            line += f"; never found: {', '.join(never)}"
        return f"{line}; chunks dropped behind {self.dropped_chunks}"

    # -- one thread per sensor ------------------------------------------------------------

    def _set_state(self, name: str, state: StreamState, why: str = "") -> None:
        if self.states[name] != state:
            now = host_clock()
            self.states[name] = state
            self._since[name] = now
            self.transitions.append((now, name, state))
            log.info("LSL %s: %s%s", name, state.value, f" ({why})" if why else "")

    def _run(self, name: str, hand_over) -> None:
        started = host_clock()
        note_at = started + self.connect_grace_s
        resolver = None  # this thread's continuous resolver, kept for its whole life
        switch_to = None  # a replacement found while the stream read was silent
        try:
            while not self._stop.is_set():
                try:
                    if resolver is None:
                        resolver = self._resolver(name)
                    switch_to = self._attempt(name, hand_over, resolver, switch_to)
                except Exception as exc:  # pylsl errors of every kind: count, wait, try again
                    switch_to = None
                    self.errors[name] += 1
                    log.warning("LSL %s: %r; resolving again", name, exc)
                    self._stop.wait(self.resolve_s)
                if not self.found[name] and not self._stop.is_set() and host_clock() >= note_at:
                    self._note_missing(name, host_clock() - started)
                    note_at = host_clock() + self.missing_every_s
        finally:
            _release(resolver, "lsl_destroy_continuous_resolver")

    def _resolver(self, name: str):
        """A continuous resolver for the sensor's predicate (liblsl resolves in the background)."""
        import pylsl

        return pylsl.ContinuousResolver(
            pred=self.selectors[name].xpath(), forget_after=self.forget_s
        )

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

    def _candidates(self, name: str, resolver, besides: str = "") -> list:
        """The streams the resolver sees that fit the sensor, best first: the source read
        before, then the newest. Not ``besides`` (a uid), nor a stream left behind lately."""
        now = host_clock()
        left = self._left[name]
        for uid in [uid for uid, until in left.items() if until <= now]:
            del left[uid]
        seen = [s for s in resolver.results() if s.uid() != besides and s.uid() not in left]
        fitting = [s for s in seen if self._fits(name, s)]
        source = self._sources.get(name)
        fitting.sort(
            key=lambda s: (source is not None and s.source_id() != source, -s.created_at())
        )
        return fitting

    def _resolve(self, name: str, resolver):
        """The stream to read, from the continuous results looked at every ``poll_s`` for up
        to ``resolve_s``; None: none (yet)."""
        deadline = host_clock() + self.resolve_s
        while not self._stop.is_set():
            fitting = self._candidates(name, resolver)
            if fitting:
                return fitting[0]
            if host_clock() >= deadline:
                break
            self._stop.wait(self.poll_s)
        return None

    def _replacement(self, name: str, resolver, stream, silent_since: float, offset: float):
        """A stream that replaces ``stream``, silent since ``silent_since`` (host clock): one
        of its source_id, or one created on its host after the silence began (``offset``
        takes that host's clock to ours); None: none."""
        source, host = stream.source_id(), stream.hostname()
        for other in self._candidates(name, resolver, besides=stream.uid()):
            if source and other.source_id() == source:
                return other
            if other.hostname() == host and other.created_at() + offset > silent_since:
                return other
        return None

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
        self.refused_streams[name] += 1
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

    def _attempt(self, name: str, hand_over, resolver, stream=None):
        """Open ``stream`` (or the best one resolved) and read it until it is lost, replaced
        or the reader stops; return its replacement, if one was found."""
        import pylsl

        selector = self.selectors[name]
        flags = (pylsl.proc_clocksync if selector.clocksync else 0) | (
            pylsl.proc_dejitter if selector.dejitter else 0
        )
        if stream is None:
            self._set_state(name, StreamState.CONNECTING)
            stream = self._resolve(name, resolver)  # one that fits: shape and nominal rate
            if stream is None:
                return None
        else:
            self._set_state(name, StreamState.CONNECTING, f"to {describe_stream(stream)}")
        self.found[name] = True
        inlet = pylsl.StreamInlet(
            stream, max_buflen=selector.buffer_s, recover=True, processing_flags=flags
        )
        try:
            if stream.source_id():
                self._sources[name] = stream.source_id()
            return self._pull(name, inlet, stream, hand_over, resolver)
        except pylsl.util.LostError:
            self.errors[name] += 1
            log.warning("LSL %s: stream %r lost; resolving again", name, stream.name())
            return None
        finally:
            self._current[name] = None
            self._left[name][stream.uid()] = host_clock() + self.forget_s  # not picked again soon
            with contextlib.suppress(Exception):
                inlet.close_stream()
            _release(inlet, "lsl_destroy_inlet")

    def _open(self, name: str, inlet) -> float | None:
        """Open the inlet and, with clocksync, wait for its first clock offset (the first
        call blocks: make it here), in short waits so that a stop is seen. The offset that
        takes the stream's clock to ours (0.0 without clocksync); None: the reader stopped."""
        import pylsl

        steps = [inlet.open_stream]
        if self.selectors[name].clocksync:
            steps.append(inlet.time_correction)
        deadline = host_clock() + self.open_s
        offset = 0.0
        for step in steps:
            while True:
                try:
                    offset = step(timeout=0.1) or 0.0  # open_stream: None
                    break
                except pylsl.util.TimeoutError:
                    if self._stop.is_set():
                        return None
                    if host_clock() >= deadline:
                        raise
        return offset

    def _pull(self, name: str, inlet, stream, hand_over, resolver):
        import pylsl

        offset = self._open(name, inlet)
        if offset is None:
            return None
        self._current[name] = describe_stream(stream)
        if self._opened[name]:
            self.reconnects[name] += 1
        self._opened[name] += 1
        dtype = np.float32 if stream.channel_format() == pylsl.cf_float32 else np.float64
        if stream.channel_format() not in (pylsl.cf_float32, pylsl.cf_double64):
            dtype = None  # integer formats: pylsl allocates, converted below
        dest = None if dtype is None else np.empty((self.max_chunk, stream.channel_count()), dtype)
        log.info(
            "LSL %s: reading %r (%s, %d ch at %g Hz, source_id %r)",
            name,
            stream.name(),
            stream.type(),
            stream.channel_count(),
            stream.nominal_srate(),
            stream.source_id(),
        )
        last = host_clock()
        watchdog = self.watchdog_s[name]
        look_at = 0.0  # when to look for a replacement next, while silent
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
                return None  # resolve again: the source may come back under a new session
            if silent > watchdog:
                self._set_state(name, StreamState.STALE, f"nothing for {silent * 1000:.0f} ms")
                if now >= look_at:
                    look_at = now + self.poll_s
                    other = self._replacement(name, resolver, stream, last, offset)
                    if other is not None:  # the producer came back as a new outlet
                        self.errors[name] += 1
                        log.warning(
                            "LSL %s: %s silent for %.2f s; %s appeared: switching to it",
                            name,
                            describe_stream(stream),
                            silent,
                            describe_stream(other),
                        )
                        return other
        return None
