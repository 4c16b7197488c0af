#!/usr/bin/env python3
"""Soak test: `crossl-stream daemon` with three live-paced simulated sensors for minutes, a
sensor outage and an MQTT broker restart on the way; memory, counts and latency over time.

What runs, all on this machine (127.0.0.1 only), in a temporary folder:
  model       a CroSSL model of three modalities (acc 3 ch 50 Hz, gyro 3 ch 50 Hz, emg 8 ch
              200 Hz; 2 s windows) with RANDOM weights, exported to ONNX as `crossl-stream
              export` does: the soak measures the runtime, not accuracy;
  broker      a mosquitto on a free port (with persistence, so a restart keeps the
              subscriber's session: what it misses is what the publisher never delivered);
  daemon      `python -m crossl_stream.cli daemon CONFIG`: a simulate reader at speed 1
              (emg silent for --outage-s from --outage-at), windows every 0.5 s, publishers
              jsonl and mqtt, /healthz and /metrics on a free port;
  subscriber  an aiomqtt client (persistent session, QoS 1) on the predictions topic,
              counting the records it gets by sequence number.
Every --interval s: the daemon's RSS and CPU, /metrics counters, /healthz, and latency
quantiles of that interval from the difference of the histogram buckets. At --restart-at s
mosquitto is stopped for --broker-down-s s and started again on the same port. At the end
the daemon gets SIGTERM; its exit status and stop time are checked, a summary is printed
and a PNG plotted.

Usage: python tools/soak.py [--minutes 10] [--out docs/img/soak.png] [--keep]
Times (--outage-at, --restart-at, --warmup-s) count from the pipeline's start (the daemon's
"running" log line), which is also t = 0 in the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
os.environ["LSLAPICFG"] = str(TOOLS / "lsl_api.cfg")  # before anything imports pylsl
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

# model modalities: name -> (channels, rate_hz, simulated kind, chunk_s)
SENSORS = {
    "acc": (3, 50.0, "imu", 0.04),
    "gyro": (3, 50.0, "imu", 0.04),
    "emg": (8, 200.0, "emg", 0.02),
}
OUTAGE_SENSOR = "emg"
SIM_START = 1000.0  # the simulator's stream clock at its start (Simulator's default)
WINDOW_S = 2.0
HOP_S = 0.5
CLASSES = ("rest", "walk", "run", "sit", "stand", "lift", "reach")
TOPIC = "crossl/{subject}/predictions"
STATUS_TOPIC = "crossl/status"
STAGES = ("total", "age")
RSS_TOLERANCE = 0.02  # the target: RSS after warm-up flat within 2 %


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- the model and the config ----------------------------------------------------------


def make_model(folder: Path, export: bool) -> tuple[str, float]:
    """A random-weight CroSSL of SENSORS saved to ``folder``; (runtime, export seconds)."""
    import torch

    from crossl_stream.model.checkpoint import WEIGHTS, save_model
    from crossl_stream.model.crossl import CroSSL
    from crossl_stream.model.specs import ModalitySpec

    torch.manual_seed(0)
    specs = [
        ModalitySpec(name=name, channels=ch, rate_hz=rate, samples=int(WINDOW_S * rate))
        for name, (ch, rate, _, _) in SENSORS.items()
    ]
    model = CroSSL(specs, CLASSES).eval()
    save_model(model, folder, {"soak": "random weights (tools/soak.py): runtime, not accuracy"})
    if not export:
        return "torch", 0.0
    from crossl_stream.model.export import (
        ONNX_FILE,
        STREAM_FILE,
        export_onnx,
        export_stream,
        weights_digest,
    )

    t0 = time.monotonic()
    try:
        digest = weights_digest(folder / WEIGHTS)
        export_onnx(model, folder / ONNX_FILE, digest)
        export_stream(model, folder / STREAM_FILE, digest)
    except Exception as exc:  # no export extra, or an exporter problem: torch it is
        print(f"ONNX export failed ({exc}); the daemon runs the model in torch")
        return "torch", time.monotonic() - t0
    return "onnx", time.monotonic() - t0


def pipeline_config(work: Path, runtime: str, broker_port: int, args) -> dict:
    sim_s = args.minutes * 60 + 180  # longer than the soak: the stream never ends by itself
    sims = {}
    for name, (_, _, kind, chunk) in SENSORS.items():
        sims[name] = {"kind": kind, "chunk_s": chunk, "jitter_s": 0.005}
    sims[OUTAGE_SENSOR]["dropouts"] = [[args.outage_at, args.outage_s]]
    return {
        "sensors": {
            n: {"channels": ch, "rate_hz": rate} for n, (ch, rate, _, _) in SENSORS.items()
        },
        "readers": [{"kind": "simulate", "duration_s": sim_s, "speed": 1, "sensors": sims}],
        "window": {"hop_s": HOP_S},
        "inference": {"model": str(work / "model"), "runtime": runtime, "max_batch": 8},
        "publishers": [
            {"kind": "jsonl", "path": str(work / "predictions.jsonl")},
            {
                "kind": "mqtt",
                "broker": {"host": "127.0.0.1", "port": broker_port, "client_id": "soak-pub"},
                "topic": TOPIC,
                "status_topic": STATUS_TOPIC,
                "queue_size": 10000,
            },
        ],
        "daemon": {
            "health": {"host": "127.0.0.1", "port": 0},
            "stop_deadline_s": args.stop_deadline_s,
            "log_format": "json",
        },
    }


# -- the broker --------------------------------------------------------------------------


class Mosquitto:
    """Owns a mosquitto process on 127.0.0.1:port; stop and start again on the same port."""

    def __init__(self, work: Path, port: int) -> None:
        if shutil.which("mosquitto") is None:
            raise SystemExit("mosquitto is not installed")
        self.port = port
        self.conf = work / "mosquitto.conf"
        (work / "mqtt-db").mkdir(exist_ok=True)
        lines = [
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "set_tcp_nodelay true",
            "persistence true",  # the subscriber's session survives the restart
            f"persistence_location {work / 'mqtt-db'}/",
            "max_queued_messages 100000",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to 'mosquitto', who cannot write here
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = open(work / "mosquitto.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mosquitto did not listen on {self.port}; see {self.log.name}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


# -- the subscriber ----------------------------------------------------------------------


class Subscriber:
    """Owns an aiomqtt client in a thread of its own: counts prediction records (unique by
    subject and seq, duplicates apart) and notes the publisher's status changes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.received = 0  # messages, duplicates included
        self.seqs: set[tuple[str, int]] = set()
        self.duplicates = 0
        self.connects = 0
        self.status: collections.deque = collections.deque(maxlen=50)  # (time, state)
        self.connected = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="soak-sub")

    def start(self) -> None:
        self._thread.start()
        if not self.connected.wait(15):
            raise SystemExit("the soak subscriber could not connect to mosquitto")

    def stop(self) -> None:
        if self._loop is not None and self._task is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(5)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._task = self._loop.create_task(self._run())
        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(self._task)
        self._loop.close()

    async def _run(self) -> None:
        import aiomqtt

        predictions = TOPIC.format(subject="+")
        quiet = logging.getLogger("soak.subscriber")
        quiet.addHandler(logging.NullHandler())
        quiet.propagate = False
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1",
                    self.port,
                    identifier="soak-sub",
                    clean_session=False,
                    logger=quiet,  # paho's "connection reset" at the broker's stop: expected
                ) as client:
                    await client.subscribe([(predictions, 1), (STATUS_TOPIC, 1)])
                    self.connects += 1
                    self.connected.set()
                    async for message in client.messages:
                        self._on(str(message.topic), bytes(message.payload))
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)  # the broker is away: try again soon

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            obj = json.loads(payload)
        except ValueError:
            return
        if topic == STATUS_TOPIC:
            with self.lock:
                self.status.append((time.monotonic(), obj.get("state")))
            return
        key = (str(obj.get("subject")), int(obj.get("seq", -1)))
        with self.lock:
            self.received += 1
            if key in self.seqs:
                self.duplicates += 1
            else:
                self.seqs.add(key)

    def unique(self) -> int:
        with self.lock:
            return len(self.seqs)


# -- the daemon ----------------------------------------------------------------------------


class Daemon:
    """Owns the daemon process; its JSON log goes to a file, a few lines are kept."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crossl_stream.cli", "daemon", str(config)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.ps = psutil.Process(self.proc.pid)
        self.ps.cpu_percent(None)
        self.log_path = log_path
        self.tail: collections.deque = collections.deque(maxlen=40)  # raw lines
        self.notable: collections.deque = collections.deque(maxlen=200)  # (t, level, msg)
        self.levels: collections.Counter = collections.Counter()
        self.tracebacks = 0
        self.errors: collections.deque = collections.deque(maxlen=5)  # (t, full JSON line)
        self.health_port: int | None = None
        self.running_at: float | None = None
        self.stopped_msg: str | None = None
        self.lost_msg: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log_path, "w") as log:
            for line in self.proc.stderr:
                log.write(line)
                log.flush()
                self.tail.append(line.rstrip())
                if "Traceback" in line:
                    self.tracebacks += 1
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                msg, level = str(obj.get("msg", "")), str(obj.get("level", "")).upper()
                if level in ("ERROR", "CRITICAL") or "exc" in obj:
                    self.errors.append((time.monotonic(), line.strip()))
                self.levels[level] += 1
                now = time.monotonic()
                if "health: http://" in msg:
                    self.health_port = int(msg.split("127.0.0.1:")[1].split("/")[0])
                elif "daemon: running" in msg:
                    self.running_at = now
                elif "daemon: stopped" in msg:
                    self.stopped_msg = msg
                elif "publishers lost records" in msg:
                    self.lost_msg = msg
                if level not in ("DEBUG",) and (
                    level in ("WARNING", "ERROR", "CRITICAL") or "MQTT" in msg or "subject" in msg
                ):
                    self.notable.append((now, level, msg))

    def get(self, path: str, timeout: float = 3.0) -> tuple[int, bytes] | None:
        try:
            url = f"http://127.0.0.1:{self.health_port}{path}"
            with urllib.request.urlopen(url, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except (OSError, ValueError):
            return None

    def wait_running(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while self.running_at is None or self.health_port is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(self.tail)
                raise SystemExit(f"the daemon did not start (exit {self.proc.poll()}):\n{tail}")
            time.sleep(0.05)

    def stop(self, timeout: float = 60.0) -> tuple[int | None, float]:
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = None
        took = time.monotonic() - t0
        self._reader.join(5)
        return rc, took

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- metrics ---------------------------------------------------------------------------------


@dataclass
class Scrape:
    """One /metrics read: counters by (name, labels) and the latency buckets by stage."""

    values: dict[tuple[str, tuple], float] = field(default_factory=dict)
    buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (le s, cum)

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)

    def sum(self, name: str, **labels: str) -> float:
        """Every series of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self.values.items() if n == name and want <= set(lab))


def parse_metrics(text: str) -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    out = Scrape()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "crossl_latency_seconds_bucket":
                le = math.inf if s.labels["le"] == "+Inf" else float(s.labels["le"])
                out.buckets.setdefault(s.labels["stage"], []).append((le, s.value))
            else:
                out.values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    for rows in out.buckets.values():
        rows.sort()
    return out


def bucket_quantiles(
    new: list[tuple[float, float]], old: list[tuple[float, float]] | None, qs=(0.5, 0.99)
) -> tuple[list[float], int]:
    """Quantiles (ms) of the observations between two cumulative bucket reads, interpolated
    within a bucket; nan when there were none. Also the number of observations."""
    bounds = np.array([b for b, _ in new])
    cum = np.array([c for _, c in new], dtype=float)
    if old:
        cum = cum - np.array([c for _, c in old], dtype=float)
    n = int(cum[-1]) if len(cum) else 0
    if n <= 0:
        return [math.nan for _ in qs], 0
    out = []
    for q in qs:
        rank = q * n
        i = int(np.searchsorted(cum, rank, side="left"))
        if i >= len(bounds) - 1 and math.isinf(bounds[-1]):  # beyond the last bound
            out.append(float(bounds[-2]) * 1000)
            continue
        lo = float(bounds[i - 1]) if i else 0.0
        below = cum[i - 1] if i else 0.0
        inside = cum[i] - below
        frac = (rank - below) / inside if inside else 1.0
        out.append((lo + frac * (float(bounds[i]) - lo)) * 1000)
    return out, n


@dataclass
class Sample:
    t: float  # s since the pipeline started
    rss_mb: float
    cpu: float
    scrape: Scrape
    health: dict
    received: int  # subscriber: unique records
    lat: dict[str, list[float]]  # stage -> [p50, p99] ms of this interval
    delta: dict[str, float]  # counters' change since the previous sample


COUNTERS = {  # short name -> (metric, labels)
    "windows": ("crossl_windows_total", {}),
    "empty": ("crossl_windows_empty_total", {}),
    "dropped": ("crossl_windows_dropped_total", {}),
    "predictions": ("crossl_predictions_total", {}),
    "masked": ("crossl_windows_masked_total", {"sensor": OUTAGE_SENSOR}),
    "jsonl": ("crossl_publisher_records_total", {"publisher": "jsonl", "outcome": "sent"}),
    "mqtt_given": ("crossl_publisher_records_total", {"publisher": "mqtt", "outcome": "given"}),
    "mqtt_sent": ("crossl_publisher_records_total", {"publisher": "mqtt", "outcome": "sent"}),
    "mqtt_dropped": ("crossl_publisher_records_total", {"publisher": "mqtt", "outcome": "dropped"}),
    "mqtt_failed": ("crossl_publisher_records_total", {"publisher": "mqtt", "outcome": "failed"}),
}


def counter(scrape: Scrape, key: str) -> float:
    name, labels = COUNTERS[key]
    return scrape.sum(name, **labels)


# -- the run -----------------------------------------------------------------------------------


def soak(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="crossl-soak-"))
    print(f"soak: {args.minutes:g} min on {os.cpu_count()} cores, no GPU used; work in {work}")
    t_model = time.monotonic()
    runtime, export_s = make_model(work / "model", not args.no_export)
    print(
        f"model: acc 3x50 Hz, gyro 3x50 Hz, emg 8x200 Hz, {WINDOW_S:g} s windows, random "
        f"weights; runtime {runtime} (made in {time.monotonic() - t_model:.0f} s, "
        f"export {export_s:.0f} s)"
    )
    broker_port = free_port()
    broker = Mosquitto(work, broker_port)
    config = work / "soak.yaml"
    config.write_text(yaml.safe_dump(pipeline_config(work, runtime, broker_port, args)))
    broker.start()
    sub = Subscriber(broker_port)
    daemon: Daemon | None = None
    samples: list[Sample] = []
    events: dict = {}
    result = 1
    try:
        sub.start()
        daemon = Daemon(config, work / "daemon.log")
        daemon.wait_running()
        t0 = daemon.running_at
        print(
            f"daemon pid {daemon.proc.pid} running; health on {daemon.health_port}, "
            f"broker on {broker_port}"
        )
        events["outage"] = args.outage_at
        end = args.minutes * 60
        outages: list[dict] = []  # broker down: {"stop", "start", "cause"}
        events["broker"] = outages
        prev: Scrape | None = None
        prev_received = 0
        next_at = 0.0
        while True:
            now = time.monotonic() - t0
            down = outages[-1] if outages and "start" not in outages[-1] else None
            if down is None and broker.proc is not None and broker.proc.poll() is not None:
                code = broker.proc.returncode
                outages.append({"stop": now, "cause": f"exited on its own ({code})"})
                print(
                    f"t={now:5.0f}s  mosquitto EXITED ({code}) without this script stopping it "
                    f"(another process signalled it?); started again in {args.broker_down_s:g} s"
                )
            elif (
                down is None
                and now >= args.restart_at
                and not any(o["cause"] == "planned" for o in outages)
            ):
                broker.stop()
                outages.append({"stop": time.monotonic() - t0, "cause": "planned"})
                print(f"t={outages[-1]['stop']:5.0f}s  mosquitto stopped")
            elif down is not None and now >= down["stop"] + args.broker_down_s:
                broker.start()
                down["start"] = time.monotonic() - t0
                print(f"t={down['start']:5.0f}s  mosquitto started again")
            if now >= next_at:
                if daemon.proc.poll() is not None:
                    print(f"t={now:5.0f}s  the daemon exited with {daemon.proc.returncode}!")
                    break
                s = take_sample(daemon, sub, prev, prev_received, now)
                if s is not None:
                    samples.append(s)
                    prev, prev_received = s.scrape, s.received
                    print(progress(s))
                next_at += args.interval
                if now >= end:
                    break
            time.sleep(min(0.2, max(0.0, next_at - (time.monotonic() - t0))))
        crashed = daemon.proc.poll() is not None
        rc, took = (daemon.proc.returncode, 0.0) if crashed else daemon.stop()
        time.sleep(1.0)  # the last records on their way to the subscriber
        result = report(args, work, daemon, sub, samples, events, rc, took, crashed, runtime)
        if samples:
            exact = record_latencies(jsonl_records(work / "predictions.jsonl"))
            plot(args.out, samples, events, args, exact)
            print(f"plot: {args.out}")
    finally:
        if daemon is not None:
            daemon.kill()
        sub.stop()
        broker.stop()
        broker.log.close()
        if args.keep:
            print(f"kept {work} (config, model, daemon.log, predictions.jsonl, mosquitto.log)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


def take_sample(
    daemon: Daemon, sub: Subscriber, prev: Scrape | None, prev_received: int, t: float
) -> Sample | None:
    try:
        rss = daemon.ps.memory_info().rss / 2**20
        cpu = daemon.ps.cpu_percent(None)
    except psutil.Error:
        return None
    got = daemon.get("/metrics")
    if got is None or got[0] != 200:
        print(f"t={t:5.0f}s  /metrics did not answer ({got and got[0]})")
        return None
    scrape = parse_metrics(got[1].decode())
    h = daemon.get("/healthz")
    health = json.loads(h[1]) if h is not None else {"status": "no answer"}
    lat = {
        stage: bucket_quantiles(scrape.buckets.get(stage, []), prev and prev.buckets.get(stage))[0]
        for stage in STAGES
    }
    received = sub.unique()
    delta = {k: counter(scrape, k) - (counter(prev, k) if prev else 0.0) for k in COUNTERS}
    delta["received"] = received - prev_received
    return Sample(t, rss, cpu, scrape, health, received, lat, delta)


def progress(s: Sample) -> str:
    d = s.delta
    streams = s.health.get("streams", {}).get("default", {})
    down = [f"{k}:{v}" for k, v in streams.items() if v != "ok"]
    mqtt = s.health.get("publishers", {}).get("mqtt", {})
    mq = mqtt.get("state", "?")
    pending = mqtt.get("pending", 0)
    return (
        f"t={s.t:5.0f}s rss {s.rss_mb:6.1f} MB cpu {s.cpu:3.0f}% | win +{d['windows']:.0f} "
        f"jsonl +{d['jsonl']:.0f} mqtt +{d['mqtt_sent']:.0f} sub +{d['received']:.0f} | "
        f"total p50/p99 {s.lat['total'][0]:5.1f}/{s.lat['total'][1]:5.1f} ms, "
        f"age {s.lat['age'][0]:5.1f}/{s.lat['age'][1]:5.1f} ms | {s.health.get('status')}"
        f" mqtt {mq}{f' pending {pending}' if pending else ''}"
        f"{' ' + ','.join(down) if down else ''}"
    )


def jsonl_records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def report(args, work, daemon, sub, samples, events, rc, took, crashed, runtime) -> int:
    """Print the summary; 0 when every check holds."""
    print("\n== summary ==")
    problems = []
    last = samples[-1].scrape if samples else Scrape()
    after = [s for s in samples if s.t >= args.warmup_s]
    if after:
        start, end = after[0], after[-1]
        change = (end.rss_mb - start.rss_mb) / start.rss_mb
        peak = max(s.rss_mb for s in after)
        ts = np.array([s.t for s in after])
        slope = np.polyfit(ts, [s.rss_mb for s in after], 1)[0] * 3600 if len(after) > 2 else 0.0
        print(
            f"RSS: {samples[0].rss_mb:.1f} MB at t={samples[0].t:.0f} s; after warm-up "
            f"{start.rss_mb:.1f} MB at t={start.t:.0f} s, at the end {end.rss_mb:.1f} MB at "
            f"t={end.t:.0f} s: {change:+.2%} (peak {peak:.1f} MB; fit {slope:+.1f} MB/h)"
        )
        if abs(change) > RSS_TOLERANCE or (peak - start.rss_mb) / start.rss_mb > RSS_TOLERANCE:
            problems.append(f"RSS moved more than {RSS_TOLERANCE:.0%} after warm-up")
    cpu = [s.cpu for s in samples[1:]]
    if cpu:
        print(f"CPU of the daemon: mean {np.mean(cpu):.0f}% of one core, max {max(cpu):.0f}%")
    c = {k: counter(last, k) for k in COUNTERS}
    print(
        f"windows {c['windows']:.0f}, predictions {c['predictions']:.0f}, empty "
        f"{c['empty']:.0f}, dropped {c['dropped']:.0f}, {OUTAGE_SENSOR} masked "
        f"{c['masked']:.0f} (at the last sample, t={samples[-1].t:.0f} s)"
        if samples
        else "no sample was taken"
    )
    if c["dropped"]:
        problems.append(f"{c['dropped']:.0f} windows dropped by backpressure")
    if daemon.stopped_msg:
        print(f"daemon's last line: {daemon.stopped_msg}")
    records = jsonl_records(work / "predictions.jsonl")
    seqs = [r.get("seq") for r in records]
    contiguous = seqs == list(range(1, len(seqs) + 1))
    final_windows = None
    if daemon.stopped_msg and "windows " in daemon.stopped_msg:
        with contextlib.suppress(ValueError):
            final_windows = int(daemon.stopped_msg.split("windows ")[1].split(",")[0])
    print(
        f"JSONL: {len(records)} records, seq 1..{seqs[-1] if seqs else 0} "
        f"{'without a gap' if contiguous else 'WITH GAPS'}; windows at the stop: {final_windows}"
    )
    if not contiguous or (final_windows is not None and final_windows != len(records)):
        problems.append("JSONL records do not match the windows cut")
    # MQTT end to end: what the subscriber got against what was published (the JSONL)
    published = {(str(r.get("subject")), int(r.get("seq", -1))) for r in records}
    with sub.lock:
        got = set(sub.seqs)
        dup, received = sub.duplicates, sub.received
    missing = sorted(seq for _, seq in published - got)
    print(
        f"MQTT: published {len(published)}, subscriber got {len(got & published)} unique "
        f"({received} messages, {dup} duplicates), missing {len(missing)}"
        + (f": seq {compress(missing)}" if missing else "")
    )
    print(
        f"MQTT publisher counters at the last sample: given {c['mqtt_given']:.0f}, sent "
        f"(PUBACK) {c['mqtt_sent']:.0f}, dropped {c['mqtt_dropped']:.0f}, failed "
        f"{c['mqtt_failed']:.0f}"
    )
    if daemon.lost_msg:
        print(f"daemon: {daemon.lost_msg}")
    if missing:
        problems.append(f"the subscriber missed {len(missing)} records")
    peak_pending = max(
        (s.health.get("publishers", {}).get("mqtt", {}).get("pending", 0) for s in samples),
        default=0,
    )
    for outage in events.get("broker", []):
        t_stop, t_start = outage["stop"], outage.get("start", math.inf)
        cut = [r for r in records if t_stop <= r["t_window_end"] - SIM_START <= t_start]
        reconnect = [
            t - daemon.running_at
            for t, _, m in daemon.notable
            if "MQTT publisher" in m and "connected to" in m and t - daemon.running_at > t_stop
        ]
        if reconnect:
            outage["publisher_back"] = reconnect[0]
        back = f"t={reconnect[0]:.1f} s" if reconnect else "never (not in the log)"
        lost_in_gap = sorted(
            int(r["seq"]) for r in cut if (str(r.get("subject")), int(r["seq"])) not in got
        )
        print(
            f"broker down ({outage['cause']}): t={t_stop:.1f}..{t_start:.1f} s "
            f"({t_start - t_stop:.1f} s); the publisher connected again at {back}; {len(cut)} "
            f"records were cut while it was down, {len(cut) - len(lost_in_gap)} of them reached "
            f"the subscriber"
        )
        for t, lvl, m in daemon.notable:
            until = reconnect[0] if reconnect else t_start + 30
            if "MQTT publisher" in m and t_stop - 1 < t - daemon.running_at <= until + 0.01:
                print(f"  daemon t={t - daemon.running_at:.1f}s {lvl}: {m}")
        if outage["cause"] != "planned":
            problems.append(f"mosquitto {outage['cause']} at t={t_stop:.0f} s (not the script)")
    print(f"MQTT publisher: peak pending seen at a sample {peak_pending:.0f}")
    if sub.status:
        states = [f"{t - daemon.running_at:.0f}s {s}" for t, s in sub.status]
        print(f"status topic seen by the subscriber: {', '.join(states)}")
    exact = record_latencies(records)
    print("latency per minute, ms: from /metrics bucket differences [exact, from the JSONL]")
    print("  minute   total p50      total p99      age p50        age p99        windows")
    for m, tp50, tp99, ap50, ap99, n in per_minute(samples):
        inside = (exact[:, 0] > (m - 1) * 60) & (exact[:, 0] <= m * 60)
        ex = np.percentile(exact[inside, 1:], [50, 99], axis=0) if inside.any() else None

        def both(v, q, col, ex=ex):
            return f"{v:5.1f} [{ex[q, col]:5.1f}]" if ex is not None else f"{v:5.1f} [  -  ]"

        print(
            f"  {m:6.0f}   {both(tp50, 0, 0)}  {both(tp99, 1, 0)}  {both(ap50, 0, 1)}  "
            f"{both(ap99, 1, 1)}  {n:7.0f}"
        )
    if last.buckets:
        whole = {st: bucket_quantiles(last.buckets.get(st, []), None)[0] for st in STAGES}
        print(
            f"whole run: total p50/p99 {whole['total'][0]:.1f}/{whole['total'][1]:.1f} ms, "
            f"age p50/p99 {whole['age'][0]:.1f}/{whole['age'][1]:.1f} ms (buckets)"
        )
    if len(exact):
        (tp50, ap50), (tp99, ap99), (tmax, amax) = np.percentile(exact[:, 1:], [50, 99, 100], 0)
        print(
            f"whole run, exact: total p50/p99/max {tp50:.1f}/{tp99:.1f}/{tmax:.1f} ms, age "
            f"p50/p99/max {ap50:.1f}/{ap99:.1f}/{amax:.1f} ms ({len(exact)} records)"
        )
    print(f"daemon log: {dict(daemon.levels)}; tracebacks {daemon.tracebacks}")
    for t, line in daemon.errors:  # the whole line: message and traceback
        obj = json.loads(line)
        print(f"  daemon t={t - daemon.running_at:.1f}s {obj.get('level')} {obj.get('logger')}:")
        print("    " + str(obj.get("msg", "")).replace("\n", "\n    "))
        if obj.get("exc"):
            print("    " + str(obj["exc"]).replace("\n", "\n    "))
    if daemon.tracebacks:
        problems.append(f"{daemon.tracebacks} traceback(s) in the daemon's log")
    if crashed:
        problems.append(f"the daemon exited on its own with {rc}")
        print("daemon log tail:\n  " + "\n  ".join(list(daemon.tail)[-20:]))
    else:
        ok = rc == 0 and took <= args.stop_deadline_s + 1.0
        print(
            f"SIGTERM: exit {rc} after {took:.2f} s (deadline {args.stop_deadline_s:g} s + 1 s)"
            f" {'ok' if ok else 'NOT OK'}"
        )
        if not ok:
            problems.append(f"stop: exit {rc} after {took:.2f} s")
    print(f"runtime {runtime}; {len(samples)} samples every {args.interval:g} s")
    print("result: " + ("all checks hold" if not problems else "; ".join(problems)))
    return 1 if problems else 0


def compress(seqs: list[int]) -> str:
    """1,2,3,7,8 -> '1-3, 7-8' (at most 8 runs shown)."""
    runs: list[list[int]] = []
    for s in seqs:
        if runs and s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs[:8])
    return text + (f" (+{len(runs) - 8} runs)" if len(runs) > 8 else "")


def record_latencies(records: list[dict]) -> np.ndarray:
    """[publish time in soak time, total ms, age ms] per JSONL record (those with both);
    published = window end + age, the window end on the simulator's clock from its start."""
    rows = [
        (r["t_window_end"] - SIM_START + r["age_ms"] / 1000, r["latency_ms"]["total"], r["age_ms"])
        for r in records
        if r.get("age_ms") is not None and "total" in (r.get("latency_ms") or {})
    ]
    return np.array(rows, dtype=float).reshape(-1, 3)


def per_minute(samples: list[Sample]) -> list[tuple]:
    """(minute, total p50, total p99, age p50, age p99, windows) from the samples nearest
    each minute's boundaries."""
    rows = []
    if not samples:
        return rows
    minutes = int(samples[-1].t // 60) + 1
    prev = None
    for m in range(minutes):
        inside = [s for s in samples if s.t <= (m + 1) * 60 + 1e-6]
        if not inside:
            continue
        cur = inside[-1]
        if prev is not None and cur is prev:
            continue
        (tp50, tp99), n = bucket_quantiles(
            cur.scrape.buckets.get("total", []), prev and prev.scrape.buckets.get("total")
        )
        (ap50, ap99), _ = bucket_quantiles(
            cur.scrape.buckets.get("age", []), prev and prev.scrape.buckets.get("age")
        )
        rows.append((m + 1, tp50, tp99, ap50, ap99, n))
        prev = cur
    return rows


def plot(out: str | Path, samples: list[Sample], events: dict, args, exact: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = np.array([s.t for s in samples]) / 60
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)

    def mark(ax, labels=False):
        a = events.get("outage")
        if a is not None:
            ax.axvspan(
                a / 60, (a + args.outage_s) / 60, color="tab:orange", alpha=0.2,
                label=f"{OUTAGE_SENSOR} outage ({args.outage_s:g} s)" if labels else None,
            )  # fmt: skip
        for i, o in enumerate(events.get("broker", [])):
            planned = o["cause"] == "planned"
            ax.axvspan(
                o["stop"] / 60, o.get("start", samples[-1].t) / 60,
                color="tab:red" if planned else "tab:brown", alpha=0.2,
                label=("broker down" if planned else "broker down (killed from outside)")
                if labels else None,
            )  # fmt: skip
            if "publisher_back" in o:
                ax.axvline(
                    o["publisher_back"] / 60, color="tab:red", ls="--", lw=1,
                    label="MQTT publisher connected again" if labels and not i else None,
                )  # fmt: skip

    ax = axes[0]
    rss = np.array([s.rss_mb for s in samples])
    ax.plot(t, rss, color="k", lw=1.2, label="daemon RSS")
    after = [s for s in samples if s.t >= args.warmup_s]
    if after:
        ref = after[0].rss_mb
        ax.axhspan(ref * (1 - RSS_TOLERANCE), ref * (1 + RSS_TOLERANCE), color="tab:green",
                   alpha=0.12, label="±2% of RSS after warm-up")  # fmt: skip
        ax.axvline(args.warmup_s / 60, color="tab:green", ls=":", lw=1, label="end of warm-up")
    mark(ax, labels=True)
    ax.set_ylabel("RSS (MB)")
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    ax.set_title(
        f"crossl-stream daemon soak: 3 simulated sensors, {HOP_S:g} s hop, "
        f"{os.cpu_count()} CPU cores"
    )

    ax = axes[1]
    for stage, color in zip(STAGES, ("tab:blue", "tab:purple"), strict=True):
        p50 = np.array([s.lat[stage][0] for s in samples])
        p99 = np.array([s.lat[stage][1] for s in samples])
        ax.plot(t, p50, color=color, lw=1, ls="--", label=f"{stage} p50")
        ax.plot(t, p99, color=color, lw=1.2, label=f"{stage} p99")
        col = 1 + STAGES.index(stage)  # the exact p99 of the same intervals, from the JSONL
        edges = [-math.inf, *[s.t for s in samples]]
        exact_p99 = [
            np.percentile(exact[m, col], 99) if (m := (exact[:, 0] > a) & (exact[:, 0] <= b)).any()
            else np.nan
            for a, b in zip(edges, edges[1:], strict=False)
        ]  # fmt: skip
        ax.plot(t, exact_p99, color=color, lw=0.8, ls=":", label=f"{stage} p99 (exact, JSONL)")
    mark(ax)
    ax.set_yscale("log")
    ax.set_ylabel(f"latency per {args.interval:g} s (ms)")
    ax.set_title(
        "p50 / p99 per interval from the /metrics buckets (about 21% apart); dotted: the exact "
        "p99 of the same windows",
        fontsize=9,
    )
    ax.legend(loc="upper left", fontsize=8, ncol=2)

    ax = axes[2]
    for key, label, style in (
        ("windows", "windows cut", dict(color="k", lw=1.5)),
        ("jsonl", "JSONL written", dict(color="tab:gray", lw=1, ls="--")),
        ("mqtt_sent", "MQTT sent (PUBACK)", dict(color="tab:blue", lw=1)),
        ("received", "subscriber got", dict(color="tab:cyan", lw=1, ls=":")),
        ("masked", f"{OUTAGE_SENSOR} masked", dict(color="tab:orange", lw=1)),
    ):
        ax.step(t, [s.delta[key] for s in samples], where="pre", label=label, **style)
    mark(ax)
    ax.set_ylabel(f"records per {args.interval:g} s")
    ax.set_xlabel("minutes since the pipeline started")
    ax.legend(loc="upper left", fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    p.add_argument("--out", default=str(ROOT / "docs" / "img" / "soak.png"), help="the PNG")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--warmup-s", type=float, default=None, help="default: 60, or 10%% of a run")
    p.add_argument("--outage-at", type=float, default=None, help="default: at 25%% of the run")
    p.add_argument("--outage-s", type=float, default=20.0, help="the emg outage's length")
    p.add_argument("--restart-at", type=float, default=None, help="default: at 60%% of the run")
    p.add_argument("--broker-down-s", type=float, default=10.0, help="mosquitto stopped this long")
    p.add_argument("--stop-deadline-s", type=float, default=5.0, help="daemon.stop_deadline_s")
    p.add_argument("--no-export", action="store_true", help="no ONNX export: the model in torch")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args()
    run_s = args.minutes * 60
    if args.warmup_s is None:
        args.warmup_s = min(60.0, 0.1 * run_s) if run_s < 600 else 60.0
    if args.outage_at is None:
        args.outage_at = 0.25 * run_s
    if args.restart_at is None:
        args.restart_at = 0.6 * run_s
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
