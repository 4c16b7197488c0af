#!/usr/bin/env python3
"""End-to-end latency over LSL and over MQTT; prints figures (no pass/fail).

Three processes per transport, on this machine only:
  producer   32 ch at 500 Hz, 8 ch at 2 kHz, 6 ch at 100 Hz, pushed in 20 ms chunks, logging
             when the last sample of each chunk was pushed;
  pipeline   `crossl-stream run` with 2 s windows every 100 ms (a CroSSL model of those
             three modalities, randomly initialised: latency does not depend on training);
  subscriber receives the predictions, logging when each arrived.
Latency of a window = its arrival at the subscriber - the push of the last chunk it needed
(for each sensor the first chunk reaching the window's end; the latest of those). The
per-stage split comes from each prediction's own latency_ms record.

Baseline, in the same run: the transport floor. A relay process takes the pipeline's place,
reads the same streams the same way (a thread per LSL inlet, clock correction and dejitter
on; an MQTT subscription with the pipeline's DeviceClock mapping) and publishes a record the
moment every sensor has reached a window's end: no windowing, no model. Both runs are scored
on the same windows (from a second after the first full window on); a pipeline window cut
before a sensor's last chunk was pushed (that sensor went stale) is counted, not scored.
What the pipeline adds is its figure minus the relay's: the headline, printed last.

Usage: python tools/bench_latency.py [--seconds 60] [--transport lsl mqtt] [--plot PNG]
                                     [--device cpu|cuda] [--json PATH]
LSL discovery stays on this machine (LSLAPICFG is set to tools/lsl_api.cfg); the MQTT broker
is a mosquitto this script starts on 127.0.0.1 and a free port.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
os.environ["LSLAPICFG"] = str(TOOLS / "lsl_api.cfg")  # before anything imports pylsl

import numpy as np  # noqa: E402

SENSORS = {"eeg": (32, 500.0), "emg": (8, 2000.0), "imu": (6, 100.0)}
TARGET_HZ = {"eeg": 250.0, "emg": 500.0, "imu": 50.0}  # the model's grids
CHUNK_S = 0.02
WINDOW_S = 2.0
CLI_RUN = [sys.executable, "-m", "crossl_stream.cli", "run"]


# -- roles, each in its own process ----------------------------------------------------


def produce(transport: str, seconds: float, log_path: str, port: int) -> None:
    """Push the three sensors in real time; log (sensor, last sample time, push time)."""
    rng = np.random.default_rng(0)
    out = []
    if transport == "lsl":
        import pylsl

        outlets = {
            n: pylsl.StreamOutlet(
                pylsl.StreamInfo(f"bench-{n}", n, ch, rate, pylsl.cf_float32, f"bench-{n}")
            )
            for n, (ch, rate) in SENSORS.items()
        }
        for o in outlets.values():
            o.wait_for_consumers(30.0)

        def push(name, values, stamps):
            outlets[name].push_chunk(values, stamps.tolist())

        _pace(rng, time.monotonic() + 0.5, seconds, push, out)
    else:
        from crossl_stream.readers.payload import encode_binary

        client = _paho(port)
        seq = dict.fromkeys(SENSORS, 0)

        def push(name, values, stamps):
            payload = encode_binary(seq[name], float(stamps[0]), values)
            client.publish(f"bench/s1/{name}", payload, qos=0)
            seq[name] += 1

        time.sleep(3.0)  # the pipeline subscribes
        _pace(rng, time.monotonic() + 0.5, seconds, push, out)
        client.loop_stop()
    Path(log_path).write_text(json.dumps(out))


def _pace(rng, start: float, seconds: float, push, out: list) -> None:
    k = 0
    blocks = {
        n: rng.normal(size=(round(CHUNK_S * r), c)).astype(np.float32)
        for n, (c, r) in SENSORS.items()
    }
    while True:
        t_chunk_end = start + (k + 1) * CHUNK_S
        if t_chunk_end - start > seconds:
            return
        time.sleep(max(0.0, t_chunk_end - time.monotonic()))
        for name, (_, rate) in SENSORS.items():
            n = round(CHUNK_S * rate)
            stamps = start + k * CHUNK_S + np.arange(n) / rate
            push(name, blocks[name], stamps)
            out.append((name, float(stamps[-1]), time.monotonic()))
        k += 1


def relay(transport: str, seconds: float, log_path: str, port: int) -> None:
    """The transport floor: a record per window end once every sensor has passed it."""
    import threading

    hop, latest, lock = 0.1, dict.fromkeys(SENSORS, -np.inf), threading.Lock()
    state = {"next": None}
    deadline = time.monotonic() + seconds

    def passed(name: str, t_last: float, publish) -> None:
        with lock:
            latest[name] = max(latest[name], t_last)
            reached = min(latest.values())
            if state["next"] is None and np.isfinite(reached):
                state["next"] = np.ceil(reached / hop) * hop
            while state["next"] is not None and reached >= state["next"] - 1e-9:
                record = {
                    "t_window_end": state["next"],
                    "mask": dict.fromkeys(SENSORS, True),
                    "latency_ms": dict.fromkeys(("window", "queue", "infer", "total"), 0.0),
                }
                publish(json.dumps(record))
                state["next"] += hop

    if transport == "lsl":
        import pylsl

        info = pylsl.StreamInfo("bench-relay-json", "Markers", 1, 0, pylsl.cf_string, "relay")
        outlet = pylsl.StreamOutlet(info)

        def read(name: str) -> None:
            stream = pylsl.resolve_bypred(f"name='bench-{name}'", 1, 30.0)[0]
            flags = pylsl.proc_clocksync | pylsl.proc_dejitter  # as the pipeline's reader
            inlet = pylsl.StreamInlet(stream, max_buflen=2, recover=True, processing_flags=flags)
            inlet.open_stream(timeout=2.0)
            inlet.time_correction(timeout=2.0)
            dest = np.empty((1024, SENSORS[name][0]), np.float32)
            while time.monotonic() < deadline:
                _, stamps = inlet.pull_chunk(
                    timeout=0.05, max_samples=1024, dest_obj=dest, min_samples=1, as_numpy=True
                )
                if len(stamps):
                    passed(name, float(stamps[-1]), lambda text: outlet.push_sample([text]))

        threads = [threading.Thread(target=read, args=(n,), daemon=True) for n in SENSORS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        from crossl_stream.clock import DeviceClock
        from crossl_stream.readers.payload import HEADER

        clocks = {n: DeviceClock() for n in SENSORS}  # the pipeline's device-clock mapping

        def on_message(client, userdata, message) -> None:
            now = time.monotonic()
            name = message.topic.rsplit("/", 1)[1]
            _, _, t0, n, _ = HEADER.unpack_from(message.payload)
            t_last = t0 + (n - 1) / SENSORS[name][1]
            clocks[name].observe(t_last, now)
            publish = lambda text: client.publish("crossl/s1/predictions", text, qos=0)  # noqa: E731
            passed(name, float(clocks[name].map(np.array([t_last]))[0]), publish)

        client = _paho(port, on_message)
        client.subscribe("bench/+/+", qos=0)
        time.sleep(max(0.0, deadline - time.monotonic()))
        client.loop_stop()
    Path(log_path).write_text("[]")


def _paho(port: int, on_message=None):
    """A paho client of the broker on loopback, Nagle off, its network thread running."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.loop_start()
    return client


def subscribe(transport: str, seconds: float, log_path: str, port: int) -> None:
    """Receive predictions; log (record, receipt time)."""
    out = []
    deadline = time.monotonic() + seconds
    if transport == "lsl":
        import pylsl

        name = os.environ.get("BENCH_RESULTS", "crossl-stream-json")
        found = pylsl.resolve_bypred(f"name='{name}'", 1, 60.0)
        inlet = pylsl.StreamInlet(found[0])
        while time.monotonic() < deadline:
            sample, _ = inlet.pull_sample(timeout=0.5)
            if sample is not None:
                out.append((json.loads(sample[0]), time.monotonic()))
    else:
        client = _paho(port, lambda c, u, m: out.append((json.loads(m.payload), time.monotonic())))
        client.subscribe("crossl/+/predictions", qos=0)
        time.sleep(max(0.0, deadline - time.monotonic()))
        client.loop_stop()
    Path(log_path).write_text(json.dumps(out))


# -- the driver ------------------------------------------------------------------------


def make_model(folder: Path) -> Path:
    import torch

    from crossl_stream.cli import _export
    from crossl_stream.model import CroSSL, ModalitySpec, save_model

    torch.manual_seed(0)
    specs = [
        ModalitySpec(
            name=n,
            channels=SENSORS[n][0],
            rate_hz=TARGET_HZ[n],
            samples=round(WINDOW_S * TARGET_HZ[n]),
        )
        for n in SENSORS
    ]
    model = CroSSL(specs, ["rest", "grasp", "walk"]).eval()
    save_model(model, folder, {"note": "random weights for the latency benchmark"})
    _export(folder)
    return folder


def config(transport: str, model: Path, port: int, device: str = "cpu") -> dict:
    sensors = {n: {"channels": c, "rate_hz": r, "stale_s": 0.1} for n, (c, r) in SENSORS.items()}
    if transport == "lsl":
        reader = {"kind": "lsl", "streams": {n: {"name": f"bench-{n}"} for n in SENSORS}}
        publisher = {"kind": "lsl", "name": "crossl-stream"}
    else:
        broker = {"host": "127.0.0.1", "port": port}
        reader = {
            "kind": "mqtt",
            "broker": broker,
            "qos": 0,
            "streams": {n: {"topic": f"bench/+/{n}", "format": "binary"} for n in SENSORS},
        }
        publisher = {"kind": "mqtt", "broker": broker, "qos": 0}
    return {
        "sensors": sensors,
        "readers": [reader],
        "window": {"hop_s": 0.1, "lateness_s": 0.0, "connect_grace_s": 5.0},
        "inference": {
            "model": str(model),
            "max_batch": 4,
            "backpressure": "drop_oldest",
            "device": device,
        },
        "publishers": [publisher],
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_transport(
    transport: str, seconds: float, model: Path, work: Path, middle: str, device: str = "cpu"
) -> dict:
    """One run: producer -> ``middle`` (the pipeline, or the relay) -> subscriber."""
    port = free_port()
    broker = None
    if transport == "mqtt":
        if shutil.which("mosquitto") is None:
            raise SystemExit("mosquitto is not installed (make broker)")
        conf = work / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(  # set_tcp_nodelay: no Nagle delay on small messages
            f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"set_tcp_nodelay true\n{user}"
        )
        broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
    cfg = work / f"{transport}.yaml"
    cfg.write_text(json.dumps(config(transport, model, port, device)))
    me = [sys.executable, __file__]
    logs = {role: work / f"{transport}-{middle}-{role}.json" for role in ("producer", "subscriber")}
    env = dict(os.environ)
    if middle == "relay":
        env["BENCH_RESULTS"] = "bench-relay-json"
        command = [*me, "--role", "relay", transport, str(seconds + 10), os.devnull, str(port)]
    else:
        command = [*CLI_RUN, str(cfg), "--out", str(work / f"{transport}.jsonl")]
    procs = []
    try:
        pipeline = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=(work / f"{transport}-{middle}.log").open("w"),
        )
        procs.append(pipeline)
        for role, span in (("subscriber", seconds + 10), ("producer", seconds)):
            procs.append(
                subprocess.Popen(
                    [*me, "--role", role, transport, str(span), str(logs[role]), str(port)],
                    env=env,
                )
            )
        for proc in procs[1:]:
            proc.wait(timeout=seconds + 120)
        pipeline.terminate()
        pipeline.wait(timeout=60)
    finally:  # whatever happened, nothing is left running
        for proc in [*procs, broker]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return analyse(
        json.loads(logs["producer"].read_text()),
        json.loads(logs["subscriber"].read_text()),
        device_clock=transport == "mqtt",
    )


def analyse(pushes: list, received: list, device_clock: bool) -> dict:
    by_sensor = {n: np.array([(t, w) for s, t, w in pushes if s == n]) for n in SENSORS}
    if device_clock:
        # MQTT: the pipeline maps device times onto the host clock by the lower envelope of
        # (receipt - device time), which takes in the constant hold of a chunk before it is
        # sent; see the chunks as the pipeline does, shifted by each sensor's minimum hold.
        for arr in by_sensor.values():
            arr[:, 0] += np.min(arr[:, 1] - arr[:, 0])
    # the same windows for every run: from a second after the first full window to the end
    first = min(arr[0, 0] for arr in by_sensor.values())
    e2e, stages, early = [], {k: [] for k in ("window", "queue", "infer", "total")}, 0
    for record, at in received:
        t_end = record["t_window_end"]
        if t_end < first + WINDOW_S + 1.0:
            continue
        done = []
        for arr in by_sensor.values():
            i = np.searchsorted(arr[:, 0], t_end - 1e-9)
            if i < len(arr):
                done.append(arr[i, 1])
        if len(done) < len(SENSORS) or not all(record["mask"].values()):
            continue  # the end: a window that did not wait for every sensor
        if at < max(done):  # cut before a sensor's chunk was even pushed (it went stale)
            early += 1
            continue
        e2e.append(1000 * (at - max(done)))
        for k in stages:
            stages[k].append(record["latency_ms"][k])
    e2e = np.array(e2e)
    return {
        "windows": len(e2e),
        "early": early,
        "p50": float(np.percentile(e2e, 50)),
        "p99": float(np.percentile(e2e, 99)),
        "max": float(e2e.max()),
        "stages_p50": {k: float(np.percentile(v, 50)) for k, v in stages.items()},
        "e2e": e2e,
    }


def plot(results: dict[tuple[str, str], dict], path: str) -> None:
    """Latency histograms: per transport, the pipeline beside its transport floor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    transports = sorted({t for t, _ in results})
    fig, axes = plt.subplots(1, len(transports), figsize=(5.5 * len(transports), 3.6))
    for ax, transport in zip(np.atleast_1d(axes), transports, strict=True):
        top = max(np.percentile(results[transport, m]["e2e"], 99.5) for m in ("relay", "pipeline"))
        bins = np.linspace(0, top, 60)
        for middle, label in (("relay", "transport floor (relay)"), ("pipeline", "crossl-stream")):
            r = results[transport, middle]
            ax.hist(
                r["e2e"].clip(max=top),
                bins=bins,
                alpha=0.6,
                label=f"{label}, p50 {r['p50']:.1f} ms",
            )
        ax.set(
            title=f"{transport.upper()}: last sample pushed -> prediction received",
            xlabel="ms",
            ylabel="windows",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"histograms: {path}")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        role, transport, seconds, log_path, port = sys.argv[2:7]
        roles = {"producer": produce, "relay": relay, "subscriber": subscribe}
        roles[role](transport, float(seconds), log_path, int(port))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--transport", nargs="+", default=["lsl", "mqtt"], choices=["lsl", "mqtt"])
    parser.add_argument("--plot", metavar="PNG", help="write latency histograms here")
    parser.add_argument("--device", default="cpu", help="where the pipeline runs the model")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = make_model(work / "model")
        print(
            f"end-to-end latency, {args.seconds:g} s, 3 sensors (32 ch @ 500 Hz, 8 ch @ 2 kHz, "
            f"6 ch @ 100 Hz) in {CHUNK_S * 1000:g} ms chunks, 2 s windows every 100 ms, "
            f"producer -> pipeline -> subscriber in three processes:"
        )
        for transport in args.transport:
            floor = run_transport(transport, args.seconds, model, work, "relay")
            r = run_transport(transport, args.seconds, model, work, "pipeline", args.device)
            results[transport, "relay"], results[transport, "pipeline"] = floor, r
            s = r["stages_p50"]
            print(
                f"  {transport:<5} pipeline       p50 {r['p50']:6.2f} ms  p99 {r['p99']:6.2f} ms  "
                f"max {r['max']:7.2f} ms  over {r['windows']} windows ({r['early']} cut early)\n"
                f"        transport floor p50 {floor['p50']:6.2f} ms  p99 {floor['p99']:6.2f} ms  "
                f"max {floor['max']:7.2f} ms  (relay: same reads, no windowing, no model)\n"
                f"        the pipeline adds p50 {r['p50'] - floor['p50']:.2f} ms, p99 "
                f"{r['p99'] - floor['p99']:.2f} ms; inside it (p50): window {s['window']:.2f}, "
                f"queue {s['queue']:.2f}, infer {s['infer']:.2f}, receipt -> published "
                f"{s['total']:.2f} ms"
            )
        if args.plot:
            plot(results, args.plot)
    added = {
        t: (
            results[t, "pipeline"]["p50"] - results[t, "relay"]["p50"],
            results[t, "pipeline"]["p99"] - results[t, "relay"]["p99"],
        )
        for t in args.transport
    }
    print(
        f"ADDED LATENCY over the transport floor (pipeline on {args.device}; target <= 1.0 ms "
        "p50, <= 2.0 ms p99):"
    )
    for t, (p50, p99) in added.items():
        print(f"  {t:<5} {p50:+.2f} ms p50, {p99:+.2f} ms p99")
    if len(added) == 2:
        verdict = "no more" if added["mqtt"][0] <= added["lsl"][0] else "more"
        print(f"  MQTT adds {verdict} than LSL at p50")
    if args.json:
        out = {
            f"{t}-{m}": {k: v for k, v in r.items() if k != "e2e"} for (t, m), r in results.items()
        }
        out["added_ms"] = {t: {"p50": a, "p99": b} for t, (a, b) in added.items()}
        out["device"] = args.device
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
