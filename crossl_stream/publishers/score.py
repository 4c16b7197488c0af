"""Score publisher: predictions of a replayed recording scored against its labels as they
are published, in confusion matrices (a fixed size: nothing is kept per prediction)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crossl_stream.inference import Prediction
from crossl_stream.labels import Labels
from crossl_stream.publishers.base import Publisher
from crossl_stream.training.metrics import macro_f1_of


class ScorePublisher(Publisher):
    """Owns a confusion matrix [true, predicted] over every labelled window, one per sensor
    over the windows where that sensor was masked, and counts of what could not be scored.

    >>> labels = Labels([(0.0, 10.0, "walk")])
    >>> score = ScorePublisher(labels, ["walk", "sit"], window_s=2.0)
    >>> for t, label in ((2.0, "walk"), (4.0, "sit"), (12.0, "walk")):
    ...     _ = score.publish(Prediction(0, t, label, {}, {"acc": True}, "m", {}))
    >>> score.lines()[0]
    'accuracy 0.500, macro-F1 0.333 over 2 labelled windows'
    """

    def __init__(self, labels: Labels, classes: Sequence[str], window_s: float) -> None:
        super().__init__()
        self.labels = labels
        self.classes = list(classes)
        self.window_s = window_s
        self._index = {c: i for i, c in enumerate(self.classes)}
        n = len(self.classes)
        self.confusion = np.zeros((n, n), dtype=np.int64)
        self.masked: dict[str, np.ndarray] = {}  # sensor -> confusion where it was masked
        self.unknown: dict[str, int] = {}  # labels the model lacks (few: the recording's)
        self.empty = 0  # windows no sensor covered: no prediction to score

    def send(self, prediction: Prediction) -> None:
        truth = self.labels.labels_of(np.array([prediction.t_window_end]), self.window_s)[0]
        if truth is None:
            return
        if prediction.label is None:
            self.empty += 1
            return
        t = self._index.get(truth)
        if t is None:
            self.unknown[truth] = self.unknown.get(truth, 0) + 1
            return
        p = self._index[prediction.label]
        self.confusion[t, p] += 1
        for sensor, used in prediction.mask.items():
            if not used:
                cm = self.masked.get(sensor)
                if cm is None:
                    cm = self.masked[sensor] = np.zeros_like(self.confusion)
                cm[t, p] += 1

    def lines(self) -> list[str]:
        """Accuracy and macro-F1 overall and with each sensor masked, and what was not
        scored."""
        if not self.confusion.sum():
            extra = f"; labels the model lacks: {self.unknown}" if self.unknown else ""
            return [f"no window is labelled by the label rules{extra}"]
        lines = [_line("", self.confusion)]
        for sensor in sorted(self.masked):
            lines.append(_line(f"  with {sensor} masked: ", self.masked[sensor]))
        if self.empty:
            lines.append(f"not scored: {self.empty} labelled windows no sensor covered")
        if self.unknown:
            lines.append(f"not scored, labels the model lacks: {self.unknown}")
        return lines


def _line(what: str, cm: np.ndarray) -> str:
    n = int(cm.sum())
    return (
        f"{what}accuracy {np.trace(cm) / n:.3f}, macro-F1 {macro_f1_of(cm):.3f} over {n} "
        "labelled windows"
    )
