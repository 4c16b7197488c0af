"""Signal augmentations: each does what it says to a real window, draws only from the
caller's generator, and leaves unavailable modalities alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crossl_stream.config import AugmentConfig
from crossl_stream.errors import ConfigError
from crossl_stream.training.augment import Augmenter, random_rotations


def real_windows(n: int = 16) -> dict[str, torch.Tensor]:
    """``n`` real 2 s watch windows (acc, gyro at 50 Hz) from the shipped demo recording."""
    from crossl_stream.readers.replay import Recording
    from crossl_stream.training.datasets import shipped_recording

    rec = Recording.load(shipped_recording())
    out = {}
    for name in ("acc", "gyro"):
        stream = next(s for s in rec.streams if s.lower().startswith(name))
        x = np.asarray(rec.streams[stream][1], dtype=np.float32)[: n * 100]
        out[name] = torch.from_numpy(x.reshape(n, 100, 3).transpose(0, 2, 1).copy())
    return out


def augment(cfg: AugmentConfig, x, available=None, seed=0):
    spread = {k: v.std(dim=(0, 2)) for k, v in x.items()}
    b = next(iter(x.values())).shape[0]
    if available is None:
        available = torch.ones(b, len(x), dtype=torch.bool)
    return Augmenter(cfg, spread)(x, available, torch.Generator().manual_seed(seed))


def test_rotation_keeps_each_vector_length_and_turns_acc_and_gyro_together():
    x = real_windows()
    out = augment(AugmentConfig(rotate_deg=30), x)
    for name in x:
        assert torch.allclose(out[name].norm(dim=1), x[name].norm(dim=1), atol=1e-4)
        assert not torch.allclose(out[name], x[name])
    # one rotation per window for both sensors: solve it from acc, apply it to gyro
    r = random_rotations(16, 30.0, torch.Generator().manual_seed(0))
    assert torch.allclose(out["gyro"], r @ x["gyro"], atol=1e-4)


def test_rotation_angles_stay_within_the_limit():
    r = random_rotations(500, 10.0, torch.Generator().manual_seed(1))
    angle = torch.arccos(((r.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2).clamp(-1, 1))
    assert float(angle.max()) <= np.radians(10.0) + 1e-4
    assert float(angle.max()) > np.radians(8.0)


def test_scale_jitter_and_warp_change_the_signal_by_about_their_size():
    x = real_windows()
    scaled = augment(AugmentConfig(scale=0.1), x)["acc"]
    gain = (scaled * x["acc"]).sum(2) / (x["acc"] * x["acc"]).sum(2)  # per window, channel
    assert 0.03 < float(gain.std()) < 0.2
    noisy = augment(AugmentConfig(jitter=0.05), x)["acc"]
    relative = float(((noisy - x["acc"]).std(dim=(0, 2)) / x["acc"].std(dim=(0, 2))).mean())
    assert relative == pytest.approx(0.05, rel=0.2)
    warped = augment(AugmentConfig(time_warp=0.05), x)["acc"]
    assert torch.equal(warped[:, :, 0], x["acc"][:, :, 0])  # the ends stay put
    assert torch.allclose(warped[:, :, -1], x["acc"][:, :, -1], atol=1e-5)
    assert not torch.allclose(warped, x["acc"])
    assert float(warped.min()) >= float(x["acc"].min()) - 1e-5  # interpolation, not noise


def test_same_seed_same_views_and_unavailable_rows_untouched():
    x = real_windows()
    cfg = AugmentConfig(scale=0.1, jitter=0.05, rotate_deg=15, time_warp=0.05)
    available = torch.ones(16, 2, dtype=torch.bool)
    available[:4, 1] = False
    a, b = augment(cfg, x, available, seed=7), augment(cfg, x, available, seed=7)
    c = augment(cfg, x, available, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in x)
    assert not torch.equal(a["acc"], c["acc"])
    assert torch.equal(a["gyro"][:4], x["gyro"][:4])
    assert not torch.equal(a["gyro"][4:], x["gyro"][4:])


def test_nothing_configured_is_the_identity():
    x = real_windows(4)
    out = augment(AugmentConfig(), x)
    assert all(out[k] is x[k] for k in x)


def test_rotation_turns_only_the_vector_sensors_it_is_given():
    x = real_windows(4)
    out = augment(AugmentConfig(rotate_deg=30, vectors=("acc",)), x)
    assert not torch.equal(out["acc"], x["acc"]) and torch.equal(out["gyro"], x["gyro"])
    with pytest.raises(ConfigError, match=r"augment.vectors: \['ppg'\] are not 3-channel"):
        augment(AugmentConfig(rotate_deg=30, vectors=("ppg",)), x)
    single = {"emg": torch.randn(4, 8, 100)}
    with pytest.raises(ConfigError, match="no modality to rotate"):
        augment(AugmentConfig(rotate_deg=30), single)
    assert augment(AugmentConfig(scale=0.1), single)["emg"].shape == (4, 8, 100)


def test_gain_scales_the_signal_around_its_offset_not_the_offset():
    """The armband's sEMG sits on an ADC mid-scale of about 127.5 with a spread of about 2.5:
    a 10% gain applied to the raw values would move every window by about five spreads. The
    gain is applied around each channel's training mean, so the offset stays put."""
    from crossl_stream.config import TrainConfig, load_config
    from crossl_stream.training.spec import load_data

    configs = Path(__file__).resolve().parent.parent / "configs"
    cfg = load_config(configs / "train-emg.yaml", TrainConfig)
    data = load_data(cfg.data, configs, "train-emg.yaml", progress=False)
    x = {"emg": torch.from_numpy(np.asarray(data.windows.x["emg"][:64], dtype=np.float32))}
    mean, std = x["emg"].mean(dim=(0, 2)), x["emg"].std(dim=(0, 2))
    assert (mean > 20 * std).all()  # the offset dwarfs the signal
    gain = Augmenter(AugmentConfig(scale=0.1), {"emg": std}, {"emg": mean})
    out = gain(x, torch.ones(64, 1, dtype=torch.bool), torch.Generator().manual_seed(0))["emg"]
    shift = (out.mean(dim=2) - x["emg"].mean(dim=2)).abs() / std.view(1, -1)
    assert shift.max() < 0.5  # windows keep their level (to within their own spread's tenth)
    ratio = (out - mean.view(1, -1, 1)).std(dim=2) / (x["emg"] - mean.view(1, -1, 1)).std(dim=2)
    assert ratio.min() > 0.5 and ratio.max() < 1.5 and (ratio - 1).abs().mean() > 0.02
    raw = Augmenter(AugmentConfig(scale=0.1), {"emg": std})  # no centre: the old behaviour
    moved = raw(x, torch.ones(64, 1, dtype=torch.bool), torch.Generator().manual_seed(0))["emg"]
    assert ((moved.mean(dim=2) - x["emg"].mean(dim=2)).abs() / std.view(1, -1)).max() > 2
