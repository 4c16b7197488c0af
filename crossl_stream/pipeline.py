"""Pipeline: readers -> windower -> inference worker -> publishers, as asyncio tasks.

``Pipeline.from_config`` wires a validated ``PipelineConfig`` into running parts, checking
the config against the model it loads; ``run`` plays until every reader ends (or ``stop``),
then drains: every window cut is predicted and published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossl_stream import default_model_dir
from crossl_stream.config import (
    ConsolePublisherConfig,
    JsonlPublisherConfig,
    LslPublisherConfig,
    LslReaderConfig,
    MqttPublisherConfig,
    MqttReaderConfig,
    PipelineConfig,
    ReplayReaderConfig,
    SimulateReaderConfig,
)
from crossl_stream.errors import CheckpointError, ConfigError, InputError
from crossl_stream.inference import InferenceWorker, Predictor, pick_device
from crossl_stream.model.checkpoint import WEIGHTS, load_model, model_id, read_meta
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.export import ONNX_FILE, OnnxModel, OnnxRuntime, weights_digest
from crossl_stream.model.streaming import StreamingCroSSL
from crossl_stream.publishers import ConsolePublisher, JsonlPublisher
from crossl_stream.publishers.base import Publisher
from crossl_stream.readers.base import Chunk, Reader
from crossl_stream.states import StreamState
from crossl_stream.windower import Windower

log = logging.getLogger(__name__)


@dataclass
class PipelineCounters:
    """What went through the pipeline, and what it refused."""

    chunks: int = 0
    bad_chunks: int = 0  # refused with an InputError (wrong shape, unknown sensor, ...)
    windows: int = 0
    predictions: int = 0


class Pipeline:
    """Owns the running parts of one stream: its readers, the windower, the inference worker
    and the publishers, and what they counted.

    ``modality_of`` maps a reader's sensor names onto the windower's modalities (default:
    the same names); sensors in ``receipt_rates`` get receipt-time stamps (their samples
    spread back from the chunk's arrival at that rate).
    """

    max_subjects = 256  # live subjects at once: a windower and kept features each

    def __init__(
        self,
        readers: Sequence[Reader],
        windower: Windower,
        worker: InferenceWorker,
        publishers: Sequence[Publisher],
        modality_of: Mapping[str, str] | None = None,
        receipt_rates: Mapping[str, float] | None = None,
    ) -> None:
        if not readers:
            raise ValueError("a pipeline needs at least one reader")
        self.readers = list(readers)
        self.windower = windower  # the default subject's; others are made alike on demand
        self.windowers = {windower.subject: windower}
        self.worker = worker
        self.publishers = list(publishers)
        self.modality_of = dict(modality_of or {})
        self.receipt_rates = dict(receipt_rates or {})
        self.counters = PipelineCounters()
        self._stopping: asyncio.Event | None = None

    def windower_of(self, subject: str) -> Windower | None:
        """The windower of ``subject``'s sensors, made on first use (None: too many)."""
        windower = self.windowers.get(subject)
        if windower is None:
            if len(self.windowers) >= self.max_subjects:
                return None
            windower = self.windowers[subject] = self.windower.fresh(subject)
            log.info("subject %r: first data; windows of its own", subject)
        return windower

    @classmethod
    def from_config(
        cls, cfg: PipelineConfig, base: str | Path = ".", source: str = "config"
    ) -> Pipeline:
        """Build every part of ``cfg``; relative paths resolve against ``base``.

        Raises ConfigError (naming ``source`` and the key) when the config and the model
        disagree, and the readers' own errors for missing or unreadable recordings.
        """
        return _build(cfg, Path(base), source)

    @property
    def model(self) -> CroSSL:
        return self.worker.predictor.model

    def stop(self) -> None:
        """End the readers; what was already read is still windowed, predicted, published."""
        if self._stopping is not None:
            self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether ``stop`` was called on the current run."""
        return self._stopping is not None and self._stopping.is_set()

    async def run(self) -> PipelineCounters:
        """Play until every reader ends or ``stop`` is called, then drain."""
        self._stopping = asyncio.Event()
        for publisher in self.publishers:
            await publisher.start()
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
            try:
                await publishing
            finally:
                for publisher in self.publishers:
                    try:
                        await publisher.aclose()
                    except Exception:  # the others still close
                        log.exception("closing publisher %s failed", type(publisher).__name__)
        if failure is not None:
            raise failure
        return self.counters

    async def _put(self, window) -> None:
        self.counters.windows += 1
        await self.worker.put(window)

    async def _ingest(self, reader: Reader) -> None:
        counters = self.counters
        async with contextlib.aclosing(reader.chunks()) as chunks:  # closed when cancelled
            async for chunk in chunks:
                counters.chunks += 1
                windower = self.windowers.get(chunk.subject) or self.windower_of(chunk.subject)
                if windower is None:
                    counters.bad_chunks += 1
                    if counters.bad_chunks <= 10 or counters.bad_chunks % 1000 == 0:
                        log.warning("chunk of subject %r refused: too many", chunk.subject)
                    continue
                try:
                    windower.push(
                        self.modality_of.get(chunk.sensor, chunk.sensor),
                        chunk.values,
                        self._timestamps(chunk),
                        chunk.arrival,
                        chunk.received,
                    )
                except InputError as exc:
                    counters.bad_chunks += 1
                    log.warning("chunk of %r refused: %s", chunk.sensor, exc)
                    continue
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
        """Drop the windowers of subjects whose every sensor is LOST at ``now``, after
        flushing what they hold, so that wearables that come and go do not pile up; readers
        that keep per-subject state forget it too. Returns the subjects retired."""
        gone = [
            subject
            for subject, w in self.windowers.items()
            if w is not self.windower
            and all(state == StreamState.LOST for state in w.states(now).values())
        ]
        for subject in gone:
            for window in self.windowers.pop(subject).flush():
                await self._put(window)
            for reader in self.readers:
                forget = getattr(reader, "forget", None)
                if forget is not None:
                    forget(subject)
            self.worker.predictor.forget(subject)
            log.info("subject %r: every sensor lost; its windows end here", subject)
        return gone

    async def _publish(self) -> None:
        async for prediction in self.worker.predictions():
            self.counters.predictions += 1
            for publisher in self.publishers:
                try:
                    publisher.publish(prediction)
                except Exception:  # one broken destination must not stop the others
                    log.exception("publisher %s failed", type(publisher).__name__)


def run_pipeline(
    reader: Reader, windower: Windower, worker: InferenceWorker, publishers: Sequence[Publisher]
):
    """One reader through the spine (a coroutine giving the counters): for tests and tools."""
    return Pipeline([reader], windower, worker, publishers).run()


def _build(cfg: PipelineConfig, base: Path, source: str) -> Pipeline:
    def resolve(path: Path) -> Path:
        return path if path.is_absolute() else base / path

    model_dir = resolve(cfg.inference.model) if cfg.inference.model else default_model_dir()
    model = load_model(model_dir)
    if not model.classes:
        raise ConfigError(
            f"{source}: inference.model: {model_dir} is pretrained only (no class head); "
            f"fine-tune it first: crossl-stream finetune SPEC --from {model_dir}"
        )
    check_against_model(cfg, model, source)
    modality_of = {s: cfg.modality_of(s) for s in cfg.sensors}
    sensor_of = {m: s for s, m in modality_of.items()}
    w = cfg.window
    windower = Windower.from_config(
        model.modalities,
        w,
        source_rates={m: cfg.sensors[s].rate_hz for m, s in sensor_of.items()},
        stale_s={m: cfg.sensors[s].stale_s for m, s in sensor_of.items()},
    )
    inf = cfg.inference
    if inf.threads:
        import torch

        torch.set_num_threads(inf.threads)
    device = pick_device(inf.device)
    model.to(device)
    streaming = _streaming(model, model_dir, inf, w.hop_s, device, source)
    onnx = None if streaming else _onnx_session(model_dir, inf.runtime, device, source)
    predictor = Predictor(model, inf.device, inf.max_batch, model_id(model_dir), onnx, streaming)
    backpressure = inf.backpressure
    if backpressure is None:  # a recording can wait for the model; a live source cannot
        recorded = all(
            isinstance(r, ReplayReaderConfig)
            or (isinstance(r, SimulateReaderConfig) and r.speed == "max")
            for r in cfg.readers
        )
        backpressure = "block" if recorded else "drop_oldest"
    worker = InferenceWorker(predictor, inf.queue_size, inf.max_wait_ms, backpressure)
    known = read_meta(model_dir).get("info", {}).get("data", {}) or {}
    readers = [_reader(cfg, r, resolve, source, known.get("sensors", {})) for r in cfg.readers]
    publishers: list[Publisher] = []
    for p in cfg.publishers:
        if isinstance(p, JsonlPublisherConfig):
            path = resolve(p.path)
            if any(isinstance(q, JsonlPublisher) and q.same_file(path) for q in publishers):
                raise ConfigError(f"{source}: predictions are written to {path} twice")
            publishers.append(JsonlPublisher(path, append=p.append))  # refuses a used file
        elif isinstance(p, ConsolePublisherConfig):
            publishers.append(ConsolePublisher(every=p.every))
        elif isinstance(p, MqttPublisherConfig):
            from crossl_stream.publishers.mqtt import MqttPublisher

            publishers.append(
                MqttPublisher(
                    _broker(p.broker, resolve, source),
                    predictor.model_id,
                    p.topic,
                    p.status_topic,
                    p.qos,
                )
            )
        elif isinstance(p, LslPublisherConfig):
            from crossl_stream.publishers.lsl import LslPublisher

            publishers.append(
                LslPublisher(model.classes, predictor.model_id, p.name, p.source_id, 1 / w.hop_s)
            )
    # the mqtt reader stamps its receipt-clock sensors itself; others are stamped here
    mqtt_fed = {s for r in cfg.readers if isinstance(r, MqttReaderConfig) for s in r.streams}
    receipt = {
        s: c.rate_hz for s, c in cfg.sensors.items() if c.clock == "receipt" and s not in mqtt_fed
    }
    return Pipeline(readers, windower, worker, publishers, modality_of, receipt)


def _streaming(
    model: CroSSL, model_dir: Path, inf, hop_s: float, device, source: str
) -> StreamingCroSSL | None:
    """Windows sharing encoder features, in onnxruntime on the CPU where the model has a
    current streaming export (else torch); None when switched off or when the hop is not a
    whole number of samples of every modality (windows then share no samples)."""
    if not inf.streaming:
        return None
    if inf.runtime == "onnx" and device.type != "cpu":
        raise ConfigError(
            f"{source}: inference.runtime: onnx runs on the CPU here; use torch on {device}"
        )
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
    subjects = Pipeline.max_subjects
    if inf.runtime == "torch" or device.type != "cpu":
        return StreamingCroSSL(model, max_streams=subjects)
    try:
        digest = weights_digest(model_dir / WEIGHTS)
        runtime = OnnxRuntime(model_dir, model, digest, inf.threads)
        return StreamingCroSSL(model, runtime, max_streams=subjects)
    except CheckpointError as exc:
        if inf.runtime == "onnx":
            raise
        log.warning("%s; streaming in torch instead", exc)
        return StreamingCroSSL(model, max_streams=subjects)


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


def _reader(
    cfg: PipelineConfig, rc, resolve, source: str, known: Mapping[str, Mapping] | None = None
) -> Reader:
    """The reader ``rc`` configures; ``known`` (modality -> the stream name and type it was
    trained on) finds a replayed sensor's stream when the file names it otherwise."""
    if isinstance(rc, ReplayReaderConfig):
        from crossl_stream.readers.replay import Recording, Replay, max_speed_chunk_s
        from crossl_stream.training.datasets import data_cache, shipped_recording
        from crossl_stream.training.spec import find_stream

        if rc.path is None:
            path = shipped_recording()
        else:  # {data}: the data cache
            path = resolve(Path(str(rc.path).replace("{data}", str(data_cache()))))
        recording = Recording.load(path)
        names = {}
        for s in cfg.reader_sensors(rc):
            trained = (known or {}).get(cfg.modality_of(s), {})
            if s in rc.streams:  # named in the config: that stream or an error
                names[s] = find_stream(recording, s, [rc.streams[s]])
            else:
                wanted = [s, trained.get("stream")]
                names[s] = find_stream(recording, s, wanted, trained.get("type"))
        dropouts: dict[str, list[tuple[float, float]]] = {}
        for d in rc.dropouts:
            dropouts.setdefault(d.sensor, []).append((d.start_s, d.length_s))
        end = rc.start_s + rc.duration_s if rc.duration_s else np.inf
        chunk_s = rc.chunk_s
        if chunk_s is None:  # windows do not depend on chunking while chunks come < stale_s
            stale = min(cfg.sensors[s].stale_s or cfg.window.stale_s for s in names)
            chunk_s = 0.04 if rc.speed != "max" else max_speed_chunk_s(stale)
        reader = Replay(
            recording,
            names,
            None if rc.speed == "max" else float(rc.speed),
            chunk_s=chunk_s,
            dropouts=dropouts,
            section=(rc.start_s, end),
        )
        for sensor, info in reader.sensors.items():
            want = cfg.sensors[sensor]
            if info.channels != want.channels:
                raise ConfigError(
                    f"{source}: sensors.{sensor}.channels: {want.channels}, but stream "
                    f"{names[sensor]!r} of {path.name} has {info.channels}"
                )
            if info.rate_hz > 0 and abs(info.rate_hz - want.rate_hz) > 0.01 * want.rate_hz:
                raise ConfigError(  # nominal rate 0: an irregular stream, nothing to compare
                    f"{source}: sensors.{sensor}.rate_hz: {want.rate_hz:g} Hz, but stream "
                    f"{names[sensor]!r} of {path.name} has a nominal rate of {info.rate_hz:g} Hz"
                )
        return reader
    if isinstance(rc, SimulateReaderConfig):
        from crossl_stream.readers.simulate import SimulatedSensor, Simulator

        sims = [
            SimulatedSensor(
                name,
                cfg.sensors[name].channels,
                cfg.sensors[name].rate_hz,
                kind=s.kind,
                chunk_s=s.chunk_s,
                jitter_s=s.jitter_s,
                dropouts=s.dropouts,
            )
            for name, s in rc.sensors.items()
        ]
        speed = None if rc.speed == "max" else float(rc.speed)
        return Simulator(sims, rc.duration_s, speed=speed, seed=rc.seed)
    if isinstance(rc, LslReaderConfig):
        from crossl_stream.readers.base import SensorInfo
        from crossl_stream.readers.lsl import LslReader, LslSelector

        streams = {
            name: (
                SensorInfo(name, cfg.sensors[name].channels, cfg.sensors[name].rate_hz),
                LslSelector(**s.model_dump()),
            )
            for name, s in rc.streams.items()
        }
        grace = cfg.window.connect_grace_s  # then a missing stream is named, with what is seen
        return LslReader(streams, rc.watchdog_s, rc.lost_s, rc.resolve_s, connect_grace_s=grace)
    if isinstance(rc, MqttReaderConfig):
        from crossl_stream.readers.base import SensorInfo
        from crossl_stream.readers.mqtt import MqttReader, MqttTopic

        streams = {
            name: (
                SensorInfo(name, cfg.sensors[name].channels, cfg.sensors[name].rate_hz),
                MqttTopic(t.topic, t.format, cfg.sensors[name].clock == "receipt"),
            )
            for name, t in rc.streams.items()
        }
        return MqttReader(_broker(rc.broker, resolve, source), streams, rc.qos)
    raise ConfigError(f"{source}: unknown reader {rc!r}")


def _broker(b, resolve, source: str):
    """A Broker from its config; the password read from the environment variable named."""
    import os

    from crossl_stream.broker import Broker

    password = None
    if b.password_env:
        password = os.environ.get(b.password_env)
        if password is None:
            raise ConfigError(
                f"{source}: broker.password_env: environment variable {b.password_env} is not set"
            )
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(b, key)
        if path is not None and not resolve(path).is_file():
            raise ConfigError(f"{source}: broker.{key}: {resolve(path)} is not a file")
    files = {
        k: str(resolve(v)) if v else None
        for k, v in (("ca_file", b.ca_file), ("cert_file", b.cert_file), ("key_file", b.key_file))
    }
    return Broker(
        b.host,
        b.port,
        b.username,
        password,
        b.tls,
        **files,
        client_id=b.client_id,
        keepalive=b.keepalive,
    )
