"""The evaluation report (results.json -> metrics.json, report.md, plots) and model cards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from crossl_stream.training.experiments import FoldOutcome, summarise
from crossl_stream.training.report import (
    eval_metrics,
    paired_difference,
    render_card,
    render_eval,
    write_card,
    write_eval,
)

ROOT = Path(__file__).resolve().parents[1]
FOLDS = ["s1", "s2"]


def _variant(per_fold: dict[str, float]) -> dict:
    values = list(per_fold.values())
    return {
        "macro_f1": float(np.mean(values)),
        "macro_f1_std": float(np.std(values)),
        "macro_f1_per_fold": per_fold,
        "accuracy": float(np.mean(values)),
        "confusion": [[8, 2], [1, 9]],
    }


# macro-F1 per fold (s1, s2) of each variant
SCORES = {
    "crossl@0.1": (0.80, 0.60),
    "crossl-probe@0.1": (0.50, 0.40),
    "supervised@0.1": (0.70, 0.74),
    "crossl@1.0": (0.90, 0.80),
    "crossl-probe@1.0": (0.60, 0.50),
    "supervised@1.0": (0.85, 0.79),
    "supervised+masking@1.0": (0.86, 0.78),
    "crossl@1.0|acc": (0.80, 0.70),
    "crossl@1.0|gyro": (0.70, 0.60),
    "supervised@1.0|acc": (0.60, 0.50),
    "supervised@1.0|gyro": (0.40, 0.30),
    "supervised+masking@1.0|acc": (0.75, 0.65),
    "supervised+masking@1.0|gyro": (0.70, 0.60),
}


def _results(pretrain_on: str = "train") -> dict:
    stops = {
        g: {name: {"stopped": "patience", "best_epoch": 4} for name in SCORES if "|" not in name}
        for g in FOLDS
    }
    stops["s2"]["supervised@0.1"] = {"stopped": "max_epochs", "best_epoch": 50}
    pretrain = [
        {"loss": 30.0 - i, "invariance": 1.0, "variance": 0.9, "covariance": 0.1 + i / 100}
        for i in range(25)
    ]
    sup = [{"loss": 1.0 / (i + 1), "accuracy": 0.5} for i in range(12)]
    for i, h in enumerate(sup[2::3], 1):
        h.update(epoch=i, val_f1=0.5 + i / 20, val_loss=1.0 / i)
    return {
        "name": "emg-gestures",
        "by": "session",
        "pretrain_on": pretrain_on,
        "classes": ["rock", "paper"],
        "modalities": ["acc", "gyro"],
        "window_s": 1.0,
        "folds": FOLDS,
        "windows": 400,
        "labelled_windows": 380,
        "variants": {
            name: _variant(dict(zip(FOLDS, v, strict=True))) for name, v in SCORES.items()
        },
        "stops": stops,
        "curves": {"pretrain": pretrain, "supervised@1.0": sup, "crossl@1.0": sup},
        "curves_fold": "s1",
        "seconds": 123.0,
    }


MASKING = [
    {
        "variant": "mlp/spatial@0.5",
        "probe@1": 0.61,
        "finetune@0.1": 0.76,
        "folds": FOLDS,
        "seconds": 10.0,
    },
    {
        "variant": "mlp/random@0.9",
        "probe@1": 0.55,
        "finetune@0.1": 0.78,
        "folds": FOLDS,
        "seconds": 12.0,
    },
]


def test_summary_is_the_mean_of_per_fold_macro_f1():
    y = np.array([0, 0, 1, 1, 2, 2])
    folds = [
        FoldOutcome(g, y, {"crossl@0.1": np.where(np.arange(6) == flip, 2, y)})
        for g, flip in (("1", 0), ("2", 1))
    ]
    v = summarise(folds, 3)["crossl@0.1"]
    # one of six windows wrong in each fold: class 0 or 1 loses a window to class 2
    assert v["macro_f1_per_fold"]["1"] == pytest.approx(v["macro_f1_per_fold"]["2"])
    assert v["macro_f1"] == pytest.approx(np.mean(list(v["macro_f1_per_fold"].values())))
    assert v["accuracy"] == pytest.approx(10 / 12)


def test_paired_difference_is_fold_by_fold():
    d = paired_difference(_results()["variants"], "crossl@0.1", "supervised@0.1", FOLDS)
    assert d["per_fold"] == pytest.approx({"s1": 0.10, "s2": -0.14})
    assert d["mean"] == pytest.approx(-0.02)
    assert (d["wins"], d["losses"], d["folds"]) == (1, 1, 2)


def test_metrics_json_carries_the_agreed_keys():
    m = eval_metrics(_results())
    assert m["dataset"] == "emg-gestures"
    assert m["protocol"] == "leave-one-session-out"
    assert (m["pretrain_on"], m["folds"], m["windows"]) == ("train", FOLDS, 400)
    assert m["macro_f1"]["crossl@0.1"] == pytest.approx(0.70)
    assert m["macro_f1_std"]["crossl@0.1"] == pytest.approx(0.10)
    assert "crossl@1.0|acc" not in m["macro_f1"]
    assert m["missing_modality_macro_f1"]["supervised"] == pytest.approx(
        {"acc": 0.55, "gyro": 0.35}
    )
    assert m["crossl_minus_supervised"] == pytest.approx({"0.1": -0.02, "1.0": 0.03})


def test_write_eval_writes_every_file_and_the_numbers(tmp_path):
    out = tmp_path / "eval"
    metrics = write_eval(_results(), out, MASKING, "2 CPU cores, no GPU", "crossl-stream eval x")
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "results.json").read_text())["name"] == "emg-gestures"
    assert json.loads((out / "masking.json").read_text()) == MASKING
    for png in (
        "learning_curves.png",
        "label_fractions.png",
        "confusion_crossl_1.0.png",
        "confusion_supervised_1.0.png",
        "missing_modality.png",
    ):
        assert (out / "img" / png).stat().st_size > 1000, png
    text = (out / "report.md").read_text()
    assert text.startswith("# Evaluation: emg-gestures")
    assert "`crossl-stream eval x`" in text and "2 CPU cores, no GPU" in text
    assert "145 s" in text  # 123 s of folds and 22 s of masking grid
    assert "Leave-one-session-out" in text and "(s1, s2)" in text
    assert "training sessions' windows only (strict" in text
    # labels table: mean ± std over folds
    assert "| 10% | 70.0 ± 10.0 | 45.0 ± 5.0 | 72.0 ± 2.0 |" in text
    assert "| 100% | 85.0 ± 5.0 | 55.0 ± 5.0 | 82.0 ± 3.0 |" in text
    # paired differences, in a table and in words
    assert "| 10% | -2.0 | 12.0 | 1 of 2 |" in text
    assert (
        "CroSSL fine-tuned with 10% of labels is 2.0 points below supervised with the same "
        "labels, winning 1 of 2 folds." in text
    )
    assert (
        "CroSSL fine-tuned with 100% of labels is 3.0 points above supervised with the same "
        "labels, winning 2 of 2 folds." in text
    )
    # per-fold rows
    assert "| s1 | 80.0 | 50.0 | 70.0 | +10.0 |" in text
    assert "| s2 | 60.0 | 40.0 | 74.0 | -14.0 |" in text
    # ablation and missing modalities: kept = worst single modality / full
    assert "| supervised + masking | 82.0 ± 4.0 |" in text
    assert "| CroSSL fine-tune | 85.0 | 75.0 | 65.0 | 76% |" in text
    assert "| supervised | 82.0 | 55.0 | 35.0 | 43% |" in text
    # the capped run is named plainly
    assert "| supervised@0.1 | 1 | 1 | 0 |" in text
    assert "1 of 6 supervised runs stopped at max_epochs: the cap bound" in text
    assert "All 8 CroSSL runs stopped on patience" in text
    assert "| mlp/random@0.9 | 55.0 | 78.0 | 12 |" in text
    assert "![label_fractions.png](img/label_fractions.png)" in text


def test_report_says_where_pretraining_looked_and_skips_one_modality_tables():
    r = _results("all")
    r["modalities"] = ["emg"]
    r["variants"] = {k: v for k, v in r["variants"].items() if "|" not in k}
    text = render_eval(eval_metrics(r), r, None, [], None, None)
    assert "also saw the held-out session's windows" in text
    assert "Missing modalities" not in text and "Masking strategies" not in text


PRETRAINED_META = {
    "model": {"aggregator": "mlp", "code_size": 64, "embed_dim": 32, "kernels": [8, 4]},
    "modalities": [{"name": "emg", "channels": 8, "rate_hz": 200.0, "samples": 200}],
    "classes": [],
    "info": {
        "stage": "pretrained",
        "data": {
            "name": "emg-gestures",
            "sensors": {"emg": {"stream": "Myo EMG", "type": "EMG"}},
            "window": {"length_s": 1.0, "hop_s": 0.25},
            "labels": None,
            "subjects": ["mg", "rr"],
            "sessions": 4,
            "windows": 3000,
            "labelled_windows": 0,
        },
        "holdout": [],
        "seed": 0,
        "config": {
            "masking": {"strategy": "temporal", "keep": 0.7},
            "loss": {"invariance": 10.0, "variance": 10.0, "covariance": 100.0},
            "pretrain": {"steps": 300, "batch_size": 256, "lr": 0.002},
            "finetune": {"max_epochs": 200, "patience": 10, "batch_size": 64, "lr": 0.001},
        },
        "pretrain_seconds": 42.0,
    },
}


def test_card_of_a_pretrained_only_model():
    text = render_card(PRETRAINED_META, None)
    assert text.startswith("# CroSSL encoder pretrained on emg-gestures")
    assert "`crossl-stream finetune SPEC --from DIR`" in text
    assert "| `emg` | `Myo EMG` (type `EMG`) | 8 | 200 Hz | 200 |" in text
    assert "Windows of 1 s, one every 0.25 s" in text
    assert "300 steps" in text and "`temporal` latent masking, keep 0.7" in text
    assert "geomstats" in text and "MIT" in text
    assert "How well it does" not in text


def test_card_of_a_finetuned_model_with_metrics():
    meta = json.loads(json.dumps(PRETRAINED_META))
    meta["classes"] = ["rock", "paper"]
    meta["modalities"].append({"name": "acc", "channels": 3, "rate_hz": 50.0, "samples": 50})
    meta["info"].update(
        stage="finetuned",
        labels_fraction=0.1,
        stopped="max_epochs",
        best_epoch=190,
        epochs=200,
        finetune_seconds=12.5,
        holdout=["rr"],
        code_version="abc123",
    )
    meta["info"]["data"]["name"] = "basicmotions"
    text = render_card(meta, eval_metrics(_results()))
    assert text.startswith("# CroSSL classifier: basicmotions, 2 classes")
    assert "`rock`, `paper`" in text
    assert "on 10% of the labelled training windows" in text
    assert "epoch cap (200 epochs)" in text and "epoch 190" in text
    assert "Held out (never trained on): rr" in text
    assert "aeon" in text and "BSD 3-Clause" in text
    assert "| 10% | 70.0 | 72.0 | -2.0 |" in text
    assert "each of 2 sessions held out" in text
    assert "crossl-stream replay RECORDING.xdf --model DIR" in text


OLD_META = {  # model.json as written before the spec workflow (no stage, data, holdout)
    "format": "crossl-stream/checkpoint",
    "version": 1,
    "model": {
        "code_size": 96,
        "kernels": [24, 16, 8],
        "dropout": 0.1,
        "aggregator": "mlp",
        "embed_dim": 32,
    },
    "modalities": [
        {"name": "acc", "channels": 3, "rate_hz": 50.0, "samples": 100},
        {"name": "gyro", "channels": 3, "rate_hz": 50.0, "samples": 100},
    ],
    "classes": ["PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"],
    "info": {
        "dataset": "seglearn-watch",
        "holdout_subject": 10,
        "train_subjects": [1, 2, 3, 4, 5, 6, 7, 8, 9],
        "train_windows": 8250,
        "config": {"dataset": "seglearn-watch", "window_s": 2.0, "hop_s": 0.5},
    },
}
OLD_METRICS = {
    "dataset": "seglearn-watch",
    "protocol": "leave-one-subject-out",
    "macro_f1": {"crossl@0.1": 0.760194, "supervised@0.1": 0.781075, "crossl@1.0": 0.759121},
}


def test_card_of_an_old_model_folder(tmp_path):
    """model.json written before the generic workflow (no stage, data, holdout keys)."""
    (tmp_path / "model.json").write_text(json.dumps(OLD_META))
    path = write_card(tmp_path)
    text = path.read_text()
    assert path == tmp_path / "README.md"
    assert "seglearn-watch" in text and "Burns" in text
    assert "| `acc` | — | 3 | 50 Hz | 100 |" in text
    assert "| 10% | 76.0 | 78.1 |" in render_card(OLD_META, OLD_METRICS)


def test_the_shipped_model_card_is_what_its_model_json_renders(tmp_path):
    """The card of models/default is generated: editing the renderer must regenerate it."""
    import shutil

    from crossl_stream import default_model_dir

    shipped = default_model_dir()
    for name in ("model.json", "metrics.json"):
        if (shipped / name).is_file():
            shutil.copy(shipped / name, tmp_path / name)
    assert write_card(tmp_path).read_text() == (shipped / "README.md").read_text()
