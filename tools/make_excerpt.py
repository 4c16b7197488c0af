#!/usr/bin/env python3
"""Cut the shipped demo excerpt out of the fetched watch data: every recording of one subject.

Usage: python tools/make_excerpt.py [--subject 10] [--out crossl_stream/data/watch_heldout.npz]
The subject must be the one the default model was trained without (configs/train-watch.yaml:
holdout_subject), so the demo's accuracy is on unseen data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from crossl_stream.training.datasets import data_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subject", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("crossl_stream/data/watch_heldout.npz"))
    args = parser.parse_args()
    with np.load(data_cache() / "watch.npz", allow_pickle=False) as z:
        data = dict(z)
    keep = np.flatnonzero(data["subject"] == args.subject)
    if keep.size == 0:
        raise SystemExit(f"no recordings of subject {args.subject}")
    blocks = [data["samples"][data["offsets"][i] : data["offsets"][i + 1]] for i in keep]
    np.savez_compressed(
        args.out,
        samples=np.concatenate(blocks),
        offsets=np.cumsum([0] + [len(b) for b in blocks]).astype(np.int64),
        **{k: data[k][keep] for k in ("label", "subject", "side")},
        **{k: data[k] for k in ("class_names", "channel_names", "rate_hz")},
    )
    print(f"wrote {args.out}: {keep.size} recordings of subject {args.subject}")


if __name__ == "__main__":
    main()
