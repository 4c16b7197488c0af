"""CroSSL: encoders, latent masking, aggregators, VICReg loss, the model and its checkpoints."""

from crossl_stream.model.checkpoint import load_model, save_model
from crossl_stream.model.crossl import CroSSL, ModelConfig, ModelOutput
from crossl_stream.model.loss import vicreg_loss
from crossl_stream.model.masking import LatentMasker
from crossl_stream.model.specs import ModalitySpec

__all__ = [
    "CroSSL",
    "LatentMasker",
    "ModalitySpec",
    "ModelConfig",
    "ModelOutput",
    "load_model",
    "save_model",
    "vicreg_loss",
]
