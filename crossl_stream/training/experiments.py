"""The evaluation protocol on any data set read from a spec: each fold holds out one group
(a subject or a session); label fractions; CroSSL fine-tune and probe against a supervised
baseline trained to convergence (early stopping on a validation group drawn from the
training groups, never the test group); missing modalities; masking strategies.

Every classifier is trained on the training groups' labels only. Pretraining, and the
normalisation statistics of the pretrained model, see the training groups' windows; with
``pretrain_on: all`` they also see the held-out group's windows, without their labels (the
supervised baselines' normalisation always comes from the training groups alone).
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
from crossl_stream.errors import DatasetError
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.masking import NO_MASKING, LatentMasker
from crossl_stream.model.specs import ModalitySpec
from crossl_stream.training.datasets import Windows, fit_normalisation, labelled_subset
from crossl_stream.training.metrics import accuracy, confusion_matrix, macro_f1
from crossl_stream.training.spec import LoadedData
from crossl_stream.training.train import fit_classifier, predict, pretrain, validation_split


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


def labelled_split(
    windows: Windows, fraction: float, by: str, seed: int
) -> tuple[Windows, Windows | None]:
    """A class-stratified ``fraction`` of the labelled windows, split into (train, validation)
    by whole groups (``by``); the validation part decides when supervised training stops."""
    labelled = windows.take(windows.labelled)
    chosen = labelled.take(labelled_subset(labelled.y, fraction, seed))
    train_index, val_index = validation_split(chosen, by, seed)
    if not len(val_index):
        return chosen, None
    return chosen.take(train_index), chosen.take(val_index)


def finetune(
    base: CroSSL,
    windows: Windows,
    classes: list[str],
    cfg: TrainConfig,
    fraction: float = 1.0,
    mode: str = "finetune",
    progress: bool = True,
    checkpoint=None,
):
    """``base`` with a class head, trained on a ``fraction`` of the labelled windows
    (``finetune``: everything, with latent masking; ``probe``: the head only); returns the
    model and the fit result."""
    train, val = labelled_split(windows, fraction, cfg.evaluation.by, cfg.seed)
    torch.manual_seed(cfg.seed)  # the new head: the same whether pretraining ran just now or not
    model = base.with_classes(classes) if base.classes != classes else copy.deepcopy(base)
    masker = masker_of(cfg.masking) if mode == "finetune" else NO_MASKING
    result = fit_classifier(
        model, train, mode, cfg.finetune, masker, cfg.seed, progress, val=val, checkpoint=checkpoint
    )
    return model, result


def supervised(
    data: LoadedData,
    windows: Windows,
    cfg: TrainConfig,
    fraction: float = 1.0,
    masking: bool = False,
    progress: bool = True,
):
    """The supervised baseline: the same architecture from scratch, trained to convergence
    (early stopping) on the same labelled windows; ``masking`` adds CroSSL's latent masking
    as augmentation."""
    train, val = labelled_split(windows, fraction, cfg.evaluation.by, cfg.seed)
    model = new_model(data.modalities, data.classes, cfg, windows)
    masker = masker_of(cfg.masking) if masking else NO_MASKING
    result = fit_classifier(
        model, train, "supervised", cfg.finetune, masker, cfg.seed, progress, val=val
    )
    return model, result


@dataclass
class FoldOutcome:
    """Predictions of every variant on one held-out group."""

    group: str
    y_true: np.ndarray
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    stops: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0


def split_fold(data: LoadedData, cfg: TrainConfig, group: str) -> tuple[Windows, Windows]:
    """(training windows, test windows) with ``group`` held out. The test windows are the
    group's labelled windows in which every modality is available, so that every variant,
    and each modality left out, is scored on the same windows."""
    w = data.windows
    groups = w.subject if cfg.evaluation.by == "subject" else w.session
    train = w.take(np.flatnonzero(groups != group))
    test_index = np.flatnonzero((groups == group) & (w.y >= 0) & w.available.all(axis=1))
    return train, w.take(test_index)


def run_fold(data: LoadedData, cfg: TrainConfig, group: str, progress: bool = True) -> FoldOutcome:
    """Every variant with ``group`` held out: CroSSL fine-tune and probe, supervised (with and
    without masking at full labels), and the missing-modality scores of the full-label
    models."""
    start = time.perf_counter()
    train, test = split_fold(data, cfg, group)
    if not len(test):
        raise DatasetError(f"fold {group!r}: no labelled window with every sensor to test on")
    out = FoldOutcome(group, test.y)
    names = [m.name for m in data.modalities]

    def evaluate(name: str, model: CroSSL, result, with_missing: bool = False) -> None:
        out.predictions[name] = predict(model, test).argmax(1)
        out.curves[name] = result.history
        out.stops[name] = {"stopped": result.stopped, "best_epoch": result.best_epoch}
        if with_missing:
            for m in names:
                out.predictions[f"{name}|{m}"] = predict(model, test, [m]).argmax(1)

    unlabelled = data.windows if cfg.pretrain_on == "all" else train
    base = new_model(data.modalities, [], cfg, unlabelled)
    out.curves["pretrain"] = pretrain(
        base, unlabelled, masker_of(cfg.masking), cfg.pretrain, cfg.loss, cfg.seed, progress
    )
    for fraction in cfg.evaluation.label_fractions:
        key = fraction_key(fraction)
        full = fraction == 1.0
        model, result = finetune(base, train, data.classes, cfg, fraction, "finetune", progress)
        evaluate(f"crossl@{key}", model, result, full)
        probe, result = finetune(base, train, data.classes, cfg, fraction, "probe", progress)
        evaluate(f"crossl-probe@{key}", probe, result)
        sup, result = supervised(data, train, cfg, fraction, False, progress)
        evaluate(f"supervised@{key}", sup, result, full)
        if full:
            # the supervised model trained with the same latent masking as CroSSL: separates
            # what pretraining brings from what masking as augmentation brings
            aug, result = supervised(data, train, cfg, fraction, True, progress)
            evaluate(f"supervised+masking@{key}", aug, result, True)
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
            "macro_f1_per_fold": {f.group: v for f, v in zip(folds, per_fold, strict=True)},
            "accuracy": accuracy(y_true, y_pred),
            "confusion": confusion_matrix(y_true, y_pred, n_classes).tolist(),
        }
    return summary


def fold_groups(data: LoadedData, cfg: TrainConfig) -> list[str]:
    """The groups held out in turn: ``evaluation.folds``, or every group with labels."""
    w = data.windows
    groups = w.subject if cfg.evaluation.by == "subject" else w.session
    present = sorted(set(groups[w.y >= 0].tolist()))
    if cfg.evaluation.folds is None:
        return present
    missing = sorted(set(cfg.evaluation.folds) - set(present))
    if missing:
        raise DatasetError(
            f"evaluation.folds: no labelled {cfg.evaluation.by} {missing}; there are {present}"
        )
    return list(cfg.evaluation.folds)


def run_folds(
    data: LoadedData,
    cfg: TrainConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The protocol over every fold; a dict ready for the report (and saved as JSON)."""
    groups = fold_groups(data, cfg)
    w = data.windows
    if len(set((w.subject if cfg.evaluation.by == "subject" else w.session).tolist())) < 2:
        raise DatasetError(
            f"evaluation.by: {cfg.evaluation.by}: the data has one only; nothing to hold out"
        )
    folds = []
    for group in tqdm(groups, desc="folds", disable=not progress):
        fold = run_fold(data, cfg, group, progress)
        folds.append(fold)
        f1 = {
            k: round(macro_f1(fold.y_true, v, len(data.classes)), 3)
            for k, v in fold.predictions.items()
            if "|" not in k
        }
        log(f"fold {cfg.evaluation.by}={group} seconds={fold.seconds:.0f} macro_f1={f1}")
    return {
        "name": data.name,
        "by": cfg.evaluation.by,
        "pretrain_on": cfg.pretrain_on,
        "classes": data.classes,
        "modalities": [m.name for m in data.modalities],
        "window_s": data.modalities[0].window_s,
        "folds": groups,
        "windows": len(data.windows),
        "labelled_windows": len(data.windows.labelled),
        "variants": summarise(folds, len(data.classes)),
        "stops": {f.group: f.stops for f in folds},
        "curves": folds[0].curves,
        "curves_fold": folds[0].group,
        "seconds": float(sum(f.seconds for f in folds)),
    }


def run_masking_grid(
    data: LoadedData,
    cfg: TrainConfig,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Each masking config (and the attention aggregator with the default masking): SSL,
    then linear probe on all labels and fine-tuning on 10%, on the configured folds."""
    groups = list(cfg.evaluation.masking_folds) or fold_groups(data, cfg)
    variants: list[tuple[str, TrainConfig]] = [
        (f"mlp/{m.strategy}@{m.keep:g}", cfg.model_copy(update={"masking": m}))
        for m in cfg.evaluation.masking_grid
    ]
    if cfg.evaluation.compare_attention:
        attention = cfg.model.model_copy(update={"aggregator": "attention"})
        name = f"attention/{cfg.masking.strategy}@{cfg.masking.keep:g}"
        variants.append((name, cfg.model_copy(update={"model": attention})))
    n = len(data.classes)
    rows = []
    for name, vcfg in variants:
        probe_f1, ft_f1 = [], []
        start = time.perf_counter()
        for group in groups:
            train, test = split_fold(data, vcfg, group)
            unlabelled = data.windows if vcfg.pretrain_on == "all" else train
            base = new_model(data.modalities, [], vcfg, unlabelled)
            masker = masker_of(vcfg.masking)
            pretrain(base, unlabelled, masker, vcfg.pretrain, vcfg.loss, vcfg.seed, progress)
            probe, _ = finetune(base, train, data.classes, vcfg, 1.0, "probe", progress)
            probe_f1.append(macro_f1(test.y, predict(probe, test).argmax(1), n))
            model, _ = finetune(base, train, data.classes, vcfg, 0.1, "finetune", progress)
            ft_f1.append(macro_f1(test.y, predict(model, test).argmax(1), n))
        row = {
            "variant": name,
            "probe@1": float(np.mean(probe_f1)),
            "finetune@0.1": float(np.mean(ft_f1)),
            "folds": groups,
            "seconds": time.perf_counter() - start,
        }
        log(f"masking {row}")
        rows.append(row)
    return rows


def set_threads(n: int | None) -> None:
    """Use ``n`` intra-op threads (None: leave torch's default)."""
    if n:
        torch.set_num_threads(n)
