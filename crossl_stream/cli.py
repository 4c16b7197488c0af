"""The ``crossl-stream`` command: train, eval, predict, replay, run."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from crossl_stream import default_model_dir
from crossl_stream.errors import CrosslError

log = logging.getLogger("crossl_stream")

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shown(path: str | Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _git_sha() -> str:
    head = REPO_ROOT / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            return (REPO_ROOT / ".git" / ref[5:]).read_text().strip()[:12]
        return ref[:12]
    except OSError:
        return "unknown"


def cmd_train(args: argparse.Namespace) -> int:
    from crossl_stream.config import load_config
    from crossl_stream.model.checkpoint import save_model
    from crossl_stream.training.datasets import load_basicmotions, load_watch, make_windows
    from crossl_stream.training.experiments import set_threads, train_crossl

    cfg = load_config(args.config)
    set_threads(args.threads)
    start = time.perf_counter()
    if cfg.dataset == "seglearn-watch":
        dataset = load_watch()
        recordings = [r for r in dataset.recordings if r.subject != cfg.holdout_subject]
    else:
        dataset = load_basicmotions()
        recordings = [r for r in dataset.recordings if r.split == "train"]
    specs = dataset.specs(cfg.window_s)
    train = make_windows(recordings, specs, cfg.hop_s)
    log.info("training on %d windows from %d recordings", len(train), len(recordings))
    model, curves = train_crossl(specs, dataset.classes, cfg, train, 1.0, not args.quiet)
    seconds = time.perf_counter() - start
    info = {
        "dataset": cfg.dataset,
        "holdout_subject": cfg.holdout_subject,
        "train_subjects": sorted({r.subject for r in recordings}),
        "train_windows": len(train),
        "train_seconds": round(seconds, 1),
        "config": cfg.model_dump(mode="json"),
        "code_version": _git_sha(),
        "final_pretrain_loss": curves["pretrain"][-1]["loss"] if curves["pretrain"] else None,
        "final_finetune_loss": curves["finetune"][-1]["loss"],
    }
    save_model(model, args.out, info)
    (Path(args.out) / "curves.json").write_text(json.dumps(curves) + "\n")
    _export(Path(args.out))
    print(f"saved model to {args.out} ({seconds:.0f} s, {len(train)} training windows)")
    return 0


def _export(model_dir: Path) -> list[Path]:
    """Write model.onnx (whole windows) and the streaming graphs next to a checkpoint."""
    from crossl_stream.model.checkpoint import WEIGHTS, load_model
    from crossl_stream.model.export import ONNX_FILE, export_onnx, export_streaming, weights_digest

    model, digest = load_model(model_dir), weights_digest(model_dir / WEIGHTS)
    whole = export_onnx(model, model_dir / ONNX_FILE, digest)
    return [whole, *export_streaming(model, model_dir, digest)]


def cmd_export(args: argparse.Namespace) -> int:
    paths = _export(Path(args.model))
    shown = ", ".join(_shown(p) for p in paths)
    print(f"exported {shown} (each checked against the eager model)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from crossl_stream.config import load_config
    from crossl_stream.training import report
    from crossl_stream.training.experiments import (
        run_basicmotions,
        run_loso,
        run_masking_grid,
        set_threads,
    )

    set_threads(args.threads)
    raw_dir = Path(args.results)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for path in args.configs:
        cfg = load_config(path)
        progress = not args.quiet
        if cfg.dataset == "basicmotions":
            report.save_json(raw_dir / "basicmotions.json", run_basicmotions(cfg, progress))
            continue
        if not args.skip_loso:
            report.save_json(raw_dir / "loso.json", run_loso(cfg, progress, log.info))
        if cfg.evaluation.masking_grid or cfg.evaluation.compare_attention:
            report.save_json(raw_dir / "masking.json", run_masking_grid(cfg, progress, log.info))
    metrics = report.write_all(raw_dir, Path(args.model_dir), Path(args.report))
    print(json.dumps(metrics, indent=2))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from crossl_stream.model.checkpoint import load_model
    from crossl_stream.training.datasets import load_watch, make_windows, shipped_excerpt
    from crossl_stream.training.metrics import accuracy, macro_f1

    dataset = load_watch(args.recording or shipped_excerpt())
    model = load_model(args.model)
    if dataset.classes != model.classes:
        raise CrosslError(
            f"{args.model}: classes {model.classes} differ from the recording's {dataset.classes}"
        )
    specs = {s.name: s for s in model.modalities}
    window_s = next(iter(specs.values())).window_s
    print(
        f"model {_shown(args.model)} ({', '.join(specs)}), recording "
        f"{args.recording or 'shipped excerpt'}: {len(dataset.recordings)} recordings, "
        f"{window_s:g} s windows every {args.hop:g} s"
    )
    print(f"{'recording':<16}{'true':>6}{'predicted':>11}{'windows':>9}{'correct':>9}")
    y_true, y_pred = [], []
    for rec in dataset.recordings:
        w = make_windows([rec], dataset.specs(window_s), args.hop)
        probs = model.predict_proba(w.x)
        pred = probs.argmax(1)
        vote = int(np.bincount(pred, minlength=len(model.classes)).argmax())
        y_true.append(w.y)
        y_pred.append(pred)
        print(
            f"{rec.key:<16}{model.classes[rec.label]:>6}{model.classes[vote]:>11}"
            f"{len(pred):>9}{float(np.mean(pred == w.y)):>9.0%}"
        )
    yt, yp = np.concatenate(y_true), np.concatenate(y_pred)
    print(
        f"accuracy {accuracy(yt, yp):.3f} over {len(yt)} windows "
        f"(macro-F1 {macro_f1(yt, yp, len(model.classes)):.3f})"
    )
    return 0


def _dropout(text: str) -> tuple[str, float, float]:
    """``SENSOR:START:LENGTH`` (seconds from the recording start)."""
    try:
        sensor, start, length = text.split(":")
        return sensor, float(start), float(length)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--drop {text!r}: expected SENSOR:START_S:LENGTH_S, e.g. gyro:120:30"
        ) from None


def cmd_run(args: argparse.Namespace) -> int:
    from crossl_stream.config import JsonlPublisherConfig, PipelineConfig, load_config

    cfg = load_config(args.config, PipelineConfig)
    if args.out:
        out = JsonlPublisherConfig(kind="jsonl", path=Path(args.out).resolve())
        cfg = cfg.model_copy(update={"publishers": (*cfg.publishers, out)})
    return _play(cfg, Path(args.config).parent, _shown(args.config))


def cmd_replay(args: argparse.Namespace) -> int:
    from crossl_stream.config import PipelineConfig, ReplayReaderConfig
    from crossl_stream.model.checkpoint import read_meta
    from crossl_stream.readers.replay import Recording
    from crossl_stream.training.datasets import shipped_excerpt

    path = Path(args.recording) if args.recording else shipped_excerpt().with_suffix(".xdf")
    modalities = [m["name"] for m in read_meta(Path(args.model))["modalities"]]
    recording = Recording.load(path)
    sensors = {}
    for name in modalities:  # one sensor per model modality, from the stream of that name
        if name in recording.streams:
            _, values, rate = recording.streams[name]
            sensors[name] = {"channels": values.shape[1], "rate_hz": rate or 1.0}
    missing = [m for m in modalities if m not in sensors]
    if missing:
        raise CrosslError(
            f"{path}: no stream for the model's modalities {missing}; the recording has "
            f"{sorted(recording.streams)}"
        )
    publishers: list[dict] = [{"kind": "console", "every": args.print_every}]
    if args.out:
        publishers.append({"kind": "jsonl", "path": str(Path(args.out).resolve())})
    reader = ReplayReaderConfig(
        kind="replay",
        path=path.resolve(),
        speed="max" if args.speed == "max" else float(args.speed),
        dropouts=tuple({"sensor": s, "start_s": a, "length_s": n} for s, a, n in args.drop),
        start_s=args.start,
        duration_s=args.duration,
    )
    cfg = PipelineConfig.model_validate(
        {
            "sensors": sensors,
            "readers": [reader],
            "window": {"hop_s": args.hop},
            "inference": {
                "model": str(Path(args.model).resolve()),
                "device": args.device,
                "max_batch": 64,
                "queue_size": 256,
                "backpressure": "block",
            },
            "publishers": publishers,
        }
    )
    return _play(cfg, Path.cwd(), "replay")


def cmd_play(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from crossl_stream.readers.replay import Recording
    from crossl_stream.training.datasets import shipped_excerpt

    path = Path(args.recording) if args.recording else shipped_excerpt().with_suffix(".xdf")
    recording = Recording.load(path)
    section = (args.start, args.start + args.duration) if args.duration else None
    if args.to == "lsl":
        from crossl_stream.players.lsl import LslPlayer

        player = LslPlayer(recording, args.speed, args.chunk, section=section)
        where = f"LSL outlets {', '.join(player.names)} (+ markers)"
    else:
        from crossl_stream.players.mqtt import MqttPlayer
        from crossl_stream.readers.mqtt import Broker

        host, _, port = args.broker.partition(":")
        player = MqttPlayer(
            recording,
            Broker(host or "127.0.0.1", int(port or 1883)),
            args.speed,
            args.chunk,
            topic=args.topic,
            subject=args.subject,
            fmt=args.format,
            section=section,
        )
        where = (
            f"{args.format} payloads on {args.broker} "
            f"({args.topic.format(subject=args.subject, stream='STREAM')})"
        )
    print(f"playing {path.name} as {where} at {args.speed:g}x real time; Ctrl-C stops")

    async def main() -> None:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        for _ in range(args.repeat):
            pushed = await player.play()
            print(f"played: {pushed} samples")

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(main())
    return 0


def _play(cfg, base: Path, source: str) -> int:
    """Build the pipeline of ``cfg``, run it (Ctrl-C stops and drains), print a summary."""
    import asyncio
    import signal

    from crossl_stream.pipeline import Pipeline
    from crossl_stream.publishers import MemoryPublisher

    pipeline = Pipeline.from_config(cfg, base, source)
    memory = MemoryPublisher()
    pipeline.publishers.append(memory)
    print(describe(pipeline))

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal() -> None:  # the first drains; a second one stops at once
            if pipeline.stopping:
                task.cancel()
            pipeline.stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await pipeline.run()

    start = time.perf_counter()
    asyncio.run(main())
    print_summary(pipeline, memory.records, time.perf_counter() - start)
    return 0


def describe(pipeline) -> str:
    """One line: what plays, at what pace, through which model."""
    from crossl_stream.readers.replay import Replay

    parts = []
    for reader in pipeline.readers:
        speed = getattr(reader, "speed", "live")  # replay and simulator: None = max speed
        if speed == "live":
            pace = "live"
        else:
            pace = "as fast as possible" if speed is None else f"at {speed:g}x real time"
        if isinstance(reader, Replay):
            rec = reader.recording
            parts.append(
                f"replaying {rec.path.name} ({rec.end - rec.start:.0f} s, streams "
                f"{', '.join(reader.names.values())}) {pace}"
            )
        else:
            parts.append(f"{type(reader).__name__.lower()} ({', '.join(reader.sensors)}) {pace}")
    model = pipeline.worker.predictor
    return f"{'; '.join(parts)} through {model.model_id} on {model.device} ({model.runtime})"


def print_summary(pipeline, records, wall: float) -> None:
    """Windows, masks, refusals, accuracy against a replay's labels, latency, speed."""
    from crossl_stream.readers.replay import Replay

    windowers, counters = list(pipeline.windowers.values()), pipeline.counters
    masked: dict[str, int] = {}
    for w in windowers:  # one windower per subject
        for m, n in w.counters.masked.items():
            if n:
                masked[m] = masked.get(m, 0) + n
    refused = {
        "chunks": counters.bad_chunks,
        "out-of-order samples": sum(
            b.counters.out_of_order for w in windowers for b in w.buffers.values()
        ),
        "future samples": sum(sum(w.counters.future_samples.values()) for w in windowers),
        "NaN samples": sum(sum(w.counters.nan_samples.values()) for w in windowers),
        "dropped windows": pipeline.worker.counters.dropped,
    }
    refused_text = ", ".join(f"{k} {v}" for k, v in refused.items() if v) or "nothing"
    print(f"windows {len(records)}, masked {masked or 'none'}, refused {refused_text}")
    for reader in pipeline.readers:
        report = getattr(reader, "report", None)
        if report is not None:
            print(report())
    streaming = pipeline.worker.predictor.streaming
    if streaming is not None:
        shares = ", ".join(
            f"{m} {c.reused}/{c.reused + c.full}" for m, c in streaming.counters.items()
        )
        print(f"windows encoding only their new samples (streaming): {shares}")
    replays = [r for r in pipeline.readers if isinstance(r, Replay)]
    span = None
    if replays:
        recording = replays[0].recording
        window_s = pipeline.model.window_s
        scored = [
            (r, recording.label_at(r["t_window_end"] - window_s, r["t_window_end"]))
            for r in records
        ]
        scored = [(r, label) for r, label in scored if label is not None]
        if scored:
            correct = sum(r["label"] == label for r, label in scored)
            partial = [(r, label) for r, label in scored if not all(r["mask"].values())]
            line = f"accuracy {correct / len(scored):.3f} over {len(scored)} labelled windows"
            if partial:
                ok = sum(r["label"] == label for r, label in partial)
                line += f" ({ok / len(partial):.3f} over the {len(partial)} with a masked sensor)"
            print(line)
        span = recording.end - recording.start
    if records:
        total = np.array([r["latency_ms"]["total"] for r in records])
        infer = np.array([r["latency_ms"]["infer"] for r in records])
        print(
            f"latency total p50 {np.percentile(total, 50):.2f} ms, p99 "
            f"{np.percentile(total, 99):.2f} ms (inference p50 {np.percentile(infer, 50):.2f} ms)"
        )
    pace = f" ({span / wall:.0f}x real time)" if span else ""
    print(f"ran {wall:.1f} s{pace}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossl-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a CroSSL model (SSL pretraining + fine-tuning)")
    p.add_argument("config", help="training YAML, e.g. configs/train-watch.yaml")
    p.add_argument("--out", default=str(default_model_dir()), help="model directory to write")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="run the evaluation protocol and write the report")
    p.add_argument("configs", nargs="+", help="training YAMLs (watch and/or basicmotions)")
    p.add_argument("--model-dir", default=str(default_model_dir()), help="where metrics.json goes")
    p.add_argument("--report", default=str(REPO_ROOT / "docs" / "results.md"))
    p.add_argument(
        "--results",
        default=str(REPO_ROOT / "docs" / "results"),
        help="folder for the raw results JSON (kept, so the report can be rebuilt)",
    )
    p.add_argument("--skip-loso", action="store_true", help="reuse the saved LOSO results")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("replay", help="stream an XDF recording through the model")
    p.add_argument(
        "recording",
        nargs="?",
        default=None,
        help="XDF file (default: the shipped held-out session)",
    )
    p.add_argument("--model", default=str(default_model_dir()), help="model directory")
    p.add_argument("--speed", default="max", help="1 (real time), k (k times), or max")
    p.add_argument("--out", default=None, help="also write predictions to this JSONL file")
    p.add_argument("--hop", type=float, default=0.5, help="seconds between windows")
    p.add_argument(
        "--drop",
        type=_dropout,
        action="append",
        default=[],
        help="rehearse a sensor loss: SENSOR:START_S:LENGTH_S (repeatable)",
    )
    p.add_argument("--start", type=float, default=0.0, help="seconds into the recording")
    p.add_argument("--duration", type=float, default=None, help="seconds to play (default: all)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--print-every", type=int, default=10, help="print every n-th prediction")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("export", help="write model.onnx next to a checkpoint (onnxruntime)")
    p.add_argument("--model", default=str(default_model_dir()), help="model directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("play", help="play a recording as live sources (LSL outlets)")
    p.add_argument("recording", nargs="?", default=None, help="XDF (default: shipped session)")
    p.add_argument("--to", choices=["lsl", "mqtt"], default="lsl", help="what to play it as")
    p.add_argument("--speed", type=float, default=1.0, help="times real time")
    p.add_argument("--chunk", type=float, default=0.02, help="seconds of samples per push")
    p.add_argument("--start", type=float, default=0.0, help="seconds into the recording")
    p.add_argument("--duration", type=float, default=None, help="seconds to play")
    p.add_argument("--repeat", type=int, default=1, help="play it this many times")
    p.add_argument("--broker", default="127.0.0.1:1883", help="mqtt: HOST:PORT")
    p.add_argument("--topic", default="wearables/{subject}/{stream}", help="mqtt: topic")
    p.add_argument("--subject", default="s01", help="mqtt: the subject in the topic")
    p.add_argument("--format", choices=["json", "binary"], default="binary", help="mqtt")
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("run", help="run a streaming pipeline from a YAML config")
    p.add_argument("config", help="pipeline YAML, e.g. configs/replay.yaml")
    p.add_argument("--out", default=None, help="also write predictions to this JSONL file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("predict", help="predict a watch recording file and score it")
    p.add_argument("--model", default=str(default_model_dir()), help="model directory")
    p.add_argument(
        "--recording",
        default=None,
        help="watch-format .npz (default: the shipped held-out excerpt)",
    )
    p.add_argument("--hop", type=float, default=1.0, help="seconds between windows")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except CrosslError as exc:
        print(f"crossl-stream {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
