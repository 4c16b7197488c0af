"""RingBuffer against a plain-list reference, with hypothesis choosing chunks and reads."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossl_stream.buffer import RingBuffer
from crossl_stream.errors import InputError

steps = st.one_of(
    st.floats(0.001, 0.1),  # ordinary advance
    st.just(0.0),  # duplicate timestamp
    st.floats(-0.3, -0.001),  # goes backwards
    st.just(float("nan")),
    st.just(float("inf")),  # a broken clock: refused, and must not block later samples
)
chunks = st.lists(st.lists(steps, min_size=0, max_size=40), min_size=1, max_size=25)


@settings(max_examples=150, deadline=None)
@given(chunks=chunks, capacity=st.integers(1, 64), reads=st.lists(st.floats(0, 4), max_size=6))
def test_matches_a_list_reference(chunks, capacity, reads):
    buf = RingBuffer(channels=2, capacity=capacity)
    kept: list[tuple[float, int]] = []
    refused = evicted = 0
    clock, serial = 0.0, 0
    for chunk in chunks:
        times = []
        for step in chunk:
            clock = clock + step if np.isfinite(step) else clock
            times.append(clock if np.isfinite(step) else float("nan"))
        values = np.array([[serial + i, -(serial + i)] for i in range(len(times))], np.float32)
        values = values.reshape(len(times), 2)
        for i, t in enumerate(times):
            if np.isfinite(t) and (not kept or t > kept[-1][0]):
                kept.append((t, serial + i))
            else:
                refused += 1
        serial += len(times)
        buf.write(values, np.array(times))
        evicted = max(evicted, len(kept) - capacity)
        held = kept[-capacity:]
        assert len(buf) == len(held)
        assert buf.counters.out_of_order == refused
        assert buf.counters.overwritten == evicted
        if held:
            assert buf.latest_time == held[-1][0] and buf.oldest_time == held[0][0]
        for a in reads:
            b = a + 0.5
            t, x = buf.read(a, b)
            expect = [(tt, v) for tt, v in held if a <= tt < b]
            assert t.tolist() == [tt for tt, _ in expect]
            assert x[:, 0].tolist() == [float(v) for _, v in expect]
            assert x.dtype == np.float32 and x.shape[1] == 2


def test_released_samples_are_not_counted_as_lost():
    buf = RingBuffer(channels=1, capacity=10)
    buf.write(np.zeros((10, 1)), np.arange(10.0))
    buf.release(before=6.0)
    buf.write(np.zeros((8, 1)), np.arange(10.0, 18.0))
    assert buf.counters.overwritten == 2  # samples at t=6 and 7 were never consumed


def test_read_is_a_copy_of_the_range_only():
    buf = RingBuffer(channels=3, capacity=1000)
    buf.write(np.ones((1000, 3)), np.arange(1000.0))
    t, x = buf.read(10.0, 20.0)
    assert x.shape == (10, 3)
    x[:] = 7
    assert buf.read(10.0, 20.0)[1].max() == 1.0


@pytest.mark.parametrize(
    ("values", "times", "message"),
    [
        (np.zeros((4, 3)), np.arange(4.0), "chunk of shape [4, 3], expected [samples, 2]"),
        (np.zeros(4), np.arange(4.0), "chunk of shape [4]"),
        (np.zeros((4, 2)), np.arange(3.0), "3 timestamps for 4 samples"),
    ],
)
def test_wrong_shapes_name_the_sensor(values, times, message):
    buf = RingBuffer(channels=2, capacity=8, name="emg")
    with pytest.raises(InputError) as err:
        buf.write(values, times)
    assert str(err.value).startswith("emg: ") and message in str(err.value)
    assert len(buf) == 0
