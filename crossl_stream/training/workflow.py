"""What ``crossl-stream pretrain``, ``finetune`` and ``train`` do: a spec's recordings in,
a model folder out, one that ``run``, ``replay`` and ``predict`` take as it is.

A model folder remembers where its windows came from (sensors and their streams, window
settings, label rules), so that replaying a recording through it needs no other config.
Training state is saved in the folder as it goes (``pretrain.state``, ``finetune.state``):
the same command on the same folder resumes where an interrupted run stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossl_stream.config import TrainConfig
from crossl_stream.errors import CheckpointError, DatasetError
from crossl_stream.model.checkpoint import (
    META,
    fallback_digests,
    fallback_dir,
    read_meta,
    save_model,
)
from crossl_stream.model.crossl import CroSSL
from crossl_stream.training.experiments import (
    finetune,
    labelled_split,
    masker_of,
    new_model,
    supervised,
)
from crossl_stream.training.spec import LoadedData
from crossl_stream.training.train import FitResult, pretrain

log = logging.getLogger(__name__)
PRETRAIN_STATE = "pretrain.state"
FINETUNE_STATE = "finetune.state"


def provenance(cfg: TrainConfig, data: LoadedData, windows: np.ndarray) -> dict[str, Any]:
    """What model.json records of the data: the spec, the streams, windows and labels.

    Each modality's stream is the one the spec names (else the name most files have), and
    its type the spec's (else the type most files have): what replay matches a new file on.
    """
    sensors = {}
    for m in data.modalities:
        want = cfg.data.sensors[m.name]
        names = Counter(f.streams[m.name] for f in data.files)
        types = Counter(f.types.get(m.name) for f in data.files if f.types.get(m.name))
        sensors[m.name] = {
            "stream": want.stream or names.most_common(1)[0][0],
            "type": want.type or (types.most_common(1)[0][0] if types else None),
        }
    used = data.windows.take(windows)
    return {
        "data": {
            "name": data.name,
            "sensors": sensors,
            "window": cfg.data.window.model_dump(mode="json"),
            "labels": cfg.data.labels.model_dump(mode="json") if cfg.data.labels else None,
            "subjects": sorted(set(used.subject.tolist())),
            "sessions": len({(f.subject, f.session) for f in data.files}),
            "windows": len(used),
            "labelled_windows": len(used.labelled),
        },
        "holdout": list(cfg.holdout),
        "pretrain_on": cfg.pretrain_on,
        "seed": cfg.seed,
        "config": cfg.model_dump(mode="json", exclude={"data", "evaluation"}),
    }


def training_windows(cfg: TrainConfig, data: LoadedData, labels: bool = True) -> np.ndarray:
    """Indices of the windows a model may train on: all but the held-out subjects and
    sessions (``cfg.holdout``); for pretraining (``labels=False``) with ``pretrain_on:
    all``, every window."""
    w, held = data.windows, list(cfg.holdout)
    subjects, sessions = sorted(set(w.subject.tolist())), sorted(set(w.session.tolist()))
    unknown = sorted(set(held) - set(subjects) - set(sessions))
    if unknown:
        raise DatasetError(
            f"holdout: {unknown} is no subject or SUBJECT/SESSION of the data; there are "
            f"subjects {subjects}, sessions {sessions}"
        )
    if not labels and cfg.pretrain_on == "all":
        return np.arange(len(w))
    keep = ~(np.isin(w.subject, held) | np.isin(w.session, held))
    if not keep.any():
        raise DatasetError(f"holdout {held} leaves no window to train on")
    return np.flatnonzero(keep)


def _finished(state: Path, folder: Path, stage: str) -> bool:
    """Whether ``folder`` already holds the finished run of ``state`` (a no-op to redo)."""
    if not (state.is_file() and (folder / "model.json").is_file()):
        return False
    try:
        done = bool(torch.load(state, map_location="cpu", weights_only=True).get("complete"))
    except Exception:  # unreadable: the training loop says why
        return False
    return done and read_meta(folder).get("info", {}).get("stage") == stage


def run_pretrain(cfg: TrainConfig, data: LoadedData, out: Path, progress: bool = True) -> CroSSL:
    """VICReg on every window of the training subjects, labelled or not; the model (no
    class head) is saved to ``out``. Resumes from ``out/pretrain.state``."""
    index = training_windows(cfg, data, labels=False)
    windows = data.windows.take(index)
    finished = _finished(out / PRETRAIN_STATE, out, "pretrained")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = new_model(data.modalities, [], cfg, windows)
    history = pretrain(
        model,
        windows,
        masker_of(cfg.masking),
        cfg.pretrain,
        cfg.loss,
        cfg.seed,
        progress,
        checkpoint=out / PRETRAIN_STATE,
    )
    if finished:  # the state checked it is this run: the folder holds it already
        return model
    info = provenance(cfg, data, index)
    info["stage"] = "pretrained"
    info["pretrain_seconds"] = round(time.perf_counter() - start, 1)
    info["final_pretrain_loss"] = history[-1]["loss"] if history else None
    save_model(model, out, info)
    _save_curves(out, {"pretrain": history})
    return model


def run_finetune(
    cfg: TrainConfig,
    data: LoadedData,
    base: CroSSL,
    out: Path,
    fraction: float = 1.0,
    progress: bool = True,
    base_info: dict[str, Any] | None = None,
) -> CroSSL:
    """``base`` with a class head, fine-tuned on ``fraction`` of the training subjects'
    labelled windows (early stopping on a validation group), saved to ``out``."""
    data.require_classes(cfg.data.name or data.name)
    _check_same_inputs(base, data)
    index = training_windows(cfg, data)
    finished = _finished(out / FINETUNE_STATE, out, "finetuned")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, result = finetune(
        base,
        data.windows.take(index),
        data.classes,
        cfg,
        fraction,
        "finetune",
        progress,
        checkpoint=out / FINETUNE_STATE,
    )
    if finished:  # the state checked it is this run: the folder holds it already
        return model
    info = provenance(cfg, data, index)
    info.update(
        stage="finetuned",
        labels_fraction=fraction,
        pretrained={  # what the encoder saw before its labels
            k: ((base_info or {}).get("data") or {}).get(k) for k in ("name", "windows")
        },
        finetune_seconds=round(time.perf_counter() - start, 1),
        **_stop_info(result),
    )
    if base_info:
        info["pretrain_seconds"] = base_info.get("pretrain_seconds")
    save_model(model, out, info)
    curves = _load_curves(out)
    curves["finetune"] = result.history
    _save_curves(out, curves)
    return model


def run_supervised(
    cfg: TrainConfig,
    data: LoadedData,
    out: Path,
    fraction: float = 1.0,
    progress: bool = True,
    stage: str = "supervised",
    extra: dict[str, Any] | None = None,
) -> CroSSL:
    """The ``supervised`` recipe: the architecture from scratch on ``fraction`` of the
    training subjects' labelled windows (modality dropout and early stopping as in
    fine-tuning), saved to ``out`` as ``stage`` (with ``extra`` in its info). Resumes from
    ``out/finetune.state``."""
    data.require_classes(cfg.data.name or data.name)
    index = training_windows(cfg, data)
    finished = _finished(out / FINETUNE_STATE, out, stage)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    windows = data.windows.take(index)
    model, result = supervised(
        data, windows, cfg, fraction, progress=progress, checkpoint=out / FINETUNE_STATE
    )
    if finished:
        return model
    info = provenance(cfg, data, index)
    info.update(
        stage=stage,
        labels_fraction=fraction,
        finetune_seconds=round(time.perf_counter() - start, 1),
        **_stop_info(result),
        **(extra or {}),
    )
    save_model(model, out, info)
    _save_curves(out, {"finetune": result.history})
    return model


CANDIDATES = "candidates"


def run_fallbacks(
    cfg: TrainConfig,
    data: LoadedData,
    out: Path,
    fraction: float = 1.0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """One fallback model per modality: the ``supervised`` recipe on every other modality
    (the same labelled windows and validation group), saved to ``out/fallback/without-<m>``.

    A window missing exactly that modality is served by its fallback instead of the main
    model with a masked latent (``inference.Predictor``): on the watch data it keeps more
    of the two-sensor macro-F1 than the masked model does (docs/results.md). Returns each
    fallback's stop information."""
    if len(data.modalities) < 2:
        raise DatasetError(
            f"finetune.fallbacks: {data.name} has one modality; there is nothing to fall back on"
        )
    stops = {}
    for m in data.modalities:
        folder = fallback_dir(out, m.name)
        others = data.without(m.name)
        log.info("fallback for windows without %s", m.name)
        run_supervised(cfg, others, folder, fraction, progress, "fallback", {"without": m.name})
        info = read_meta(folder)["info"]
        stops[m.name] = {k: info.get(k) for k in ("best_val_f1", "best_epoch", "stopped")}
    meta = read_meta(out)  # the main model vouches for these fallbacks (load_fallbacks)
    meta["info"]["fallbacks"] = fallback_digests(out)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return stops


def run_best(
    cfg: TrainConfig,
    data: LoadedData,
    out: Path,
    fraction: float = 1.0,
    progress: bool = True,
) -> tuple[CroSSL, dict[str, Any]]:
    """The ``best`` recipe: CroSSL (``out/pretrained``, then ``out/candidates/crossl``) and
    supervised (``out/candidates/supervised``) on the same labelled windows and validation
    group; the one with the better validation macro-F1 (CroSSL on a tie) is saved to
    ``out`` with the choice recorded in its model.json (``info.selection``)."""
    windows = data.windows.take(training_windows(cfg, data))
    if labelled_split(windows, fraction, cfg.evaluation.by, cfg.seed)[1] is None:
        raise DatasetError(
            f"recipe best: no validation {cfg.evaluation.by} to compare the recipes on (the "
            f"labelled training windows come from one {cfg.evaluation.by}); choose recipe "
            "crossl or supervised"
        )
    base = run_pretrain(cfg, data, out / "pretrained", progress)
    info = pretrained_info(out / "pretrained")
    candidates = out / CANDIDATES
    models = {
        "crossl": run_finetune(cfg, data, base, candidates / "crossl", fraction, progress, info),
        "supervised": run_supervised(cfg, data, candidates / "supervised", fraction, progress),
    }
    scores = {k: read_meta(candidates / k)["info"].get("best_val_f1") for k in models}
    if any(v is None for v in scores.values()):
        raise DatasetError(
            "recipe best: no validation group to compare the recipes on (one subject, "
            "session and recording only?); choose recipe crossl or supervised"
        )
    chosen = max(models, key=lambda k: (scores[k], k == "crossl"))
    meta = read_meta(candidates / chosen)["info"]
    meta["selection"] = {
        "recipe": chosen,
        "validation_macro_f1": scores,
        "validation": "a group drawn from the training data (seed "
        f"{cfg.seed}), the same for both; the test groups of `eval` are not involved",
        "score": "the mean of the macro-F1 with every modality and with each alone"
        if cfg.finetune.validate_alone
        else "the macro-F1 with every modality",
    }
    save_model(models[chosen], out, meta)
    _save_curves(out, _load_curves(candidates / chosen))
    return models[chosen], meta["selection"]


def pretrained_info(directory: Path) -> dict[str, Any]:
    """The info block of a pretrained model folder."""
    return read_meta(directory).get("info", {})


def _stop_info(result: FitResult) -> dict[str, Any]:
    """How a classifier's training ended, for model.json."""
    return {
        "stopped": result.stopped,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "best_val_f1": result.best_val_f1,
    }


def _check_same_inputs(model: CroSSL, data: LoadedData) -> None:
    ours = [m.model_dump(exclude={"channel_names"}) for m in data.modalities]
    theirs = [m.model_dump(exclude={"channel_names"}) for m in model.modalities]
    if ours != theirs:
        raise CheckpointError(
            f"the pretrained model's modalities {theirs} differ from the spec's {ours} "
            "(sensors, channels, rates and window length must match)"
        )


def _save_curves(out: Path, curves: dict[str, Any]) -> None:
    (out / "curves.json").write_text(json.dumps(curves) + "\n")


def _load_curves(out: Path) -> dict[str, Any]:
    path = out / "curves.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}
