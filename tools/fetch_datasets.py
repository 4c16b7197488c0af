#!/usr/bin/env python3
"""Fetch the real recordings the project trains on into the local data cache.

The data ships inside PyPI packages, so the ordinary package client fetches it:

- seglearn (BSD-3): ``seglearn/data/watch_dataset.npy``, smartwatch accelerometer and gyroscope,
  50 Hz, 7 shoulder exercises, 10 subjects (Burns et al., 2018).
- aeon (BSD-3): UEA BasicMotions, accelerometer and gyroscope, 10 Hz, 4 activities.

The seglearn file is a pickled dict; it is unpickled once here, from the wheel the package
index served, and rewritten as a plain ``.npz`` so that nothing later needs pickle.

Usage: python tools/fetch_datasets.py [--cache DIR]   (default: $CROSSL_STREAM_DATA or
~/.cache/crossl-stream). Already-fetched files are kept.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from crossl_stream.training.datasets import data_cache

PACKAGES = {"seglearn": "1.2.5", "aeon": "1.6.0"}
BASICMOTIONS = ("BasicMotions_TRAIN.ts", "BasicMotions_TEST.ts")


def download_wheel(name: str, version: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--quiet",
        "--dest",
        str(dest),
        f"{name}=={version}",
    ]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob(f"{name}-{version}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip downloaded no wheel for {name}=={version} into {dest}")
    return wheels[0]


def convert_watch(npy: Path, out: Path) -> None:
    """Rewrite seglearn's pickled dict as a pickle-free npz (concatenated samples + offsets).

    Written to a temporary name and renamed, so an interrupted run leaves nothing half-done.
    """
    data = np.load(npy, allow_pickle=True).item()
    series = [np.asarray(x, dtype=np.float32) for x in data["X"]]
    offsets = np.cumsum([0] + [len(x) for x in series]).astype(np.int64)
    partial = out.with_suffix(".partial.npz")
    np.savez_compressed(
        partial,
        samples=np.concatenate(series),
        offsets=offsets,
        label=np.asarray(data["y"], dtype=np.int64),
        subject=np.asarray(data["subject"], dtype=np.int64),
        side=np.asarray(data["side"], dtype=np.int64),
        class_names=np.asarray(data["y_labels"]),
        channel_names=np.asarray(data["X_labels"]),
        rate_hz=np.float64(50.0),
    )
    partial.replace(out)


def fetch(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    watch = cache / "watch.npz"
    bm_dir = cache / "BasicMotions"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not watch.is_file():
            wheel = download_wheel("seglearn", PACKAGES["seglearn"], tmp)
            with zipfile.ZipFile(wheel) as zf:
                zf.extract("seglearn/data/watch_dataset.npy", tmp)
            convert_watch(tmp / "seglearn/data/watch_dataset.npy", watch)
            print(f"wrote {watch}")
        if not all((bm_dir / f).is_file() for f in BASICMOTIONS):
            wheel = download_wheel("aeon", PACKAGES["aeon"], tmp)
            bm_dir.mkdir(exist_ok=True)
            with zipfile.ZipFile(wheel) as zf:
                for name in BASICMOTIONS:
                    partial = bm_dir / f"{name}.partial"
                    with (
                        zf.open(f"aeon/datasets/data/BasicMotions/{name}") as src,
                        open(partial, "wb") as dst,
                    ):
                        shutil.copyfileobj(src, dst)
                    partial.replace(bm_dir / name)
            print(f"wrote {bm_dir}")
    print(f"data cache ready: {cache}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=data_cache())
    fetch(parser.parse_args().cache)


if __name__ == "__main__":
    main()
