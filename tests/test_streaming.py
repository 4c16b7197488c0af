"""Streaming inference: windows that share samples share encoder features, and the result is
the full model's whatever the order, batching, masks, gaps and subjects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossl_stream.errors import CheckpointError, InputError
from crossl_stream.model import CroSSL, ModalitySpec, ModelConfig
from crossl_stream.model.export import OnnxRuntime, export_streaming
from crossl_stream.model.streaming import StreamingCroSSL

HOP_S = 0.2
SPECS = [  # 2 s windows; a hop is 10 samples of "fast" and 5 of "slow"
    ModalitySpec(name="fast", channels=3, rate_hz=50, samples=100),
    ModalitySpec(name="slow", channels=2, rate_hz=25, samples=50),
]


def make_model(aggregator: str = "mlp") -> CroSSL:
    torch.manual_seed(0)
    cfg = ModelConfig(code_size=16, aggregator=aggregator)
    model = CroSSL(SPECS, ["a", "b", "c"], cfg).eval()
    with torch.no_grad():
        model.mask_token.normal_()  # a masked modality must change the prediction
    return model


MODELS = {agg: make_model(agg) for agg in ("mlp", "attention")}


class Streams:
    """Two subjects' continuous recordings, cut into 2 s windows on a 0.2 s hop grid."""

    def __init__(self, seed: int = 0, seconds: float = 30.0) -> None:
        rng = np.random.default_rng(seed)
        self.data = {
            subject: {
                m.name: rng.normal(size=(m.channels, round(seconds * m.rate_hz))).astype(np.float32)
                for m in SPECS
            }
            for subject in ("s1", "s2")
        }

    def window(self, subject: str, k: int) -> tuple[float, dict[str, np.ndarray]]:
        """Window k of a subject: it ends at 2 + k * hop seconds."""
        out = {}
        for m in SPECS:
            start = round(k * HOP_S * m.rate_hz)
            out[m.name] = self.data[subject][m.name][:, start : start + m.samples]
        return 2.0 + k * HOP_S, out


BOTH = np.ones((1, 2), dtype=bool)


def after_window_zero(k: int = 1):
    """The mlp model, a StreamingCroSSL that has seen window 0 of s1, and window k of s1."""
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model)
    t0, w0 = streams.window("s1", 0)
    streaming(["s1"], [t0], [w0], BOTH)
    t, w = streams.window("s1", k)
    return model, streaming, t, w


def full_model(model: CroSSL, data: list[dict], available: np.ndarray) -> np.ndarray:
    stacked = {m.name: np.stack([d[m.name] for d in data]) for m in SPECS}
    return model.predict_proba(stacked, available)


@settings(max_examples=30, deadline=None)
@given(
    aggregator=st.sampled_from(["mlp", "attention"]),
    plan=st.lists(
        st.tuples(
            st.sampled_from(["s1", "s2"]),
            st.integers(1, 3),  # hops since this subject's previous window (2, 3: drops)
            st.sampled_from([(True, True), (True, False), (False, True)]),
            st.booleans(),  # a sample inside the overlap changed (a refilled gap)
        ),
        min_size=1,
        max_size=40,
    ),
    cuts=st.lists(st.integers(1, 8), min_size=1, max_size=10),
)
def test_streaming_gives_the_full_models_probabilities(aggregator, plan, cuts):
    model, streams = MODELS[aggregator], Streams()
    k = {"s1": 0, "s2": 0}
    keys, t_ends, data, available = [], [], [], []
    for subject, step, mask, refill in plan:
        k[subject] += step
        t_end, window = streams.window(subject, k[subject])
        if refill:
            window = {name: x.copy() for name, x in window.items()}
            window["fast"][0, 3] += 1.0
        keys.append(subject)
        t_ends.append(t_end)
        data.append(window)
        available.append(mask)
    available = np.array(available)
    expected = full_model(model, data, available)
    streaming = StreamingCroSSL(model)
    got, start, i = [], 0, 0
    while start < len(keys):  # the same windows in batches of various sizes
        stop = start + cuts[i % len(cuts)]
        got.append(
            streaming(keys[start:stop], t_ends[start:stop], data[start:stop], available[start:stop])
        )
        start, i = stop, i + 1
    np.testing.assert_allclose(np.concatenate(got), expected, atol=2e-5)
    seen = sum(c.reused + c.full for c in streaming.counters.values())
    assert seen == int(available.sum())


def test_consecutive_windows_encode_only_their_new_samples():
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model)
    ends, data = zip(*(streams.window("s1", k) for k in range(20)), strict=True)
    everything = np.ones((20, 2), dtype=bool)
    live = np.concatenate(
        [streaming(["s1"], [ends[k]], [data[k]], everything[k : k + 1]) for k in range(10)]
    )
    batch = streaming(["s1"] * 10, ends[10:], data[10:], everything[10:])  # one chain
    np.testing.assert_allclose(
        np.concatenate([live, batch]), full_model(model, list(data), everything), atol=2e-5
    )
    assert {n: (c.full, c.reused) for n, c in streaming.counters.items()} == {
        "fast": (1, 19),
        "slow": (1, 19),
    }


def test_a_changed_overlap_or_a_wrong_end_is_encoded_in_full():
    model, streaming, t1, w1 = after_window_zero()
    refilled = {name: x.copy() for name, x in w1.items()}
    refilled["slow"][1, 0] = 0.0  # the first sample: inside the overlap with w0
    got = streaming(["s1"], [t1], [refilled], BOTH)
    np.testing.assert_allclose(got, full_model(model, [refilled], BOTH), atol=2e-5)
    assert streaming.counters["slow"].full == 2 and streaming.counters["fast"].reused == 1
    # w1 claimed to end 12 fast (6 slow) samples after w0, not 10 (5): its samples are
    # compared at that shift, do not match, and the window is encoded whole
    model, streaming, t1, w1 = after_window_zero()
    got = streaming(["s1"], [t1 + 0.04], [w1], BOTH)
    np.testing.assert_allclose(got, full_model(model, [w1], BOTH), atol=2e-5)
    assert streaming.counters["fast"].reused == streaming.counters["slow"].reused == 0


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_shifts_up_to_a_windows_feature_span_reuse_and_beyond_it_do_not(hops):
    # "slow": 50 samples, 5 feature columns; a hop is 5 samples: 1 hop reuses, 2 cannot
    model, streaming, t1, w1 = after_window_zero(hops)
    got = streaming(["s1"], [t1], [w1], BOTH)
    np.testing.assert_allclose(got, full_model(model, [w1], BOTH), atol=2e-5)
    span = SPECS[1].samples - model.receptive_field + 1
    assert streaming.counters["slow"].reused == int(5 * hops <= span)


def test_windows_out_of_order_or_repeated_are_still_right():
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model)
    both = np.ones((6, 2), dtype=bool)
    order = [3, 1, 2, 2, 5, 4]
    ends, data = zip(*(streams.window("s1", k) for k in order), strict=True)
    got = streaming(["s1"] * 6, list(ends), list(data), both)
    np.testing.assert_allclose(got, full_model(model, list(data), both), atol=2e-5)
    # 1 -> 2 reuses for both; 2 -> 5 (three hops) only for "fast", whose span is 55 columns
    assert (streaming.counters["fast"].reused, streaming.counters["slow"].reused) == (2, 1)


def test_bad_windows_are_refused_and_keep_nothing_half_done():
    model, streaming, t1, w1 = after_window_zero()
    bad = {"fast": w1["fast"], "slow": np.full_like(w1["slow"], np.nan)}
    with pytest.raises(InputError, match="modality 'slow'.*NaN"):
        streaming(["s1"], [t1], [bad], BOTH)
    with pytest.raises(InputError, match=r"modality 'fast'.*\[3, 100\], got \[3, 99\]"):
        streaming(["s1"], [t1], [{"fast": w1["fast"][:, 1:], "slow": w1["slow"]}], BOTH)
    got = streaming(["s1"], [t1], [w1], BOTH)
    np.testing.assert_allclose(got, full_model(model, [w1], BOTH), atol=2e-5)


def test_subjects_are_kept_apart_and_forgotten():
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model, max_streams=1)
    for k in range(3):
        for subject in ("s1", "s2"):
            t, w = streams.window(subject, k)
            got = streaming([subject], [t], [w], BOTH)
            np.testing.assert_allclose(got, full_model(model, [w], BOTH), atol=2e-5)
    # one stream kept: the two subjects evict each other, so nothing was ever reused
    assert streaming.counters["fast"].reused == 0
    streaming = StreamingCroSSL(model)
    for k in range(2):
        t, w = streams.window("s1", k)
        streaming(["s1"], [t], [w], BOTH)
    streaming.forget("s1")
    t, w = streams.window("s1", 2)
    streaming(["s1"], [t], [w], BOTH)
    assert streaming.counters["fast"].full == 2


def test_onnx_streaming_graphs_match_torch_and_refuse_other_weights(tmp_path):
    model, streams = MODELS["attention"], Streams(seed=1)
    export_streaming(model, tmp_path, "digest-1")
    onnx = StreamingCroSSL(model, OnnxRuntime(tmp_path, model, "digest-1", threads=1))
    eager = StreamingCroSSL(model)
    rng = np.random.default_rng(0)
    for k in range(12):
        t, w = streams.window("s1", k + (k > 6))  # one window dropped
        mask = np.array([[True, bool(rng.random() < 0.7)]])
        np.testing.assert_allclose(
            onnx(["s1"], [t], [w], mask), eager(["s1"], [t], [w], mask), atol=2e-5
        )
    assert onnx.counters["fast"].reused > 5
    with pytest.raises(CheckpointError, match="exported from other weights"):
        OnnxRuntime(tmp_path, model, "digest-2")
