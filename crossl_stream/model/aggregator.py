"""Aggregators: many modality latents [B, M, D] -> one window embedding [B, E]."""

from __future__ import annotations

import torch
from torch import nn


class MLPAggregator(nn.Module):
    """The reference aggregator: an MLP over the concatenated latents (-> 64 -> 32 -> E).

    A masked modality enters as the model's learned mask token, so the MLP sees a fixed-size
    input whatever is available.

    >>> agg = MLPAggregator(n_modalities=2, latent_dim=96, embed_dim=32)
    >>> agg(torch.zeros(4, 2, 96), torch.ones(4, 2, dtype=torch.bool)).shape
    torch.Size([4, 32])
    """

    def __init__(self, n_modalities: int, latent_dim: int, embed_dim: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_modalities * latent_dim, 64),
            nn.LayerNorm(64),
            nn.PReLU(),
            nn.Linear(64, 32),
            nn.LayerNorm(32),
            nn.PReLU(),
            nn.Linear(32, embed_dim),
        )

    def forward(self, latents: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        return self.net(latents.flatten(1))


class AttentionAggregator(nn.Module):
    """Mask-aware aggregator: a class token attends over modality tokens.

    Hidden modalities are key padding, so they take no part at all (no mask token needed).

    >>> agg = AttentionAggregator(n_modalities=2, latent_dim=96, embed_dim=32)
    >>> vis = torch.tensor([[True, False], [True, True]])
    >>> agg(torch.zeros(2, 2, 96), vis).shape
    torch.Size([2, 32])
    """

    def __init__(
        self,
        n_modalities: int,
        latent_dim: int,
        embed_dim: int = 32,
        width: int = 64,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.project = nn.Linear(latent_dim, width)
        self.modality_embedding = nn.Parameter(torch.randn(n_modalities, width) * 0.02)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=2 * width,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, embed_dim))

    def forward(self, latents: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        tokens = self.project(latents) + self.modality_embedding
        cls = self.cls.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1)
        padding = torch.cat([torch.zeros_like(visible[:, :1]), ~visible], dim=1)
        return self.out(self.encoder(tokens, src_key_padding_mask=padding)[:, 0])


AGGREGATORS = {"mlp": MLPAggregator, "attention": AttentionAggregator}
