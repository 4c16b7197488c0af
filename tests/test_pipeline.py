"""Simulated sensors through the whole spine into a JSONL file."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from crossl_stream.inference import InferenceWorker, Predictor
from crossl_stream.pipeline import Pipeline, run_pipeline
from crossl_stream.publishers import JsonlPublisher
from crossl_stream.readers import SimulatedSensor, Simulator
from crossl_stream.readers.base import Chunk, Reader
from crossl_stream.windower import Windower

SENSORS = [
    SimulatedSensor("acc", 3, 50.0, chunk_s=0.1, jitter_s=0.01),
    # gyro runs at 100 Hz (resampled to the model's 50 Hz) and drops out for 2 s
    SimulatedSensor("gyro", 3, 100.0, chunk_s=0.05, jitter_s=0.01, dropouts=((3.0, 2.0),)),
]


def run(model, reader, path, policy="block"):
    windower = Windower(
        model.modalities, hop_s=0.25, lateness_s=0.02, stale_s=0.5, source_rates={"gyro": 100.0}
    )
    worker = InferenceWorker(Predictor(model, "cpu", max_batch=16), policy=policy)
    counters = asyncio.run(run_pipeline(reader, windower, worker, [JsonlPublisher(path)]))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return counters, windower, records


def test_simulated_session_is_predicted_with_the_dropout_masked(model, tmp_path):
    counters, windower, records = run(model, Simulator(SENSORS, 8.0), tmp_path / "p.jsonl")
    c = counters.counts
    assert c.predictions == c.windows == len(records) > 20  # acc always there: none empty
    assert [r["seq"] for r in records] == sorted(r["seq"] for r in records)
    ends = np.array([r["t_window_end"] for r in records])
    assert np.allclose(np.diff(ends), 0.25)
    # 2 s windows; gyro is silent over [1003, 1005): a window missing more than 20% of its
    # gyro samples is masked, one missing none uses gyro.
    during = [r for r in records if 1003.6 <= r["t_window_end"] <= 1006.4]
    clear = [r for r in records if r["t_window_end"] <= 1003.0 or r["t_window_end"] >= 1007.0]
    assert during and all(r["mask"] == {"acc": True, "gyro": False} for r in during)
    assert clear and all(r["mask"] == {"acc": True, "gyro": True} for r in clear)
    for r in records:
        assert abs(sum(r["probs"].values()) - 1) < 1e-5
        assert set(r["latency_ms"]) == {"window", "queue", "infer", "total"}
        assert r["latency_ms"]["total"] >= r["latency_ms"]["infer"] >= 0
    assert windower.counters.masked["gyro"] >= len(during)


def test_real_time_and_max_speed_give_the_same_predictions(model, tmp_path):
    fast = run(model, Simulator(SENSORS, 3.0), tmp_path / "fast.jsonl")[2]
    real = run(model, Simulator(SENSORS, 3.0, speed=4.0), tmp_path / "real.jsonl")[2]
    assert_same_predictions(fast, real)


def assert_same_predictions(a, b):
    """Same windows, labels and masks; probabilities equal up to float rounding (batches of
    different sizes take different kernel paths)."""
    keys = ("seq", "t_window_end", "label", "mask")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    probs = [list(r["probs"].values()) for r in a], [list(r["probs"].values()) for r in b]
    np.testing.assert_allclose(*probs, rtol=0, atol=1e-6)


class BrokenReader(Reader):
    """Real chunks with bad ones in between: wrong channel count and an unknown sensor."""

    def __init__(self, inner: Simulator) -> None:
        self.inner = inner
        self.sensors = inner.sensors

    async def chunks(self):
        async for c in self.inner.chunks():
            yield c
            if c.sensor == "acc":
                yield Chunk("acc", np.zeros((5, 4), np.float32), c.timestamps[:5], c.arrival, 0)
                yield Chunk("ecg", c.values, c.timestamps, c.arrival, c.received)


def test_bad_chunks_are_counted_and_the_stream_goes_on(model, tmp_path):
    good = run(model, Simulator(SENSORS, 3.0), tmp_path / "good.jsonl")
    bad = run(model, BrokenReader(Simulator(SENSORS, 3.0)), tmp_path / "bad.jsonl")
    acc_chunks = round(3.0 / 0.1)
    assert bad[0].counts.refused_chunks == {"input": 2 * acc_chunks}
    assert [r["probs"] for r in bad[2]] == [r["probs"] for r in good[2]]


class FailingPredictor(Predictor):
    """A model that breaks on its third batch (out of memory, a driver error, ...)."""

    calls = 0

    def __call__(self, windows):
        FailingPredictor.calls += 1
        if FailingPredictor.calls == 3:
            raise RuntimeError("the accelerator fell over")
        return super().__call__(windows)


def test_an_inference_failure_ends_the_run_with_its_error_instead_of_hanging(model, tmp_path):
    windower = Windower(model.modalities, hop_s=0.25, source_rates={"gyro": 100.0})
    worker = InferenceWorker(FailingPredictor(model, "cpu", max_batch=1), 2, policy="block")
    publisher = JsonlPublisher(tmp_path / "p.jsonl")

    async def main():
        return await asyncio.wait_for(
            run_pipeline(Simulator(SENSORS, 20.0), windower, worker, [publisher]), 60
        )

    with pytest.raises(RuntimeError, match="the accelerator fell over"):
        asyncio.run(main())
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2  # what came before


class DyingReader(Reader):
    """Real chunks, then the source fails (a broker that refuses us, a driver error)."""

    def __init__(self, inner: Simulator, after: int) -> None:
        self.inner, self.after = inner, after
        self.sensors = inner.sensors

    async def chunks(self):
        n = 0
        async for c in self.inner.chunks():
            yield c
            n += 1
            if n == self.after:
                raise OSError("the source went away")


def test_a_failing_reader_fails_the_run_after_draining_and_closing(model, tmp_path):
    good = run(model, Simulator(SENSORS, 6.0), tmp_path / "good.jsonl")[2]
    windower = Windower(
        model.modalities, hop_s=0.25, lateness_s=0.02, stale_s=0.5, source_rates={"gyro": 100.0}
    )
    worker = InferenceWorker(Predictor(model, "cpu", max_batch=16), policy="block")
    path = tmp_path / "dying.jsonl"
    with pytest.raises(OSError, match="the source went away"):
        asyncio.run(
            run_pipeline(
                DyingReader(Simulator(SENSORS, 6.0), 120), windower, worker, [JsonlPublisher(path)]
            )
        )
    drained = [json.loads(line) for line in path.read_text().splitlines()]
    assert drained and len(drained) < len(good)  # what was read was windowed and published
    assert [r["t_window_end"] for r in drained] == [r["t_window_end"] for r in good[: len(drained)]]


def test_subjects_whose_sensors_are_all_lost_are_retired(model):
    windower = Windower(model.modalities, hop_s=0.5, lost_s=2.0, source_rates={"gyro": 100.0})
    worker = InferenceWorker(Predictor(model, "cpu"), 64, policy="block")
    pipeline = Pipeline([Simulator(SENSORS, 1.0)], windower, worker, [])

    async def main():
        a = pipeline.windower_of("a")
        for name, rate in (("acc", 50.0), ("gyro", 100.0)):
            t = 100 + np.arange(0, 4, 1 / rate)
            a.push(name, np.ones((len(t), 3), np.float32), t, arrival=104.0)
        assert await pipeline.retire(now=105.0) == []  # stale, not lost yet
        assert await pipeline.retire(now=106.5) == ["a"]
        return worker.counters.windows_in

    flushed = asyncio.run(main())
    assert flushed == 5  # windows ending 102.0 ... 104.0 (the data ends at 103.99)
    assert set(pipeline.windowers) == {""}
