"""The real data sets, each read through its spec by the one loader: watch (10 subjects),
BasicMotions (a fixed split) and the EMG gestures (2 people x 2 sessions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crossl_stream.config import TrainConfig, load_config
from crossl_stream.errors import DatasetError
from crossl_stream.training.datasets import fit_normalisation, labelled_subset
from crossl_stream.training.spec import load_data

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def data_of(name: str):
    cfg = load_config(CONFIGS / name, TrainConfig)
    return load_data(cfg.data, CONFIGS, name, progress=False)


@pytest.fixture(scope="module")
def watch():
    return data_of("train-watch.yaml")


def test_watch_sessions_as_fetched(watch):
    assert len(watch.files) == 10
    assert sorted({f.subject for f in watch.files}, key=int) == [str(i) for i in range(1, 11)]
    assert watch.classes == ["PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"]
    assert [(m.name, m.channels, m.rate_hz, m.samples) for m in watch.modalities] == [
        ("acc", 3, 50.0, 100),
        ("gyro", 3, 50.0, 100),
    ]
    w = watch.windows
    assert w.x["acc"].shape == (len(w), 3, 100) and w.x["acc"].dtype == np.float32
    # every 2 s window inside one exercise is labelled; the 140 exercises give ~9000
    assert 8500 < len(w.labelled) < 10000 and set(np.unique(w.y[w.y >= 0])) == set(range(7))
    assert w.available.all()  # pauses leave windows out; they never mask a sensor


def test_the_shipped_session_is_subject_10_of_the_cache(watch, shipped):
    mine = watch.windows.take(np.flatnonzero(watch.windows.subject == "10"))
    ours = shipped.windows
    # the spec reads both with a 0.5 s hop, the fixture with 1 s: every other window
    step = np.flatnonzero(np.isin(np.round(mine.t_end, 6), np.round(ours.t_end, 6)))
    assert len(step) == len(ours)
    np.testing.assert_array_equal(mine.x["gyro"][step], ours.x["gyro"])
    np.testing.assert_array_equal(mine.y[step], ours.y)


def test_a_window_of_the_grid_is_the_samples_it_covers(watch):
    # the watch samples lie on the 50 Hz grid: resampling returns them (up to float rounding)
    from crossl_stream.readers.replay import Recording

    f = watch.files[0]
    t, x, _ = Recording.load(f.path).streams["acc"]
    w = watch.windows.take(np.flatnonzero(watch.windows.recording == 0))
    i = len(w) // 2
    start = np.searchsorted(t, w.t_end[i] - 2.0 - 1e-9)
    np.testing.assert_allclose(w.x["acc"][i], x[start : start + 100].T, rtol=0, atol=1e-6)


def test_normalisation_uses_only_the_windows_given_and_skips_masked_ones(watch):
    w = watch.windows
    train = w.take(np.flatnonzero(w.subject != "3"))
    mean, std = fit_normalisation(train)["gyro"]
    pooled = train.x["gyro"].transpose(1, 0, 2).reshape(3, -1)
    np.testing.assert_allclose(mean, pooled.mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(std, pooled.std(axis=1), rtol=1e-3)
    masked = train.take(np.arange(200))
    masked.available[:100, 1] = False
    masked.x["gyro"][:100] = 0.0  # what a masked window carries
    mean, _ = fit_normalisation(masked)["gyro"]
    np.testing.assert_allclose(mean, masked.x["gyro"][100:].mean(axis=(0, 2)), rtol=1e-5)


def test_labelled_subset_is_stratified_seeded_and_never_empty():
    labels = np.repeat(np.arange(7), 100)
    a = labelled_subset(labels, 0.01, seed=0)
    assert np.bincount(labels[a]).tolist() == [1] * 7
    b = labelled_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[b]).tolist() == [10] * 7
    assert np.array_equal(b, labelled_subset(labels, 0.1, seed=0))
    assert not np.array_equal(b, labelled_subset(labels, 0.1, seed=1))
    with pytest.raises(ValueError, match="label fraction"):
        labelled_subset(labels, 0.0, seed=0)


def test_basicmotions_split_one_window_per_series():
    data = data_of("train-basicmotions.yaml")
    assert sorted(data.classes) == ["Badminton", "Running", "Standing", "Walking"]
    w = data.windows
    assert sorted(set(w.session.tolist())) == ["basicmotions/test", "basicmotions/train"]
    for session in ("basicmotions/train", "basicmotions/test"):
        part = w.y[w.session == session]
        assert len(part) == 40 and np.bincount(part).tolist() == [10] * 4
    assert w.x["acc"].shape == (80, 3, 100)


def test_emg_sessions_two_people_five_gestures():
    data = data_of("train-emg.yaml")
    assert sorted(set(data.windows.session.tolist())) == ["mg/1", "mg/2", "rr/1", "rr/2"]
    assert data.classes == ["rest", "rock", "paper", "scissors", "ok"]
    assert data.modalities[0].channels == 8 and data.modalities[0].samples == 200
    assert {f.streams["emg"] for f in data.files} == {"EMG"}  # found by type
    w = data.windows
    counts = np.bincount(w.y[w.y >= 0], minlength=5)
    # 6 runs x 5 signs x 25 s per session, 1 s windows every 0.5 s: ~48 a block
    assert counts.min() > 0.8 * counts.max() and 4 * 30 * 40 < counts.sum() < 4 * 30 * 50
    assert data.unmapped == {"pause": 24}  # a run's end marker: it ends the label


def test_missing_data_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSL_STREAM_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match=r"matches no file; run `python tools/fetch_datasets"):
        data_of("train-watch.yaml")


def test_a_file_that_is_not_a_recording(tmp_path):
    bad = tmp_path / "bad.xdf"
    bad.write_bytes(b"not an xdf file at all")
    spec = TrainConfig.model_validate(
        {"data": {"recordings": [str(bad)], "sensors": {"acc": {"rate_hz": 50}}}}
    )
    with pytest.raises(DatasetError, match="bad.xdf"):
        load_data(spec.data, tmp_path, "spec.yaml", progress=False)
