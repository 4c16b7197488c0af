#!/usr/bin/env python3
"""A classic EMG baseline on the same windows as `crossl-stream eval configs/train-emg.yaml`:
log RMS per channel (8 features a window) and linear discriminant analysis, trained on some
sessions and tested on another. It tells how hard cross-session gesture recognition is on
this armband before any network is involved.

Usage: python tools/baseline_emg_rms.py [--spec configs/train-emg.yaml]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from crossl_stream.config import TrainConfig, load_config
from crossl_stream.training.metrics import macro_f1
from crossl_stream.training.spec import load_data


def log_rms(x: np.ndarray) -> np.ndarray:
    """[N, C, T] -> [N, C]: log of each channel's RMS around its window mean."""
    x = x - x.mean(axis=2, keepdims=True)
    return np.log(np.sqrt((x**2).mean(axis=2)) + 1e-3)


def lda(train_x, train_y, test_x, n_classes: int) -> np.ndarray:
    """Class predictions of a shared-covariance Gaussian classifier (equal priors)."""
    mu = np.stack([train_x[train_y == c].mean(axis=0) for c in range(n_classes)])
    within = sum(np.cov((train_x[train_y == c] - mu[c]).T) for c in range(n_classes))
    inv = np.linalg.inv(within / n_classes + 1e-3 * np.eye(train_x.shape[1]))
    scores = test_x @ inv @ mu.T - 0.5 * np.sum(mu @ inv * mu, axis=1)
    return scores.argmax(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("configs/train-emg.yaml"))
    args = parser.parse_args()
    cfg = load_config(args.spec, TrainConfig)
    data = load_data(cfg.data, args.spec.parent, str(args.spec), progress=False)
    w = data.windows.take(data.windows.labelled)
    features, n = log_rms(next(iter(w.x.values()))), len(data.classes)
    sessions = sorted(set(w.session.tolist()))
    print(f"log-RMS + LDA, macro-F1 on {len(w)} labelled windows of {data.name}")
    for test in sessions:  # leave-one-session-out, as eval's folds
        train = w.session != test
        pred = lda(features[train], w.y[train], features[w.session == test], n)
        print(f"  others -> {test}: {macro_f1(w.y[w.session == test], pred, n):.3f}")
    for a in sessions:  # one session to another
        for b in sessions:
            if a != b and a.split("/")[0] == b.split("/")[0]:
                pred = lda(
                    features[w.session == a], w.y[w.session == a], features[w.session == b], n
                )
                print(f"  {a} -> {b} (same person): {macro_f1(w.y[w.session == b], pred, n):.3f}")


if __name__ == "__main__":
    main()
