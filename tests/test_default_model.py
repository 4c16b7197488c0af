"""The shipped default model: loads safely, was trained without the demo subject, reports its
metrics in the agreed shape, and predicts the shipped excerpt well above chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossl_stream.model import load_model
from crossl_stream.training.datasets import load_watch, make_windows, shipped_excerpt
from crossl_stream.training.metrics import macro_f1

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT)


def test_trained_without_the_demo_subject(model):
    info = json.loads((DEFAULT / "model.json").read_text())["info"]
    excerpt = load_watch(shipped_excerpt())
    subjects = {r.subject for r in excerpt.recordings}
    assert subjects == {info["holdout_subject"]}
    assert info["holdout_subject"] not in info["train_subjects"]
    assert model.classes == excerpt.classes


def test_metrics_have_the_agreed_keys_as_fractions():
    metrics = json.loads((DEFAULT / "metrics.json").read_text())
    assert metrics["dataset"] == "seglearn-watch"
    assert metrics["protocol"] == "leave-one-subject-out"
    keys = {"supervised@1.0", "supervised@0.1", "crossl@1.0", "crossl@0.1", "crossl@0.01"}
    assert keys <= set(metrics["macro_f1"])
    values = [metrics["macro_f1"][k] for k in keys]
    for model in ("crossl", "supervised"):
        assert set(metrics["missing_modality_macro_f1"][model]) == {"acc", "gyro"}
        values += metrics["missing_modality_macro_f1"][model].values()
    values.append(metrics["basicmotions_accuracy"])
    assert all(0.0 <= v <= 1.0 for v in values)
    assert len(metrics["subjects"]) == 10


def test_default_model_predicts_the_held_out_subject(model):
    excerpt = load_watch(shipped_excerpt())
    windows = make_windows(excerpt.recordings, excerpt.specs(2.0), 1.0)
    pred = model.predict_proba(windows.x).argmax(1)
    assert macro_f1(windows.y, pred, 7) > 0.5  # chance is 1/7
