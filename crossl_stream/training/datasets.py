"""Windows as training arrays, and where the data lives.

Data sets are XDF recordings described by a spec (``crossl_stream.training.spec`` reads
them); ``tools/fetch_datasets.py`` writes the real ones into the data cache
(``$CROSSL_STREAM_DATA`` or ``~/.cache/crossl-stream``): the seglearn watch sessions, the
BasicMotions split and the EMG gestures.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from crossl_stream.errors import DatasetError

FETCH_HINT = "run `python tools/fetch_datasets.py` (or `make data`) to fetch it"


def data_cache() -> Path:
    """The data cache directory."""
    return Path(os.environ.get("CROSSL_STREAM_DATA", Path.home() / ".cache" / "crossl-stream"))


def shipped_recording() -> Path:
    """The real session recording shipped with the package (the held-out watch subject)."""
    return Path(str(resources.files("crossl_stream") / "data" / "watch_heldout.xdf"))


@dataclass
class Windows:
    """Fixed windows, as arrays for training.

    ``x[modality]`` is [N, C, T] float32 (zeros where masked); ``available`` [N, M] says
    which modalities (in the order of ``x``) each window may use; ``y`` is the class index,
    -1 for an unlabelled window; ``subject``, ``session`` (str) and ``recording`` (int) say
    where each window came from; ``t_end`` is its end on the recording's clock.
    """

    x: dict[str, np.ndarray]
    y: np.ndarray
    subject: np.ndarray
    recording: np.ndarray
    available: np.ndarray | None = None
    session: np.ndarray | None = None
    t_end: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.y)
        if self.available is None:
            self.available = np.ones((n, len(self.x)), dtype=bool)
        if self.session is None:
            self.session = np.full(n, "", dtype=object)
        if self.t_end is None:
            self.t_end = np.zeros(n)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labelled(self) -> np.ndarray:
        """Indices of the windows with a label."""
        return np.flatnonzero(self.y >= 0)

    def take(self, index: np.ndarray) -> Windows:
        """The windows at ``index`` (a new, independent set)."""
        return Windows(
            {k: v[index] for k, v in self.x.items()},
            self.y[index],
            self.subject[index],
            self.recording[index],
            self.available[index],
            self.session[index],
            self.t_end[index],
        )

    def without(self, modality: str) -> Windows:
        """These windows as if ``modality`` were never recorded: its arrays and availability
        column dropped, and the windows that had nothing else dropped too."""
        keys = list(self.x)
        if modality not in keys:
            raise DatasetError(f"no modality {modality!r} in the windows; they hold {keys}")
        j = keys.index(modality)
        available = np.delete(self.available, j, axis=1)
        left = np.flatnonzero(available.any(axis=1))
        return Windows(
            {k: v[left] for k, v in self.x.items() if k != modality},
            self.y[left],
            self.subject[left],
            self.recording[left],
            available[left],
            self.session[left],
            self.t_end[left],
        )


def fit_normalisation(windows: Windows) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-modality, per-channel (mean, std) over the samples of the windows where that
    modality is available (a masked modality's zeros are not data)."""
    stats = {}
    for i, (k, v) in enumerate(windows.x.items()):
        used = v[windows.available[:, i]] if not windows.available[:, i].all() else v
        if not len(used):
            raise DatasetError(f"modality {k!r} is available in no window: nothing to fit")
        stats[k] = (used.mean(axis=(0, 2)), used.std(axis=(0, 2)) + 1e-6)
    return stats


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
