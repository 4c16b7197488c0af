"""The CUDA path: the same batching code as the CPU's, on the GPU. The tests that need a GPU
are skipped without one (CI has none; `tools/gpu_check.sh` runs them on a GPU machine); the
host-side staging they rely on is tested on the CPU here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossl_stream import default_model_dir
from crossl_stream.model.streaming import StreamingCroSSL
from tests.test_run import build, config, play
from tests.test_streaming import MODELS, Streams, full_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def hops(streaming: StreamingCroSSL, model, subjects: int = 12, n_hops: int = 10) -> float:
    """Stream hops of many subjects (some masked, some joining late); the largest
    difference from the full model on the CPU."""
    streams = Streams(subjects=subjects, seconds=6.0)
    rng = np.random.default_rng(0)
    worst = 0.0
    names = list(streams.data)
    for k in range(n_hops):
        here = names[: 4 + k] if k < 6 else names
        marks, data = zip(*(streams.window(s, k) for s in here), strict=True)
        available = rng.random((len(here), 2)) < 0.85
        available[~available.any(axis=1), 0] = True
        got = streaming(here, list(data), available, list(marks))
        worst = max(worst, float(np.abs(got - full_model(model, list(data), available)).max()))
    return worst


def test_reused_staging_buffers_give_the_same_predictions_on_the_cpu():
    """The staging CUDA uses (reused host buffers, one per shape, a second group of the same
    shape in one call staged apart) keeps every window's samples: run here with the buffers
    on."""
    model = MODELS["mlp"]
    staged = StreamingCroSSL(model)
    staged._staging = True  # what CUDA does, without pinning
    assert hops(staged, model) < 2e-5
    assert staged._stage_buffers  # the buffers were used


@cuda
def test_streaming_on_cuda_equals_the_full_model():
    model = MODELS["attention"]
    gpu = StreamingCroSSL(load_cuda(model))
    assert hops(gpu, model.cpu()) < 1e-4


@cuda
def test_bf16_on_cuda_stays_close_to_fp32():
    model = MODELS["mlp"]
    gpu = StreamingCroSSL(load_cuda(model), precision="bf16")
    assert hops(gpu, model.cpu()) < 0.05


@cuda
def test_the_shipped_session_on_cuda_gives_the_cpus_labels():
    inference = {"model": str(default_model_dir()), "backpressure": "block"}
    reader = {"kind": "replay", "speed": "max"}
    for streaming in (True, False):
        on_gpu = play(
            build(
                config(
                    inference={**inference, "device": "cuda", "streaming": streaming},
                    readers=[reader],
                )
            )
        )
        on_cpu = play(
            build(
                config(
                    inference={**inference, "device": "cpu", "streaming": streaming},
                    readers=[reader],
                )
            )
        )
        assert len(on_gpu) == len(on_cpu) > 1000
        assert [r["label"] for r in on_gpu] == [r["label"] for r in on_cpu]
        worst = max(
            abs(a["probs"][c] - b["probs"][c])
            for a, b in zip(on_gpu, on_cpu, strict=True)
            if a["label"] is not None
            for c in a["probs"]
        )
        print(f"shipped session, streaming={streaming}: largest |dp| GPU vs CPU {worst:.2e}")
        assert worst < 1e-3


def load_cuda(model):
    import copy

    return copy.deepcopy(model).to("cuda")


@cuda
def test_training_on_cuda_follows_the_cpu():
    """Pretraining (expander, augmentations, masking) and fine-tuning on the GPU take the same
    batches and masks as on the CPU (every draw stays on the CPU): the losses agree."""
    from crossl_stream.config import AugmentConfig, LossConfig
    from crossl_stream.model.masking import LatentMasker
    from crossl_stream.training.train import fit_classifier, pretrain
    from tests.test_training import FINE, PRE, small_model, synthetic

    pre = PRE.model_copy(
        update={"expander": (32, 32), "augment": AugmentConfig(scale=0.1, rotate_deg=10)}
    )
    w, masker = synthetic(), LatentMasker("spatial", 0.5)
    histories = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = small_model().to(device)
        ssl = pretrain(model, w, masker, pre, LossConfig(), seed=1, progress=False)
        fit = fit_classifier(model, w, "finetune", FINE, masker, 1, False, val=synthetic(30, 1))
        histories[device] = ([h["loss"] for h in ssl], [h["loss"] for h in fit.history])
    for cpu, gpu in zip(histories["cpu"], histories["cuda"], strict=True):
        assert len(cpu) == len(gpu) or cpu[:5]
        np.testing.assert_allclose(gpu[:5], cpu[:5], rtol=2e-2, atol=2e-3)


@cuda
def test_bf16_training_on_cuda_learns_and_keeps_fp32_weights():
    """The bf16 autocast path on the GPU: finite losses that fall, fp32 weights, and the
    same first losses as fp32 within bfloat16's precision."""
    from crossl_stream.config import LossConfig
    from crossl_stream.model.masking import LatentMasker
    from crossl_stream.training.train import fit_classifier, pretrain
    from tests.test_training import FINE, PRE, small_model, synthetic

    w, masker = synthetic(), LatentMasker("spatial", 0.5)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = small_model().to("cuda")
        pre = PRE.model_copy(update={"expander": (32, 32), "precision": precision})
        fine = FINE.model_copy(update={"precision": precision})
        ssl = pretrain(model, w, masker, pre, LossConfig(), seed=1, progress=False)
        fit = fit_classifier(model, w, "finetune", fine, masker, 1, False)
        assert all(t.dtype == torch.float32 for t in model.state_dict().values())
        losses[precision] = [h["loss"] for h in ssl], [h["loss"] for h in fit.history]
    for fp32, bf16 in zip(losses["fp32"], losses["bf16"], strict=True):
        assert np.isfinite(bf16).all()
        np.testing.assert_allclose(bf16[:3], fp32[:3], rtol=0.1)
    fit = losses["bf16"][1]
    assert np.mean(fit[-10:]) < np.mean(fit[:10])
