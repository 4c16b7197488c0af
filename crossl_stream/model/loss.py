"""VICReg loss between two views' embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def vicreg_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    invariance: float = 10.0,
    variance: float = 10.0,
    covariance: float = 100.0,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Variance-invariance-covariance loss of two [N, E] embeddings; returns (loss, parts).

    >>> x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    >>> loss, parts = vicreg_loss(x, x)
    >>> parts["invariance"]
    0.0
    """
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] < 2:
        raise ValueError(f"vicreg_loss needs two [N>=2, E] embeddings, got {tuple(a.shape)}")
    n, dim = a.shape
    inv = F.mse_loss(a, b)
    var = 0.0
    cov = 0.0
    for z in (a, b):
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + eps)
        var = var + F.relu(1.0 - std).mean() / 2
        c = (z.T @ z) / (n - 1)
        off_diagonal = c - torch.diag(torch.diagonal(c))
        cov = cov + off_diagonal.pow(2).sum() / dim
    loss = invariance * inv + variance * var + covariance * cov
    parts = {
        k: float(v.detach())
        for k, v in (("invariance", inv), ("variance", var), ("covariance", cov))
    }
    return loss, parts
