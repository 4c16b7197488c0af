"""MQTT when things go wrong, with a real mosquitto on 127.0.0.1 that each test starts (and
stops, and restarts) itself: a broker that goes away while predictions are made, a process
that dies, 10,000 fuzzed payloads, wrong passwords and certificates, a stop with the broker
down. Each test prints what it measured."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from brokers import Mosquitto, free_port
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from crossl_stream.admission import Admission
from crossl_stream.broker import Broker, BrokerError
from crossl_stream.clock import host_clock
from crossl_stream.errors import ConfigError
from crossl_stream.inference import Prediction
from crossl_stream.publishers.mqtt import MqttPublisher
from crossl_stream.publishers.spool import Spool
from crossl_stream.readers.base import SensorInfo
from crossl_stream.readers.mqtt import MqttReader, MqttTopic
from crossl_stream.readers.payload import encode_binary

ROOT = Path(__file__).resolve().parents[1]
SENSORS = {
    "acc": (SensorInfo("acc", 3, 50.0), MqttTopic("wearables/+/acc", "json")),
    "gyro": (SensorInfo("gyro", 3, 50.0), MqttTopic("wearables/+/gyro", "binary")),
}


@pytest.fixture
def broker(tmp_path):
    m = Mosquitto(tmp_path, persistent=True)
    yield m
    m.stop()


def prediction(seq: int, subject: str = "s01", label: str | None = "a") -> Prediction:
    return Prediction(
        seq=seq,
        t_window_end=1000.0 + seq * 0.5,
        label=label,
        probs={"a": 0.9, "b": 0.1} if label else {},
        mask={"acc": label is not None, "gyro": label is not None},
        model="test@1",
        latency_ms={"queue": 0.1},
        subject=subject,
        t_last_arrival=host_clock(),
    )


async def drain(reader: MqttReader) -> None:
    """Read ``reader``'s chunks until cancelled, keeping none."""
    async for _ in reader.chunks():
        pass


async def until(predicate, seconds: float, step: float = 0.01) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(step)
    return True


class Collector:
    """A persistent QoS 1 subscriber (a fixed client id, clean_session False): what it
    misses while the broker is away, the broker keeps for it."""

    def __init__(self, port: int, topic: str = "crossl/+/predictions") -> None:
        self.port = port
        self.topic = topic
        self.records: list[tuple[str, int]] = []
        self.connects = 0
        self.connected = asyncio.Event()

    async def run(self) -> None:
        import aiomqtt

        while True:
            try:
                client = aiomqtt.Client(
                    "127.0.0.1", self.port, identifier="faults-collector", clean_session=False
                )
                async with client:
                    await client.subscribe(self.topic, qos=1)
                    self.connects += 1
                    self.connected.set()
                    async for m in client.messages:
                        r = json.loads(bytes(m.payload))
                        self.records.append((r["subject"], r["seq"]))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.05)

    def check(self, expected: list[tuple[str, int]]) -> int:
        """Every expected record, in order, once (duplicates returned, counted)."""
        first = list(dict.fromkeys(self.records))
        assert first == expected, (len(first), len(expected))
        seen: set[tuple[str, int]] = set()
        again = [r for r in self.records if r in seen or seen.add(r)]
        if again:
            print(f"\nreceived twice: {again}")
        return len(again)


# -- (a) the broker goes away while predictions are made ---------------------------------


def test_broker_down_while_predicting_every_record_arrives_once_in_order(broker):
    async def main():
        collector = Collector(broker.port)
        sub = asyncio.create_task(collector.run())
        await asyncio.wait_for(collector.connected.wait(), 10)
        pub = MqttPublisher(
            Broker(port=broker.port, client_id="faults-publisher"), "test@1", queue_size=1000
        )
        await pub.start()
        assert await until(lambda: pub.link.connected, 10)
        figures = {}

        async def outage():
            await asyncio.sleep(1.5)  # as record 30 is sent: it is in flight when the broker goes
            await asyncio.to_thread(broker.stop)
            figures["stopped"] = time.monotonic()
            await asyncio.sleep(3.0)
            await asyncio.to_thread(broker.start)
            restarted = time.monotonic()
            figures["down_s"] = restarted - figures["stopped"]
            assert await until(lambda: pub.link.connected, 15)
            figures["reconnect_s"] = time.monotonic() - restarted

        task = asyncio.create_task(outage())
        sent, most_pending, t0 = [], 0, time.monotonic()
        while time.monotonic() - t0 < 7.0 or not task.done():  # 20 records a second
            pub.publish(prediction(len(sent)))
            sent.append(("s01", len(sent)))
            most_pending = max(most_pending, pub.pending)
            await asyncio.sleep(0.05)
        await task
        drained = await until(lambda: len(set(collector.records)) >= len(sent), 15)
        status_online = await asyncio.to_thread(broker.retained)
        health = pub.health()
        await pub.aclose(5.0)
        status_closed = await asyncio.to_thread(broker.retained)
        sub.cancel()
        await asyncio.gather(sub, return_exceptions=True)
        return (
            collector,
            pub,
            sent,
            figures,
            most_pending,
            drained,
            health,
            status_online,
            (status_closed),
        )

    collector, pub, sent, figures, most_pending, drained, health, online, closed = asyncio.run(
        main()
    )
    expected = [("s01", k) for k in range(len(sent))]
    duplicates = collector.check(expected) if drained else None
    print(
        f"\n{len(sent)} records at 20/s; broker down {figures['down_s']:.2f} s; "
        f"{most_pending} waited at most; publisher back {figures['reconnect_s']:.2f} s after "
        f"the restart; received {len(collector.records)}, duplicates {duplicates}; "
        f"sent {pub.counters.sent}, dropped {pub.counters.dropped}; status {online['state']} "
        f"after the restart, {closed['state']} after aclose"
    )
    assert drained, f"received {len(set(collector.records))} of {len(sent)}"
    assert duplicates <= 1  # at most the one in flight when the broker went
    assert pub.counters.sent == len(sent) and pub.counters.dropped == 0
    assert most_pending >= 40  # the outage really held records back
    assert health["state"] == "connected" and health["pending"] == 0
    assert online["state"] == "online" and closed["state"] == "offline"


def test_a_killed_publisher_leaves_its_last_will_and_a_stale_offline_is_answered(broker):
    script = f"""
import asyncio
from crossl_stream.broker import Broker
from crossl_stream.publishers.mqtt import MqttPublisher

async def main():
    p = MqttPublisher(Broker(port={broker.port}), "test@1", status_topic="crossl/status")
    await p.start()
    while not p.link.connected:
        await asyncio.sleep(0.01)
    print("online", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout.readline().strip() == "online"
        before = broker.retained()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        after = broker.retained()
        while after["state"] != "offline" and time.monotonic() - killed < 5:
            after = broker.retained()
        will_s = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"\nstatus {before['state']} while it ran, {after['state']} {will_s:.2f} s after SIGKILL")
    assert before["state"] == "online" and after["state"] == "offline"

    # an offline read while connected (a stale will, a broker's old value): online again
    async def stale():
        pub = MqttPublisher(Broker(port=broker.port), "test@1")
        await pub.start()
        assert await until(lambda: pub.link.connected, 10)
        await asyncio.sleep(0.1)
        offline = json.dumps({"state": "offline", "model": "test@1", "since": 0}).encode()
        await asyncio.to_thread(
            subprocess.run,
            ["mosquitto_pub", "-p", str(broker.port), "-t", "crossl/status", "-r", "-q", "1"]
            + ["-m", offline.decode()],
            check=True,
        )
        t = time.monotonic()
        await until(lambda: pub.republished >= 1, 5)
        answered = time.monotonic() - t
        status = await asyncio.to_thread(broker.retained)
        await pub.aclose(2.0)
        return pub.republished, answered, status

    republished, answered, status = asyncio.run(stale())
    print(f"stale offline answered {1000 * answered:.1f} ms after mosquitto_pub returned")
    assert republished == 1 and status["state"] == "online"


def test_a_disk_spool_delivers_across_an_outage_and_a_restart_of_the_publisher(broker, tmp_path):
    spool = tmp_path / "spool"

    async def main():
        collector = Collector(broker.port)
        sub = asyncio.create_task(collector.run())
        await asyncio.wait_for(collector.connected.wait(), 10)
        make = lambda: MqttPublisher(  # noqa: E731
            Broker(port=broker.port), "test@1", spool=spool, spool_max_bytes=1 << 20
        )
        pub = make()
        await pub.start()
        assert await until(lambda: pub.link.connected, 10)
        n = 0

        async def produce(seconds: float, publisher: MqttPublisher) -> None:
            nonlocal n
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                publisher.publish(prediction(n))
                n += 1
                await asyncio.sleep(0.05)

        await produce(1.0, pub)
        await asyncio.to_thread(broker.stop)  # an outage: the records wait on disk
        await produce(2.0, pub)
        waited = pub.pending
        await asyncio.to_thread(broker.start)
        assert await until(lambda: pub.pending == 0 and pub.link.connected, 15)
        # the broker goes again, and the daemon stops before it is back
        await asyncio.to_thread(broker.stop)
        await produce(1.0, pub)
        left = pub.pending
        t = time.monotonic()
        await pub.aclose(0.5)
        closing_s = time.monotonic() - t
        kept = len(Spool(spool, 1 << 20))
        await asyncio.to_thread(broker.start)
        again = make()  # the next start: what the spool kept goes first, in order
        await again.start()
        await produce(0.5, again)
        delivered = await until(lambda: len(set(collector.records)) >= n, 15)
        await again.aclose(2.0)
        sub.cancel()
        await asyncio.gather(sub, return_exceptions=True)
        return collector, pub, again, n, waited, left, kept, closing_s, delivered

    collector, pub, again, n, waited, left, kept, closing_s, delivered = asyncio.run(main())
    duplicates = collector.check([("s01", k) for k in range(n)]) if delivered else None
    print(
        f"\n{n} records; {waited} waited on disk through an outage; {left} left at a stop "
        f"with the broker down (aclose {closing_s:.2f} s), {kept} found in the spool after; "
        f"the next publisher sent {again.counters.sent}; duplicates {duplicates}"
    )
    assert delivered, f"received {len(set(collector.records))} of {n}"
    assert waited >= 30 and left >= 15 and kept == left
    assert pub.counters.dropped == 0 and again.counters.dropped == 0
    assert pub.counters.sent + again.counters.sent == n
    assert duplicates <= 1
    assert closing_s < 0.7


# -- (d) a stop with the broker down -------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "spool"])
def test_a_stop_with_the_broker_down_returns_in_time(tmp_path, store, caplog):
    port = free_port()  # nothing listens there
    spool = tmp_path / "spool" if store == "spool" else None

    async def main():
        # memory: room for 60; the 40 oldest are dropped as the others come
        pub = MqttPublisher(Broker(port=port), "test@1", queue_size=60, spool=spool)
        await pub.start()
        for k in range(100):
            pub.publish(prediction(k, label=None if k % 10 == 0 else "a"))
        await asyncio.sleep(0.3)
        health = pub.health()
        t = time.monotonic()
        await pub.aclose(timeout=1.0)
        return pub, health, time.monotonic() - t

    with caplog.at_level(logging.INFO, logger="crossl_stream"):
        pub, health, took = asyncio.run(main())
    kept = len(Spool(spool)) if spool else 0
    print(
        f"\n{store}: aclose(1.0) took {took:.3f} s with {health['pending']} records queued "
        f"(dropped {health['dropped']} before); dropped {pub.counters.dropped}, kept on disk "
        f"{kept}; health before: {health['state']} ({health['why']})"
    )
    assert took < 1.2
    assert health["state"] == "unreachable" and "connection refused" in health["why"]
    if store == "memory":
        assert health["pending"] == 60 and health["dropped"] == 40
        assert pub.counters.dropped == 100 and pub.counters.sent == 0
        assert "60 records not delivered" in caplog.text and "dropped" in caplog.text
    else:
        assert health["pending"] == 100 and pub.counters.dropped == 0 and kept == 100
        assert "stay in spool" in caplog.text
    assert "Traceback" not in caplog.text


def test_the_spool_keeps_order_bounds_and_counts_what_it_drops(tmp_path):
    """Records put, handed out, acked and reopened in any order: what comes out is what
    went in, in order, less the oldest ones dropped (counted) when it was full."""
    folder_count = iter(range(10**6))

    @settings(max_examples=60, deadline=None, database=None)
    @given(
        st.lists(
            st.one_of(
                st.tuples(st.just("put"), st.integers(0, 300)),
                st.tuples(st.just("take"), st.integers(1, 20)),
                st.tuples(st.just("peek"), st.just(0)),
                st.tuples(st.just("reopen"), st.just(0)),
            ),
            max_size=40,
        )
    )
    def run(ops):
        folder = tmp_path / f"s{next(folder_count)}"
        spool = Spool(folder, max_bytes=8192)
        put = taken = 0
        out: list[int] = []
        for op, arg in ops:
            if op == "put":
                for _ in range(arg):
                    spool.put(f"t/{put}", put.to_bytes(4, "little") * 8)
                    put += 1
            elif op == "take":
                for _ in range(arg):
                    item = spool.peek()
                    if item is None:
                        break
                    assert item[0] == f"t/{int.from_bytes(item[1][:4], 'little')}"
                    out.append(int.from_bytes(item[1][:4], "little"))
                    spool.ack()
                    taken += 1
            elif op == "peek":
                spool.peek()  # handed out, not acked: handed out again
            else:
                spool.close()  # (a record handed out from a dropped segment: counted here)
                dropped = spool.dropped
                spool = Spool(folder, max_bytes=8192)
                spool.dropped = dropped
            assert spool.bytes <= 8192
        rest = []
        while (item := spool.peek()) is not None:
            rest.append(int.from_bytes(item[1][:4], "little"))
            spool.ack()
        delivered = out + rest
        assert delivered == sorted(delivered) and len(set(delivered)) == len(delivered)
        assert len(delivered) + spool.dropped == put
        spool.close()

    run()


# -- (b) fuzzed payloads through the broker ----------------------------------------------

_JUNK = st.one_of(  # what else a JSON field could hold
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.text(max_size=3),
    st.lists(st.integers(-5, 5), max_size=2),
)


def _json(seq, t0, ts, n, c, value, values, colour) -> bytes:
    """Near-valid JSON: each field valid more often than not (None: left out), so that
    payloads get past decoding to the clock fits and sequence numbers of admitted subjects."""
    d = {"values": [[value] * c for _ in range(n)] if values is None else values}
    for key, v in (("seq", seq), ("t0", t0), ("ts", ts), ("colour", colour)):
        if v is not None:
            d[key] = v
    return json.dumps(d).encode()


_JSON = st.builds(
    _json,
    seq=st.one_of(st.integers(0, 50), st.integers(0, 50), st.integers(0, 2**32), _JUNK),
    t0=st.one_of(st.floats(0, 1e3), st.floats(0, 1e3), st.none(), _JUNK),
    ts=st.one_of(st.none(), st.none(), st.lists(st.floats(0, 1e3), max_size=4), _JUNK),
    n=st.integers(0, 4),
    c=st.one_of(st.just(3), st.just(3), st.integers(1, 5)),
    value=st.one_of(st.floats(-100, 100), st.floats()),
    values=st.one_of(
        st.none(), st.none(), st.none(), _JUNK, st.lists(st.lists(_JUNK, max_size=4), max_size=3)
    ),
    colour=st.one_of(st.none(), st.none(), st.none(), _JUNK),
)


def _mutate(blob: bytes, how: int, where: int) -> bytes:
    if not blob or how not in (1, 2, 3):
        return blob
    k = where % len(blob)
    if how == 1:
        return blob[:k]  # truncated
    if how == 2:
        return blob[:k] + bytes([blob[k] ^ 0x5A]) + blob[k + 1 :]  # a flipped byte
    return blob + blob[k:]  # trailing junk


_BINARY = st.builds(
    lambda seq, t0, n, c: encode_binary(seq, t0, np.ones((n, c), np.float32)),
    st.one_of(st.integers(0, 50), st.integers(0, 2**32 - 1)),
    st.one_of(st.floats(0, 1e3), st.floats(0, 1e3), st.floats()),
    st.integers(0, 4),
    st.one_of(st.just(3), st.just(3), st.integers(1, 5)),
)
_PAYLOAD = st.one_of(
    st.binary(max_size=64),  # arbitrary bytes
    st.builds(_mutate, _JSON, st.integers(0, 3), st.integers(0, 1 << 16)),
    st.builds(_mutate, _BINARY, st.integers(0, 3), st.integers(0, 1 << 16)),
)
_SUBJECT = st.one_of(
    st.sampled_from(["s01", "s02", "s42", "", "junk", "S01", "s001"]),
    st.sampled_from(["s01", "s02", "s42"]),
    st.text(
        st.characters(blacklist_categories=("Cc", "Cs", "Co", "Cn"), blacklist_characters="/+#"),
        max_size=10,
    ),
)
_HOW = st.integers(0, 9)  # 1-3: mutated
_MESSAGE = st.one_of(  # near-valid payloads mostly to the sensor of their format
    st.tuples(_SUBJECT, st.just("acc"), st.builds(_mutate, _JSON, _HOW, st.integers())),
    st.tuples(_SUBJECT, st.just("gyro"), st.builds(_mutate, _BINARY, _HOW, st.integers())),
    st.tuples(_SUBJECT, st.sampled_from(["acc", "gyro"]), _PAYLOAD),
)


def fuzzed_messages(count: int, variants: int = 4) -> list[tuple[str, bytes]]:
    """``count`` (topic, payload) pairs, topics all under the subscribed filters: one in
    ``variants`` drawn by hypothesis (arbitrary bytes, near-valid JSON and binary payloads,
    junk subject ids), each followed by ``variants - 1`` variants of it made with a random
    generator hypothesis also draws (another subject, the other sensor, a cut or a flipped
    byte): drawing each of 10,000 through hypothesis would take most of a test's time."""
    drawn: list[tuple[str, bytes]] = []
    subjects = ["s01", "s02", "s42", "", "junk", "S01", "s001", "s01 ", "é", "$SYS"]

    @settings(
        max_examples=count // (50 * variants) + 1,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(_MESSAGE, min_size=50, max_size=50), st.randoms(use_true_random=False))
    def draw(batch, rng):
        for subject, sensor, payload in batch:
            drawn.append((f"wearables/{subject}/{sensor}", payload))
            for _ in range(variants - 1):
                subject = rng.choice([subject, *subjects])
                sensor = rng.choice(["acc", "gyro"])
                drawn.append((f"wearables/{subject}/{sensor}", _mutate(payload, *_cut(rng))))

    while len(drawn) < count:
        draw()
    return drawn[:count]


def _cut(rng) -> tuple[int, int]:
    return rng.choice([0, 0, 1, 2, 3]), rng.randrange(1 << 16)


def test_ten_thousand_fuzzed_payloads_through_the_broker(broker):
    t = time.monotonic()
    fuzz = fuzzed_messages(10_000)
    drawn_s = time.monotonic() - t
    good = json.dumps({"seq": 0, "t0": 500.0, "values": [[0.1, 0.2, 0.3]] * 2}).encode()
    junk = [(f"wearables/junk{k:03d}/acc", good) for k in range(300)]  # valid, not admitted
    admission = Admission(pattern=r"s[0-9]{2}", max_subjects=64)
    reader = MqttReader(Broker(port=broker.port), SENSORS, admission=admission)
    chunks = []

    async def main():
        import aiomqtt

        async def read():
            async with contextlib.aclosing(reader.chunks()) as stream:
                async for c in stream:
                    chunks.append(c)

        task = asyncio.create_task(read())
        assert await until(lambda: reader.counters.connects == 1, 10)
        published = 0
        async with aiomqtt.Client("127.0.0.1", broker.port) as client:
            client.pending_calls_threshold = 10**6
            window = asyncio.Semaphore(200)

            async def one(topic, payload):
                nonlocal published
                async with window:
                    await client.publish(topic, payload, qos=1)
                    published += 1

            t = time.monotonic()
            await asyncio.gather(*(one(tp, p) for tp, p in fuzz + junk))
            publish_s = time.monotonic() - t
            assert await until(lambda: reader.counters.messages >= published, 20)
            before = len(chunks)
            # then a real device, at its own pace
            for k in range(10):
                payload = json.dumps(
                    {"seq": k, "t0": 800.0 + 0.04 * k, "values": [[0.5, 0.5, 0.5]] * 2}
                ).encode()
                await client.publish("wearables/s07/acc", payload, qos=1)
                published += 1
                await asyncio.sleep(0.04)
        assert await until(lambda: reader.counters.messages >= published, 10)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return published, publish_s, before

    t = time.monotonic()
    published, publish_s, before = asyncio.run(main())
    took = time.monotonic() - t
    c = reader.counters
    refused = sum(admission.refused.values())
    accounted = len(chunks) + sum(c.malformed.values()) + c.unrouted + c.duplicates + refused
    print(
        f"\ndrew {len(fuzz)} payloads in {drawn_s:.1f} s; published {published} in "
        f"{publish_s:.1f} s, all read in {took:.1f} s; {len(chunks)} chunks, malformed "
        f"{c.malformed}, admission refused {admission.refused} (admitted "
        f"{len(admission.admitted)}), duplicates {c.duplicates}, restarts {c.restarts}, "
        f"seq gaps {c.seq_gaps}, jumps {c.seq_jumps}, dropped {c.dropped}\n{reader.report()}"
    )
    assert c.messages == published and c.dropped == 0
    assert accounted == c.messages  # every message counted once, by what became of it
    assert "error" not in c.malformed  # no case the checks missed
    assert admission.refused.get("pattern", 0) >= 300
    assert all(admission.pattern.fullmatch(s) for s in admission.admitted)
    assert c.subjects <= len(admission.admitted) <= 64
    assert {k[0] for k in reader._seq} <= admission.admitted  # state for admitted ones only
    assert c.seq_gaps < 10**7 and c.restarts <= c.messages
    device = [ch for ch in chunks[before:] if ch.subject == "s07"]
    assert len(device) == 10 and all(ch.sensor == "acc" for ch in device)
    assert reader.health()["broker"]["state"] == "connected"


def test_counters_stay_sane_and_nothing_is_kept_for_refused_subjects():
    """A sequence that leaps is a jump, not a billion lost messages; a refused subject gets
    no clock, no sequence, no restarts; the admitted are counted, not listed."""
    admission = Admission(pattern=r"s[0-9]{2}", max_subjects=2)
    reader = MqttReader(Broker(), SENSORS, admission=admission)

    def message(seq: int, t0: float) -> bytes:
        return json.dumps({"seq": seq, "t0": t0, "values": [[0.0, 0.0, 0.0]] * 2}).encode()

    assert reader.to_chunk("wearables/s01/acc", message(5, 100.0), 10.0) is not None
    assert reader.to_chunk("wearables/s01/acc", message(10**12, 100.04), 10.04) is not None
    assert reader.to_chunk("wearables/s01/acc", message(10**12 + 3, 100.08), 10.08)
    for k in range(300):  # junk ids, each with a device "restart"
        reader.to_chunk(f"wearables/junk{k}/acc", message(1000, 100.0), 11.0)
        reader.to_chunk(f"wearables/junk{k}/acc", message(0, 0.0), 11.1)
    assert reader.to_chunk("wearables/s02/acc", message(0, 50.0), 12.0) is not None
    assert reader.to_chunk("wearables/s03/acc", message(0, 50.0), 12.0) is None  # full
    stats = reader.stats()
    print(f"\n{stats}\nrefused {admission.refused}")
    assert stats["seq_jumps"] == 1 and stats["seq_gaps"] == 2
    assert stats["restarts"] == 0 and stats["subjects"] == 2
    assert admission.refused == {"pattern": 600, "full": 1}
    assert {k[0] for k in reader._seq} == {"s01", "s02"}
    assert set(stats) >= {
        "messages",
        "malformed",
        "unrouted",
        "seq_gaps",
        "seq_jumps",
        "duplicates",
        "restarts",
        "connects",
        "subjects",
    }
    reader.forget("s01")
    admission.release("s01")
    assert reader.to_chunk("wearables/s03/acc", message(0, 50.0), 13.0) is not None


# -- (c) wrong password, wrong CA ----------------------------------------------------------

PASSWORDS = {"CROSSL_MQTT_PASSWORD": "daemon-secret", "MQTT_PASSWORD_S01": "s01-secret"}


@pytest.fixture
def edge(tmp_path):
    """A broker started from tools/mosquitto-edge.conf, its users made by tools/mqtt-users."""
    passwd = tmp_path / "passwd"
    made = subprocess.run(
        [str(ROOT / "tools" / "mqtt-users"), "-f", str(passwd), "s01", "s02"],
        env={**os.environ, **PASSWORDS},
        capture_output=True,
        text=True,
        check=True,
    )
    conf = (ROOT / "tools" / "mosquitto-edge.conf").read_text()
    for old, new in [
        ("listener 1883 127.0.0.1", "listener {port} 127.0.0.1"),
        ("password_file tools/mosquitto.passwd", f"password_file {passwd}"),
        ("acl_file tools/mosquitto.acl", f"acl_file {ROOT / 'tools' / 'mosquitto.acl'}"),
        ("persistence_location tools/", f"persistence_location {tmp_path}/"),
    ]:
        assert old in conf, old
        conf = conf.replace(old, new)
    m = Mosquitto(tmp_path, conf=conf, name="edge")
    m.made = made.stdout  # the made-up password of s02
    yield m
    m.stop()


def _lines(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno >= 30]


def test_the_edge_broker_wants_logins_and_keeps_devices_to_their_own_topics(edge):
    """tools/mosquitto-edge.conf + tools/mosquitto.acl: anonymous refused; s01 publishes
    as s01 only; the daemon user reads every wearable and owns crossl/."""
    reader = MqttReader(
        Broker(port=edge.port, username="crossl", password=PASSWORDS["CROSSL_MQTT_PASSWORD"]),
        SENSORS,
    )
    payload = encode_binary(0, 5.0, np.zeros((1, 3)))

    def device(topic: str, *login: str) -> int:
        auth = ["-u", login[0], "-P", login[1]] if login else []
        return subprocess.run(
            ["mosquitto_pub", "-p", str(edge.port), *auth, "-t", topic, "-q", "1", "-s"],
            input=payload,
            capture_output=True,
            timeout=10,
        ).returncode

    async def main():
        got = []

        async def read():
            async for c in reader.chunks():
                got.append(c.subject)

        task = asyncio.create_task(read())
        assert await until(lambda: reader.counters.connects == 1, 10)
        s01 = ("s01", PASSWORDS["MQTT_PASSWORD_S01"])
        codes = [
            await asyncio.to_thread(device, "wearables/s02/gyro", *s01),  # not its name
            await asyncio.to_thread(device, "wearables/s01/gyro"),  # anonymous
            await asyncio.to_thread(device, "wearables/s01/gyro", *s01),
        ]
        await until(lambda: got, 5)
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return got, codes

    got, codes = asyncio.run(main())
    print(f"\nmosquitto_pub exit codes (as s01 to s02, anonymous, as s01): {codes}; read {got}")
    assert got == ["s01"]  # s01 publishing as s02 is dropped by the broker
    assert codes[1] != 0 and codes[2] == 0
    assert edge.made.split()[0] == "s02"  # no MQTT_PASSWORD_S02: made up and printed
    pub = MqttPublisher(
        Broker(port=edge.port, username="crossl", password=PASSWORDS["CROSSL_MQTT_PASSWORD"]),
        "test@1",
    )

    async def publish():
        await pub.start()
        pub.publish(prediction(0))
        assert await until(lambda: pub.counters.sent == 1, 10)
        await pub.aclose(2.0)

    asyncio.run(publish())
    status = edge.retained("crossl/status", "crossl", PASSWORDS["CROSSL_MQTT_PASSWORD"])
    assert status["state"] == "offline"


def test_a_wrong_password_is_said_once_and_shown_in_health(edge, caplog, capfd):
    wrong = Broker(port=edge.port, username="crossl", password="not-the-password")
    reader = MqttReader(wrong, SENSORS, backoff_s=(0.05, 0.3))
    pub = MqttPublisher(wrong, "test@1", backoff_s=(0.05, 0.3))

    async def main():
        task = asyncio.create_task(drain(reader))
        await pub.start()
        pub.publish(prediction(0))
        await asyncio.sleep(2.0)  # a dozen retries each
        t = time.monotonic()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        cancel_s = time.monotonic() - t
        t = time.monotonic()
        health = pub.health()
        await pub.aclose(0.5)
        return cancel_s, time.monotonic() - t, health

    with caplog.at_level(logging.INFO):
        cancel_s, close_s, pub_health = asyncio.run(main())
    err = capfd.readouterr().err
    said = _lines(caplog, "crossl_stream.readers.mqtt")
    said_pub = _lines(caplog, "crossl_stream.publishers.mqtt")
    health = reader.health()["broker"]
    print(
        f"\nreader: {said}; health {health}; cancelled in {1000 * cancel_s:.1f} ms\n"
        f"publisher: {said_pub}; health state {pub_health['state']} ({pub_health['why']}); "
        f"aclose {close_s:.2f} s"
    )
    assert len(said) == 1 and f"127.0.0.1:{edge.port}" in said[0]
    assert "not authorized" in said[0] or "bad username or password" in said[0]
    assert health["state"] == "refused" and "password_env" in health["why"]
    assert pub_health["state"] == "refused" and pub_health["pending"] == 1
    assert sum("refused" in s or "not authorized" in s for s in said_pub) == 1
    assert cancel_s < 1.0 and close_s < 0.7
    assert "Traceback" not in caplog.text + err


def test_a_connect_cancelled_before_the_broker_answers_leaves_no_traceback(caplog, capfd):
    """A broker that accepts the socket and never answers CONNECT: the reader is cancelled
    and the publisher closed mid-connect, then the socket closes. aiomqtt's disconnect
    callback would raise inside the event loop (its connect future is cancelled)."""

    async def main():
        sockets = []

        async def silent(r, w):
            sockets.append(w)
            with contextlib.suppress(ConnectionError):
                while await r.read(1024):  # swallow CONNECT, answer nothing
                    pass

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        broker = Broker(port=server.sockets[0].getsockname()[1])
        reader = MqttReader(broker, SENSORS, backoff_s=(0.05, 0.3))
        pub = MqttPublisher(broker, "test@1", backoff_s=(0.05, 0.3))
        task = asyncio.create_task(drain(reader))
        await pub.start()
        pub.publish(prediction(0))
        assert await until(lambda: len(sockets) == 2, 10)
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await pub.aclose(0.3)
        for w in sockets:
            w.close()
        await asyncio.sleep(0.3)  # the closed sockets reach paho's callbacks
        server.close()
        await server.wait_closed()
        return reader.health()["broker"], pub.counters

    with caplog.at_level(logging.INFO):
        health, counters = asyncio.run(main())
    err = capfd.readouterr().err
    print(f"\nreader health {health}; publisher dropped {counters.dropped}")
    assert health["state"] != "connected" and counters.dropped == 1
    assert "Traceback" not in caplog.text + err


def _certificates(folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).parent))
    from test_mqtt import make_certificates

    folder.mkdir()
    return make_certificates(folder)


def test_a_wrong_ca_is_said_once_and_a_ca_that_is_not_pem_is_a_config_error(
    tmp_path, caplog, capfd
):
    certs = _certificates(tmp_path / "broker-ca")
    other = _certificates(tmp_path / "other-ca")
    conf = (
        "listener {port} 127.0.0.1\nallow_anonymous true\n"
        f"cafile {certs['ca.pem']}\ncertfile {certs['server.pem']}\nkeyfile {certs['server.key']}\n"
    )
    m = Mosquitto(tmp_path, conf=conf, name="tls")
    try:
        reader = MqttReader(
            Broker(port=m.port, tls=True, ca_file=str(other["ca.pem"])),
            SENSORS,
            backoff_s=(0.05, 0.3),
        )

        async def main():
            task = asyncio.create_task(drain(reader))
            await asyncio.sleep(1.5)
            t = time.monotonic()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return time.monotonic() - t

        with caplog.at_level(logging.INFO):
            cancel_s = asyncio.run(main())
    finally:
        m.stop()
    err = capfd.readouterr().err
    said = _lines(caplog, "crossl_stream.readers.mqtt")
    health = reader.health()["broker"]
    print(f"\n{said}; health {health}; cancelled in {1000 * cancel_s:.1f} ms")
    assert len(said) == 1 and f"127.0.0.1:{m.port}" in said[0] and "not trusted" in said[0]
    assert health["state"] == "refused" and "broker.ca_file" in health["why"]
    assert cancel_s < 1.0
    assert "Traceback" not in caplog.text + err

    garbage = tmp_path / "not-a-ca.pem"
    garbage.write_text("this is not a certificate\n")
    bad = Broker(port=m.port, tls=True, ca_file=str(garbage))
    for build in (lambda: MqttReader(bad, SENSORS), lambda: MqttPublisher(bad, "test@1")):
        with pytest.raises(BrokerError) as info:
            build()
        assert isinstance(info.value, ConfigError)  # the CLI says it in one line
        assert str(garbage) in str(info.value) and "\n" not in str(info.value)


# -- the player ----------------------------------------------------------------------------


class _BrokerDiesMidTurn:
    """The player's replay, except that the broker is killed (SIGKILL, waited for) just
    before the chunk stamped ``at`` or later is handed over, inside one turn of the event
    loop: the player's next publish meets a connection its client has not yet seen close.
    aiomqtt then waits for a confirmation that never comes. ``longest_s``: the longest
    wait between two chunks (a player that keeps its pace: about one chunk)."""

    def __init__(self, replay, broker: Mosquitto, at: float) -> None:
        self.replay, self.broker, self.at = replay, broker, at
        self.killed = asyncio.Event()
        self.longest_s = 0.0

    async def chunks(self):
        last = None
        async for chunk in self.replay.chunks():
            now = time.monotonic()
            self.longest_s = max(self.longest_s, now - (last or now))
            if not self.killed.is_set() and chunk.timestamps[0] >= self.at:
                self.broker.proc.kill()
                self.broker.proc.wait()
                time.sleep(0.05)  # the broker's sockets are closed; the loop has not looked
                self.killed.set()
            yield chunk
            last = time.monotonic()


@pytest.mark.parametrize("qos", [0, 1])
def test_the_player_counts_what_it_could_not_send_and_keeps_its_pace(broker, caplog, qos):
    from crossl_stream.players.mqtt import MqttPlayer
    from crossl_stream.readers.replay import Recording
    from crossl_stream.training.datasets import shipped_recording

    recording = Recording.load(shipped_recording())
    section = (100.0, 105.0)  # the broker dies at 1 s and is back at 2 s
    player = MqttPlayer(
        recording, Broker(port=broker.port), section=section, backoff_s=(0.05, 0.2), qos=qos
    )
    dies = _BrokerDiesMidTurn(player.replay, broker, at=recording.start + section[0] + 1.0)
    player.replay = dies

    async def main():
        async def outage():  # 1 s without a broker, then the same one again
            await dies.killed.wait()
            await asyncio.sleep(1.0)
            await asyncio.to_thread(broker.start)

        task = asyncio.create_task(outage())
        published = await player.play()
        await task
        return published

    with caplog.at_level(logging.DEBUG, logger="crossl_stream"):
        t = time.monotonic()
        published = asyncio.run(main())
        took = time.monotonic() - t
        assert "Traceback" not in caplog.text
        # the publish that met the dead connection gave up when the connection ended
        assert "publish given up: the connection ended" in caplog.text
        caplog.clear()
        nowhere = MqttPlayer(recording, Broker(port=free_port()), section=(100.0, 101.0))
        asyncio.run(nowhere.play())
    total = {name: 250 for name in player.names}  # 5 s at 50 Hz
    print(
        f"\nQoS {qos}: played 5 s in {took:.2f} s through a 1 s outage, longest wait between "
        f"chunks {dies.longest_s * 1000:.0f} ms: published {published}, could not send "
        f"{player.unsent}; with no broker at all: unsent {nowhere.unsent}"
    )
    for name in player.names:
        assert published[name] + player.unsent[name] == pytest.approx(total[name], abs=3)
        assert published[name] > 60 and player.unsent[name] > 10  # 50 before, more after
    # a device keeps its pace: no publish held it (aiomqtt's own wait made this 10 s)
    assert dies.longest_s < 0.5
    assert sum(nowhere.published.values()) == 0 and nowhere.lost >= 95
    assert "Traceback" not in caplog.text
    assert sum("connection refused" in r.getMessage() for r in caplog.records) == 1


def test_a_spool_record_damaged_on_disk_is_cut_off_and_said_never_sent(tmp_path, caplog):
    from crossl_stream.publishers.spool import Spool

    spool = Spool(tmp_path / "spool", 1 << 20)
    for i in range(20):
        spool.put("t", f"record {i}".encode())
    spool.close()
    segment = sorted((tmp_path / "spool").glob("*"))
    data_file = max(segment, key=lambda f: f.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte in the middle
    data_file.write_bytes(bytes(raw))
    spool = Spool(tmp_path / "spool", 1 << 20)
    got = []
    while (record := spool.peek()) is not None:
        got.append(record[1].decode())
        spool.ack()
    spool.put("t", b"after")
    assert spool.peek() == ("t", b"after")
    print(f"read back {len(got)} good records; {caplog.messages[-1]}")
    assert got == [f"record {i}" for i in range(len(got))]  # in order, nothing garbled
    assert 0 < len(got) < 20 and "cut off" in caplog.text  # the loss is said
    spool.close()
