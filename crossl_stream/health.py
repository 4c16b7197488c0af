"""What the daemon tells the outside: ``/healthz`` (JSON: ok, degraded or unhealthy, and why) and
``/metrics`` (Prometheus text), served over HTTP on 127.0.0.1 unless configured otherwise.

Both read the running pipeline's metrics object and its parts' ``health()``; nothing is
computed per request beyond formatting. The server is asyncio, in the pipeline's loop, with
a limit on connections, request size and time (a scanner cannot tie it up).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from crossl_stream.clock import host_clock
from crossl_stream.config import HealthConfig
from crossl_stream.metrics import EXPORT_EVERY
from crossl_stream.states import StreamState

log = logging.getLogger(__name__)
MAX_SUBJECTS_SHOWN = 64  # /healthz lists this many subjects' streams; the rest are counted


def assess(pipeline, cfg: HealthConfig) -> dict[str, Any]:
    """The pipeline's health.

    ``status`` is ``unhealthy`` (HTTP 503) for a fault of the daemon's own: a publisher
    failing for ``publisher_fail_s``, a broker that refuses the login, or data coming in
    with nothing published for ``silent_s``; ``degraded`` (HTTP 200) when the daemon works
    but its sources are away (every sensor lost, or no data for ``silent_s``); else ``ok``.
    ``reasons`` say which. Also: per-subject stream states, the age of the last published
    record, publishers, readers.
    """
    now = host_clock()
    faults: list[str] = []
    warnings: list[str] = []
    clock = pipeline.readers[0].now()
    streams: dict[str, dict[str, str]] = {}
    live = False
    for i, (subject, windower) in enumerate(pipeline.windowers.items()):
        at = clock if clock is not None else windower.newest  # a virtual clock: its newest
        states = {k: v.value for k, v in windower.states(at).items()}
        live = live or StreamState.LIVE.value in states.values()
        if i < MAX_SUBJECTS_SHOWN:
            streams[subject or "default"] = states
    publishers = {p.name: p.health() for p in pipeline.publishers}
    for p in pipeline.publishers:
        if p.failing_since is not None and now - p.failing_since > cfg.publisher_fail_s:
            faults.append(
                f"publisher {p.name} failing for {now - p.failing_since:.0f} s: {p.last_error}"
            )
    readers = {}
    for i, reader in enumerate(pipeline.readers):
        name = reader_name(reader, i)
        readers[name] = reader.health()
        for part, state in readers[name].items():
            if isinstance(state, dict) and state.get("state") == "refused":
                faults.append(f"{name} {part}: refused: {state.get('why', '')}".rstrip(": "))
    metrics = pipeline.metrics
    last = metrics.last_published
    since = last if last is not None else metrics.started
    silent = None if since is None else now - since
    if silent is not None and silent > cfg.silent_s:
        if live:
            faults.append(f"data comes in but nothing was published for {silent:.0f} s")
        else:
            warnings.append(f"no data for {silent:.0f} s")
    default = streams.get("default", {})
    if default and all(s == StreamState.LOST.value for s in default.values()):
        warnings.append("every sensor is lost")
    status = "unhealthy" if faults else "degraded" if warnings else "ok"
    return {
        "status": status,
        "reasons": faults + warnings,
        "streams": streams,
        "subjects": len(pipeline.windowers),
        "last_record_age_s": None if last is None else round(now - last, 3),
        "publishers": publishers,
        "readers": readers,
        "queue_depth": pipeline.worker.depth(),
        "model": pipeline.worker.predictor.model_id,
        "fallbacks": sorted(pipeline.worker.predictor.fallbacks),
    }


def reader_name(reader, index: int) -> str:
    """``mqttreader-0``: a reader's name in health and metrics."""
    return f"{type(reader).__name__.lower()}-{index}"


class PipelineCollector:
    """A prometheus-client collector over a pipeline's metrics (``get_pipeline`` returns the
    one running now: a reload may replace it)."""

    def __init__(self, get_pipeline: Callable[[], Any]) -> None:
        self.get_pipeline = get_pipeline

    def collect(self):
        """The metric families, read from the running pipeline at each scrape."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        pipeline = self.get_pipeline()
        if pipeline is None:
            return
        m = pipeline.metrics
        c = m.counts

        def counter(name, doc, value=None, labels=(), rows=()):
            family = CounterMetricFamily(f"crossl_{name}", doc, labels=list(labels))
            if value is not None:
                family.add_metric([], value)
            for keys, v in rows:
                family.add_metric(list(keys), v)
            return family

        yield counter("chunks", "Sensor chunks received.", c.chunks)
        yield counter(
            "samples", "Samples accepted, by sensor.", None, ["sensor"],
            [((k,), v) for k, v in c.samples.items()],
        )  # fmt: skip
        yield counter(
            "chunks_refused", "Chunks refused, by reason.", None, ["reason"],
            [((k,), v) for k, v in c.refused_chunks.items()],
        )  # fmt: skip
        yield counter(
            "samples_refused", "Samples refused (NaN, future, out of order), by sensor.",
            None, ["sensor", "reason"],
            [(tuple(k.split(":")), v) for k, v in pipeline.sample_faults().items()],
        )  # fmt: skip
        yield counter("windows", "Window positions cut.", c.windows)
        yield counter("windows_empty", "Windows no sensor covered.", c.empty_windows)
        yield counter(
            "windows_masked", "Predicted windows with a sensor masked, by its state.", None,
            ["sensor", "state"], [(tuple(k.split(":")), v) for k, v in c.masked.items()],
        )  # fmt: skip
        yield counter("windows_dropped", "Windows dropped by backpressure.", c.dropped_windows)
        yield counter("predictions", "Predictions made.", c.predictions)
        served = pipeline.worker.predictor.fallback_windows
        yield counter(
            "fallback_windows", "Windows served by the fallback model trained without a "
            "modality, by that modality.", None, ["without"],
            [((k,), v) for k, v in served.items()],
        )  # fmt: skip
        yield counter("records_published", "Records given to the publishers.", c.published)
        rows = []
        for p in pipeline.publishers:
            for outcome in ("given", "sent", "failed", "dropped"):
                rows.append(((p.name, outcome), getattr(p.counters, outcome)))
        yield counter(
            "publisher_records", "Publisher records by outcome.", None,
            ["publisher", "outcome"], rows,
        )  # fmt: skip
        up = GaugeMetricFamily(
            "crossl_publisher_up", "1: the publisher delivers.", labels=["publisher"]
        )
        for p in pipeline.publishers:
            up.add_metric([p.name], 0.0 if p.failing_since is not None else 1.0)
        yield up
        refused = pipeline.admission.refused
        yield counter(
            "subjects_refused", "Messages of subjects not admitted, by reason.", None,
            ["reason"], [((k,), v) for k, v in refused.items()],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "crossl_subjects", "Subjects with windows now.", len(pipeline.windowers)
        )
        yield GaugeMetricFamily(
            "crossl_queue_depth", "Windows waiting for the model.", pipeline.worker.depth()
        )
        if m.last_published is not None:
            age = host_clock() - m.last_published
            yield GaugeMetricFamily("crossl_last_record_age_seconds", "Since the last record.", age)
        grouped: dict[str, list] = {}  # one family per key, whatever the number of readers
        flat: dict[str, list] = {}
        for i, reader in enumerate(pipeline.readers):
            name = reader_name(reader, i)
            for key, value in reader.stats().items():
                if isinstance(value, dict):
                    rows = [((name, str(k)), v) for k, v in value.items()]
                    grouped.setdefault(key, []).extend(rows)
                else:
                    flat.setdefault(key, []).append(((name,), value))
        for key, rows in grouped.items():
            yield counter(
                f"reader_{key}", f"Reader {key}, by label.", None, ["reader", "label"], rows
            )
        for key, rows in flat.items():
            yield counter(f"reader_{key}", f"Reader {key}.", None, ["reader"], rows)
        yield counter(
            "windows_empty_sensor", "Empty windows by sensor and its state then.", None,
            ["sensor", "state"], [(tuple(k.split(":")), v) for k, v in c.empty.items()],
        )  # fmt: skip
        latency = HistogramMetricFamily(
            "crossl_latency_seconds", "Per-stage latency (see crossl_stream.metrics.STAGES).",
            labels=["stage"],
        )  # fmt: skip
        for stage, hist in m.latency.items():
            buckets = [
                ("+Inf" if b == float("inf") else f"{b / 1000:.6g}", n)
                for b, n in hist.cumulative(EXPORT_EVERY)
            ]
            latency.add_metric([stage], buckets, hist.sum / 1000)
        yield latency


class HealthServer:
    """Owns the listening socket of ``/healthz`` and ``/metrics``."""

    max_connections = 16
    max_request = 8192
    timeout_s = 5.0

    def __init__(
        self,
        get_pipeline: Callable[[], Any],
        cfg: HealthConfig,
        extra: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        from prometheus_client import CollectorRegistry

        self.get_pipeline = get_pipeline
        self.extra = extra  # more for /healthz (the daemon's reloads)
        self.cfg = cfg
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PipelineCollector(get_pipeline))
        self.requests = 0
        self.refused = 0
        self._server: asyncio.AbstractServer | None = None
        self._slots = asyncio.Semaphore(self.max_connections)

    @property
    def port(self) -> int | None:
        """The port listened on (when configured as 0, the one the system chose)."""
        if self._server is None or not self._server.sockets:
            return None
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.cfg.host, self.cfg.port, limit=self.max_request
        )
        log.info("health: http://%s:%d/healthz and /metrics", self.cfg.host, self.port)

    async def aclose(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def health(self) -> dict[str, Any]:
        pipeline = self.get_pipeline()
        if pipeline is None:
            return {"status": "unhealthy", "reasons": ["no pipeline running"]}
        report = assess(pipeline, self.cfg)
        if self.extra is not None:
            report.update(self.extra())
        return report

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            self.refused += 1
            writer.close()
            return
        async with self._slots:
            head = b""
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout_s)
                status, ctype, body = self._answer(head)
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                status, ctype, body = 400, "text/plain", b"bad request\n"
            except ConnectionError:
                writer.close()
                return
            except Exception as exc:  # a bug must not take the server down: said, counted
                log.error("health: answering failed: %r", exc)
                status, ctype, body = 500, "text/plain", b"internal error\n"
            self.requests += 1
            payload = b"" if head.startswith(b"HEAD") else body  # HEAD: the headers only
            try:
                writer.write(
                    f"HTTP/1.1 {status} {_REASONS.get(status, '')}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + payload
                )
                await asyncio.wait_for(writer.drain(), self.timeout_s)
            except (ConnectionError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()

    def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"GET /healthz or /metrics\n"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/healthz":
            report = self.health()
            code = 503 if report["status"] == "unhealthy" else 200
            return code, "application/json", json.dumps(report).encode() + b"\n"
        if path == b"/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        return 404, "text/plain", b"GET /healthz or /metrics\n"


_REASONS = {
    500: "Internal Server Error",
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
