"""Predictor and InferenceWorker: batch equivalence, masks, latency stamps, backpressure."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import numpy as np
import pytest
import torch

from crossl_stream.clock import host_clock
from crossl_stream.errors import InputError
from crossl_stream.inference import InferenceWorker, Prediction, Predictor
from crossl_stream.model import CroSSL
from crossl_stream.states import StreamState
from crossl_stream.windower import Window


def windows_of(excerpt, drop_gyro_every=3):
    out = []
    for i in range(len(excerpt)):
        gyro = i % drop_gyro_every != 0
        data = {"acc": excerpt.x["acc"][i], "gyro": excerpt.x["gyro"][i] * gyro}
        now = host_clock()
        out.append(
            Window(
                seq=i + 1,
                t_end=100.0 + i,
                data=data,
                available={"acc": True, "gyro": gyro},
                coverage={"acc": 1.0, "gyro": 1.0 if gyro else 0.0},
                states={"acc": StreamState.LIVE, "gyro": StreamState.LIVE},
                t_last_arrival=now - 0.001,
                t_emitted=now,
            )
        )
    return out


def test_batched_predictions_equal_offline_inference(model, excerpt):
    windows = windows_of(excerpt)
    preds = Predictor(model, device="cpu", max_batch=7)(windows)
    mask = np.array([[True, i % 3 != 0] for i in range(len(windows))])
    offline = model.predict_proba({"acc": excerpt.x["acc"], "gyro": excerpt.x["gyro"]}, mask)
    got = np.array([list(p.probs.values()) for p in preds])
    np.testing.assert_allclose(got, offline, rtol=1e-5, atol=1e-6)
    assert [p.seq for p in preds] == list(range(1, len(windows) + 1))
    assert preds[0].mask == {"acc": True, "gyro": False}
    assert preds[0].label == max(preds[0].probs, key=preds[0].probs.get)


def test_record_follows_the_wire_contract(model, excerpt):
    record = Predictor(model, device="cpu", model_id="test@1")(windows_of(excerpt)[:1])[0].record()
    assert {"t_window_end", "label", "probs", "mask", "model", "latency_ms", "seq"} <= set(record)
    fields = {f.name for f in dataclasses.fields(Prediction)} - {"t_last_arrival"}
    assert set(record) == fields  # the record is built by hand: it must not miss a field
    json.dumps(record)
    assert record["model"] == "test@1"
    assert record["states"] == {"acc": "live", "gyro": "live"}
    assert set(record["latency_ms"]) == {"window", "queue", "infer"}
    assert all(v >= 0 for v in record["latency_ms"].values())
    assert record["latency_ms"]["window"] == pytest.approx(1.0, abs=1e-6)


def test_a_window_missing_one_sensor_goes_to_the_fallback_trained_without_it(model, specs, excerpt):
    torch.manual_seed(1)
    acc_only = CroSSL([s for s in specs if s.name == "acc"], model.classes).eval()
    fallback = Predictor(acc_only, device="cpu", model_id="m@1/without-gyro@2")
    predictor = Predictor(model, device="cpu", max_batch=5, fallbacks={"gyro": fallback})
    windows = windows_of(excerpt)  # gyro missing in every third window
    preds = predictor(windows)
    assert [p.seq for p in preds] == [w.seq for w in windows]
    missing = np.array([i % 3 == 0 for i in range(len(windows))])
    assert [p.model for p in preds] == ["m@1/without-gyro@2" if m else "crossl" for m in missing]
    got = np.array([list(p.probs.values()) for p in preds])
    want = acc_only.predict_proba({"acc": excerpt.x["acc"][missing]})
    np.testing.assert_allclose(got[missing], want, rtol=1e-5, atol=1e-6)
    both = model.predict_proba({k: v[~missing] for k, v in excerpt.x.items()})
    np.testing.assert_allclose(got[~missing], both, rtol=1e-5, atol=1e-6)
    assert preds[0].mask == {"acc": True, "gyro": False}  # what the window missed
    assert predictor.fallback_windows == {"gyro": int(missing.sum())}
    # a window missing the sensor that has no fallback is the main model's, masked
    no_acc = dataclasses.replace(windows[1], available={"acc": False, "gyro": True})
    assert predictor([no_acc])[0].model == "crossl"
    # a fallback that is not the model less that sensor is refused by name
    with pytest.raises(InputError, match="fallback without 'acc'"):
        Predictor(model, device="cpu", fallbacks={"acc": fallback})
    other = Predictor(CroSSL(acc_only.modalities, ["x", "y"]), device="cpu")
    with pytest.raises(InputError, match="classes"):
        Predictor(model, device="cpu", fallbacks={"gyro": other})


def test_mismatched_windows_and_devices_are_refused(model, excerpt):
    w = windows_of(excerpt)[0]
    w.data["emg"] = w.data.pop("gyro")
    with pytest.raises(InputError, match="do not match the model"):
        Predictor(model, device="cpu")([w])
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            Predictor(model, device="cuda")


def test_drop_oldest_keeps_the_newest_and_counts_drops(model, excerpt):
    async def scenario():
        worker = InferenceWorker(Predictor(model, "cpu", max_batch=4), queue_size=4)
        for w in windows_of(excerpt)[:10]:
            await worker.put(w)
        worker.close()
        return worker, [p async for p in worker.predictions()]

    worker, preds = asyncio.run(scenario())
    assert [p.seq for p in preds] == [7, 8, 9, 10]
    assert worker.counters.dropped == 6 and worker.counters.predictions == 4


def test_block_policy_loses_nothing_and_keeps_order(model, excerpt):
    async def scenario():
        worker = InferenceWorker(Predictor(model, "cpu", max_batch=3), queue_size=2, policy="block")
        windows = windows_of(excerpt)

        async def produce():
            for w in windows:
                await worker.put(w)
            worker.close()

        producer = asyncio.create_task(produce())
        preds = [p async for p in worker.predictions()]
        await producer
        return worker, windows, preds

    worker, windows, preds = asyncio.run(scenario())
    assert [p.seq for p in preds] == [w.seq for w in windows]
    assert worker.counters.dropped == 0
    assert worker.counters.batches >= len(windows) // 3


def test_a_subject_that_left_is_forgotten_once_its_queued_windows_are_predicted(model, excerpt):
    """Forgetting while the subject's last windows still queue would let them make its
    state anew, held until evicted; the worker forgets once they are through."""
    from crossl_stream.model.streaming import StreamingCroSSL

    async def scenario():
        streaming = StreamingCroSSL(model, max_streams=4)
        worker = InferenceWorker(Predictor(model, "cpu", max_batch=2, streaming=streaming))
        windows = windows_of(excerpt)[:6]
        for i, w in enumerate(windows):
            w.subject = "left" if i < 4 else "stays"
            await worker.put(w)
        worker.forget("left")  # four of its windows still queued
        assert streaming.streams == 0
        stream = worker.predictions()
        seen = [await anext(stream) for _ in range(len(windows))]
        return streaming, seen

    streaming, seen = asyncio.run(scenario())
    assert [p.subject for p in seen] == ["left"] * 4 + ["stays"] * 2
    assert streaming.streams == 1 and streaming.evicted == 0  # "stays" only
