#!/usr/bin/env python3
"""Fetch the real recordings the project trains on into the local data cache, and write each
data set as XDF session recordings.

The data ships inside PyPI packages, so the ordinary package client fetches it:

- seglearn (BSD-3): ``seglearn/data/watch_dataset.npy``, smartwatch accelerometer and gyroscope,
  50 Hz, 7 shoulder exercises, 10 subjects (Burns et al., 2018).
- aeon (BSD-3): UEA BasicMotions, accelerometer and gyroscope, 10 Hz, 4 activities.
- geomstats (MIT, Copyright (c) 2018 Nina Miolane): ``geomstats/datasets/data/emg/emg.csv``,
  forearm surface EMG from somOS-interface, an 8-electrode armband by Marius Guerard and
  Renaud Renault, as described in geomstats' EMG hand-sign tutorial (lead author Marius
  Guerard; no paper is cited): two people (mg, rr), two sessions each (the armband taken off
  and put on again between them), five hand signs (rest, rock, paper, scissors, ok).

The seglearn file is a pickled dict; it is unpickled once here, from the wheel the package
index served, and rewritten as a plain ``.npz`` so that nothing later needs pickle.

Written into the cache (an existing file is kept; each file is written under a temporary name
and renamed):

- ``watch.npz`` and ``BasicMotions/BasicMotions_{TRAIN,TEST}.ts``, as fetched.
- ``emg/emg.csv``: geomstats' CSV, kept so that a re-run does not download it again.
- ``watch/watch-s01.xdf`` .. ``watch-s10.xdf``: one session per watch subject (subject 10's
  is shipped as ``crossl_stream/data/watch_heldout.xdf``, the demo session): streams ``acc``
  (Accelerometer) and ``gyro`` (Gyroscope), 50 Hz float32, one recording after another with
  at least 2 s between them, each starting on a whole second (so every sample lies on the
  50 Hz grid), on an LSL-like clock from 1000 s; a string marker stream ``labels`` with
  ``label:<CLASS>`` at each recording's first sample and ``label:none`` one sample after its
  last. The source has no timestamps, so sample times are nominal. File header: ``subject``
  ("3"), ``session`` "1".
- ``basicmotions/basicmotions-{train,test}.xdf``: the series of each split in file order, the
  i-th at 1000 + 20 i s (10 s of samples at 10 Hz, then 10 s of nothing): ``acc`` (dims 0-2),
  ``gyro`` (dims 3-5) and ``labels`` (``label:<Class>`` at the start, ``label:none`` 10 s
  later). File header: ``subject`` "basicmotions", ``session`` "train" / "test".
- ``emg/sub-{mg,rr}_ses-{1,2}.xdf``: stream ``EMG`` (type EMG, channels emg1..emg8, the raw
  8-bit values as float32, unit "a.u.", nominal rate 250 Hz) and a string marker stream
  ``Markers`` (the sign's name at the first sample of each 25 s block, ``pause`` at the end of
  each run). File header: ``subject`` (mg, rr), ``session`` (1, 2).

What the EMG CSV holds, and how it becomes a session: rows ``time, c0..c7, label, exp`` with
``exp`` = ``<person>_s<session>``. Each session is six runs of the five signs in a fixed order
(rest, rock, paper, scissors, ok), 25 s each; ``time`` (ms since the run began) restarts with
each run and runs on across the blocks of a run, so a run is one continuous recording. The
rows arrive at about 244 Hz (mostly 2-5 ms apart, gaps up to 0.12 s); about 0.4 % come a few
ms out of time order, and the signal is smoother with them put back in time order, so each
run's rows are sorted by ``time`` (then strictly increasing). The clock between runs is not
recorded: runs follow each other with a fixed 1 s pause, the marker ``pause`` one median
sample interval after each run's last sample. Timestamps are the run's start on the session
clock plus ``time``; the sessions start at 2000, 6000, 10000 and 14000 s.

Usage: python tools/fetch_datasets.py [--cache DIR]   (default: $CROSSL_STREAM_DATA or
~/.cache/crossl-stream).
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from crossl_stream.training.datasets import data_cache
from crossl_stream.xdf import XdfStream, write_xdf

PACKAGES = {"seglearn": "1.2.5", "aeon": "1.6.0", "geomstats": "2.8.0"}
BASICMOTIONS = ("BasicMotions_TRAIN.ts", "BasicMotions_TEST.ts")
EMG_MEMBER = "geomstats/datasets/data/emg/emg.csv"
EMG_COLUMNS = ["time", *(f"c{i}" for i in range(8)), "label", "exp"]
EMG_RATE_HZ, EMG_PAUSE_S, EMG_STARTS = 250.0, 1.0, (2000.0, 6000.0, 10000.0, 14000.0)

SESSION_START, WATCH_PAUSE_S, OFFSET_EVERY_S = 1000.0, 2.0, 5.0
BM_EVERY_S, BM_RATE_HZ = 20.0, 10.0


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


# -- sessions ----------------------------------------------------------------------------


def _clock_offsets(start: float, end: float) -> list[tuple[float, float]]:
    """LabRecorder-like clock offset measurements every 5 s (all zero: one machine)."""
    return [(float(x), 0.0) for x in np.arange(start, end, OFFSET_EVERY_S)]


def imu_session(
    t: np.ndarray,
    acc: np.ndarray,
    gyro: np.ndarray,
    marks: Sequence[float],
    texts: Sequence[str],
    rate_hz: float,
    source: str,
    names: tuple[Sequence[str], Sequence[str]],
    units: tuple[str, str],
) -> list[XdfStream]:
    """Streams ``acc``, ``gyro`` (float32, shared timestamps ``t``) and the string marker
    stream ``labels``, with clock offsets every 5 s from the session start."""
    offsets = _clock_offsets(SESSION_START, t[-1])
    return [
        XdfStream(
            "acc", "Accelerometer", t, acc, rate_hz, f"{source}-acc", names[0], units[0], offsets
        ),
        XdfStream(
            "gyro", "Gyroscope", t, gyro, rate_hz, f"{source}-gyro", names[1], units[1], offsets
        ),
        XdfStream(
            "labels",
            "Markers",
            np.array(marks),
            list(texts),
            0.0,
            f"{source}-labels",
            clock_offsets=offsets,
        ),
    ]


def write_watch_session(
    data: Mapping[str, np.ndarray],
    keep: Sequence[int],
    out: Path,
    *,
    header: Mapping[str, str] | None = None,
) -> Path:
    """The watch recordings ``keep`` (indices into the npz arrays ``data``, in that order) as
    one session: ``acc``/``gyro`` at 50 Hz one recording after another, 2 s apart (the next
    start rounded up to a whole second, so samples lie on the 50 Hz grid), from 1000 s;
    ``label:<CLASS>`` at each start and ``label:none`` one sample after each end."""
    rate = float(data["rate_hz"])
    classes = [str(c) for c in data["class_names"]]
    channels = [str(c) for c in data["channel_names"]]
    t0, times, acc, gyro, marks, texts = SESSION_START, [], [], [], [], []
    for i in keep:
        block = data["samples"][data["offsets"][i] : data["offsets"][i + 1]]
        t = t0 + np.arange(len(block)) / rate
        times.append(t)
        acc.append(block[:, 0:3])
        gyro.append(block[:, 3:6])
        marks += [t[0], t[-1] + 1 / rate]
        texts += [f"label:{classes[data['label'][i]]}", "label:none"]
        # the next start on a whole second; round() first: 1017.0000000001 is one
        t0 = float(math.ceil(round(t[-1] + WATCH_PAUSE_S, 6)))
    streams = imu_session(
        np.concatenate(times),
        np.concatenate(acc),
        np.concatenate(gyro),
        marks,
        texts,
        rate,
        "watch",
        (channels[0:3], channels[3:6]),
        ("g", "rad/s"),
    )
    return write_xdf(out, streams, header=header)


def read_ts(path: Path) -> tuple[list[str], list[np.ndarray], list[str]]:
    """An equal-length multivariate .ts file: (class names, [C, T] series, labels)."""
    classes: list[str] = []
    series, labels = [], []
    in_data = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if line.lower().startswith("@classlabel"):
                classes = line.split()[2:]
            in_data = line.lower() == "@data"
            continue
        *dims, label = line.split(":")
        series.append(np.array([[float(v) for v in d.split(",")] for d in dims], np.float32))
        labels.append(label)
    return classes, series, labels


def write_basicmotions_session(ts: Path, out: Path, split: str) -> Path:
    """Each series of ``ts`` at 1000 + 20 i s (10 s at 10 Hz, then a 10 s pause)."""
    classes, series, labels = read_ts(ts)
    times, acc, gyro, marks, texts = [], [], [], [], []
    for i, (x, label) in enumerate(zip(series, labels, strict=True)):
        if x.shape[0] != 6 or label not in classes:
            raise SystemExit(f"{ts}: series {i} has {x.shape[0]} dims and label {label!r}")
        t0 = SESSION_START + BM_EVERY_S * i
        times.append(t0 + np.arange(x.shape[1]) / BM_RATE_HZ)
        acc.append(x[0:3].T)
        gyro.append(x[3:6].T)
        marks += [t0, t0 + x.shape[1] / BM_RATE_HZ]
        texts += [f"label:{label}", "label:none"]
    streams = imu_session(
        np.concatenate(times),
        np.concatenate(acc),
        np.concatenate(gyro),
        marks,
        texts,
        BM_RATE_HZ,
        "basicmotions",
        (["ax", "ay", "az"], ["gx", "gy", "gz"]),
        ("", ""),
    )
    return write_xdf(out, streams, header={"subject": "basicmotions", "session": split})


def read_emg_csv(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """geomstats' EMG CSV per ``exp`` (in file order): time [n] (ms), values [n, 8], label."""
    with open(path) as f:
        header = f.readline().strip().split(",")
    if header != EMG_COLUMNS:
        raise SystemExit(f"{path}: columns {header}, expected {EMG_COLUMNS}")
    try:
        numbers = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(9))
        label, exp = np.loadtxt(path, str, delimiter=",", skiprows=1, usecols=(9, 10)).T
    except ValueError as exc:
        raise SystemExit(f"{path}: {exc}") from exc
    if not np.all(np.isfinite(numbers)):
        raise SystemExit(f"{path}: missing values")
    out = {}
    for name in dict.fromkeys(exp.tolist()):
        rows = np.flatnonzero(exp == name)
        out[name] = {
            "time": numbers[rows, 0],
            "values": numbers[rows, 1:9].astype(np.float32),
            "label": label[rows],
        }
    return out


def _changes(labels: np.ndarray) -> np.ndarray:
    """Indices where a new block of equal labels starts (0 included)."""
    return np.concatenate([[0], np.flatnonzero(labels[1:] != labels[:-1]) + 1])


def emg_session(rec: Mapping[str, np.ndarray], start: float, source: str) -> list[XdfStream]:
    """One person and session as streams ``EMG`` and ``Markers`` (see the module docstring)."""
    time = rec["time"]
    cuts = np.flatnonzero(np.diff(time) < -1000.0) + 1  # the clock restarts with each run
    bounds = np.concatenate([[0], cuts, [len(time)]])
    times, values, marks, texts = [], [], [], []
    next_start = start
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        order = np.argsort(time[lo:hi], kind="stable") + lo
        ms, labels = time[order], rec["label"][order]
        if len(_changes(labels)) != len(_changes(rec["label"][lo:hi])):
            raise SystemExit(f"{source}: putting the rows in time order mixes two blocks")
        if not np.all(np.diff(ms) > 0):
            raise SystemExit(f"{source}: two rows of one run share a time")
        # the first run keeps its first sample's offset; the next ones start 1 s after
        t = (next_start - ms[0] / 1000.0 if times else start) + ms / 1000.0
        times.append(t)
        values.append(rec["values"][order])
        for i in _changes(labels):
            marks.append(t[i])
            texts.append(str(labels[i]))
        marks.append(t[-1] + float(np.median(np.diff(t))))
        texts.append("pause")
        next_start = t[-1] + EMG_PAUSE_S
    t = np.concatenate(times)
    offsets = _clock_offsets(start, t[-1])
    return [
        XdfStream(
            "EMG",
            "EMG",
            t,
            np.concatenate(values),
            EMG_RATE_HZ,
            source,
            [f"emg{i}" for i in range(1, 9)],
            "a.u.",
            offsets,
        ),
        XdfStream(
            "Markers",
            "Markers",
            np.array(marks),
            texts,
            0.0,
            f"{source}-markers",
            clock_offsets=offsets,
        ),
    ]


def _write_folder(folder: Path, files: Mapping[str, Callable[[Path], object]]) -> None:
    """Write each missing file of ``folder`` with its writer (given a temporary path, then
    renamed); print one line when any was written."""
    missing = {name: w for name, w in files.items() if not (folder / name).is_file()}
    if not missing:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name, writer in missing.items():
        partial = folder / f"{name}.partial"
        writer(partial)
        partial.replace(folder / name)
    print(f"wrote {folder}: {len(missing)} of {len(files)} files")


def write_sessions(cache: Path) -> None:
    """The XDF sessions of every data set, from the fetched files."""
    with np.load(cache / "watch.npz", allow_pickle=False) as z:
        watch = dict(z)
    subjects = np.unique(watch["subject"])
    _write_folder(
        cache / "watch",
        {
            f"watch-s{int(s):02d}.xdf": (
                lambda p, s=s: write_watch_session(
                    watch,
                    np.flatnonzero(watch["subject"] == s),
                    p,
                    header={"subject": str(int(s)), "session": "1"},
                )
            )
            for s in subjects
        },
    )
    bm = cache / "BasicMotions"
    _write_folder(
        cache / "basicmotions",
        {
            f"basicmotions-{split}.xdf": (
                lambda p, split=split: write_basicmotions_session(
                    bm / f"BasicMotions_{split.upper()}.ts", p, split
                )
            )
            for split in ("train", "test")
        },
    )
    emg_dir = cache / "emg"
    names = ("mg_s1", "mg_s2", "rr_s1", "rr_s2")
    files = {f"sub-{e.split('_s')[0]}_ses-{e.split('_s')[1]}.xdf": e for e in names}
    if all((emg_dir / f).is_file() for f in files):
        return
    emg = read_emg_csv(emg_dir / "emg.csv")
    if sorted(emg) != sorted(names):
        raise SystemExit(f"{emg_dir / 'emg.csv'}: sessions {sorted(emg)}, expected {names}")

    def writer(exp: str, start: float) -> Callable[[Path], object]:
        person, session = exp.split("_s")
        header = {"subject": person, "session": session}
        return lambda p: write_xdf(p, emg_session(emg[exp], start, f"emg-{exp}"), header=header)

    _write_folder(
        emg_dir,
        {f: writer(e, start) for (f, e), start in zip(files.items(), EMG_STARTS, strict=True)},
    )


def fetch(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    watch = cache / "watch.npz"
    bm_dir = cache / "BasicMotions"
    emg_csv = cache / "emg" / "emg.csv"
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
        if not emg_csv.is_file():
            wheel = download_wheel("geomstats", PACKAGES["geomstats"], tmp)
            emg_csv.parent.mkdir(exist_ok=True)
            partial = emg_csv.with_name(f"{emg_csv.name}.partial")
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(EMG_MEMBER) as src,
                open(partial, "wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
            partial.replace(emg_csv)
            print(f"wrote {emg_csv}")
    write_sessions(cache)
    print(f"data cache ready: {cache}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=data_cache())
    fetch(parser.parse_args().cache)


if __name__ == "__main__":
    main()
