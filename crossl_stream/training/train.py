"""Training loops: SSL pretraining, fine-tuning / probing / supervised training, prediction.

Every loop hands the model each window's availability mask (columns in
``model.modality_names`` order), so a modality marked unavailable is never encoded and the
zeros it carries never reach the loss. ``fit_classifier`` can stop early on a validation
set. ``pretrain`` and ``fit_classifier`` can write their whole training state to a
checkpoint file and resume from it: an interrupted run, resumed, ends with the same weights
as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from crossl_stream.config import AugmentConfig, FinetuneConfig, LossConfig, PretrainConfig
from crossl_stream.errors import CheckpointError, InputError
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.encoder import bf16_conv_faulty
from crossl_stream.model.loss import vicreg_loss
from crossl_stream.model.masking import NO_MASKING, LatentMasker
from crossl_stream.training.augment import Augmenter
from crossl_stream.training.datasets import Windows
from crossl_stream.training.metrics import macro_f1

Mode = Literal["finetune", "probe", "supervised"]
GroupBy = Literal["subject", "session", "recording"]
StepHook = Callable[[int, dict[str, float]], None]
"""Called after every optimiser step with the step number (from 1) and its history entry,
after any checkpoint due at that step has been written."""

CHECKPOINT_FORMAT = "crossl-stream-training/1"
VAL_FRACTION = 0.15

log = logging.getLogger(__name__)
_SAID: set[str] = set()  # warnings given (one per set of faulty layers)


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (weight init, dropout); return a generator for masks and batch order.

    numpy randomness in this package always goes through explicit ``default_rng(seed)``.
    """
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class _BatchStream:
    """Index batches of a fixed size from a permutation of ``n`` items, drawn afresh (from
    ``generator``) whenever fewer than a batch remain; its position goes into checkpoints."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.order = torch.randperm(n, generator=generator)
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.pos + self.batch_size > self.n:
            self.order, self.pos = torch.randperm(self.n, generator=self.generator), 0
        index = self.order[self.pos : self.pos + self.batch_size].numpy()
        self.pos += self.batch_size
        return index

    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.order, self.pos = state["order"], int(state["pos"])


# -- availability ---------------------------------------------------------------------------


def _availability(model: CroSSL, windows: Windows) -> np.ndarray:
    """[N, M] availability of ``windows`` with columns in ``model.modality_names`` order.

    A model modality that ``windows`` do not hold is unavailable in every window.
    """
    keys = list(windows.x)
    unknown = sorted(set(keys) - set(model.modality_names))
    if unknown:
        raise InputError(
            f"windows hold modalities {unknown} that the model lacks; it has {model.modality_names}"
        )
    available = np.asarray(windows.available, dtype=bool)
    if available.shape != (len(windows), len(keys)):
        raise InputError(
            f"windows.available: expected [{len(windows)}, {len(keys)}] (window, modality in "
            f"the order {keys}), got {list(available.shape)}"
        )
    out = np.zeros((len(windows), len(model.modality_names)), dtype=bool)
    for j, name in enumerate(model.modality_names):
        if name in windows.x:
            out[:, j] = available[:, keys.index(name)]
    return out


def _require_usable(available: np.ndarray, what: str) -> None:
    empty = np.flatnonzero(~available.any(axis=1))
    if empty.size:
        raise InputError(
            f"{what}: {empty.size} windows have no available modality (first: "
            f"{empty[:5].tolist()}); keep only usable(windows, modalities) first"
        )


def _tensors(
    windows: Windows,
    index: np.ndarray,
    available: np.ndarray,
    names: Sequence[str] | None = None,
    device: torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch at ``index`` on ``device``: per-modality [B, C, T] inputs (``names``,
    default all) and its [B, M] availability, ``available`` being already in the model's
    modality order."""
    names = list(windows.x) if names is None else names
    x = {k: torch.from_numpy(windows.x[k][index]).to(device) for k in names}
    return x, torch.from_numpy(available[index]).to(device)


def _autocast(model: CroSSL, precision: str) -> torch.autocast:
    """The context of a training forward pass in ``precision`` (``bf16``: autocast to
    bfloat16); made once per run and entered at every step."""
    device = _device(model)
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError(
            f"precision: bf16, but {torch.cuda.get_device_name(device)} has no bfloat16; "
            "set pretrain.precision and finetune.precision to fp32"
        )
    if precision == "bf16":
        faulty = []
        for name, encoder in model.encoders.items():
            for i, block in enumerate(encoder.blocks):
                block.fp32_conv = bf16_conv_faulty(block.conv)
                if block.fp32_conv:
                    faulty.append(f"{name} layer {i + 1} ({block.conv.in_channels} channels in)")
        said = ", ".join(faulty)
        if faulty and said not in _SAID:  # once a process, not once a fold
            _SAID.add(said)
            log.warning(
                "bf16 convolution is wrong on this machine for %s: those convs train in fp32",
                said,
            )
    return torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16")


def _settings(cfg: PretrainConfig | FinetuneConfig, *exclude: str) -> dict[str, Any]:
    """A stage's settings as a checkpoint identity: fp32, the default, is left out so
    that a state written before ``precision`` existed still resumes."""
    skip = set(exclude) | ({"precision"} if cfg.precision == "fp32" else set())
    return cfg.model_dump(mode="json", exclude=skip)


def _device(model: CroSSL) -> torch.device:
    return model.mask_token.device


def usable(windows: Windows, modalities: Sequence[str]) -> np.ndarray:
    """Indices of the windows with at least one of ``modalities`` available.

    >>> x = {"acc": np.zeros((3, 1, 4), np.float32), "gyro": np.zeros((3, 1, 4), np.float32)}
    >>> w = Windows(x, np.zeros(3, int), np.zeros(3, int), np.zeros(3, int),
    ...             available=np.array([[True, True], [True, False], [False, True]]))
    >>> usable(w, ["gyro"]).tolist(), usable(w, ["acc", "gyro"]).tolist()
    ([0, 2], [0, 1, 2])
    """
    keys = list(windows.x)
    unknown = sorted(set(modalities) - set(keys))
    if unknown:
        raise InputError(f"unknown modalities {unknown}; the windows hold {keys}")
    columns = [keys.index(m) for m in modalities]
    return np.flatnonzero(np.asarray(windows.available, dtype=bool)[:, columns].any(axis=1))


# -- validation split -----------------------------------------------------------------------


def validation_split(windows: Windows, by: GroupBy, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices that never split a group of ``by`` across the two sides.

    Groups count where they hold labelled windows (every window, if none is labelled):
    one group (subject, session or recording), drawn with ``seed``, is held out. With a
    single group, whole recordings are held out instead, drawn until they hold 15% of the
    labelled windows; with a single recording, its last 15% of windows by ``t_end`` (one
    contiguous stretch, never scattered windows: neighbours overlap). A recording of fewer
    than two windows leaves the validation side empty.

    >>> w = Windows({"acc": np.zeros((6, 1, 4), np.float32)}, y=np.zeros(6, int),
    ...             subject=np.array([1, 1, 2, 2, 3, 3]), recording=np.arange(6))
    >>> train, val = validation_split(w, "subject", seed=0)
    >>> len(val), set(w.subject[train]) & set(w.subject[val])
    (2, set())
    >>> one = Windows({"acc": np.zeros((10, 1, 4), np.float32)}, np.zeros(10, int),
    ...               np.zeros(10, int), np.zeros(10, int), t_end=np.arange(10.0))
    >>> validation_split(one, "subject", seed=0)[1].tolist()
    [8, 9]
    """
    if by not in ("subject", "session", "recording"):
        raise ValueError(f"validation groups: 'subject', 'session' or 'recording', got {by!r}")
    rng = np.random.default_rng(seed)
    labelled = np.asarray(windows.y) >= 0
    if not labelled.any():
        labelled = np.ones(len(windows), dtype=bool)
    groups = np.asarray(getattr(windows, by))
    groups = groups.astype(str) if groups.dtype == object else groups
    candidates = np.unique(groups[labelled])
    recordings = np.asarray(windows.recording)
    if candidates.size > 1:
        val = groups == candidates[rng.integers(candidates.size)]
    elif np.unique(recordings[labelled]).size > 1:
        val = np.zeros(len(windows), dtype=bool)
        for r in rng.permutation(np.unique(recordings[labelled])):
            grown = val | (recordings == r)
            if labelled[~grown].any():
                val = grown
            if labelled[val].sum() >= VAL_FRACTION * labelled.sum():
                break
    else:
        members = np.flatnonzero(recordings == recordings[labelled][0])
        members = members[np.argsort(np.asarray(windows.t_end)[members], kind="stable")]
        k = min(members.size - 1, max(1, round(VAL_FRACTION * members.size)))
        val = np.zeros(len(windows), dtype=bool)
        val[members[members.size - k :]] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


# -- checkpoints ----------------------------------------------------------------------------


def _digest_arrays(arrays: Sequence[Any]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.asarray(a)
        a = np.ascontiguousarray(a.astype(str) if a.dtype == object else a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _windows_digest(windows: Windows | None) -> str | None:
    if windows is None:
        return None
    return _digest_arrays(
        [
            np.array(list(windows.x)),
            *windows.x.values(),
            windows.y,
            windows.subject,
            windows.recording,
            windows.available,
            windows.session,
            windows.t_end,
        ]
    )


def _model_identity(model: CroSSL) -> dict[str, Any]:
    """Architecture, classes, and a digest of the starting weights other than the class head
    (a fresh head's random start does not make another run; the pretrained body does)."""
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    weights = [v.detach().cpu().numpy() for v in body.values()]
    return {
        "config": model.config.model_dump(mode="json"),
        "modalities": [[m.name, m.channels, m.samples] for m in model.modalities],
        "classes": model.classes,
        "initial_weights": _digest_arrays([np.array(list(body)), *weights]),
    }


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in _differences(a, b)]
        else:
            out.append(key)
    return out


class _Checkpoint:
    """One training checkpoint file, tied to the run it was written for.

    Everything in it loads with ``torch.load(..., weights_only=True)``: tensors, numbers,
    strings, and the history as JSON text.
    """

    def __init__(self, path: str | Path, kind: str, identity: dict[str, Any]) -> None:
        self.path = Path(path)
        self.identity = json.loads(json.dumps({"kind": kind, **identity}, sort_keys=True))

    def load(self) -> dict[str, Any] | None:
        """The saved state, None if there is no file; CheckpointError if it is another run's."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            saved = (
                json.loads(state["identity"]) if state.get("format") == CHECKPOINT_FORMAT else None
            )
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{self.path}: not a readable training checkpoint ({exc})"
            ) from exc
        except (AttributeError, KeyError, TypeError):
            saved = None
        if not isinstance(saved, dict):
            raise CheckpointError(f"{self.path}: not a crossl-stream training checkpoint")
        differ = _differences(saved, self.identity)
        if differ:
            raise CheckpointError(
                f"{self.path}: checkpoint of a different run (differs in {', '.join(differ)}); "
                "delete it (crossl-stream: --fresh) to start afresh, or write elsewhere"
            )
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write ``state`` atomically: a temporary file in the same folder, then a rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        payload = {
            "format": CHECKPOINT_FORMAT,
            "identity": json.dumps(self.identity, sort_keys=True),
            **state,
        }
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def restore_model(self, model: CroSSL, weights: dict[str, torch.Tensor]) -> None:
        try:
            model.load_state_dict(weights)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{self.path}: weights do not fit the model ({exc})") from exc


# -- pretraining ----------------------------------------------------------------------------


def expander(embed_dim: int, widths: Sequence[int]) -> torch.nn.Module:
    """VICReg's expander: Linear-BatchNorm-ReLU blocks, then a last Linear; identity if
    ``widths`` is empty.

    >>> expander(32, [128, 128])(torch.zeros(4, 32)).shape
    torch.Size([4, 128])
    """
    if not widths:
        return torch.nn.Identity()
    layers: list[torch.nn.Module] = []
    width_in = embed_dim
    for i, width in enumerate(widths):
        layers.append(torch.nn.Linear(width_in, width))
        if i < len(widths) - 1:
            layers += [torch.nn.BatchNorm1d(width), torch.nn.ReLU()]
        width_in = width
    return torch.nn.Sequential(*layers)


def augmenter(model: CroSSL, cfg: AugmentConfig | None) -> Augmenter | None:
    """An Augmenter sized by ``model``'s normalisation, or None when ``cfg`` does nothing."""
    if cfg is None or not cfg.active:
        return None
    names = model.modality_names
    spread = {n: getattr(model, f"norm_std_{n}").detach().cpu() for n in names}
    centre = {n: getattr(model, f"norm_mean_{n}").detach().cpu() for n in names}
    return Augmenter(cfg, spread, centre)


def pretrain(
    model: CroSSL,
    windows: Windows,
    masker: LatentMasker,
    cfg: PretrainConfig,
    loss_cfg: LossConfig,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    every: int = 50,
    on_step: StepHook | None = None,
) -> list[dict[str, float]]:
    """VICReg on two independently masked (and, per ``cfg.augment``, augmented) views of
    each batch, seen through ``cfg.expander``; labels are not used. The expander is dropped
    afterwards: ``model`` keeps what it learned.

    With ``checkpoint``, the training state is written there every ``every`` steps and at the
    end (marked complete); a run that finds the file resumes from it, or, if it is complete,
    loads the final weights and returns at once. A checkpoint of another run (model,
    config, seed, data or starting weights differ) raises CheckpointError.

    Returns the per-step history (loss and its three parts).
    """
    if every < 1:
        raise ValueError(f"checkpoint interval must be at least one step, got {every}")
    available = _availability(model, windows)
    _require_usable(available, "pretrain")
    generator = seed_everything(seed)
    ckpt = None
    if checkpoint is not None:
        run = {
            "pretrain": _settings(cfg),
            "loss": loss_cfg.model_dump(mode="json"),
            "masker": [masker.strategy, masker.keep],
            "seed": seed,
            "data": _windows_digest(windows),
        }
        ckpt = _Checkpoint(checkpoint, "pretrain", {"model": _model_identity(model), "run": run})
    batch = min(cfg.batch_size, len(windows))
    head = expander(model.config.embed_dim, cfg.expander).to(model.mask_token.device)
    aug = augmenter(model, cfg.augment)
    params = [*model.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1))
    stream = _BatchStream(len(windows), batch, generator)
    history: list[dict[str, float]] = []
    step = 0
    model.train()
    head.train()
    state = ckpt.load() if ckpt else None
    if state is not None:
        ckpt.restore_model(model, state["model"])
        history = json.loads(state["history"])
        if state["complete"]:
            return history
        head.load_state_dict(state["expander"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        stream.load_state_dict(state["batches"])
        _set_rng_state(state["rng"], generator)
        step = int(state["step"])

    def snapshot(complete: bool) -> dict[str, Any]:
        out = {"complete": complete, "step": step, "model": model.state_dict()}
        out["history"] = json.dumps(history)
        if not complete:
            out["optimizer"], out["scheduler"] = opt.state_dict(), sched.state_dict()
            out["batches"], out["rng"] = stream.state_dict(), _rng_state(generator)
            out["expander"] = head.state_dict()
        return out

    autocast = _autocast(model, cfg.precision)

    def view(x: dict[str, torch.Tensor], avail: torch.Tensor) -> torch.Tensor:
        if aug is not None:
            x = aug(x, avail, generator)
        with autocast:
            out = head(model(x, avail, masker=masker, generator=generator).embedding)
        return out.float()  # the loss's statistics in fp32

    with tqdm(
        total=cfg.steps, initial=step, desc="pretrain", disable=not progress, leave=False
    ) as bar:
        while step < cfg.steps:
            x, avail = _tensors(windows, stream.next(), available, device=_device(model))
            a, b = view(x, avail), view(x, avail)
            loss, parts = vicreg_loss(
                a, b, loss_cfg.invariance, loss_cfg.variance, loss_cfg.covariance
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            history.append({"loss": float(loss.detach()), **parts})
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            if ckpt and step % every == 0 and step < cfg.steps:
                ckpt.save(snapshot(complete=False))
            if on_step:
                on_step(step, history[-1])
    if ckpt:
        ckpt.save(snapshot(complete=True))
    return history


# -- supervised training --------------------------------------------------------------------


def supervised_steps(n: int, cfg: FinetuneConfig) -> int:
    """Optimiser steps for ``n`` labelled windows under ``cfg`` (without a validation set)."""
    per_epoch = math.ceil(n / cfg.batch_size)
    return int(min(cfg.max_steps, max(cfg.min_steps, cfg.epochs * per_epoch)))


def epoch_steps(n: int, cfg: FinetuneConfig) -> int:
    """Steps in one epoch of ``n`` labelled windows: a pass, at least ``min_epoch_steps``."""
    return max(cfg.min_epoch_steps, math.ceil(n / min(cfg.batch_size, n)))


@dataclass
class FitResult:
    """What ``fit_classifier`` did.

    ``history`` has one entry per optimiser step (``loss``, batch ``accuracy``); with a
    validation set, the last step of each epoch also carries ``epoch`` (from 1), ``val_f1``
    (macro-F1) and ``val_loss`` (cross-entropy). ``stopped`` is ``"patience"`` or
    ``"max_epochs"`` with a validation set, ``"steps"`` (the fixed budget) without.
    ``best_epoch`` is the epoch whose weights the model ends with (None without validation).
    """

    history: list[dict[str, float]]
    stopped: str
    steps: int
    epochs: int = 0
    best_epoch: int | None = None
    best_val_f1: float | None = None
    best_val_loss: float | None = None

    @property
    def validation(self) -> list[dict[str, float]]:
        """The per-epoch history entries (those carrying the validation scores)."""
        return [h for h in self.history if "val_f1" in h]


def _labelled(windows: Windows, what: str) -> Windows:
    index = np.flatnonzero(np.asarray(windows.y) >= 0)
    if index.size == 0:
        raise InputError(f"{what}: no labelled window (y >= 0)")
    return windows if index.size == len(windows) else windows.take(index)


@torch.no_grad()
def _validate(
    model: CroSSL,
    val: Windows,
    available: np.ndarray,
    features: torch.Tensor | None,
    batch_size: int = 1024,
    alone: bool = False,
) -> tuple[float, float]:
    """(macro-F1, mean cross-entropy) on ``val``; ``features``: fixed embeddings (probe).

    ``alone``: the macro-F1 is the mean of the F1 with every available modality and the F1
    with each modality alone (on the windows that have it); the loss stays the full one."""
    f1, loss = _validate_with(model, val, available, features, batch_size)
    names = model.modality_names
    if not alone or features is not None or len(names) < 2:
        return f1, loss
    scores = [f1]
    for j in range(len(names)):
        rows = np.flatnonzero(available[:, j])
        if len(rows):
            only = np.zeros_like(available[rows])
            only[:, j] = True
            scores.append(_validate_with(model, val.take(rows), only, None, batch_size)[0])
    return float(np.mean(scores)), loss


def _validate_with(
    model: CroSSL,
    val: Windows,
    available: np.ndarray,
    features: torch.Tensor | None,
    batch_size: int,
) -> tuple[float, float]:
    if features is not None:
        logits = model.head(features)
    else:
        was_training = model.training
        model.eval()
        logits = torch.cat(
            [
                model(
                    *_tensors(
                        val,
                        np.arange(i, min(i + batch_size, len(val))),
                        available,
                        None,
                        _device(model),
                    )
                ).logits
                for i in range(0, len(val), batch_size)
            ]
        )
        model.train(was_training)
    y = torch.from_numpy(np.asarray(val.y)).long().to(logits.device)
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    f1 = macro_f1(val.y, logits.argmax(dim=1).cpu().numpy(), len(model.classes))
    return f1, loss


def fit_classifier(
    model: CroSSL,
    windows: Windows,
    mode: Mode,
    cfg: FinetuneConfig,
    masker: LatentMasker = NO_MASKING,
    seed: int = 0,
    progress: bool = True,
    val: Windows | None = None,
    checkpoint: str | Path | None = None,
    on_step: StepHook | None = None,
    augment: AugmentConfig | None = None,
) -> FitResult:
    """Train the class head (``probe``) or the whole model (``finetune``, ``supervised``).

    ``probe`` freezes the pretrained model and trains the head on its fixed embeddings.
    ``finetune`` and ``supervised`` train everything with cross-entropy; ``masker`` applies
    modality dropout or other latent masking; ``augment`` adds signal augmentations to
    their inputs. Only labelled windows (``y >= 0``) are used.

    Without ``val``: ``supervised_steps`` steps under a one-cycle schedule. With ``val``:
    epochs of ``epoch_steps`` steps, each followed by scoring the labelled ``val`` windows;
    the best epoch (highest macro-F1, then lowest loss) is kept in memory, training stops
    after ``cfg.patience`` epochs without a better one or at ``cfg.max_epochs``, and the
    model ends with the best epoch's weights.

    With ``checkpoint``, the whole training state (weights, optimiser, schedule, batch order,
    random states, early-stopping state, history) is written there at the end of every epoch
    and when done (marked complete); see ``pretrain`` for resuming.
    """
    windows = _labelled(windows, mode)
    available = _availability(model, windows)
    _require_usable(available, mode)
    n_classes = len(model.classes)
    if int(np.max(windows.y)) >= n_classes:
        raise InputError(f"labels up to {int(np.max(windows.y))} for {n_classes} classes")
    val_available = None
    if val is not None:
        val = _labelled(val, f"{mode} validation set")
        val_available = _availability(model, val)
        _require_usable(val_available, f"{mode} validation set")
        if int(np.max(val.y)) >= n_classes:
            raise InputError(
                f"validation labels up to {int(np.max(val.y))} for {n_classes} classes"
            )
    generator = seed_everything(seed)
    ckpt = None
    if checkpoint is not None:
        run = {
            # fallbacks: whether `train` adds other models after this one, not how it trains
            "finetune": _settings(cfg, "fallbacks"),
            "masker": [masker.strategy, masker.keep],
            "augment": augment.model_dump(mode="json") if augment else None,
            "seed": seed,
            "data": _windows_digest(windows),
            "validation": _windows_digest(val),
        }
        identity = {"model": _model_identity(model), "run": run}
        ckpt = _Checkpoint(checkpoint, f"fit_classifier:{mode}", identity)

    n = len(windows)
    batch = min(cfg.batch_size, n)
    per_epoch = epoch_steps(n, cfg)
    y_all = torch.from_numpy(np.asarray(windows.y)).long().to(_device(model))
    features = val_features = None
    aug = augmenter(model, augment) if mode != "probe" else None
    autocast = _autocast(model, cfg.precision)
    try:
        if mode == "probe":
            for p in model.parameters():
                p.requires_grad_(False)
            model.head.reset_parameters()
            for p in model.head.parameters():
                p.requires_grad_(True)
            features = embed(model, windows)
            val_features = embed(model, val) if val is not None else None
            params, lr = list(model.head.parameters()), cfg.probe_lr
        else:
            params, lr = list(model.parameters()), cfg.lr
            model.train()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        if val is None:
            total = supervised_steps(n, cfg)
            sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=lr, total_steps=total
            )
        else:
            total = cfg.max_epochs * per_epoch
            # Constant LR after a one-epoch linear warm-up: no step's LR depends on where
            # patience will stop, so every epoch's weights are scored on equal terms.
            sched = torch.optim.lr_scheduler.LinearLR(
                opt, start_factor=1.0 / per_epoch, end_factor=1.0, total_iters=per_epoch
            )
        stream = _BatchStream(n, batch, generator)
        history: list[dict[str, float]] = []
        t = {"step": 0, "epoch": 0, "bad": 0, "best_epoch": None}
        t.update(best_f1=-math.inf, best_loss=math.inf)
        best: dict[str, torch.Tensor] | None = None
        stopped = ""

        def result() -> FitResult:
            found = t["best_epoch"] is not None
            return FitResult(
                history=history,
                stopped=stopped,
                steps=t["step"],
                epochs=t["epoch"],
                best_epoch=t["best_epoch"],
                best_val_f1=t["best_f1"] if found else None,
                best_val_loss=t["best_loss"] if found else None,
            )

        def snapshot(complete: bool) -> dict[str, Any]:
            out = {"complete": complete, "stopped": stopped, "model": model.state_dict(), **t}
            out["history"] = json.dumps(history)
            if not complete:
                out["optimizer"], out["scheduler"] = opt.state_dict(), sched.state_dict()
                out["batches"], out["rng"] = stream.state_dict(), _rng_state(generator)
                out["best"] = best
            return out

        state = ckpt.load() if ckpt else None
        if state is not None:
            ckpt.restore_model(model, state["model"])
            history = json.loads(state["history"])
            t.update({k: state[k] for k in t})
            stopped = state["stopped"]
            if state["complete"]:
                return result()
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            stream.load_state_dict(state["batches"])
            _set_rng_state(state["rng"], generator)
            best = state["best"]

        with tqdm(
            total=total, initial=t["step"], desc=mode, disable=not progress, leave=False
        ) as bar:
            postfix: dict[str, Any] = {}
            while not stopped:
                index = stream.next()
                y = y_all[index]
                if features is not None:
                    logits = model.head(features[index])
                else:
                    x, avail = _tensors(windows, index, available, device=_device(model))
                    if aug is not None:
                        x = aug(x, avail, generator)
                    with autocast:
                        logits = model(x, avail, masker=masker, generator=generator).logits
                    logits = logits.float()
                loss = torch.nn.functional.cross_entropy(logits, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                t["step"] += 1
                record = {
                    "loss": float(loss.detach()),
                    "accuracy": float((logits.argmax(dim=1) == y).float().mean()),
                }
                history.append(record)
                bar.update(1)
                epoch_end = t["step"] % per_epoch == 0
                if val is None:
                    stopped = "steps" if t["step"] >= total else ""
                elif epoch_end:
                    t["epoch"] += 1
                    f1, val_loss = _validate(
                        model, val, val_available, val_features, alone=cfg.validate_alone
                    )
                    record.update(epoch=t["epoch"], val_f1=f1, val_loss=val_loss)
                    if (f1, -val_loss) > (t["best_f1"], -t["best_loss"]):
                        t.update(best_f1=f1, best_loss=val_loss, best_epoch=t["epoch"], bad=0)
                        best = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    else:
                        t["bad"] += 1
                    if t["bad"] >= cfg.patience:
                        stopped = "patience"
                    elif t["epoch"] >= cfg.max_epochs:
                        stopped = "max_epochs"
                    postfix.update(epoch=t["epoch"], val_f1=f"{f1:.3f}")
                    postfix["best"] = f"{t['best_f1']:.3f}@{t['best_epoch']}"
                postfix["loss"] = f"{record['loss']:.3f}"
                bar.set_postfix(postfix)
                if stopped and best is not None:
                    model.load_state_dict(best)
                if ckpt and (stopped or epoch_end):
                    ckpt.save(snapshot(complete=bool(stopped)))
                if on_step:
                    on_step(t["step"], record)
        return result()
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()


# -- inference ------------------------------------------------------------------------------


@torch.inference_mode()
def embed(model: CroSSL, windows: Windows, batch_size: int = 1024) -> torch.Tensor:
    """Window embeddings [N, E] in eval mode, each window with its available modalities."""
    model.eval()
    available = _availability(model, windows)
    _require_usable(available, "embed")
    out = [
        model(
            *_tensors(
                windows,
                np.arange(i, min(i + batch_size, len(windows))),
                available,
                device=_device(model),
            )
        ).embedding
        for i in range(0, len(windows), batch_size)
    ]
    if not out:
        return torch.zeros(0, model.config.embed_dim, device=_device(model))
    return torch.cat(out).clone()


@torch.inference_mode()
def predict(
    model: CroSSL,
    windows: Windows,
    modalities: Sequence[str] | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Class probabilities [N, K] in eval mode.

    Each window uses the modalities available in it; ``modalities`` further limits them to
    those named, as if the others were missing. A window left with none raises InputError:
    select the windows with ``usable(windows, modalities)`` first.
    """
    model.eval()
    available = _availability(model, windows)
    names = [n for n in model.modality_names if n in windows.x]
    if modalities is not None:
        unknown = sorted(set(modalities) - set(model.modality_names))
        if unknown:
            raise InputError(f"unknown modalities {unknown}; this model has {model.modality_names}")
        available &= np.array([n in modalities for n in model.modality_names])
        names = [n for n in names if n in modalities]
    _require_usable(available, f"predict with modalities {list(modalities or names)}")
    out = [
        model(
            *_tensors(
                windows,
                np.arange(i, min(i + batch_size, len(windows))),
                available,
                names,
                _device(model),
            )
        )
        .probs.cpu()
        .numpy()
        for i in range(0, len(windows), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, len(model.classes)), dtype=np.float32)
