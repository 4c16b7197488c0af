"""Pipeline configs: `crossl-stream run`, checks against the model, receipt clocks, stop."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crossl_stream import default_model_dir
from crossl_stream.config import PipelineConfig, load_config
from crossl_stream.errors import CheckpointError, ConfigError, DatasetError
from crossl_stream.pipeline import Pipeline
from crossl_stream.publishers import MemoryPublisher
from crossl_stream.readers.base import Chunk, Reader, SensorInfo
from crossl_stream.training.datasets import shipped_recording
from crossl_stream.xdf import XdfStream, write_xdf
from tests.test_pipeline import assert_same_predictions

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLI = [sys.executable, "-m", "crossl_stream.cli"]
SENSORS = {"acc": {"channels": 3, "rate_hz": 50}, "gyro": {"channels": 3, "rate_hz": 50}}


def config(**changes) -> dict:
    """A replay of the shipped session through the default model, as a plain dict."""
    cfg = {
        "sensors": json.loads(json.dumps(SENSORS)),
        "readers": [{"kind": "replay", "speed": "max", "start_s": 100, "duration_s": 12}],
        "inference": {"model": str(default_model_dir()), "backpressure": "block"},
        "publishers": [],
    }
    cfg.update(changes)
    return cfg


def build(raw: dict, source: str = "test.yaml") -> Pipeline:
    return Pipeline.from_config(PipelineConfig.model_validate(raw), ".", source)


def play(pipeline: Pipeline) -> list[dict]:
    memory = MemoryPublisher()
    pipeline.publishers.append(memory)
    asyncio.run(pipeline.run())
    return memory.records


@pytest.mark.parametrize("name", ["replay.yaml", "simulate.yaml", "lab-lsl.yaml"])
def test_shipped_pipeline_configs_build_against_the_default_model(name):
    cfg = load_config(CONFIGS / name, PipelineConfig)
    pipeline = Pipeline.from_config(cfg, CONFIGS, name)
    assert pipeline.model.modality_names == ["acc", "gyro"]
    assert pipeline.worker.predictor.model_id.startswith("default@")


def test_run_at_real_time_and_at_max_speed_publishes_the_same_predictions(tmp_path):
    outputs = {}
    for speed in ("1", "max"):
        path = tmp_path / f"{speed}.yaml"
        pace = 1 if speed == "1" else "max"
        raw = config(readers=[{"kind": "replay", "speed": pace, "start_s": 40, "duration_s": 5}])
        raw["publishers"] = [{"kind": "jsonl", "path": f"{speed}.jsonl"}]  # next to the config
        path.write_text(json.dumps(raw))  # JSON is YAML
        result = subprocess.run(
            [*CLI, "run", str(path)], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr
        assert "accuracy" in result.stdout and "latency total p50" in result.stdout
        outputs[speed] = [json.loads(x) for x in (tmp_path / f"{speed}.jsonl").open()]
    assert len(outputs["1"]) == 7  # windows ending 42, 42.5, ... 45 s into the session
    assert_same_predictions(outputs["1"], outputs["max"])
    record = outputs["1"][0]
    assert record["model"].startswith("default@") and record["latency_ms"]["total"] > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sensors": {**SENSORS, "emg": {"channels": 8, "rate_hz": 1000}}}, "sensors.emg:"),
        (
            {"sensors": {"acc": SENSORS["acc"], "gyro": {"channels": 2, "rate_hz": 50}}},
            "sensors.gyro.channels: 2, but the model's 'gyro' has 3",
        ),
        ({"window": {"target_rates": {"acc": 25}}}, "window.target_rates.acc: 25 Hz"),
        ({"window": {"length_s": 3}}, "window.length_s: 3 s, but the model's windows are 2 s"),
    ],
)
def test_a_config_that_does_not_fit_the_model_is_refused_with_the_key(change, message):
    raw = config(**change)
    if "emg" in raw["sensors"]:
        raw["readers"][0]["sensors"] = ["acc", "gyro"]
        raw["readers"].append({"kind": "simulate", "duration_s": 1, "sensors": {"emg": {}}})
        raw["readers"][0]["speed"] = 1
    with pytest.raises(ConfigError, match="test.yaml: " + message.replace(".", r"\.")):
        build(raw)


def test_a_model_modality_without_a_sensor_is_refused():
    raw = config(sensors={"acc": SENSORS["acc"]})
    with pytest.raises(ConfigError, match="no sensor feeds the model's modality 'gyro'"):
        build(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"sensors": SENSORS, "readers": [{"kind": "replay", "sped": 2}]}, "readers.0.replay.sped"),
        ({"sensors": SENSORS, "readers": [{"kind": "replay", "speed": -1}]}, "speed"),
        ({"sensors": SENSORS, "readers": [{"kind": "tcp"}]}, "readers.0: Input tag 'tcp'"),
        ({"sensors": SENSORS, "readers": []}, "readers: Tuple should have at least 1 item"),
        (
            {"sensors": SENSORS, "readers": [{"kind": "replay", "sensors": ["acc"]}]},
            r"sensors \['gyro'\] are fed by no reader",
        ),
        (
            {
                "sensors": SENSORS,
                "readers": [
                    {"kind": "replay", "dropouts": [{"sensor": "ecg", "start_s": 1, "length_s": 1}]}
                ],
            },
            r"readers.0.dropouts: sensors \['ecg'\] are not replayed",
        ),
        (
            {
                "sensors": SENSORS,
                "readers": [
                    {"kind": "replay", "sensors": ["acc"]},
                    {"kind": "replay", "sensors": ["gyro"], "speed": 1},
                ],
            },
            "speed max runs on its own virtual clock",
        ),
        (
            {"sensors": SENSORS, "readers": [{"kind": "replay"}], "window": {"lost_s": 0.1}},
            r"lost_s \(0.1\) is shorter than stale_s",
        ),
        (
            {"sensors": SENSORS, "readers": [{"kind": "replay"}], "inference": {"device": "gpu"}},
            "inference.device: String should match pattern",
        ),
    ],
)
def test_bad_pipeline_configs_name_the_file_and_key(tmp_path, raw, message):
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=f"{path}: .*{message}"):
        load_config(path, PipelineConfig)


def test_cli_run_reports_a_bad_config_in_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sensors: {acc: {channels: 3, rate_hz: 50, colour: red}}\nreaders: []\n")
    result = subprocess.run([*CLI, "run", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sensors.acc.colour: unknown key" in result.stderr


def test_recordings_that_do_not_fit_the_config_are_refused(tmp_path):
    t = 1000 + np.arange(0, 10, 0.02)
    x = np.zeros((len(t), 4), np.float32)
    path = write_xdf(
        tmp_path / "four.xdf",
        [XdfStream("acc", "Accelerometer", t, x, 50.0), XdfStream("imu", "Gyro", t, x, 50.0)],
    )
    raw = config()
    raw["readers"][0] = {"kind": "replay", "path": str(path), "streams": {"gyro": "imu"}}
    with pytest.raises(ConfigError, match="sensors.acc.channels: 3, but stream 'acc' of four.xdf"):
        build(raw)
    raw["readers"][0]["streams"] = {}
    with pytest.raises(
        DatasetError,
        match=r"sensor 'gyro' \(name 'gyro' or type 'Gyroscope'\); the file has 'acc' \(type 'Acc",
    ):
        build(raw)


class UnstampedReader(Reader):
    """A device without usable timestamps: every chunk says t = 0."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.sensors = {s: SensorInfo(s, 3, 50.0) for s in ("acc", "gyro")}

    def now(self) -> None:
        return None  # virtual clock: arrival times below

    async def chunks(self):
        rng = np.random.default_rng(0)
        for k in range(1, round(self.seconds / 0.1) + 1):
            for s in self.sensors:
                values = rng.normal(size=(5, 3)).astype(np.float32)
                yield Chunk(s, values, np.zeros(5), 500.0 + k * 0.1, 0.0)


def test_receipt_clock_stamps_samples_from_their_arrival():
    raw = config()
    raw["sensors"]["gyro"]["clock"] = "receipt"
    raw["sensors"]["acc"]["clock"] = "receipt"
    pipeline = build(raw)
    pipeline.readers = [UnstampedReader(4.0)]
    records = play(pipeline)
    # 5 samples per 0.1 s chunk at 50 Hz, spread back from the arrival: a continuous stream
    assert [r["t_window_end"] for r in records] == [502.5, 503.0, 503.5, 504.0]
    assert all(r["mask"] == {"acc": True, "gyro": True} for r in records)
    assert sum(b.counters.out_of_order for b in pipeline.windower.buffers.values()) == 0
    # the same chunks on their own (broken) clock: all but the first sample refused, no
    # window predicted (the window positions the clock passed are published empty)
    pipeline = build(config())
    pipeline.readers = [UnstampedReader(4.0)]
    records = play(pipeline)
    assert records and all(r["label"] is None for r in records)
    assert pipeline.windower.buffers["acc"].counters.out_of_order == 40 * 5 - 1


def test_stop_ends_a_live_run_and_drains_what_was_read():
    raw = config()
    raw["readers"] = [{"kind": "replay", "speed": 1, "start_s": 100}]
    pipeline = build(raw)
    memory = MemoryPublisher()
    pipeline.publishers.append(memory)

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_later(3.5, pipeline.stop)
        return await asyncio.wait_for(pipeline.run(), timeout=30)

    c = asyncio.run(main()).counts
    assert c.predictions == c.windows == len(memory.records) >= 3
    assert memory.records[-1]["t_window_end"] - shipped_session_start() < 104.5


def shipped_session_start() -> float:
    from crossl_stream.readers.replay import Recording

    return Recording.load(shipped_recording()).start


def test_runtime_streams_in_torch_and_whole_windows_in_the_current_onnx_export(tmp_path):
    def runtime(window: dict | None = None, **inference) -> str:
        inference = {"model": str(default_model_dir()), **inference}
        changes = {"inference": inference} | ({"window": window} if window else {})
        return build(config(**changes)).worker.predictor.runtime

    assert runtime() == "onnxruntime, streaming"  # small hops in the shipped stream.onnx
    assert runtime(runtime="torch") == "torch, streaming"
    assert runtime(precision="bf16") == "torch, streaming, bf16"
    assert runtime(streaming=False) == "onnxruntime"
    assert runtime(runtime="onnx") == "onnxruntime"  # asked for: whole windows
    assert runtime(runtime="torch", streaming=False) == "torch"
    # a hop of 0.33 s is not a whole number of 50 Hz samples: windows share no samples
    assert runtime({"hop_s": 0.33}) == "onnxruntime"
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.json", "model.safetensors"):
        (bare / name).write_bytes((default_model_dir() / name).read_bytes())
    assert runtime(model=str(bare)) == "torch, streaming"
    assert runtime(model=str(bare), streaming=False) == "torch"
    with pytest.raises(CheckpointError, match="no ONNX export; run `crossl-stream export`"):
        runtime(model=str(bare), runtime="onnx")


def test_the_onnx_runtime_on_a_gpu_is_refused():
    from crossl_stream.pipeline import _onnx_session

    cuda = torch.device("cuda")  # only its type is looked at: no GPU needed
    with pytest.raises(ConfigError, match="runtime: onnx runs on the CPU here"):
        _onnx_session(default_model_dir(), "onnx", cuda, "test.yaml")


def test_streaming_and_whole_window_inference_publish_the_same_predictions():
    inference = {"model": str(default_model_dir()), "backpressure": "block"}
    dropouts = [{"sensor": "gyro", "start_s": 104, "length_s": 3}]
    reader = {
        "kind": "replay",
        "speed": "max",
        "start_s": 100,
        "duration_s": 12,
        "dropouts": dropouts,
    }
    streamed = build(config(inference=inference, readers=[reader]))
    whole = build(config(inference={**inference, "streaming": False}, readers=[reader]))
    a, b = play(streamed), play(whole)
    assert len(a) == len(b) > 15
    assert [r["mask"] for r in a] == [r["mask"] for r in b]
    assert not all(r["mask"]["gyro"] for r in a)  # the dropout masked some windows
    masked = streamed.windower.counters.masked
    assert masked == {m: sum(not r["mask"][m] for r in a) for m in ("acc", "gyro")}
    np.testing.assert_allclose(
        [list(r["probs"].values()) for r in a], [list(r["probs"].values()) for r in b], atol=1e-5
    )
    counters = streamed.worker.predictor.streaming.counters
    assert counters["acc"].reused > counters["acc"].full
