#!/usr/bin/env python3
"""How many live subjects one process serves: prints figures (no pass/fail).

N simulated subjects, each the lab load (EEG 32 ch @ 250 Hz, EMG 8 @ 500, IMU 6 @ 50; one
chunk per sensor per hop), go through the real parts in one process, paced in real time:
a ``Windower`` per subject (2 s windows every 100 ms), the ``InferenceWorker`` with its
bounded queue and the streaming ``Predictor`` (all subjects of a hop in one batch), down to
the prediction records. Two times per hop, as p50/p99 over the steady hops (first windows
excluded): the worker's (the hop's windows, as the windowers emitted them, in; their
records out) and the whole hop's (windowers included: first chunk pushed to last record).
A setting is served when the worker's p99 is within --budget-ms, the whole hop's p99
within the hop (it keeps up) and the worker dropped nothing. The model has random weights:
speed does not depend on training.

    python tools/bench_scale.py                        # CPU, fp32 and bf16, N = 25..400
    python tools/bench_scale.py --device cuda --subjects 1000 5000 10000
    python tools/bench_scale.py --check                # bf16 against fp32, then exit
    python tools/bench_scale.py --worker-only --subjects 1000 10000 --device cuda
    python tools/bench_scale.py --whole --device cuda  # whole windows/s through Predictor

``--worker-only`` times the worker alone on hops of windows made up front (marked as the
windowers mark them), for N too large to window in real time in one Python process;
``--whole`` measures whole-window throughput of ``Predictor`` (no streaming) by batch size.

The largest N served is printed per setting, and the largest whose whole hop fits the
budget too.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from crossl_stream.inference import InferenceWorker, Predictor  # noqa: E402
from crossl_stream.model import CroSSL, ModalitySpec  # noqa: E402
from crossl_stream.model.specs import Mark  # noqa: E402
from crossl_stream.model.streaming import StreamingCroSSL  # noqa: E402
from crossl_stream.windower import Window, Windower  # noqa: E402

LOAD = {"eeg": (32, 250.0), "emg": (8, 500.0), "imu": (6, 50.0)}
WINDOW_S, HOP_S = 2.0, 0.1
WARM_HOPS = round(WINDOW_S / HOP_S) + 3  # no windows before 2 s, then every subject's first


def lab_model(device: str) -> CroSSL:
    torch.manual_seed(0)
    specs = [
        ModalitySpec(name=n, channels=c, rate_hz=r, samples=round(WINDOW_S * r))
        for n, (c, r) in LOAD.items()
    ]
    return CroSSL(specs, ["rest", "grasp", "walk"]).eval().to(device)


class Subjects:
    """N subjects' sensors: a windower each and a bank of noise to read chunks from."""

    def __init__(self, model: CroSSL, n: int, seed: int = 0) -> None:
        first = Windower(model.modalities, hop_s=HOP_S, lateness_s=0.0, stale_s=0.5)
        first.emit_empty = True
        self.windowers = [first.fresh(f"s{i:05d}") for i in range(n)]
        rng = np.random.default_rng(seed)
        self.bank = {
            name: rng.normal(size=(round(4 * rate), ch)).astype(np.float32)
            for name, (ch, rate) in LOAD.items()
        }
        self.offset = rng.integers(0, 1000, size=n)
        self.sent = dict.fromkeys(LOAD, 0)  # samples per sensor so far (same for all)

    def hop(self) -> list:
        """Push one hop of every subject's sensors; the windows that became due."""
        out = []
        chunks = {}
        for name, (_ch, rate) in LOAD.items():
            k0 = self.sent[name]
            k1 = round((k0 / rate + HOP_S) * rate)
            chunks[name] = (k0, k1, np.arange(k0, k1) / rate)
            self.sent[name] = k1
        now = max(t[-1] for _, _, t in chunks.values())
        for i, w in enumerate(self.windowers):
            for name, (k0, k1, stamps) in chunks.items():
                bank = self.bank[name]
                start = (int(self.offset[i]) + k0) % (len(bank) - (k1 - k0))
                w.push(name, bank[start : start + k1 - k0], stamps, arrival=now, received=now)
            out += w.poll(now)
        return out


async def run_setting(
    model: CroSSL, n: int, precision: str, device: str, hops: int, budget_ms: float
) -> dict:
    """One N: real-time paced hops; per-hop times and the worker's drops."""
    streaming = StreamingCroSSL(model, max_streams=n, precision=precision)
    predictor = Predictor(model, device, max_batch=max(n, 1), streaming=streaming)
    worker = InferenceWorker(predictor, queue_size=2 * n, policy="drop_oldest")
    subjects = Subjects(model, n)
    times, window_ms, infer_ms = [], [], []
    stream = worker.predictions()
    next_due = time.perf_counter()
    for h in range(WARM_HOPS + hops):
        next_due += HOP_S
        t0 = time.perf_counter()
        windows = subjects.hop()
        t1 = time.perf_counter()
        dropped = worker.counters.dropped
        for w in windows:
            await worker.put(w)
        for _ in range(len(windows) - (worker.counters.dropped - dropped)):
            await anext(stream)  # every record of this hop
        t2 = time.perf_counter()
        if h >= WARM_HOPS:
            times.append(t2 - t0)
            window_ms.append(t1 - t0)
            infer_ms.append(t2 - t1)
        delay = next_due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            next_due = time.perf_counter()  # behind: no catching up in a burst
    worker.close()
    ms = np.array(times) * 1e3
    return {
        "subjects": n,
        "precision": precision,
        "device": device,
        "hop_p50_ms": float(np.percentile(ms, 50)),
        "hop_p99_ms": float(np.percentile(ms, 99)),
        "window_p50_ms": float(np.percentile(np.array(window_ms) * 1e3, 50)),
        "worker_p50_ms": float(np.percentile(np.array(infer_ms) * 1e3, 50)),
        "worker_p99_ms": float(np.percentile(np.array(infer_ms) * 1e3, 99)),
        "dropped": worker.counters.dropped,
        "predictions": worker.counters.predictions,
        "reused": sum(c.reused for c in streaming.counters.values()),
        "served": bool(
            np.percentile(infer_ms, 99) * 1e3 <= budget_ms
            and np.percentile(ms, 99) <= HOP_S * 1e3
            and worker.counters.dropped == 0
        ),
        "whole_hop_in_budget": bool(np.percentile(ms, 99) <= budget_ms),
    }


def made_hops(model: CroSSL, n: int, hops: int) -> list[list[Window]]:
    """``hops`` consecutive hops of n subjects' windows, cut from noise and marked as the
    windowers would mark them (consecutive, final): the worker's input at scales where
    windowing them live in one process is too slow."""
    rng = np.random.default_rng(0)
    shift = {m.name: round(HOP_S * m.rate_hz) for m in model.modalities}
    room = 32 + hops  # the largest offset below, then a shift per hop
    bank = {
        m.name: rng.normal(size=(m.channels, m.samples + room * shift[m.name])).astype(np.float32)
        for m in model.modalities
    }
    offsets = rng.integers(0, 32, size=n)
    out = []
    for h in range(hops):
        windows = []
        for i in range(n):
            data, marks = {}, {}
            for m in model.modalities:
                a = (int(offsets[i]) + h) * shift[m.name]
                data[m.name] = bank[m.name][:, a : a + m.samples]
                marks[m.name] = Mark(i + 1, a)
            every = dict.fromkeys(data, True)
            windows.append(
                Window(h, WINDOW_S + h * HOP_S, data, every, every, {}, 0.0, 0.0, f"s{i}", marks)
            )
        out.append(windows)
    return out


def worker_only(model: CroSSL, n: int, precision: str, device: str, hops: int) -> dict:
    """The worker's time for one hop of n subjects' windows (state warm), p50/p99."""
    streaming = StreamingCroSSL(model, max_streams=n, precision=precision)
    predictor = Predictor(model, device, max_batch=n, streaming=streaming)
    made = made_hops(model, n, hops + 2)
    predictor(made[0])  # every subject's first window: whole
    predictor(made[1])
    times = []
    for windows in made[2:]:
        t = time.perf_counter()
        predictor(windows)
        times.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def whole_throughput(model: CroSSL, device: str) -> None:
    """Whole windows per second through ``Predictor`` (streaming off), by batch size."""
    for batch in (1, 32, 1024, 4096):
        made = made_hops(model, batch, 1)[0]
        predictor = Predictor(model, device, max_batch=batch)
        predictor(made)
        reps, t = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t < 2.0:  # about 2 s a batch size
            predictor(made)
            reps += 1
        rate = reps * batch / (time.perf_counter() - t)
        print(f"whole windows through Predictor on {device}, batch {batch:>5}: {rate:>9.0f}/s")


def check_bf16(device: str) -> None:
    """bf16 against fp32 on the same streamed windows: largest probability difference and
    how many labels differ."""
    model = lab_model(device)
    subjects = Subjects(model, 32)
    exact = Predictor(model, device, 64, streaming=StreamingCroSSL(model, 64))
    half = Predictor(model, device, 64, streaming=StreamingCroSSL(model, 64, "bf16"))
    worst, differ, total = 0.0, 0, 0
    for _ in range(WARM_HOPS + 30):
        windows = subjects.hop()
        if windows:
            a, b = exact(windows), half(windows)
            pa = np.array([list(p.probs.values()) for p in a])
            pb = np.array([list(p.probs.values()) for p in b])
            worst = max(worst, float(np.abs(pa - pb).max()))
            differ += sum(x.label != y.label for x, y in zip(a, b, strict=True))
            total += len(a)
    print(f"bf16 vs fp32 on {total} windows: max |dp| {worst:.4f}, labels differ {differ}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--subjects", type=int, nargs="+", default=[25, 50, 100, 200, 300, 400])
    parser.add_argument("--hops", type=int, default=60, help="measured hops per setting")
    parser.add_argument("--budget-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1)")
    parser.add_argument("--check", action="store_true", help="bf16 vs fp32, then exit")
    parser.add_argument("--worker-only", action="store_true", help="time the worker alone")
    parser.add_argument("--whole", action="store_true", help="whole-window throughput")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or 1)  # the pipeline's default when streaming on a CPU
    gc.freeze()  # as the pipeline does after start-up: the model and code are not garbage
    if args.check:
        check_bf16(args.device)
        return
    if args.whole:
        whole_throughput(lab_model(args.device), args.device)
        return
    if args.worker_only:
        model = lab_model(args.device)
        rows = []
        for precision in args.precision:
            for n in args.subjects:
                r = worker_only(model, n, precision, args.device, args.hops)
                rows.append({"subjects": n, "precision": precision, "device": args.device, **r})
                print(
                    f"worker alone, {precision}, {n:>6} subjects: one hop p50 {r['p50']:.2f} ms,"
                    f" p99 {r['p99']:.2f} ms ({1000 * r['p50'] / n:.0f} us/subject)"
                )
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        return
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name() if args.device.startswith("cuda") else "-"
    print(
        f"machine: {os.cpu_count()} CPUs ({cpu}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, GPU {gpu}"
    )
    print(f"lab load per subject: {LOAD}; {WINDOW_S} s windows every {HOP_S * 1000:.0f} ms")
    print(
        f"{'precision':>9} {'N':>6} {'worker p50/p99 ms':>18} {'whole hop p50/p99 ms':>21} "
        f"{'windowing p50':>14} {'drops':>6}"
    )
    results = []
    model = lab_model(args.device)
    for precision in args.precision:
        best = whole = 0
        for n in args.subjects:
            r = asyncio.run(
                run_setting(model, n, precision, args.device, args.hops, args.budget_ms)
            )
            results.append(r)
            print(
                f"{precision:>9} {n:>6} {r['worker_p50_ms']:>8.2f} /{r['worker_p99_ms']:>7.2f} "
                f"{r['hop_p50_ms']:>10.2f} /{r['hop_p99_ms']:>7.2f} {r['window_p50_ms']:>14.2f} "
                f"{r['dropped']:>6}" + ("" if r["served"] else "  not served")
            )
            best = max(best, n) if r["served"] else best
            whole = max(whole, n) if r["served"] and r["whole_hop_in_budget"] else whole
            if r["hop_p99_ms"] > HOP_S * 1e3:
                break  # not keeping up: larger N only get slower
        print(
            f"{precision}: largest N served (worker p99 <= {args.budget_ms:g} ms, keeping up, "
            f"no drops): {best or 'none'}; with the whole hop within {args.budget_ms:g} ms: "
            f"{whole or 'none'}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
