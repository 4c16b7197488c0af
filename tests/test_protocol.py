"""The evaluation protocol on real recordings (four watch subjects): every arm at every
fraction and seed, no classifier ever sees a test label, validation subjects are drawn from
the training subjects only, parallel jobs give the serial result, and the paired test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crossl_stream.config import EvaluationConfig, TrainConfig, load_config
from crossl_stream.errors import ConfigError, DatasetError
from crossl_stream.training.experiments import (
    fallbacks_table,
    merged,
    run_ablation,
    run_fold,
    run_folds,
    validation_windows,
)
from crossl_stream.training.metrics import wilcoxon_signed_rank
from crossl_stream.training.spec import LoadedData, load_data

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = {
    "model": {"code_size": 16, "dropout": 0.1},
    "pretrain": {
        "steps": 6,
        "batch_size": 32,
        "expander": [32, 32],
        "augment": {"scale": 0.1, "jitter": 0.05, "rotate_deg": 10, "time_warp": 0.05},
    },
    "finetune": {
        "batch_size": 32,
        "max_epochs": 3,
        "patience": 2,
        "min_epoch_steps": 2,
        "min_steps": 4,
        "max_steps": 4,
        "modality_dropout": 0.3,
        "fallbacks": False,  # on in one test
    },
}
ARMS = {
    "supervised": [0.1, 1.0],
    "supervised-aug": [0.1],
    "supervised-plain": [1.0],
    "crossl": [0.1, 1.0],
    "crossl-all": [0.1],
    "probe": [1.0],
}


class _Data:
    data: LoadedData | None = None


def watch() -> tuple[TrainConfig, LoadedData]:
    """Subjects 1-4 of the watch data set, 2 s windows every 1 s, and a tiny recipe."""
    cfg = load_config(CONFIGS / "train-watch.yaml", TrainConfig)
    window = cfg.data.window.model_copy(update={"hop_s": 1.0})
    spec = cfg.data.model_copy(
        update={"window": window, "recordings": ("{data}/watch/watch-s0[1-4].xdf",)}
    )
    if _Data.data is None:
        _Data.data = load_data(spec, CONFIGS, "train-watch.yaml", progress=False)
    evaluation = EvaluationConfig(folds=("1", "2"), seeds=(0, 1), arms=ARMS)
    cfg = merged(cfg, {**TINY, "data": spec.model_dump(mode="json")})
    return cfg.model_copy(update={"evaluation": evaluation}), _Data.data


def scrambled(data: LoadedData, group: str) -> LoadedData:
    """``data`` with ``group``'s labels permuted among its labelled windows."""
    w = data.windows.take(np.arange(len(data.windows)))
    mine = np.flatnonzero((w.subject == group) & (w.y >= 0))
    w.y[mine] = np.random.default_rng(0).permutation(w.y[mine])[::-1]
    assert (w.y[mine] != data.windows.y[mine]).any()
    return LoadedData(data.name, w, data.modalities, data.classes, data.files)


def test_no_arm_sees_the_test_subjects_labels():
    torch.set_num_threads(1)
    cfg, data = watch()
    cfg = merged(cfg, {"finetune": {"fallbacks": True}})
    a = run_fold(data, cfg, "1", progress=False, full=True)
    b = run_fold(scrambled(data, "1"), cfg, "1", progress=False, full=True)
    assert sorted(a.predictions) == sorted(f"{arm}@{f}" for arm, fs in ARMS.items() for f in fs)
    for key in a.predictions:
        np.testing.assert_array_equal(a.predictions[key], b.predictions[key], err_msg=key)
        assert set(a.missing[key]) == {"acc", "gyro"}
    # the fallback models (one per sensor, trained without it) see no test label either
    assert set(a.fallbacks) == {"acc", "gyro"} and len(a.fallbacks["acc"]) == len(a.y_true)
    for m in a.fallbacks:
        np.testing.assert_array_equal(a.fallbacks[m], b.fallbacks[m], err_msg=m)
    table = fallbacks_table([a], len(data.classes))["0"]["1"]
    assert set(table["without"]) == {"acc", "gyro"} and 0 <= table["without"]["acc"] <= 1
    assert table["stops"]["gyro"]["stopped"] in ("patience", "max_epochs")
    assert (a.y_true != b.y_true).any()  # the labels differed; the models did not


def test_the_strict_arm_never_sees_the_test_subjects_windows():
    torch.set_num_threads(1)
    cfg, data = watch()
    cfg = cfg.model_copy(
        update={"evaluation": cfg.evaluation.model_copy(update={"arms": {"crossl": (0.1,)}})}
    )
    a = run_fold(data, cfg, "2", progress=False, curves=True)
    w = data.windows.take(np.arange(len(data.windows)))
    mine = w.subject == "2"
    for x in w.x.values():
        x[mine] = x[mine][::-1] * 3.0  # other signals entirely
    changed = LoadedData(data.name, w, data.modalities, data.classes, data.files)
    b = run_fold(changed, cfg, "2", progress=False, curves=True)
    assert a.curves["pretrain"] == b.curves["pretrain"]
    assert a.curves["crossl@0.1"] == b.curves["crossl@0.1"]


def test_folds_that_cannot_run_are_refused_before_training():
    cfg, data = watch()
    only = data.windows.take(np.flatnonzero(data.windows.subject == "1"))
    one = LoadedData(data.name, only, data.modalities, data.classes, data.files)
    every = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"folds": None})})
    with pytest.raises(DatasetError, match="1 subject with labels"):
        run_folds(one, every, progress=False)
    w = data.windows.take(np.arange(len(data.windows)))
    w.available[w.subject == "2", 1] = False  # subject 2 never has its gyroscope
    gappy = LoadedData(data.name, w, data.modalities, data.classes, data.files)
    with pytest.raises(DatasetError, match=r"subject \['2'\]: no labelled window with every"):
        run_folds(gappy, cfg, progress=False)
    bad = merged(cfg, {"evaluation": {"ablation_folds": ["9"]}})
    with pytest.raises(DatasetError, match=r"ablation_folds: no labelled subject \['9'\]"):
        run_ablation(data, bad, progress=False)


def test_validation_subject_comes_from_the_training_subjects():
    cfg, data = watch()
    for seed in range(4):
        train, val = validation_windows(data, merged(cfg, {"seed": seed}), "3")
        assert len(set(val.subject.tolist())) == 1
        assert "3" not in set(train.subject.tolist()) | set(val.subject.tolist())
        assert not set(train.subject.tolist()) & set(val.subject.tolist())


def test_protocol_runs_every_arm_seed_and_fold_and_parallel_jobs_agree():
    torch.set_num_threads(1)
    cfg, data = watch()
    serial = run_folds(data, cfg, progress=False, log=lambda _: None, jobs=1)
    runs = serial["runs"]
    assert sorted(runs["crossl@0.1"]) == ["0", "1"]
    assert sorted(runs["supervised@1.0"]) == ["0"]  # seeds_at_full: 1
    assert sorted(runs["crossl@0.1"]["1"]) == ["1", "2"]
    entry = runs["supervised@0.1"]["0"]["2"]
    assert 0.0 <= entry["macro_f1"] <= 1.0 and set(entry["alone"]) == {"acc", "gyro"}
    assert entry["stopped"] in ("patience", "max_epochs") and entry["steps"] > 0
    assert "pretrain" in serial["curves"] and serial["curves_fold"] == "1"
    parallel = run_folds(data, cfg, progress=False, log=lambda _: None, jobs=2)
    assert parallel["runs"].keys() == runs.keys()
    for key, seeds in runs.items():
        for seed, groups in seeds.items():
            for group, e in groups.items():
                other = parallel["runs"][key][seed][group]["macro_f1"]
                assert other == pytest.approx(e["macro_f1"], abs=0.02), (key, seed, group)


def test_ablation_scores_variants_on_validation_and_chooses_one():
    torch.set_num_threads(1)
    cfg, data = watch()
    cfg = merged(
        cfg,
        {
            "evaluation": {
                "ablation": {"no-expander": {"pretrain": {"expander": []}}},
                "ablation_folds": ["1"],
                "ablation_curve_steps": 10,
                "select_margin": 1.0,  # no variant can gain a whole macro-F1 over the spec
            }
        },
    )
    out = run_ablation(data, cfg, progress=False, log=lambda _: None)
    assert set(out["scores"]) == {"base", "no-expander"} and out["best"] in out["scores"]
    assert out["chosen"] == "base" and out["select_margin"] == 1.0 and out["gain"] < 1.0
    assert [r["group"] for r in out["rows"]] == ["1", "1"]
    for row in out["rows"]:  # a training subject of fold 1, never the fold's test subject
        assert len(row["validation"]) == 1 and row["validation"] != ["1"]
    assert [c["step"] for c in out["curve"]["curve"]] == list(range(1, 11))
    assert len(out["curve"]["loss"]) == 10
    chosen = merged(cfg, out["variants"]["no-expander"])
    assert chosen.pretrain.expander == () and chosen.pretrain.augment == cfg.pretrain.augment


def test_overrides_are_checked_like_a_spec(tmp_path):
    cfg, _ = watch()
    with pytest.raises(ValueError, match="expandr"):
        merged(cfg, {"pretrain": {"expandr": []}})
    text = (CONFIGS / "train-watch.yaml").read_text()
    text = text.replace("ablation_folds: [4, 8]", "ablation_folds: []")
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="needs ablation_folds"):
        load_config(path, TrainConfig)


def test_wilcoxon_matches_the_reference_implementation():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (3, 6, 10, 14):
        for _ in range(20):
            d = rng.normal(0.02, 0.05, n)
            ref = stats.wilcoxon(d, method="exact").pvalue
            assert wilcoxon_signed_rank(d) == pytest.approx(ref, abs=1e-9)
            d[0] = 0.0  # a zero difference is dropped, as in Wilcoxon's own method
            ref = stats.wilcoxon(d[1:], method="exact").pvalue
            assert wilcoxon_signed_rank(d) == pytest.approx(ref, abs=1e-9)
    assert wilcoxon_signed_rank(np.full(10, 0.03)) == pytest.approx(2 / 1024)
    # ties share their mean rank and the exact null counts them so: {2, 2, 2} -> p = 1
    assert wilcoxon_signed_rank(np.array([-0.04, 0.04, 0.04])) == 1.0


def test_validation_alone_stops_on_the_mean_of_every_modality_and_each_alone():
    from crossl_stream.training.experiments import labelled_split, new_model
    from crossl_stream.training.metrics import macro_f1
    from crossl_stream.training.train import fit_classifier, predict

    cfg, data = watch()
    train, val = labelled_split(data.windows, 0.3, "subject", 0)
    assert val is not None
    ft = cfg.finetune.model_copy(update={"validate_alone": True, "max_epochs": 2})
    model = new_model(data.modalities, data.classes, cfg, train)
    result = fit_classifier(model, train, "supervised", ft, seed=0, progress=False, val=val)
    n = len(data.classes)
    scores = [macro_f1(val.y, predict(model, val).argmax(1), n)]
    for j, name in enumerate(model.modality_names):
        has = val.take(np.flatnonzero(val.available[:, j]))
        scores.append(macro_f1(has.y, predict(model, has, [name]).argmax(1), n))
    assert len(scores) == 3
    assert result.best_val_f1 == pytest.approx(np.mean(scores), abs=1e-6)
    assert result.best_val_f1 != pytest.approx(scores[0], abs=1e-6)  # not the full F1 alone


def test_settings_that_cannot_run_are_refused_before_any_training():
    from crossl_stream.training.experiments import check_augment, check_folds, without_idle_arms

    cfg, data = watch()
    # a rotation of a modality that is not a 3-axis sensor of this data
    bad = cfg.pretrain.augment.model_copy(update={"vectors": ("ppg",)})
    with pytest.raises(ConfigError, match=r"augment.vectors: \['ppg'\]"):
        check_augment(data, bad)
    # a rotation left to the channel count is said (once per spec: the ablation's variants
    # all rotate the same modalities); named vectors need no word
    assert check_augment(data, cfg.pretrain.augment, say=False)
    named = cfg.pretrain.augment.model_copy(update={"vectors": ("acc",)})
    assert not check_augment(data, named)
    # supervised + augmentation with nothing to augment would repeat supervised: refused in
    # a spec, left out when an ablation variant chose no augmentation
    nothing = {"scale": 0, "jitter": 0, "rotate_deg": 0, "time_warp": 0}
    off = merged(cfg, {"pretrain": {"augment": nothing}})
    with pytest.raises(ConfigError, match="supervised-aug trains with pretrain.augment"):
        check_folds(data, off, ["1"])
    lean = without_idle_arms(off)
    assert "supervised-aug" not in lean.evaluation.arms
    assert lean.evaluation.arms["supervised"] == off.evaluation.arms["supervised"]
    assert without_idle_arms(cfg) is cfg
