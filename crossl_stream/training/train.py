"""Training loops: SSL pretraining, fine-tuning / probing / supervised training, prediction."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from crossl_stream.config import FinetuneConfig, LossConfig, PretrainConfig
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.loss import vicreg_loss
from crossl_stream.model.masking import NO_MASKING, LatentMasker
from crossl_stream.training.datasets import Windows

Mode = Literal["finetune", "probe", "supervised"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed torch (weight init, dropout); return a generator for masks and batch order.

    numpy randomness in this package always goes through explicit ``default_rng(seed)``.
    """
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` index batches, reshuffling each pass over ``n`` items."""
    order = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size].numpy()
        pos += batch_size


def _tensors(windows: Windows, index: np.ndarray) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v[index]) for k, v in windows.x.items()}


def pretrain(
    model: CroSSL,
    windows: Windows,
    masker: LatentMasker,
    cfg: PretrainConfig,
    loss_cfg: LossConfig,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """VICReg on two independently masked views of each batch; labels are not used.

    Returns the per-step history (loss and its three parts).
    """
    generator = seed_everything(seed)
    batch = min(cfg.batch_size, len(windows))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=max(cfg.steps, 1))
    model.train()
    history = []
    bar = tqdm(
        _batches(len(windows), batch, cfg.steps, generator),
        total=cfg.steps,
        desc="pretrain",
        disable=not progress,
        leave=False,
    )
    for index in bar:
        x = _tensors(windows, index)
        a = model(x, masker=masker, generator=generator).embedding
        b = model(x, masker=masker, generator=generator).embedding
        loss, parts = vicreg_loss(a, b, loss_cfg.invariance, loss_cfg.variance, loss_cfg.covariance)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append({"loss": float(loss.detach()), **parts})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    return history


def supervised_steps(n: int, cfg: FinetuneConfig) -> int:
    """Optimiser steps for ``n`` labelled windows under ``cfg``."""
    per_epoch = math.ceil(n / cfg.batch_size)
    return int(min(cfg.max_steps, max(cfg.min_steps, cfg.epochs * per_epoch)))


def fit_classifier(
    model: CroSSL,
    windows: Windows,
    mode: Mode,
    cfg: FinetuneConfig,
    masker: LatentMasker = NO_MASKING,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train the class head (``probe``) or the whole model (``finetune``, ``supervised``).

    ``probe`` freezes the pretrained model and trains the head on its fixed embeddings.
    ``finetune`` and ``supervised`` train everything with cross-entropy; ``masker`` applies
    latent masking as augmentation. Returns per-step loss and batch accuracy.
    """
    generator = seed_everything(seed)
    y_all = torch.from_numpy(windows.y).long()
    steps = supervised_steps(len(windows), cfg)
    batch = min(cfg.batch_size, len(windows))
    history = []
    if mode == "probe":
        for p in model.parameters():
            p.requires_grad_(False)
        model.head.reset_parameters()
        for p in model.head.parameters():
            p.requires_grad_(True)
        features = embed(model, windows)
        opt = torch.optim.AdamW(
            model.head.parameters(), lr=cfg.probe_lr, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        model.train()
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps
    )
    bar = tqdm(
        _batches(len(windows), batch, steps, generator),
        total=steps,
        desc=mode,
        disable=not progress,
        leave=False,
    )
    for index in bar:
        y = y_all[index]
        if mode == "probe":
            logits = model.head(features[index])
        else:
            logits = model(_tensors(windows, index), masker=masker, generator=generator).logits
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc = float((logits.argmax(dim=1) == y).float().mean())
        history.append({"loss": float(loss.detach()), "accuracy": acc})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history


@torch.inference_mode()
def embed(model: CroSSL, windows: Windows, batch_size: int = 1024) -> torch.Tensor:
    """Window embeddings [N, E] in eval mode with every modality available."""
    model.eval()
    out = [
        model(_tensors(windows, np.arange(i, min(i + batch_size, len(windows))))).embedding
        for i in range(0, len(windows), batch_size)
    ]
    return torch.cat(out).clone()


@torch.inference_mode()
def predict(
    model: CroSSL,
    windows: Windows,
    modalities: list[str] | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Class probabilities [N, K]; ``modalities`` limits which are available at inference."""
    model.eval()
    keep = modalities or model.modality_names
    out = []
    for i in range(0, len(windows), batch_size):
        index = np.arange(i, min(i + batch_size, len(windows)))
        x = {k: v for k, v in _tensors(windows, index).items() if k in keep}
        out.append(model(x).probs.cpu().numpy())
    return np.concatenate(out)
