"""The evaluation report (results.json -> metrics.json, report.md, plots) and model cards."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from crossl_stream.training.experiments import FoldOutcome, runs_table
from crossl_stream.training.report import (
    eval_metrics,
    holm,
    min_wins,
    paired,
    render_card,
    render_eval,
    write_card,
    write_eval,
)

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ["s1", "s2", "s3", "s4"]
MISSING_OTHER = (("gyro", "acc"), ("acc", "gyro"))
FALLBACK_METAS = ("fallback/without-acc/model.json", "fallback/without-gyro/model.json")

# macro-F1 per seed, then per subject (s1..s4), of each run; fraction 1.0 has seed 0 only
SCORES = {
    "supervised@0.1": {"0": (0.70, 0.74, 0.60, 0.80), "1": (0.72, 0.70, 0.64, 0.78)},
    "crossl@0.1": {"0": (0.80, 0.70, 0.70, 0.84), "1": (0.78, 0.70, 0.68, 0.84)},
    "crossl-all@0.1": {"0": (0.80, 0.84, 0.70, 0.90), "1": (0.82, 0.80, 0.74, 0.88)},
    "supervised@1.0": {"0": (0.86, 0.82, 0.84, 0.84)},
    "crossl@1.0": {"0": (0.90, 0.80, 0.85, 0.85)},
}
# macro-F1 with one modality alone, seed 0 at fraction 1.0
ALONE = {
    "supervised@1.0": {"acc": (0.80, 0.78, 0.80, 0.78), "gyro": (0.80, 0.76, 0.78, 0.80)},
    "crossl@1.0": {"acc": (0.81, 0.72, 0.765, 0.765), "gyro": (0.45, 0.40, 0.425, 0.425)},
}


def _entry(f1: float, stopped: str = "patience", alone: dict | None = None) -> dict:
    capped = stopped == "max_epochs"
    e = {
        "macro_f1": f1,
        "accuracy": f1 + 0.05,
        "stopped": stopped,
        "best_epoch": 30 if capped else 4,
        "epochs": 30 if capped else 9,
        "steps": 90,
        "val_f1": 0.7,
    }
    if alone:
        e["alone"] = alone
    return e


def _runs(modalities: bool = True) -> dict:
    runs: dict = {}
    for key, per_seed in SCORES.items():
        for seed, values in per_seed.items():
            for i, (g, f1) in enumerate(zip(GROUPS, values, strict=True)):
                alone = (
                    {m: v[i] for m, v in ALONE[key].items()}
                    if modalities and key in ALONE
                    else None
                )
                runs.setdefault(key, {}).setdefault(seed, {})[g] = _entry(f1, alone=alone)
    runs["supervised@0.1"]["1"]["s3"]["stopped"] = "max_epochs"  # one run hit the cap
    runs["supervised@0.1"]["1"]["s3"]["best_epoch"] = 30
    return runs


def _results(modalities: bool = True) -> dict:
    """A trimmed copy of what ``run_folds`` returns (and the CLI adds)."""
    pretrain = [
        {"loss": 30.0 - i, "invariance": 1.0, "variance": 0.9, "covariance": 0.1 + i / 100}
        for i in range(25)
    ]
    history = [{"loss": 1.0 / (i + 1), "accuracy": 0.5} for i in range(12)]
    for i, h in enumerate(history[2::3], 1):
        h.update(epoch=i, val_f1=0.5 + i / 20, val_loss=1.0 / i)
    return {
        "name": "emg-gestures",
        "by": "subject",
        "classes": ["rock", "paper"],
        "modalities": ["acc", "gyro"] if modalities else ["emg"],
        "window_s": 1.0,
        "folds": GROUPS,
        "seeds": [0, 1],
        "arms": {"crossl": [0.1, 1.0], "crossl-all": [0.1], "supervised": [0.1, 1.0]},
        "windows": 400,
        "labelled_windows": 380,
        "runs": _runs(modalities),
        "confusion": {k: [[8, 2], [1, 9]] for k in SCORES},
        "curves": {"pretrain": pretrain, "supervised@0.1": history, "crossl@0.1": history},
        "curves_fold": "s1",
        "jobs": 2,
        "seconds": 100.0,
        "fold_seconds": 180.0,
        "config": {
            "masking": {"strategy": "spatial", "keep": 0.5},
            "pretrain": {"steps": 300, "expander": [64, 64], "augment": {"jitter": 0.05}},
            "finetune": {"modality_dropout": 0.2, "augment": False, "max_epochs": 30},
            "evaluation": {"select": True, "supervised_goal": 0.83},
        },
        "total_seconds": 150.0,
    }


ABLATION = {
    "variants": {"base": {}, "no-expander": {"pretrain": {"expander": []}}},
    "folds": ["s1"],
    "rows": [  # fold s1's validation subject is s3 (a test subject of its own fold)
        {
            "variant": "base",
            "group": "s1",
            "seed": 0,
            "validation": ["s3"],
            "probe_f1": 0.5,
            "finetune_f1": 0.4,
        },
        {
            "variant": "no-expander",
            "group": "s1",
            "seed": 0,
            "validation": ["s3"],
            "probe_f1": 0.6,
            "finetune_f1": 0.5,
        },
    ],
    "scores": {
        "base": {"probe_f1": 0.5, "finetune_f1": 0.4, "score": 0.45},
        "no-expander": {"probe_f1": 0.6, "finetune_f1": 0.5, "score": 0.55},
    },
    "chosen": "no-expander",
    "curve": {
        "variant": "base",
        "group": "s1",
        "seed": 0,
        "validation": ["s3"],
        "curve": [{"step": 10, "probe_f1": 0.42}, {"step": 20, "probe_f1": 0.47}],
        "loss": [30.0 - i for i in range(20)],
    },
    "seconds": 30.0,
}


def _exact_p(d: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank p by hand: every sign pattern of distinct ranks."""
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    observed = ranks[np.array(d) > 0].sum()
    mean = ranks.sum() / 2
    sums = [
        sum(r for r, s in zip(ranks, signs, strict=True) if s)
        for signs in itertools.product([0, 1], repeat=len(d))
    ]
    return float(np.mean([abs(s - mean) >= abs(observed - mean) for s in sums]))


def test_metrics_are_means_over_seeds_then_subjects():
    m = eval_metrics(_results(), ABLATION, "2 CPU cores")
    assert m["dataset"] == "emg-gestures" and m["protocol"] == "leave-one-subject-out"
    assert (m["folds"], m["seeds"], m["windows"]) == (GROUPS, [0, 1], 400)
    # a subject's score is its mean over seeds; the mean and std are over subjects
    assert m["per_subject"]["supervised@0.1"] == pytest.approx(
        {"s1": 0.71, "s2": 0.72, "s3": 0.62, "s4": 0.79}
    )
    assert m["macro_f1"]["supervised@0.1"] == pytest.approx(0.71)
    assert m["macro_f1_std"]["supervised@0.1"] == pytest.approx(np.sqrt(0.0146 / 4), abs=1e-6)
    assert m["macro_f1_std"]["crossl@0.1"] == pytest.approx(np.sqrt(0.0157 / 4), abs=1e-6)
    assert m["accuracy"]["supervised@0.1"] == pytest.approx(0.76)
    # the spread over seeds: std of the per-seed means (0.76 and 0.75); none with one seed
    assert m["seed_spread"]["crossl@0.1"] == pytest.approx(0.005)
    assert m["seed_spread"]["crossl@1.0"] is None
    # each modality alone, and the share of the all-modality macro-F1 it keeps
    assert m["alone"]["crossl@1.0"] == pytest.approx({"acc": 0.765, "gyro": 0.425})
    assert m["kept"]["crossl@1.0"] == pytest.approx({"acc": 0.9, "gyro": 0.5})
    assert "crossl@0.1" not in m["alone"]
    assert m["stops"]["supervised@0.1"] == {"patience": 7, "max_epochs": 1, "steps": 0}
    assert m["stops"]["crossl@1.0"] == {"patience": 4, "max_epochs": 0, "steps": 0}
    assert m["ablation"]["chosen"] == "no-expander"
    assert m["ablation"]["scores"]["base"]["score"] == pytest.approx(0.45)
    assert (m["machine"], m["seconds"]) == ("2 CPU cores", 150.0)


def test_paired_comparison_subject_by_subject_with_its_wilcoxon_p():
    m = eval_metrics(_results())
    d = m["paired"]["crossl@0.1 - supervised@0.1"]
    diffs = [0.08, -0.02, 0.07, 0.05]  # crossl (0.79, 0.70, 0.69, 0.84) - supervised
    assert list(d["per_subject"].values()) == pytest.approx(diffs)
    assert d["mean"] == pytest.approx(0.045)
    assert (d["wins"], d["losses"], d["n"]) == (3, 1, 4)
    assert d["p"] == pytest.approx(_exact_p(diffs)) and d["p"] == pytest.approx(0.25)
    every = m["paired"]["crossl-all@0.1 - supervised@0.1"]
    assert (every["wins"], every["n"], every["p"]) == (4, 4, pytest.approx(2 / 16))
    # fraction 1.0 ran seed 0 only: the pair is over that seed
    assert m["paired"]["crossl@1.0 - supervised@1.0"]["seeds"] == [0]
    assert "crossl-all@1.0 - supervised@1.0" not in m["paired"]


def test_paired_uses_only_the_seeds_both_runs_share():
    runs = _runs()
    runs["supervised@1.0"]["1"] = {g: _entry(0.0) for g in GROUPS}  # a seed crossl lacks
    d = paired(runs, "crossl@1.0", "supervised@1.0", GROUPS)
    assert d["seeds"] == [0]
    assert d["mean"] == pytest.approx(0.01)


def test_targets_met_and_missed_with_their_margins():
    targets = {t["name"]: t for t in eval_metrics(_results())["targets"]}
    full = targets["supervised@1.0 >= 0.83"]
    assert full["met"] and full["margin"] == pytest.approx(0.01)
    gain = targets["crossl@0.1 >= supervised@0.1 + 0.05"]
    assert gain["value"] == pytest.approx(0.755) and gain["goal"] == pytest.approx(0.76)
    assert not gain["met"] and gain["margin"] == pytest.approx(-0.005)
    assert gain["diff"] == pytest.approx(0.045) and gain["p"] == pytest.approx(0.25)
    every = targets["crossl-all@0.1 >= supervised@0.1 + 0.05"]
    assert every["met"] and every["margin"] == pytest.approx(0.05)
    kept = targets["crossl@1.0 kept >= 0.9 with one modality only"]
    assert not kept["met"] and kept["modality"] == "gyro"
    assert kept["margin"] == pytest.approx(0.5 - 0.9)
    sup = targets["supervised@1.0 kept >= 0.9 with one modality only"]
    assert sup["met"] and sup["value"] == pytest.approx(0.785 / 0.84, abs=1e-6)
    assert not any(name.startswith("crossl@0.01") for name in targets)  # not run


def test_summary_lines_for_the_terminal():
    lines = eval_metrics(_results())["summary"]
    assert lines[0] == (
        "labels 10%: CroSSL 75.5, CroSSL (all) 81.0, supervised 71.0 "
        "(CroSSL - supervised +4.5, p=0.25; CroSSL (all) - supervised +10.0, p=0.12)"
    )
    assert "target crossl@0.1 >= supervised@0.1 + 0.05: missed (-0.5 points)" in lines
    assert "target supervised@1.0 >= 0.83: met (+1.0 points)" in lines
    assert lines[-1] == "runs stopped at max_epochs (the cap bound): supervised@0.1 1"


def test_min_wins_for_a_significant_wilcoxon():
    assert min_wins(5) is None  # even 5 of 5 gives p = 0.0625
    assert min_wins(6) == 6
    assert min_wins(10) == 7  # the 3 losses the smallest: p = 28 / 1024


def test_write_eval_writes_every_file_and_the_report(tmp_path):
    out = tmp_path / "eval"
    results = _results()
    metrics = write_eval(results, out, ABLATION, "2 CPU cores, no GPU", "crossl-stream eval x")
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert json.loads((out / "results.json").read_text()) == results
    assert json.loads((out / "ablation.json").read_text()) == ABLATION
    for png in (
        "learning_curves.png",
        "label_fractions.png",
        "missing_modality.png",
        "confusion_supervised_1.0.png",
        "confusion_crossl_1.0.png",
        "ablation_curve.png",
    ):
        assert (out / "img" / png).stat().st_size > 1000, png
        assert f"![{png}](img/{png})" in (out / "report.md").read_text()
    text = (out / "report.md").read_text()
    assert text.startswith("# Evaluation: emg-gestures")
    assert "Leave-one-subject-out over 4 subjects (s1, s2, s3, s4); seeds 0, 1" in text
    assert "400 windows (380 labelled)" in text
    assert "Runs with every label (100%) use seed 0 only" in text
    assert "2 CPU cores, no GPU" in text and "2.5 min in all" in text
    assert "`crossl-stream eval x`" in text
    # the main table: mean ± std over subjects, and the paired columns
    assert (
        "| 10% | 75.5 ± 6.3 | 81.0 ± 6.0 | 71.0 ± 6.0 | +4.5, 3/4, p=0.25 | +10.0, 4/4, p=0.12 |"
        in text
    )
    assert "| 100% | 85.0 ± 3.5 | — | 84.0 ± 1.4 | +1.0, 3/4," in text
    assert "| crossl@0.1 | 0, 1 | 75.5 ± 6.3 | 80.5 | ± 0.5 |" in text
    assert "| crossl@1.0 | 0 | 85.0 ± 3.5 | 90.0 | — (one seed) |" in text
    # targets
    assert "## Targets" in text
    assert (
        "| crossl@0.1 >= supervised@0.1 + 0.05 | 75.5 | 76.0 | **missed** | -0.5 | "
        "paired mean +4.5, Wilcoxon p=0.25 | 0.25 |" in text
    )
    assert "| supervised@1.0 >= 0.83 | 84.0 | 83.0 | met | +1.0 |  | — |" in text
    assert "Not measured (no such run): crossl@0.01, crossl-all@0.01." in text
    assert "which arm is shipped is decided elsewhere" in text
    # one modality missing: each alone with what it keeps, and the worst
    assert "| crossl@1.0 | 85.0 | 76.5 (90%) | 42.5 (50%) | 50% |" in text
    # per subject
    assert "### Per subject, 10% of labels" in text
    assert "| s2 | 72.0 | 70.0 | 82.0 | -2.0 | +10.0 |" in text
    # the ablation, on validation subjects only
    assert "## Ablation (validation only)" in text
    assert "| **no-expander** (chosen) | `pretrain.expander: []` | 60.0 | 50.0 | 55.0 |" in text
    assert "| base | `(the spec as written)` | 50.0 | 40.0 | 45.0 |" in text
    assert "the folds ran `no-expander`" in text
    assert "| 20 | 47.0 |" in text and "never a test subject" not in text
    assert "never the test subject of the same fold" in text
    # the capped run is flagged
    assert "| supervised@0.1 | 8 | 7 | **1** (capped) | 0 | 4 |" in text
    assert "**Stopped at max_epochs:** supervised@0.1 (1 of 8)" in text
    # how to read
    assert "## How to read these numbers" in text
    assert "with 4 subjects it cannot reach p < 0.05 at all" in text
    assert "validation subject drawn from the training subjects" in text


def test_fallback_models_keep_their_share_of_each_full_label_run(tmp_path):
    results = _results()
    without = {"gyro": (0.80, 0.78, 0.76, 0.80), "acc": (0.78, 0.70, 0.80, 0.79)}
    results["fallbacks"] = {
        "0": {
            g: {"without": {m: v[i] for m, v in without.items()}, "stops": {}}
            for i, g in enumerate(GROUPS)
        }
    }
    metrics = write_eval(results, tmp_path / "eval", None, "2 CPU cores", "crossl-stream eval x")
    fb = metrics["fallbacks"]
    assert fb["without"] == {"gyro": 0.785, "acc": 0.7675}
    # supervised@1.0 has 0.84 (s1..s4: 0.86, 0.82, 0.84, 0.84), crossl@1.0 0.85
    assert fb["kept"]["supervised@1.0"] == {"gyro": round(0.785 / 0.84, 6), "acc": 0.913690}
    assert fb["kept"]["crossl@1.0"]["acc"] == round(0.7675 / 0.85, 6)
    # per subject: without acc keeps 0.70 of s2's 0.82 (85%) only
    assert fb["kept"]["supervised@1.0 per subject"] == {"gyro": 4, "acc": 3}
    goal = {t["name"]: t for t in metrics["targets"]}
    t = goal["supervised@1.0 with fallbacks kept >= 0.9 with one modality missing"]
    assert t["met"] and t["without"] == "acc" and t["value"] == 0.91369
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## One modality missing, with fallback models" in report
    assert "| supervised@1.0 | 84.0 | 78.5 (93%; 4/4) | 76.8 (91%; 3/4) |" in report
    meta = {"classes": ["rock", "paper"], "info": {"stage": "supervised"}}
    claim = "keeps 93% without gyro, 91% without acc of this recipe's macro-F1: it meets"
    fallbacks = {m: {"modalities": [{"name": o}], "info": {}} for m, o in MISSING_OTHER}
    assert claim in render_card(meta, metrics, fallbacks)
    assert claim not in render_card(meta, metrics)  # a folder without them claims nothing


def test_one_modality_data_has_no_missing_modality_table(tmp_path):
    results = _results(modalities=False)
    metrics = write_eval(results, tmp_path, None)
    assert metrics["alone"] == {} and metrics["kept"] == {} and metrics["ablation"] is None
    assert not any("modality only" in t["name"] for t in metrics["targets"])
    text = (tmp_path / "report.md").read_text()
    assert "One modality missing" not in text and "Ablation" not in text
    assert not (tmp_path / "img" / "missing_modality.png").exists()
    assert not (tmp_path / "ablation.json").exists()
    assert "## Targets" in text and "## How the runs stopped" in text


def test_targets_only_where_a_goal_applies():
    """An absolute goal belongs to one data set: a spec without one gets none, and a report
    with no target at all has no empty Targets table."""
    results = _results()
    del results["config"]["evaluation"]["supervised_goal"]
    names = [t["name"] for t in eval_metrics(results)["targets"]]
    assert not any(n.startswith("supervised@1.0 >=") for n in names)
    assert "crossl@0.1 >= supervised@0.1 + 0.05" in names
    # supervised alone, one modality and no goal: no targets, and no empty Targets table
    results = _results(modalities=False)
    del results["config"]["evaluation"]["supervised_goal"]
    results["arms"] = {"supervised": [1.0]}
    results["runs"] = {"supervised@1.0": results["runs"]["supervised@1.0"]}
    metrics = eval_metrics(results)
    assert metrics["targets"] == []
    assert "## Targets" not in render_eval(metrics, results, None, [], None, None)


def test_report_without_plots_says_why():
    results = _results()
    text = render_eval(eval_metrics(results), results, None, [], None, None)
    assert "matplotlib is not installed" in text and "## Plots" not in text


def test_report_says_where_validation_came_from():
    """Four subjects: another training subject validates; two: the one training subject's
    own held-out windows (``validation_split``'s fallback), and the report must not claim a
    validation subject there is none."""
    results = _results()
    text = render_eval(eval_metrics(results), results, None, [], None, None)
    assert "stops early on a validation subject drawn from the training subjects" in text
    results["groups"] = 2
    text = render_eval(eval_metrics(results), results, None, [], None, None)
    assert "validation subject drawn" not in text
    assert text.count("windows of the one training subject held out of its training") == 2


def test_metrics_of_runs_table_from_fold_outcomes():
    """The protocol's own table (``runs_table``) is what the report reads."""
    y = np.array([0, 0, 1, 1])
    folds = [
        FoldOutcome(
            g,
            seed,
            y,
            {"crossl@0.1": np.where(np.arange(4) == wrong, 1 - y, y)},
            stops={"crossl@0.1": {"stopped": "patience", "best_epoch": 2}},
        )
        for seed, g, wrong in ((0, "a", 0), (0, "b", 9), (1, "a", 9), (1, "b", 9))
    ]
    results = {"name": "x", "folds": ["a", "b"], "runs": runs_table(folds, 2)}
    m = eval_metrics(results)
    # subject a: seed 0 has one window of four wrong (macro-F1 0.733), seed 1 none
    assert m["per_subject"]["crossl@0.1"]["a"] == pytest.approx((11 / 15 + 1) / 2)
    assert m["per_subject"]["crossl@0.1"]["b"] == pytest.approx(1.0)
    assert m["stops"]["crossl@0.1"]["patience"] == 4


# supervised + augmentation at 10%: each subject's score (the same for both seeds)
AUG = (0.74, 0.76, 0.70, 0.80)


def _with_aug(scores: tuple = AUG) -> dict:
    """``_results`` with a ``supervised-aug`` arm at 10% of labels."""
    results = _results()
    results["arms"]["supervised-aug"] = [0.1]
    results["runs"]["supervised-aug@0.1"] = {
        seed: {g: _entry(f1) for g, f1 in zip(GROUPS, scores, strict=True)} for seed in "01"
    }
    return results


def test_supervised_aug_arm_is_paired_with_both_crossl_arms(tmp_path):
    results = _with_aug()
    m = eval_metrics(results)
    assert m["macro_f1"]["supervised-aug@0.1"] == pytest.approx(0.75)
    d = m["paired"]["crossl@0.1 - supervised-aug@0.1"]
    diffs = [0.05, -0.06, -0.01, 0.04]  # crossl (0.79, 0.70, 0.69, 0.84) - AUG
    assert list(d["per_subject"].values()) == pytest.approx(diffs)
    assert d["mean"] == pytest.approx(0.005) and (d["wins"], d["losses"]) == (2, 2)
    assert d["p"] == pytest.approx(_exact_p(diffs)) and d["p"] == pytest.approx(1.0)
    every = m["paired"]["crossl-all@0.1 - supervised-aug@0.1"]
    assert every["mean"] == pytest.approx(0.06) and every["p"] == pytest.approx(2 / 16)
    # the plain supervised pairs are unchanged, and nothing at 100% (no supervised-aug there)
    assert m["paired"]["crossl@0.1 - supervised@0.1"]["mean"] == pytest.approx(0.045)
    assert "crossl@1.0 - supervised-aug@1.0" not in m["paired"]
    assert m["summary"][0].endswith(
        "; CroSSL - (supervised + augmentation) +0.5, p=1.00; "
        "CroSSL (all) - (supervised + augmentation) +6.0, p=0.12)"
    )
    assert "supervised + augmentation 75.0" in m["summary"][0]
    write_eval(results, tmp_path, None)
    text = (tmp_path / "report.md").read_text()
    assert (
        "- **supervised + augmentation** (`supervised-aug`): the same architecture trained "
        "from scratch with the same modality dropout and, always, the signal augmentations "
        "pretraining uses (`pretrain.augment`: scale, jitter, rotation, time warp)." in text
    )
    assert (
        "| 10% | 75.5 ± 6.3 | 81.0 ± 6.0 | 71.0 ± 6.0 | 75.0 ± 3.6 | +4.5, 3/4, p=0.25 | "
        "+10.0, 4/4, p=0.12 | +0.5, 2/4, p=1.00 | +6.0, 4/4, p=0.12 |" in text
    )
    assert "| CroSSL (all) − (supervised + augmentation) (paired: mean, wins" in text
    # per subject: both baselines, both arms, and the four differences
    assert (
        "| subject | supervised | supervised + augmentation | CroSSL | CroSSL (all) | "
        "CroSSL − supervised | CroSSL (all) − supervised | CroSSL − (supervised + "
        "augmentation) | CroSSL (all) − (supervised + augmentation) |" in text
    )
    assert "| s2 | 72.0 | 76.0 | 70.0 | 82.0 | -2.0 | +10.0 | -6.0 | +6.0 |" in text
    assert "| mean | 71.0 | 75.0 | 75.5 | 81.0 | +4.5 (3/4 wins) | +10.0 (4/4 wins) | " in text


def test_holm_step_down_adjustment():
    # sorted 0.01, 0.03, 0.04, 0.2: times 4, 3, 2, 1 = 0.04, 0.09, 0.08 -> 0.09, 0.2
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.3]) == pytest.approx([0.3]) and holm([]) == []


def test_gain_targets_use_the_stronger_supervised_baseline():
    # supervised + augmentation (75.0) beats supervised (71.0) at 10%: the target uses it
    targets = {t["name"]: t for t in eval_metrics(_with_aug())["targets"]}
    assert "crossl@0.1 >= supervised@0.1 + 0.05" not in targets
    gain = targets["crossl@0.1 >= supervised-aug@0.1 + 0.05"]
    assert gain["baseline"] == "supervised-aug@0.1"
    assert gain["goal"] == pytest.approx(0.80) and gain["margin"] == pytest.approx(-0.045)
    assert gain["diff"] == pytest.approx(0.005) and gain["p"] == pytest.approx(1.0)
    every = targets["crossl-all@0.1 >= supervised-aug@0.1 + 0.05"]
    assert every["met"] and every["margin"] == pytest.approx(0.01)
    assert every["diff"] == pytest.approx(0.06) and every["p"] == pytest.approx(0.125)
    # Holm over the two tests: 0.125 x 2 = 0.25, then max(0.25, 1.0 x 1) = 1.0
    assert (every["p_holm"], gain["p_holm"]) == (pytest.approx(0.25), pytest.approx(1.0))
    # a weaker supervised + augmentation: the plain baseline stays, as before
    weak = {t["name"]: t for t in eval_metrics(_with_aug((0.6, 0.6, 0.6, 0.6)))["targets"]}
    gain = weak["crossl@0.1 >= supervised@0.1 + 0.05"]
    assert gain["baseline"] == "supervised@0.1" and gain["goal"] == pytest.approx(0.76)
    assert gain["diff"] == pytest.approx(0.045) and gain["p"] == pytest.approx(0.25)
    # without supervised-aug: the old targets, with Holm over p 0.25 and 0.125 -> 0.25 both
    old = {t["name"]: t for t in eval_metrics(_results())["targets"]}
    assert old["crossl@0.1 >= supervised@0.1 + 0.05"]["baseline"] == "supervised@0.1"
    assert old["crossl@0.1 >= supervised@0.1 + 0.05"]["p_holm"] == pytest.approx(0.25)
    assert old["crossl-all@0.1 >= supervised@0.1 + 0.05"]["p_holm"] == pytest.approx(0.25)
    assert "p_holm" not in old["supervised@1.0 >= 0.83"]
    # only supervised-aug ran: it is the baseline
    results = _with_aug()
    del results["runs"]["supervised@0.1"]
    only = {t["name"]: t for t in eval_metrics(results)["targets"]}
    assert only["crossl@0.1 >= supervised-aug@0.1 + 0.05"]["baseline"] == "supervised-aug@0.1"


def test_targets_table_names_the_baseline_and_holm(tmp_path):
    write_eval(_with_aug(), tmp_path, None)
    text = (tmp_path / "report.md").read_text()
    assert "| target | value | goal | result | margin (points) | notes | Holm-adjusted p |" in text
    assert (
        "| crossl@0.1 >= supervised-aug@0.1 + 0.05 | 75.5 | 80.0 | **missed** | -4.5 | "
        "against supervised + augmentation, the stronger baseline (75.0 vs 71.0 for "
        "supervised); paired mean +0.5, Wilcoxon p=1.00 | 1.00 |" in text
    )
    assert (
        "| crossl-all@0.1 >= supervised-aug@0.1 + 0.05 | 81.0 | 80.0 | met | +1.0 | "
        "against supervised + augmentation, the stronger baseline (75.0 vs 71.0 for "
        "supervised); paired mean +6.0, Wilcoxon p=0.12 | 0.25 |" in text
    )
    reading = text.split("## How to read these numbers")[1]
    assert "covers the 2 paired tests of CroSSL's targets" in reading
    assert "Holm's step-down adjustment controls the family-wise error over those tests." in reading


def test_ablation_chosen_on_test_subjects_repeats_the_comparisons_without_them(tmp_path):
    results = _with_aug()
    m = write_eval(results, tmp_path, ABLATION)
    assert m["ablation"]["validation"] == ["s3"]
    assert m["ablation"]["validation_by_fold"] == {"s1": ["s3"]}
    assert m["ablation"]["applied"] is True
    without = m["paired_without_validation"]
    d = without["crossl@0.1 - supervised@0.1"]
    diffs = [0.08, -0.02, 0.05]  # s1, s2, s4: s3 (the validation subject) left out
    assert list(d["per_subject"]) == ["s1", "s2", "s4"]
    assert list(d["per_subject"].values()) == pytest.approx(diffs)
    assert d["mean"] == pytest.approx(0.11 / 3, abs=1e-6) and (d["wins"], d["n"]) == (2, 3)
    assert d["p"] == pytest.approx(_exact_p(diffs)) and d["p"] == pytest.approx(0.5)
    aug = without["crossl-all@0.1 - supervised-aug@0.1"]
    assert aug["mean"] == pytest.approx(0.22 / 3, abs=1e-6) and aug["p"] == pytest.approx(0.25)
    assert without["crossl@1.0 - supervised@1.0"]["mean"] == pytest.approx(0.01)
    assert set(without) == set(m["paired"])
    text = (tmp_path / "report.md").read_text()
    section = text.split("## Ablation (validation only)")[1].split("\n## ")[0]
    assert "never a test subject" not in text
    assert (
        "**Validation subjects used:** s3 (fold s1). It is also a test subject in the main "
        "folds (every subject is one in leave-one-subject-out). The choice of `no-expander` "
        "was made on those subjects' labels, and only CroSSL's settings were tuned on them"
        in section
    )
    again = text.split("## Without the subjects the settings were chosen on")[1].split("\n## ")[0]
    assert (
        "Subjects s3 are test subjects of the main folds, and their labels chose settings "
        "(the ablation's choice, on its validation groups)" in again
    )
    assert "| 10% | CroSSL − supervised | +4.5, 3/4, p=0.25 | +3.7, 2/3, p=0.50 |" in again
    assert (
        "| 10% | CroSSL (all) − (supervised + augmentation) | +6.0, 4/4, p=0.12 | "
        "+7.3, 3/3, p=0.25 |" in again
    )
    assert "| 100% | CroSSL − supervised | +1.0, 3/4, p=0.62 | +1.0, 2/3, p=0.75 |" in again


def test_settings_tuned_by_hand_on_test_subjects_repeat_the_comparisons_without_them(tmp_path):
    results = _with_aug()
    results["config"]["evaluation"]["tuned_on"] = ["s3"]
    m = write_eval(results, tmp_path, {**ABLATION, "chosen": "base"})
    assert m["ablation"]["applied"] is False and m["tuned_on"] == ["s3"]
    assert m["left_out_of_paired"] == ["s3"]
    d = m["paired_without_validation"]["crossl@0.1 - supervised@0.1"]
    assert list(d["per_subject"]) == ["s1", "s2", "s4"]
    text = (tmp_path / "report.md").read_text()
    ablation = text.split("## Ablation")[1].split("\n## ")[0]
    assert (
        "selection changed nothing, but the spec's settings were themselves chosen by hand on "
        "the labels of subjects s3 (`evaluation.tuned_on`): see below." in ablation
    )
    assert "no test fold influenced" not in text
    again = text.split("## Without the subjects the settings were chosen on")[1].split("\n## ")[0]
    assert "(by hand on s3: `evaluation.tuned_on`)" in again
    assert "| 10% | CroSSL − supervised | +4.5, 3/4, p=0.25 | +3.7, 2/3, p=0.50 |" in again


def test_ablation_that_kept_the_spec_says_no_test_fold_influenced_it(tmp_path):
    # the best variant gained less than the margin: the spec is kept, and the report says why
    ablation = {**ABLATION, "chosen": "base", "best": "no-expander", "gain": 0.002}
    ablation["select_margin"] = 0.01
    m = write_eval(_results(), tmp_path, ablation)
    assert m["ablation"]["applied"] is False and m["ablation"]["validation"] == ["s3"]
    assert m["paired_without_validation"] is None
    section = (tmp_path / "report.md").read_text().split("## Ablation")[1].split("\n## ")[0]
    assert (
        "**Validation subjects used:** s3 (fold s1). It is also a test subject in the main "
        "folds (every subject is one in leave-one-subject-out); the folds ran the spec as "
        "written: selection changed nothing, so no test fold influenced the settings." in section
    )
    assert "again without the validation subjects" not in section
    assert (
        "Best on validation: `no-expander`, but it gained 0.2 of the 1.0 points a variant "
        "must gain over the spec (`evaluation.select_margin`); the folds ran the spec as "
        "written." in section
    )
    # selection off: the chosen variant was not run either
    results = _results()
    results["config"]["evaluation"]["select"] = False
    m = eval_metrics(results, ABLATION)
    assert m["ablation"]["applied"] is False and m["paired_without_validation"] is None


def test_ablation_from_an_older_run_without_validation_ids(tmp_path):
    ablation = json.loads(json.dumps(ABLATION))
    for row in [*ablation["rows"], ablation["curve"]]:
        del row["validation"]
    m = write_eval(_results(), tmp_path, ablation)
    assert m["ablation"]["validation"] is None and m["ablation"]["applied"] is True
    assert m["paired_without_validation"] is None
    section = (tmp_path / "report.md").read_text().split("## Ablation")[1].split("\n## ")[0]
    assert "**Validation subjects used:** not recorded" in section
    assert "so it is a test subject of its own fold in leave-one-subject-out" in section
    assert "the comparisons cannot be repeated without them" in section


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
    # a model.json from before modality dropout: fine-tuning used the pretraining masker
    assert "on 10% of the labelled training windows, with the same masking (batch 64" in text
    assert (
        "| labels | CroSSL (this recipe) | CroSSL (all) | supervised | CroSSL − supervised "
        "(paired) | CroSSL (all) − supervised (paired) |" in text
    )
    assert (
        "| 10% | 75.5 | 81.0 | 71.0 | +4.5 (3/4 wins, p=0.25) | +10.0 (4/4 wins, p=0.12) |" in text
    )
    assert "| 100% | 85.0 | — | 84.0 | +1.0 (3/4 wins" in text
    assert (
        "This model's recipe (CroSSL, 100% of labels) keeps 50% of its macro-F1 with its "
        "weakest modality alone (gyro only): it misses the goal of keeping 90%" in text
    )
    assert "each of 4 subjects held out in turn (2 seeds) on emg-gestures" in text
    assert "- CroSSL: acc only 76.5 (kept 90%), gyro only 42.5 (kept 50%)" in text
    assert "- supervised@1.0 >= 0.83: met (+1.0 points)" in text
    assert "crossl-stream replay RECORDING.xdf --model DIR" in text


def _new_meta(stage: str, **info: object) -> dict:
    """A classifier's model.json with the current settings (expander, augmentations,
    modality dropout); ``info`` overrides its info block."""
    meta = json.loads(json.dumps(PRETRAINED_META))
    meta["classes"] = ["rock", "paper"]
    cfg = meta["info"]["config"]
    cfg["pretrain"].update(
        expander=[64, 64],
        augment={"scale": 0.1, "jitter": 0.05, "rotate_deg": 30.0, "time_warp": 0.0},
    )
    cfg["finetune"].update(modality_dropout=0.2, augment=False)
    meta["info"].update(
        stage=stage,
        labels_fraction=1.0,
        stopped="patience",
        best_epoch=12,
        epochs=22,
        finetune_seconds=30.0,
        holdout=["rr"],
    )
    if stage == "supervised":
        del meta["info"]["pretrain_seconds"]
    meta["info"].update(info)
    return meta


def _training_section(text: str) -> list[str]:
    return text.split("## Training\n\n")[1].split("\n\n")[0].splitlines()


def test_card_settings_show_expander_augmentations_and_modality_dropout():
    text = render_card(_new_meta("finetuned", labels_fraction=0.1), None)
    assert _training_section(text) == [
        "- Self-supervised pretraining (VICReg): 300 steps, batch 256, lr 0.002, VICReg "
        "weights invariance 10 / variance 10 / covariance 100; `temporal` latent masking, "
        "keep 0.7; expander of widths 64, 64 (dropped after pretraining); augmentations: "
        "gain std 0.1, noise std 0.05 × each channel's std, 3-D rotation up to 30°; 42 s.",
        "- Fine-tuning of every weight with a class head on 10% of the labelled training "
        "windows, with modality dropout 0.2 (each modality of a training window hidden with "
        "probability 0.2, never all of them) (batch 64, lr 0.001, early stopping with "
        "patience 10 epochs, at most 200 epochs); 30 s.",
        "- Fine-tuning stopped on patience after 22 epochs: the validation macro-F1 had not "
        "improved for 10 epochs; the weights are those of epoch 12.",
        "- Seed 0.",
    ]
    assert "with the same masking" not in text  # fine-tuning no longer uses the masker
    assert "fine-tuned with a class head, with modality dropout" in text
    # every switch off, augmentation on for the classifier too, no validation group
    meta = _new_meta("finetuned", stopped="steps")
    cfg = meta["info"]["config"]
    cfg["pretrain"].update(expander=[], augment={"scale": 0.0, "time_warp": 0.1})
    cfg["finetune"].update(modality_dropout=0.0, augment=True)
    pre, ft, stop, _ = _training_section(render_card(meta, None))
    assert "; no expander (the loss acts on the embedding)" in pre
    assert "; augmentations: time warp up to 10% of the window;" in pre
    assert ft == (
        "- Fine-tuning of every weight with a class head on 100% of the labelled training "
        "windows, without modality dropout and signal augmentations (time warp up to 10% of "
        "the window) (batch 64, lr 0.001); 30 s."
    )
    assert stop == (
        "- Fine-tuning ran a fixed step budget: there was no validation group to stop on."
    )
    cfg["pretrain"]["augment"] = {}
    assert "; no signal augmentation;" in _training_section(render_card(meta, None))[0]


def test_card_of_a_supervised_model_claims_no_pretraining():
    meta = _new_meta("supervised", pretrain_on="all")
    meta["info"]["config"]["finetune"]["augment"] = True
    text = render_card(meta, eval_metrics(_results()))
    assert text.startswith(
        "# Supervised classifier (CroSSL architecture): emg-gestures, 2 classes\n"
    )
    assert (
        "The CroSSL architecture (one encoder per modality and a latent aggregator across "
        "modalities) trained from scratch on labelled windows, with a class head: no "
        "self-supervised pretraining. Modality dropout (each modality of a training window "
        "hidden with probability 0.2, never all of them) trains it to work with a sensor "
        "missing." in text
    )
    assert "Self-supervised pretraining" not in text and "VICReg" not in text
    assert "latent masking" not in text and "expander" not in text
    assert _training_section(text) == [
        "- Supervised training of every weight from scratch with a class head on 100% of the "
        "labelled training windows, with modality dropout 0.2 (each modality of a training "
        "window hidden with probability 0.2, never all of them) and signal augmentations "
        "(gain std 0.1, noise std 0.05 × each channel's std, 3-D rotation up to 30°) "
        "(batch 64, lr 0.001, early stopping with patience 10 epochs, at most 200 epochs); "
        "30 s.",
        "- Training stopped on patience after 22 epochs: the validation macro-F1 had not "
        "improved for 10 epochs; the weights are those of epoch 12.",
        "- Seed 0.",
    ]
    # pretrain_on: all does not apply: nothing was pretrained
    assert "- Held out (never trained on): rr." in text and "in pretraining" not in text
    assert "Why this recipe" not in text  # trained as `recipe: supervised`, no selection
    # the evaluation: its own column and its kept share against the goal
    assert "| 10% | 75.5 | 81.0 | 71.0 |" in text
    assert "| CroSSL | CroSSL (all) | supervised (this recipe) |" in text
    assert (
        "This model's recipe (supervised, 100% of labels) keeps 93% of its macro-F1 with its "
        "weakest modality alone (gyro only): it meets the goal of keeping 90% with one "
        "modality missing." in text
    )
    # without modality dropout the card does not claim it copes with a missing sensor
    meta["info"]["config"]["finetune"]["modality_dropout"] = 0.0
    text = render_card(meta, None)
    assert "Its training had no modality dropout" in text and "without modality dropout" in text


VALIDATION = "a group drawn from the training data (seed 0), the same for both"


def test_card_of_a_best_recipe_says_why_crossl_was_kept():
    selection = {
        "recipe": "crossl",
        "validation_macro_f1": {"crossl": 0.85, "supervised": 0.8},
        "validation": VALIDATION,
        "score": "the mean of the macro-F1 with every modality and with each alone",
    }
    text = render_card(_new_meta("finetuned", selection=selection), eval_metrics(_results()))
    assert text.startswith("# CroSSL classifier: emg-gestures, 2 classes")
    why = text.split("## Why this recipe\n\n")[1].split("\n\n## ")[0]
    assert why.startswith(
        "`recipe: best` trained both recipes on the same labelled windows and kept the one "
        "with the better validation macro-F1 (CroSSL on a tie): this folder holds **CroSSL "
        "(VICReg pretraining, then fine-tuning)**."
    )
    assert "- Validation macro-F1 (%): CroSSL 85.0, supervised 80.0; kept: CroSSL." in why
    assert "- Pretraining won on validation by 5.0 points." in why
    assert (
        "- The validation score is the mean of the macro-F1 with every modality and with each "
        "alone (as early stopping uses)." in why
    )
    assert (
        "drawn from the training data; no test fold of the evaluation took part in the "
        f"choice. model.json records it as {VALIDATION}." in why
    )
    assert (
        "- Supporting evidence from the evaluation (leave-one-subject-out, test folds): mean "
        "macro-F1 with 100% of labels CroSSL 85.0, supervised 84.0, which agrees with the "
        "choice; CroSSL − supervised, paired by subject: +4.5 points at 10% of labels "
        "(CroSSL higher for 3 of 4 subjects, p=0.25)." in why
    )
    # the section sits with the training, before the data and the evaluation
    assert text.index("## Training") < text.index("## Why this recipe") < text.index("## Data")


def test_card_of_a_best_recipe_says_plainly_when_pretraining_lost():
    selection = {
        "recipe": "supervised",
        "validation_macro_f1": {"crossl": 0.812, "supervised": 0.834},
        "validation": VALIDATION,
    }
    meta = _new_meta("supervised", selection=selection)
    text = render_card(meta, eval_metrics(_results()))
    assert text.startswith("# Supervised classifier (CroSSL architecture)")
    assert "It was kept over the pretrained CroSSL recipe on validation (below)." in text
    assert "this folder holds **supervised (the same architecture trained from scratch" in text
    assert "- Validation macro-F1 (%): CroSSL 81.2, supervised 83.4; kept: supervised." in text
    assert (
        "- Pretraining did not win: training from scratch scored 2.2 points higher on "
        "validation, so the pretrained CroSSL model was not kept." in text
    )
    # the evaluation at 100% labels favours CroSSL (85.0 vs 84.0): said, not hidden
    assert (
        "CroSSL 85.0, supervised 84.0, which favours CroSSL: validation and evaluation "
        "disagree;" in text
    )
    assert "Self-supervised pretraining" not in text
    # within half a point the evaluation is called level, not evidence either way
    metrics = eval_metrics(_results())
    metrics["macro_f1"]["supervised@1.0"] = metrics["macro_f1"]["crossl@1.0"] - 0.001
    text = render_card(meta, metrics)
    assert (
        "supervised 84.9, level (within half a point): the evaluation does not tell them "
        "apart;" in text
    )
    # a tie goes to CroSSL, and is no win for pretraining; no metrics: nothing to back it
    selection.update(recipe="crossl", validation_macro_f1={"crossl": 0.8, "supervised": 0.8})
    text = render_card(_new_meta("finetuned", selection=selection), None)
    assert "- Pretraining did not win outright: the two tied on validation" in text
    assert "- No evaluation metrics.json came with this folder to back the choice." in text


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
    for name in ("model.json", "metrics.json", *FALLBACK_METAS):
        if (shipped / name).is_file():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(shipped / name, tmp_path / name)
    assert write_card(tmp_path).read_text() == (shipped / "README.md").read_text()
