"""Checkpoint I/O: a directory with ``model.safetensors`` (tensors only, no pickle) and
``model.json`` (architecture, modality specs, class names, training provenance).

Normalisation statistics are model buffers, so they travel in the weights file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from crossl_stream.errors import CheckpointError
from crossl_stream.model.crossl import CroSSL, ModelConfig
from crossl_stream.model.specs import ModalitySpec

FORMAT = "crossl-stream/checkpoint"
VERSION = 1
WEIGHTS = "model.safetensors"
META = "model.json"
FALLBACKS = "fallback"


def fallback_dir(directory: str | Path, missing: str) -> Path:
    """Where a model folder keeps the model that serves windows without ``missing``."""
    return Path(directory) / FALLBACKS / f"without-{missing}"


def fallback_dirs(directory: str | Path) -> dict[str, Path]:
    """The fallback models a model folder holds, by the modality each does without."""
    root = Path(directory) / FALLBACKS
    if not root.is_dir():
        return {}
    found = sorted(p for p in root.glob("without-*") if (p / META).is_file())
    return {p.name.removeprefix("without-"): p for p in found}


def save_model(model: CroSSL, directory: str | Path, info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (created if needed); ``info`` lands in model.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.config.model_dump(mode="json"),
        "modalities": [m.model_dump(mode="json") for m in model.modalities],
        "classes": model.classes,
        "info": info or {},
    }
    (directory / META).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read and check model.json of a checkpoint directory."""
    path = Path(directory) / META
    if not Path(directory).is_dir():
        raise CheckpointError(f"{directory}: not a directory (a checkpoint is a model directory)")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {META}; not a crossl-stream checkpoint")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: 'format' is not {FORMAT!r}; not a crossl-stream checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, need {VERSION}")
    for key in ("model", "modalities", "classes"):
        if key not in meta:
            raise CheckpointError(f"{path}: missing key {key!r}")
    return meta


def weights_digest(directory: str | Path) -> str:
    """The sha256 of a model folder's weights file."""
    return hashlib.sha256((Path(directory) / WEIGHTS).read_bytes()).hexdigest()


def model_id(directory: str | Path) -> str:
    """``<folder>@<first 12 hex of the weights' sha256>``: names the exact weights."""
    return f"{Path(directory).resolve().name}@{weights_digest(directory)[:12]}"


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> CroSSL:
    """Rebuild a model from ``directory`` without unpickling anything, in eval mode."""
    directory = Path(directory)
    meta = read_meta(directory)
    try:
        config = ModelConfig(**meta["model"])
        specs = [ModalitySpec(**m) for m in meta["modalities"]]
        model = CroSSL(specs, meta["classes"], config)
    except (ValidationError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / META}: invalid model description: {exc}") from exc
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{directory}: no {WEIGHTS}")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights}: not a safetensors file ({exc})") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{weights}: tensors do not match model.json: missing {missing[:5]}, "
            f"unexpected {extra[:5]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(
                f"{weights}: tensor {name!r} has shape {list(tensor.shape)}, "
                f"model.json implies {list(expected[name].shape)}"
            )
    model.load_state_dict(state)
    return model.to(device).eval()


def fallback_digests(directory: str | Path) -> dict[str, str]:
    """Each fallback's weights digest, by the modality it does without: what the main
    model.json records (``info.fallbacks``) once they are trained for its weights."""
    return {m: weights_digest(d) for m, d in fallback_dirs(directory).items()}


def load_fallbacks(model: CroSSL, directory: str | Path) -> dict[str, CroSSL]:
    """The fallback models of the folder ``model`` came from, by the modality each does
    without; each checked to be the one trained for these weights (its digest in the main
    model.json), ``model`` less that modality, on the same classes, subjects and holdout
    (CheckpointError naming the folder otherwise)."""
    out = {}
    ours = read_meta(directory).get("info", {})
    recorded = ours.get("fallbacks") or {}
    for missing, folder in fallback_dirs(directory).items():
        advice = (
            "retrain with `crossl-stream train` (finetune.fallbacks), or serve without them "
            "(inference.fallbacks: false; predict --no-fallbacks)"
        )
        if missing not in model.modality_names:
            raise CheckpointError(
                f"{folder}: a fallback for windows without {missing!r}, a modality the model "
                f"in {directory} does not have ({model.modality_names}); remove it"
            )
        if recorded.get(missing) != weights_digest(folder):
            raise CheckpointError(
                f"{folder}: not the fallback trained for the weights in {directory} (its "
                f"model.json records {'another' if missing in recorded else 'none'}); {advice}"
            )
        fallback = load_model(folder)
        others = [m for m in model.modalities if m.name != missing]
        theirs = read_meta(folder).get("info", {})
        problems = []
        if [m.model_dump() for m in fallback.modalities] != [m.model_dump() for m in others]:
            problems.append(f"modalities {fallback.modality_names}, not {[m.name for m in others]}")
        if fallback.classes != model.classes:
            problems.append(f"classes {fallback.classes}, not {model.classes}")
        if ours.get("holdout") != theirs.get("holdout"):
            problems.append(f"holdout {theirs.get('holdout')}, not {ours.get('holdout')}")
        subjects = [(i.get("data") or {}).get("subjects") for i in (ours, theirs)]
        if subjects[0] != subjects[1]:
            problems.append(f"training subjects {subjects[1]}, not {subjects[0]}")
        if problems:
            raise CheckpointError(
                f"{folder}: not a fallback of {directory} (" + "; ".join(problems) + f"); {advice}"
            )
        out[missing] = fallback
    return out
