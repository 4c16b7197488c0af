"""The evaluation protocol: leave-one-subject-out on the watch data, label fractions,
missing modalities, masking strategies, and the BasicMotions split.

Every model is trained on training subjects only; normalisation is fitted on them too.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crossl_stream.config import MaskingConfig, TrainConfig
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.masking import LatentMasker
from crossl_stream.model.specs import ModalitySpec
from crossl_stream.training.datasets import (
    Dataset,
    Windows,
    fit_normalisation,
    labelled_subset,
    load_basicmotions,
    load_watch,
    make_windows,
)
from crossl_stream.training.metrics import accuracy, confusion_matrix, macro_f1
from crossl_stream.training.train import fit_classifier, predict, pretrain


def masker_of(cfg: MaskingConfig) -> LatentMasker:
    return LatentMasker(cfg.strategy, cfg.keep)


def new_model(
    specs: list[ModalitySpec], classes: list[str], cfg: TrainConfig, windows: Windows
) -> CroSSL:
    """A fresh model, initialised from ``cfg.seed``, with normalisation fitted on ``windows``."""
    torch.manual_seed(cfg.seed)
    model = CroSSL(specs, classes, cfg.model)
    model.set_normalisation(fit_normalisation(windows))
    return model


def fraction_key(fraction: float) -> str:
    return str(float(fraction))


def train_crossl(
    specs: list[ModalitySpec],
    classes: list[str],
    cfg: TrainConfig,
    train: Windows,
    fraction: float = 1.0,
    progress: bool = True,
) -> tuple[CroSSL, dict[str, Any]]:
    """SSL pretraining on all of ``train``, then fine-tuning on a labelled ``fraction``."""
    masker = masker_of(cfg.masking)
    model = new_model(specs, classes, cfg, train)
    ssl = pretrain(model, train, masker, cfg.pretrain, cfg.loss, cfg.seed, progress)
    labelled = train.take(labelled_subset(train.y, fraction, cfg.seed))
    sup = fit_classifier(model, labelled, "finetune", cfg.finetune, masker, cfg.seed, progress)
    return model, {"pretrain": ssl, "finetune": sup}


@dataclass
class FoldOutcome:
    """Predictions of every variant on one held-out subject."""

    subject: int
    y_true: np.ndarray
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0


def run_fold(
    dataset: Dataset, windows: Windows, cfg: TrainConfig, subject: int, progress: bool = True
) -> FoldOutcome:
    """All variants with ``subject`` held out: CroSSL fine-tune and probe, supervised, and the
    missing-modality evaluations of the full-label models."""
    start = time.perf_counter()
    specs, classes = dataset.specs(cfg.window_s), dataset.classes
    train = windows.take(np.flatnonzero(windows.subject != subject))
    test = windows.take(np.flatnonzero(windows.subject == subject))
    out = FoldOutcome(subject, test.y)
    masker = masker_of(cfg.masking)
    names = [s.name for s in specs]

    def evaluate(name: str, model: CroSSL, with_missing: bool = False) -> None:
        out.predictions[name] = predict(model, test).argmax(1)
        if with_missing:
            for m in names:
                out.predictions[f"{name}|{m}"] = predict(model, test, [m]).argmax(1)

    base = new_model(specs, classes, cfg, train)
    out.curves["pretrain"] = pretrain(
        base, train, masker, cfg.pretrain, cfg.loss, cfg.seed, progress
    )
    for fraction in cfg.evaluation.label_fractions:
        key = fraction_key(fraction)
        labelled = train.take(labelled_subset(train.y, fraction, cfg.seed))
        full = fraction == 1.0
        model = copy.deepcopy(base)
        out.curves[f"crossl@{key}"] = fit_classifier(
            model, labelled, "finetune", cfg.finetune, masker, cfg.seed, progress
        )
        evaluate(f"crossl@{key}", model, full)
        probe = copy.deepcopy(base)
        fit_classifier(probe, labelled, "probe", cfg.finetune, seed=cfg.seed, progress=progress)
        evaluate(f"crossl-probe@{key}", probe)
        sup = new_model(specs, classes, cfg, train)
        out.curves[f"supervised@{key}"] = fit_classifier(
            sup, labelled, "supervised", cfg.finetune, seed=cfg.seed, progress=progress
        )
        evaluate(f"supervised@{key}", sup, full)
        if full:
            # Ablation: the supervised model trained with the same latent masking as CroSSL,
            # to separate what pretraining brings from what masking as augmentation brings.
            aug = new_model(specs, classes, cfg, train)
            fit_classifier(aug, labelled, "supervised", cfg.finetune, masker, cfg.seed, progress)
            evaluate(f"supervised+masking@{key}", aug, True)
    out.seconds = time.perf_counter() - start
    return out


def summarise(folds: list[FoldOutcome], n_classes: int) -> dict[str, dict[str, Any]]:
    """Per variant: macro-F1 mean and std over folds, per-fold values, accuracy, confusion."""
    summary: dict[str, dict[str, Any]] = {}
    for name in folds[0].predictions:
        per_fold = [macro_f1(f.y_true, f.predictions[name], n_classes) for f in folds]
        y_true = np.concatenate([f.y_true for f in folds])
        y_pred = np.concatenate([f.predictions[name] for f in folds])
        summary[name] = {
            "macro_f1": float(np.mean(per_fold)),
            "macro_f1_std": float(np.std(per_fold)),
            "macro_f1_per_fold": {str(f.subject): v for f, v in zip(folds, per_fold, strict=True)},
            "accuracy": accuracy(y_true, y_pred),
            "confusion": confusion_matrix(y_true, y_pred, n_classes).tolist(),
        }
    return summary


def watch_windows(cfg: TrainConfig) -> tuple[Dataset, Windows]:
    dataset = load_watch()
    return dataset, make_windows(dataset.recordings, dataset.specs(cfg.window_s), cfg.hop_s)


def run_loso(
    cfg: TrainConfig, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Leave-one-subject-out over the watch subjects (or ``cfg.evaluation.folds``)."""
    dataset, windows = watch_windows(cfg)
    subjects = cfg.evaluation.folds or sorted(set(windows.subject.tolist()))
    folds = []
    for subject in tqdm(subjects, desc="LOSO folds", disable=not progress):
        fold = run_fold(dataset, windows, cfg, subject, progress)
        folds.append(fold)
        f1 = {
            k: round(macro_f1(fold.y_true, v, len(dataset.classes)), 3)
            for k, v in fold.predictions.items()
            if "|" not in k
        }
        log(f"fold subject={subject} seconds={fold.seconds:.0f} macro_f1={f1}")
    return {
        "classes": dataset.classes,
        "modalities": [s.name for s in dataset.specs(cfg.window_s)],
        "subjects": [int(s) for s in subjects],
        "windows": len(windows),
        "variants": summarise(folds, len(dataset.classes)),
        "curves": folds[0].curves,
        "curves_subject": int(folds[0].subject),
        "seconds": float(sum(f.seconds for f in folds)),
    }


def run_masking_grid(
    cfg: TrainConfig, progress: bool = True, log: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    """Each masking config (and the attention aggregator with the default masking): SSL,
    then linear probe on all labels and fine-tuning on 10%, on the configured folds."""
    dataset, windows = watch_windows(cfg)
    specs, classes = dataset.specs(cfg.window_s), dataset.classes
    subjects = cfg.evaluation.masking_folds or sorted(set(windows.subject.tolist()))
    variants: list[tuple[str, TrainConfig]] = [
        (f"mlp/{m.strategy}@{m.keep:g}", cfg.model_copy(update={"masking": m}))
        for m in cfg.evaluation.masking_grid
    ]
    if cfg.evaluation.compare_attention:
        attention = cfg.model.model_copy(update={"aggregator": "attention"})
        name = f"attention/{cfg.masking.strategy}@{cfg.masking.keep:g}"
        variants.append((name, cfg.model_copy(update={"model": attention})))
    rows = []
    for name, vcfg in variants:
        probe_f1, ft_f1 = [], []
        start = time.perf_counter()
        for subject in subjects:
            train = windows.take(np.flatnonzero(windows.subject != subject))
            test = windows.take(np.flatnonzero(windows.subject == subject))
            masker = masker_of(vcfg.masking)
            base = new_model(specs, classes, vcfg, train)
            pretrain(base, train, masker, vcfg.pretrain, vcfg.loss, vcfg.seed, progress)
            probe = copy.deepcopy(base)
            fit_classifier(probe, train, "probe", vcfg.finetune, seed=vcfg.seed, progress=progress)
            probe_f1.append(macro_f1(test.y, predict(probe, test).argmax(1), len(classes)))
            labelled = train.take(labelled_subset(train.y, 0.1, vcfg.seed))
            fit_classifier(base, labelled, "finetune", vcfg.finetune, masker, vcfg.seed, progress)
            ft_f1.append(macro_f1(test.y, predict(base, test).argmax(1), len(classes)))
        row = {
            "variant": name,
            "probe@1": float(np.mean(probe_f1)),
            "finetune@0.1": float(np.mean(ft_f1)),
            "folds": [int(s) for s in subjects],
            "seconds": time.perf_counter() - start,
        }
        log(f"masking {row}")
        rows.append(row)
    return rows


def run_basicmotions(cfg: TrainConfig, progress: bool = True) -> dict[str, Any]:
    """BasicMotions: CroSSL (SSL on the training series, fine-tune on all their labels) and
    the supervised baseline, tested on the fixed test split; one window per series."""
    dataset = load_basicmotions()
    specs = dataset.specs(cfg.window_s)
    train_recs = [r for r in dataset.recordings if r.split == "train"]
    test_recs = [r for r in dataset.recordings if r.split == "test"]
    train = make_windows(train_recs, specs, cfg.hop_s)
    test = make_windows(test_recs, specs, cfg.window_s)
    model, curves = train_crossl(specs, dataset.classes, cfg, train, 1.0, progress)
    sup = new_model(specs, dataset.classes, cfg, train)
    fit_classifier(sup, train, "supervised", cfg.finetune, seed=cfg.seed, progress=progress)
    n = len(dataset.classes)
    result = {}
    for name, m in (("crossl", model), ("supervised", sup)):
        pred = predict(m, test).argmax(1)
        result[name] = {
            "accuracy": accuracy(test.y, pred),
            "macro_f1": macro_f1(test.y, pred, n),
            "confusion": confusion_matrix(test.y, pred, n).tolist(),
        }
    result["classes"] = dataset.classes
    result["train_windows"], result["test_windows"] = len(train), len(test)
    return result


def set_threads(n: int | None) -> None:
    """Use ``n`` intra-op threads (None: leave torch's default)."""
    if n:
        torch.set_num_threads(n)
