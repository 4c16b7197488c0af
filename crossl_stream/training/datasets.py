"""Real recordings as per-modality arrays, cut into fixed windows.

Two datasets, fetched by ``tools/fetch_datasets.py`` into the data cache
(``$CROSSL_STREAM_DATA`` or ``~/.cache/crossl-stream``):

- ``seglearn-watch``: smartwatch accelerometer (``acc``) and gyroscope (``gyro``), 50 Hz,
  7 shoulder exercises, 10 subjects, one exercise per recording.
- ``basicmotions``: UEA BasicMotions, accelerometer and gyroscope, 10 Hz, 4 activities,
  fixed 40/40 train/test split, one 10 s series per recording.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from crossl_stream.errors import DatasetError
from crossl_stream.model.specs import ModalitySpec

WATCH_MODALITIES = {"acc": slice(0, 3), "gyro": slice(3, 6)}
FETCH_HINT = "run `python tools/fetch_datasets.py` (or `make data`) to fetch it"


def data_cache() -> Path:
    """The data cache directory."""
    return Path(os.environ.get("CROSSL_STREAM_DATA", Path.home() / ".cache" / "crossl-stream"))


def shipped_excerpt() -> Path:
    """The real recording excerpt shipped with the package (held-out watch subject)."""
    return Path(str(resources.files("crossl_stream") / "data" / "watch_heldout.npz"))


@dataclass
class Recording:
    """One continuous recording: per-modality [channels, samples] arrays and its label."""

    signals: dict[str, np.ndarray]
    label: int
    subject: int
    key: str
    split: str = ""

    @property
    def samples(self) -> int:
        return next(iter(self.signals.values())).shape[1]


@dataclass
class Dataset:
    """A named set of recordings with class names and per-modality channel layout."""

    name: str
    classes: list[str]
    rate_hz: float
    channel_names: dict[str, list[str]]
    recordings: list[Recording] = field(default_factory=list)

    def specs(self, window_s: float) -> list[ModalitySpec]:
        """Modality specs for windows of ``window_s`` seconds."""
        samples = round(window_s * self.rate_hz)
        return [
            ModalitySpec(
                name=name,
                channels=len(ch),
                rate_hz=self.rate_hz,
                samples=samples,
                channel_names=tuple(ch),
            )
            for name, ch in self.channel_names.items()
        ]


@dataclass
class Windows:
    """Fixed windows: ``x[modality]`` is [N, C, T] float32; labels, subjects and recordings [N]."""

    x: dict[str, np.ndarray]
    y: np.ndarray
    subject: np.ndarray
    recording: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def take(self, index: np.ndarray) -> Windows:
        """The windows at ``index`` (a new, independent set)."""
        return Windows(
            {k: v[index] for k, v in self.x.items()},
            self.y[index],
            self.subject[index],
            self.recording[index],
        )


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what} not found at {path}; {FETCH_HINT}")
    return path


def load_watch(path: str | Path | None = None) -> Dataset:
    """The seglearn watch recordings from the cache, or from ``path`` (same npz layout).

    >>> ds = load_watch(shipped_excerpt())
    >>> ds.classes[:3], sorted(ds.channel_names), ds.rate_hz
    (['PEN', 'ABD', 'FEL'], ['acc', 'gyro'], 50.0)
    """
    path = _require(Path(path) if path else data_cache() / "watch.npz", "seglearn watch data")
    try:
        with np.load(path, allow_pickle=False) as z:
            samples, offsets = z["samples"], z["offsets"]
            labels, subjects, sides = z["label"], z["subject"], z["side"]
            classes = [str(c) for c in z["class_names"]]
            channels = [str(c) for c in z["channel_names"]]
            rate = float(z["rate_hz"])
    except (KeyError, ValueError, OSError) as exc:
        raise DatasetError(f"{path}: not a watch recording file ({exc})") from exc
    if samples.ndim != 2 or samples.shape[1] != 6 or len(offsets) != len(labels) + 1:
        raise DatasetError(f"{path}: expected [n, 6] samples and one offset per recording")
    ds = Dataset(
        "seglearn-watch", classes, rate, {m: channels[s] for m, s in WATCH_MODALITIES.items()}
    )
    for i, (label, subject) in enumerate(zip(labels, subjects, strict=True)):
        block = samples[offsets[i] : offsets[i + 1]].T
        signals = {m: np.ascontiguousarray(block[s]) for m, s in WATCH_MODALITIES.items()}
        side = "right" if sides[i] else "left"
        ds.recordings.append(Recording(signals, int(label), int(subject), f"s{subject}-{i}-{side}"))
    return ds


def _read_ts(path: Path) -> tuple[list[str], list[np.ndarray], list[str]]:
    """Parse an equal-length multivariate .ts file: (class names, [C, T] series, labels)."""
    classes: list[str] = []
    series, labels = [], []
    in_data = False
    for lineno, line in enumerate(_require(path, "BasicMotions").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if line.lower().startswith("@classlabel"):
                classes = line.split()[2:]
            in_data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        try:
            series.append(np.array([[float(v) for v in d.split(",")] for d in dims], np.float32))
        except ValueError as exc:
            raise DatasetError(f"{path}:{lineno}: bad value ({exc})") from exc
        labels.append(label)
    return classes, series, labels


def load_basicmotions(directory: str | Path | None = None) -> Dataset:
    """UEA BasicMotions with ``split`` set to "train" or "test" on each recording."""
    directory = Path(directory) if directory else data_cache() / "BasicMotions"
    ds = Dataset("basicmotions", [], 10.0, {"acc": ["ax", "ay", "az"], "gyro": ["gx", "gy", "gz"]})
    for split in ("train", "test"):
        classes, series, labels = _read_ts(directory / f"BasicMotions_{split.upper()}.ts")
        ds.classes = ds.classes or classes
        for i, (x, label) in enumerate(zip(series, labels, strict=True)):
            signals = {"acc": x[0:3], "gyro": x[3:6]}
            ds.recordings.append(
                Recording(signals, ds.classes.index(label), i, f"{split}-{i}", split)
            )
    return ds


def make_windows(recordings: list[Recording], specs: list[ModalitySpec], hop_s: float) -> Windows:
    """Cut every recording into windows of the specs' length every ``hop_s`` seconds.

    A recording shorter than one window gives none.
    """
    length = specs[0].samples
    hop = max(1, round(hop_s * specs[0].rate_hz))
    x: dict[str, list[np.ndarray]] = {s.name: [] for s in specs}
    y, subject, rec = [], [], []
    for r_index, r in enumerate(recordings):
        starts = np.arange(0, r.samples - length + 1, hop)
        if len(starts) == 0:
            continue
        idx = starts[:, None] + np.arange(length)[None, :]
        for s in specs:
            x[s.name].append(np.ascontiguousarray(r.signals[s.name][:, idx].transpose(1, 0, 2)))
        y.append(np.full(len(starts), r.label))
        subject.append(np.full(len(starts), r.subject))
        rec.append(np.full(len(starts), r_index))
    if not y:
        raise DatasetError(f"no recording is as long as one window ({length} samples)")
    return Windows(
        {k: np.concatenate(v).astype(np.float32) for k, v in x.items()},
        np.concatenate(y),
        np.concatenate(subject),
        np.concatenate(rec),
    )


def fit_normalisation(windows: Windows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-modality, per-channel (mean, std) over all samples of ``windows``."""
    return {k: (v.mean(axis=(0, 2)), v.std(axis=(0, 2)) + 1e-6) for k, v in windows.x.items()}


def labelled_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-stratified ``fraction`` of ``labels`` (at least one per class).

    >>> labelled_subset(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.5, seed=0).size
    4
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = max(1, round(fraction * len(members)))
        chosen.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(chosen))
