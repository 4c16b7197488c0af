"""crossl-stream: streaming inference for wearable sensors with CroSSL.

Readers fill ring buffers, a windower aligns sensors into masked windows, an inference
worker runs the CroSSL model, publishers send predictions downstream.
"""

from pathlib import Path

__version__ = "0.1.0"


def default_model_dir() -> Path:
    """``models/default`` of this checkout: the shipped default model."""
    return Path(__file__).resolve().parents[1] / "models" / "default"
