"""Per-modality convolutional encoder from the CroSSL reference code."""

from __future__ import annotations

import torch
from torch import nn


class _ConvBlock(nn.Module):
    """Conv1d (valid) -> LayerNorm over channels at each time step -> PReLU -> Dropout.

    ``fp32_conv`` (set by training when ``bf16_conv_faulty``) runs the conv in float32
    under autocast.
    """

    fp32_conv = False

    def __init__(self, in_channels: int, out_channels: int, kernel: int, dropout: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel)
        self.norm_weight = nn.Parameter(torch.ones(out_channels, 1))
        self.norm_bias = nn.Parameter(torch.zeros(out_channels, 1))
        self.act = nn.PReLU(out_channels)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_conv and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                x = self.conv(x.float())
        else:
            x = self.conv(x)
        # LayerNorm over the channel axis at each step: the fused kernel on a [B, T, C] view
        # (about twice as fast to train on a CPU as var_mean over the channel axis).
        x = nn.functional.layer_norm(
            x.transpose(1, 2),
            (x.shape[1],),
            self.norm_weight[:, 0],
            self.norm_bias[:, 0],
            1e-5,
        ).transpose(1, 2)
        x = self.act(x)
        if self.training and self.drop.p > 0:
            # the same inverted dropout as nn.Dropout; a uniform draw is cheaper than its
            # bernoulli_ on a CPU
            keep = torch.rand(x.shape, device=x.device) >= self.drop.p
            return x * keep.to(x.dtype) * (1.0 / (1.0 - self.drop.p))
        return x


class ConvEncoder(nn.Module):
    """Owns one modality's three conv blocks; maps [B, C, T] to a feature map [B, D, T'].

    Widths are code/4, code/2, code with kernels 24, 16, 8 and no padding, as in the
    reference, so T' = T - 45 for the default kernels; temporal masking acts on T'.

    >>> enc = ConvEncoder(in_channels=3, code_size=96)
    >>> enc(torch.zeros(2, 3, 100)).shape
    torch.Size([2, 96, 55])
    """

    def __init__(
        self,
        in_channels: int,
        code_size: int = 96,
        kernels: tuple[int, int, int] = (24, 16, 8),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        widths = (code_size // 4, code_size // 2, code_size)
        blocks, width_in = [], in_channels
        for width, kernel in zip(widths, kernels, strict=True):
            blocks.append(_ConvBlock(width_in, width, kernel, dropout))
            width_in = width
        self.blocks = nn.Sequential(*blocks)

    @staticmethod
    def receptive_field(kernels: tuple[int, ...]) -> int:
        """Fewest input samples that give one output step (46 for kernels 24, 16, 8)."""
        return sum(k - 1 for k in kernels) + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def bf16_conv_faulty(conv: nn.Conv1d) -> bool:
    """Whether this machine's bfloat16 convolution gets convs of ``conv``'s shape wrong.
    oneDNN on a CPU with AMX (torch 2.13) returns errors about as large as the outputs for
    some few-channel inputs, in autocast as in plain bf16: 8 and 12 input channels at
    kernels 8, 16 and 24, 4 at 16 and 24, 6, 10 and 14 at 16 (docs/benchmarks.md). Judged
    on random weights and inputs of the shape against float32 of the same rounded values,
    relative to the outputs' scale.

    >>> bf16_conv_faulty(nn.Conv1d(32, 24, 24))
    False
    """
    g = torch.Generator().manual_seed(0)
    device = conv.weight.device
    w = torch.randn(conv.weight.shape, generator=g).to(device).bfloat16()
    x = torch.randn((16, conv.in_channels, 4 * w.shape[2] + 64), generator=g)
    x = x.to(device).bfloat16()
    with torch.no_grad():
        y = nn.functional.conv1d(x, w).float()
        ref = nn.functional.conv1d(x.float(), w.float())
    return bool((y - ref).abs().max() > 0.02 * ref.abs().max())


def masked_mean_pool(features: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Average a feature map [B, D, T] over the kept time steps (keep: [B, T] bool).

    >>> f = torch.tensor([[[1.0, 2.0, 9.0]]])
    >>> masked_mean_pool(f, torch.tensor([[True, True, False]]))
    tensor([[1.5000]])
    """
    if keep is None:
        return features.mean(dim=2)
    weights = keep.to(features.dtype).unsqueeze(1)
    return (features * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1.0)
