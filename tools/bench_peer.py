#!/usr/bin/env python3
"""CPU use and freshness of crossl-stream beside two peers, under one load; figures only.

One producer pushes three LSL streams at the model's rates (eeg 32 ch @ 250 Hz, emg 8 ch @
500 Hz, imu 6 ch @ 50 Hz, float32) in 20 ms chunks stamped with pylsl.local_clock(). Three
consumers read them at the same time, each in its own process:
  ours      `crossl-stream run`: LSL reader, windower, a random-weight CroSSL model, a JSONL
            publisher; 2 s windows every 100 ms (lateness 0, stale 0.1 s);
  StreamLSL an mne_lsl.stream.StreamLSL per stream (bufsize 2 s, its defaults: a background
            pull every 1 ms, no processing flags); every 100 ms get_data(winsize=2.0) on each;
  bare      a pylsl StreamInlet per stream, a thread each pulling chunks into a preallocated
            buffer and on into a numpy ring; every 100 ms a copy of each ring's last 2 s.
The peers have no windowing, resampling or model.

Over a steady interval (from WARMUP_S after every consumer's first window):
  CPU s/s    user + system CPU seconds of the process (all its threads, and any children)
             per wall second, read from outside with psutil at the interval's two ends;
  freshness  per window taken, on CLOCK_MONOTONIC (time.monotonic, and the local_clock of
             pylsl and mne_lsl alike: producer and consumers share it on one host):
    ours       the record's age_ms = publish time - t_window_end. The window [t_end - 2 s,
               t_end) is emitted once every sensor delivered a sample at or past t_end; its
               newest grid sample is one grid period before t_end (4, 2, 20 ms), so by the
               strictest reading (the imu's newest grid sample) ours is 20 ms more: printed too;
    peers      time the three arrays were taken - the oldest of their three newest timestamps
               (the time up to which the window holds all three streams, as t_end is for ours).
The producer's grid sits 10 ms (half a chunk) off the 100 ms window grid, a middle case for the
wait of ours on the chunk that completes a window; the peers' ticks are dithered uniformly
within the 20 ms chunk period, so their figures average over phase.

Run in a private network namespace (LSL stays on this machine; LSLAPICFG = tools/lsl_api.cfg):
  tools/in-netns .venv/bin/python tools/bench_peer.py --seconds 60 [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
os.environ["LSLAPICFG"] = str(TOOLS / "lsl_api.cfg")  # before anything imports pylsl/mne_lsl

import numpy as np  # noqa: E402
import psutil  # noqa: E402

SENSORS = {"eeg": (32, 250.0), "emg": (8, 500.0), "imu": (6, 50.0)}  # the model's grids
CHUNK_S, WINDOW_S, HOP_S = 0.02, 2.0, 0.1
PHASE_S = CHUNK_S / 2  # producer grid vs window grid
WARMUP_S = 5.0
CONSUMERS = ("ours", "StreamLSL", "bare")
CLI_RUN = [sys.executable, "-m", "crossl_stream.cli", "run"]


def _stop_on_sigterm() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def _ticks(stop: threading.Event, clock: Callable[[], float]) -> Iterator[None]:
    """Yield every HOP_S on average, each tick dithered within a chunk period."""
    rng, base, k = np.random.default_rng(1), clock(), 0
    while not stop.is_set():
        k += 1
        stop.wait(max(0.0, base + k * HOP_S + rng.uniform(0, CHUNK_S) - clock()))
        if not stop.is_set():
            yield


def _finish(log: Path, taken: list[tuple[float, float]], clock: Callable[[], float]) -> None:
    offset = clock() - time.monotonic()  # the consumer's LSL clock vs time.monotonic
    log.write_text(json.dumps({"taken": taken, "clock_offset_s": offset}))


# -- roles, each in its own process ---------------------------------------------------------


def produce(tag: str) -> None:
    """Push the three streams in real time until SIGTERM."""
    import pylsl

    stop = _stop_on_sigterm()
    outlets = {
        n: pylsl.StreamOutlet(
            pylsl.StreamInfo(f"{tag}-{n}", n, ch, rate, pylsl.cf_float32, f"{tag}-{n}")
        )
        for n, (ch, rate) in SENSORS.items()
    }
    rng = np.random.default_rng(0)
    blocks = {
        n: rng.normal(size=(round(CHUNK_S * r), c)).astype(np.float32)
        for n, (c, r) in SENSORS.items()
    }
    start = math.ceil((pylsl.local_clock() + 0.5) / HOP_S) * HOP_S + PHASE_S
    k = 0
    while not stop.is_set():
        t0 = start + k * CHUNK_S
        time.sleep(max(0.0, t0 + CHUNK_S - pylsl.local_clock()))
        for name, (_, rate) in SENSORS.items():
            stamps = t0 + np.arange(len(blocks[name])) / rate
            outlets[name].push_chunk(blocks[name], stamps.tolist())
        k += 1


def consume_streamlsl(tag: str, log: str) -> None:
    """StreamLSL per stream; every tick get_data(winsize=2.0) on each."""
    import mne_lsl
    from mne_lsl.lsl import local_clock
    from mne_lsl.stream import StreamLSL

    mne_lsl.set_log_level("WARNING")
    stop = _stop_on_sigterm()
    streams = [StreamLSL(WINDOW_S, name=f"{tag}-{n}").connect(timeout=30.0) for n in SENSORS]
    taken: list[tuple[float, float]] = []
    for _ in _ticks(stop, local_clock):
        newest = [s.get_data(winsize=WINDOW_S)[1][-1] for s in streams]
        now = local_clock()
        if taken or min(newest) > 0:  # the buffers start as zeros
            if not taken:
                Path(log + ".ready").write_text("1")
            taken.append((now, now - min(newest)))
    for s in streams:
        s.disconnect()
    _finish(Path(log), taken, local_clock)


class Ring:
    """The newest samples of one stream: values and timestamps, written in place."""

    def __init__(self, channels: int, rate: float) -> None:
        self.n = round(WINDOW_S * rate)
        self.cap = 2 * self.n
        self.data = np.zeros((self.cap, channels), np.float32)
        self.ts = np.zeros(self.cap)
        self.count = 0
        self.lock = threading.Lock()
        self._last = np.arange(-self.n, 0)

    def write(self, values: np.ndarray, stamps: np.ndarray) -> None:
        idx = (self.count + np.arange(len(stamps))) % self.cap
        with self.lock:
            self.data[idx], self.ts[idx] = values, stamps
            self.count += len(stamps)

    def last(self) -> tuple[np.ndarray, float] | None:
        """A copy of the last 2 s and the newest timestamp (None: not 2 s yet)."""
        with self.lock:
            if self.count < self.n:
                return None
            idx = (self.count + self._last) % self.cap
            return self.data[idx], float(self.ts[idx[-1]])


def consume_bare(tag: str, log: str) -> None:
    """pylsl inlets, a reader thread each into a Ring; every tick the last 2 s of each."""
    import pylsl

    stop = _stop_on_sigterm()
    rings = {n: Ring(ch, rate) for n, (ch, rate) in SENSORS.items()}

    def read(name: str) -> None:
        info = pylsl.resolve_bypred(f"name='{tag}-{name}'", 1, 30.0)[0]
        inlet = pylsl.StreamInlet(info, max_buflen=2)
        dest = np.empty((256, SENSORS[name][0]), np.float32)
        while not stop.is_set():
            values, stamps = inlet.pull_chunk(
                timeout=0.2, max_samples=256, dest_obj=dest, min_samples=1, as_numpy=True
            )
            if len(stamps):
                rings[name].write(values, stamps)

    threads = [threading.Thread(target=read, args=(n,), daemon=True) for n in SENSORS]
    for t in threads:
        t.start()
    taken: list[tuple[float, float]] = []
    for _ in _ticks(stop, pylsl.local_clock):
        windows = [r.last() for r in rings.values()]
        now = pylsl.local_clock()
        if all(w is not None for w in windows):
            if not taken:
                Path(log + ".ready").write_text("1")
            taken.append((now, now - min(w[1] for w in windows)))
    for t in threads:
        t.join(timeout=2.0)
    _finish(Path(log), taken, pylsl.local_clock)


# -- the driver -----------------------------------------------------------------------------


def write_config(work: Path, tag: str) -> Path:
    sys.path.insert(0, str(TOOLS))
    import bench_latency  # its make_model: these channels at the model's rates, 2 s windows

    assert {n: r for n, (_, r) in SENSORS.items()} == bench_latency.TARGET_HZ
    model = bench_latency.make_model(work / "model")
    sensors = {n: {"channels": c, "rate_hz": r, "stale_s": 0.1} for n, (c, r) in SENSORS.items()}
    cfg = {
        "sensors": sensors,
        "readers": [{"kind": "lsl", "streams": {n: {"name": f"{tag}-{n}"} for n in SENSORS}}],
        "window": {"hop_s": HOP_S, "lateness_s": 0.0, "connect_grace_s": 5.0},
        "inference": {"model": str(model), "max_batch": 4, "backpressure": "drop_oldest"},
        "publishers": [],
    }
    path = work / "peer.yaml"
    path.write_text(json.dumps(cfg))
    return path


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, its threads and its live children."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        t = p.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


def wait_ready(procs: dict[str, subprocess.Popen], ready: dict[str, Path], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not all(p.exists() and p.stat().st_size > 0 for p in ready.values()):
        for name, proc in procs.items():
            if proc.poll() is not None:
                log = next(iter(ready.values())).parent / f"{name}.log"
                tail = log.read_text()[-2000:] if log.exists() else ""
                raise SystemExit(f"{name} exited early (rc {proc.returncode}):\n{tail}")
        if time.monotonic() > deadline:
            waiting = [n for n, p in ready.items() if not (p.exists() and p.stat().st_size)]
            raise SystemExit(f"no first window after {limit_s:g} s from {waiting}")
        time.sleep(0.2)


def ours_freshness(jsonl: Path, t0: float, t1: float) -> tuple[list[float], int]:
    ages, partial = [], 0
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        if r["age_ms"] is None or not t0 <= r["t_window_end"] + r["age_ms"] / 1000 <= t1:
            continue
        if not all(r["mask"].values()):
            partial += 1
        ages.append(r["age_ms"])
    return ages, partial


def run(seconds: float, work: Path) -> dict:
    tag = f"peer{os.getpid()}"
    config = write_config(work, tag)
    me = [sys.executable, __file__, "--role"]
    jsonl, logs = work / "ours.jsonl", {c: work / f"{c}.json" for c in CONSUMERS[1:]}
    ready = {"ours": jsonl, **{c: Path(f"{p}.ready") for c, p in logs.items()}}
    commands = {
        "ours": [*CLI_RUN, str(config), "--out", str(jsonl)],
        "StreamLSL": [*me, "streamlsl", tag, str(logs["StreamLSL"])],
        "bare": [*me, "bare", tag, str(logs["bare"])],
    }
    procs: dict[str, subprocess.Popen] = {}
    log_files = []
    try:
        procs["producer"] = subprocess.Popen([*me, "producer", tag])
        time.sleep(1.0)
        for name, command in commands.items():
            err = (work / f"{name}.log").open("w")
            log_files.append(err)
            procs[name] = subprocess.Popen(command, cwd=TOOLS.parent, stdout=err, stderr=err)
        wait_ready(procs, ready, 90.0)
        time.sleep(WARMUP_S)
        pids = {n: p.pid for n, p in procs.items()}
        psutil.cpu_percent()
        t0, c0 = time.monotonic(), {n: cpu_s(pid) for n, pid in pids.items()}
        time.sleep(seconds)
        t1, c1 = time.monotonic(), {n: cpu_s(pid) for n, pid in pids.items()}
        busy = psutil.cpu_percent()
        for name in CONSUMERS:
            procs[name].send_signal(signal.SIGTERM)
        for name in CONSUMERS:
            procs[name].wait(timeout=30)
    finally:  # whatever happened, nothing is left running
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        for f in log_files:
            f.close()
    cpu = {n: (c1[n] - c0[n]) / (t1 - t0) for n in pids}
    fresh: dict[str, list[float]] = {}
    fresh["ours"], partial = ours_freshness(jsonl, t0, t1)
    offsets = {}
    for name, path in logs.items():
        out = json.loads(path.read_text())
        fresh[name] = [1000 * f for t, f in out["taken"] if t0 <= t <= t1]
        offsets[name] = out["clock_offset_s"]
    result = {"seconds": t1 - t0, "machine_busy_pct": busy, "ours_partial_windows": partial}
    result["clock_offsets_s"] = offsets
    result["producer_cpu_s_per_s"] = cpu["producer"]
    for name in CONSUMERS:
        f = np.array(fresh[name])
        result[name] = {
            "cpu_s_per_s": cpu[name],
            "fresh_p50_ms": _pct(f, 50),
            "fresh_p99_ms": _pct(f, 99),
            "windows": len(f),
        }
    strict = np.array(fresh["ours"]) + 1000 / min(r for _, r in SENSORS.values())
    result["ours"]["strict_fresh_p50_ms"] = _pct(strict, 50)
    result["ours"]["strict_fresh_p99_ms"] = _pct(strict, 99)
    return result


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{names[0] if names else 'unknown CPU'}, {os.cpu_count()} logical cores"


def report(r: dict) -> None:
    print(f"machine: {machine()}")
    print(
        f"steady interval {r['seconds']:.1f} s; producer {r['producer_cpu_s_per_s']:.3f} CPU s/s; "
        f"whole machine {r['machine_busy_pct']:.0f}% busy"
    )
    print(
        f"{'consumer':<10} {'CPU s/s':>8} {'fresh p50 ms':>13} {'fresh p99 ms':>13} {'windows':>8}"
    )
    for name in CONSUMERS:
        c = r[name]
        print(
            f"{name:<10} {c['cpu_s_per_s']:8.3f} {c['fresh_p50_ms']:13.1f} "
            f"{c['fresh_p99_ms']:13.1f} {c['windows']:8d}"
        )
    o = r["ours"]
    print(
        f"ours by the strictest reading (newest imu grid sample, t_end - 20 ms): "
        f"p50 {o['strict_fresh_p50_ms']:.1f} ms, p99 {o['strict_fresh_p99_ms']:.1f} ms; "
        f"{r['ours_partial_windows']} of ours' windows lacked a sensor"
    )
    for peer in CONSUMERS[1:]:
        p = r[peer]
        print(
            f"ours / {peer:<9}: CPU {o['cpu_s_per_s'] / p['cpu_s_per_s']:.2f}x, "
            f"freshness p99 {o['fresh_p99_ms'] / p['fresh_p99_ms']:.2f}x"
        )
    offsets = ", ".join(f"{n} {1e6 * v:+.0f} us" for n, v in r["clock_offsets_s"].items())
    print(f"clock check (consumer local_clock - time.monotonic): {offsets}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        role, args = sys.argv[2], sys.argv[3:]
        {"producer": produce, "streamlsl": consume_streamlsl, "bare": consume_bare}[role](*args)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="steady interval measured")
    parser.add_argument("--json", metavar="PATH", help="also save the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args.seconds, Path(tmp))
    result["machine"] = machine()
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
