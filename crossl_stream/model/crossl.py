"""The CroSSL model: per-modality encoders, latent masking, an aggregator and a class head."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from crossl_stream.errors import InputError
from crossl_stream.model.aggregator import AGGREGATORS
from crossl_stream.model.encoder import ConvEncoder, masked_mean_pool
from crossl_stream.model.masking import NO_MASKING, LatentMasker
from crossl_stream.model.specs import ModalitySpec

ArrayLike = torch.Tensor | np.ndarray


class ModelConfig(BaseModel):
    """Architecture hyper-parameters (stored in every checkpoint)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code_size: int = Field(96, gt=3, description="latent size per modality")
    kernels: tuple[int, int, int] = (24, 16, 8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    aggregator: Literal["mlp", "attention"] = "mlp"
    embed_dim: int = Field(32, gt=0)


@dataclass
class ModelOutput:
    """What one forward pass gives: window embeddings, class logits, and the mask used."""

    embedding: torch.Tensor
    logits: torch.Tensor
    visible: torch.Tensor

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.softmax(dim=-1)


class CroSSL(nn.Module):
    """Owns the encoders, mask tokens, aggregator, class head and input normalisation.

    The one forward contract, for training and streaming alike: a mapping of modality name to
    a [batch, channels, samples] array plus a [batch, modality] availability mask. An
    unavailable modality is never run through its encoder: its latent is the learned mask
    token (MLP aggregator) or key padding (attention aggregator).

    >>> specs = [ModalitySpec(name="acc", channels=3, rate_hz=50, samples=100),
    ...          ModalitySpec(name="gyro", channels=3, rate_hz=50, samples=100)]
    >>> model = CroSSL(specs, classes=["a", "b"]).eval()
    >>> out = model({"acc": torch.randn(4, 3, 100)})   # gyro missing in every window
    >>> out.probs.shape, out.visible[0].tolist()
    (torch.Size([4, 2]), [True, False])
    """

    def __init__(
        self,
        modalities: Sequence[ModalitySpec],
        classes: Sequence[str],
        config: ModelConfig | None = None,
    ) -> None:
        super().__init__()
        if not modalities:
            raise InputError("CroSSL needs at least one modality")
        names = [m.name for m in modalities]
        if len(set(names)) != len(names):
            raise InputError(f"modality names must be unique, got {names}")
        if len(classes) == 1 or len(set(classes)) != len(classes):
            raise InputError(
                f"need at least two distinct class names (or none, for a pretrained model "
                f"without a class head), got {list(classes)}"
            )
        self.config = config or ModelConfig()
        min_samples = ConvEncoder.receptive_field(self.config.kernels)
        short = [m.name for m in modalities if m.samples < min_samples]
        if short:
            raise InputError(
                f"modalities {short} have fewer than {min_samples} samples per window, "
                f"the encoder's receptive field with kernels {self.config.kernels}"
            )
        self.modalities = list(modalities)
        self.classes = [str(c) for c in classes]
        cfg = self.config
        self.encoders = nn.ModuleDict(
            {
                m.name: ConvEncoder(m.channels, cfg.code_size, cfg.kernels, cfg.dropout)
                for m in modalities
            }
        )
        self.mask_token = nn.Parameter(torch.zeros(len(modalities), cfg.code_size))
        self.aggregator = AGGREGATORS[cfg.aggregator](len(modalities), cfg.code_size, cfg.embed_dim)
        with warnings.catch_warnings():  # no classes: an empty head (a pretrained model)
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.head = nn.Linear(cfg.embed_dim, len(self.classes))
        for m in modalities:
            self.register_buffer(f"norm_mean_{m.name}", torch.zeros(m.channels))
            self.register_buffer(f"norm_std_{m.name}", torch.ones(m.channels))

    def with_classes(self, classes: Sequence[str]) -> CroSSL:
        """This model (encoders, aggregator, normalisation) with a new class head for
        ``classes``: how a pretrained model is fine-tuned."""
        if len(classes) < 2:
            raise InputError(f"a class head needs at least two classes, got {list(classes)}")
        model = CroSSL(self.modalities, classes, self.config)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith("head.")}
        model.load_state_dict(state, strict=False)
        return model.to(self.mask_token.device)

    @property
    def window_s(self) -> float:
        """Window length in seconds (the same for every modality)."""
        return self.modalities[0].window_s

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def set_normalisation(self, stats: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
        """Store per-channel (mean, std) per modality, fitted on training data only."""
        for m in self.modalities:
            mean, std = stats[m.name]
            getattr(self, f"norm_mean_{m.name}").copy_(torch.as_tensor(mean, dtype=torch.float32))
            std = torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6)
            getattr(self, f"norm_std_{m.name}").copy_(std)

    def check_inputs(
        self, inputs: Mapping[str, ArrayLike], available: ArrayLike | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Validate a batch against the modality specs; return float32 tensors and the mask.

        Raises InputError naming the modality, the expected and the received shape, or the
        window holding a NaN.
        """
        unknown = sorted(set(inputs) - set(self.modality_names))
        if unknown:
            raise InputError(f"unknown modalities {unknown}; this model has {self.modality_names}")
        if not inputs:
            raise InputError("no modality given: at least one is needed")
        device = self.mask_token.device
        tensors: dict[str, torch.Tensor] = {}
        batch = None
        for spec in self.modalities:
            if spec.name not in inputs:
                continue
            x = torch.as_tensor(inputs[spec.name], dtype=torch.float32, device=device)
            expected = (spec.channels, spec.samples)
            if x.ndim != 3 or tuple(x.shape[1:]) != expected:
                raise InputError(
                    f"modality {spec.name!r}: expected [batch, {expected[0]} channels, "
                    f"{expected[1]} samples], got {list(x.shape)}"
                )
            if batch is not None and x.shape[0] != batch:
                raise InputError(
                    f"modality {spec.name!r}: batch of {x.shape[0]}, others have {batch}"
                )
            batch = x.shape[0]
            tensors[spec.name] = x
        present = torch.tensor([n in tensors for n in self.modality_names], device=device)
        if available is None:
            avail = present.unsqueeze(0).expand(batch, -1).clone()
        else:
            avail = torch.as_tensor(available, dtype=torch.bool, device=device)
            if tuple(avail.shape) != (batch, len(self.modalities)):
                raise InputError(
                    f"availability mask: expected [{batch}, {len(self.modalities)}] "
                    f"(batch, modality in order {self.modality_names}), got {list(avail.shape)}"
                )
            claimed = avail.any(dim=0) & ~present
            if claimed.any():
                names = [n for n, c in zip(self.modality_names, claimed.tolist(), strict=True) if c]
                raise InputError(f"availability mask marks {names} available but no data given")
        empty = ~avail.any(dim=1)
        if empty.any():
            raise InputError(
                f"windows {empty.nonzero().flatten().tolist()[:10]} have no available modality"
            )
        for i, name in enumerate(self.modality_names):
            if name in tensors:
                rows = avail[:, i]
                bad = ~torch.isfinite(tensors[name]).flatten(1).all(dim=1) & rows
                if bad.any():
                    raise InputError(
                        f"modality {name!r}: NaN or Inf in available windows "
                        f"{bad.nonzero().flatten().tolist()[:10]}; mark them unavailable instead"
                    )
        return tensors, avail

    def forward(
        self,
        inputs: Mapping[str, ArrayLike],
        available: ArrayLike | None = None,
        masker: LatentMasker = NO_MASKING,
        generator: torch.Generator | None = None,
    ) -> ModelOutput:
        tensors, avail = self.check_inputs(inputs, available)
        generator = generator if generator is not None else torch.default_generator
        visible = masker.modality_mask(avail, generator)
        batch, device = visible.shape[0], visible.device
        latents = self.mask_token.unsqueeze(0).expand(batch, -1, -1).clone()
        for i, name in enumerate(self.modality_names):
            rows = visible[:, i]
            if not rows.any():
                continue
            everyone = bool(rows.all())
            x = tensors[name] if everyone else tensors[name][rows]
            features = self.encode(name, x)
            keep_t = masker.time_mask(x.shape[0], features.shape[2], generator, device)
            z = masked_mean_pool(features, keep_t).to(latents.dtype)  # bf16 under autocast: fp32
            if everyone:
                latents[:, i] = z
            else:
                latents[rows, i] = z
        keep_e = masker.element_mask(tuple(latents.shape), generator, device)
        if keep_e is not None:
            latents = torch.where(keep_e, latents, self.mask_token.unsqueeze(0))
        embedding = self.aggregator(latents, visible)
        return ModelOutput(embedding=embedding, logits=self.head(embedding), visible=visible)

    def encode(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Normalise one modality's [B, C, T] input and encode it: features [B, D, T'].

        Every feature column depends on its own ``receptive_field`` input samples only, so
        a stream's columns can be computed once and shared by overlapping windows
        (``model.streaming``).
        """
        mean = getattr(self, f"norm_mean_{name}")[:, None]
        std = getattr(self, f"norm_std_{name}")[:, None]
        return self.encoders[name]((x - mean) / std)

    def classify(self, latents: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Class logits [B, classes] from modality latents [B, M, D] (mask tokens in place)."""
        return self.head(self.aggregator(latents, visible))

    @property
    def receptive_field(self) -> int:
        """Input samples behind one encoder feature column."""
        return ConvEncoder.receptive_field(self.config.kernels)

    @torch.inference_mode()
    def predict_proba(
        self, inputs: Mapping[str, ArrayLike], available: ArrayLike | None = None
    ) -> np.ndarray:
        """Class probabilities [batch, classes] in eval mode, as a numpy array."""
        was_training = self.training
        self.eval()
        try:
            return self(inputs, available).probs.cpu().numpy()
        finally:
            self.train(was_training)
