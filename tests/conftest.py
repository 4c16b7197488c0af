"""Shared fixtures. LSL discovery is pinned to this machine before anything imports pylsl."""

from __future__ import annotations

import os
from pathlib import Path

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


@pytest.fixture(scope="session")
def excerpt():
    """Windows of the first two held-out recordings (2 s, 1 s hop)."""
    from crossl_stream.training.datasets import load_watch, make_windows, shipped_excerpt

    ds = load_watch(shipped_excerpt())
    return make_windows(ds.recordings[:2], ds.specs(2.0), 1.0)
