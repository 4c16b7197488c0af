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
from crossl_stream.config import JsonlPublisherConfig, PipelineConfig, load_config
from crossl_stream.errors import ConfigError, CrosslError
from crossl_stream.health import HealthServer, assess
from crossl_stream.pipeline import (
    BuildContext,
    Pipeline,
    ServedModel,
    build_publishers,
    build_worker,
    load_served_model,
    name_publishers,
)
from crossl_stream.signals import on_signals

log = logging.getLogger(__name__)
STREAM_KEYS = ("sensors", "readers", "window", "subjects")  # a change restarts the streams


def appending(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` with every JSONL publisher appending: a daemon restarted (by systemd, or by
    a reload) adds to its files instead of refusing them."""
    publishers = tuple(
        p.model_copy(update={"append": True}) if isinstance(p, JsonlPublisherConfig) else p
        for p in cfg.publishers
    )
    return cfg.model_copy(update={"publishers": publishers})


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
        self.cfg = appending(load_config(self.path, PipelineConfig))  # ConfigError: refused
        self.pipeline: Pipeline | None = None
        self.server: HealthServer | None = None
        self.reloads = {"applied": 0, "refused": 0, "restarts": 0}
        self._stopping = False
        self._restart_cfg: PipelineConfig | None = None  # what a restart reload runs next
        self._restart_served: ServedModel | None = None  # its model, loaded and checked
        self._swapped: asyncio.Event | None = None  # set once the restart took place
        self._run_task: asyncio.Task | None = None
        self._reloading: asyncio.Task | None = None
        self._again = False  # a SIGHUP came during a reload: reload once more after it

    @property
    def base(self) -> Path:
        """Where relative paths in the config start: the config file's folder."""
        return self.path.parent

    async def run(self) -> int:
        """Run until stopped; 0 after a clean stop. ConfigError when the config, the model
        or the health port cannot be used at start."""
        on_signals((signal.SIGTERM, signal.SIGINT), self.stop)  # first: a stop while the
        on_signals((signal.SIGHUP,), self.reload)  # model loads is not lost
        health = self.cfg.daemon.health
        pinging = asyncio.create_task(self._watchdog())
        try:
            if health.port is not None:
                self.server = HealthServer(
                    lambda: self.pipeline, health, lambda: {"reloads": dict(self.reloads)}
                )
                try:
                    await self.server.start()
                except OSError as exc:
                    raise ConfigError(
                        f"{self.source}: daemon.health.port: cannot listen on "
                        f"{health.host}:{health.port}: {exc.strerror or exc}"
                    ) from None
            self.pipeline = Pipeline.from_config(self.cfg, self.base, self.source)
            while not self._stopping:
                await self._run_once()
                if self._stopping or self._restart_cfg is None:
                    break
                self._restart()
        finally:
            pinging.cancel()
            if self._swapped is not None:
                self._swapped.set()
            if self.server is not None:
                await self.server.aclose()
            sd_notify("STOPPING=1")
        if self.pipeline is not None:
            lost = {p.name: p.lost for p in self.pipeline.publishers if p.lost}
            if lost:
                log.warning("daemon: publishers lost records: %s", lost)
        log.info("daemon: stopped (%s)", self._status())
        return 0

    async def _run_once(self) -> None:
        self._run_task = asyncio.create_task(self.pipeline.run())
        sd_notify(f"READY=1\nSTATUS={self._status()}")
        log.info("daemon: running %s", self.source)
        try:
            await self._run_task
        except asyncio.CancelledError:
            if not self._stopping:
                raise
            log.error("daemon: stopped at its deadline; some records were not flushed")

    def _restart(self) -> None:
        """The old pipeline has drained and closed: start the one the reload asked for,
        or the old config again when it cannot start."""
        cfg, self._restart_cfg = self._restart_cfg, None
        served, self._restart_served = self._restart_served, None
        try:
            self.pipeline = Pipeline.from_config(cfg, self.base, self.source, served)
            self.cfg = cfg
            self.reloads["restarts"] += 1
            log.warning("daemon: pipeline restarted with the new config")
        except (CrosslError, OSError, ValueError, RuntimeError) as exc:
            self.reloads["refused"] += 1
            log.error("daemon: the new config did not start (%s); the old one runs again", exc)
            self.pipeline = Pipeline.from_config(self.cfg, self.base, self.source)
        finally:
            if self._swapped is not None:
                self._swapped.set()

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
        """Read the config and model again (SIGHUP), in a task of its own; one that comes
        during a reload runs after it."""
        if self.pipeline is None or self._stopping:
            log.warning("daemon: not running yet, or stopping: the reload is ignored")
            return
        if self._reloading is not None and not self._reloading.done():
            self._again = True
            log.info("daemon: a reload is in progress; another one follows it")
            return
        self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        while True:
            self._again = False
            sd_notify("RELOADING=1")
            try:
                await self._apply(appending(load_config(self.path, PipelineConfig)))
            except (CrosslError, OSError, ValueError, RuntimeError) as exc:
                self.reloads["refused"] += 1
                log.error("daemon: reload refused, the running pipeline goes on unchanged: %s", exc)
            finally:
                sd_notify(f"READY=1\nSTATUS={self._status()}")
            if not self._again or self._stopping:
                return

    async def _apply(self, cfg: PipelineConfig) -> None:
        old, pipeline = self.cfg, self.pipeline
        if cfg.daemon.health != old.daemon.health and self.server is not None:
            if (cfg.daemon.health.host, cfg.daemon.health.port) != (
                old.daemon.health.host,
                old.daemon.health.port,
            ):
                log.warning("daemon: daemon.health host or port changed: used after a restart")
            self.server.cfg = cfg.daemon.health
        if any(getattr(cfg, k) != getattr(old, k) for k in STREAM_KEYS):
            # checked before anything stops (the model loads and fits the sensors); built
            # once the old pipeline has drained and closed its files and connections
            served = load_served_model(cfg, self.base, self.source)
            changed = [k for k in STREAM_KEYS if getattr(cfg, k) != getattr(old, k)]
            log.warning("daemon: %s changed: restarting the pipeline", ", ".join(changed))
            self._restart_cfg, self._restart_served = cfg, served
            self._swapped = asyncio.Event()
            pipeline.stop(cfg.daemon.stop_deadline_s)
            await self._swapped.wait()
            return
        # the streams stay: a new model (and inference settings) and publishers
        served = load_served_model(cfg, self.base, self.source)
        worker = build_worker(cfg, served, self.source)
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
            cfg, self.base, self.source, served.model, worker.predictor.model_id,
            admission=pipeline.admission,
        )  # fmt: skip
        for publisher in kept:  # no longer configured: closed first (a file, a client id)
            if publisher is not None:
                await publisher.aclose(cfg.daemon.stop_deadline_s)
        fresh = iter(build_publishers(fresh_cfg, ctx))
        publishers = name_publishers([r if r is not None else next(fresh) for r in reused])
        for publisher in publishers:
            if publisher not in pipeline.publishers:
                await publisher.start()
        pipeline.swap(worker, publishers)
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
