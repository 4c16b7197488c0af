"""Pipeline: readers -> windower -> inference worker -> publishers, as asyncio tasks.

``Pipeline.from_config`` builds every part of a validated ``PipelineConfig`` (each reader
and publisher config ``build``s its own part), checking the config against the model it
loads; ``run`` opens the readers and publishers under one ``AsyncExitStack`` and plays
until every reader ends (or ``stop``), then drains: every window cut is predicted and
published. What happened is counted in ``metrics`` (nothing per prediction is kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from crossl_stream import default_model_dir
from crossl_stream.admission import Admission
from crossl_stream.clock import host_clock
from crossl_stream.config import PipelineConfig, ReplayReaderConfig, SimulateReaderConfig
from crossl_stream.errors import CheckpointError, ConfigError, InputError
from crossl_stream.inference import InferenceWorker, Predictor, pick_device
from crossl_stream.logs import RateLimited
from crossl_stream.metrics import Metrics
from crossl_stream.model.checkpoint import (
    WEIGHTS,
    fallback_dir,
    load_fallbacks,
    load_model,
    model_id,
    read_meta,
)
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.export import (
    ONNX_FILE,
    STREAM_FILE,
    OnnxModel,
    OnnxStep,
    weights_digest,
)
from crossl_stream.model.streaming import StreamingCroSSL
from crossl_stream.publishers.base import Publisher
from crossl_stream.readers.base import Chunk, Reader
from crossl_stream.states import StreamState
from crossl_stream.windower import Windower

log = logging.getLogger(__name__)


@dataclass
class BuildContext:
    """What a reader or publisher config needs to build its part: the whole config, where
    relative paths start, the model it serves, and the pipeline's admission."""

    cfg: PipelineConfig
    base: Path
    source: str
    model: CroSSL
    model_id: str
    known: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # trained streams
    admission: Admission | None = None
    index: int = 0  # the position of the part being built in its list (for messages)

    def resolve(self, path: str | Path) -> Path:
        path = Path(path)
        return path if path.is_absolute() else self.base / path


class Pipeline:
    """Owns the running parts of one stream: its readers, a windower per subject, the
    inference worker, the publishers, the admission of subjects and the metrics.

    ``modality_of`` maps a reader's sensor names onto the windower's modalities (default:
    the same names); sensors in ``receipt_rates`` get receipt-time stamps (their samples
    spread back from the chunk's arrival at that rate).
    """

    def __init__(
        self,
        readers: Sequence[Reader],
        windower: Windower,
        worker: InferenceWorker,
        publishers: Sequence[Publisher],
        modality_of: Mapping[str, str] | None = None,
        receipt_rates: Mapping[str, float] | None = None,
        admission: Admission | None = None,
    ) -> None:
        if not readers:
            raise ValueError("a pipeline needs at least one reader")
        self.readers = list(readers)
        self.windower = windower  # the default subject's; others are made alike on demand
        self.windower.emit_empty = True  # every window position is published
        self.windowers = {windower.subject: windower}
        self.worker = worker
        self.publishers = list(publishers)
        self.modality_of = dict(modality_of or {})
        self.receipt_rates = dict(receipt_rates or {})
        self.admission = admission or Admission()
        self.metrics = Metrics()
        self.retired_faults: dict[str, int] = {}  # sample refusals of retired windowers
        self._stopping = asyncio.Event()  # a stop before run() starts is not lost
        self._deadline: float | None = None  # host clock by which a stop must be done
        self._limited = RateLimited(log)  # refused chunks: one line per interval

    @classmethod
    def from_config(
        cls,
        cfg: PipelineConfig,
        base: str | Path = ".",
        source: str = "config",
        served: ServedModel | None = None,
    ) -> Pipeline:
        """Build every part of ``cfg``; relative paths resolve against ``base``;
        ``served``: the model ``load_served_model`` already loaded and checked for ``cfg``.

        Raises ConfigError (naming ``source`` and the key) when the config and the model
        disagree, and the readers' own errors for missing or unreadable recordings.
        """
        return _build(cfg, Path(base), source, served)

    @property
    def model(self) -> CroSSL:
        return self.worker.predictor.model

    def windower_of(self, subject: str) -> Windower | None:
        """The windower of ``subject``'s sensors, made on first use (None: not admitted)."""
        windower = self.windowers.get(subject)
        if windower is None:
            if not self.admission.admit(subject):
                return None
            windower = self.windowers[subject] = self.windower.fresh(subject)
            windower.emit_empty = True
            log.info("subject %r: first data; windows of its own", subject)
        return windower

    def stop(self, deadline_s: float | None = None) -> None:
        """End the readers; what was already read is still windowed, predicted and
        published, within ``deadline_s`` when given (publishers get what is left of it)."""
        if deadline_s is not None:
            self._deadline = host_clock() + deadline_s
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` was called on the current run."""
        return self._stopping.is_set()

    def swap(
        self, worker: InferenceWorker | None = None, publishers: Sequence[Publisher] | None = None
    ) -> None:
        """Put a new model (its worker's predictor) and publishers in place while running:
        windows already queued go to the new model; readers and windowers stay as they are.
        Publishers no longer listed are the caller's to close."""
        if worker is not None:
            self.worker.swap(worker)
        if publishers is not None:
            self.publishers = list(publishers)

    async def run(self) -> Metrics:
        """Play until every reader ends or ``stop`` is called, then drain."""
        self.metrics.started = host_clock()
        _freeze_startup()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._close_publishers)
            for publisher in self.publishers:
                await publisher.start()
            for reader in self.readers:
                await stack.enter_async_context(reader)
            await self._play()
        return self.metrics

    async def _play(self) -> None:
        readers = [asyncio.create_task(self._ingest(r)) for r in self.readers]
        publishing = asyncio.create_task(self._publish())
        ticking = asyncio.create_task(self._tick())
        stopping = asyncio.create_task(self._stopping.wait())
        failure: BaseException | None = None
        try:
            pending = set(readers)
            watched = {stopping, publishing, ticking}
            while pending:
                done, pending = await asyncio.wait(
                    pending | watched, return_when=asyncio.FIRST_COMPLETED
                )
                if publishing in done:
                    publishing.result()  # inference failed: no one would take the windows
                    raise RuntimeError("the inference worker stopped before its input ended")
                for task in done & {*readers, ticking}:
                    task.result()  # a reader that failed fails the run, after the drain
                if stopping in done:
                    break
                pending -= watched
        except BaseException as exc:  # re-raised once everything is drained and closed
            failure = exc
        finally:
            for task in (*readers, ticking, stopping):
                task.cancel()
            for task in (*readers, ticking):
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception as exc:  # already the failure, or one more to log
                    if exc is not failure:
                        log.error("%s while stopping: %r", task.get_name(), exc)
            try:
                if not publishing.done():  # else nothing would take the flushed windows
                    for windower in self.windowers.values():
                        for window in windower.flush():
                            await self._put(window)
            finally:
                self.worker.close()
            await publishing
        if failure is not None:
            raise failure

    async def _close_publishers(self) -> None:
        """Flush and release every publisher, within what is left of a stop's deadline
        (less 1.5 s for the rest of the shutdown and the process's exit)."""
        for publisher in self.publishers:
            timeout = None
            if self._deadline is not None:
                timeout = max(0.0, self._deadline - host_clock() - 1.5)
            try:
                await publisher.aclose(timeout)
            except Exception as exc:  # the others still close
                log.error("closing publisher %s failed: %r", publisher.name, exc)

    async def _put(self, window) -> None:
        counts = self.metrics.counts
        counts.windows += 1
        empty = not any(window.available.values())
        if empty:
            counts.empty_windows += 1
        for name, used in window.available.items():  # by sensor and its state then
            if not used:
                state = window.states.get(name, StreamState.LIVE)
                key = f"{name}:{getattr(state, 'value', state)}"
                self.metrics.add(counts.empty if empty else counts.masked, key)
        dropped = self.worker.counters.dropped
        await self.worker.put(window)
        counts.dropped_windows += self.worker.counters.dropped - dropped

    async def _ingest(self, reader: Reader) -> None:
        counts, metrics = self.metrics.counts, self.metrics
        async with contextlib.aclosing(reader.chunks()) as chunks:  # closed when cancelled
            async for chunk in chunks:
                counts.chunks += 1
                windower = self.windowers.get(chunk.subject) or self.windower_of(chunk.subject)
                if windower is None:
                    metrics.add(counts.refused_chunks, "subject not admitted")
                    continue
                sensor = self.modality_of.get(chunk.sensor, chunk.sensor)
                try:
                    windower.push(
                        sensor,
                        chunk.values,
                        self._timestamps(chunk),
                        chunk.arrival,
                        chunk.received,
                    )
                except InputError as exc:
                    metrics.add(counts.refused_chunks, "input")
                    self._limited.warning(
                        f"chunk:{chunk.sensor}", "chunk of %r refused: %s", chunk.sensor, exc
                    )
                    continue
                metrics.add(counts.samples, sensor, len(chunk.values))
                for window in windower.poll(now=chunk.arrival):
                    await self._put(window)

    def _timestamps(self, chunk: Chunk) -> np.ndarray:
        rate = self.receipt_rates.get(chunk.sensor)
        if rate is None:
            return chunk.timestamps
        n = len(chunk.values)
        return chunk.arrival - np.arange(n - 1, -1, -1, dtype=np.float64) / rate

    async def _tick(self) -> None:
        """Poll on the readers' clock between chunks, so windows and stream states move on
        while every sensor is silent (live sources only: a virtual clock has no 'between')."""
        period = min(max(self.windower.hop_s / 4, 0.01), 0.25)
        while True:
            await asyncio.sleep(period)
            now = self.readers[0].now()
            if now is not None:
                for windower in list(self.windowers.values()):
                    for window in windower.poll(now):
                        await self._put(window)
                await self.retire(now)

    async def retire(self, now: float) -> list[str]:
        """Drop the windowers of subjects whose every sensor is LOST at ``now`` (or never
        delivered: one message from a stranger must not hold a place for good), after
        flushing what they hold, so that wearables that come and go do not pile up; readers
        that keep per-subject state forget it too. Returns the subjects retired."""
        gone = [
            subject
            for subject, w in self.windowers.items()
            if w is not self.windower and _left(w.states(now).values())
        ]
        for subject in gone:
            windower = self.windowers.pop(subject)
            for window in windower.flush():
                await self._put(window)
            for key, n in sample_faults([windower]).items():
                self.retired_faults[key] = self.retired_faults.get(key, 0) + n
            for reader in self.readers:
                reader.forget(subject)
            self.worker.forget(subject)  # once its flushed windows are predicted
            self.admission.release(subject)
            log.info("subject %r: every sensor lost; its windows end here", subject)
        return gone

    def sample_faults(self) -> dict[str, int]:
        """Samples refused or cut, by ``sensor:reason``, over every windower so far."""
        out = dict(self.retired_faults)
        for key, n in sample_faults(self.windowers.values()).items():
            out[key] = out.get(key, 0) + n
        return out

    def to_host(self, t: float) -> float | None:
        """Host-clock time of ``t`` on the window clock (None: a virtual clock)."""
        return self.readers[0].to_host(t)

    async def _publish(self) -> None:
        metrics, counts = self.metrics, self.metrics.counts
        async for prediction in self.worker.predictions():
            if prediction.label is not None:
                counts.predictions += 1
            host_end = self.to_host(prediction.t_window_end)
            if host_end is not None:
                prediction.age_ms = 1000 * (host_clock() - host_end)
            for publisher in self.publishers:
                publisher.publish(prediction)  # a failure is the publisher's to count
            counts.published += 1
            metrics.last_published = host_clock()
            latency = prediction.latency_ms
            metrics.observe(latency)
            if prediction.age_ms is not None:
                metrics.latency["age"].observe(prediction.age_ms)


_FROZEN = False


def _freeze_startup() -> None:
    """Once per process, at the first run: what exists then (the model, code, configs) lives
    as long as the process, so it goes out of the collector's sight and a full collection
    no longer walks it (a full collection paused a 200-subject hop ~100 ms). Collected first,
    so no garbage is frozen; later runs (a restart reload) freeze nothing more."""
    global _FROZEN
    if not _FROZEN:
        _FROZEN = True
        gc.collect()
        gc.freeze()


def _left(states) -> bool:
    """Whether a subject has left: some sensor LOST, none LIVE or STALE (a sensor that never
    delivered stays CONNECTING)."""
    states = list(states)
    return StreamState.LOST in states and all(
        s in (StreamState.LOST, StreamState.CONNECTING) for s in states
    )


def sample_faults(windowers) -> dict[str, int]:
    """Refused samples of ``windowers`` by ``sensor:reason`` (nan, future, out of order)."""
    out: dict[str, int] = {}
    for w in windowers:
        for name, buffer in w.buffers.items():
            for reason, n in (
                ("nan", w.counters.nan_samples.get(name, 0)),
                ("future", w.counters.future_samples.get(name, 0)),
                ("out_of_order", buffer.counters.out_of_order),
            ):
                if n:
                    key = f"{name}:{reason}"
                    out[key] = out.get(key, 0) + n
    return out


def run_pipeline(
    reader: Reader, windower: Windower, worker: InferenceWorker, publishers: Sequence[Publisher]
):
    """One reader through the spine (a coroutine giving the metrics): for tests and tools."""
    return Pipeline([reader], windower, worker, publishers).run()


class ServedModel(NamedTuple):
    """The model a pipeline serves, its folder, and the fallback models it vouches for (by
    the modality each does without; none with ``inference.fallbacks: false``)."""

    model: CroSSL
    directory: Path
    fallbacks: dict[str, CroSSL]


def load_served_model(cfg: PipelineConfig, base: Path, source: str) -> ServedModel:
    """The model a pipeline config serves and its fallbacks, checked against the config
    (ConfigError) and each other (CheckpointError) before anything is built or stopped."""
    model_dir = cfg.inference.model
    model_dir = (model_dir if model_dir.is_absolute() else base / model_dir) if model_dir else None
    model_dir = model_dir or default_model_dir()
    model = load_model(model_dir)
    if not model.classes:
        raise ConfigError(
            f"{source}: inference.model: {model_dir} is pretrained only (no class head); "
            f"fine-tune it first: crossl-stream finetune SPEC --from {model_dir}"
        )
    check_against_model(cfg, model, source)
    fallbacks = load_fallbacks(model, model_dir) if cfg.inference.fallbacks else {}
    return ServedModel(model, model_dir, fallbacks)


def build_worker(cfg: PipelineConfig, served: ServedModel, source: str):
    """The inference worker of ``cfg`` around the served model, on its device and runtime."""
    model, model_dir = served.model, served.directory
    inf = cfg.inference
    device = pick_device(inf.device)
    model.to(device)
    streaming = _streaming(model, inf, cfg.window.hop_s, source, cfg, model_dir)
    threads = inf.threads or (1 if device.type == "cpu" and streaming is not None else None)
    if threads:
        # one by default when streaming on the CPU: a hop is small work, the readers and
        # windowers need the other cores, and an idle OpenMP team spins (measured: 0.08 CPU
        # s/s of a 2-core box for one subject); whole windows keep torch's default
        torch.set_num_threads(threads)
    onnx = None if streaming else _onnx_session(model_dir, inf.runtime, device, source)
    main_id = model_id(model_dir)
    fallbacks = {}
    for missing, fallback in served.fallbacks.items():
        folder = fallback_dir(model_dir, missing)
        fallback.to(device)
        fb_streaming = _streaming(fallback, inf, cfg.window.hop_s, source, cfg, folder)
        fb_onnx = None if fb_streaming else _onnx_session(folder, inf.runtime, device, source)
        fb_id = f"{main_id}/{model_id(folder)}"
        fallbacks[missing] = Predictor(
            fallback, inf.device, inf.max_batch, fb_id, fb_onnx, fb_streaming
        )
    predictor = Predictor(model, inf.device, inf.max_batch, main_id, onnx, streaming, fallbacks)
    backpressure = inf.backpressure
    if backpressure is None:  # a recording can wait for the model; a live source cannot
        recorded = all(
            isinstance(r, ReplayReaderConfig)
            or (isinstance(r, SimulateReaderConfig) and r.speed == "max")
            for r in cfg.readers
        )
        backpressure = "block" if recorded else "drop_oldest"
    return InferenceWorker(predictor, inf.queue_size, inf.max_wait_ms, backpressure)


def build_publishers(cfg: PipelineConfig, ctx: BuildContext) -> list[Publisher]:
    """Each publisher of ``cfg``, named for logs and metrics (``jsonl``, ``jsonl-2``, ...)."""
    from crossl_stream.config import JsonlPublisherConfig

    paths = []
    for i, p in enumerate(cfg.publishers):
        if isinstance(p, JsonlPublisherConfig):
            path = ctx.resolve(p.path).resolve()
            if path in paths:
                raise ConfigError(
                    f"{ctx.source}: publishers.{i}: predictions are written to {path} twice"
                )
            paths.append(path)
    publishers: list[Publisher] = []
    try:
        for i, p in enumerate(cfg.publishers):
            ctx.index = i
            publishers.append(p.build(ctx))
    except BaseException:
        for publisher in publishers:  # opened files and outlets of the ones already built
            publisher.close()
        raise
    return name_publishers(publishers)


def name_publishers(publishers: list[Publisher]) -> list[Publisher]:
    """Name each publisher by its kind, numbering repeats (``jsonl``, ``jsonl-2``): the
    names label metrics and health, and must be unique."""
    seen: dict[str, int] = {}
    for publisher in publishers:
        kind = publisher.name.split("-")[0]
        seen[kind] = seen.get(kind, 0) + 1
        publisher.name = kind if seen[kind] == 1 else f"{kind}-{seen[kind]}"
    return publishers


def _build(
    cfg: PipelineConfig, base: Path, source: str, served: ServedModel | None = None
) -> Pipeline:
    served = served or load_served_model(cfg, base, source)
    model = served.model
    modality_of = {s: cfg.modality_of(s) for s in cfg.sensors}
    sensor_of = {m: s for s, m in modality_of.items()}
    windower = Windower.from_config(
        model.modalities,
        cfg.window,
        source_rates={m: cfg.sensors[s].rate_hz for m, s in sensor_of.items()},
        stale_s={m: cfg.sensors[s].stale_s for m, s in sensor_of.items()},
        emit_empty=True,
    )
    worker = build_worker(cfg, served, source)
    subjects = cfg.subjects
    admission = Admission(subjects.allow, subjects.pattern, subjects.max)
    ctx = BuildContext(
        cfg,
        base,
        source,
        model,
        worker.predictor.model_id,
        (read_meta(served.directory).get("info", {}).get("data") or {}).get("sensors", {}),
        admission,
    )
    readers = []
    for i, rc in enumerate(cfg.readers):
        ctx.index = i
        readers.append(rc.build(ctx))
    publishers = build_publishers(cfg, ctx)
    for publisher in publishers:
        publisher.log_every(cfg.daemon.log_every_s)
    # the mqtt reader stamps its receipt-clock sensors itself; others are stamped here
    from crossl_stream.config import MqttReaderConfig

    mqtt_fed = {s for r in cfg.readers if isinstance(r, MqttReaderConfig) for s in r.streams}
    receipt = {
        s: c.rate_hz for s, c in cfg.sensors.items() if c.clock == "receipt" and s not in mqtt_fed
    }
    return Pipeline(readers, windower, worker, publishers, modality_of, receipt, admission)


def _streaming(
    model: CroSSL, inf, hop_s: float, source: str, cfg=None, model_dir: Path | None = None
) -> StreamingCroSSL | None:
    """Windows sharing encoder work, batched across subjects on the model's device (small
    live hops in the model's current stream.onnx on the CPU); None when switched off, when
    whole windows in onnxruntime were asked for, or when the hop is not a whole number of
    samples of any modality (windows then share no samples)."""
    if not inf.streaming or inf.runtime == "onnx":
        return None
    field = model.receptive_field
    shared = [  # modalities whose consecutive windows share samples on one grid
        m.name
        for m in model.modalities
        if abs(hop_s * m.rate_hz - round(hop_s * m.rate_hz)) < 1e-6
        and 1 <= round(hop_s * m.rate_hz) <= m.samples - field + 1
    ]
    if not shared:
        log.info(
            "%s: with window.hop_s %g s no modality's windows share encoder features; every "
            "window is encoded whole",
            source,
            hop_s,
        )
        return None
    subjects = cfg.subjects.max + 1 if cfg is not None else 257  # + the default subject
    step = None
    cpu = model.mask_token.device.type == "cpu"
    if model_dir is not None and inf.runtime == "auto" and inf.precision == "fp32" and cpu:
        try:
            step = OnnxStep(model_dir / STREAM_FILE, model, weights_digest(model_dir / WEIGHTS))
        except CheckpointError as exc:
            log.info("%s; small hops in torch", exc)
    return StreamingCroSSL(model, max_streams=subjects, precision=inf.precision, step=step)


def _onnx_session(model_dir: Path, runtime: str, device, source: str) -> OnnxModel | None:
    """The model's onnxruntime session when ``runtime`` asks for it (or ``auto`` finds a
    current export and runs on the CPU); None: eager torch."""
    if runtime == "torch" or (runtime == "auto" and device.type != "cpu"):
        return None
    if runtime == "onnx" and device.type != "cpu":
        raise ConfigError(
            f"{source}: inference.runtime: onnx runs on the CPU here; use torch on {device}"
        )
    path = model_dir / ONNX_FILE
    if runtime == "auto" and not path.is_file():
        return None
    try:
        return OnnxModel(path, weights_digest(model_dir / WEIGHTS))
    except CheckpointError as exc:
        if runtime == "onnx":
            raise
        log.warning("%s; running the model in torch instead", exc)
        return None


def check_against_model(cfg: PipelineConfig, model: CroSSL, source: str) -> None:
    """ConfigError, naming the key, wherever the config and the model disagree."""
    specs = {m.name: m for m in model.modalities}
    problems = []
    fed = {}
    for name, sensor in cfg.sensors.items():
        modality = cfg.modality_of(name)
        fed[modality] = name
        spec = specs.get(modality)
        if spec is None:
            problems.append(
                f"sensors.{name}: modality {modality!r} is not one of the model's {list(specs)}"
            )
        elif sensor.channels != spec.channels:
            problems.append(
                f"sensors.{name}.channels: {sensor.channels}, but the model's {modality!r} "
                f"has {spec.channels}"
            )
    for modality in specs:
        if modality not in fed:
            problems.append(
                f"sensors: no sensor feeds the model's modality {modality!r} (a sensor that "
                "drops out at run time is masked, but each modality needs one configured)"
            )
    for modality, rate in cfg.window.target_rates.items():
        spec = specs.get(modality)
        if spec is None:
            problems.append(f"window.target_rates.{modality}: not a modality of the model")
        elif abs(rate - spec.rate_hz) > 1e-9:
            problems.append(
                f"window.target_rates.{modality}: {rate:g} Hz, but the model was trained on "
                f"{spec.rate_hz:g} Hz"
            )
    if cfg.window.length_s is not None and abs(cfg.window.length_s - model.window_s) > 1e-9:
        problems.append(
            f"window.length_s: {cfg.window.length_s:g} s, but the model's windows are "
            f"{model.window_s:g} s"
        )
    if problems:
        raise ConfigError("\n".join(f"{source}: {p}" for p in problems))
