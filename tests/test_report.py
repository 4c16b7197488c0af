"""The protocol's summary: per-fold macro-F1, the agreed metrics.json keys, targets, report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crossl_stream.training.experiments import FoldOutcome, summarise
from crossl_stream.training.report import build_metrics, render, write_all


def _loso():
    y = np.array([0, 0, 1, 1, 2, 2])
    folds = []
    for subject, flip in ((1, 0), (2, 1)):
        preds = {
            "crossl@1.0": y.copy(),
            "crossl@0.1": np.where(np.arange(6) == flip, 2, y),
            "crossl@0.01": np.zeros(6, int),
            "supervised@1.0": y.copy(),
            "supervised@0.1": np.where(np.arange(6) < 2, 1, y),
            "crossl@1.0|acc": y.copy(),
            "crossl@1.0|gyro": np.where(np.arange(6) == 5, 0, y),
            "supervised@1.0|acc": np.zeros(6, int),
            "supervised@1.0|gyro": y.copy(),
        }
        folds.append(FoldOutcome(subject, y, preds))
    return {
        "classes": ["a", "b", "c"],
        "modalities": ["acc", "gyro"],
        "subjects": [1, 2],
        "windows": 12,
        "variants": summarise(folds, 3),
        "curves": {"pretrain": [{"loss": 3.0, "invariance": 1, "variance": 1, "covariance": 1}]},
        "curves_subject": 1,
    }


def test_summary_is_the_mean_of_per_fold_macro_f1():
    loso = _loso()
    v = loso["variants"]["crossl@0.1"]
    # one of six windows wrong in each fold: class 0 or 1 loses a window to class 2
    assert v["macro_f1_per_fold"]["1"] == pytest.approx(v["macro_f1_per_fold"]["2"])
    assert v["macro_f1"] == pytest.approx(np.mean(list(v["macro_f1_per_fold"].values())))
    assert v["accuracy"] == pytest.approx(10 / 12)
    assert np.array(v["confusion"]).sum() == 12


def test_metrics_carry_the_agreed_keys_and_targets():
    m = build_metrics(_loso(), None, {"crossl": {"accuracy": 0.975}, "supervised": {"accuracy": 1}})
    assert m["macro_f1"]["crossl@1.0"] == 1.0
    assert m["missing_modality_macro_f1"]["crossl"]["acc"] == 1.0
    assert m["missing_modality_macro_f1"]["supervised"]["acc"] == pytest.approx(1 / 6, abs=1e-3)
    assert m["basicmotions_accuracy"] == 0.975
    t = m["targets"]
    expected = m["macro_f1"]["crossl@0.1"] - m["macro_f1"]["supervised@0.1"] - 0.05
    assert t["crossl@0.1 - (supervised@0.1 + 0.05)"] == pytest.approx(expected, abs=1e-4)
    assert t["crossl kept fraction with one modality"]["acc"] == 1.0


def test_report_and_metrics_files_are_written(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "loso.json").write_text(json.dumps(_loso()))
    model_dir = tmp_path / "model"
    metrics = write_all(raw, model_dir, tmp_path / "docs" / "results.md")
    assert json.loads((model_dir / "metrics.json").read_text()) == metrics
    text = (tmp_path / "docs" / "results.md").read_text()
    assert "| 10% |" in text and "### Missing modalities" in text
    assert (tmp_path / "docs" / "img" / "label_fractions.png").stat().st_size > 1000
    assert render(metrics, None, None, []).startswith("# Results")
