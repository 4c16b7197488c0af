"""Defaults that must not lose or mix data: backpressure by reader kind, a JSONL file that is
already used, a configured rate the recording disagrees with, and `play` at another speed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossl_stream import default_model_dir
from crossl_stream.config import PipelineConfig, load_config
from crossl_stream.errors import ConfigError
from crossl_stream.pipeline import Pipeline
from crossl_stream.publishers import MemoryPublisher
from crossl_stream.xdf import XdfStream, write_xdf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLI = [sys.executable, "-m", "crossl_stream.cli"]
SENSORS = {"acc": {"channels": 3, "rate_hz": 50}, "gyro": {"channels": 3, "rate_hz": 50}}


def config(reader: dict | None = None, **inference) -> dict:
    """The shipped session replayed through the default model; ``backpressure`` omitted."""
    return {
        "sensors": json.loads(json.dumps(SENSORS)),
        "readers": [reader or {"kind": "replay", "speed": "max"}],
        "inference": {"model": str(default_model_dir()), **inference},
        "publishers": [],
    }


def build(raw: dict, base: Path | str = ".") -> Pipeline:
    return Pipeline.from_config(PipelineConfig.model_validate(raw), base, "test.yaml")


def play(pipeline: Pipeline) -> list[dict]:
    memory = MemoryPublisher()
    pipeline.publishers.append(memory)
    asyncio.run(pipeline.run())
    return memory.records


# -- 1. backpressure: block for recordings, drop_oldest for live sources ----------------------


def test_a_max_speed_replay_without_backpressure_drops_no_window_even_with_a_tiny_queue():
    auto = build(config(queue_size=2))  # backpressure omitted
    given = build(config(queue_size=2, backpressure="block"))
    assert auto.worker.policy == given.worker.policy == "block"
    records, expected = play(auto), play(given)
    assert auto.worker.counters.dropped == 0
    assert auto.metrics.counts.published == given.metrics.counts.published == len(records) > 1000
    assert [r["t_window_end"] for r in records] == [r["t_window_end"] for r in expected]
    # what the old default did with the same queue: the same replay loses windows
    dropping = build(config(queue_size=2, backpressure="drop_oldest"))
    lossy = play(dropping)
    assert dropping.worker.counters.dropped > 0
    assert len(lossy) == len(records) - dropping.worker.counters.dropped


@pytest.mark.parametrize(
    ("reader", "given", "policy"),
    [
        ({"kind": "replay", "speed": 20}, None, "block"),  # a paced recording waits too
        ({"kind": "replay", "speed": "max"}, "drop_oldest", "drop_oldest"),  # kept as given
        ({"kind": "simulate", "duration_s": 1, "speed": "max"}, None, "block"),
        ({"kind": "simulate", "duration_s": 1, "speed": 1}, None, "drop_oldest"),
        ({"kind": "lsl", "streams": {"acc": {"name": "acc"}}}, None, "drop_oldest"),
        ({"kind": "mqtt", "streams": {"acc": {"topic": "w/+/acc"}}}, None, "drop_oldest"),
        ({"kind": "lsl", "streams": {"acc": {"name": "acc"}}}, "block", "block"),
    ],
)
def test_backpressure_defaults_by_reader_kind_and_an_explicit_value_is_kept(reader, given, policy):
    raw = config(**({"backpressure": given} if given else {}))
    if reader["kind"] == "simulate":
        reader = {**reader, "sensors": {"acc": {}, "gyro": {}}}
        raw["readers"] = [reader]
    elif reader["kind"] == "replay":
        raw["readers"] = [reader]
    else:  # a live reader for acc, a paced replay for gyro
        raw["readers"] = [reader, {"kind": "replay", "speed": 1, "sensors": ["gyro"]}]
    assert build(raw).worker.policy == policy


# -- 2. a JSONL file that is already used, or cannot be written ------------------------------


def run_cli(tmp_path: Path, publisher: dict, *extra: str) -> subprocess.CompletedProcess:
    raw = config({"kind": "replay", "speed": "max", "start_s": 100, "duration_s": 4})
    raw["publishers"] = [publisher]
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return subprocess.run(
        [*CLI, "run", str(path), *extra], capture_output=True, text=True, timeout=300
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line the CLI printed for a refused run (logging may add INFO lines)."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr
    assert result.stdout == ""  # refused while building: nothing was read or predicted
    return errors[0]


def test_a_predictions_file_that_holds_records_is_refused_unless_appending(tmp_path):
    out = tmp_path / "p.jsonl"
    out.write_text('{"seq": 0}\n')
    line = error_line(run_cli(tmp_path, {"kind": "jsonl", "path": "p.jsonl"}))
    assert line.startswith("crossl-stream run: error: predictions file ")
    assert str(out) in line and "already exists and is not empty" in line
    assert "--append (CLI)" in line and "append: true (config)" in line
    assert "choose another path" in line
    assert out.read_text() == '{"seq": 0}\n'  # untouched
    # appending on purpose: the old line stays, the run's records follow it
    section = {"kind": "replay", "speed": "max", "start_s": 100, "duration_s": 4}
    raw = config(section)
    raw["publishers"] = [{"kind": "jsonl", "path": "p.jsonl", "append": True}]
    records = play(build(raw, tmp_path))
    lines = out.read_text().splitlines()
    assert lines[0] == '{"seq": 0}' and len(records) > 3
    assert [json.loads(x)["t_window_end"] for x in lines[1:]] == [
        r["t_window_end"] for r in records
    ]
    # an empty file is not a used one
    (tmp_path / "empty.jsonl").touch()
    raw["publishers"] = [{"kind": "jsonl", "path": "empty.jsonl"}]
    assert len(play(build(raw, tmp_path))) == len(records)
    assert len((tmp_path / "empty.jsonl").read_text().splitlines()) == len(records)


def test_a_predictions_path_that_is_a_folder_is_refused_in_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    line = error_line(run_cli(tmp_path, {"kind": "jsonl", "path": "out"}))
    assert f"predictions file {tmp_path / 'out'} is a folder" in line


def test_a_predictions_folder_that_cannot_be_made_is_refused_in_one_line(tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder\n")
    line = error_line(run_cli(tmp_path, {"kind": "jsonl", "path": "taken/sub/p.jsonl"}))
    assert f"predictions file {tmp_path / 'taken' / 'sub' / 'p.jsonl'}" in line
    assert f"cannot create its folder {tmp_path / 'taken' / 'sub'}" in line


def test_two_publishers_on_one_file_are_refused(tmp_path):
    raw = config()
    raw["publishers"] = [
        {"kind": "jsonl", "path": "p.jsonl"},
        {"kind": "jsonl", "path": str(tmp_path / "p.jsonl")},
    ]
    with pytest.raises(ConfigError, match="predictions are written to .*p.jsonl twice"):
        build(raw, tmp_path)


# -- 3. a configured rate the recording disagrees with ---------------------------------------


def recording(tmp_path: Path, gyro_rate: float) -> Path:
    t = 1000 + np.arange(0, 10, 0.02)
    x = np.zeros((len(t), 3), np.float32)
    return write_xdf(
        tmp_path / "rates.xdf",
        [XdfStream("acc", "Accelerometer", t, x, 50.0), XdfStream("gyro", "Gyro", t, x, gyro_rate)],
    )


def test_a_sensor_rate_the_recording_disagrees_with_is_refused_naming_both(tmp_path):
    raw = config({"kind": "replay", "path": str(recording(tmp_path, 100.0))})
    with pytest.raises(ConfigError) as err:
        build(raw)
    assert str(err.value) == (
        "test.yaml: sensors.gyro.rate_hz: 50 Hz, but stream 'gyro' of rates.xdf has a nominal "
        "rate of 100 Hz"
    )
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rate", [50.4, 0.0])  # within 1%; irregular (nothing to compare)
def test_a_rate_within_one_percent_or_an_irregular_stream_is_accepted(tmp_path, rate):
    raw = config({"kind": "replay", "path": str(recording(tmp_path, rate))})
    assert build(raw).readers[0].sensors["gyro"].rate_hz == rate


def test_the_lsl_reader_gets_the_window_connect_grace():
    cfg = load_config(CONFIGS / "lab-lsl.yaml", PipelineConfig)
    reader = Pipeline.from_config(cfg, CONFIGS, "lab-lsl.yaml").readers[0]
    assert reader.connect_grace_s == cfg.window.connect_grace_s == 3.0


# -- 5. `play` to live outlets in real time only ---------------------------------------------


@pytest.mark.parametrize("target", ["lsl", "mqtt"])
def test_play_to_live_outlets_refuses_another_speed_in_one_line(target):
    broker = ["--broker", "127.0.0.1:9"] if target == "mqtt" else []  # never reached
    result = subprocess.run(
        [*CLI, "play", "--to", target, "--speed", "5", *broker],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""  # nothing was played
    live = "LSL outlets" if target == "lsl" else "MQTT devices"
    assert result.stderr.splitlines() == [
        f"crossl-stream play: error: --speed 5: {live} play in real time only (a faster play "
        "would stamp 50 Hz samples 5x closer together); "
        "use 'crossl-stream replay --speed 5' to run a recording at another pace through the "
        "model"
    ]
