"""The shipped default model: loads safely, was trained through the watch spec without the
demo subject, and predicts the shipped session well above chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossl_stream.model import load_model
from crossl_stream.training.metrics import macro_f1

DEFAULT = Path(__file__).resolve().parents[1] / "models" / "default"


@pytest.fixture(scope="module")
def model():
    return load_model(DEFAULT)


def test_trained_without_the_demo_subject(model, shipped):
    info = json.loads((DEFAULT / "model.json").read_text())["info"]
    assert {f.subject for f in shipped.files} == set(info["holdout"]) == {"10"}
    assert "10" not in info["data"]["subjects"] and len(info["data"]["subjects"]) == 9
    assert model.classes == shipped.classes
    assert info["data"]["window"]["hop_s"] == 0.5
    # recipe best: the stage is the recipe validation kept
    kept = info["selection"]["recipe"]
    assert info["stage"] == {"crossl": "finetuned", "supervised": "supervised"}[kept]


def test_default_model_predicts_the_held_out_subject(model, shipped):
    w = shipped.windows.take(shipped.windows.labelled)
    pred = model.predict_proba(w.x, w.available).argmax(1)
    assert macro_f1(w.y, pred, 7) > 0.5  # chance is 1/7
