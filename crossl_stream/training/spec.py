"""A dataset spec, read: XDF recordings -> training windows, labels and where they came from.

Windows are cut exactly as the streaming pipeline cuts them: each recording is played as
a max-speed replay (the same chunks) into a ``Windower`` built from the same ``window:``
settings, so every window a model trains on is one the pipeline would emit live.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from crossl_stream.config import DatasetSpec, RecordingSource, SensorSpec, WindowConfig
from crossl_stream.errors import DatasetError
from crossl_stream.labels import Labels
from crossl_stream.model.specs import ModalitySpec
from crossl_stream.readers.replay import Recording, Replay, max_speed_chunk_s
from crossl_stream.training.datasets import FETCH_HINT, Windows, data_cache
from crossl_stream.windower import Window, Windower

log = logging.getLogger(__name__)


@dataclass
class SourceFile:
    """One recording of a data set: who, which streams, how many windows it gave."""

    path: Path
    subject: str
    session: str
    streams: dict[str, str]  # sensor -> stream name in this file
    types: dict[str, str] = field(default_factory=dict)  # sensor -> that stream's type
    windows: int = 0
    labelled: int = 0
    masked: dict[str, int] = field(default_factory=dict)


@dataclass
class LoadedData:
    """The windows of a data set, its modalities and classes, and its recordings."""

    name: str
    windows: Windows
    modalities: list[ModalitySpec]
    classes: list[str]
    files: list[SourceFile]
    unmapped: Counter[str] = field(default_factory=Counter)
    matched: Counter[str] = field(default_factory=Counter)

    def without(self, modality: str) -> LoadedData:
        """This data set as if ``modality`` were never recorded (``Windows.without``)."""
        if len(self.modalities) < 2:
            raise DatasetError(f"{self.name}: {modality!r} is its only modality")
        return replace(
            self,
            windows=self.windows.without(modality),
            modalities=[m for m in self.modalities if m.name != modality],
        )

    def require_classes(self, where: str) -> None:
        """DatasetError unless the windows carry at least two classes."""
        found = sorted({self.classes[i] for i in np.unique(self.windows.y[self.windows.y >= 0])})
        if len(found) < 2:
            raise DatasetError(
                f"{where}: labels: {len(found)} class(es) {found} in the labelled windows; a "
                "classifier needs at least two (pretrain needs no labels)"
            )

    def describe(self) -> str:
        """A few lines for the console: files, subjects, sessions, windows, labels."""
        w = self.windows
        subjects = sorted(set(w.subject.tolist()))
        sessions = sorted({(f.subject, f.session) for f in self.files})
        lines = [
            f"{self.name}: {len(self.files)} recordings, {len(subjects)} subjects, "
            f"{len(sessions)} sessions, {len(w)} windows ({len(w.labelled)} labelled)"
        ]
        if self.classes:
            counts = np.bincount(w.y[w.y >= 0], minlength=len(self.classes))
            lines.append(
                "classes: "
                + ", ".join(f"{c} {n}" for c, n in zip(self.classes, counts, strict=True))
            )
        masked = ~w.available
        if masked.any():
            names = list(w.x)
            lines.append(
                "masked in windows: "
                + ", ".join(f"{names[i]} {int(masked[:, i].sum())}" for i in range(len(names)))
            )
        if self.unmapped:
            top = ", ".join(f"{k!r} x{n}" for k, n in self.unmapped.most_common(8))
            lines.append(f"markers no rule maps (they end a label): {top}")
        return "\n".join(lines)


def expand(spec: DatasetSpec, base: Path, source: str) -> list[tuple[Path, RecordingSource]]:
    """The files ``spec.recordings`` names, in order, each with what its entries say of it:
    an entry that names a subject, a session or ``labelled: false`` wins over an earlier glob
    that also matched the file."""
    out: dict[Path, RecordingSource] = {}
    for i, entry in enumerate(spec.sources):
        text = entry.path.replace("{data}", str(data_cache()))
        pattern = Path(text).expanduser()
        if not pattern.is_absolute():
            pattern = base / pattern
        if any(c in text for c in "*?["):
            anchor = Path(pattern.anchor)
            found = sorted(anchor.glob(str(pattern.relative_to(anchor))))
        else:
            found = [pattern] if pattern.exists() else []
        if not found:
            hint = f"; {FETCH_HINT}" if "{data}" in entry.path else ""
            raise DatasetError(f"{source}: recordings.{i}: {entry.path} matches no file{hint}")
        for path in found:
            seen = out.get(path)
            if seen is None:
                out[path] = entry
                continue
            given = entry.model_dump(exclude_unset=True, exclude={"path"})
            out[path] = seen.model_copy(update=given)
    return list(out.items())


def find_stream(
    recording: Recording, sensor: str, names: list[str | None], type: str | None = None
) -> str:
    """The stream of ``recording`` that feeds ``sensor``: the first of ``names`` it has,
    else its one stream of ``type``; the error lists what the file has."""
    for name in names:
        if name and name in recording.streams:
            return name
    if type:
        typed = [n for n, t in recording.types.items() if t.lower() == type.lower()]
        if len(typed) == 1:
            return typed[0]
        if len(typed) > 1:
            raise DatasetError(
                f"{recording.path}: sensor {sensor!r}: several streams of type {type!r} "
                f"({typed}); name one"
            )
    wanted = [f"name {n!r}" for n in dict.fromkeys(names) if n] + (
        [f"type {type!r}"] if type else []
    )
    raise DatasetError(
        f"{recording.path}: no stream for sensor {sensor!r} ({' or '.join(wanted)}); the file "
        f"has {recording.describe_streams()}"
    )


def spec_stream(recording: Recording, sensor: str, want: SensorSpec) -> str:
    """The stream a spec's sensor names (its ``stream``, else its own name), else by type."""
    return find_stream(recording, sensor, [want.stream or sensor], want.type)


def ids_of(path: Path, recording: Recording, pattern: str) -> tuple[str, str]:
    """(subject, session) from the XDF header, else the file name, else the file stem."""
    subject = recording.header.get("subject")
    session = recording.header.get("session")
    match = re.search(pattern, path.name)
    if match:
        groups = match.groupdict()
        subject = subject or groups.get("subject")
        session = session or groups.get("session")
    return subject or path.stem, session or path.stem


def source_rate(recording: Recording, stream: str) -> float:
    """The stream's nominal rate, or (irregular streams) its median sample rate."""
    t, _, nominal = recording.streams[stream]
    if nominal > 0:
        return nominal
    steps = np.diff(t)
    steps = steps[steps > 0]
    if not len(steps):
        raise DatasetError(f"{recording.path}: stream {stream!r} has no two distinct timestamps")
    return float(1.0 / np.median(steps))


def modality_specs(spec: DatasetSpec, channels: dict[str, int], source: str) -> list[ModalitySpec]:
    """The model's modalities: each sensor at its target rate over ``window.length_s``."""
    length = spec.window.length_s
    assert length is not None
    out = []
    for name, s in spec.sensors.items():
        samples = length * s.rate_hz
        if abs(samples - round(samples)) > 1e-6:
            raise DatasetError(
                f"{source}: sensors.{name}.rate_hz: {s.rate_hz:g} Hz x window.length_s "
                f"{length:g} s is not a whole number of samples"
            )
        out.append(
            ModalitySpec(
                name=name, channels=channels[name], rate_hz=s.rate_hz, samples=round(samples)
            )
        )
    return out


def iter_windows(
    recording: Recording,
    streams: dict[str, str],
    modalities: list[ModalitySpec],
    window: WindowConfig,
) -> Iterator[Window]:
    """The windows the pipeline emits for a max-speed replay of ``recording`` (``streams``:
    modality -> stream) with the ``window`` settings, as they are cut."""
    rates = {m: source_rate(recording, s) for m, s in streams.items()}
    windower = Windower.from_config(modalities, window, source_rates=rates)
    replay = Replay(recording, streams, None, chunk_s=max_speed_chunk_s(window.stale_s))
    for arrival, sensor, t, x in replay.schedule():
        windower.push(sensor, x, t, arrival)
        yield from windower.poll(now=arrival)
    yield from windower.flush()


def model_streams(
    recording: Recording,
    modalities: list[ModalitySpec],
    trained: dict[str, dict],
    named: dict[str, str] | None = None,
) -> dict[str, str]:
    """The stream of ``recording`` for each model modality: the one ``named`` for it, else
    the stream of the modality's name, else the stream the model was ``trained`` on (its
    name, else its type); checked for the model's channel count."""
    named = named or {}
    unknown = sorted(set(named) - {m.name for m in modalities})
    if unknown:
        raise DatasetError(
            f"--stream: the model has no modality {unknown}; it has {[m.name for m in modalities]}"
        )
    out = {}
    for m in modalities:
        known = trained.get(m.name) or {}
        if m.name in named:
            stream = find_stream(recording, m.name, [named[m.name]])
        else:
            stream = find_stream(
                recording, m.name, [m.name, known.get("stream")], known.get("type")
            )
        channels = recording.streams[stream][1].shape[1]
        if channels != m.channels:
            raise DatasetError(
                f"{recording.path}: stream {stream!r} has {channels} channels; the model's "
                f"{m.name!r} has {m.channels}"
            )
        out[m.name] = stream
    return out


def load_data(spec: DatasetSpec, base: Path, source: str, progress: bool = True) -> LoadedData:
    """Read every recording of ``spec`` into windows (labels where the rules give one).

    ``base`` resolves relative paths; ``source`` (the spec file) prefixes every error.
    """
    files = expand(spec, base, source)
    length = spec.window.length_s
    assert length is not None
    modalities: list[ModalitySpec] | None = None
    channels: dict[str, int] = {}
    parts: list[tuple[SourceFile, list[Window], list[str | None]]] = []
    unmapped: Counter[str] = Counter()
    matched: Counter[str] = Counter()
    for path, entry in tqdm(files, desc="recordings", disable=not progress, leave=False):
        recording = Recording.load(path)
        streams = {s: spec_stream(recording, s, want) for s, want in spec.sensors.items()}
        for sensor, stream in streams.items():
            n = recording.streams[stream][1].shape[1]
            expected = spec.sensors[sensor].channels or channels.get(sensor, n)
            if n != expected:
                origin = "the spec" if spec.sensors[sensor].channels else files[0][0].name
                raise DatasetError(
                    f"{path}: stream {stream!r} has {n} channels; sensor {sensor!r} has "
                    f"{expected} (from {origin})"
                )
            channels[sensor] = n
        if modalities is None:
            modalities = modality_specs(spec, channels, source)
        got_subject, got_session = ids_of(path, recording, spec.ids)
        info = SourceFile(path, entry.subject or got_subject, entry.session or got_session, streams)
        info.types = {m: recording.types.get(stream, "") for m, stream in streams.items()}
        windows = list(iter_windows(recording, streams, modalities, spec.window))
        names: list[str | None] = [None] * len(windows)
        if spec.labels is not None and entry.labelled:
            labels = Labels.of(spec.labels, path, recording.start, recording.marker_streams)
            unmapped.update(labels.unmapped)
            matched.update(labels.matched)
            names = labels.labels_of(np.array([w.t_end for w in windows]), length)
        info.windows = len(windows)
        info.labelled = sum(n is not None for n in names)
        info.masked = {m.name: sum(not w.available[m.name] for w in windows) for m in modalities}
        parts.append((info, windows, names))
    assert modalities is not None
    found = [n for _, _, names in parts for n in names if n is not None]
    classes = _classes(spec, found)
    other = Counter(n for n in found if n not in classes)
    if other:  # labelled windows of a class the spec does not list: left unlabelled
        log.warning(
            "%s: labels not among the classes %s, left unlabelled: %s",
            source,
            classes,
            dict(other.most_common(8)),
        )
    windows = _stack(parts, modalities, classes)
    if not len(windows):
        raise DatasetError(
            f"{source}: no window: every recording is shorter than window.length_s "
            f"({length:g} s) or no sensor covers {spec.window.min_coverage:.0%} of one"
        )
    data = LoadedData(
        spec.name or Path(source).stem,
        windows,
        modalities,
        classes,
        [p for p, _, _ in parts],
        unmapped,
        matched,
    )
    if spec.labels is not None:
        _check_labels(spec, data, source)
    return data


def _classes(spec: DatasetSpec, found: list[str]) -> list[str]:
    rules = spec.labels
    if rules is None:
        return []
    if rules.classes is not None:
        return list(rules.classes)
    mapping = rules.markers.map if rules.markers is not None else rules.intervals.map
    named = [c for c in mapping.values() if c is not None]
    return list(dict.fromkeys(named)) if named else sorted(set(found))


def _check_labels(spec: DatasetSpec, data: LoadedData, source: str) -> None:
    """One clear line when the label rules match no marker or label no window."""
    rules = spec.labels
    assert rules is not None
    if len(data.windows.labelled):
        return
    mapping = rules.markers.map if rules.markers is not None else rules.intervals.map
    where = "labels.markers" if rules.markers is not None else "labels.intervals"
    if not data.matched:
        seen = ", ".join(f"{k!r}" for k, _ in data.unmapped.most_common(10)) or "none at all"
        if mapping:
            raise DatasetError(
                f"{source}: {where}.map: none of {sorted(mapping)} matches a label in "
                f"{len(data.files)} recordings; they have {seen}"
            )
        raise DatasetError(f"{source}: {where}: no label found in {len(data.files)} recordings")
    raise DatasetError(
        f"{source}: labels: the rules label no window: no label covers a whole "
        f"{spec.window.length_s:g} s window (labels shorter than a window, a hold too short, "
        "or markers in another stream?)"
    )


def _stack(
    parts: list[tuple[SourceFile, list[Window], list[str | None]]],
    modalities: list[ModalitySpec],
    classes: list[str],
) -> Windows:
    index = {c: i for i, c in enumerate(classes)}
    all_windows = [w for _, ws, _ in parts for w in ws]
    n = len(all_windows)
    x = {m.name: np.empty((n, m.channels, m.samples), dtype=np.float32) for m in modalities}
    for i, w in enumerate(all_windows):
        for m in modalities:
            x[m.name][i] = w.data[m.name]
    available = np.array(
        [[w.available[m.name] for m in modalities] for w in all_windows], dtype=bool
    ).reshape(n, len(modalities))
    y = np.array(
        [index.get(name, -1) if name else -1 for _, _, names in parts for name in names],
        dtype=np.int64,
    )
    subject = np.array([f.subject for f, ws, _ in parts for _ in ws], dtype=object)
    session = np.array([f"{f.subject}/{f.session}" for f, ws, _ in parts for _ in ws], dtype=object)
    recording = np.array([i for i, (_, ws, _) in enumerate(parts) for _ in ws], dtype=np.int64)
    t_end = np.array([w.t_end for w in all_windows], dtype=np.float64)
    return Windows(x, y, subject, recording, available, session, t_end)
