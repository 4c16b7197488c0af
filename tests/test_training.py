"""A tiny CroSSL learns from a real recording excerpt: loss falls, accuracy beats chance."""

from __future__ import annotations

import numpy as np
import torch

from crossl_stream.config import TrainConfig
from crossl_stream.training.datasets import load_watch, make_windows
from crossl_stream.training.experiments import new_model, train_crossl
from crossl_stream.training.metrics import macro_f1
from crossl_stream.training.train import fit_classifier, predict

TINY = TrainConfig(
    model={"code_size": 32, "dropout": 0.1},
    masking={"strategy": "spatial", "keep": 0.5},
    pretrain={"steps": 40, "batch_size": 64, "lr": 3e-3},
    finetune={"epochs": 20, "min_steps": 80, "max_steps": 120, "batch_size": 32, "lr": 3e-3},
)


def _split():
    """A small real excerpt: subjects 1-4 train, subject 5 tests (unseen person)."""
    ds = load_watch()
    specs = ds.specs(2.0)
    train = [r for r in ds.recordings if r.subject <= 4]
    test = [r for r in ds.recordings if r.subject == 5]
    return ds, specs, make_windows(train, specs, 1.0), make_windows(test, specs, 1.0)


def test_tiny_crossl_learns_on_real_data():
    torch.set_num_threads(2)
    ds, specs, train, test = _split()
    assert len(set(train.y.tolist())) == 7 and len(set(test.y.tolist())) == 7
    model, curves = train_crossl(specs, ds.classes, TINY, train, 1.0, progress=False)

    ssl = [h["loss"] for h in curves["pretrain"]]
    sup = [h["loss"] for h in curves["finetune"]]
    assert np.mean(ssl[-10:]) < np.mean(ssl[:5])
    assert np.mean(sup[-10:]) < 0.5 * np.mean(sup[:5])

    pred = predict(model, test).argmax(1)
    chance = 1 / len(ds.classes)
    accuracy = float(np.mean(pred == test.y))
    assert accuracy > 2 * chance, accuracy
    assert macro_f1(test.y, pred, 7) > 2 * chance
    # one modality missing: still a prediction for every window, still above chance
    acc_only = predict(model, test, ["acc"]).argmax(1)
    assert float(np.mean(acc_only == test.y)) > chance


def test_probe_trains_only_the_head():
    ds, specs, train, _ = _split()
    model = new_model(specs, ds.classes, TINY, train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = fit_classifier(model, train, "probe", TINY.finetune, progress=False)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"head.weight", "head.bias"}
    assert np.mean([h["loss"] for h in history[-10:]]) < history[0]["loss"]
    assert all(p.requires_grad for p in model.parameters())


def test_same_seed_same_model():
    ds, specs, train, _ = _split()
    small = train.take(np.arange(0, len(train), 8))
    cfg = TINY.model_copy(update={"pretrain": TINY.pretrain.model_copy(update={"steps": 3})})
    cfg = cfg.model_copy(
        update={"finetune": TINY.finetune.model_copy(update={"min_steps": 3, "max_steps": 3})}
    )
    a, _ = train_crossl(specs, ds.classes, cfg, small, 0.5, progress=False)
    b, _ = train_crossl(specs, ds.classes, cfg, small, 0.5, progress=False)
    c, _ = train_crossl(specs, ds.classes, cfg.model_copy(update={"seed": 1}), small, 0.5, False)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.head.weight, c.head.weight)
