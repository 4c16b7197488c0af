"""The edge daemon: one pipeline config run unattended (``crossl-stream daemon CONFIG``).

- SIGTERM / SIGINT: stop reading, finish the windows in flight, flush the publishers and
  exit 0 within ``daemon.stop_deadline_s`` (a second signal stops at once).
- SIGHUP: read the config and the model again. A new model, inference settings or
  publishers are put in place without touching the streams; a change to sensors, readers,
  windows or subjects restarts the pipeline (said in the log). A config or model that does
  not load is refused, logged, and the running pipeline goes on as it was.
- ``/healthz`` and ``/metrics`` on ``daemon.health`` (127.0.0.1 by default).
- systemd: ``READY=1`` once running, ``STATUS=`` lines, ``WATCHDOG=1`` pings from the event
  loop when the unit has ``WatchdogSec=`` (tools/crossl-stream.service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from pathlib import Path

from crossl_stream.clock import host_clock
from crossl_stream.config import PipelineConfig, load_config
from crossl_stream.errors import CrosslError
from crossl_stream.health import HealthServer, assess
from crossl_stream.pipeline import (
    BuildContext,
    Pipeline,
    build_publishers,
    build_worker,
    load_served_model,
)
from crossl_stream.signals import on_signals

log = logging.getLogger(__name__)
STREAM_KEYS = ("sensors", "readers", "window", "subjects")  # a change restarts the streams


def sd_notify(state: str) -> bool:
    """Send ``state`` to systemd's notify socket; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("systemd notify socket %s: %s", address, exc)
        return False


def watchdog_period() -> float | None:
    """Half systemd's watchdog interval (``WATCHDOG_USEC``) when it watches this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2e6
    except ValueError:
        return None


class Daemon:
    """Owns the pipeline of one config file while it runs unattended: its health server,
    its signal handling, reloads, and systemd's notify socket."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.source = str(path)
        self.cfg = load_config(self.path, PipelineConfig)  # ConfigError: refused at start
        self.pipeline: Pipeline | None = None
        self.reloads = {"applied": 0, "refused": 0, "restarts": 0}
        self._stopping = False
        self._restart: Pipeline | None = None  # the next pipeline, after a restart reload
        self._run_task: asyncio.Task | None = None
        self._reloading: asyncio.Task | None = None

    @property
    def base(self) -> Path:
        return self.path.parent

    async def run(self) -> int:
        """Run until stopped; 0 after a clean stop."""
        self.pipeline = Pipeline.from_config(self.cfg, self.base, self.source)
        server = None
        if self.cfg.daemon.health.port is not None:
            server = HealthServer(lambda: self.pipeline, self.cfg.daemon.health)
            await server.start()
        on_signals((signal.SIGTERM, signal.SIGINT), self.stop)
        on_signals((signal.SIGHUP,), self.reload)
        pinging = asyncio.create_task(self._watchdog())
        try:
            while True:
                self._run_task = asyncio.create_task(self.pipeline.run())
                sd_notify(f"READY=1\nSTATUS={self._status()}")
                log.info("daemon: running %s", self.source)
                try:
                    await self._run_task
                except asyncio.CancelledError:
                    if not self._stopping:
                        raise
                    log.error("daemon: stopped at its deadline; some records were not flushed")
                if self._restart is None or self._stopping:
                    break
                self.pipeline, self._restart = self._restart, None
        finally:
            pinging.cancel()
            if server is not None:
                await server.aclose()
            sd_notify("STOPPING=1")
        lost = {p.name: p.lost for p in self.pipeline.publishers if p.lost}
        if lost:
            log.warning("daemon: publishers lost records: %s", lost)
        log.info("daemon: stopped (%s)", self._status())
        return 0

    def stop(self) -> None:
        """The first call drains within the deadline; a second one stops at once."""
        deadline = self.cfg.daemon.stop_deadline_s
        if self._stopping:
            log.warning("daemon: second stop signal: stopping now")
            if self._run_task is not None:
                self._run_task.cancel()
            return
        self._stopping = True
        log.info("daemon: stopping (deadline %.1f s)", deadline)
        sd_notify("STOPPING=1")
        if self.pipeline is not None:
            self.pipeline.stop(deadline)
        task = self._run_task
        if task is not None:  # past the deadline nothing more is waited for
            asyncio.get_running_loop().call_later(deadline, lambda: task.done() or task.cancel())

    def reload(self) -> None:
        """Read the config and model again (SIGHUP), in a task of its own."""
        if self._reloading is not None and not self._reloading.done():
            log.warning("daemon: a reload is already in progress; this one is ignored")
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        sd_notify("RELOADING=1")
        try:
            await self._apply(load_config(self.path, PipelineConfig))
        except (CrosslError, OSError, ValueError, RuntimeError) as exc:
            self.reloads["refused"] += 1
            log.error("daemon: reload refused, the running pipeline goes on unchanged: %s", exc)
        finally:
            sd_notify(f"READY=1\nSTATUS={self._status()}")

    async def _apply(self, cfg: PipelineConfig) -> None:
        old, pipeline = self.cfg, self.pipeline
        if cfg.daemon != old.daemon:
            log.warning("daemon: the daemon section changed; it takes effect on a restart")
        if any(getattr(cfg, k) != getattr(old, k) for k in STREAM_KEYS):
            new = Pipeline.from_config(cfg, self.base, self.source)  # may raise: refused
            changed = [k for k in STREAM_KEYS if getattr(cfg, k) != getattr(old, k)]
            log.warning("daemon: %s changed: restarting the pipeline", ", ".join(changed))
            self.cfg, self._restart = cfg, new
            self.reloads["restarts"] += 1
            pipeline.stop(cfg.daemon.stop_deadline_s)
            return
        # the streams stay: a new model (and inference settings) and publishers
        model, model_dir = load_served_model(cfg, self.base, self.source)
        worker = build_worker(cfg, model, model_dir, self.source)
        kept = list(pipeline.publishers)
        reused: list = [None] * len(cfg.publishers)
        for i, p in enumerate(cfg.publishers):  # an unchanged publisher keeps running
            for j, q in enumerate(old.publishers):
                if p == q and kept[j] is not None:
                    reused[i], kept[j] = kept[j], None
                    break
        fresh_cfg = cfg.model_copy(
            update={
                "publishers": tuple(
                    p for p, r in zip(cfg.publishers, reused, strict=True) if r is None
                )
            }
        )
        ctx = BuildContext(
            cfg, self.base, self.source, model, worker.predictor.model_id,
            admission=pipeline.admission,
        )  # fmt: skip
        fresh = iter(build_publishers(fresh_cfg, ctx))
        publishers = [r if r is not None else next(fresh) for r in reused]
        for publisher in publishers:
            if publisher not in pipeline.publishers:
                await publisher.start()
        pipeline.swap(worker, publishers)
        for publisher in kept:  # no longer configured
            if publisher is not None:
                await publisher.aclose(cfg.daemon.stop_deadline_s)
        self.cfg = cfg
        self.reloads["applied"] += 1
        log.info(
            "daemon: reloaded %s: model %s, publishers %s",
            self.source,
            worker.predictor.model_id,
            [p.name for p in publishers],
        )

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog from the event loop (a stuck loop stops the pings) and
        keep its STATUS line current."""
        period = watchdog_period()
        every = period if period is not None else 10.0
        while True:
            await asyncio.sleep(every)
            status = self._status()
            sd_notify(("WATCHDOG=1\n" if period is not None else "") + f"STATUS={status}")

    def _status(self) -> str:
        pipeline = self.pipeline
        if pipeline is None:
            return "starting"
        report = assess(pipeline, self.cfg.daemon.health)
        c = pipeline.metrics.counts
        state = report["status"]
        if report["reasons"]:
            state += ": " + "; ".join(report["reasons"])
        return f"{state}; windows {c.windows}, predictions {c.predictions}, at {host_clock():.0f}"


def run_daemon(path: str | Path, verbose: bool = False) -> int:
    """``crossl-stream daemon CONFIG``: the daemon in its own event loop, logging as its
    config says (JSON lines by default)."""
    from crossl_stream.logs import setup_logging

    daemon = Daemon(path)
    setup_logging(daemon.cfg.daemon.log_format, verbose)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(daemon.run())
    return 0
