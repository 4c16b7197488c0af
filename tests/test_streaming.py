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
from crossl_stream.model.specs import Mark
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
    """Subjects' continuous recordings, cut into 2 s windows on a 0.2 s hop grid."""

    def __init__(self, seed: int = 0, seconds: float = 30.0, subjects: int = 2) -> None:
        rng = np.random.default_rng(seed)
        self.data = {
            f"s{i + 1}": {
                m.name: rng.normal(size=(m.channels, round(seconds * m.rate_hz))).astype(np.float32)
                for m in SPECS
            }
            for i in range(subjects)
        }

    def window(self, subject: str, k: int, epoch: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
        """Window k of a subject (it ends at 2 + k * hop seconds) and its marks."""
        out, marks = {}, {}
        for m in SPECS:
            start = round(k * HOP_S * m.rate_hz)
            out[m.name] = self.data[subject][m.name][:, start : start + m.samples]
            marks[m.name] = Mark(epoch or 1 + int(subject[1:]), start)
        return marks, out


BOTH = np.ones((1, 2), dtype=bool)


def after_window_zero(k: int = 1):
    """The mlp model, a StreamingCroSSL that has seen window 0 of s1, and window k of s1."""
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model)
    m0, w0 = streams.window("s1", 0)
    streaming(["s1"], [w0], BOTH, [m0])
    marks, w = streams.window("s1", k)
    return model, streaming, marks, w


def full_model(model: CroSSL, data: list[dict], available: np.ndarray) -> np.ndarray:
    stacked = {m.name: np.stack([d[m.name] for d in data]) for m in SPECS}
    return model.predict_proba(stacked, available)


@settings(max_examples=40, deadline=None)
@given(
    aggregator=st.sampled_from(["mlp", "attention"]),
    plan=st.lists(
        st.tuples(
            st.sampled_from(["s1", "s2", "s3", "s4", "s5"]),
            st.integers(1, 3),  # hops since this subject's previous window (2, 3: drops)
            st.sampled_from([(True, True), (True, False), (False, True)]),
            st.sampled_from(["final", "not final", "new epoch", "no mark", "leaves"]),
        ),
        min_size=1,
        max_size=60,
    ),
    cuts=st.lists(st.integers(1, 12), min_size=1, max_size=10),
    max_streams=st.integers(2, 6),
)
def test_streaming_gives_the_full_models_probabilities(aggregator, plan, cuts, max_streams):
    """Many subjects in any batching, with drops, masks, resets, unmarked and unfinished
    windows, subjects leaving and more subjects than kept streams: the full model's output."""
    model, streams = MODELS[aggregator], Streams(subjects=5)
    k = dict.fromkeys(streams.data, 0)
    epoch = {s: 1 + i for i, s in enumerate(streams.data)}
    steps = []
    for subject, step, mask, how in plan:
        k[subject] += step
        if how == "new epoch":  # the windower started over: nothing may be reused
            epoch[subject] += 10
        marks, window = streams.window(subject, k[subject], epoch[subject])
        if how == "no mark":
            marks = dict.fromkeys(marks)
        elif how == "not final":
            marks = {n: mk._replace(final=False) for n, mk in marks.items()}
            window = {n: x.copy() for n, x in window.items()}  # its end may change later
            window["fast"][:, -1] += 1.0
            window["slow"][:, -1] -= 1.0
        steps.append((subject, marks, window, mask, how == "leaves"))
    expected = full_model(model, [w for _, _, w, _, _ in steps], np.array([s[3] for s in steps]))
    streaming = StreamingCroSSL(model, max_streams=max_streams)
    got, start, i = [], 0, 0
    while start < len(steps):  # the same windows in batches of various sizes
        batch = steps[start : start + cuts[i % len(cuts)]]
        got.append(
            streaming(
                [b[0] for b in batch],
                [b[2] for b in batch],
                np.array([b[3] for b in batch]),
                [b[1] for b in batch],
            )
        )
        for subject, *_, leaves in batch:
            if leaves:
                streaming.forget(subject)
        start, i = start + len(batch), i + 1
    np.testing.assert_allclose(np.concatenate(got), expected, atol=2e-5)
    seen = sum(c.reused + c.full for c in streaming.counters.values())
    assert seen == sum(int(np.sum(s[3])) for s in steps)
    assert streaming.streams <= max_streams


def test_a_hop_of_many_subjects_is_one_batch_and_matches_the_full_model():
    model, streams = MODELS["mlp"], Streams(subjects=40, seconds=8.0)
    streaming = StreamingCroSSL(model, max_streams=64)
    subjects = list(streams.data)
    rng = np.random.default_rng(0)
    for k in range(12):
        here = [s for s in subjects if rng.random() < 0.9]  # some skip a hop, some join late
        marks, data = zip(*(streams.window(s, k) for s in here), strict=True)
        available = rng.random((len(here), 2)) < 0.9
        available[~available.any(axis=1), 0] = True
        got = streaming(here, list(data), available, list(marks))
        np.testing.assert_allclose(got, full_model(model, list(data), available), atol=2e-5)
    assert streaming.counters["fast"].reused > 5 * streaming.counters["fast"].full


def test_consecutive_windows_encode_only_their_new_samples():
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model)
    marks, data = zip(*(streams.window("s1", k) for k in range(20)), strict=True)
    everything = np.ones((20, 2), dtype=bool)
    live = np.concatenate(
        [streaming(["s1"], [data[k]], everything[k : k + 1], [marks[k]]) for k in range(10)]
    )
    batch = streaming(["s1"] * 10, data[10:], everything[10:], marks[10:])  # one chain
    np.testing.assert_allclose(
        np.concatenate([live, batch]), full_model(model, list(data), everything), atol=2e-5
    )
    assert {n: (c.full, c.reused) for n, c in streaming.counters.items()} == {
        "fast": (1, 19),
        "slow": (1, 19),
    }


def test_a_new_epoch_an_unfinished_window_or_no_mark_is_encoded_in_full():
    for change in (
        lambda mk: mk._replace(epoch=mk.epoch + 1),
        lambda mk: None,
    ):
        model, streaming, marks, w1 = after_window_zero()
        got = streaming(["s1"], [w1], BOTH, [{n: change(mk) for n, mk in marks.items()}])
        np.testing.assert_allclose(got, full_model(model, [w1], BOTH), atol=2e-5)
        assert streaming.counters["fast"].reused == streaming.counters["slow"].reused == 0
    # window 1 is not final (its end may change): window 2 must not build on it
    model, streaming, marks, w1 = after_window_zero()
    streaming(["s1"], [w1], BOTH, [{n: mk._replace(final=False) for n, mk in marks.items()}])
    marks2, w2 = Streams().window("s1", 2)
    got = streaming(["s1"], [w2], BOTH, [marks2])
    np.testing.assert_allclose(got, full_model(model, [w2], BOTH), atol=2e-5)
    assert streaming.counters["fast"].reused == 1 and streaming.counters["fast"].full == 2


@pytest.mark.parametrize("hops", [1, 2, 3])
def test_shifts_up_to_a_windows_feature_span_reuse_and_beyond_it_do_not(hops):
    # "slow": 50 samples, 5 feature columns; a hop is 5 samples: 1 hop reuses, 2 cannot
    model, streaming, marks, w1 = after_window_zero(hops)
    got = streaming(["s1"], [w1], BOTH, [marks])
    np.testing.assert_allclose(got, full_model(model, [w1], BOTH), atol=2e-5)
    span = SPECS[1].samples - model.receptive_field + 1
    assert streaming.counters["slow"].reused == int(5 * hops <= span)


def test_windows_out_of_order_or_repeated_are_still_right():
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model)
    both = np.ones((6, 2), dtype=bool)
    order = [3, 1, 2, 2, 5, 4]
    marks, data = zip(*(streams.window("s1", k) for k in order), strict=True)
    got = streaming(["s1"] * 6, list(data), both, list(marks))
    np.testing.assert_allclose(got, full_model(model, list(data), both), atol=2e-5)
    # 1 -> 2 reuses for both; 2 -> 5 (three hops) only for "fast", whose span is 55 columns
    assert (streaming.counters["fast"].reused, streaming.counters["slow"].reused) == (2, 1)


def test_bad_windows_are_refused_and_keep_nothing_half_done():
    model, streaming, marks, w1 = after_window_zero()
    bad = {"fast": w1["fast"], "slow": w1["slow"].copy()}
    bad["slow"][0, -1] = np.nan  # among the new samples
    with pytest.raises(InputError, match="modality 'slow'.*NaN"):
        streaming(["s1"], [bad], BOTH, [marks])
    with pytest.raises(InputError, match=r"modality 'fast'.*\[3, 100\], got \[3, 99\]"):
        streaming(["s1"], [{"fast": w1["fast"][:, 1:], "slow": w1["slow"]}], BOTH, [marks])
    got = streaming(["s1"], [w1], BOTH, [marks])
    np.testing.assert_allclose(got, full_model(model, [w1], BOTH), atol=2e-5)
    assert streaming.counters["fast"].reused >= 1


def test_subjects_are_kept_apart_evicted_and_forgotten():
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model, max_streams=1)
    for k in range(3):
        for subject in ("s1", "s2"):
            marks, w = streams.window(subject, k)
            got = streaming([subject], [w], BOTH, [marks])
            np.testing.assert_allclose(got, full_model(model, [w], BOTH), atol=2e-5)
    # one stream kept: the two subjects evict each other, so nothing was ever reused
    assert streaming.counters["fast"].reused == 0 and streaming.evicted == 5
    streaming = StreamingCroSSL(model)
    for k in range(2):
        marks, w = streams.window("s1", k)
        streaming(["s1"], [w], BOTH, [marks])
    streaming.forget("s1")
    marks, w = streams.window("s1", 2)
    streaming(["s1"], [w], BOTH, [marks])
    assert streaming.counters["fast"].full == 2 and streaming.streams == 1


def test_bf16_keeps_the_labels_and_stays_close_to_fp32():
    model, streams = MODELS["attention"], Streams(subjects=8, seconds=6.0)
    exact = StreamingCroSSL(model, precision="fp32")
    half = StreamingCroSSL(model, precision="bf16")
    subjects = list(streams.data)
    worst = 0.0
    for k in range(10):
        marks, data = zip(*(streams.window(s, k) for s in subjects), strict=True)
        every = np.ones((len(subjects), 2), dtype=bool)
        a = exact(subjects, list(data), every, list(marks))
        b = half(subjects, list(data), every, list(marks))
        worst = max(worst, float(np.abs(a - b).max()))
    assert 0 < worst < 0.05


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    gap_every=st.integers(3, 30),
    nan_every=st.integers(4, 40),
    lateness=st.sampled_from([0.0, 0.05]),
)
def test_windows_cut_by_the_windower_stream_to_the_full_models_output(
    seed, gap_every, nan_every, lateness
):
    """The marks the real windower stamps keep their promise: with jittered timestamps,
    irregular chunks, gaps, NaN samples and sensors going stale, streaming equals the
    full model on every window the windower emits."""
    from crossl_stream.windower import Windower

    model = MODELS["mlp"]
    rng = np.random.default_rng(seed)
    windower = Windower(SPECS, hop_s=HOP_S, lateness_s=lateness, stale_s=0.3)
    streaming = StreamingCroSSL(model)
    t = dict.fromkeys(("fast", "slow"), 0.0)
    rate = {m.name: m.rate_hz for m in SPECS}
    windows, now, chunk = [], 0.0, 0
    while now < 12.0:
        name = min(t, key=t.get)
        n = int(rng.integers(1, 9))
        stamps = t[name] + (np.arange(n) + rng.uniform(-0.2, 0.2, n)) / rate[name]
        values = rng.normal(size=(n, 3 if name == "fast" else 2)).astype(np.float32)
        if chunk % nan_every == 0:
            values[rng.integers(n)] = np.nan
        t[name] += n / rate[name]
        now = max(now, float(stamps.max()))
        chunk += 1
        if chunk % gap_every == 0:
            continue  # a lost chunk: a gap in the stream
        windower.push(name, values, np.sort(stamps), arrival=now)
        windows += windower.poll(now)
    assert len(windows) > 20
    got = []
    for start in range(0, len(windows), 5):
        batch = windows[start : start + 5]
        available = np.array([[w.available[m.name] for m in SPECS] for w in batch])
        got.append(
            streaming(
                ["s"] * len(batch), [w.data for w in batch], available, [w.marks for w in batch]
            )
        )
    available = np.array([[w.available[m.name] for m in SPECS] for w in windows])
    expected = full_model(model, [w.data for w in windows], available)
    np.testing.assert_allclose(np.concatenate(got), expected, atol=2e-5)
    assert streaming.counters["fast"].reused > 0


def test_small_live_hops_in_the_onnx_hop_graph_match_torch(tmp_path):
    """stream.onnx runs a live hop in one call; subjects joining (whole windows), sensors
    coming and going and larger hops go through torch; both keep one state."""
    from crossl_stream.model.export import OnnxStep, export_stream
    from crossl_stream.model.streaming import FUSED_MAX

    model, streams = MODELS["attention"], Streams(subjects=FUSED_MAX + 2, seconds=8.0)
    path = export_stream(model, tmp_path / "stream.onnx", "digest-1")
    fused = StreamingCroSSL(model, step=OnnxStep(path, model, "digest-1"))
    eager = StreamingCroSSL(model)
    subjects = list(streams.data)
    rng = np.random.default_rng(1)
    for k in range(12):
        here = subjects[:3] if k < 6 else subjects  # a crowd joins: more than FUSED_MAX
        marks, data = zip(*(streams.window(s, k) for s in here), strict=True)
        available = np.ones((len(here), 2), dtype=bool)
        available[0, 0] = k != 3  # "fast" of one subject is masked for a hop
        if k >= 8:
            available = rng.random((len(here), 2)) < 0.8
            available[~available.any(axis=1), 0] = True
        a = fused(here, list(data), available, list(marks))
        b = eager(here, list(data), available, list(marks))
        np.testing.assert_allclose(a, b, atol=2e-5)
        np.testing.assert_allclose(a, full_model(model, list(data), available), atol=2e-5)
    # hops 1, 2, 3 and 5: hop 0 is whole windows, hop 4 has two shifts of "fast" (the
    # masked subject catches up by two hops), the crowd's are whole windows or too many
    assert fused.fused_hops == 4
    # one subject alone again, live: a reset, an unfinished window and a NaN on the way
    fused = StreamingCroSSL(model, step=OnnxStep(path, model, "digest-1"))
    both = np.ones((1, 2), dtype=bool)
    for k in range(12):
        marks, data = streams.window("s1", k, epoch=1 if k < 5 else 2)  # k = 5: a reset
        if k == 8:
            marks = {n: mk._replace(final=False) for n, mk in marks.items()}
        if k == 10:
            bad = {n: x.copy() for n, x in data.items()}
            bad["fast"][0, -1] = np.nan
            with pytest.raises(InputError, match="NaN"):
                fused(["s1"], [bad], both, [marks])
        got = fused(["s1"], [data], both, [marks])
        np.testing.assert_allclose(got, full_model(model, [data], both), atol=2e-5)
    # whole at 0, 5 (reset) and 9 (after the unfinished 8); hops 1-4, 6-8, 10, 11 fused
    assert fused.fused_hops == 9 and fused.counters["fast"].full == 3
    with pytest.raises(CheckpointError, match="exported from other weights"):
        OnnxStep(path, model, "digest-2")


def test_one_subject_in_the_hop_graph_around_its_ring_and_with_a_sensor_away(tmp_path):
    """The one-window hop (slices, not index arrays) wraps the ring of feature columns
    ("fast": 55 columns, 10 a hop, so hop 6 wraps) and runs with a modality masked."""
    from crossl_stream.model.export import OnnxStep, export_stream

    model, streams = MODELS["mlp"], Streams(seconds=10.0)
    path = export_stream(model, tmp_path / "stream.onnx", "digest-1")
    fused = StreamingCroSSL(model, step=OnnxStep(path, model, "digest-1"))
    for k in range(16):
        marks, data = streams.window("s1", k)
        available = np.array([[True, k not in (9, 10)]])  # "slow" away for two hops
        got = fused(["s1"], [data], available, [marks])
        np.testing.assert_allclose(got, full_model(model, [data], available), atol=2e-5)
    # whole at 0; "slow" back at 11 after 15 of its 5 columns: it starts over in torch
    assert fused.fused_hops == 14
    assert fused.counters["fast"].full == 1 and fused.counters["slow"].full == 2


def test_a_call_that_fails_part_way_leaves_no_state_to_trust(monkeypatch):
    """The state moves on before the head runs: a failure there (a CUDA OOM, an interrupt)
    must not leave a subject building on it. float64 windows are taken as float32."""
    model, streams = MODELS["mlp"], Streams()
    streaming = StreamingCroSSL(model)
    head, calls = model.classify, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the head failed")
        return head(*args, **kwargs)

    monkeypatch.setattr(model, "classify", failing_once)
    for k in range(8):
        marks, data = streams.window("s1", k)
        data = {n: x.astype(np.float64) for n, x in data.items()}
        if k == 2:
            with pytest.raises(RuntimeError, match="the head failed"):
                streaming(["s1"], [data], BOTH, [marks])
            continue
        got = streaming(["s1"], [data], BOTH, [marks])
        np.testing.assert_allclose(got, full_model(model, [data], BOTH), atol=2e-5)
    # windows 0 and 3 (after the failure) whole, the rest reused
    assert streaming.counters["fast"].full == 2 and streaming.counters["fast"].reused == 5


def test_bf16_at_hops_large_enough_for_the_conv2d_path_stays_close_to_fp32():
    """oneDNN's bf16 conv2d gives wrong outputs for layers of few input channels on some CPUs
    (AMX, torch 2.13): such a layer must fall back to the GEMM, where the error is bf16's."""
    spec = ModalitySpec(name="emg", channels=8, rate_hz=500, samples=500)
    torch.manual_seed(0)
    model = CroSSL([spec], ["a", "b", "c"], ModelConfig(code_size=32)).eval()
    rng = np.random.default_rng(0)
    subjects, hop = 24, 50  # 24 x 50 new columns a hop: past _Layer.CONV_ROWS
    stream = rng.normal(size=(subjects, 8, 500 + 4 * hop)).astype(np.float32)
    exact = StreamingCroSSL(model, precision="fp32")
    half = StreamingCroSSL(model, precision="bf16")
    keys, every, worst = list(range(subjects)), np.ones((subjects, 1), dtype=bool), 0.0
    for k in range(5):
        data = [{"emg": stream[i, :, k * hop : k * hop + 500]} for i in keys]
        marks = [{"emg": Mark(1, k * hop)} for _ in keys]
        a, b = exact(keys, data, every, marks), half(keys, data, every, marks)
        worst = max(worst, float(np.abs(a - b).max()))
    assert half.counters["emg"].reused == 4 * subjects
    assert 0 < worst < 5e-3  # 3.7e-4 here; 0.038 with the wrong conv2d


def test_a_low_precision_conv_that_disagrees_with_its_gemm_is_not_used(monkeypatch):
    from crossl_stream.model import streaming

    w = torch.randn(16, 6, 8, generator=torch.Generator().manual_seed(1))
    conv = w.unsqueeze(2).contiguous(memory_format=torch.channels_last)
    gemm = w.permute(2, 1, 0).reshape(8 * 6, 16)
    assert streaming._conv_agrees(conv, gemm)
    for scale in (1.0, 1e-3):  # LayerNorm follows: a wrong conv is wrong at any scale
        assert not streaming._conv_agrees(conv * scale, gemm.flip(0) * scale)
    block = make_model().encoders["fast"].blocks[1]
    for agrees in (True, False):
        monkeypatch.setattr(streaming, "_conv_agrees", lambda conv, weight, a=agrees: a)
        layer = streaming._Layer(block, torch.bfloat16)
        assert (layer.conv is not None) is agrees
        assert streaming._Layer(block, torch.float32).conv is not None  # fp32: not checked


def test_bf16_state_through_replay_batches_evictions_and_leaves_stays_close_to_fp32():
    model, streams = MODELS["mlp"], Streams(subjects=6, seconds=8.0)
    exact, half = StreamingCroSSL(model, max_streams=4), StreamingCroSSL(model, 4, "bf16")
    worst, k = 0.0, {s: 0 for s in streams.data}
    plan = [["s1", "s2", "s3"], ["s1", "s1", "s1", "s4"], ["s5", "s6", "s2"], ["s1", "s3", "s3"]]
    for i, keys in enumerate(plan * 3):
        marks, data = [], []
        for key in keys:
            mk, w = streams.window(key, k[key])
            k[key] += 1
            marks.append(mk)
            data.append(w)
        every = np.ones((len(keys), 2), dtype=bool)
        every[0, 1] = i % 3 != 1  # a sensor that comes and goes
        a, b = exact(keys, data, every, marks), half(keys, data, every, marks)
        worst = max(worst, float(np.abs(a - b).max()))
        if i == 5:
            exact.forget("s2"), half.forget("s2")
    assert half.evicted == exact.evicted > 0 and half.streams == exact.streams
    assert half.counters["fast"].reused == exact.counters["fast"].reused > 0
    fast = half._mods[0]
    assert fast.tails[0].dtype == torch.bfloat16 and fast.ring.dtype == torch.float32
    assert 0 < worst < 0.05


def test_running_sums_are_recomputed_from_the_ring_and_stay_true_over_a_long_stream():
    from crossl_stream.model.streaming import RESYNC

    model, streams = MODELS["mlp"], Streams(subjects=3, seconds=2.0 + 0.2 * (2 * RESYNC + 5))
    streaming, subjects = StreamingCroSSL(model), list(streams.data)
    every = np.ones((3, 2), dtype=bool)
    for k in range(2 * RESYNC + 5):
        marks, data = zip(*(streams.window(s, k) for s in subjects), strict=True)
        probs = streaming(subjects, list(data), every, list(marks))
        for m in streaming._mods:
            due = [i for i in range(3) if k > 0 and i % RESYNC == (m.hops - 1) % RESYNC]
            exact = m.ring.sum(dim=1, dtype=torch.float64)
            assert torch.equal(m.sums[due], exact[due])  # just recomputed: exact
            assert float((m.sums[:3] - exact[:3]).abs().max()) < 1e-4  # 1.1e-5 here
    assert streaming.counters["fast"].reused == 3 * (2 * RESYNC + 4)
    assert np.allclose(probs, full_model(model, list(data), every), atol=1e-5)
