"""The ``crossl-stream`` command: train, eval, predict, replay, run."""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from crossl_stream import default_model_dir
from crossl_stream.errors import CrosslError
from crossl_stream.signals import on_signals

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


def _spec(args: argparse.Namespace):
    """The training spec named on the command line and its recordings, read into windows."""
    from crossl_stream.config import TrainConfig, load_config
    from crossl_stream.training.experiments import set_device, set_threads
    from crossl_stream.training.spec import load_data

    set_threads(args.threads)
    set_device(getattr(args, "device", None) or "cpu")
    cfg = load_config(args.spec, TrainConfig)
    data = load_data(cfg.data, Path(args.spec).parent, _shown(args.spec), not args.quiet)
    print(data.describe())
    return cfg, data


def _out_dir(args: argparse.Namespace, suffix: str = "") -> Path:
    """``--out``, or ``models/<spec name><suffix>``."""
    return Path(args.out) if args.out else Path("models") / f"{Path(args.spec).stem}{suffix}"


def _resume(args: argparse.Namespace, state: Path) -> None:
    """Say that ``state`` is resumed, or forget it with ``--fresh``."""
    if not state.is_file():
        return
    if args.fresh:
        state.unlink()
    else:
        print(f"resuming from {_shown(state)} (--fresh starts over)")


def _finish(out: Path) -> None:
    """Export the streaming graphs, write the model card, say how to run it."""
    from crossl_stream.model.checkpoint import fallback_dirs
    from crossl_stream.training.report import write_card

    _export(out)
    for folder in fallback_dirs(out).values():
        _export(folder)
    write_card(out)
    shown = _shown(out)
    print(f"saved model to {shown}; try: crossl-stream replay RECORDING.xdf --model {shown}")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from crossl_stream.training.workflow import PRETRAIN_STATE, run_pretrain

    out = _out_dir(args, "-pretrained")
    cfg, data = _spec(args)
    _resume(args, out / PRETRAIN_STATE)
    run_pretrain(cfg, data, out, not args.quiet)
    print(
        f"saved pretrained model (no class head) to {_shown(out)}; next: crossl-stream "
        f"finetune {_shown(args.spec)} --from {_shown(out)}"
    )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from crossl_stream.model.checkpoint import load_model
    from crossl_stream.training.workflow import FINETUNE_STATE, pretrained_info, run_finetune

    out = _out_dir(args)
    source = Path(args.pretrained)
    info = pretrained_info(source)  # a missing or foreign folder: said before reading data
    if out.resolve() == source.resolve():
        raise CrosslError(f"--out {out}: the pretrained folder itself; fine-tune into another")
    if info.get("stage") in ("finetuned", "supervised", "fallback"):
        raise CrosslError(
            f"--from {source}: already fine-tuned (on {info.get('labels_fraction', 1.0):.0%} of "
            "the labels); fine-tune from the pretrained folder it came from"
        )
    cfg, data = _spec(args)
    _resume(args, out / FINETUNE_STATE)
    run_finetune(cfg, data, load_model(source), out, args.labels_fraction, not args.quiet, info)
    _drop_fallbacks(out, "they belong to the weights `train` wrote there before")
    _finish(out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from crossl_stream.training.workflow import (
        CANDIDATES,
        FINETUNE_STATE,
        PRETRAIN_STATE,
        pretrained_info,
        run_best,
        run_finetune,
        run_pretrain,
        run_supervised,
    )

    out = _out_dir(args)
    cfg, data = _spec(args)
    data.require_classes(_shown(args.spec))
    if cfg.finetune.fallbacks and len(data.modalities) < 2:
        raise CrosslError(
            f"{_shown(args.spec)}: finetune.fallbacks: one modality "
            f"({data.modalities[0].name}); there is nothing to fall back on"
        )
    start = time.perf_counter()
    if cfg.recipe == "best":
        for recipe in ("crossl", "supervised"):
            _resume(args, out / CANDIDATES / recipe / FINETUNE_STATE)
        _resume(args, out / "pretrained" / PRETRAIN_STATE)
        _, chosen = run_best(cfg, data, out, args.labels_fraction, not args.quiet)
        scores = ", ".join(f"{k} {v:.3f}" for k, v in chosen["validation_macro_f1"].items())
        print(f"recipe {chosen['recipe']} kept (validation macro-F1: {scores})")
    elif cfg.recipe == "supervised":
        _resume(args, out / FINETUNE_STATE)
        run_supervised(cfg, data, out, args.labels_fraction, not args.quiet)
        print("trained supervised (no pretraining)")
    else:
        _resume(args, out / "pretrained" / PRETRAIN_STATE)
        _resume(args, out / FINETUNE_STATE)
        base = run_pretrain(cfg, data, out / "pretrained", not args.quiet)
        info = pretrained_info(out / "pretrained")
        run_finetune(cfg, data, base, out, args.labels_fraction, not args.quiet, info)
        print(f"trained (the pretrained model: {_shown(out / 'pretrained')})")
    _train_fallbacks(args, cfg, data, out)
    print(f"trained in {time.perf_counter() - start:.0f} s")
    _finish(out)
    return 0


def _train_fallbacks(args: argparse.Namespace, cfg, data, out: Path) -> None:
    """The fallback models ``finetune.fallbacks`` asks for; without it, none: fallbacks
    that an earlier run left in ``out`` belong to other weights and are removed (so are
    those of a modality the model no longer has)."""
    from crossl_stream.model.checkpoint import fallback_dir, fallback_dirs
    from crossl_stream.training.workflow import FINETUNE_STATE, run_fallbacks

    if not cfg.finetune.fallbacks:
        _drop_fallbacks(out, "finetune.fallbacks is off")
        return
    names = [m.name for m in data.modalities]
    for missing, folder in fallback_dirs(out).items():
        if missing not in names:
            shutil.rmtree(folder)
            print(f"removed {_shown(folder)} (the model has no {missing!r})")
    for m in names:
        _resume(args, fallback_dir(out, m) / FINETUNE_STATE)
    stops = run_fallbacks(cfg, data, out, args.labels_fraction, not args.quiet)
    scores = ", ".join(
        f"without {k} " + ("—" if v["best_val_f1"] is None else f"{v['best_val_f1']:.3f}")
        for k, v in stops.items()
    )
    print(f"fallback models trained (validation macro-F1: {scores})")


def _drop_fallbacks(out: Path, why: str) -> None:
    """Remove ``out``'s fallback models, saying why."""
    from crossl_stream.model.checkpoint import FALLBACKS

    if (out / FALLBACKS).is_dir():
        shutil.rmtree(out / FALLBACKS)
        print(f"removed {_shown(out / FALLBACKS)} ({why})")


def _export(model_dir: Path) -> list[Path]:
    """Write model.onnx (whole windows) and stream.onnx (a live hop) next to a checkpoint,
    and remove the per-modality graphs earlier versions exported there (stale beside new
    weights, and read by nothing)."""
    from crossl_stream.model.checkpoint import WEIGHTS, load_model
    from crossl_stream.model.export import (
        LEGACY_FILES,
        ONNX_FILE,
        STREAM_FILE,
        export_onnx,
        export_stream,
        weights_digest,
    )

    model, digest = load_model(model_dir), weights_digest(model_dir / WEIGHTS)
    whole = export_onnx(model, model_dir / ONNX_FILE, digest)
    paths = [whole, export_stream(model, model_dir / STREAM_FILE, digest)]
    for stale in sorted(p for pattern in LEGACY_FILES for p in model_dir.glob(pattern)):
        stale.unlink()
        log.info("removed %s (an earlier version's export)", _shown(stale))
    return paths


def cmd_card(args: argparse.Namespace) -> int:
    from crossl_stream.training.report import write_card

    folder = Path(args.model)
    if not (folder / "model.json").is_file():
        raise CrosslError(f"{folder}: no model.json (not a model folder)")
    print(f"wrote {_shown(write_card(folder))}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from crossl_stream.model.checkpoint import fallback_dirs

    paths = _export(Path(args.model))
    for folder in fallback_dirs(args.model).values():
        paths += _export(folder)
    shown = ", ".join(_shown(p) for p in paths)
    print(f"exported {shown} (each checked against the eager model)")
    return 0


def _machine(device: str = "cpu") -> str:
    """What ran the command, for reports: cores, processor, torch build, GPU, and the device
    the models trained on."""
    import os
    import platform

    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    cpu = [platform.machine(), torch.backends.cpu.get_cpu_capability()]
    probes = {"BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}
    extras = [k for k, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()]
    if extras:  # what bf16 training's speed depends on
        cpu[-1] += " with " + " and ".join(extras)
    return (
        f"{os.cpu_count()} CPU cores ({', '.join(cpu)}), torch {torch.__version__}"
        f" with {torch.get_num_threads()} threads{gpu}; models trained on {device}"
    )


def cmd_eval(args: argparse.Namespace) -> int:
    from crossl_stream.training.experiments import (
        merged,
        run_ablation,
        run_folds,
        set_device,
        without_idle_arms,
    )
    from crossl_stream.training.report import write_eval

    cfg, data = _spec(args)
    data.require_classes(_shown(args.spec))
    name = Path(args.spec).stem
    if args.by and args.by != cfg.evaluation.by:
        named = [k for k in ("folds", "ablation_folds", "tuned_on") if getattr(cfg.evaluation, k)]
        if named:
            raise CrosslError(
                f"--by {args.by}: the spec's evaluation.{', evaluation.'.join(named)} name "
                f"{cfg.evaluation.by}s; write a spec that holds out {args.by}s instead"
            )
        by = cfg.evaluation.model_copy(update={"by": args.by})
        cfg = cfg.model_copy(update={"evaluation": by})
        name = f"{name}-by-{args.by}"
    out = Path(args.out) if args.out else Path("eval") / name
    progress = not args.quiet
    start = time.perf_counter()
    ablation = None
    ev = cfg.evaluation
    if ev.ablation or ev.ablation_curve_steps:
        ablation = run_ablation(data, cfg, progress, log.info, args.jobs)
        if ev.select and ablation["chosen"] != "base":
            chosen = ablation["chosen"]
            print(f"ablation: variant {chosen!r} scored best on validation; the folds run it")
            cfg = merged(cfg, ablation["variants"][ablation["chosen"]])
            lean = without_idle_arms(cfg)
            if lean is not cfg:
                print("ablation: no augmentation left, so no supervised-aug arm (= supervised)")
                cfg = lean
    results = run_folds(data, cfg, progress, log.info, args.jobs)
    results["config"] = cfg.model_dump(mode="json", exclude={"data"})
    results["total_seconds"] = time.perf_counter() - start
    command = "crossl-stream " + " ".join(sys.argv[1:]) if sys.argv[1:] else None
    device = str(set_device(args.device))  # as _spec set it: "auto" resolved
    metrics = write_eval(results, out, ablation, _machine(device), command)
    for line in metrics.get("summary", []):
        print(line)
    print(f"report: {_shown(out / 'report.md')} ({results['total_seconds'] / 60:.0f} min)")
    return 0


def _label_rules(path: str | None, model_dir: Path):
    """Label rules from ``--labels FILE`` (a training spec, a data spec or bare rules), else
    the ones the model was trained with, else the project's ``label:NAME`` markers."""
    import yaml
    from pydantic import ValidationError

    from crossl_stream.config import LABEL_MARKERS, LabelRules, format_validation_error
    from crossl_stream.model.checkpoint import read_meta

    if path:
        if not Path(path).is_file():
            raise CrosslError(f"--labels {path}: file not found")
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except yaml.YAMLError as exc:
            raise CrosslError(f"--labels {path}: not valid YAML: {exc}") from exc
        if isinstance(raw, dict) and "data" in raw:  # a training spec
            raw = raw["data"]
        if isinstance(raw, dict) and "recordings" in raw:  # a data set spec
            raw = raw.get("labels")
        if not isinstance(raw, dict) or not raw:
            raise CrosslError(f"--labels {path}: no label rules in it (markers: or intervals:)")
        try:
            return LabelRules.model_validate(raw)
        except ValidationError as exc:
            raise CrosslError(format_validation_error(f"{path}: labels", exc)) from exc
    trained = read_meta(model_dir).get("info", {}).get("data", {}) or {}
    if trained.get("labels"):
        return LabelRules.model_validate(trained["labels"])
    return LABEL_MARKERS


def _stream_map(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        modality, sep, stream = item.partition("=")
        if not sep or not modality or not stream:
            raise CrosslError(f"--stream {item!r}: expected MODALITY=STREAM, e.g. acc=ACC")
        out[modality] = stream
    return out


def score(
    predicted: list[str],
    truth: list[str | None],
    masked: list[list[str]],
    classes: list[str],
) -> list[str]:
    """Accuracy and macro-F1 of ``predicted`` against the labelled ``truth``, overall and
    over the windows where each sensor was masked; labels the model lacks are counted."""
    from collections import Counter

    from crossl_stream.training.metrics import accuracy, macro_f1

    index = {c: i for i, c in enumerate(classes)}
    unknown = Counter(t for t in truth if t is not None and t not in index)
    rows = [i for i, t in enumerate(truth) if t in index]
    if not rows:
        extra = f"; labels the model lacks: {dict(unknown)}" if unknown else ""
        return [f"no window is labelled by the label rules{extra}"]

    def line(what: str, keep: list[int]) -> str:
        yt = np.array([index[truth[i]] for i in keep])
        yp = np.array([index[predicted[i]] for i in keep])
        return (
            f"{what}accuracy {accuracy(yt, yp):.3f}, macro-F1 "
            f"{macro_f1(yt, yp, len(classes)):.3f} over {len(keep)} labelled windows"
        )

    lines = [line("", rows)]
    for sensor in sorted({m for ms in masked for m in ms}):
        keep = [i for i in rows if sensor in masked[i]]
        if keep:
            lines.append(line(f"  with {sensor} masked: ", keep))
    if unknown:
        lines.append(f"not scored, labels the model lacks: {dict(unknown)}")
    return lines


def _labels(rules, recording):
    """The recording's labels under ``rules``, or None (said once) when it carries no
    labels those rules can read: it is predicted, not scored."""
    from crossl_stream.errors import DatasetError
    from crossl_stream.labels import Labels

    if rules.markers is not None and not recording.marker_streams:
        print(f"not scored: {recording.path.name} has no marker stream")
        return None
    try:
        return Labels.of(rules, recording.path, recording.start, recording.marker_streams)
    except DatasetError as exc:
        print(f"not scored: {exc}")
        return None


def _truth(rules, recording, t_end: np.ndarray, window_s: float) -> list[str | None] | None:
    """The label of each window under ``rules`` (None: the recording is not scored)."""
    labels = _labels(rules, recording)
    return None if labels is None else labels.labels_of(t_end, window_s)


def cmd_predict(args: argparse.Namespace) -> int:
    from itertools import islice

    from crossl_stream.config import WindowConfig
    from crossl_stream.model.checkpoint import load_fallbacks, load_model, read_meta
    from crossl_stream.readers.replay import Recording
    from crossl_stream.training.datasets import shipped_recording
    from crossl_stream.training.spec import iter_windows, model_streams

    model_dir = Path(args.model)
    model = load_model(model_dir)
    if not model.classes:
        raise CrosslError(f"{model_dir}: pretrained only (no class head); fine-tune it first")
    fallbacks = {} if args.no_fallbacks else load_fallbacks(model, model_dir)
    trained = read_meta(model_dir).get("info", {}).get("data", {}) or {}
    window = WindowConfig.model_validate(trained.get("window") or {"length_s": model.window_s})
    if args.hop:
        window = window.model_copy(update={"hop_s": args.hop})
    rules = _label_rules(args.labels, model_dir)
    named = _stream_map(args.stream)
    paths = [Path(p) for p in args.recordings] or [shipped_recording()]
    names = model.modality_names
    print(
        f"model {_shown(model_dir)} ({', '.join(names)}; {', '.join(model.classes)}): "
        f"{model.window_s:g} s windows every {window.hop_s:g} s"
    )
    print(f"{'recording':<28}{'windows':>9}{'labelled':>10}{'accuracy':>10}")
    predicted, truth, masked = [], [], []
    for path in paths:
        recording = Recording.load(path)
        streams = model_streams(recording, model.modalities, trained.get("sensors", {}), named)
        windows = iter_windows(recording, streams, model.modalities, window)
        mine, ends, gone = [], [], []
        while batch := list(islice(windows, 512)):  # a long recording never sits in memory
            x = {m: np.stack([w.data[m] for w in batch]) for m in names}
            available = np.array([[w.available[m] for m in names] for w in batch])
            probs = model.predict_proba(x, available)
            for missing, fallback in fallbacks.items():  # as the pipeline serves them
                j = names.index(missing)
                rows = ~available[:, j] & (available.sum(axis=1) == len(names) - 1)
                if rows.any():
                    only = {m: x[m][rows] for m in fallback.modality_names}
                    probs[rows] = fallback.predict_proba(only)
            mine += [model.classes[i] for i in probs.argmax(1)]
            ends += [w.t_end for w in batch]
            gone += [[m for m in names if not w.available[m]] for w in batch]
        if not mine:
            print(f"{path.name:<28}{0:>9}  (shorter than one window)")
            continue
        labels = _truth(rules, recording, np.array(ends), model.window_s) or [None] * len(mine)
        hits = [p == t for p, t in zip(mine, labels, strict=True) if t is not None]
        shown = f"{np.mean(hits):>10.3f}" if hits else f"{'-':>10}"
        print(f"{path.name:<28}{len(mine):>9}{len(hits):>10}{shown}")
        predicted += mine
        truth += labels
        masked += gone
    for line in score(predicted, truth, masked, model.classes):
        print(line)
    return 0


def _fraction(text: str) -> float:
    """A label fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction in (0, 1], e.g. 0.1")
    return value


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
        out = JsonlPublisherConfig(kind="jsonl", path=Path(args.out).resolve(), append=args.append)
        cfg = cfg.model_copy(update={"publishers": (*cfg.publishers, out)})
    return _play(cfg, Path(args.config).parent, _shown(args.config), args.labels)


def cmd_daemon(args: argparse.Namespace) -> int:
    from crossl_stream.daemon import run_daemon

    return run_daemon(args.config, args.verbose)


def cmd_replay(args: argparse.Namespace) -> int:
    from crossl_stream.config import PipelineConfig, ReplayReaderConfig, WindowConfig
    from crossl_stream.model.checkpoint import read_meta
    from crossl_stream.model.specs import ModalitySpec
    from crossl_stream.readers.replay import Recording
    from crossl_stream.training.datasets import shipped_recording
    from crossl_stream.training.spec import model_streams, source_rate

    path = Path(args.recording) if args.recording else shipped_recording()
    meta = read_meta(Path(args.model))
    trained = meta.get("info", {}).get("data", {}) or {}
    modalities = [ModalitySpec(**m) for m in meta["modalities"]]
    recording = Recording.load(path)
    streams = model_streams(
        recording, modalities, trained.get("sensors", {}), _stream_map(args.stream)
    )
    sensors = {  # a sensor per model modality, at its stream's rate
        m: {"channels": recording.streams[s][1].shape[1], "rate_hz": source_rate(recording, s)}
        for m, s in streams.items()
    }
    publishers: list[dict] = [{"kind": "console", "every": args.print_every}]
    if args.out:
        publishers.append(
            {"kind": "jsonl", "path": str(Path(args.out).resolve()), "append": args.append}
        )
    reader = ReplayReaderConfig(
        kind="replay",
        path=path.resolve(),
        speed="max" if args.speed == "max" else float(args.speed),
        streams=streams,
        dropouts=tuple({"sensor": s, "start_s": a, "length_s": n} for s, a, n in args.drop),
        start_s=args.start,
        duration_s=args.duration,
    )
    window = WindowConfig.model_validate(trained.get("window") or {})
    hop = args.hop or window.hop_s
    cfg = PipelineConfig.model_validate(
        {
            "sensors": sensors,
            "readers": [reader],
            "window": window.model_copy(update={"hop_s": hop, "target_rates": {}}),
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
    return _play(cfg, Path.cwd(), "replay", args.labels)


def cmd_play(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from crossl_stream.readers.replay import Recording
    from crossl_stream.training.datasets import shipped_recording

    path = Path(args.recording) if args.recording else shipped_recording()
    recording = Recording.load(path)
    if args.speed != 1:  # live sources stamp samples as they are sampled: k x would squeeze
        rates = sorted({f"{r:g}" for _, _, r in recording.streams.values() if r > 0})
        what = f"{' and '.join(rates)} Hz samples" if rates else "samples"
        k = args.speed
        why = ""
        if k > 1:
            why = f" (a faster play would stamp {what} {k:g}x closer together)"
        elif k > 0:
            why = f" (a slower play would stamp {what} {1 / k:g}x further apart)"
        live = "LSL outlets" if args.to == "lsl" else "MQTT devices"
        raise CrosslError(
            f"--speed {k:g}: {live} play in real time only{why}; use 'crossl-stream replay "
            f"--speed {k:g}' to run a recording at another pace through the model"
        )
    section = (args.start, args.start + args.duration) if args.duration else None
    if args.to == "lsl":
        from crossl_stream.players.lsl import LslPlayer

        player = LslPlayer(recording, chunk_s=args.chunk, section=section)
        where = f"LSL outlets {', '.join(player.names)} (+ markers)"
    else:
        import os

        from crossl_stream.broker import Broker
        from crossl_stream.players.mqtt import MqttPlayer

        host, _, port = args.broker.partition(":")
        password = None
        if args.password_env:
            password = os.environ.get(args.password_env)
            if password is None:
                raise CrosslError(f"--password-env: {args.password_env} is not set")
        # a device logs in as its subject (tools/mosquitto.acl) unless told otherwise
        username = args.username or (args.subject if password is not None else None)
        player = MqttPlayer(
            recording,
            Broker(host or "127.0.0.1", int(port or 1883), username, password),
            chunk_s=args.chunk,
            topic=args.topic,
            subject=args.subject,
            fmt=args.format,
            section=section,
        )
        where = (
            f"{args.format} payloads on {args.broker} "
            f"({args.topic.format(subject=args.subject, stream='STREAM')})"
        )
    print(f"playing {path.name} as {where} in real time; Ctrl-C stops")

    async def main() -> None:
        task = asyncio.current_task()
        on_signals((signal.SIGINT, signal.SIGTERM), task.cancel)
        for _ in range(args.repeat):
            pushed = await player.play()
            print(f"played: {pushed} samples")
            unsent = {k: n for k, n in getattr(player, "unsent", {}).items() if n}
            if unsent:
                print(f"not sent (the broker was away): {unsent} samples")

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(main())
    return 0


def _play(cfg, base: Path, source: str, labels: str | None = None) -> int:
    """Build the pipeline of ``cfg``, run it (the first Ctrl-C or SIGTERM stops and drains,
    a second one stops at once), print a summary (scored against the replayed recordings'
    labels: ``labels`` names a file of label rules; default: the replay reader's, else the
    model's). Exit status 1 when a publisher lost records it was given."""
    import asyncio
    import signal

    from crossl_stream.config import ReplayReaderConfig
    from crossl_stream.pipeline import Pipeline

    pipeline = Pipeline.from_config(cfg, base, source)
    print(describe(pipeline))
    model_dir = cfg.inference.model or default_model_dir()
    model_dir = model_dir if model_dir.is_absolute() else base / model_dir
    replays = [rc for rc in cfg.readers if isinstance(rc, ReplayReaderConfig)]
    scorer = None
    if replays:  # --labels first, then the reader's, then the model's
        rc = replays[0]
        rules = _label_rules(labels, model_dir) if labels or not rc.labels else rc.labels
        scorer = _scorer(rules, pipeline)
        if scorer is not None:
            pipeline.publishers.append(scorer)

    async def main() -> None:
        task = asyncio.current_task()

        def on_signal() -> None:  # the first drains; a second one stops at once
            if pipeline.stopping:
                task.cancel()
            pipeline.stop()

        on_signals((signal.SIGINT, signal.SIGTERM), on_signal)
        with contextlib.suppress(asyncio.CancelledError):
            await pipeline.run()

    start = time.perf_counter()
    asyncio.run(main())
    print_summary(pipeline, time.perf_counter() - start, scorer)
    lost = {p.name: p.lost for p in pipeline.publishers if p.lost}
    if lost:
        print(f"crossl-stream: publishers lost records they were given: {lost}", file=sys.stderr)
        return 1
    return 0


def _scorer(rules, pipeline):
    """A ScorePublisher for the first replayed recording under ``rules``, or None (said)
    when the recording carries no labels those rules can read."""
    from crossl_stream.publishers.score import ScorePublisher
    from crossl_stream.readers.replay import Replay

    recording = next(r.recording for r in pipeline.readers if isinstance(r, Replay))
    labels = _labels(rules, recording)
    if labels is None:
        return None
    return ScorePublisher(labels, pipeline.model.classes, pipeline.model.window_s)


def describe(pipeline) -> str:
    """One line: what plays, at what pace, through which model."""
    parts = [reader.describe() for reader in pipeline.readers]
    model = pipeline.worker.predictor
    return f"{'; '.join(parts)} through {model.model_id} on {model.device} ({model.runtime})"


def print_summary(pipeline, wall: float, scorer=None) -> None:
    """Windows, masks, refusals, publishers, accuracy and macro-F1 against a replay's labels
    (``scorer``), latency, speed: all read from the pipeline's metrics."""
    from crossl_stream.readers.replay import Replay

    metrics = pipeline.metrics
    c = metrics.counts
    masked: dict[str, int] = {}
    for key, n in c.masked.items():
        sensor = key.split(":")[0]
        masked[sensor] = masked.get(sensor, 0) + n
    refused = {f"chunks ({k})": n for k, n in c.refused_chunks.items()}
    for key, n in pipeline.sample_faults().items():
        sensor, reason = key.split(":")
        refused[f"{reason.replace('_', '-')} samples"] = (
            refused.get(f"{reason.replace('_', '-')} samples", 0) + n
        )
    refused["dropped windows"] = c.dropped_windows
    refused_text = ", ".join(f"{k} {v}" for k, v in refused.items() if v) or "nothing"
    empty = f", {c.empty_windows} with no sensor (published as such)" if c.empty_windows else ""
    print(
        f"windows {c.windows}: predicted {c.predictions}{empty}, masked {masked or 'none'}, "
        f"refused {refused_text}"
    )
    for reader in pipeline.readers:
        if line := reader.report():
            print(line)
    streaming = pipeline.worker.predictor.streaming
    if streaming is not None:
        shares = ", ".join(
            f"{m} {s.reused}/{s.reused + s.full}" for m, s in streaming.counters.items()
        )
        print(f"windows encoding only their new samples (streaming): {shares}")
    predictor = pipeline.worker.predictor
    for missing, fallback in predictor.fallbacks.items():
        served = predictor.fallback_windows[missing]
        if served and fallback.streaming is not None:
            shares = ", ".join(
                f"{m} {s.reused}/{s.reused + s.full}"
                for m, s in fallback.streaming.counters.items()
            )
            print(f"served without {missing} by its fallback model: {served} (streaming: {shares})")
        elif served:
            print(f"served without {missing} by its fallback model: {served}")
    shown = [p for p in pipeline.publishers if p is not scorer]
    faults = [
        f"{p.name} sent {p.counters.sent}/{p.counters.given}, failed {p.counters.failed}, "
        f"dropped {p.counters.dropped}" + (f" ({p.last_error})" if p.last_error else "")
        for p in shown
        if p.lost or p.counters.sent != p.counters.given
    ]
    if faults:
        print("publishers: " + "; ".join(faults))
    if scorer is not None:
        for line in scorer.lines():
            print(line)
    if metrics.latency["total"].count:
        total, infer = metrics.latency["total"], metrics.latency["infer"]
        print(
            f"latency total p50 {total.quantile(0.5):.2f} ms, p99 {total.quantile(0.99):.2f} ms "
            f"(inference p50 {infer.quantile(0.5):.2f} ms)"
        )
    replays = [r for r in pipeline.readers if isinstance(r, Replay)]
    span = None
    if replays:  # the section played
        rec, (a, b) = replays[0].recording, replays[0].section
        span = min(rec.end, rec.start + b) - (rec.start + a)
    pace = f" ({span / wall:.0f}x real time)" if span else ""
    print(f"ran {wall:.1f} s{pace}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crossl-stream", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def spec_command(name: str, help: str, func, labels: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("spec", help="training spec YAML, e.g. configs/train-emg.yaml")
        p.add_argument("--out", default=None, help="model folder (default: models/<spec name>)")
        if labels:
            p.add_argument(
                "--labels-fraction",
                type=_fraction,
                default=1.0,
                help="fine-tune on this fraction of the labelled windows (stratified)",
            )
        p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
        p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.set_defaults(func=func)
        return p

    spec_command(
        "pretrain",
        "self-supervised pretraining on a spec's recordings (no labels needed)",
        cmd_pretrain,
        labels=False,
    )
    p = spec_command("finetune", "fine-tune a pretrained model on a spec's labels", cmd_finetune)
    p.add_argument("--from", dest="pretrained", required=True, help="pretrained model folder")
    spec_command("train", "pretrain, then fine-tune, in one model folder", cmd_train)

    p = sub.add_parser("eval", help="the evaluation protocol on a spec; writes a report")
    p.add_argument("spec", help="training spec YAML")
    p.add_argument("--out", default=None, help="report folder (default: eval/<spec name>)")
    p.add_argument(
        "--by",
        choices=["subject", "session"],
        default=None,
        help="hold out each subject (cross-person) or each session in turn "
        "(default: the spec's evaluation.by)",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="folds trained at once, in as many processes (each with cores/jobs threads)",
    )
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
    p.add_argument("--append", action="store_true", help="append to an existing --out file")
    p.add_argument("--hop", type=float, default=None, help="seconds between windows")
    p.add_argument(
        "--stream",
        action="append",
        default=[],
        metavar="MODALITY=STREAM",
        help="the stream that feeds a model modality, e.g. acc=ACC (repeatable); default: "
        "the stream of the modality's name, else the model's stream of that name or type",
    )
    p.add_argument("--labels", default=None, help="label rules to score with (a spec YAML)")
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

    p = sub.add_parser(
        "export", help="write model.onnx and stream.onnx next to a checkpoint (onnxruntime)"
    )
    p.add_argument("--model", default=str(default_model_dir()), help="model directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "card", help="rewrite a model folder's README.md from its model.json and metrics.json"
    )
    p.add_argument("model", nargs="?", default=str(default_model_dir()), help="model directory")
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("play", help="play a recording as live sources (LSL outlets)")
    p.add_argument("recording", nargs="?", default=None, help="XDF (default: shipped session)")
    p.add_argument("--to", choices=["lsl", "mqtt"], default="lsl", help="what to play it as")
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="1 only: live sources play in real time (`replay --speed k` runs a recording "
        "faster through the model)",
    )
    p.add_argument("--chunk", type=float, default=0.02, help="seconds of samples per push")
    p.add_argument("--start", type=float, default=0.0, help="seconds into the recording")
    p.add_argument("--duration", type=float, default=None, help="seconds to play")
    p.add_argument("--repeat", type=int, default=1, help="play it this many times")
    p.add_argument("--broker", default="127.0.0.1:1883", help="mqtt: HOST:PORT")
    p.add_argument("--topic", default="wearables/{subject}/{stream}", help="mqtt: topic")
    p.add_argument("--subject", default="s01", help="mqtt: the subject in the topic")
    p.add_argument("--format", choices=["json", "binary"], default="binary", help="mqtt")
    p.add_argument(
        "--username", default=None, help="mqtt: login (default with a password: the subject)"
    )
    p.add_argument(
        "--password-env", default=None, help="mqtt: environment variable with the password"
    )
    p.set_defaults(func=cmd_play)

    p = sub.add_parser("run", help="run a streaming pipeline from a YAML config")
    p.add_argument("config", help="pipeline YAML, e.g. configs/replay.yaml")
    p.add_argument("--out", default=None, help="also write predictions to this JSONL file")
    p.add_argument("--append", action="store_true", help="append to an existing --out file")
    p.add_argument("--labels", default=None, help="label rules to score with (a spec YAML)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "daemon",
        help="run a pipeline config unattended: SIGTERM drains and exits, SIGHUP reloads, "
        "/healthz and /metrics on 127.0.0.1",
    )
    p.add_argument("config", help="pipeline YAML, e.g. configs/edge-mqtt.yaml")
    p.set_defaults(func=cmd_daemon)

    p = sub.add_parser("predict", help="predict XDF recordings offline and score them")
    p.add_argument("recordings", nargs="*", help="XDF files (default: the shipped session)")
    p.add_argument("--model", default=str(default_model_dir()), help="model directory")
    p.add_argument("--hop", type=float, default=None, help="seconds between windows")
    p.add_argument("--stream", action="append", default=[], metavar="MODALITY=STREAM")
    p.add_argument("--labels", default=None, help="label rules to score with (a spec YAML)")
    p.add_argument(
        "--no-fallbacks",
        action="store_true",
        help="windows missing a sensor through the main model (masked), not its fallback",
    )
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import signal

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.getsignal(sig) for sig in stops}
    try:
        return args.func(args)
    except CrosslError as exc:
        print(f"crossl-stream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if argv is not None:  # called in-process: give the caller its handlers back
            for sig, handler in saved.items():
                signal.signal(sig, handler)
        else:  # the process ends here: a late stop signal must not kill its teardown (the
            # interpreter puts default handlers back as it finalizes; ignored ones stay)
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())
