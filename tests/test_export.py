"""ONNX export: the exported graph computes what the eager model computes, stale exports are
refused, and the shipped default model's export is current."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx as onnx_proto
import pytest
import torch

from crossl_stream import default_model_dir
from crossl_stream.errors import CheckpointError
from crossl_stream.inference import Predictor
from crossl_stream.model import CroSSL, ModelConfig, load_model, save_model
from crossl_stream.model.export import (
    ONNX_FILE,
    STREAM_FILE,
    OnnxModel,
    OnnxStep,
    export_onnx,
    weights_digest,
)
from tests.test_inference import windows_of


def random_batch(model: CroSSL, n: int = 24, seed: int = 3):
    rng = np.random.default_rng(seed)
    inputs = {
        m.name: rng.normal(size=(n, m.channels, m.samples)).astype(np.float32)
        for m in model.modalities
    }
    available = rng.random((n, len(model.modalities))) < 0.6
    available[~available.any(1), 0] = True
    return inputs, available


@pytest.mark.parametrize("aggregator", ["mlp", "attention"])
def test_the_export_matches_the_eager_model_for_every_mask(specs, tmp_path, aggregator):
    torch.manual_seed(0)
    model = CroSSL(specs, ["a", "b", "c"], ModelConfig(aggregator=aggregator)).eval()
    path = export_onnx(model, tmp_path / ONNX_FILE, "digest-1")
    onnx = OnnxModel(path, "digest-1")
    inputs, available = random_batch(model)
    expected = model.predict_proba(inputs, available)
    np.testing.assert_allclose(onnx(inputs, available), expected, atol=1e-5)
    one = {k: v[:1] for k, v in inputs.items()}  # a batch of one: the live case
    np.testing.assert_allclose(onnx(one, available[:1]), expected[:1], atol=1e-5)
    with pytest.raises(CheckpointError, match="exported from other weights"):
        OnnxModel(path, "digest-2")


def test_the_shipped_default_export_is_current_and_predicts_like_torch(excerpt):
    directory = default_model_dir()
    onnx = OnnxModel(directory / ONNX_FILE, weights_digest(directory / "model.safetensors"))
    model = load_model(directory)
    for name in (ONNX_FILE, STREAM_FILE):
        shipped = onnx_proto.load(str(directory / name))
        assert not any(node.metadata_props for node in shipped.graph.node)  # no exporter notes
        here = str(Path(__file__).resolve().parents[1]).encode()
        assert here not in shipped.SerializeToString()
    OnnxStep(directory / STREAM_FILE, model, weights_digest(directory / "model.safetensors"))
    windows = windows_of(excerpt)[:40]  # every third window has lost its gyroscope
    eager = Predictor(model, "cpu", max_batch=16)(windows)
    fast = Predictor(model, "cpu", max_batch=16, onnx=onnx)(windows)
    assert [p.label for p in fast] == [p.label for p in eager]
    np.testing.assert_allclose(
        [list(p.probs.values()) for p in fast], [list(p.probs.values()) for p in eager], atol=1e-5
    )


def test_a_retrained_checkpoint_without_a_new_export_is_refused(tmp_path):
    directory = tmp_path / "m"
    shutil.copytree(default_model_dir(), directory)
    model = load_model(directory)
    with torch.no_grad():
        model.head.weight.add_(0.01)
    save_model(model, directory, {})  # new weights, the old model.onnx left behind
    with pytest.raises(CheckpointError, match="exported from other weights"):
        OnnxModel(directory / ONNX_FILE, weights_digest(directory / "model.safetensors"))


def test_export_replaces_an_earlier_versions_per_modality_graphs(tmp_path):
    """`crossl-stream export` writes model.onnx and stream.onnx and removes encoder-*.onnx and
    head.onnx that an earlier version left in the folder (nothing reads them; they would sit
    beside weights they were not exported from)."""
    import subprocess
    import sys

    directory = tmp_path / "m"
    shutil.copytree(default_model_dir(), directory)
    legacy = [directory / "encoder-acc.onnx", directory / "encoder-gyro.onnx"]
    legacy.append(directory / "head.onnx")
    for path in legacy:
        path.write_bytes(b"old graph")
    (directory / ONNX_FILE).unlink()
    done = subprocess.run(
        [sys.executable, "-m", "crossl_stream.cli", "export", "--model", str(directory)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert not any(p.exists() for p in legacy)
    assert "an earlier version's export" in done.stderr
    digest = weights_digest(directory / "model.safetensors")
    OnnxModel(directory / ONNX_FILE, digest)  # rewritten, and current
    assert (directory / STREAM_FILE).is_file()
