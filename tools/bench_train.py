"""Training throughput: a VICReg pretraining step and a fine-tuning step of the watch model,
on the CPU and (when there is one) on CUDA, in one process, as ratios to the CPU.

    python tools/bench_train.py [--seconds 5] [--threads N] [--json FILE]

The windows are random numbers of the watch data's shape (2 x 3 channels x 100 samples):
a step's cost does not depend on their values. The steps are the protocol's own
(``pretrain`` and ``fit_classifier`` with the spec's expander, augmentations and masking).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from crossl_stream.config import TrainConfig, load_config
from crossl_stream.model.crossl import CroSSL
from crossl_stream.model.specs import ModalitySpec
from crossl_stream.training.datasets import Windows, fit_normalisation
from crossl_stream.training.experiments import dropout_masker, masker_of
from crossl_stream.training.train import fit_classifier, pretrain

SPEC = Path(__file__).resolve().parents[1] / "configs" / "train-watch.yaml"


def windows(n: int = 4096) -> Windows:
    rng = np.random.default_rng(0)
    x = {m: rng.standard_normal((n, 3, 100)).astype(np.float32) for m in ("acc", "gyro")}
    y = rng.integers(0, 7, n)
    return Windows(x, y, np.zeros(n, int), np.zeros(n, int), np.ones((n, 2), bool))


def model(device: str, w: Windows, cfg: TrainConfig, classes: list[str]) -> CroSSL:
    torch.manual_seed(0)
    specs = [ModalitySpec(name=m, channels=3, rate_hz=50, samples=100) for m in w.x]
    m = CroSSL(specs, classes, cfg.model)
    m.set_normalisation(fit_normalisation(w))
    return m.to(device)


def timed(run, steps: int) -> float:
    """Seconds per step of ``run(steps)`` after a warm-up run."""
    run(3)
    start = time.perf_counter()
    run(steps)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bench(device: str, seconds: float, cfg: TrainConfig) -> dict[str, float]:
    w = windows()
    classes = [str(i) for i in range(7)]
    pre_batch, fine_batch = cfg.pretrain.batch_size, cfg.finetune.batch_size

    def ssl(steps: int) -> None:
        pcfg = cfg.pretrain.model_copy(update={"steps": steps})
        pretrain(model(device, w, cfg, []), w, masker_of(cfg.masking), pcfg, cfg.loss, 0, False)

    def fine(steps: int) -> None:
        f = cfg.finetune.model_copy(update={"min_steps": steps, "max_steps": steps})
        m = model(device, w, cfg, classes)
        fit_classifier(m, w, "supervised", f, dropout_masker(cfg.finetune), 0, False)

    probe = timed(ssl, 3)
    ssl_step = timed(ssl, max(3, int(seconds / probe)))
    probe = timed(fine, 3)
    fine_step = timed(fine, max(3, int(seconds / probe)))
    return {
        "pretrain_ms_per_step": 1e3 * ssl_step,
        "pretrain_windows_per_s": 2 * pre_batch / ssl_step,  # two views of each window
        "finetune_ms_per_step": 1e3 * fine_step,
        "finetune_windows_per_s": fine_batch / fine_step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(SPEC, TrainConfig)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {d: bench(d, args.seconds, cfg) for d in devices}
    print(
        f"pretrain batch {cfg.pretrain.batch_size} (two views), fine-tune batch "
        f"{cfg.finetune.batch_size}; CPU {torch.get_num_threads()} threads"
    )
    for d, r in results.items():
        ratio = results["cpu"]["pretrain_ms_per_step"] / r["pretrain_ms_per_step"]
        fratio = results["cpu"]["finetune_ms_per_step"] / r["finetune_ms_per_step"]
        name = torch.cuda.get_device_name() if d == "cuda" else "cpu"
        print(
            f"{name}: pretrain {r['pretrain_ms_per_step']:.1f} ms/step "
            f"({r['pretrain_windows_per_s']:.0f} windows/s, {ratio:.1f}x the CPU); fine-tune "
            f"{r['finetune_ms_per_step']:.1f} ms/step ({r['finetune_windows_per_s']:.0f} "
            f"windows/s, {fratio:.1f}x)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
