"""Classification metrics in plain numpy."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts [true, predicted].

    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 1, 0]), 2).tolist()
    [[1, 0], [1, 1]]
    """
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``y_true`` or ``y_pred``.

    >>> round(macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), 2), 4)
    0.7333
    """
    return macro_f1_of(confusion_matrix(y_true, y_pred, n_classes))


def macro_f1_of(cm: np.ndarray) -> float:
    """Macro-F1 of a confusion matrix [true, predicted], over the classes present.

    >>> macro_f1_of(np.array([[1, 1], [0, 2]])).__round__(4)
    0.7333
    """
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1) + cm.sum(axis=0)
    present = support > 0
    f1 = np.divide(2 * tp, support, out=np.zeros_like(tp), where=present)
    return float(f1[present].mean())


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches."""
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def wilcoxon_signed_rank(differences: np.ndarray) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test that paired ``differences`` are
    centred on zero; exact (every sign pattern counted), which suits the ten or so subjects
    of a leave-one-subject-out protocol.

    Zero differences are dropped (Wilcoxon's convention); tied magnitudes share their mean
    rank. With no non-zero difference the p-value is 1.

    >>> round(wilcoxon_signed_rank(np.array([1.0, 2.0, 3.0, 4.0, 5.0])), 4)
    0.0625
    >>> wilcoxon_signed_rank(np.array([0.0, 0.0]))
    1.0
    """
    d = np.asarray(differences, dtype=np.float64)
    d = d[d != 0]
    n = d.size
    if n == 0:
        return 1.0
    magnitude = np.abs(d)
    order = np.argsort(magnitude, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(1, n + 1)
    for value in np.unique(magnitude):  # tied magnitudes: their mean rank
        tied = magnitude == value
        ranks[tied] = ranks[tied].mean()
    doubled = np.rint(ranks * 2).astype(np.int64)  # mean ranks are whole or half numbers
    # counts[s]: sign patterns whose positive ranks sum to s / 2
    counts = np.zeros(int(doubled.sum()) + 1)
    counts[0] = 1.0
    for r in doubled:
        counts[r:] = counts[r:] + counts[:-r].copy() if r else counts
    observed = int(doubled[d > 0].sum())
    total = counts.sum()
    mean = doubled.sum() / 2
    extreme = np.abs(np.arange(counts.size) - mean) >= abs(observed - mean) - 1e-9
    return float(min(1.0, counts[extreme].sum() / total))
