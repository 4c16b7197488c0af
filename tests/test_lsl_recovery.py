"""LSL recovery and exposure, with real outlets in other processes.

A producer killed (SIGKILL) and started again, as a new outlet of the same source or of
another one, is read again within two hops (1.0 s) of its outlet being created; and an outlet
started with tools/lsl_api.cfg binds its discovery responder to loopback, every port in the
configured range, and nothing on IPv6 (what liblsl cannot confine: docs/lsl-exposure.md).

Discovery stays on this machine: conftest sets LSLAPICFG before pylsl is imported, and the
subprocesses inherit it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil

from crossl_stream.clock import host_clock
from crossl_stream.readers.base import SensorInfo
from crossl_stream.readers.lsl import LslReader, LslSelector
from crossl_stream.states import StreamState

HOP_S = 0.5
PORTS = range(16572, 16572 + 32)  # tools/lsl_api.cfg: BasePort, PortRange
RESPONDER_PORT = 16571  # tools/lsl_api.cfg: MulticastPort

PRODUCER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import pylsl
    name, source_id, start, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    info = pylsl.StreamInfo(name, "IMU", 3, 50.0, pylsl.cf_float32, source_id)
    outlet = pylsl.StreamOutlet(info)
    t0 = pylsl.local_clock()
    print(f"outlet {t0!r} {info.uid()}", flush=True)
    k = start
    while pylsl.local_clock() - t0 < float(seconds):  # a 20 ms chunk (1 sample) at a time
        time.sleep(max(0.0, t0 + (k - start + 1) / 50.0 - pylsl.local_clock()))
        values = np.array([[k, 1.0, 2.0]], np.float32)  # channel 0 counts the samples
        outlet.push_chunk(values)
        k += 1
    """
)


def producer(name: str, source_id: str, start: int, seconds: float = 12.0):
    """An outlet in another process, once created: (process, its creation on the LSL clock)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, name, source_id, str(start), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().split()
    assert line[:1] == ["outlet"], line
    return proc, float(line[1])


def stop(*procs) -> None:
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(timeout=10)


def bound_sockets(pid: int) -> list[tuple[str, str, int, str]]:
    """(protocol, local address, port, status) of the process's sockets, listening or bound."""
    rows = []
    for c in psutil.Process(pid).net_connections(kind="inet"):
        if c.type == socket.SOCK_STREAM and c.status != psutil.CONN_LISTEN:
            continue  # an accepted or outgoing connection, not something that listens
        proto = ("tcp" if c.type == socket.SOCK_STREAM else "udp") + (
            "6" if c.family == socket.AF_INET6 else ""
        )
        rows.append((proto, c.laddr.ip, c.laddr.port, c.status))
    return sorted(rows)


def shortinfo(address: str, port: int, name: str) -> bool:
    """Whether a UDP discovery query (liblsl's LSL:shortinfo) sent to ``address``:``port``
    is answered; the answer comes back to a socket on 127.0.0.1."""
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as back,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out,
    ):
        back.bind(("127.0.0.1", 0))
        back.settimeout(0.5)
        query = f"LSL:shortinfo\r\nname='{name}'\r\n{back.getsockname()[1]} 7\r\n"
        out.sendto(query.encode(), (address, port))
        try:
            return back.recv(65536).startswith(b"7\r\n")
        except TimeoutError:
            return False


def accepts(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((address, port)) == 0


def recovery(name: str, first_source: str, second_source: str) -> dict:
    """Read ``first_source``, kill it once chunks flow, start ``second_source`` 2 s later and
    time its first chunk at the reader from the moment its outlet was created."""
    selector = LslSelector(name=name, type="IMU")
    r = LslReader(
        {"imu": (SensorInfo("imu", 3, 50.0), selector)},
        watchdog_s=0.1,
        lost_s=5.0,
        resolve_s=0.5,
    )
    before = len(psutil.Process().net_connections(kind="inet"))
    out: dict = {"reader": r}
    first = second = None

    async def main():
        nonlocal first
        first, _ = producer(name, first_source, 0)
        async with contextlib.aclosing(r.chunks()) as stream:
            async for chunk in stream:
                value = chunk.values[0, 0]
                if "killed" not in out and value >= 10:  # 10 samples from the first: kill it
                    os.kill(first.pid, signal.SIGKILL)
                    out["killed"] = host_clock()
                    out["during"] = r.health()["imu"]
                if value >= 100_000:  # the second producer's samples
                    out["first_chunk"] = host_clock()
                    out["received"] = chunk.received
                    out["health"] = r.health()["imu"]
                    break
        out["closed"] = host_clock()

    async def restart():
        nonlocal second
        while "killed" not in out:
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.0)  # the outage
        states = [s for _, _, s in r.transitions]
        out["outage_states"] = states[states.index(StreamState.LIVE) :]
        second, out["created"] = await asyncio.to_thread(producer, name, second_source, 100_000)

    async def both():
        task = asyncio.create_task(restart())
        try:
            await asyncio.wait_for(main(), 15.0)
        except BaseException:
            task.cancel()  # it may wait for a kill that never came
            raise
        finally:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    try:
        asyncio.run(both())
    finally:
        stop(first, second)
    out["sockets_left"] = len(psutil.Process().net_connections(kind="inet")) - before
    return out


def check_recovery(out: dict, label: str) -> None:
    r: LslReader = out["reader"]
    took = out["first_chunk"] - out["created"]
    in_thread = out["received"] - out["created"]
    states = [s.value for _, _, s in r.transitions]
    print(
        f"\n{label}: outlet created -> first chunk at the reader {took * 1000:.0f} ms "
        f"(pulled by the inlet thread after {in_thread * 1000:.0f} ms; budget two hops = "
        f"{2 * HOP_S * 1000:.0f} ms); states {states}; reader stopped in "
        f"{(out['closed'] - out['first_chunk']) * 1000:.0f} ms; health {out['health']}; "
        f"stats {r.stats()}"
    )
    assert 0 < took <= 2 * HOP_S
    # STALE (silent past the watchdog) or LOST during the outage, LIVE once it is back
    S = StreamState
    outage = out["outage_states"]
    assert S.STALE in outage or S.LOST in outage, outage
    assert r.states["imu"] == S.LIVE and out["health"]["state"] == "live"
    after_kill = [s for t, _, s in r.transitions if t >= out["killed"]]
    assert after_kill[-1] == S.LIVE and (S.STALE in after_kill or S.LOST in after_kill)
    assert out["during"]["stream"] is not None  # what was read before the kill
    assert out["health"]["reconnects"] == 1 and r.stats()["reconnects"] == {"imu": 1}
    assert r.stats()["refused_streams"] == {"imu": 0}
    # stopping is prompt, and the inlet and the continuous resolver are released with it
    assert out["closed"] - out["first_chunk"] < 1.0
    assert out["sockets_left"] <= 0, out["sockets_left"]


def test_a_killed_producer_that_comes_back_is_read_within_two_hops():
    out = recovery("lsl-recover-a", "lsl-recover-a-src", "lsl-recover-a-src")
    check_recovery(out, "same source_id")
    assert "source_id 'lsl-recover-a-src'" in out["health"]["stream"]


def test_a_producer_back_under_another_source_id_is_found_by_name_and_type():
    out = recovery("lsl-recover-b", "lsl-recover-b-1", "lsl-recover-b-2")
    check_recovery(out, "another source_id")
    assert "source_id 'lsl-recover-b-2'" in out["health"]["stream"]


def test_the_shipped_config_binds_what_liblsl_lets_it_to_loopback():
    """tools/lsl_api.cfg: the discovery responder on 127.0.0.1, nothing on IPv6, every port
    in 16571-16603; the outlet's TCP data port and UDP service port stay on 0.0.0.0 (liblsl
    has no setting for them), and an inlet in another process still gets the data."""
    import pylsl

    proc, _ = producer("lsl-exposure", "lsl-exposure-src", 0, seconds=10.0)
    try:
        table = bound_sockets(proc.pid)  # the outlet exists once it has said so
        print("\noutlet sockets (protocol, address, port, status):")
        for row in table:
            print("  ", row)
        # 127.0.0.2 is loopback too, but not the address the responder is bound to
        data = next(port for proto, _, port, _ in table if proto == "tcp")
        service = next(port for proto, _, port, _ in table if proto == "udp" and port in PORTS)
        reach = {
            (what, address): answered
            for address in ("127.0.0.1", "127.0.0.2")
            for what, answered in (
                ("responder", shortinfo(address, RESPONDER_PORT, "lsl-exposure")),
                ("service", shortinfo(address, service, "lsl-exposure")),
                ("data", accepts(address, data)),
            )
        }
        print(f"answered at (socket, address): {reach}")
        found = pylsl.resolve_bypred("name='lsl-exposure'", 1, 5.0)
        assert found, "the outlet is not found with the shipped config"
        inlet = pylsl.StreamInlet(found[0])
        inlet.open_stream(timeout=5.0)
        got = []
        deadline = time.monotonic() + 5.0
        while len(got) < 10 and time.monotonic() < deadline:
            values, _ = inlet.pull_chunk(timeout=0.2)
            got.extend(v[0] for v in values)
        del inlet
    finally:
        stop(proc)
    print(f"an inlet in another process got {len(got)} samples: {got[:5]} ...")
    assert len(got) >= 10 and np.all(np.diff(got) == 1)
    assert all(proto in ("tcp", "udp") for proto, *_ in table), table  # IPv6 = disable
    assert all(port == RESPONDER_PORT or port in PORTS for _, _, port, _ in table), table
    responders = [row for row in table if row[2] == RESPONDER_PORT]
    assert responders == [("udp", "127.0.0.1", RESPONDER_PORT, "NONE")], table  # ListenAddress
    wildcard = [(proto, port in PORTS) for proto, ip, port, _ in table if ip != "127.0.0.1"]
    # what stays on 0.0.0.0, and only that: one TCP listener (data) and one UDP (service) port
    assert sorted(wildcard) == [("tcp", True), ("udp", True)], table
    assert all(ip in ("127.0.0.1", "0.0.0.0") for _, ip, _, _ in table), table
    # at another loopback address the responder is out of reach, the data and service ports
    # are not (the responder at 127.0.0.1 is only printed: a query there reaches whichever
    # outlet on the host bound 127.0.0.1:16571 last)
    assert reach[("service", "127.0.0.1")] and reach[("data", "127.0.0.1")]  # the probes work
    assert not reach[("responder", "127.0.0.2")]
    assert reach[("service", "127.0.0.2")] and reach[("data", "127.0.0.2")]
