"""YAML -> validated config objects. Every error names the file, the key and the reason."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from crossl_stream.errors import ConfigError
from crossl_stream.model.crossl import ModelConfig

if TYPE_CHECKING:
    from crossl_stream.broker import Broker
    from crossl_stream.pipeline import BuildContext
    from crossl_stream.publishers.base import Publisher
    from crossl_stream.readers.base import Reader


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _id_text(value: object) -> object:
    """Subject and session ids are strings; YAML's ``10`` means ``"10"``."""
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


Id = Annotated[str, BeforeValidator(_id_text)]


class MaskingConfig(_Strict):
    """Latent masking used to make the two SSL views (and during fine-tuning)."""

    strategy: Literal["spatial", "random", "temporal"] = "spatial"
    keep: float = Field(0.9, gt=0.0, le=1.0)


class LossConfig(_Strict):
    """VICReg weights (the reference's runs: 10 / 10 / 100)."""

    invariance: float = Field(10.0, ge=0.0)
    variance: float = Field(10.0, ge=0.0)
    covariance: float = Field(100.0, ge=0.0)


class AugmentConfig(_Strict):
    """Signal augmentations applied to each view's raw input, each off at 0.

    ``scale``: std of a per-window, per-channel gain around 1. ``jitter``: std of added
    Gaussian noise, in units of each channel's standard deviation. ``rotate_deg``: the
    largest angle of a random 3-D rotation applied to the ``vectors`` modalities of a window
    (the same rotation for all of them: sensors on one device turn together). ``time_warp``:
    how far a smooth random warp may move a sample, as a fraction of the window (below 1/6,
    so time never runs backwards).
    """

    scale: float = Field(0.0, ge=0.0, le=0.5)
    jitter: float = Field(0.0, ge=0.0)
    rotate_deg: float = Field(0.0, ge=0.0, le=180.0)
    vectors: tuple[str, ...] | None = Field(
        None,
        description="modalities that are 3-axis vectors (accelerometer, gyroscope, "
        "magnetometer) for rotate_deg; default: every 3-channel modality",
    )
    time_warp: float = Field(0.0, ge=0.0, lt=1 / 6)

    @property
    def active(self) -> bool:
        return any((self.scale, self.jitter, self.rotate_deg, self.time_warp))


TrainingPrecision = Annotated[
    Literal["fp32", "bf16"],
    Field(
        description="bf16: the convolutions and linear layers run in bfloat16 while "
        "training (torch autocast; weights, optimiser, loss and evaluation stay fp32): a "
        "watch training step took 0.75x the fp32 time on a CPU with AVX512-BF16 and AMX; "
        "CPUs without BF16 emulate it (slower); GPUs need bfloat16 support (Ampere or newer)"
    ),
]


class PretrainConfig(_Strict):
    """Self-supervised pretraining: budget, expander and augmentations of the two views."""

    steps: int = Field(300, ge=0)
    batch_size: int = Field(256, ge=16, description="VICReg statistics need a real batch")
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    expander: tuple[Annotated[int, Field(gt=0)], ...] = Field(
        (),
        description="widths of the MLP the VICReg loss sees the embedding through (VICReg's "
        "expander, dropped after pretraining); empty: the loss acts on the embedding",
    )
    augment: AugmentConfig = AugmentConfig()
    precision: TrainingPrecision = "fp32"


class FinetuneConfig(_Strict):
    """Supervised budget, shared by fine-tuning, probing and the supervised baseline.

    Without a validation set: ``epochs`` passes over the labelled windows, clipped to
    [min_steps, max_steps] steps. With one: epochs of one pass (at least ``min_epoch_steps``
    steps), each followed by a validation pass; training stops once validation macro-F1 has
    not improved for ``patience`` epochs (or after ``max_epochs``) and keeps the best epoch.
    ``max_epochs`` is a safety cap, set far beyond where patience stops a converging run.
    """

    epochs: int = Field(30, gt=0)
    min_steps: int = Field(100, ge=1)
    max_steps: int = Field(400, ge=1)
    max_epochs: int = Field(200, ge=1, description="cap with a validation set")
    patience: int = Field(10, ge=1, description="epochs without a better validation score")
    min_epoch_steps: int = Field(10, ge=1, description="steps between two validation passes")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    probe_lr: float = Field(1e-2, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    modality_dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="probability that each available modality of a training window is "
        "hidden (never all of them): what teaches a classifier to do without a sensor; the "
        "same for every arm (fine-tune, supervised)",
    )
    augment: bool = Field(
        False,
        description="apply pretrain.augment to classifier training too (every arm but the "
        "probe, whose encoder is frozen)",
    )
    precision: TrainingPrecision = "fp32"
    fallbacks: bool = Field(
        False,
        description="`train` also trains, for each modality, a supervised model on the "
        "others (model/fallback/without-<m>); a window missing exactly that modality is "
        "served by it instead of the main model with a masked latent",
    )
    validate_alone: bool = Field(
        False,
        description="early stopping scores each epoch by the mean of the validation macro-F1 "
        "with every modality and with each alone (on the validation windows that have it), "
        "not the first only: keeps the epoch that works best without a sensor too (every arm "
        "but the probe)",
    )

    @model_validator(mode="after")
    def _steps_in_order(self) -> FinetuneConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) exceeds max_steps ({self.max_steps})")
        return self


ARMS = ("supervised", "supervised-aug", "supervised-plain", "crossl", "crossl-all", "probe")
Arm = Literal["supervised", "supervised-aug", "supervised-plain", "crossl", "crossl-all", "probe"]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


class EvaluationConfig(_Strict):
    """What `crossl-stream eval` runs: each fold holds out one group (a subject or a
    session) for testing; models see the other groups only.

    ``arms`` names each arm and the label fractions it runs at:
    ``supervised`` (from scratch, with ``finetune.modality_dropout`` and augmentation as
    configured), ``supervised-aug`` (the same, always with ``pretrain.augment``: the
    augmentations pretraining sees), ``supervised-plain`` (from scratch, neither),
    ``crossl`` (pretrained on the
    training groups, fine-tuned), ``crossl-all`` (pretrained on every window, the test
    group's too, without labels; fine-tuned on the training groups' labels), ``probe`` (a
    linear head on the ``crossl`` encoder). Each arm runs once per seed in ``seeds``, except
    at label fraction 1.0 (the costliest, least variable runs): the first ``seeds_at_full``.

    ``ablation`` maps a variant name to overrides of this spec (e.g. ``{pretrain: {expander:
    []}}``); each is pretrained on the training groups of each of ``ablation_folds`` less a
    validation group, and scored on that validation group only (a linear probe on every
    label, fine-tuning on 1% of them). With ``select``, the variant with the best mean
    validation score is the one the folds run, if it beats the spec itself (the variant
    ``base``) by ``select_margin``; otherwise the spec as written.
    """

    by: Literal["subject", "session"] = Field(
        "subject", description="what a fold holds out; a session is named SUBJECT/SESSION"
    )
    arms: dict[Arm, tuple[Fraction, ...]] = {
        "supervised": (0.01, 0.1, 1.0),
        "crossl": (0.01, 0.1, 1.0),
        "probe": (0.01, 0.1, 1.0),
    }
    seeds: tuple[int, ...] = Field((0,), min_length=1)
    seeds_at_full: int = Field(1, ge=1)
    folds: tuple[Id, ...] | None = Field(None, description="groups to hold out; None = each")
    ablation: dict[str, dict] = {}
    ablation_folds: tuple[Id, ...] = ()
    ablation_curve_steps: int = Field(
        0,
        ge=0,
        description="pretrain the base variant this long on the first ablation fold, "
        "scoring a probe on its validation group every tenth of it (0: skip)",
    )
    select: bool = False
    select_margin: float = Field(
        0.01,
        ge=0.0,
        description="how much a variant's validation score (macro-F1, 0.01 = one point) "
        "must beat the spec's to replace it: smaller differences on a few validation groups "
        "are noise, and following them flips the spec from run to run",
    )
    supervised_goal: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="the macro-F1 supervised with every label should reach for the baseline "
        "to be worth beating (the watch protocol: 0.83); reported as a target (None: no such "
        "target; such a goal belongs to one data set)",
    )
    tuned_on: tuple[Id, ...] = Field(
        (),
        description="groups whose labels informed this spec's settings by hand (e.g. the "
        "validation groups of an earlier ablation): they are test groups too, so the report "
        "repeats the paired comparisons without them",
    )

    @model_validator(mode="after")
    def _arms_given(self) -> EvaluationConfig:
        if not self.arms or not any(self.arms.values()):
            raise ValueError("arms: name at least one arm with a label fraction")
        if "base" in self.ablation:
            raise ValueError("ablation: 'base' is the spec itself; name variants otherwise")
        if (self.ablation or self.ablation_curve_steps) and not self.ablation_folds:
            raise ValueError("ablation: needs ablation_folds (folds whose training groups it uses)")
        return self


# -- the streaming pipeline (`crossl-stream run CONFIG`) -------------------------------------

Speed = Literal["max"] | Annotated[float, Field(gt=0.0)]


class SensorConfig(_Strict):
    """One sensor stream: the model modality it feeds, its shape, nominal rate and clock.

    ``clock``: ``source`` keeps the reader's timestamps (on the host time base: XDF replay,
    LSL after clock correction, MQTT device times after the offset + drift fit); ``receipt``
    stamps each chunk at its arrival and spreads its samples back at the nominal rate
    (devices without usable timestamps).
    """

    modality: str | None = Field(None, description="model modality; default: the sensor name")
    channels: int = Field(gt=0)
    rate_hz: float = Field(gt=0.0, description="nominal sampling rate")
    clock: Literal["source", "receipt"] = "source"
    stale_s: float | None = Field(None, gt=0.0, description="default: window.stale_s")


class WindowConfig(_Strict):
    """Windowing on the host clock. Length and per-modality target rates come from the model;
    when given here they must agree with it."""

    length_s: float | None = Field(None, gt=0.0)
    hop_s: float = Field(0.5, gt=0.0)
    lateness_s: float = Field(0.05, ge=0.0)
    stale_s: float = Field(0.5, gt=0.0, description="silence that takes a sensor out")
    lost_s: float = Field(5.0, gt=0.0)
    min_coverage: float = Field(0.8, gt=0.0, le=1.0)
    connect_grace_s: float = Field(2.0, ge=0.0)
    max_future_s: float = Field(1.0, gt=0.0)
    target_rates: dict[str, Annotated[float, Field(gt=0.0)]] = {}

    @model_validator(mode="after")
    def _lost_after_stale(self) -> WindowConfig:
        if self.lost_s < self.stale_s:
            raise ValueError(f"lost_s ({self.lost_s}) is shorter than stale_s ({self.stale_s})")
        return self


# -- data sets and training (`crossl-stream pretrain / finetune / train / eval SPEC`) -----


class MarkerLabels(_Strict):
    """Labels from a string marker stream: a marker that maps to a class starts it.

    A label holds until the next marker that is not ignored (``hold: next``), or for
    ``hold`` seconds (cut short by the next marker). A marker mapped to ``null``, or listed
    in ``end``, ends the current label; so does a marker that ``map`` does not name.
    """

    stream: str | None = Field(None, description="marker stream name; default: every one")
    prefix: str = Field("", description="only markers starting with it count; it is removed")
    map: dict[str, str | None] = Field(
        {}, description="marker -> class (null: ends the label); empty: a marker is its class"
    )
    hold: Literal["next"] | Annotated[float, Field(gt=0.0)] = "next"
    ignore: tuple[str, ...] = Field((), description="markers that neither start nor end one")
    end: tuple[str, ...] = Field((), description="markers that end the current label")


class IntervalLabels(_Strict):
    """Labels from a CSV (header ``start,end,label``) or JSON (a list of objects with those
    keys) file per recording; ``{stem}`` in ``path`` is the recording's file name without
    its suffix, and a relative path is relative to the recording's folder."""

    path: str = Field(min_length=1)
    time: Literal["recording", "relative"] = Field(
        "recording",
        description="recording: on the recording's clock; relative: seconds from its start",
    )
    map: dict[str, str | None] = Field({}, description="label -> class (null: no label)")


class LabelRules(_Strict):
    """Where window labels come from: markers or an intervals file (one of them). A window
    is labelled when one label covers all of it."""

    markers: MarkerLabels | None = None
    intervals: IntervalLabels | None = None
    classes: tuple[str, ...] | None = Field(None, description="class order; default: as found")

    @model_validator(mode="after")
    def _one_source(self) -> LabelRules:
        if (self.markers is None) == (self.intervals is None):
            raise ValueError("give exactly one of markers, intervals")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes repeat a name: {list(self.classes)}")
        return self


LABEL_MARKERS = LabelRules(markers=MarkerLabels(prefix="label:", end=("none",)))
"""The rule of the project's own recordings: ``label:NAME`` starts, ``label:none`` ends."""


class SensorSpec(_Strict):
    """One model modality in a data set: the stream that feeds it and its target rate."""

    stream: str | None = Field(None, description="stream name; default: the sensor's name")
    type: str | None = Field(None, description="stream type, when names differ between files")
    rate_hz: float = Field(gt=0.0, description="target rate: windows are resampled onto it")
    channels: int | None = Field(None, gt=0, description="checked against every file")


class RecordingSource(_Strict):
    """XDF files (a path or a glob) and, when given, their subject and session."""

    path: str = Field(min_length=1)
    subject: Id | None = None
    session: Id | None = None
    labelled: bool = Field(
        True, description="false: no labels are read from these files (e.g. a new subject's)"
    )


BIDS_IDS = r"sub-(?P<subject>[A-Za-z0-9]+)(?:_ses-(?P<session>[A-Za-z0-9]+))?"


class DatasetSpec(_Strict):
    """Recordings, the sensors in them, how they are cut into windows and labelled.

    ``recordings`` are XDF files or globs (``{data}`` is the data cache; relative paths are
    relative to the spec file). A recording's subject and session come from the entry, else
    the XDF file header (``<subject>``, ``<session>``), else ``ids`` matched on the file
    name (named groups ``subject``, ``session``), else the file name itself.
    """

    name: str | None = Field(None, description="default: the spec file's name")
    recordings: tuple[RecordingSource | str, ...] = Field(min_length=1)
    ids: str = Field(BIDS_IDS, description="regex on the file name")
    sensors: dict[str, SensorSpec] = Field(min_length=1)
    window: WindowConfig = WindowConfig(length_s=2.0)
    labels: LabelRules | None = Field(None, description="none: unlabelled (pretraining only)")

    @model_validator(mode="after")
    def _window_length(self) -> DatasetSpec:
        if self.window.length_s is None:
            raise ValueError("window.length_s is needed to cut training windows")
        if self.window.target_rates:
            raise ValueError("window.target_rates: give each sensor's rate_hz instead")
        return self

    @field_validator("ids")
    @classmethod
    def _ids_pattern(cls, ids: str) -> str:
        try:
            pattern = re.compile(ids)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc})") from exc
        unknown = set(pattern.groupindex) - {"subject", "session"}
        if unknown:
            raise ValueError(f"unknown groups {sorted(unknown)}; use subject, session")
        return ids

    @property
    def sources(self) -> list[RecordingSource]:
        return [RecordingSource(path=r) if isinstance(r, str) else r for r in self.recordings]


class TrainConfig(_Strict):
    """A training spec: the data set, the model, and how it is pretrained, fine-tuned and
    evaluated (``crossl-stream pretrain / finetune / train / eval SPEC``)."""

    data: DatasetSpec
    holdout: tuple[Id, ...] = Field(
        (),
        description="subjects or SUBJECT/SESSION sessions whose labels pretrain / finetune / "
        "train never use (e.g. the demo's subject); eval holds out every group in turn, "
        "these included",
    )
    pretrain_on: Literal["train", "all"] = Field(
        "train",
        description="pretrain / train: train: pretraining sees no holdout window; all: it "
        "also sees theirs, without labels (a lab has a new subject's unlabelled recording "
        "before their labels). eval runs both as arms: crossl (strict) and crossl-all",
    )
    recipe: Literal["crossl", "supervised", "best"] = Field(
        "crossl",
        description="what `crossl-stream train` makes: crossl (pretrain, then fine-tune), "
        "supervised (the same architecture from scratch on the labels, with the finetune "
        "settings), or best (both, keeping the one with the better validation macro-F1)",
    )
    seed: int = 0
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    loss: LossConfig = LossConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluation: EvaluationConfig = EvaluationConfig()


# -- the streaming pipeline: inference, readers, publishers ----------------------------------


class InferenceConfig(_Strict):
    """The model, where it runs, and how windows queue for it."""

    model: Path | None = Field(None, description="model directory; default: models/default")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    runtime: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="whole windows (streaming off): auto is onnxruntime on the CPU when the "
        "model has a current export; onnx asks for whole windows in onnxruntime even with "
        "streaming on",
    )
    max_batch: int = Field(32, ge=1, le=4096)
    max_wait_ms: float = Field(0.0, ge=0.0, description="wait this long for a fuller batch")
    queue_size: int = Field(64, ge=1)
    backpressure: Literal["drop_oldest", "block"] | None = Field(
        None,
        description="block: a full queue makes the readers wait (nothing lost); drop_oldest: "
        "the oldest queued window is dropped and counted (a live source cannot wait); None "
        "(omitted): block when every reader is a replay or a max-speed simulation, else "
        "drop_oldest",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="torch threads; default: 1 when streaming on the CPU (more pays only for "
        "many subjects per hop: tools/bench_scale.py), else torch's",
    )
    fallbacks: bool = Field(
        True,
        description="serve a window missing one modality with the model folder's fallback "
        "trained without it (if the folder has one; `finetune.fallbacks` in training)",
    )
    streaming: bool = Field(
        True,
        description="overlapping windows share encoder features: each window encodes only its "
        "new samples, all subjects of a hop in one batch (the same predictions, up to float "
        "rounding)",
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: the streaming convolutions as bfloat16 GEMMs (~3x faster GEMMs on "
        "CPUs with AVX512-BF16; the whole worker 0-30% on the lab load, docs/benchmarks.md); "
        "probabilities within ~1e-2 of fp32 (tools/bench_scale.py --check measures it)",
    )


class DropoutConfig(_Strict):
    """Rehearse a sensor loss: no samples of ``sensor`` for ``length_s`` from ``start_s``."""

    sensor: str
    start_s: float = Field(ge=0.0)
    length_s: float = Field(gt=0.0)


class ReplayReaderConfig(_Strict):
    """Plays an XDF recording (default: the shipped held-out session; ``{data}`` in the path
    is the data cache)."""

    kind: Literal["replay"]
    path: Path | None = None
    speed: Speed = "max"
    chunk_s: float | None = Field(
        None,
        gt=0.0,
        description="default: 0.04 s paced; at max speed half the shortest stale_s, at most "
        "0.25 s (the same windows from fewer chunks)",
    )
    streams: dict[str, str] = Field(
        {},
        description="sensor -> stream name; default: the stream of the sensor's name, else the "
        "model's stream of that name or type",
    )
    dropouts: tuple[DropoutConfig, ...] = ()
    start_s: float = Field(0.0, ge=0.0)
    duration_s: float | None = Field(None, gt=0.0)
    sensors: tuple[str, ...] | None = Field(None, description="default: every sensor")
    labels: LabelRules | None = Field(
        None,
        description="how the recording's markers score the predictions; default: the rules "
        "the model was trained with",
    )

    def build(self, ctx: BuildContext) -> Reader:
        from crossl_stream.readers.replay import replay_from_config

        return replay_from_config(self, ctx)


class SimulatedSensorConfig(_Strict):
    """How one configured sensor is synthesised."""

    kind: Literal["eeg", "emg", "imu"] = "imu"
    chunk_s: float = Field(0.02, gt=0.0)
    jitter_s: float = Field(0.0, ge=0.0)
    dropouts: tuple[tuple[float, float], ...] = ()


class SimulateReaderConfig(_Strict):
    """Synthetic streams for the configured sensors (their channels and rates)."""

    kind: Literal["simulate"]
    duration_s: float = Field(gt=0.0)
    speed: Speed = 1.0
    seed: int = 0
    sensors: dict[str, SimulatedSensorConfig]

    def build(self, ctx: BuildContext) -> Reader:
        from crossl_stream.readers.simulate import SimulatedSensor, Simulator

        sensors = ctx.cfg.sensors
        sims = [
            SimulatedSensor(
                name,
                sensors[name].channels,
                sensors[name].rate_hz,
                kind=s.kind,
                chunk_s=s.chunk_s,
                jitter_s=s.jitter_s,
                dropouts=s.dropouts,
            )
            for name, s in self.sensors.items()
        ]
        speed = None if self.speed == "max" else float(self.speed)
        return Simulator(sims, self.duration_s, speed=speed, seed=self.seed)


class LslStreamConfig(_Strict):
    """Which LSL stream feeds a sensor (by name, type, source_id and/or an XPath predicate)
    and how liblsl processes its timestamps."""

    name: str | None = None
    type: str | None = None
    source_id: str | None = Field(None, description="also what liblsl recovers a stream by")
    predicate: str | None = Field(None, description="XPath 1.0 over the stream info")
    clocksync: bool = Field(True, description="clock-offset correction onto this host")
    dejitter: bool = True
    buffer_s: int = Field(2, ge=1, description="inlet buffer; small keeps a backlog short")

    @model_validator(mode="after")
    def _selects_something(self) -> LslStreamConfig:
        if not (self.name or self.type or self.source_id or self.predicate):
            raise ValueError("give at least one of name, type, source_id, predicate")
        return self


class LslReaderConfig(_Strict):
    """LSL inlets, one thread each; absent streams are resolved again until they appear."""

    kind: Literal["lsl"]
    streams: dict[str, LslStreamConfig] = Field(min_length=1, description="sensor -> stream")
    watchdog_s: float = Field(0.1, gt=0.0, description="silence logged as STALE")
    lost_s: float = Field(5.0, gt=0.0, description="silence after which the inlet is renewed")
    resolve_s: float = Field(0.5, gt=0.0, description="how long each resolve attempt waits")

    def build(self, ctx: BuildContext) -> Reader:
        from crossl_stream.readers.base import SensorInfo
        from crossl_stream.readers.lsl import LslReader, LslSelector

        sensors = ctx.cfg.sensors
        streams = {
            name: (
                SensorInfo(name, sensors[name].channels, sensors[name].rate_hz),
                LslSelector(**s.model_dump()),
            )
            for name, s in self.streams.items()
        }
        grace = ctx.cfg.window.connect_grace_s  # then a missing stream is named
        return LslReader(
            streams, self.watchdog_s, self.lost_s, self.resolve_s, connect_grace_s=grace
        )


class BrokerConfig(_Strict):
    """An MQTT broker and how to log in. The password comes from an environment variable,
    never from the file."""

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable with the password")
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str | None = None
    keepalive: int = Field(30, ge=5)

    def build(self, ctx: BuildContext, key: str) -> Broker:
        """The Broker, its password read from the environment and its TLS files checked;
        ConfigError names ``key`` (where this section is in the config)."""
        import os

        from crossl_stream.broker import Broker, BrokerError

        where = f"{ctx.source}: {key}"
        password = None
        if self.password_env:
            password = os.environ.get(self.password_env)
            if password is None:
                raise ConfigError(
                    f"{where}.password_env: environment variable {self.password_env} is not set"
                )
        files = {}
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not ctx.resolve(path).is_file():
                raise ConfigError(f"{where}.{name}: {ctx.resolve(path)} is not a file")
            files[name] = str(ctx.resolve(path)) if path is not None else None
        broker = Broker(
            self.host,
            self.port,
            self.username,
            password,
            self.tls,
            **files,
            client_id=self.client_id,
            keepalive=self.keepalive,
        )
        try:
            broker.ssl_context()  # a CA or key file that is not PEM: said now, not per retry
        except BrokerError as exc:  # "broker.ca_file: ..." -> "<where>.ca_file: ..."
            raise ConfigError(f"{where}.{str(exc).removeprefix('broker.')}") from None
        return broker


class MqttTopicConfig(_Strict):
    """One sensor's topic (``+`` / ``#`` wildcards stand for subjects) and payload format."""

    topic: str = Field(min_length=1)
    format: Literal["json", "binary"] = "json"

    @model_validator(mode="after")
    def _valid_filter(self) -> MqttTopicConfig:
        levels = self.topic.split("/")
        for i, level in enumerate(levels):
            if ("#" in level and (level != "#" or i != len(levels) - 1)) or (
                "+" in level and level != "+"
            ):
                raise ValueError(
                    f"topic {self.topic!r}: '+' must be a whole level and '#' the whole last one"
                )
        return self


class MqttReaderConfig(_Strict):
    """Device payloads from an MQTT broker; device clocks fitted onto the host clock."""

    kind: Literal["mqtt"]
    broker: BrokerConfig = BrokerConfig()
    qos: Literal[0, 1] = 1
    streams: dict[str, MqttTopicConfig] = Field(min_length=1, description="sensor -> topic")

    def build(self, ctx: BuildContext) -> Reader:
        from crossl_stream.readers.base import SensorInfo
        from crossl_stream.readers.mqtt import MqttReader, MqttTopic

        sensors = ctx.cfg.sensors
        streams = {
            name: (
                SensorInfo(name, sensors[name].channels, sensors[name].rate_hz),
                MqttTopic(t.topic, t.format, sensors[name].clock == "receipt"),
            )
            for name, t in self.streams.items()
        }
        broker = self.broker.build(ctx, f"readers.{ctx.index}.broker")
        return MqttReader(broker, streams, self.qos, admission=ctx.admission)


ReaderConfig = Annotated[
    ReplayReaderConfig | SimulateReaderConfig | LslReaderConfig | MqttReaderConfig,
    Field(discriminator="kind"),
]


class JsonlPublisherConfig(_Strict):
    """One prediction record per line, flushed as written. An existing file that is not
    empty is refused unless ``append``."""

    kind: Literal["jsonl"]
    path: Path
    append: bool = Field(False, description="add to an existing file instead of refusing it")

    def build(self, ctx: BuildContext) -> Publisher:
        from crossl_stream.publishers.jsonl import JsonlPublisher

        return JsonlPublisher(ctx.resolve(self.path), append=self.append)


class ConsolePublisherConfig(_Strict):
    """A live line per prediction (or every n-th)."""

    kind: Literal["console"]
    every: int = Field(1, ge=1)

    def build(self, ctx: BuildContext) -> Publisher:
        from crossl_stream.publishers.console import ConsolePublisher

        return ConsolePublisher(every=self.every)


class LslPublisherConfig(_Strict):
    """Predictions as an LSL stream (float32 per class) plus a marker stream of JSON records."""

    kind: Literal["lsl"]
    name: str = "crossl-stream"
    source_id: str | None = None

    def build(self, ctx: BuildContext) -> Publisher:
        from crossl_stream.publishers.lsl import LslPublisher

        rate = 1 / ctx.cfg.window.hop_s
        return LslPublisher(ctx.model.classes, ctx.model_id, self.name, self.source_id, rate)


class MqttPublisherConfig(_Strict):
    """Prediction records to a per-subject topic, a retained status topic, a last will."""

    kind: Literal["mqtt"]
    broker: BrokerConfig = BrokerConfig()
    topic: str = Field("crossl/{subject}/predictions", description="{subject} is filled in")
    status_topic: str = "crossl/status"
    qos: Literal[0, 1] = 1
    queue_size: int = Field(
        10000, ge=1, description="records held while the broker is away (oldest dropped, counted)"
    )
    spool: Path | None = Field(
        None,
        description="a folder: records waiting for the broker are kept there on disk, and "
        "survive a restart of the daemon",
    )
    spool_max_mb: float = Field(64.0, gt=0.0, description="disk the spool may use")

    def build(self, ctx: BuildContext) -> Publisher:
        from crossl_stream.publishers.mqtt import MqttPublisher

        return MqttPublisher(
            self.broker.build(ctx, f"publishers.{ctx.index}.broker"),
            ctx.model_id,
            self.topic,
            self.status_topic,
            self.qos,
            queue_size=self.queue_size,
            spool=ctx.resolve(self.spool) if self.spool is not None else None,
            spool_max_bytes=int(self.spool_max_mb * (1 << 20)),
        )


PublisherConfig = Annotated[
    JsonlPublisherConfig | ConsolePublisherConfig | LslPublisherConfig | MqttPublisherConfig,
    Field(discriminator="kind"),
]


class SubjectsConfig(_Strict):
    """Who may have windows: an MQTT wildcard lets anyone who can publish name a subject."""

    allow: tuple[Id, ...] | None = Field(None, description="the only subject ids admitted")
    pattern: str | None = Field(None, description="a regex every subject id must match whole")
    max: int = Field(256, ge=1, description="subjects admitted at once; beyond: refused")

    @field_validator("pattern")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a regular expression ({exc})") from exc
        return pattern


class HealthConfig(_Strict):
    """``/healthz`` and ``/metrics`` over HTTP (the daemon; 127.0.0.1 unless told)."""

    host: str = "127.0.0.1"
    port: int | None = Field(9464, ge=0, le=65535, description="null: no server; 0: any free")
    publisher_fail_s: float = Field(
        30.0, gt=0.0, description="a publisher failing for this long makes the daemon unhealthy"
    )
    silent_s: float = Field(
        30.0,
        gt=0.0,
        description="no record published for this long: unhealthy while data comes in, "
        "degraded when none does",
    )


class DaemonConfig(_Strict):
    """How `crossl-stream daemon` runs unattended."""

    health: HealthConfig = HealthConfig()
    stop_deadline_s: float = Field(
        5.0, gt=0.0, description="SIGTERM/SIGINT: drain and exit 0 within this"
    )
    log_format: Literal["json", "text"] = "json"
    log_every_s: float = Field(10.0, gt=0.0, description="a repeating fault: one line per this")


class PipelineConfig(_Strict):
    """A whole streaming pipeline: sensors, readers, windows, inference, publishers.

    Relative paths are relative to the config file's folder.
    """

    sensors: dict[str, SensorConfig] = Field(min_length=1)
    readers: tuple[ReaderConfig, ...] = Field(min_length=1)
    window: WindowConfig = WindowConfig()
    inference: InferenceConfig = InferenceConfig()
    publishers: tuple[PublisherConfig, ...] = (ConsolePublisherConfig(kind="console"),)
    subjects: SubjectsConfig = SubjectsConfig()
    daemon: DaemonConfig = DaemonConfig()

    def modality_of(self, sensor: str) -> str:
        """The model modality a sensor feeds."""
        return self.sensors[sensor].modality or sensor

    def reader_sensors(self, reader: ReaderConfig) -> list[str]:
        """The sensors one reader feeds."""
        if isinstance(reader, SimulateReaderConfig):
            return list(reader.sensors)
        if isinstance(reader, LslReaderConfig | MqttReaderConfig):
            return list(reader.streams)
        return list(reader.sensors) if reader.sensors is not None else list(self.sensors)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        modalities = [self.modality_of(s) for s in self.sensors]
        twice = sorted({m for m in modalities if modalities.count(m) > 1})
        if twice:
            raise ValueError(f"modalities {twice} are fed by more than one sensor")
        fed: dict[str, int] = {}
        for i, reader in enumerate(self.readers):
            names = self.reader_sensors(reader)
            unknown = sorted(set(names) - set(self.sensors))
            if unknown:
                raise ValueError(
                    f"readers.{i}: unknown sensors {unknown}; known {list(self.sensors)}"
                )
            for name in names:
                if name in fed:
                    raise ValueError(f"sensor {name!r} is fed by readers {fed[name]} and {i}")
                fed[name] = i
            if isinstance(reader, MqttReaderConfig):
                topics = [t.topic for t in reader.streams.values()]
                twice = sorted({t for t in topics if topics.count(t) > 1})
                if twice:
                    raise ValueError(f"readers.{i}.streams: topics {twice} feed several sensors")
            if isinstance(reader, ReplayReaderConfig):
                drops = sorted({d.sensor for d in reader.dropouts} - set(names))
                if drops:
                    raise ValueError(f"readers.{i}.dropouts: sensors {drops} are not replayed")
                extra = sorted(set(reader.streams) - set(names))
                if extra:
                    raise ValueError(f"readers.{i}.streams: sensors {extra} are not replayed")
            if getattr(reader, "speed", None) == "max" and len(self.readers) > 1:
                raise ValueError(
                    f"readers.{i}: speed max runs on its own virtual clock; it cannot be "
                    "combined with other readers"
                )
        unfed = sorted(set(self.sensors) - set(fed))
        if unfed:
            raise ValueError(f"sensors {unfed} are fed by no reader")
        return self


T = TypeVar("T", bound=BaseModel)


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem: ``source: key.path: reason``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{source}: {key}: {reason}")
    return "\n".join(lines)


def load_config(path: str | Path, kind: type[T] = TrainConfig) -> T:  # type: ignore[assignment]
    """Read a YAML file into ``kind``, raising ConfigError with file, key and reason."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from exc
