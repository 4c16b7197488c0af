"""Labels of a recording: which class covers which stretch of its clock.

One set of rules (``LabelRules`` in the config) serves training, ``replay``/``run`` scoring
and ``predict``: labels come from a string marker stream or from an intervals file, and a
window is labelled only when one label covers all of it.

>>> from crossl_stream.config import LabelRules, MarkerLabels
>>> rules = LabelRules(markers=MarkerLabels(map={"fist": "grip", "pause": None}))
>>> labels = Labels.from_markers(rules.markers, [(0.0, "fist"), (5.0, "pause"), (7.0, "fist")])
>>> labels.label_at(1.0, 3.0), labels.label_at(4.0, 6.0), labels.label_at(8.0, 9.0)
('grip', None, 'grip')
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crossl_stream.config import IntervalLabels, LabelRules, MarkerLabels
from crossl_stream.errors import DatasetError

Marker = tuple[float, str]


class Labels:
    """Owns one recording's labelled intervals ``[start, end)``, sorted and disjoint, and
    what the rules could not use (marker strings nobody mapped)."""

    def __init__(self, intervals: Sequence[tuple[float, float, str]], source: str = "") -> None:
        ordered = sorted((float(a), float(b), str(c)) for a, b, c in intervals if b > a)
        for (a0, b0, c0), (a1, _, c1) in zip(ordered, ordered[1:], strict=False):
            if a1 < b0 - 1e-9:
                raise DatasetError(
                    f"{source}: labels overlap: {c0!r} [{a0:g}, {b0:g}) and {c1!r} from {a1:g}"
                )
        self.intervals = ordered
        self._start = np.array([a for a, _, _ in ordered])
        self._end = np.array([b for _, b, _ in ordered])
        self._name = [c for _, _, c in ordered]
        self.unmapped: Counter[str] = Counter()  # marker strings no rule names
        self.matched: Counter[str] = Counter()  # marker strings a rule names

    @classmethod
    def from_markers(cls, rules: MarkerLabels, markers: Sequence[Marker]) -> Labels:
        """Intervals from ``markers`` (time, text) in time order, under ``rules``."""
        intervals: list[tuple[float, float, str]] = []
        unmapped: Counter[str] = Counter()
        matched: Counter[str] = Counter()
        current: tuple[float, str] | None = None
        for t, raw in sorted(markers, key=lambda m: m[0]):  # ties keep the recorded order
            if not raw.startswith(rules.prefix):
                continue
            text = raw[len(rules.prefix) :]
            if text in rules.ignore:
                continue
            if current is not None:  # any other marker ends the label that holds
                start, name = current
                end = t if rules.hold == "next" else min(t, start + rules.hold)
                intervals.append((start, end, name))
                current = None
            if text in rules.end:
                continue
            name = text if not rules.map else rules.map.get(text, "")
            if name == "":
                unmapped[text] += 1
                continue
            matched[text] += 1
            if name is not None:
                current = (t, name)
        if current is not None:
            start, name = current
            intervals.append((start, np.inf if rules.hold == "next" else start + rules.hold, name))
        merged: list[tuple[float, float, str]] = []
        for a, b, name in intervals:  # a class marked again while it holds: one stretch
            if merged and merged[-1][2] == name and merged[-1][1] >= a:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b), name)
            else:
                merged.append((a, b, name))
        labels = cls(merged)
        labels.unmapped, labels.matched = unmapped, matched
        return labels

    @classmethod
    def from_file(cls, rules: IntervalLabels, recording: Path, start: float) -> Labels:
        """Intervals from the file ``rules.path`` names for ``recording`` (whose first sample
        is at ``start`` on its clock)."""
        path = Path(rules.path.format(stem=recording.stem))
        if not path.is_absolute():
            path = recording.parent / path
        if not path.is_file():
            raise DatasetError(f"{recording}: labels file not found: {path}")
        try:
            if path.suffix.lower() == ".json":
                rows = json.loads(path.read_text())
                if not isinstance(rows, list):
                    raise ValueError("expected a list of {start, end, label} objects")
            else:
                with path.open(newline="") as f:
                    rows = list(csv.DictReader(f))
            offset = start if rules.time == "relative" else 0.0
            intervals, unmapped, matched = [], Counter(), Counter()
            for row in rows:
                text = str(row["label"]).strip()
                name = rules.map.get(text, "") if rules.map else text
                if name == "":
                    unmapped[text] += 1
                    continue
                matched[text] += 1
                if name is not None:
                    a, b = float(row["start"]) + offset, float(row["end"]) + offset
                    intervals.append((a, b, name))
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise DatasetError(
                f"{path}: not a labels file (need start, end, label per row): {exc!r}"
            ) from exc
        labels = cls(intervals, str(path))
        labels.unmapped, labels.matched = unmapped, matched
        return labels

    @classmethod
    def of(
        cls,
        rules: LabelRules,
        path: Path,
        start: float,
        marker_streams: dict[str, list[Marker]],
    ) -> Labels:
        """The labels of the recording at ``path`` under ``rules``."""
        if rules.intervals is not None:
            return cls.from_file(rules.intervals, path, start)
        assert rules.markers is not None
        wanted = rules.markers.stream
        if wanted is not None and wanted not in marker_streams:
            raise DatasetError(
                f"{path}: no marker stream {wanted!r}; it has "
                f"{sorted(marker_streams) or 'no marker stream'}"
            )
        markers = [m for name, ms in marker_streams.items() if wanted in (None, name) for m in ms]
        return cls.from_markers(rules.markers, markers)

    @property
    def names(self) -> list[str]:
        """The class names that occur, in order of first occurrence."""
        return list(dict.fromkeys(self._name))

    def label_at(self, t0: float, t1: float) -> str | None:
        """The label covering all of [t0, t1), or None."""
        return self.labels_of(np.array([t1]), t1 - t0)[0]

    def labels_of(self, t_end: np.ndarray, window_s: float) -> list[str | None]:
        """The label of each window ``[t_end - window_s, t_end)``, or None."""
        if not self.intervals:
            return [None] * len(t_end)
        t0 = np.asarray(t_end, dtype=np.float64) - window_s
        i = np.searchsorted(self._start, t0 + 1e-9, side="right") - 1
        ok = (i >= 0) & (self._end[i.clip(0)] >= np.asarray(t_end) - 1e-9)
        return [self._name[j] if good else None for j, good in zip(i, ok, strict=True)]
