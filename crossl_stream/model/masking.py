"""Latent masking: the views CroSSL learns from, and the masks streaming inference applies.

Three strategies, each with a keep probability:

- ``spatial``: a whole modality latent is hidden (per window and modality); at least one
  available modality is always kept.
- ``random``: single latent elements are hidden.
- ``temporal``: one contiguous span of ``1 - keep`` of the encoder's time steps is hidden per
  window and modality, before pooling (the reference applied it after pooling, where there is
  no time axis left).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Strategy = Literal["spatial", "random", "temporal", "none"]


@dataclass(frozen=True)
class LatentMasker:
    """Draws masks for one strategy and keep probability.

    >>> g = torch.Generator().manual_seed(0)
    >>> m = LatentMasker("spatial", keep=0.5).modality_mask(torch.ones(4, 2, dtype=torch.bool), g)
    >>> bool(m.any(dim=1).all())
    True
    """

    strategy: Strategy = "spatial"
    keep: float = 0.9

    def __post_init__(self) -> None:
        if self.strategy not in ("spatial", "random", "temporal", "none"):
            raise ValueError(f"unknown masking strategy {self.strategy!r}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"masking keep probability must be in (0, 1], got {self.keep}")

    def modality_mask(self, available: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """[B, M] bool: available modalities that stay visible in this view."""
        if self.strategy != "spatial" or self.keep >= 1.0:
            return available
        draw = torch.rand(available.shape, generator=generator, device="cpu")
        kept = available & (draw.to(available.device) < self.keep)
        # Never hide everything: where all were dropped, keep one available modality at random.
        empty = ~kept.any(dim=1) & available.any(dim=1)
        if empty.any():
            scores = torch.rand(available.shape, generator=generator).to(available.device)
            scores = torch.where(available, scores, torch.full_like(scores, -1.0))
            pick = torch.nn.functional.one_hot(scores.argmax(dim=1), available.shape[1]).bool()
            kept = torch.where(empty.unsqueeze(1), pick, kept)
        return kept

    def element_mask(
        self, shape: tuple[int, int, int], generator: torch.Generator, device: torch.device
    ) -> torch.Tensor | None:
        """[B, M, D] bool of latent elements kept, or None when this strategy hides none."""
        if self.strategy != "random" or self.keep >= 1.0:
            return None
        return (torch.rand(shape, generator=generator) < self.keep).to(device)

    def time_mask(
        self, batch: int, steps: int, generator: torch.Generator, device: torch.device
    ) -> torch.Tensor | None:
        """[B, T] bool of encoder time steps kept, or None when this strategy hides none."""
        if self.strategy != "temporal" or self.keep >= 1.0:
            return None
        span = min(steps - 1, round((1.0 - self.keep) * steps))
        if span <= 0:
            return None
        start = torch.randint(0, steps - span + 1, (batch, 1), generator=generator)
        t = torch.arange(steps).unsqueeze(0)
        return (~((t >= start) & (t < start + span))).to(device)


NO_MASKING = LatentMasker("none", keep=1.0)
