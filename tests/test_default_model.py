"""The shipped default model: loads safely, was trained through the watch spec without the
demo subject, and predicts the shipped session well above chance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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


def test_default_model_ships_a_fallback_per_sensor_that_keeps_90_percent(model, shipped):
    """Each fallback is trained on the other sensor, on the same subjects, and on the held-out
    subject keeps at least 90% of the main model's macro-F1 with both sensors."""
    from crossl_stream.model.checkpoint import fallback_dirs

    info = json.loads((DEFAULT / "model.json").read_text())["info"]
    found = fallback_dirs(DEFAULT)
    assert sorted(found) == ["acc", "gyro"]
    w = shipped.windows.take(shipped.windows.labelled)
    w = w.take(np.flatnonzero(w.available.all(axis=1)))
    both = macro_f1(w.y, model.predict_proba(w.x).argmax(1), 7)
    for missing, folder in found.items():
        fallback = load_model(folder)
        theirs = json.loads((folder / "model.json").read_text())["info"]
        assert theirs["stage"] == "fallback" and theirs["without"] == missing
        assert theirs["data"]["subjects"] == info["data"]["subjects"]
        assert fallback.classes == model.classes
        assert fallback.modality_names == [m for m in ("acc", "gyro") if m != missing]
        only = {k: v for k, v in w.x.items() if k != missing}
        served = macro_f1(w.y, fallback.predict_proba(only).argmax(1), 7)
        masked = macro_f1(w.y, model.predict_proba(only).argmax(1), 7)
        print(f"both {both:.3f}; without {missing}: fallback {served:.3f}, masked {masked:.3f}")
        assert served >= 0.9 * both
