"""Loaders read the real recordings; windows, splits and normalisation behave."""

from __future__ import annotations

import numpy as np
import pytest

from crossl_stream.errors import DatasetError
from crossl_stream.training.datasets import (
    fit_normalisation,
    labelled_subset,
    load_basicmotions,
    load_watch,
    make_windows,
    shipped_excerpt,
)


@pytest.fixture(scope="module")
def watch():
    return load_watch()


def test_watch_recordings_as_fetched(watch):
    assert len(watch.recordings) == 140
    assert sorted({r.subject for r in watch.recordings}) == list(range(1, 11))
    assert watch.classes == ["PEN", "ABD", "FEL", "IR", "ER", "TRAP", "ROW"]
    assert watch.rate_hz == 50.0
    assert {k: v for k, v in watch.channel_names.items()} == {
        "acc": ["ax", "ay", "az"],
        "gyro": ["wx", "wy", "wz"],
    }
    assert sum(r.samples for r in watch.recordings) == 244102


def test_shipped_excerpt_is_subject_10_unchanged(watch):
    excerpt = load_watch(shipped_excerpt())
    original = [r for r in watch.recordings if r.subject == 10]
    assert len(excerpt.recordings) == len(original) == 14
    for a, b in zip(excerpt.recordings, original, strict=True):
        assert a.label == b.label
        np.testing.assert_array_equal(a.signals["gyro"], b.signals["gyro"])


def test_windows_cover_each_recording_at_the_hop(watch):
    specs = watch.specs(2.0)
    recs = watch.recordings[:3]
    w = make_windows(recs, specs, hop_s=0.5)
    expected = sum((r.samples - 100) // 25 + 1 for r in recs)
    assert len(w) == expected
    assert w.x["acc"].shape == (expected, 3, 100) and w.x["acc"].dtype == np.float32
    first = recs[0].signals["acc"]
    np.testing.assert_array_equal(w.x["acc"][1], first[:, 25:125])
    assert set(w.recording.tolist()) == {0, 1, 2}


def test_recordings_shorter_than_a_window_give_an_error(watch):
    with pytest.raises(DatasetError, match="no recording is as long as one window"):
        make_windows(watch.recordings[:2], watch.specs(100.0), 1.0)


def test_normalisation_uses_only_the_windows_given(watch):
    specs = watch.specs(2.0)
    w = make_windows(watch.recordings, specs, 1.0)
    train = w.take(np.flatnonzero(w.subject != 3))
    mean, std = fit_normalisation(train)["gyro"]
    pooled = train.x["gyro"].transpose(1, 0, 2).reshape(3, -1)
    np.testing.assert_allclose(mean, pooled.mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(std, pooled.std(axis=1), rtol=1e-3)


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


def test_basicmotions_split():
    ds = load_basicmotions()
    assert ds.classes == ["Standing", "Running", "Walking", "Badminton"]
    splits = [r.split for r in ds.recordings]
    assert splits.count("train") == splits.count("test") == 40
    assert all(r.signals["acc"].shape == (3, 100) for r in ds.recordings)


def test_missing_data_says_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSL_STREAM_DATA", str(tmp_path))
    with pytest.raises(DatasetError, match="tools/fetch_datasets.py"):
        load_watch()
    with pytest.raises(DatasetError, match="BasicMotions not found"):
        load_basicmotions()


def test_a_file_that_is_not_a_recording(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(DatasetError, match="not a watch recording file"):
        load_watch(bad)
