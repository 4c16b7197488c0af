"""Windower against a straightforward offline reference; chunking, order and dropouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossl_stream.errors import InputError
from crossl_stream.model.specs import ModalitySpec
from crossl_stream.states import StreamState
from crossl_stream.windower import Windower

EEG = ModalitySpec(name="eeg", channels=3, rate_hz=50, samples=50)  # 1 s at 50 Hz
IMU = ModalitySpec(name="imu", channels=2, rate_hz=20, samples=20)
SOURCE = {"eeg": 100.0, "imu": 25.0}  # sensors run at other rates than the model grid
HOP = 0.25


def reference_window(t, x, spec, t_end, source_rate, gap_periods=2.0):
    """Plain loops over the whole stream: each grid point interpolates the nearest finite
    samples before and after it (held at the ends); covered when one is within tolerance."""
    tol = gap_periods / source_rate
    grid = [t_end - spec.window_s + k / spec.rate_hz for k in range(spec.samples)]
    sel = [i for i in range(len(t)) if np.isfinite(x[i]).all()]
    out = np.zeros((spec.channels, spec.samples))
    covered = 0
    if not sel:
        return out, 0.0
    for k, g in enumerate(grid):
        before = [i for i in sel if t[i] < g]
        after = [i for i in sel if t[i] >= g]
        if before and after:
            a, b = before[-1], after[0]
            w = (g - t[a]) / (t[b] - t[a])
            out[:, k] = x[a] * (1 - w) + x[b] * w
            near = min(g - t[a], t[b] - g)
        else:
            i = after[0] if after else before[-1]
            out[:, k] = x[i]
            near = abs(t[i] - g)
        covered += near <= tol
    return out, covered / spec.samples


def make_stream(rng, rate, channels, duration, gaps, jitter):
    t = np.arange(0.0, duration, 1.0 / rate) + 100.0
    t = t + rng.uniform(0, jitter / rate, size=len(t))
    t = np.sort(t)
    keep = np.ones(len(t), bool)
    for start, length in gaps:
        keep &= ~((t >= 100.0 + start) & (t < 100.0 + start + length))
    t = t[keep]
    x = rng.normal(size=(len(t), channels)).astype(np.float32)
    if len(x) > 5:
        x[rng.integers(0, len(x), 2)] = np.nan
    return t, x


def feed(streams, chunk_sizes, lateness, rng_seed):
    """Push each stream in chunks, in order of arrival, polling after every chunk."""
    w = Windower(
        [EEG, IMU],
        hop_s=HOP,
        lateness_s=lateness,
        stale_s=60,
        lost_s=120,
        source_rates=SOURCE,
        connect_grace_s=5.0,  # longer than the slowest first chunk
    )
    rng = np.random.default_rng(rng_seed)
    events = []
    for name, (t, x) in streams.items():
        i = 0
        while i < len(t):
            n = int(rng.integers(1, chunk_sizes + 1))
            events.append((t[i : i + n][-1] + 0.003, name, x[i : i + n], t[i : i + n]))
            i += n
    events.sort(key=lambda e: e[0])
    windows = []
    for arrival, name, x, t in events:
        w.push(name, x, t, arrival)
        windows += w.poll(now=arrival)
    windows += w.flush()
    return w, windows


gap = st.tuples(st.floats(0, 6), st.floats(0.05, 2))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    gaps_eeg=st.lists(gap, max_size=2),
    gaps_imu=st.lists(gap, max_size=2),
    chunk=st.integers(1, 40),
    lateness=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_streaming_equals_the_offline_reference(seed, gaps_eeg, gaps_imu, chunk, lateness):
    rng = np.random.default_rng(seed)
    streams = {
        "eeg": make_stream(rng, SOURCE["eeg"], 3, 6.0, gaps_eeg, jitter=0.3),
        "imu": make_stream(rng, SOURCE["imu"], 2, 6.0, gaps_imu, jitter=0.3),
    }
    w, windows = feed(streams, chunk, lateness, seed)
    ends = [win.t_end for win in windows]
    assert ends == sorted(set(ends))
    assert all(abs(e / HOP - round(e / HOP)) < 1e-9 for e in ends)
    first = min(s[0][0] for s in streams.values() if len(s[0]))
    last = max(s[0][-1] for s in streams.values() if len(s[0]))
    # at the end, a window needs no sample past its last grid point (the finest grid's)
    step = 1 / max(EEG.rate_hz, IMU.rate_hz)
    expected_ends = np.arange(math.ceil((first + 1.0) / HOP) * HOP, last + step + 1e-9, HOP)
    by_end = {round(win.t_end / HOP): win for win in windows}
    emitted = empty = 0
    for t_end in expected_ends:
        refs = {
            spec.name: reference_window(*streams[spec.name], spec, t_end, SOURCE[spec.name])
            for spec in (EEG, IMU)
        }
        available = {k: cov >= 0.8 for k, (_, cov) in refs.items()}
        win = by_end.get(round(t_end / HOP))
        if not any(available.values()):
            assert win is None  # nothing to predict from: not emitted, counted
            empty += 1
            continue
        assert win is not None, f"window ending {t_end} missing"
        emitted += 1
        for name, (ref, cov) in refs.items():
            assert win.coverage[name] == pytest.approx(cov)
            assert win.available[name] == available[name]
            if available[name]:
                np.testing.assert_allclose(win.data[name], ref, atol=1e-5)
            else:
                assert not win.data[name].any()
    assert emitted == len(windows) == w.counters.windows
    assert w.counters.empty_windows == empty
    for name, (_, x) in streams.items():  # each bad sample counted once, not once per window
        assert w.counters.nan_samples[name] == int((~np.isfinite(x).all(axis=1)).sum())


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), a=st.integers(1, 64), b=st.integers(1, 64))
def test_chunking_does_not_change_the_windows(seed, a, b):
    rng = np.random.default_rng(seed)
    streams = {
        "eeg": make_stream(rng, SOURCE["eeg"], 3, 4.0, [], jitter=0.5),
        "imu": make_stream(rng, SOURCE["imu"], 2, 4.0, [(1.0, 0.7)], jitter=0.5),
    }
    _, one = feed(streams, a, 0.05, seed)
    _, two = feed(streams, b, 0.05, seed + 1)
    assert [x.t_end for x in one] == [x.t_end for x in two]
    for p, q in zip(one, two, strict=True):
        assert p.available == q.available
        for name in p.data:
            assert np.array_equal(p.data[name], q.data[name])


def regular(rate, start, stop, channels):
    t = np.arange(start, stop, 1.0 / rate)
    return np.ones((len(t), channels), np.float32), t


def test_a_sensor_that_stops_is_masked_and_never_blocks_the_others():
    w = Windower(
        [EEG, IMU], hop_s=HOP, lateness_s=0.05, stale_s=0.5, lost_s=2.0, source_rates=SOURCE
    )
    w.push("imu", *regular(25, 0.0, 3.0, 2), arrival=3.0)  # imu goes silent at t = 3
    windows = []
    for k in range(1, 41):
        now = k * 0.25
        w.push("eeg", *regular(100, now - 0.25, now, 3), arrival=now)
        windows += w.poll(now)
        states = w.states(now)
        if now < 3.4:
            assert states["imu"] == StreamState.LIVE
        elif now < 4.96:  # newest imu sample at 2.96 s; lost after 2 s of silence
            assert states["imu"] == StreamState.STALE
        else:
            assert states["imu"] == StreamState.LOST
    assert windows[-1].t_end >= 9.5  # eeg kept the windows flowing
    late = [x for x in windows if x.t_end > 3.5]
    assert late and all(x.available == {"eeg": True, "imu": False} for x in late)
    assert w.counters.masked["imu"] == len([x for x in windows if not x.available["imu"]])
    assert any(x.available["imu"] for x in windows)


def test_duplicates_late_chunks_and_jumped_clocks_are_refused_and_counted():
    w = Windower([EEG], hop_s=HOP, source_rates={"eeg": 100.0})
    x, t = regular(100, 0.0, 2.0, 3)
    w.push("eeg", x, t, arrival=2.0)
    w.push("eeg", x[:50], t[:50], arrival=2.1)  # duplicate / late chunk
    assert w.buffers["eeg"].counters.out_of_order == 50
    w.push("eeg", x[:10], t[:10] + 1.7e9, arrival=2.2)  # a Unix-epoch clock
    assert w.counters.future_samples["eeg"] == 10
    assert w.buffers["eeg"].latest_time == pytest.approx(t[-1])
    assert [win.t_end for win in w.poll(now=2.2)] == [1.0, 1.25, 1.5, 1.75]


def test_bad_chunks_name_the_sensor():
    w = Windower([EEG, IMU], hop_s=HOP, source_rates=SOURCE)
    with pytest.raises(InputError, match="unknown sensor 'ecg'"):
        w.push("ecg", np.zeros((4, 3)), np.arange(4.0), arrival=4.0)
    with pytest.raises(InputError, match=r"imu: chunk of shape \[4, 3\], expected \[samples, 2\]"):
        w.push("imu", np.zeros((4, 3)), np.arange(4.0), arrival=4.0)


def test_modalities_must_share_the_window_length():
    short = ModalitySpec(name="imu", channels=2, rate_hz=20, samples=10)
    with pytest.raises(ValueError, match="disagree on the window length"):
        Windower([EEG, short], hop_s=HOP)


def test_each_window_knows_when_the_data_completing_it_was_received():
    w = Windower([EEG], hop_s=0.5, lateness_s=0.0, source_rates={"eeg": 100.0})
    windows = []
    for k in range(8):  # 0.5 s chunks, received 10 ms after their last sample
        x, t = regular(100, k * 0.5, (k + 1) * 0.5, 3)
        w.push("eeg", x, t, arrival=t[-1], received=1000 + k)
        windows += w.poll(now=t[-1])
    # window [0, 1) is complete once a sample at or after 1.0 is in: chunk 2, received at 1002
    assert [(x.t_end, x.t_last_arrival) for x in windows] == [
        (1.0, 1002),
        (1.5, 1003),
        (2.0, 1004),
        (2.5, 1005),
        (3.0, 1006),
        (3.5, 1007),
    ]


def test_a_long_silence_is_skipped_not_resampled_window_by_window():
    w = Windower([EEG], hop_s=HOP, lateness_s=0.0, source_rates={"eeg": 100.0})
    x, t = regular(100, 0.0, 2.0, 3)
    w.push("eeg", x, t, arrival=2.0)
    first = w.poll(now=2.0)
    x, t = regular(100, 1000.0, 1002.0, 3)  # 1000 s later
    w.push("eeg", x, t, arrival=1002.0)
    later = w.poll(now=1002.0)
    assert [x.t_end for x in first] == [1.0, 1.25, 1.5, 1.75]
    # [1, 2) completes with the new data; then nothing until windows covered >= 80% again
    assert [x.t_end for x in later] == [2.0, 1001.0, 1001.25, 1001.5, 1001.75]
    assert w.counters.empty_windows == round((1001.0 - 2.25) / HOP)


def test_source_rates_for_unknown_sensors_are_refused():
    with pytest.raises(ValueError, match=r"unknown sensors \['ecg'\]"):
        Windower([EEG], hop_s=HOP, source_rates={"ecg": 250.0})


def test_staleness_is_judged_per_sensor():
    w = Windower(
        [EEG, IMU], hop_s=HOP, stale_s={"eeg": 0.2, "imu": 1.0}, lost_s=5.0, source_rates=SOURCE
    )
    w.push("eeg", *regular(100, 0.0, 2.0, 3), arrival=2.0)
    w.push("imu", *regular(25, 0.0, 2.0, 2), arrival=2.0)
    assert w.states(2.5) == {"eeg": StreamState.STALE, "imu": StreamState.LIVE}
    with pytest.raises(ValueError, match=r"stale_s for unknown sensors \['ecg'\]"):
        Windower([EEG], hop_s=HOP, stale_s={"ecg": 1.0})
