"""Signal augmentations for wearable windows: gain, noise, 3-D rotation, time warp.

They act on the raw [B, C, T] inputs, before the model's normalisation, so a rotation turns
the physical 3-axis vector and noise is sized by each channel's spread. Every draw comes
from the caller's generator: the same seed gives the same views.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from crossl_stream.config import AugmentConfig
from crossl_stream.errors import ConfigError


def random_rotations(n: int, max_deg: float, generator: torch.Generator) -> torch.Tensor:
    """[n, 3, 3] rotations about uniformly random axes by angles uniform in ±``max_deg``.

    >>> r = random_rotations(4, 30.0, torch.Generator().manual_seed(0))
    >>> torch.allclose(r @ r.transpose(1, 2), torch.eye(3).expand(4, 3, 3), atol=1e-6)
    True
    """
    axis = torch.randn(n, 3, generator=generator)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(max_deg)
    kx, ky, kz = axis.unbind(1)
    zero = torch.zeros_like(kx)
    k = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero], dim=1).view(n, 3, 3)
    s, c = angle.sin()[:, None, None], angle.cos()[:, None, None]
    return torch.eye(3).expand(n, 3, 3) + s * k + (1 - c) * (k @ k)


def warp_positions(n: int, knots: int, strength: float, generator: torch.Generator) -> torch.Tensor:
    """[n, 1 + knots + 1] displacements of a smooth warp at evenly spaced knots, as a fraction
    of the window, zero at both ends; at most ``strength`` in size."""
    inner = (torch.rand(n, knots, generator=generator) * 2 - 1) * strength
    zero = torch.zeros(n, 1)
    return torch.cat([zero, inner, zero], dim=1)


def _warp(x: torch.Tensor, knots: torch.Tensor) -> torch.Tensor:
    """Resample [B, C, T] at positions t + d(t), d linear between ``knots`` [B, K]."""
    b, _, t = x.shape
    grid = torch.linspace(0, 1, t, device=x.device)
    k = knots.shape[1] - 1
    seg = (grid * k).clamp(max=k - 1e-6)
    i = seg.floor().long()
    frac = seg - i
    d = knots[:, i] * (1 - frac) + knots[:, i + 1] * frac  # [B, T]
    pos = ((grid + d) * (t - 1)).clamp(0, t - 1)
    lo = pos.floor().long().clamp(max=t - 2) if t > 1 else pos.floor().long()
    w = (pos - lo).unsqueeze(1)
    lo = lo.unsqueeze(1).expand(b, x.shape[1], t)
    if t == 1:
        return x
    return x.gather(2, lo) * (1 - w) + x.gather(2, lo + 1) * w


class Augmenter:
    """Owns one ``AugmentConfig`` and the channel spreads that size the noise.

    ``spread``: per modality, in the model's modality order, the per-channel standard
    deviation of the training data (the model's normalisation); ``centre``: the per-channel
    mean, around which the gain is applied, so that a sensor's offset (an ADC's mid-scale,
    say) is not scaled with the signal (default: zero). ``available`` has its columns in
    that order; a modality's unavailable rows are left as they are.

    >>> cfg = AugmentConfig(scale=0.1, jitter=0.05, rotate_deg=20, time_warp=0.05)
    >>> aug = Augmenter(cfg, {"acc": torch.ones(3)})
    >>> x = {"acc": torch.randn(8, 3, 100)}
    >>> aug(x, torch.ones(8, 1, dtype=torch.bool), torch.Generator().manual_seed(0))["acc"].shape
    torch.Size([8, 3, 100])
    """

    KNOTS = 2

    def __init__(
        self,
        cfg: AugmentConfig,
        spread: Mapping[str, torch.Tensor],
        centre: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spread = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in spread.items()}
        centre = centre or {}
        self.centre = {
            k: torch.as_tensor(centre.get(k, torch.zeros_like(v)), dtype=torch.float32)
            for k, v in self.spread.items()
        }
        named = cfg.vectors
        if named is None:
            named = tuple(k for k, v in self.spread.items() if v.numel() == 3)
        wrong = [k for k in named if k not in self.spread or self.spread[k].numel() != 3]
        if wrong:
            raise ConfigError(
                f"augment.vectors: {wrong} are not 3-channel modalities of this model "
                f"({ {k: v.numel() for k, v in self.spread.items()} } channels)"
            )
        if cfg.rotate_deg and not named:
            raise ConfigError(
                "augment.rotate_deg: no modality to rotate (none has 3 channels); set it to 0"
            )
        self.vectors = set(named)

    def __call__(
        self,
        x: Mapping[str, torch.Tensor],
        available: torch.Tensor,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """Augmented copies of the inputs."""
        cfg = self.cfg
        out = dict(x)
        if not cfg.active or not out:
            return out
        first = next(iter(out.values()))
        b, device = first.shape[0], first.device
        # every draw on the CPU from ``generator`` (the same views on any device), then moved
        rotation = random_rotations(b, cfg.rotate_deg, generator) if cfg.rotate_deg else None
        knots = warp_positions(b, self.KNOTS, cfg.time_warp, generator) if cfg.time_warp else None
        rotation = rotation.to(device) if rotation is not None else None
        knots = knots.to(device) if knots is not None else None
        order = list(self.spread)
        for name, v in x.items():
            j, c = order.index(name), v.shape[1]
            if rotation is not None and name in self.vectors:
                v = rotation @ v
            if cfg.scale:
                gain = 1 + cfg.scale * torch.randn(b, c, 1, generator=generator).to(device)
                centre = self.centre[name].view(1, c, 1).to(device)
                v = centre + (v - centre) * gain
            if knots is not None:
                v = _warp(v, knots)
            if cfg.jitter:
                spread = self.spread[name].view(1, c, 1).to(device)
                noise = torch.randn(v.shape, generator=generator).to(device)
                v = v + cfg.jitter * spread * noise
            out[name] = torch.where(available[:, j].view(b, 1, 1), v, x[name])
        return out
