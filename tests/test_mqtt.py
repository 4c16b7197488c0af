"""MQTT with a real mosquitto broker that the tests start on 127.0.0.1 and a free port, and
mosquitto_pub / mosquitto_sub as outside clients."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from brokers import Mosquitto
from hypothesis import given, settings
from hypothesis import strategies as st

from crossl_stream.broker import Broker
from crossl_stream.clock import DeviceClock
from crossl_stream.readers.base import SensorInfo
from crossl_stream.readers.mqtt import MqttReader, MqttTopic
from crossl_stream.readers.payload import PayloadError, decode, encode_binary, encode_json

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "crossl_stream.cli"]


# -- payloads and device clocks: no broker needed ----------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seq=st.integers(0, 2**32 - 1),
    t0=st.floats(-1e9, 1e9),
    n=st.integers(1, 40),
    c=st.integers(1, 8),
    fmt=st.sampled_from(["binary", "json"]),
)
def test_payloads_round_trip(seq, t0, n, c, fmt):
    values = np.random.default_rng(seq).normal(size=(n, c)).astype(np.float32)
    data = (encode_binary if fmt == "binary" else encode_json)(seq, t0, values)
    p = decode(data, fmt, c)
    assert p.seq == seq and p.t0 == t0
    np.testing.assert_array_equal(p.values, values)
    np.testing.assert_allclose(p.device_times(50.0), t0 + np.arange(n) / 50.0)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=80), fmt=st.sampled_from(["binary", "json"]))
def test_garbage_is_refused_with_a_reason_never_a_crash(data, fmt):
    try:
        decode(data, fmt, 3)
    except PayloadError as exc:
        assert exc.reason in {
            "short",
            "long",
            "version",
            "json",
            "channels",
            "empty",
            "nan",
            "timestamp",
            "shape",
        }


@pytest.mark.parametrize(
    ("data", "fmt", "reason"),
    [
        (b"{not json", "json", "json"),
        (b'{"t0": 1, "values": [[1, 2]]}', "json", "channels"),
        (b'{"t0": 1, "values": [[1, NaN, 2]]}', "json", "nan"),
        (b'{"t0": 1, "values": [[1, 2, 3]], "colour": 1}', "json", "json"),
        (encode_binary(1, 2.0, np.zeros((4, 3)))[:-5], "binary", "short"),
        (b"\x02" + encode_binary(1, 2.0, np.zeros((4, 3)))[1:], "binary", "version"),
        (encode_binary(1, float("nan"), np.zeros((4, 3))), "binary", "timestamp"),
        (b'{"seq": 1e400, "t0": 1, "values": [[1, 2, 3]]}', "json", "json"),
    ],
)
def test_each_kind_of_bad_payload_names_its_reason(data, fmt, reason):
    with pytest.raises(PayloadError) as info:
        decode(data, fmt, 3)
    assert info.value.reason == reason


def test_device_clock_fit_recovers_offset_and_drift_through_delays_and_outliers():
    rng = np.random.default_rng(0)
    clock = DeviceClock()
    device = np.arange(0, 120, 0.05)  # 2 min of messages, 20 per second
    offset, drift = 5000.0, 80e-6  # the device runs 80 ppm slow, 5000 s behind
    host = device * (1 + drift) + offset
    delay = 0.001 + rng.exponential(0.004, len(device))  # never negative, often small
    delay[rng.random(len(device)) < 0.02] += 0.3  # a few late deliveries
    accepted = [clock.observe(d, h + e) for d, h, e in zip(device, host, delay, strict=True)]
    assert sum(accepted) > 0.95 * len(device)
    error = clock.map(device[-200:]) - host[-200:]
    assert np.abs(error).max() < 0.003  # within the minimum transport delay
    assert clock.map(device[-1:])[0] <= host[-1] + delay[-1]  # never stamped in the future
    # the device clock jumps (a reboot): outliers first, then a new fit
    jumped = [
        clock.observe(d, h + 0.002)
        for d, h in zip(device[:10] - 1e6, host[-1] + device[:10] + 1, strict=True)
    ]
    assert jumped[:4] == [False] * 4 and all(jumped[5:])
    assert clock.counters.refits == 1


def test_sequence_gaps_duplicates_and_subjects_are_tracked():
    reader = MqttReader(
        Broker(), {"acc": (SensorInfo("acc", 3, 50.0), MqttTopic("w/+/acc", "binary"))}
    )
    values = np.zeros((2, 3), np.float32)
    for seq in (0, 1, 4, 4, 2, 5):
        message = encode_binary(seq, 100 + seq * 0.04, values)
        reader.to_chunk("w/s1/acc", message, 10 + seq * 0.04 + 0.05)
    # a device at message 1000 reboots: its sequence and its clock start again; it goes on
    assert reader.to_chunk("w/s3/acc", encode_binary(1000, 900.0, values), 14.0) is not None
    rebooted = reader.to_chunk("w/s3/acc", encode_binary(0, 3.0, values), 15.0)
    assert rebooted is not None and reader.counters.restarts == 1
    assert rebooted.timestamps[-1] == pytest.approx(15.0)
    chunk = reader.to_chunk("w/s2/acc", encode_binary(0, 7.0, values), 20.0)
    assert reader.counters.seq_gaps == 2 and reader.counters.duplicates == 2
    assert chunk.subject == "s2" and reader.counters.subjects == 3
    assert reader.to_chunk("other/topic", b"", 1.0) is None and reader.counters.unrouted == 1


# -- a real broker ---------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path):
    m = Mosquitto(tmp_path)
    yield m
    m.stop()


SENSORS = {
    "acc": (SensorInfo("acc", 3, 50.0), MqttTopic("wearables/+/acc", "json")),
    "gyro": (SensorInfo("gyro", 3, 50.0), MqttTopic("wearables/+/gyro", "binary")),
}


async def read_until(reader: MqttReader, predicate, seconds: float, during=None) -> list:
    chunks = []

    async def pull():
        async with contextlib.aclosing(reader.chunks()) as stream:
            async for c in stream:
                chunks.append(c)
                if predicate(chunks):
                    return

    task = asyncio.create_task(pull())
    if during is not None:
        await during()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(task, seconds)
    return chunks


def test_outside_publishers_are_read_and_malformed_payloads_counted(broker):
    reader = MqttReader(Broker(port=broker.port), SENSORS)
    values = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]

    async def outside():
        while reader.counters.connects == 0:
            await asyncio.sleep(0.05)
        good = [
            json.dumps({"seq": k, "t0": 300 + k * 0.2, "values": values}).encode() for k in range(5)
        ]
        bad = [
            b"{oops",
            json.dumps({"seq": 9, "t0": 301, "values": [[1, 2]]}).encode(),
            b'{"seq": 10, "t0": 301, "values": [[1, NaN, 2]]}',
            json.dumps({"seq": 11, "t0": 1.7e9, "values": values}).encode(),  # Unix time
        ]
        start = time.monotonic()
        for k, message in enumerate(good):  # sent as a device would: at its own pace
            await asyncio.sleep(max(0.0, start + k * 0.2 - time.monotonic()))
            await asyncio.to_thread(broker.pub, "wearables/s09/acc", message)
            if k == 2:
                for junk in bad:
                    await asyncio.to_thread(broker.pub, "wearables/s09/acc", junk)
        await asyncio.to_thread(
            broker.pub, "wearables/s09/gyro", encode_binary(0, 300.0, np.ones((2, 3)))[:-3]
        )
        await asyncio.to_thread(
            broker.pub, "wearables/s09/gyro", encode_binary(1, 300.0, np.ones((2, 3)))
        )

    chunks = asyncio.run(
        read_until(reader, lambda cs: sum(c.sensor == "gyro" for c in cs) >= 1, 30, outside)
    )
    acc = [c for c in chunks if c.sensor == "acc"]
    assert len(acc) == 5 and all(c.subject == "s09" for c in chunks)
    np.testing.assert_allclose(acc[0].values, values)
    assert reader.counters.malformed == {"json": 1, "channels": 1, "nan": 1, "clock": 1, "short": 1}
    # device times 200 ms apart land about 200 ms apart on the host clock (less when a later
    # mosquitto_pub process starts faster and lowers the envelope: the first one starts
    # cold), never after their receipt
    assert np.allclose(np.diff([c.timestamps[0] for c in acc]), 0.2, atol=0.15)
    assert all(c.timestamps[-1] <= c.received + 1e-6 for c in chunks)


def test_the_reader_reconnects_and_resubscribes_when_the_broker_restarts(broker):
    reader = MqttReader(Broker(port=broker.port), SENSORS, backoff_s=(0.1, 0.5))
    payload = encode_binary(0, 10.0, np.zeros((1, 3)))

    async def outage():
        while reader.counters.connects == 0:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(broker.pub, "wearables/a/gyro", payload)
        await asyncio.to_thread(broker.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(broker.start)
        while reader.counters.connects < 2:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(broker.pub, "wearables/b/gyro", payload)

    chunks = asyncio.run(read_until(reader, lambda cs: len(cs) >= 2, 30, outage))
    assert [c.subject for c in chunks] == ["a", "b"] and reader.counters.connects == 2


def test_username_and_password_are_used(tmp_path):
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "edge", "s3cret"], check=True)
    m = Mosquitto(tmp_path, f"password_file {passwords}\n")
    m.conf.write_text(m.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    m.stop()
    m.start()
    try:
        good = MqttReader(Broker(port=m.port, username="edge", password="s3cret"), SENSORS)
        bad = MqttReader(
            Broker(port=m.port, username="edge", password="wrong"), SENSORS, backoff_s=(0.1, 0.2)
        )

        async def both():
            a = asyncio.create_task(read_until(good, lambda cs: True, 3))
            b = asyncio.create_task(read_until(bad, lambda cs: True, 3))
            return await a, await b

        asyncio.run(both())
        assert good.counters.connects == 1 and bad.counters.connects == 0
    finally:
        m.stop()


def test_edge_config_end_to_end_with_play_and_mosquitto_sub(broker, tmp_path):
    """`play --to mqtt` (a process) -> `run configs/edge-mqtt.yaml` (a process) ->
    mosquitto_sub (an outside client): predictions per subject, a retained status, and the
    last will when the pipeline dies."""
    config = tmp_path / "edge.yaml"
    text = (ROOT / "configs" / "edge-mqtt.yaml").read_text().replace("1883", str(broker.port))
    config.write_text(text.replace("../models/default", str(ROOT / "models" / "default")))
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "crossl/#", "-v"],
        stdout=subprocess.PIPE,
        text=True,
    )
    env = {**os.environ, "CROSSL_MQTT_PASSWORD": "unused"}  # an anonymous broker ignores it
    run = subprocess.Popen([*CLI, "run", str(config)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        run.stdout.readline()  # "mqttreader (acc, gyro) live through ...": the model is loaded
        time.sleep(1.0)  # and the reader subscribed
        play = [*CLI, "play", "--to", "mqtt", "--broker", f"127.0.0.1:{broker.port}"]
        for subject in ("s01", "s02"):  # two wearables, one after the other
            result = subprocess.run(
                [*play, "--subject", subject, "--start", "100", "--duration", "6"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stderr
        time.sleep(1.0)
        run.send_signal(signal.SIGKILL)  # dies without a word: the broker sends the will
        run.wait(timeout=10)
        time.sleep(1.0)
    finally:
        sub.terminate()
        out, _ = sub.communicate(timeout=10)
    lines = [line.split(" ", 1) for line in out.splitlines()]
    status = [json.loads(payload) for topic, payload in lines if topic == "crossl/status"]
    assert status[0]["state"] == "online" and status[-1]["state"] == "offline"
    assert status[0]["model"].startswith("default@")
    for subject in ("s01", "s02"):
        records = [json.loads(p) for t, p in lines if t == f"crossl/{subject}/predictions"]
        assert len(records) >= 6, subject
        assert all(r["subject"] == subject for r in records)
        # while it plays, both sensors; after it stopped, records with no label until the
        # pipeline retires it (every sensor stale)
        labelled = [r for r in records if r["label"] is not None]
        assert len(labelled) >= 6, subject
        assert all(r["mask"] == {"acc": True, "gyro": True} for r in labelled)
        assert not any(any(r["mask"].values()) for r in records if r["label"] is None)
        records = labelled
        assert np.median([r["latency_ms"]["total"] for r in records]) < 50


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    f = {k: folder / k for k in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")}
    (folder / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    commands = [
        [
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f["ca.key"],
            "-out",
            f["ca.pem"],
            "-days",
            "1",
            "-subj",
            "/CN=crossl-test-ca",
        ],
        [
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f["server.key"],
            "-out",
            f["server.csr"],
            "-subj",
            "/CN=127.0.0.1",
        ],
        [
            "x509",
            "-req",
            "-in",
            f["server.csr"],
            "-CA",
            f["ca.pem"],
            "-CAkey",
            f["ca.key"],
            "-CAcreateserial",
            "-out",
            f["server.pem"],
            "-days",
            "1",
            "-extfile",
            folder / "san.cnf",
        ],
    ]
    for args in commands:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
    return f


def test_tls_with_the_brokers_ca_connects_and_without_it_does_not(tmp_path):
    certs = make_certificates(tmp_path)
    tls = f"cafile {certs['ca.pem']}\ncertfile {certs['server.pem']}\n"
    m = Mosquitto(tmp_path, tls + f"keyfile {certs['server.key']}\n")
    try:
        trusted = MqttReader(Broker(port=m.port, tls=True, ca_file=str(certs["ca.pem"])), SENSORS)
        stranger = MqttReader(Broker(port=m.port, tls=True), SENSORS, backoff_s=(0.1, 0.2))
        payload = encode_binary(0, 5.0, np.zeros((1, 3)))

        async def main():
            async def publish():
                while trusted.counters.connects == 0:
                    await asyncio.sleep(0.05)
                async with Broker(
                    port=m.port, tls=True, ca_file=str(certs["ca.pem"])
                ).client() as c:
                    await c.publish("wearables/t/gyro", payload, qos=1)

            a = asyncio.create_task(read_until(trusted, lambda cs: True, 15, publish))
            b = asyncio.create_task(read_until(stranger, lambda cs: True, 2))
            return await a, await b

        got, _ = asyncio.run(main())
        assert [c.subject for c in got] == ["t"]
        assert stranger.counters.connects == 0  # the server's certificate is not trusted
    finally:
        m.stop()


def test_a_stalled_network_delivers_its_backlog_on_the_device_clock():
    clock = DeviceClock()
    for k in range(100):  # 5 s of messages every 50 ms, delivered after 2 ms
        assert clock.observe(k * 0.05, 1000 + k * 0.05 + 0.002)
    # a 3 s stall: the next 60 messages arrive together
    backlog = [clock.observe(5 + k * 0.05, 1008.0) for k in range(60)]
    assert all(backlog) and clock.counters.refits == 0
    np.testing.assert_allclose(clock.map(np.array([5.0, 7.95])), [1005.002, 1007.952], atol=1e-3)


def test_a_device_that_reboots_early_is_not_taken_for_duplicates():
    reader = MqttReader(
        Broker(), {"acc": (SensorInfo("acc", 3, 50.0), MqttTopic("w/+/acc", "binary"))}
    )
    values = np.zeros((2, 3), np.float32)
    for seq in range(10):  # device clock at 500 s
        assert reader.to_chunk(
            "w/a/acc", encode_binary(seq, 500 + seq * 0.04, values), 20 + seq * 0.04
        )
    # it reboots 1 s later: sequence and clock start again from 0
    chunk = reader.to_chunk("w/a/acc", encode_binary(0, 0.0, values), 21.4)
    assert chunk is not None and reader.counters.restarts == 1
    assert reader.counters.duplicates == 0
    assert reader.to_chunk("w//acc", encode_binary(0, 0.0, values), 22.0) is None
    assert reader.counters.malformed["topic"] == 1


@pytest.mark.parametrize("topic", ["w/#/acc", "w/s+/acc", "w/a#"])
def test_bad_topic_filters_are_refused_in_the_config(tmp_path, topic):
    from crossl_stream.config import PipelineConfig, load_config
    from crossl_stream.errors import ConfigError

    path = tmp_path / "edge.yaml"
    path.write_text(
        json.dumps(
            {
                "sensors": {"acc": {"channels": 3, "rate_hz": 50}},
                "readers": [{"kind": "mqtt", "streams": {"acc": {"topic": topic}}}],
            }
        )
    )
    with pytest.raises(ConfigError, match="must be a whole level"):
        load_config(path, PipelineConfig)
