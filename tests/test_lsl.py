"""LSL, with real outlets in other processes: the reader, its states and recovery, the
publisher seen by an outside inlet, `crossl-stream play --to lsl`, and MNE-LSL's player.

Discovery stays on this machine: conftest sets LSLAPICFG before pylsl is imported, and the
subprocesses inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from crossl_stream import default_model_dir
from crossl_stream.model import load_model
from crossl_stream.readers.base import SensorInfo
from crossl_stream.readers.lsl import LslReader, LslSelector
from crossl_stream.states import StreamState

CLI = [sys.executable, "-m", "crossl_stream.cli"]
ROOT = Path(__file__).resolve().parents[1]

PRODUCER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import pylsl
    name, seconds, start = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    info = pylsl.StreamInfo(name, "IMU", 3, 50.0, pylsl.cf_float32, name + "-src")
    outlet = pylsl.StreamOutlet(info)
    outlet.wait_for_consumers(20.0)  # an inlet gets what is pushed after it connects
    t0, k = pylsl.local_clock(), start
    print(f"t0 {t0}", flush=True)
    while pylsl.local_clock() - t0 < seconds:
        n = 5  # 100 ms of samples at 50 Hz, values k, k+1, ... in channel 0
        values = np.zeros((n, 3), np.float32)
        values[:, 0] = np.arange(k, k + n)
        values[:, 1] = 1.0
        stamps = t0 + (np.arange(k, k + n) - start) / 50.0
        time.sleep(max(0.0, stamps[-1] - pylsl.local_clock()))  # pushed once sampled
        outlet.push_chunk(values, stamps.tolist())
        k += n
    print(f"pushed {k - start}", flush=True)
    """
)


def producer(name: str, seconds: float, start: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PRODUCER, name, str(seconds), str(start)],
        stdout=subprocess.PIPE,
        text=True,
    )


def reader(name: str, **kw) -> LslReader:
    selector = LslSelector(name=name, type="IMU", dejitter=False)
    return LslReader({"imu": (SensorInfo("imu", 3, 50.0), selector)}, **kw)


async def collect(r: LslReader, seconds: float, until=None, stop=None) -> list:
    """Chunks for ``seconds`` (or until ``until(chunks)`` holds, or ``stop()``, looked at
    every 50 ms), then stop the reader."""
    chunks = []

    async def pull():
        async with contextlib.aclosing(r.chunks()) as stream:
            async for c in stream:
                chunks.append(c)
                if until and until(chunks):
                    return

    async def watch():
        while not stop():
            await asyncio.sleep(0.05)

    tasks = {asyncio.ensure_future(pull())}
    if stop is not None:
        tasks.add(asyncio.ensure_future(watch()))
    done, pending = await asyncio.wait(tasks, timeout=seconds, return_when="FIRST_COMPLETED")
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()
    return chunks


def test_reader_gets_every_sample_of_another_process_in_order_on_this_clock():
    import pylsl

    proc = producer("lsl-test-a", 2.0)
    r = reader("lsl-test-a")
    chunks = asyncio.run(collect(r, 15.0, until=lambda cs: sum(len(c.values) for c in cs) >= 100))
    proc.wait(timeout=20)
    values = np.concatenate([c.values for c in chunks])
    stamps = np.concatenate([c.timestamps for c in chunks])
    assert values.dtype == np.float32 and values.shape[1] == 3
    np.testing.assert_array_equal(values[:100, 0], np.arange(100))  # none lost, none reordered
    t0 = float(proc.stdout.readline().split()[1])
    # same host: liblsl's offset correction is ~0, so the producer's stamps come through
    np.testing.assert_allclose(stamps[:100], t0 + np.arange(100) / 50.0, atol=2e-3)
    assert all(c.arrival >= c.timestamps[-1] for c in chunks)  # host clock == LSL clock
    assert abs(pylsl.local_clock() - time.monotonic()) < 0.01
    assert r.states["imu"] == StreamState.LIVE


def test_a_stream_that_goes_away_turns_stale_then_lost_and_is_found_again():
    first = producer("lsl-test-b", 1.0)
    r = reader("lsl-test-b", watchdog_s=0.3, lost_s=1.2, resolve_s=0.2)
    S = StreamState

    def states():
        return [s for _, _, s in r.transitions]

    async def main():
        task = asyncio.create_task(collect(r, 30.0, until=lambda cs: cs[-1].values[0, 0] >= 1000))
        second = None
        deadline = time.monotonic() + 30
        while not task.done() and time.monotonic() < deadline:
            if second is None and S.LOST in states():
                second = producer("lsl-test-b", 1.5, start=1000)  # the source comes back
            await asyncio.sleep(0.01)
        return await task, second

    chunks, second = asyncio.run(main())
    first.wait(timeout=10)
    assert second is not None, states()
    second.wait(timeout=10)
    # in this order (a loaded machine may add a STALE -> LIVE flicker in between)
    order = [S.CONNECTING, S.LIVE, S.STALE, S.LOST, S.CONNECTING, S.LIVE]
    it = iter(states())
    assert all(any(s == want for s in it) for want in order), states()
    assert states()[-1] == S.LIVE and chunks[-1].values[0, 0] >= 1000
    seen = list(r.transitions)
    lost = next(i for i, (_, _, s) in enumerate(seen) if s == S.LOST)
    stale_at = max(t for t, _, s in seen[:lost] if s == S.STALE)
    assert 0.5 < seen[lost][0] - stale_at < 1.6  # our watchdog, not liblsl's 15 s


def test_a_stream_of_the_wrong_shape_is_refused_and_counted():
    proc = rated_producer("lsl-test-c", 50.0, "lsl-test-c-src", 5.0)  # 3 channels, up now
    selector = LslSelector(name="lsl-test-c")
    r = LslReader({"emg": (SensorInfo("emg", 8, 50.0), selector)}, resolve_s=0.2)
    chunks = asyncio.run(collect(r, 10.0, stop=lambda: r.errors["emg"] >= 1))
    proc.kill()  # it waits for a consumer that never comes
    proc.wait(timeout=10)
    assert chunks == [] and r.errors["emg"] >= 1


def test_play_run_and_an_outside_subscriber(tmp_path):
    """`play --to lsl` (one process) -> `run configs/lab-lsl.yaml` (another) -> an outside
    pylsl inlet (this process) reading the predictions and their JSON markers."""
    import pylsl

    env = {**os.environ, "LSLAPICFG": str(ROOT / "tools" / "lsl_api.cfg")}
    play = subprocess.Popen(
        [*CLI, "play", "--to", "lsl", "--start", "100", "--duration", "12"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = subprocess.Popen(
        [*CLI, "run", str(ROOT / "configs" / "lab-lsl.yaml"), "--out", str(tmp_path / "p.jsonl")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        found = pylsl.resolve_bypred("name='crossl-stream' and type='Predictions'", 1, 30.0)
        assert found, "the prediction stream never appeared"
        inlet = pylsl.StreamInlet(found[0], processing_flags=pylsl.proc_clocksync)
        info = inlet.info(timeout=5.0)
        channels = info.desc().child("channels").child("channel")
        labels = []
        while not channels.empty():
            labels.append(channels.child_value("label"))
            channels = channels.next_sibling()
        assert labels == load_model(default_model_dir()).classes
        assert info.desc().child_value("model").startswith("default@")
        markers = pylsl.resolve_bypred("name='crossl-stream-json'", 1, 10.0)
        marker_inlet = pylsl.StreamInlet(markers[0])
        probs, stamps = [], []
        deadline = time.monotonic() + 25
        while len(probs) < 8 and time.monotonic() < deadline:
            sample, t = inlet.pull_sample(timeout=1.0)
            if sample is not None:
                probs.append(sample)
                stamps.append(t)
        pulled_at = pylsl.local_clock()
        records = []
        while len(records) < 4 and time.monotonic() < deadline:
            sample, _ = marker_inlet.pull_sample(timeout=1.0)
            if sample is not None:
                records.append(json.loads(sample[0]))
    finally:
        play.wait(timeout=40)
        run.terminate()  # a live run ends on SIGTERM: it drains and prints its summary
        out, err = run.communicate(timeout=30)
    assert len(probs) >= 8 and all(abs(sum(p) - 1) < 1e-4 for p in probs)
    assert np.allclose(np.diff(stamps), 0.5, atol=1e-6)  # window ends, 0.5 s apart
    assert abs(stamps[-1] - pulled_at) < 15  # on this host's LSL clock, when pulled
    assert {"t_window_end", "probs", "mask", "latency_ms", "model"} <= set(records[0])
    assert run.returncode == 0, err
    assert "latency total p50" in out
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) >= 8


def test_streams_from_mne_lsl_player_are_read(tmp_path):
    mne = pytest.importorskip("mne")
    from mne_lsl.player import PlayerLSL

    rate = 100.0
    data = np.vstack([np.arange(1000) % 97, np.ones(1000), np.zeros(1000)]) * 1e-6
    raw = mne.io.RawArray(data, mne.create_info(["x", "y", "z"], rate, "misc"), verbose=False)
    player = PlayerLSL(raw, chunk_size=10, name="mne-player-test", source_id="mne-test")
    player.start()
    try:
        selector = LslSelector(name="mne-player-test")
        r = LslReader({"imu": (SensorInfo("imu", 3, rate), selector)}, resolve_s=0.2)
        chunks = asyncio.run(
            collect(r, 15.0, until=lambda cs: sum(len(c.values) for c in cs) >= 200)
        )
    finally:
        player.stop()
    values = np.concatenate([c.values for c in chunks])
    stamps = np.concatenate([c.timestamps for c in chunks])
    assert len(values) >= 200
    step = np.diff(values[:200, 0] * 1e6)  # a ramp modulo 97, in order, none lost
    assert np.allclose(step[(step > -90)], 1.0, atol=1e-3)
    assert np.all(np.diff(stamps) > 0)


RATED_PRODUCER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import pylsl
    name, rate, source_id, seconds = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
    seconds = float(seconds)
    info = pylsl.StreamInfo(name, "IMU", 3, rate, pylsl.cf_float32, source_id)
    outlet = pylsl.StreamOutlet(info)
    print("ready", flush=True)
    outlet.wait_for_consumers(30.0)
    t0, k = pylsl.local_clock(), 0
    while pylsl.local_clock() - t0 < seconds:  # its own rate, the rate in every channel
        time.sleep(0.02)
        n = int((pylsl.local_clock() - t0) * rate) - k
        if n > 0:
            outlet.push_chunk(np.full((n, 3), rate, np.float32))
            k += n
    """
)


def rated_producer(name: str, rate: float, source_id: str, seconds: float) -> subprocess.Popen:
    """An outlet at ``rate`` in another process, once it is up (it waits for a consumer)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", RATED_PRODUCER, name, str(rate), source_id, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def messages(caplog, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


def test_a_stream_at_another_rate_is_refused_once_and_a_fitting_one_is_read(caplog):
    caplog.set_level(logging.INFO, logger="crossl_stream.readers.lsl")
    wrong = rated_producer("lsl-test-rate", 50.0, "lsl-test-rate-50", 30.0)
    selector = LslSelector(name="lsl-test-rate")
    r = LslReader({"imu": (SensorInfo("imu", 3, 100.0), selector)}, resolve_s=0.2)
    right = None

    async def main():
        nonlocal right
        task = asyncio.create_task(
            collect(r, 30.0, until=lambda cs: sum(len(c.values) for c in cs) >= 100)
        )
        await asyncio.sleep(2.5)  # the 50 Hz stream alone: refused, the search goes on
        alone = (r.rate_refused["imu"], r.found["imu"], r.states["imu"], task.done())
        right = rated_producer("lsl-test-rate", 100.0, "lsl-test-rate-100", 10.0)
        return alone, await task

    try:
        alone, chunks = asyncio.run(main())
    finally:
        for proc in (wrong, right):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=10)
    assert alone == (1, False, StreamState.CONNECTING, False)
    errors = messages(caplog, logging.ERROR, "nominal rate")
    assert len(errors) == 1, errors  # once, not on every resolve
    assert errors[0].startswith(
        "LSL imu: stream 'lsl-test-rate' (type IMU, 3 ch @ 50 Hz, source_id 'lsl-test-rate-50', "
        "host "
    )
    refused = "has a nominal rate of 50 Hz, but sensors.imu.rate_hz is 100 Hz: not connected"
    assert refused in errors[0]
    # the 100 Hz stream of the same name was found and read; nothing from the 50 Hz one
    values = np.concatenate([c.values for c in chunks])
    assert len(values) >= 100 and np.all(values == 100.0)
    assert r.rate_refused["imu"] == 1 and r.found["imu"] and r.states["imu"] == StreamState.LIVE
    assert "streams refused for their nominal rate {'imu': 1}" in r.report()
    assert "never found" not in r.report()


def test_a_stream_never_found_is_named_with_the_streams_that_are_visible(caplog):
    caplog.set_level(logging.INFO, logger="crossl_stream.readers.lsl")
    other = rated_producer("lsl-test-other", 50.0, "lsl-test-other-src", 30.0)
    selector = LslSelector(name="lsl-test-absent", type="IMU")
    try:
        r = LslReader(
            {"imu": (SensorInfo("imu", 3, 50.0), selector)}, resolve_s=0.2, connect_grace_s=0.5
        )
        chunks = asyncio.run(collect(r, 4.0))
        once = messages(caplog, logging.WARNING, "no LSL stream")
        caplog.clear()
        r = LslReader(
            {"imu": (SensorInfo("imu", 3, 50.0), selector)}, resolve_s=0.2, connect_grace_s=0.5
        )
        r.missing_every_s = 1.0  # the listing repeats at this pace while the stream is missing
        asyncio.run(collect(r, 4.0))
        repeated = messages(caplog, logging.WARNING, "no LSL stream")
    finally:
        other.kill()
        other.wait(timeout=10)
    assert chunks == []
    assert len(once) == 1, once  # within 4 s: once (then at most once a minute)
    assert once[0].startswith(
        "sensor 'imu': no LSL stream matches name='lsl-test-absent', type='IMU' after "
    )
    assert "; visible: " in once[0]
    assert "'lsl-test-other' (type IMU, 3 ch @ 50 Hz, source_id 'lsl-test-other-src')" in once[0]
    assert 2 <= len(repeated) <= 4, repeated
    report = r.report()
    assert "never found: imu (name='lsl-test-absent', type='IMU')" in report
    assert report.startswith("lsl: imu connecting;")
