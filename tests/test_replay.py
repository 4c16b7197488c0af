"""Replay of the shipped XDF session: labels, speed invariance, offline equivalence, faults."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from crossl_stream.config import LABEL_MARKERS
from crossl_stream.errors import DatasetError
from crossl_stream.inference import InferenceWorker, Predictor
from crossl_stream.labels import Labels
from crossl_stream.pipeline import run_pipeline
from crossl_stream.publishers import MemoryPublisher
from crossl_stream.readers.replay import Recording, Replay
from crossl_stream.training.datasets import shipped_recording
from crossl_stream.windower import Windower
from crossl_stream.xdf import XdfStream, write_xdf
from tests.test_pipeline import assert_same_predictions

XDF = shipped_recording()


@pytest.fixture(scope="module")
def recording():
    return Recording.load(XDF)


def test_the_session_holds_subject_10_and_its_labels(recording):
    t, x, rate = recording.streams["gyro"]
    assert rate == 50.0 and x.shape == (len(t), 3) and recording.header["subject"] == "10"
    assert recording.types == {"acc": "Accelerometer", "gyro": "Gyroscope"}
    starts = [m for _, m in recording.markers if m != "label:none"]
    assert len(starts) == 14 and starts[0] == "label:FEL"
    labels = Labels.of(LABEL_MARKERS, XDF, recording.start, recording.marker_streams)
    first_end = recording.markers[1][0]
    assert labels.label_at(first_end - 2, first_end) == "FEL"
    assert labels.label_at(first_end - 1, first_end + 1) is None  # spans the pause
    assert labels.names[0] == "FEL" and len(labels.intervals) == 14


def play(model, recording, speed=None, section=(0.0, 20.0), dropouts=None):
    reader = Replay(recording, ["acc", "gyro"], speed, dropouts=dropouts, section=section)
    windower = Windower(model.modalities, hop_s=0.5, source_rates={"acc": 50, "gyro": 50})
    worker = InferenceWorker(Predictor(model, "cpu"), policy="block")
    memory = MemoryPublisher()
    asyncio.run(run_pipeline(reader, windower, worker, [memory]))
    return memory.records, windower


def test_real_time_max_speed_and_offline_inference_agree(model, recording):
    fast, windower = play(model, recording)
    real, _ = play(model, recording, speed=1.0, section=(0.0, 4.0))
    assert len(real) == 5 and len(fast) > 30  # ends 2.0 ... 4.0 s: the last needs no sample at 4
    assert_same_predictions(real, fast[:5])
    # offline: the same windows cut straight from the recording, one batch through the model
    t, acc, _ = recording.streams["acc"]
    _, gyro, _ = recording.streams["gyro"]
    ends = np.array([r["t_window_end"] for r in fast])
    starts = np.searchsorted(t, ends - 2.0 - 1e-9)
    idx = starts[:, None] + np.arange(100)
    probs = model.predict_proba(
        {"acc": acc[idx].transpose(0, 2, 1), "gyro": gyro[idx].transpose(0, 2, 1)}
    )
    streamed = np.array([list(r["probs"].values()) for r in fast])
    np.testing.assert_allclose(streamed, probs, rtol=1e-4, atol=1e-6)


def test_a_dropout_masks_windows_that_still_predict(model, recording):
    records, windower = play(model, recording, dropouts={"gyro": [(6.0, 5.0)]})
    masked = [r for r in records if not r["mask"]["gyro"]]
    assert masked and all(r["mask"]["acc"] for r in masked)
    # 2 s windows lose more than 20% of gyro while their end is in (6.4, 12.6) s
    assert all(6.4 < r["t_window_end"] - recording.start < 12.6 for r in masked)
    assert len(masked) >= 11  # every window ending 7.0 ... 12.0 s
    assert all(abs(sum(r["probs"].values()) - 1) < 1e-5 for r in masked)
    assert windower.counters.masked["gyro"] == len(masked)


def test_bad_recordings_say_what_is_wrong(tmp_path, recording):
    with pytest.raises(DatasetError, match="recording not found"):
        Recording.load(tmp_path / "absent.xdf")
    (tmp_path / "junk.xdf").write_bytes(b"XDF:junk")
    with pytest.raises(DatasetError, match="junk.xdf: not an XDF recording"):
        Recording.load(tmp_path / "junk.xdf")
    with pytest.raises(DatasetError, match=r"no stream named \['emg'\]"):
        Replay(recording, {"acc": "acc", "gyro": "emg"})
    with pytest.raises(DatasetError, match=r"dropouts for unknown sensors \['eeg'\]"):
        Replay(recording, ["acc"], dropouts={"eeg": [(0, 1)]})


def test_a_cut_off_recording_plays_what_it_holds_and_says_where_it_stops(model, tmp_path, caplog):
    whole = XDF.read_bytes()
    cut = tmp_path / "cut.xdf"
    cut.write_bytes(whole[: len(whole) // 3])  # a LabRecorder killed a third of the way in
    recording = Recording.load(cut)
    t, _, _ = recording.streams["acc"]
    assert recording.truncated_at == pytest.approx(
        max(x[0][-1] for x in recording.streams.values())
    )
    assert 0.2 < (t[-1] - t[0]) / (Recording.load(XDF).end - t[0]) < 0.4
    assert "cut.xdf" in caplog.text and f"{recording.truncated_at:.3f}"[:6] in caplog.text
    records, _ = play(model, recording, section=(t[-1] - t[0] - 10, np.inf))
    assert records and records[-1]["t_window_end"] <= t[-1] + 0.02


def test_nan_samples_and_a_clock_jump_in_a_recording_are_counted_not_fatal(model, tmp_path):
    t = 1000 + np.arange(0, 12, 0.02)
    acc = np.random.default_rng(0).normal(size=(len(t), 3)).astype(np.float32)
    gyro = acc.copy()
    acc[100:110] = np.nan
    tg = t.copy()
    tg[300:] += 1.7e9  # the gyro clock jumps to Unix time mid-recording
    path = write_xdf(
        tmp_path / "faulty.xdf",
        [
            XdfStream("acc", "Accelerometer", t, acc, 50.0),
            XdfStream("gyro", "Gyroscope", tg, gyro, 50.0),
        ],
    )
    records, windower = play(model, Recording.load(path), section=(0.0, 20.0))
    assert records[-1]["t_window_end"] < 1013
    assert windower.counters.nan_samples["acc"] == 10
    assert recording_faults(path) == {"gyro": len(t) - 300}
    assert records and all(np.isfinite(list(r["probs"].values())).all() for r in records)
    assert not records[-1]["mask"]["gyro"] and records[-1]["mask"]["acc"]


def recording_faults(path):
    return Recording.load(path).dropped


def test_cli_replay_prints_a_summary(tmp_path):
    out = tmp_path / "p.jsonl"
    # a model folder made by `train` with a tiny budget (on the session itself: this tests
    # the plumbing, not the accuracy) keeps this test quick
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        f"data:\n  recordings: [{XDF}]\n  sensors: {{acc: {{rate_hz: 50}}, gyro: {{rate_hz: 50}}}}"
        "\n  window: {length_s: 2.0, hop_s: 2.0}\n  labels: {markers: {prefix: 'label:', "
        "end: [none]}}\nmodel: {code_size: 16}\npretrain: {steps: 2, batch_size: 32}\n"
        "finetune: {batch_size: 16, max_epochs: 1, min_epoch_steps: 2}\n"
    )
    cli = [sys.executable, "-m", "crossl_stream.cli"]
    subprocess.run(
        [*cli, "train", str(spec), "--out", str(tmp_path / "m"), "--quiet"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    result = subprocess.run(
        [
            *cli,
            "replay",
            "--model",
            str(tmp_path / "m"),
            "--duration",
            "30",
            "--drop",
            "gyro:10:8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout and "latency total p50" in result.stdout
    assert "with gyro masked:" in result.stdout
    assert len(out.read_text().splitlines()) > 10  # the model's hop: 2 s
    bad = subprocess.run([*cli, "replay", "--drop", "gyro-10"], capture_output=True, text=True)
    assert bad.returncode == 2 and "expected SENSOR:START_S:LENGTH_S" in bad.stderr
