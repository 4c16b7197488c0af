#!/usr/bin/env python3
"""What idling between windows costs a hop, and whether a spin or a warm-up hop pays it back.

One process, no transport: the lab load of tools/bench_latency.py (EEG 32 ch @ 500 Hz,
EMG 8 @ 2 kHz, IMU 6 @ 100 Hz in 20 ms chunks; a CroSSL model of those modalities with
random weights, 2 s windows every 100 ms) goes through the pipeline's own parts: a
``Windower`` and the worker's ``Predictor`` as ``build_worker`` makes it from the same
config (streaming, one onnxruntime call per hop). Each step pushes one chunk per sensor
and polls; a window that comes out is predicted at once. Timed per window, on the wall
clock: ``window`` (pushing the chunks that completed it and polling it out) and ``infer``
(the predictor's call, as in a record's ``latency_ms``). The cases, in one run:

  back to back   steps with no pause: everything stays in the caches (the baseline)
  paced          a step every 20 ms, as chunks arrive live: the process idles between
  paced + spin   as paced, but busy-waiting the last SPIN ms before the step that
                 completes a window instead of sleeping
  paced + warm   as paced, with a hop of another subject (a slot of its own, so no
                 subject's state changes) WARM ms before that step

CPU per hop is the process's CPU time (time.process_time) over the case divided by its
windows: what the spin or the warm-up costs. Prints figures only, as ratios against back
to back.

    python tools/bench_wakeup.py [--hops 300] [--spin-ms 2] [--warm-ms 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))

import bench_latency as bl  # noqa: E402

from crossl_stream.config import PipelineConfig  # noqa: E402
from crossl_stream.pipeline import build_worker, load_served_model  # noqa: E402
from crossl_stream.windower import Windower  # noqa: E402

STEP_S = bl.CHUNK_S
CASES = ("back to back", "paced", "paced + spin", "paced + warm")


def predictor_and_windower(folder: Path):
    """The worker's predictor and a windower, as a pipeline builds them for the bench's
    config (LSL reader settings; the model exported to onnxruntime)."""
    bl.make_model(folder / "model")
    cfg = PipelineConfig.model_validate(bl.config("lsl", folder / "model", 0))
    worker = build_worker(cfg, load_served_model(cfg, folder, "bench_wakeup"), "bench_wakeup")
    rates = {n: r for n, (_, r) in bl.SENSORS.items()}
    windower = Windower.from_config(worker.predictor.model.modalities, cfg.window, rates)
    return worker.predictor, windower


def run_case(case: str, hops: int, spin_s: float, warm_s: float, folder: Path) -> dict:
    predictor, windower = predictor_and_windower(folder / case.replace(" ", "-"))
    rng = np.random.default_rng(0)
    blocks = {
        n: rng.normal(size=(round(STEP_S * r), c)).astype(np.float32)
        for n, (c, r) in bl.SENSORS.items()
    }
    steps_per_hop = round(windower.hop_s / STEP_S)
    warm_steps = round(bl.WINDOW_S / STEP_S) + 2 * steps_per_hop  # first windows: whole
    window_ms, infer_ms, last = [], [], None
    paced = case != "back to back"
    t0 = time.monotonic()
    cpu0, timed, first, off_phase = 0.0, 0, None, 0
    for k in range(warm_steps + hops * steps_per_hop):
        if k == warm_steps:
            cpu0 = time.process_time()
        due = t0 + (k + 1) * STEP_S
        # this step's chunks complete a window: the steps of the first one's phase
        completes = first is not None and (k - first) % steps_per_hop == 0
        if paced:
            lead = {"paced + spin": spin_s, "paced + warm": warm_s}.get(case, 0.0)
            if completes and lead:
                time.sleep(max(0.0, due - lead - time.monotonic()))
                if case == "paced + warm" and last is not None:
                    predictor([dataclasses.replace(last, subject="warm-up")])
            if case == "paced + spin" and completes:
                while time.monotonic() < due:
                    pass
            else:
                time.sleep(max(0.0, due - time.monotonic()))
        t = 100.0 + k * STEP_S  # the stream clock of this step's chunks
        start = time.perf_counter()
        for name, (_, rate) in bl.SENSORS.items():
            n = round(STEP_S * rate)
            stamps = t + np.arange(n) / rate
            windower.push(name, blocks[name], stamps, arrival=stamps[-1], received=0.0)
        windows = windower.poll(now=t + STEP_S)
        cut = time.perf_counter()
        for window in windows:
            predictor([window])
            last = window
        done = time.perf_counter()
        if windows and first is None:
            first = k
        elif windows and not completes:
            off_phase += 1
        if windows and k >= warm_steps:
            window_ms.append(1000 * (cut - start))
            infer_ms.append(1000 * (done - cut) / len(windows))
            timed += len(windows)
    if off_phase:  # the spin or warm-up would have come before the wrong step
        raise RuntimeError(f"{case}: {off_phase} windows came out of phase with the hop")
    cpu_ms = 1000 * (time.process_time() - cpu0) / max(timed, 1)
    return {
        "case": case,
        "windows": timed,
        "window_ms": [float(np.percentile(window_ms, q)) for q in (50, 99)],
        "infer_ms": [float(np.percentile(infer_ms, q)) for q in (50, 99)],
        "cpu_ms_per_hop": cpu_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hops", type=int, default=300, help="windows timed per case")
    ap.add_argument("--spin-ms", type=float, default=2.0, help="busy-wait before the step")
    ap.add_argument("--warm-ms", type=float, default=2.0, help="warm-up hop this long before")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            run_case(c, args.hops, args.spin_ms / 1000, args.warm_ms / 1000, Path(tmp))
            for c in CASES
        ]
    base = results[0]
    print(
        f"One hop of the lab model after idling, {args.hops} windows per case (window: push + "
        f"poll of the completing chunks; infer: the predictor's call; spin {args.spin_ms:g} ms,"
        f" warm-up {args.warm_ms:g} ms before the completing step):"
    )
    print(
        f"  {'case':<14} {'window p50/p99 ms':>18} {'infer p50/p99 ms':>17} "
        f"{'x back to back':>15} {'CPU ms/hop':>11}"
    )
    for r in results:
        ratio = r["infer_ms"][0] / base["infer_ms"][0]
        w, i = r["window_ms"], r["infer_ms"]
        print(
            f"  {r['case']:<14} {w[0]:>8.2f} / {w[1]:<7.2f} {i[0]:>7.2f} / {i[1]:<7.2f} "
            f"{ratio:>14.2f}x {r['cpu_ms_per_hop']:>11.2f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
