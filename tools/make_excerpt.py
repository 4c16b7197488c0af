#!/usr/bin/env python3
"""Cut the shipped demo excerpt out of the fetched watch data: every recording of one subject,
as ``watch_heldout.npz`` (arrays) and ``watch_heldout.xdf`` (a session recording).

The XDF places the subject's 14 recordings one after another with a 2 s pause between them,
on an LSL-like clock starting at 1000 s: streams ``acc`` and ``gyro`` (50 Hz, float32) and a
string marker stream ``labels`` ("label:PEN" when an exercise starts, "label:none" when it
ends). The source data carries no timestamps, so sample times are nominal (50 Hz exactly).

Usage: python tools/make_excerpt.py [--subject 10] [--out-dir crossl_stream/data]
The subject must be the one the default model was trained without (configs/train-watch.yaml:
holdout_subject), so the demo's accuracy is on unseen data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from crossl_stream.training.datasets import data_cache, load_watch
from crossl_stream.xdf import XdfStream, write_xdf

START, PAUSE_S = 1000.0, 2.0


def write_npz(data: dict, keep: np.ndarray, out: Path) -> None:
    blocks = [data["samples"][data["offsets"][i] : data["offsets"][i + 1]] for i in keep]
    np.savez_compressed(
        out,
        samples=np.concatenate(blocks),
        offsets=np.cumsum([0] + [len(b) for b in blocks]).astype(np.int64),
        **{k: data[k][keep] for k in ("label", "subject", "side")},
        **{k: data[k] for k in ("class_names", "channel_names", "rate_hz")},
    )


def write_session(npz: Path, out: Path) -> None:
    ds = load_watch(npz)
    t0, times, acc, gyro, marks, texts = START, [], [], [], [], []
    for rec in ds.recordings:
        t = t0 + np.arange(rec.samples) / ds.rate_hz
        times.append(t)
        acc.append(rec.signals["acc"].T)
        gyro.append(rec.signals["gyro"].T)
        marks += [t[0], t[-1] + 1 / ds.rate_hz]
        texts += [f"label:{ds.classes[rec.label]}", "label:none"]
        t0 = t[-1] + PAUSE_S
    t = np.concatenate(times)
    offsets = [(float(x), 0.0) for x in np.arange(START, t[-1], 5.0)]
    streams = [
        XdfStream(
            "acc",
            "Accelerometer",
            t,
            np.concatenate(acc),
            ds.rate_hz,
            "watch-acc",
            ds.channel_names["acc"],
            "g",
            offsets,
        ),
        XdfStream(
            "gyro",
            "Gyroscope",
            t,
            np.concatenate(gyro),
            ds.rate_hz,
            "watch-gyro",
            ds.channel_names["gyro"],
            "rad/s",
            offsets,
        ),
        XdfStream(
            "labels", "Markers", np.array(marks), texts, 0.0, "watch-labels", clock_offsets=offsets
        ),
    ]
    write_xdf(out, streams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=Path("crossl_stream/data"))
    args = parser.parse_args()
    with np.load(data_cache() / "watch.npz", allow_pickle=False) as z:
        data = dict(z)
    keep = np.flatnonzero(data["subject"] == args.subject)
    if keep.size == 0:
        raise SystemExit(f"no recordings of subject {args.subject}")
    npz = args.out_dir / "watch_heldout.npz"
    write_npz(data, keep, npz)
    write_session(npz, args.out_dir / "watch_heldout.xdf")
    print(f"wrote {npz} and watch_heldout.xdf: {keep.size} recordings of subject {args.subject}")


if __name__ == "__main__":
    main()
