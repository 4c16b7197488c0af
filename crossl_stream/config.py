"""YAML -> validated config objects. Every error names the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crossl_stream.errors import ConfigError
from crossl_stream.model.crossl import ModelConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MaskingConfig(_Strict):
    """Latent masking used to make the two SSL views (and during fine-tuning)."""

    strategy: Literal["spatial", "random", "temporal"] = "spatial"
    keep: float = Field(0.9, gt=0.0, le=1.0)


class LossConfig(_Strict):
    """VICReg weights (the reference's runs: 10 / 10 / 100)."""

    invariance: float = Field(10.0, ge=0.0)
    variance: float = Field(10.0, ge=0.0)
    covariance: float = Field(100.0, ge=0.0)


class PretrainConfig(_Strict):
    """Self-supervised pretraining budget."""

    steps: int = Field(300, ge=0)
    batch_size: int = Field(256, ge=16, description="VICReg statistics need a real batch")
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)


class FinetuneConfig(_Strict):
    """Supervised budget, shared by fine-tuning, probing and the supervised baseline.

    Steps are ``epochs`` passes over the labelled windows, clipped to [min_steps, max_steps].
    """

    epochs: int = Field(30, gt=0)
    min_steps: int = Field(100, ge=1)
    max_steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    probe_lr: float = Field(1e-2, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)

    @model_validator(mode="after")
    def _steps_in_order(self) -> FinetuneConfig:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) exceeds max_steps ({self.max_steps})")
        return self


class EvaluationConfig(_Strict):
    """What `crossl-stream eval` runs."""

    label_fractions: tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...] = (0.01, 0.1, 1.0)
    folds: tuple[int, ...] | None = Field(None, description="subjects to hold out; None = all")
    masking_grid: tuple[MaskingConfig, ...] = ()
    masking_folds: tuple[int, ...] = ()
    compare_attention: bool = False

    @model_validator(mode="after")
    def _full_labels_included(self) -> EvaluationConfig:
        if 1.0 not in self.label_fractions:
            raise ValueError("label_fractions must include 1.0 (missing-modality metrics use it)")
        return self


class TrainConfig(_Strict):
    """One training / evaluation run on one dataset."""

    dataset: Literal["seglearn-watch", "basicmotions"] = "seglearn-watch"
    window_s: float = Field(2.0, gt=0.0)
    hop_s: float = Field(0.5, gt=0.0)
    holdout_subject: int | None = Field(
        None, description="subject left out of the trained model (its recordings: the demo)"
    )
    seed: int = 0
    model: ModelConfig = ModelConfig()
    masking: MaskingConfig = MaskingConfig()
    loss: LossConfig = LossConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluation: EvaluationConfig = EvaluationConfig()


T = TypeVar("T", bound=BaseModel)


def format_validation_error(source: str, exc: ValidationError) -> str:
    """One line per problem: ``source: key.path: reason``."""
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{source}: {key}: {reason}")
    return "\n".join(lines)


def load_config(path: str | Path, kind: type[T] = TrainConfig) -> T:  # type: ignore[assignment]
    """Read a YAML file into ``kind``, raising ConfigError with file, key and reason."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    try:
        return kind.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from exc
