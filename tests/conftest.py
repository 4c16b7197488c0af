"""Shared fixtures. LSL discovery is pinned to this machine before anything imports pylsl."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
# Forced, not defaulted: a user's own liblsl config must not widen discovery in tests.
os.environ["LSLAPICFG"] = str(ROOT / "tools" / "lsl_api.cfg")
torch.set_num_threads(2)
# CI runs the same hypothesis examples every time; locally they vary.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

from crossl_stream.model import CroSSL, ModalitySpec  # noqa: E402


@pytest.fixture
def specs() -> list[ModalitySpec]:
    return [
        ModalitySpec(name="acc", channels=3, rate_hz=50, samples=100),
        ModalitySpec(name="gyro", channels=3, rate_hz=50, samples=100),
    ]


@pytest.fixture
def model(specs: list[ModalitySpec]) -> CroSSL:
    torch.manual_seed(0)
    return CroSSL(specs, ["a", "b", "c"]).eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"acc": torch.randn(5, 3, 100, generator=g), "gyro": torch.randn(5, 3, 100, generator=g)}


def watch_spec(path, hop_s: float = 1.0):
    """The watch data set spec over ``path`` (the shipped session by default's layout)."""
    from crossl_stream.config import DatasetSpec

    return DatasetSpec.model_validate(
        {
            "recordings": [str(path)],
            "sensors": {"acc": {"rate_hz": 50}, "gyro": {"rate_hz": 50}},
            "window": {"length_s": 2.0, "hop_s": hop_s},
            "labels": {
                "markers": {"prefix": "label:", "end": ["none"]},
                "classes": ["PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"],
            },
        }
    )


@pytest.fixture(scope="session")
def shipped():
    """The shipped held-out session, read like any data set: 2 s windows every 1 s."""
    from crossl_stream.training.datasets import shipped_recording
    from crossl_stream.training.spec import load_data

    return load_data(watch_spec(shipped_recording()), ROOT, "shipped", progress=False)


@pytest.fixture(scope="session")
def excerpt(shipped):
    """Windows of the shipped session's first 100 s."""
    w = shipped.windows
    return w.take(np.flatnonzero(w.t_end < w.t_end[0] + 100))
