#!/usr/bin/env python3
"""Benchmark the streaming spine; prints figures (no pass/fail).

1. Ingest: RingBuffer + Windower throughput in channel-samples per second, three sensors
   (32 ch at 500 Hz, 8 ch at 2 kHz, 6 ch at 100 Hz) in 20 ms chunks (and 100 ms, to show the
   per-chunk share), 2 s windows every 100 ms, against a naive baseline (np.roll per chunk,
   resample by np.interp per channel). Best of --repeats runs, median beside it.
2. Worker: windows per second of the default model on consecutive windows every 100 ms,
   one at a time and in batches: eager torch and onnxruntime encoding whole windows (the
   exported model.onnx), and streaming (windows share encoder features; one at a time
   through stream.onnx).
3. Replay: the shipped XDF session through the whole pipeline (built from a config, as
   `crossl-stream run` does) at max speed, in times real time, per runtime (the target is
   >= 1000x on CPU for the default model).

Usage: python tools/bench_spine.py [--seconds 60] [--model models/default]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

os.environ.setdefault("LSLAPICFG", str(Path(__file__).with_name("lsl_api.cfg")))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from crossl_stream.config import PipelineConfig  # noqa: E402
from crossl_stream.inference import Predictor  # noqa: E402
from crossl_stream.model import ModalitySpec, load_model  # noqa: E402
from crossl_stream.pipeline import Pipeline  # noqa: E402
from crossl_stream.windower import Windower  # noqa: E402

SENSORS = {"eeg": (32, 500.0), "emg": (8, 2000.0), "imu": (6, 100.0)}
TARGET_HZ = {"eeg": 250.0, "emg": 1000.0, "imu": 50.0}


def chunks(seconds: float, chunk_s: float = 0.02):
    """Every chunk of the three sensors as (name, values, timestamps, arrival)."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(int(seconds / chunk_s)):
        for name, (ch, rate) in SENSORS.items():
            n = int(rate * chunk_s)
            t = k * chunk_s + np.arange(n) / rate
            out.append((name, rng.normal(size=(n, ch)).astype(np.float32), t, t[-1]))
    return out


def bench_windower(data) -> tuple[float, int]:
    specs = [
        ModalitySpec(
            name=n, channels=SENSORS[n][0], rate_hz=TARGET_HZ[n], samples=int(2 * TARGET_HZ[n])
        )
        for n in SENSORS
    ]
    w = Windower(
        specs, hop_s=0.1, lateness_s=0.0, source_rates={n: r for n, (_, r) in SENSORS.items()}
    )
    start = time.perf_counter()
    windows = 0
    for name, x, t, now in data:
        w.push(name, x, t, now, now)
        windows += len(w.poll(now))
    return time.perf_counter() - start, windows


def bench_naive(data) -> tuple[float, int]:
    """What a first attempt looks like: np.roll per chunk, np.interp per channel."""
    bufs = {
        n: (np.zeros((int(6 * r), ch), np.float32), np.full(int(6 * r), -np.inf))
        for n, (ch, r) in SENSORS.items()
    }
    next_end, windows = 2.0, 0
    start = time.perf_counter()
    for name, x, t, _ in data:
        v, ts = bufs[name]
        v = np.roll(v, -len(x), axis=0)
        ts = np.roll(ts, -len(t))
        v[-len(x) :], ts[-len(t) :] = x, t
        bufs[name] = (v, ts)
        mark = min(b[1][-1] for b in bufs.values())
        while next_end <= mark:
            for n, (vv, tt) in bufs.items():
                grid = next_end - 2.0 + np.arange(int(2 * TARGET_HZ[n])) / TARGET_HZ[n]
                np.stack([np.interp(grid, tt, vv[:, c]) for c in range(vv.shape[1])])
            windows += 1
            next_end += 0.1
    return time.perf_counter() - start, windows


def bench_worker(model_dir: str, hop_s: float = 0.1) -> dict[tuple[str, int], float]:
    """Windows per second of the Predictor, batch 1 and 32: eager torch and onnxruntime on
    whole windows, and streaming (windows sharing encoder features) as the pipeline runs it:
    one window at a time through the hop graph (stream.onnx), a batch through torch."""
    from crossl_stream.model.export import (
        ONNX_FILE,
        STREAM_FILE,
        OnnxModel,
        OnnxStep,
        weights_digest,
    )
    from crossl_stream.model.specs import Mark
    from crossl_stream.model.streaming import StreamingCroSSL
    from crossl_stream.windower import Window

    model = load_model(model_dir)
    digest = weights_digest(Path(model_dir) / "model.safetensors")
    onnx = OnnxModel(Path(model_dir) / ONNX_FILE, digest)
    rng = np.random.default_rng(0)
    n = 512
    # consecutive windows of one continuous recording, every hop_s, as a live run cuts them
    spans = {m.name: round(hop_s * m.rate_hz) for m in model.modalities}
    streams = {
        m.name: rng.normal(size=(m.channels, m.samples + n * spans[m.name])).astype(np.float32)
        for m in model.modalities
    }
    windows = [
        Window(
            i,
            model.window_s + i * hop_s,
            {
                m.name: streams[m.name][:, i * spans[m.name] : i * spans[m.name] + m.samples]
                for m in model.modalities
            },
            {m.name: True for m in model.modalities},
            {},
            {},
            0.0,
            marks={m.name: Mark(1, i * spans[m.name]) for m in model.modalities},
        )
        for i in range(n)
    ]
    out = {}
    for runtime in ("torch", "onnxruntime", "streaming"):
        for batch in (1, 32):
            streaming = None
            if runtime == "streaming":
                step = OnnxStep(Path(model_dir) / STREAM_FILE, model, digest)
                streaming = StreamingCroSSL(model, step=step)
            session = onnx if runtime == "onnxruntime" else None
            predictor = Predictor(model, "cpu", batch, onnx=session, streaming=streaming)
            predictor(windows[:batch])  # warm up
            start = time.perf_counter()
            for i in range(batch, n, batch):
                predictor(windows[i : i + batch])
            out[runtime, batch] = (n - batch) / (time.perf_counter() - start)
    return out


def bench_replay(model_dir: str, runtime: str, streaming: bool) -> tuple[float, float, int]:
    """The shipped session through the whole pipeline, built from a config as `run` does."""
    cfg = PipelineConfig.model_validate(
        {
            "sensors": {s: {"channels": 3, "rate_hz": 50} for s in ("acc", "gyro")},
            "readers": [{"kind": "replay", "speed": "max"}],
            "inference": {
                "model": model_dir,
                "runtime": runtime,
                "streaming": streaming,
                "max_batch": 64,
                "queue_size": 256,
                "backpressure": "block",
            },
            "publishers": [],
        }
    )
    pipeline = Pipeline.from_config(cfg)
    recording = pipeline.readers[0].recording
    start = time.perf_counter()
    metrics = asyncio.run(pipeline.run())
    wall = time.perf_counter() - start
    return recording.end - recording.start, wall, metrics.counts.predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="stream length to ingest")
    parser.add_argument("--model", default="models/default")
    parser.add_argument("--repeats", type=int, default=5, help="ingest runs (best reported)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for chunk_s in (0.02, 0.1):
        data = chunks(args.seconds, chunk_s)
        samples = sum(x.size for _, x, _, _ in data)
        runs = {
            name: sorted(bench(data)[0] for _ in range(args.repeats))
            for name, bench in (("crossl-stream", bench_windower), ("naive", bench_naive))
        }
        windows = bench_windower(data)[1]
        print(
            f"ingest (buffer + windower), {args.seconds:g} s of 3 sensors in "
            f"{chunk_s * 1000:g} ms chunks ({len(data)} chunks, {samples / 1e6:.1f} M "
            f"channel-samples, {windows} windows), best of {args.repeats}:"
        )
        for name, took in runs.items():
            best, median = took[0], took[len(took) // 2]
            print(
                f"  {name:<14}{samples / best / 1e6:8.1f} M ch-samples/s "
                f"({args.seconds / best:5.0f}x real time; median {samples / median / 1e6:.1f} M/s)"
            )
        ratio = runs["naive"][0] / runs["crossl-stream"][0]
        print(f"  ratio         {ratio:8.1f}x the naive baseline")
    rates = bench_worker(args.model)
    print(f"worker, {args.model} on cpu, consecutive windows every 100 ms, windows/s:")
    for runtime in ("torch", "onnxruntime", "streaming"):
        one, many = rates[runtime, 1], rates[runtime, 32]
        print(
            f"  {runtime:<12} {one:6.0f} one at a time ({1000 / one:.2f} ms each), "
            f"{many:6.0f} in batches of 32"
        )
    for base in ("torch", "onnxruntime"):
        print(
            f"  streaming / {base}: {rates['streaming', 1] / rates[base, 1]:.1f}x one at a "
            f"time, {rates['streaming', 32] / rates[base, 32]:.1f}x in batches"
        )
    for runtime, streaming in (("torch", False), ("onnx", False), ("onnx", True)):
        runs = sorted(bench_replay(args.model, runtime, streaming) for _ in range(args.repeats))
        span, wall, n = runs[0][0], min(r[1] for r in runs), runs[0][2]
        median = sorted(r[1] for r in runs)[len(runs) // 2]
        label = f"{runtime}{', streaming' if streaming else ''}"
        print(
            f"replay, shipped session ({span:.0f} s, {n} windows) at max speed, {label}: "
            f"{wall:.2f} s, {span / wall:.0f}x real time (best of {args.repeats}; median "
            f"{span / median:.0f}x)"
        )


if __name__ == "__main__":
    main()
