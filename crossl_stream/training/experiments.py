"""The evaluation protocol on any data set read from a spec.

Each fold holds out one group (a subject or a session) as the test group. Every arm
(``EvaluationConfig``) is trained on the training groups' labels only, at each of its label
fractions and seeds, and early-stopped on a validation group drawn from the training groups,
never the test group. Every model is scored on the test group with all modalities and with
each modality alone. Pretraining sees the training groups' windows; the ``crossl-all`` arm's
also sees the test group's, without labels (a lab has a new subject's recording before their
labels). An ablation scores pretraining variants on validation groups only, and can choose
the variant the folds run.

Folds and ablation variants are independent jobs: ``jobs`` processes run them at once.
"""

from __future__ import annotations

import copy
import io
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crossl_stream.config import AugmentConfig, FinetuneConfig, MaskingConfig, TrainConfig
from crossl_stream.errors import ConfigError, DatasetError
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.masking import NO_MASKING, LatentMasker
from crossl_stream.model.specs import ModalitySpec
from crossl_stream.training.augment import Augmenter
from crossl_stream.training.datasets import Windows, fit_normalisation, labelled_subset
from crossl_stream.training.metrics import accuracy, confusion_matrix, macro_f1
from crossl_stream.training.spec import LoadedData
from crossl_stream.training.train import (
    fit_classifier,
    predict,
    pretrain,
    validation_split,
)

Log = Callable[[str], None]
_DEVICE: dict[str, torch.device] = {"device": torch.device("cpu")}

_log = logging.getLogger(__name__)


def set_device(name: str = "cpu") -> torch.device:
    """Train and evaluate every model made here on ``name`` (``cpu``, ``cuda``, ``cuda:1``,
    or ``auto``: CUDA when there is one). Random draws stay on the CPU, so a seed gives the
    same masks and batches on either."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DatasetError(f"--device {name}: torch sees no CUDA device here")
    _DEVICE["device"] = device
    return device


def masker_of(cfg: MaskingConfig) -> LatentMasker:
    """The latent masker that makes pretraining's views."""
    return LatentMasker(cfg.strategy, cfg.keep)


def dropout_masker(cfg: FinetuneConfig) -> LatentMasker:
    """Modality dropout for classifier training: each modality hidden with
    ``cfg.modality_dropout`` (never all), or no masking."""
    if cfg.modality_dropout <= 0:
        return NO_MASKING
    return LatentMasker("spatial", 1.0 - cfg.modality_dropout)


def new_model(
    specs: list[ModalitySpec], classes: list[str], cfg: TrainConfig, windows: Windows
) -> CroSSL:
    """A fresh model, initialised from ``cfg.seed``, with normalisation fitted on ``windows``."""
    torch.manual_seed(cfg.seed)
    model = CroSSL(specs, classes, cfg.model)
    model.set_normalisation(fit_normalisation(windows))
    return model.to(_DEVICE["device"])


def fraction_key(fraction: float) -> str:
    return str(float(fraction))


def run_key(arm: str, fraction: float) -> str:
    """``arm@fraction``, the name of one arm at one label fraction."""
    return f"{arm}@{fraction_key(fraction)}"


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
    (``finetune``: everything, with modality dropout and augmentation as configured;
    ``probe``: the head only); returns the model and the fit result."""
    train, val = labelled_split(windows, fraction, cfg.evaluation.by, cfg.seed)
    torch.manual_seed(cfg.seed)  # the new head: the same whether pretraining ran just now or not
    model = base.with_classes(classes) if base.classes != classes else copy.deepcopy(base)
    model = model.to(_DEVICE["device"])
    probe = mode == "probe"
    result = fit_classifier(
        model,
        train,
        mode,
        cfg.finetune,
        NO_MASKING if probe else dropout_masker(cfg.finetune),
        cfg.seed,
        progress,
        val=val,
        checkpoint=checkpoint,
        augment=cfg.pretrain.augment if cfg.finetune.augment and not probe else None,
    )
    return model, result


def supervised(
    data: LoadedData,
    windows: Windows,
    cfg: TrainConfig,
    fraction: float = 1.0,
    plain: bool = False,
    progress: bool = True,
    checkpoint=None,
    augment: bool | None = None,
):
    """The supervised baseline: the same architecture from scratch, trained to convergence
    (early stopping) on the same labelled windows as fine-tuning, with the same modality
    dropout and augmentation (``augment``: with or without ``pretrain.augment``, whatever
    ``finetune.augment`` says); ``plain``: with neither."""
    train, val = labelled_split(windows, fraction, cfg.evaluation.by, cfg.seed)
    model = new_model(data.modalities, data.classes, cfg, windows)
    masker = NO_MASKING if plain else dropout_masker(cfg.finetune)
    augmented = cfg.finetune.augment if augment is None else augment
    augment_cfg = cfg.pretrain.augment if augmented and not plain else None
    result = fit_classifier(
        model,
        train,
        "supervised",
        cfg.finetune,
        masker,
        cfg.seed,
        progress,
        val=val,
        checkpoint=checkpoint,
        augment=augment_cfg,
    )
    return model, result


def split_fold(data: LoadedData, cfg: TrainConfig, group: str) -> tuple[Windows, Windows]:
    """(training windows, test windows) with ``group`` held out. The test windows are the
    group's labelled windows in which every modality is available, so that every arm,
    and each modality left alone, is scored on the same windows."""
    w = data.windows
    groups = w.subject if cfg.evaluation.by == "subject" else w.session
    train = w.take(np.flatnonzero(groups != group))
    test_index = np.flatnonzero((groups == group) & (w.y >= 0) & w.available.all(axis=1))
    return train, w.take(test_index)


def with_seed(cfg: TrainConfig, seed: int) -> TrainConfig:
    return cfg.model_copy(update={"seed": seed})


def _state(model: CroSSL) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def _restore(model: CroSSL, state: bytes) -> CroSSL:
    model.load_state_dict(torch.load(io.BytesIO(state), weights_only=True))
    return model


# -- one fold -------------------------------------------------------------------------------


@dataclass
class FoldOutcome:
    """Every arm's predictions on one held-out group for one seed."""

    group: str
    seed: int
    y_true: np.ndarray
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    missing: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    fallbacks: dict[str, np.ndarray] = field(default_factory=dict)  # without m: predictions
    stops: dict[str, dict[str, Any]] = field(default_factory=dict)
    curves: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    seconds: float = 0.0


def pretrain_all(data: LoadedData, cfg: TrainConfig, progress: bool = False) -> bytes:
    """The ``crossl-all`` encoder of ``cfg.seed``: pretrained on every window (no label);
    the same for every fold, so made once per seed."""
    base = new_model(data.modalities, [], cfg, data.windows)
    pretrain(base, data.windows, masker_of(cfg.masking), cfg.pretrain, cfg.loss, cfg.seed, progress)
    return _state(base)


def run_fold(
    data: LoadedData,
    cfg: TrainConfig,
    group: str,
    progress: bool = True,
    transductive: bytes | None = None,
    full: bool = True,
    curves: bool = False,
) -> FoldOutcome:
    """Every arm of ``cfg.evaluation.arms`` with ``group`` held out, seed ``cfg.seed``.

    ``transductive``: the ``crossl-all`` encoder (``pretrain_all``); ``full``: run the
    label fraction 1.0 too; ``curves``: keep the training histories.
    """
    start = time.perf_counter()
    train, test = split_fold(data, cfg, group)
    if not len(test):
        raise DatasetError(f"fold {group!r}: no labelled window with every sensor to test on")
    out = FoldOutcome(group, cfg.seed, test.y)
    names = [m.name for m in data.modalities]
    arms = {a: [f for f in fs if full or f < 1.0] for a, fs in cfg.evaluation.arms.items()}

    def score(key: str, model: CroSSL, result, began: float) -> None:
        seconds = time.perf_counter() - began
        out.predictions[key] = predict(model, test).argmax(1)
        if len(names) > 1:
            out.missing[key] = {m: predict(model, test, [m]).argmax(1) for m in names}
        out.stops[key] = {
            "stopped": result.stopped,
            "best_epoch": result.best_epoch,
            "epochs": result.epochs,
            "steps": result.steps,
            "val_f1": result.best_val_f1,
            "seconds": round(seconds, 1),
        }
        if curves:
            out.curves[key] = result.history

    strict = None
    if arms.get("crossl") or arms.get("probe"):
        began = time.perf_counter()
        strict = new_model(data.modalities, [], cfg, train)
        history = pretrain(
            strict, train, masker_of(cfg.masking), cfg.pretrain, cfg.loss, cfg.seed, progress
        )
        if curves:
            out.curves["pretrain"] = history
        out.stops["pretrain"] = {"seconds": round(time.perf_counter() - began, 1)}
    every = None
    if arms.get("crossl-all"):
        every = new_model(data.modalities, [], cfg, data.windows)
        if transductive is None:
            transductive = pretrain_all(data, cfg, progress)
        _restore(every, transductive)
    for arm, fractions in arms.items():
        for fraction in fractions:
            key = run_key(arm, fraction)
            began = time.perf_counter()
            if arm.startswith("supervised"):
                plain = arm == "supervised-plain"
                augment = True if arm == "supervised-aug" else None
                model, result = supervised(
                    data, train, cfg, fraction, plain, progress, augment=augment
                )
            elif arm == "probe":
                assert strict is not None
                model, result = finetune(
                    strict, train, data.classes, cfg, fraction, "probe", progress
                )
            else:
                base = strict if arm == "crossl" else every
                assert base is not None
                model, result = finetune(
                    base, train, data.classes, cfg, fraction, "finetune", progress
                )
            score(key, model, result, began)
    if cfg.finetune.fallbacks and full and len(names) > 1:
        for m in names:  # what serves a window without m (workflow.run_fallbacks)
            began = time.perf_counter()
            others, without = data.without(m), test.without(m)
            model, result = supervised(others, train.without(m), cfg, 1.0, progress=progress)
            out.fallbacks[m] = predict(model, without).argmax(1)
            out.stops[f"fallback-without-{m}"] = {
                "stopped": result.stopped,
                "best_epoch": result.best_epoch,
                "seconds": round(time.perf_counter() - began, 1),
            }
    out.seconds = time.perf_counter() - start
    return out


# -- jobs -----------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(data: LoadedData, threads: int, device: str) -> None:
    torch.set_num_threads(threads)
    set_device(device)
    _WORKER["data"] = data


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(_WORKER["data"], *args)


def worker_threads(jobs: int) -> int:
    """Torch threads of each of ``jobs`` worker processes: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // jobs)


def _run_jobs(
    data: LoadedData,
    calls: Iterable[tuple[Callable[..., Any], tuple]],
    jobs: int,
    desc: str,
    progress: bool,
) -> list[Any]:
    """Each ``fn(data, *args)`` of ``calls``, results in order; ``jobs`` processes at once
    (one torch thread each, when they share the CPU cores), or in this process."""
    calls = list(calls)
    if jobs <= 1 or len(calls) <= 1:
        return [fn(data, *args) for fn, args in tqdm(calls, desc=desc, disable=not progress)]
    threads = worker_threads(jobs)
    context = multiprocessing.get_context("spawn")
    results: list[Any] = [None] * len(calls)
    device = str(_DEVICE["device"])
    with ProcessPoolExecutor(jobs, context, _init_worker, (data, threads, device)) as pool:
        futures = {pool.submit(_call, fn, *args): i for i, (fn, args) in enumerate(calls)}
        for future in tqdm(
            as_completed(futures), total=len(calls), desc=desc, disable=not progress
        ):
            results[futures[future]] = future.result()
    return results


def _fold_job(
    data: LoadedData,
    cfg: TrainConfig,
    group: str,
    transductive: bytes | None,
    full: bool,
    curves: bool,
) -> FoldOutcome:
    return run_fold(data, cfg, group, False, transductive, full, curves)


def _pretrain_all_job(data: LoadedData, cfg: TrainConfig) -> bytes:
    return pretrain_all(data, cfg, False)


# -- the protocol ---------------------------------------------------------------------------


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


def check_folds(data: LoadedData, cfg: TrainConfig, groups: list[str]) -> None:
    """DatasetError, before any training, when a fold cannot run: fewer than two groups with
    labels, or a held-out group with no labelled window that has every modality."""
    by = cfg.evaluation.by
    w = data.windows
    labelled = sorted(set((w.subject if by == "subject" else w.session)[w.y >= 0].tolist()))
    if len(labelled) < 2:
        raise DatasetError(
            f"evaluation.by: {by}: {len(labelled)} {by} with labels ({labelled}); holding one "
            "out needs at least two"
        )
    empty = [g for g in groups if not len(split_fold(data, cfg, g)[1])]
    if empty:
        raise DatasetError(
            f"evaluation: {by} {empty}: no labelled window with every modality to test on; "
            "leave them out with evaluation.folds"
        )
    if cfg.evaluation.arms.get("supervised-aug") and not cfg.pretrain.augment.active:
        raise ConfigError(
            "evaluation.arms: supervised-aug trains with pretrain.augment, which does nothing "
            "here: it would repeat supervised; set pretrain.augment or drop the arm"
        )
    check_augment(data, cfg.pretrain.augment)


def without_idle_arms(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` less the supervised-aug arm when ``pretrain.augment`` does nothing (an
    ablation variant chose no augmentation: the arm would repeat supervised)."""
    arms = cfg.evaluation.arms
    if "supervised-aug" not in arms or cfg.pretrain.augment.active:
        return cfg
    kept = {k: v for k, v in arms.items() if k != "supervised-aug"}
    return cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"arms": kept})})


def check_augment(data: LoadedData, cfg: AugmentConfig, say: bool = True) -> bool:
    """ConfigError, before any training, when ``cfg`` does not fit the data's modalities
    (a rotation with no 3-channel modality, ``vectors`` naming others); with ``say``, logs
    which modalities a rotation will turn when ``vectors`` leaves it to the channel count.
    Whether there was that to say."""
    if not cfg.active:
        return False
    aug = Augmenter(cfg, {m.name: torch.ones(m.channels) for m in data.modalities})
    guessed = bool(cfg.rotate_deg) and cfg.vectors is None
    if guessed and say:
        _log.info(
            "augment.rotate_deg: rotating %s (every 3-channel modality; name the 3-axis "
            "vector sensors in augment.vectors if some are not)",
            ", ".join(sorted(aug.vectors)),
        )
    return guessed


def run_folds(
    data: LoadedData,
    cfg: TrainConfig,
    progress: bool = True,
    log: Log = print,
    jobs: int = 1,
) -> dict[str, Any]:
    """Every fold of every seed; a dict ready for the report (and saved as JSON)."""
    ev = cfg.evaluation
    groups = fold_groups(data, cfg)
    check_folds(data, cfg, groups)
    start = time.perf_counter()
    transductive: dict[int, bytes | None] = dict.fromkeys(ev.seeds)
    if ev.arms.get("crossl-all"):
        calls = [(_pretrain_all_job, (with_seed(cfg, s),)) for s in ev.seeds]
        states = _run_jobs(data, calls, jobs, "pretrain on all", progress)
        transductive = dict(zip(ev.seeds, states, strict=True))
    calls = [
        (
            _fold_job,
            (with_seed(cfg, s), g, transductive[s], i < ev.seeds_at_full, i == 0 and j == 0),
        )
        for i, s in enumerate(ev.seeds)
        for j, g in enumerate(groups)
    ]
    folds = _run_jobs(data, calls, jobs, "folds", progress)
    n = len(data.classes)
    for fold in folds:
        f1 = {k: round(macro_f1(fold.y_true, v, n), 3) for k, v in fold.predictions.items()}
        log(f"fold {ev.by}={fold.group} seed={fold.seed} seconds={fold.seconds:.0f} macro_f1={f1}")
    first = folds[0]
    return {
        "name": data.name,
        "by": ev.by,
        "classes": data.classes,
        "modalities": [m.name for m in data.modalities],
        "window_s": data.modalities[0].window_s,
        "folds": groups,
        "groups": len(np.unique(np.asarray(getattr(data.windows, ev.by))[data.windows.labelled])),
        "seeds": list(ev.seeds),
        "arms": {a: list(f) for a, f in ev.arms.items()},
        "windows": len(data.windows),
        "labelled_windows": len(data.windows.labelled),
        "runs": runs_table(folds, n),
        "fallbacks": fallbacks_table(folds, n),
        "confusion": confusions(folds, n),
        "curves": first.curves,
        "curves_fold": first.group,
        "jobs": jobs,
        "threads": worker_threads(jobs) if jobs > 1 else torch.get_num_threads(),
        "seconds": time.perf_counter() - start,
        "fold_seconds": float(sum(f.seconds for f in folds)),
    }


def runs_table(folds: list[FoldOutcome], n_classes: int) -> dict[str, Any]:
    """Per run key: per seed, per group, the test scores, each modality alone, and the stop."""
    table: dict[str, Any] = {}
    for f in folds:
        for key, pred in f.predictions.items():
            entry = {
                "macro_f1": macro_f1(f.y_true, pred, n_classes),
                "accuracy": accuracy(f.y_true, pred),
                **f.stops[key],
            }
            if key in f.missing:
                entry["alone"] = {
                    m: macro_f1(f.y_true, p, n_classes) for m, p in f.missing[key].items()
                }
            table.setdefault(key, {}).setdefault(str(f.seed), {})[f.group] = entry
    return table


def fallbacks_table(folds: list[FoldOutcome], n_classes: int) -> dict[str, Any]:
    """Per seed, per group: each fallback's test macro-F1 (by the modality it does without),
    and how it stopped."""
    table: dict[str, Any] = {}
    for f in folds:
        if f.fallbacks:
            table.setdefault(str(f.seed), {})[f.group] = {
                "without": {m: macro_f1(f.y_true, p, n_classes) for m, p in f.fallbacks.items()},
                "stops": {m: f.stops[f"fallback-without-{m}"] for m in f.fallbacks},
            }
    return table


def confusions(folds: list[FoldOutcome], n_classes: int) -> dict[str, list[list[int]]]:
    """Per run key: the confusion matrix summed over folds and seeds."""
    out: dict[str, np.ndarray] = {}
    for f in folds:
        for key, pred in f.predictions.items():
            cm = confusion_matrix(f.y_true, pred, n_classes)
            out[key] = out[key] + cm if key in out else cm
    return {k: v.tolist() for k, v in out.items()}


# -- ablation -------------------------------------------------------------------------------


def merged(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``cfg`` with ``overrides`` merged in (nested dicts merge), validated again."""

    def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        return out

    return TrainConfig.model_validate(merge(cfg.model_dump(mode="json"), overrides))


def validation_windows(data: LoadedData, cfg: TrainConfig, group: str) -> tuple[Windows, Windows]:
    """(training windows, validation windows) inside fold ``group``'s training data: one
    group drawn from them (the seed's) is the validation group; the test group is unused."""
    train, _ = split_fold(data, cfg, group)
    by = "subject" if cfg.evaluation.by == "subject" else "session"
    inner, val = validation_split(train, by, cfg.seed)
    return train.take(inner), train.take(val)


def ablation_job(
    data: LoadedData, cfg: TrainConfig, name: str, group: str, curve_steps: int = 0
) -> dict[str, Any]:
    """One ablation variant on one fold's validation group: pretrain on the rest of the
    fold's training groups; a linear probe on all their labels and fine-tuning on 1%, each
    scored on the validation group. ``curve_steps``: pretrain that long instead, scoring the
    probe every tenth of it (the curve that says whether pretraining has flattened)."""
    start = time.perf_counter()
    train, val = validation_windows(data, cfg, group)
    n = len(data.classes)
    base = new_model(data.modalities, [], cfg, train)
    pcfg = (
        cfg.pretrain if not curve_steps else cfg.pretrain.model_copy(update={"steps": curve_steps})
    )
    curve: list[dict[str, float]] = []
    marks = {round(curve_steps * k / 10) for k in range(1, 11)} if curve_steps else set()

    def probe_now(step: int, _: dict[str, float]) -> None:
        if step in marks:
            state = torch.get_rng_state()  # the probe reseeds; pretraining's dropout must not
            curve.append({"step": step, "probe_f1": probe_val(base)})
            torch.set_rng_state(state)
            base.train()

    def probe_val(model: CroSSL) -> float:
        head = model.with_classes(data.classes)
        labelled = train.take(train.labelled)
        fit_classifier(head, labelled, "probe", cfg.finetune, seed=cfg.seed, progress=False)
        held = val.take(val.labelled)
        return macro_f1(held.y, predict(head, held).argmax(1), n)

    history = pretrain(
        base,
        train,
        masker_of(cfg.masking),
        pcfg,
        cfg.loss,
        cfg.seed,
        False,
        on_step=probe_now if curve_steps else None,
    )
    row: dict[str, Any] = {"variant": name, "group": group, "seed": cfg.seed}
    column = val.subject if cfg.evaluation.by == "subject" else val.session
    row["validation"] = sorted({str(v) for v in column})
    if curve_steps:
        row["curve"] = curve
        row["loss"] = [h["loss"] for h in history]
    else:
        row["probe_f1"] = probe_val(base)
        labels = train.take(train.labelled)
        lab_train, _ = labelled_split(labels, 0.01, cfg.evaluation.by, cfg.seed)
        model = base.with_classes(data.classes)
        torch.manual_seed(cfg.seed)
        fit_classifier(
            model,
            lab_train,
            "finetune",
            cfg.finetune,
            dropout_masker(cfg.finetune),
            cfg.seed,
            False,
            val=None,
            augment=cfg.pretrain.augment if cfg.finetune.augment else None,
        )
        held = val.take(val.labelled)
        row["finetune_f1"] = macro_f1(held.y, predict(model, held).argmax(1), n)
        row["variance"] = (
            float(np.mean([h["variance"] for h in history[-20:]])) if history else None
        )
    row["seconds"] = time.perf_counter() - start
    return row


def run_ablation(
    data: LoadedData,
    cfg: TrainConfig,
    progress: bool = True,
    log: Log = print,
    jobs: int = 1,
) -> dict[str, Any]:
    """Every ablation variant (and ``base``) on every ablation fold's validation group,
    plus the long pretraining curve; the scores, and the variant chosen (best mean of the
    probe and the 1%-label fine-tune on validation, if by ``select_margin`` over ``base``)."""
    ev = cfg.evaluation
    said = False  # the variants rotate the same modalities: say so once
    for overrides in ({}, *ev.ablation.values()):
        said |= check_augment(data, merged(cfg, overrides).pretrain.augment, say=not said)
    present = fold_groups(
        data, cfg.model_copy(update={"evaluation": ev.model_copy(update={"folds": None})})
    )
    unknown = sorted({str(g) for g in ev.ablation_folds} - set(present))
    if unknown:
        raise DatasetError(
            f"evaluation.ablation_folds: no labelled {ev.by} {unknown}; there are {present}"
        )
    variants = {"base": {}, **ev.ablation}
    configs = {name: merged(cfg, o) for name, o in variants.items()}
    calls = [
        (ablation_job, (configs[name], name, str(g)))
        for name in variants
        for g in ev.ablation_folds
    ]
    if ev.ablation_curve_steps:
        calls.insert(
            0, (ablation_job, (cfg, "base", str(ev.ablation_folds[0]), ev.ablation_curve_steps))
        )
    start = time.perf_counter()
    rows = _run_jobs(data, calls, jobs, "ablation", progress)
    curve = rows.pop(0) if ev.ablation_curve_steps else None
    scores = {}
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        probe = float(np.mean([r["probe_f1"] for r in mine]))
        tuned = float(np.mean([r["finetune_f1"] for r in mine]))
        scores[name] = {"probe_f1": probe, "finetune_f1": tuned, "score": (probe + tuned) / 2}
        log(f"ablation {name}: probe {probe:.3f}, finetune@1% {tuned:.3f} (validation)")
    best = max(scores, key=lambda k: scores[k]["score"])
    gain = scores[best]["score"] - scores["base"]["score"]
    chosen = best if gain >= ev.select_margin else "base"
    return {
        "variants": variants,
        "folds": [str(g) for g in ev.ablation_folds],
        "rows": rows,
        "scores": scores,
        "chosen": chosen,
        "best": best,
        "gain": gain,
        "select_margin": ev.select_margin,
        "curve": curve,
        "seconds": time.perf_counter() - start,
    }


def set_threads(n: int | None) -> None:
    """Use ``n`` intra-op threads (None: leave torch's default)."""
    if n:
        torch.set_num_threads(n)
