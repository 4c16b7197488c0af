"""Your recordings in, your model out: a spec over multi-rate XDF sessions, pretrain,
fine-tune, run and scored output through the CLI only; training windows equal the windows
the pipeline emits."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crossl_stream.config import PipelineConfig, TrainConfig, load_config
from crossl_stream.errors import DatasetError
from crossl_stream.pipeline import Pipeline
from crossl_stream.publishers import MemoryPublisher
from crossl_stream.training.spec import load_data
from crossl_stream.xdf import XdfStream, write_xdf

CLI = [sys.executable, "-m", "crossl_stream.cli"]
RATES = {"ECG": 128.0, "EDA": 16.0, "ACC": 32.0}
CLASSES = ["rest", "task"]


def session(
    path: Path, seed: int, blocks: int = 8, block_s: float = 12.0, gap: bool = True, marks=True
):
    """A three-sensor session (ECG 1 ch @ 128 Hz, EDA 1 ch @ 16 Hz, ACC 3 ch @ 32 Hz) with
    plain marker strings, blocks of 'rest' and 'task' that differ in heart rate, skin
    conductance and movement, and a 3 s accelerometer gap in block 2."""
    rng = np.random.default_rng(seed)
    t0 = 5000.0 + 100 * seed
    end = t0 + blocks * block_s
    streams, times, texts = [], [], []
    for b in range(blocks):
        times += [t0 + b * block_s]
        texts += [CLASSES[b % 2]]
    times += [t0 + 3.3 * block_s]  # a marker no rule names: ignored by the spec
    texts += ["impedance check"]
    task = lambda t: (np.floor((t - t0) / block_s) % 2 == 1).astype(np.float32)  # noqa: E731
    for name, rate in RATES.items():
        t = np.arange(t0, end, 1 / rate) + rng.normal(0, 0.1 / rate, int(round((end - t0) * rate)))
        t.sort()
        k = task(t)
        if name == "ECG":
            x = np.sin(2 * np.pi * (1.0 + 1.0 * k) * t)[:, None]
        elif name == "EDA":
            x = (2.0 + 1.5 * k + 0.1 * np.sin(0.3 * t))[:, None]
        else:
            x = np.stack([np.sin(2 * np.pi * 3 * t) * k, np.cos(t), 0.2 * k], axis=1)
            if gap:
                keep = ~((t > t0 + 2 * block_s + 4) & (t < t0 + 2 * block_s + 7))
                t, x = t[keep], x[keep]
        x = x + rng.normal(0, 0.05, x.shape)
        kind = {"ECG": "ECG", "EDA": "EDA", "ACC": "Accelerometer"}[name]
        streams.append(XdfStream(name, kind, t, x.astype(np.float32), rate, f"dev-{name}"))
    if marks:
        streams.append(XdfStream("Markers", "Markers", np.array(times), texts, 0.0, "stim"))
    return write_xdf(path, streams)


SPEC = """\
data:
  recordings: ["sub-*_ses-1.xdf"]
  sensors:
    ecg: {type: ECG, rate_hz: 64}
    eda: {stream: EDA, rate_hz: 8}
    acc: {stream: ACC, rate_hz: 32}
  window: {length_s: 2.0, hop_s: 0.5}
  labels:
    markers: {map: {rest: rest, task: task}, ignore: ["impedance check"]}
evaluation: {by: subject}
model: {code_size: 16, kernels: [6, 4, 4]}   # 12 samples: EDA has 16 a window
pretrain: {steps: 6, batch_size: 32}
finetune: {batch_size: 32, max_epochs: 6, patience: 2, min_epoch_steps: 4}
"""


@pytest.fixture(scope="module")
def sessions(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lab")
    for i, subject in enumerate(["p01", "p02", "p03"]):
        session(folder / f"sub-{subject}_ses-1.xdf", seed=i)
    (folder / "spec.yaml").write_text(SPEC)
    return folder


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_spec_reads_multi_rate_sessions_with_ids_labels_and_the_gap(sessions):
    cfg = load_config(sessions / "spec.yaml", TrainConfig)
    data = load_data(cfg.data, sessions, "spec.yaml", progress=False)
    assert [f.subject for f in data.files] == ["p01", "p02", "p03"]
    assert [f.session for f in data.files] == ["1", "1", "1"]
    assert {f.streams["ecg"] for f in data.files} == {"ECG"}  # found by type
    assert [(m.name, m.channels, m.samples) for m in data.modalities] == [
        ("ecg", 1, 128),
        ("eda", 1, 16),
        ("acc", 3, 64),
    ]
    assert data.classes == CLASSES
    w = data.windows
    # the 3 s accelerometer gap masks acc in the windows it leaves under 80% covered
    masked_acc = ~w.available[:, 2]
    assert masked_acc.sum() >= 3 * 4 and w.available[:, :2].all()  # a few windows per file
    start = np.round(w.t_end - 2.0 - (5000.0 + 100 * w.recording), 6)  # from the file start
    assert np.all((start[masked_acc] < 24 + 7) & (start[masked_acc] + 2 > 24 + 4))
    # a window is labelled only when one block covers all of it: never across a change
    block = np.floor(start / 12.0)
    same_block = np.floor((start + 2.0 - 1e-6) / 12.0) == block
    assert np.array_equal(w.y >= 0, same_block)
    assert np.array_equal(w.y[w.y >= 0], (block[w.y >= 0] % 2).astype(int))
    assert data.unmapped == {}  # 'impedance check' is ignored, not unmapped


def test_training_windows_equal_the_windows_the_pipeline_emits(sessions, tmp_path):
    """One windowing path: what a model trains on is what the pipeline cuts on a replay."""
    from crossl_stream.model import CroSSL
    from crossl_stream.model.checkpoint import save_model

    cfg = load_config(sessions / "spec.yaml", TrainConfig)
    data = load_data(cfg.data, sessions, "spec.yaml", progress=False)
    model_dir = save_model(CroSSL(data.modalities, CLASSES, cfg.model), tmp_path / "m")
    path = data.files[1].path
    mine = data.windows.take(np.flatnonzero(data.windows.recording == 1))
    raw = {
        "sensors": {
            "ecg": {"channels": 1, "rate_hz": 128},
            "eda": {"channels": 1, "rate_hz": 16},
            "acc": {"channels": 3, "rate_hz": 32},
        },
        "readers": [{"kind": "replay", "path": str(path), "streams": data.files[1].streams}],
        "window": {"hop_s": 0.5},
        "inference": {"model": str(model_dir), "runtime": "torch"},
        "publishers": [],
    }
    pipeline = Pipeline.from_config(PipelineConfig.model_validate(raw), ".", "test")
    cut = []
    put = pipeline._put

    async def record(window):  # the windows on their way to the model
        cut.append(window)
        await put(window)

    pipeline._put = record
    pipeline.publishers.append(MemoryPublisher())
    asyncio.run(pipeline.run())
    assert len(cut) == len(mine) > 100
    assert np.allclose([w.t_end for w in cut], mine.t_end)
    for i, m in enumerate(("ecg", "eda", "acc")):
        assert np.array_equal([w.available[m] for w in cut], mine.available[:, i])
        assert np.array_equal(np.stack([w.data[m] for w in cut]), mine.x[m])


def test_pretrain_finetune_run_and_score_through_the_cli(sessions, tmp_path):
    spec = sessions / "spec.yaml"
    pre, fine = tmp_path / "pre", tmp_path / "fine"
    result = cli("pretrain", str(spec), "--out", str(pre), "--quiet", cwd=sessions)
    assert result.returncode == 0, result.stderr
    assert "3 recordings, 3 subjects" in result.stdout
    meta = json.loads((pre / "model.json").read_text())
    assert meta["classes"] == [] and meta["info"]["stage"] == "pretrained"
    result = cli(
        "finetune", str(spec), "--from", str(pre), "--out", str(fine),
        "--labels-fraction", "0.5", "--quiet", cwd=sessions,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = json.loads((fine / "model.json").read_text())
    assert meta["classes"] == CLASSES and meta["info"]["labels_fraction"] == 0.5
    assert meta["info"]["data"]["sensors"]["ecg"] == {"stream": "ECG", "type": "ECG"}
    assert (fine / "model.onnx").is_file() and (fine / "README.md").is_file()
    # a pipeline config replays a session through the folder as it is, scored by the
    # model's own label rules
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(
        "sensors:\n"
        "  ecg: {channels: 1, rate_hz: 128}\n  eda: {channels: 1, rate_hz: 16}\n"
        "  acc: {channels: 3, rate_hz: 32}\n"
        f"readers: [{{kind: replay, path: {sessions / 'sub-p03_ses-1.xdf'}, speed: max}}]\n"
        f"inference: {{model: {fine}}}\n"
        "publishers: []\n"
    )
    out = tmp_path / "predictions.jsonl"
    result = cli("run", str(run_cfg), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) > 100 and {r["label"] for r in records} <= set(CLASSES)
    line = next(x for x in result.stdout.splitlines() if x.startswith("accuracy"))
    assert "macro-F1" in line and "labelled windows" in line
    assert "with acc masked:" in result.stdout
    # the same file offline, through `predict`, scored with the same rules
    result = cli("predict", str(sessions / "sub-p03_ses-1.xdf"), "--model", str(fine), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert any(x.startswith("accuracy") for x in result.stdout.splitlines())
    # a recording without labels is predicted, and said not to be scored
    bare = session(tmp_path / "bare.xdf", seed=5, marks=False)
    result = cli("predict", str(bare), "--model", str(fine), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "not scored: bare.xdf has no marker stream" in result.stdout
    result = cli("predict", str(bare), "--model", str(fine), "--stream", "emg=EMG", cwd=tmp_path)
    assert result.returncode == 2 and "the model has no modality ['emg']" in result.stderr
    # an existing output is not appended to unless asked
    result = cli("run", str(run_cfg), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 2 and "--append" in result.stderr
    # a pretrained-only model cannot serve
    run_cfg.write_text(run_cfg.read_text().replace(str(fine), str(pre)))
    result = cli("run", str(run_cfg), cwd=tmp_path)
    assert result.returncode == 2 and "pretrained only" in result.stderr


def test_train_best_keeps_the_recipe_validation_prefers(sessions, tmp_path):
    spec = sessions / "spec-best.yaml"
    spec.write_text(SPEC.replace("evaluation:", "recipe: best\nevaluation:"))
    out = tmp_path / "m"
    result = cli("train", str(spec), "--out", str(out), "--quiet", cwd=sessions)
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "model.json").read_text())["info"]
    chosen = info["selection"]["recipe"]
    scores = info["selection"]["validation_macro_f1"]
    assert f"recipe {chosen} kept" in result.stdout
    assert scores[chosen] == max(scores.values()) and info["best_val_f1"] == scores[chosen]
    assert info["stage"] == {"crossl": "finetuned", "supervised": "supervised"}[chosen]
    loser = next(k for k in scores if k != chosen)
    kept = (out / "model.safetensors").read_bytes()
    assert kept == (out / "candidates" / chosen / "model.safetensors").read_bytes()
    assert kept != (out / "candidates" / loser / "model.safetensors").read_bytes()
    assert "validation" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("sub-*_ses-1.xdf", "nobody-*.xdf"), "recordings.0: nobody-*.xdf matches no file"),
        (("{stream: EDA,", "{stream: GSR,"), "no stream for sensor 'eda' (name 'GSR')"),
        (("{rest: rest, task: task}", "{Rest: rest, Task: task}"), "none of ['Rest', 'Task']"),
        (("{rest: rest, task: task}", "{task: task}"), "at least two"),
        (('ignore: ["impedance check"]}', "hold: 0.5}"), "the rules label no window"),
        (("evaluation:", "holdout: [p9]\nevaluation:"), "holdout: ['p9'] is no subject"),
    ],
)
def test_bad_specs_get_one_clear_line(sessions, tmp_path, change, message):
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.replace(*change).replace('"sub-*', f'"{sessions}/sub-*'))
    result = cli("train", str(spec), "--out", str(tmp_path / "m"), "--quiet", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_unlabelled_recording_joins_and_an_entry_names_a_globbed_file(sessions, tmp_path):
    from crossl_stream.training.workflow import training_windows

    bare = session(tmp_path / "bare.xdf", seed=5, marks=False)
    cfg = load_config(sessions / "spec.yaml", TrainConfig)
    recordings = [
        "sub-*_ses-1.xdf",
        {"path": "sub-p01_ses-1.xdf", "subject": "anna"},
        {"path": str(bare), "subject": "p09", "labelled": False},
    ]
    spec = cfg.data.model_validate({**cfg.data.model_dump(), "recordings": recordings})
    data = load_data(spec, sessions, "spec.yaml", progress=False)
    assert [f.subject for f in data.files] == ["anna", "p02", "p03", "p09"]
    new = data.windows.subject == "p09"
    assert new.sum() > 100 and (data.windows.y[new] == -1).all()
    cfg = cfg.model_copy(update={"data": spec, "holdout": ("p09",), "pretrain_on": "all"})
    assert new[training_windows(cfg, data, labels=False)].sum() == new.sum()  # pretraining
    assert not new[training_windows(cfg, data)].any()  # fine-tuning


def test_a_stream_error_lists_what_the_file_has(sessions):
    cfg = load_config(sessions / "spec.yaml", TrainConfig)
    emg = cfg.data.sensors["acc"].model_copy(update={"stream": None, "type": "EMG"})
    spec = cfg.data.model_copy(update={"sensors": {"emg": emg}})
    with pytest.raises(DatasetError, match=r"'ACC' \(type 'Accelerometer', 3 ch @ 32 Hz\)"):
        load_data(spec, sessions, "spec.yaml", progress=False)


def test_eval_holds_out_each_person_when_asked(tmp_path):
    """Two people in two sessions each: the spec holds out sessions, `--by subject` holds
    out people (cross-person), and a fold's only training person still gets a validation
    recording (their other session) to stop on."""
    for i, name in enumerate(["sub-p01_ses-1", "sub-p01_ses-2", "sub-p02_ses-1", "sub-p02_ses-2"]):
        session(tmp_path / f"{name}.xdf", seed=10 + i, blocks=6)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        SPEC.replace("sub-*_ses-1.xdf", "sub-*_ses-*.xdf").replace(
            "evaluation: {by: subject}", "evaluation: {by: session, arms: {supervised: [1.0]}}"
        )
    )
    result = cli("eval", str(spec), "--by", "subject", "--quiet", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "4 recordings, 2 subjects" in result.stdout
    report = (tmp_path / "eval" / "spec-by-subject" / "report.md").read_text()
    assert "Leave-one-subject-out over 2 subjects (p01, p02)" in report
    results = json.loads((tmp_path / "eval" / "spec-by-subject" / "results.json").read_text())
    assert results["by"] == "subject"
    assert results["folds"] == ["p01", "p02"]
    # one training person per fold: the report says the validation windows are theirs
    assert results["groups"] == 2
    assert "stops early on windows of the one training subject held out" in report
    metrics = json.loads((tmp_path / "eval" / "spec-by-subject" / "metrics.json").read_text())
    assert metrics["machine"].endswith("models trained on cpu")  # results carry the machine
    for person, run in results["runs"]["supervised@1.0"]["0"].items():
        assert run["val_f1"] is not None, person  # stopped on the other session
    # a spec that names sessions to hold out cannot hold out people instead
    spec.write_text(spec.read_text().replace("by: session,", "by: session, folds: [p01/1],"))
    result = cli("eval", str(spec), "--by", "subject", "--quiet", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--by subject: the spec's evaluation.folds name sessions" in result.stderr


def test_train_with_fallbacks_serves_a_missing_sensor_with_the_model_trained_without_it(
    sessions, tmp_path
):
    spec = sessions / "spec-fallbacks.yaml"
    spec.write_text(
        SPEC.replace("evaluation:", "recipe: supervised\nevaluation:").replace(
            "finetune: {", "finetune: {fallbacks: true, "
        )
    )
    out = tmp_path / "m"
    result = cli("train", str(spec), "--out", str(out), "--quiet", cwd=sessions)
    assert result.returncode == 0, result.stderr
    assert "fallback models trained (validation macro-F1: without ecg" in result.stdout
    for missing in ("ecg", "eda", "acc"):
        folder = out / "fallback" / f"without-{missing}"
        meta = json.loads((folder / "model.json").read_text())
        assert meta["info"]["stage"] == "fallback" and meta["info"]["without"] == missing
        assert [m["name"] for m in meta["modalities"]] == [
            m for m in ("ecg", "eda", "acc") if m != missing
        ]
        assert meta["classes"] == CLASSES and (folder / "stream.onnx").is_file()
    assert "| `eda` | `fallback/without-eda` | `ecg`, `acc` |" in (out / "README.md").read_text()
    # a replay that loses EDA for 20 s: those windows come from the model without it
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(
        "sensors:\n"
        "  ecg: {channels: 1, rate_hz: 128}\n  eda: {channels: 1, rate_hz: 16}\n"
        "  acc: {channels: 3, rate_hz: 32}\n"
        f"readers: [{{kind: replay, path: {sessions / 'sub-p03_ses-1.xdf'}, speed: max,\n"
        "  dropouts: [{sensor: eda, start_s: 30, length_s: 20}]}]\n"
        f"inference: {{model: {out}}}\n"
        "publishers: []\n"
    )
    jsonl = tmp_path / "predictions.jsonl"
    result = cli("run", str(run_cfg), "--out", str(jsonl), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    main = records[0]["model"]
    without_eda = [r for r in records if r["mask"] == {"ecg": True, "eda": False, "acc": True}]
    assert len(without_eda) >= 30
    assert {r["model"] for r in without_eda} == {f"{main}/without-eda@" + _digest(out, "eda")}
    assert all(r["label"] in CLASSES for r in without_eda)
    whole = [r for r in records if all(r["mask"].values())]
    assert len(whole) > 100 and {r["model"] for r in whole} == {main}
    # offline, `predict` serves the windows in the ACC gap of the session with its fallback
    for flag in ([], ["--no-fallbacks"]):
        result = cli("predict", str(sessions / "sub-p03_ses-1.xdf"), "--model", str(out), *flag,
                     cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert "  with acc masked: accuracy" in result.stdout
    # switched off in the config, the main model serves every window
    run_cfg.write_text(
        run_cfg.read_text().replace("inference: {", "inference: {fallbacks: false, ")
    )
    result = cli("run", str(run_cfg), "--out", str(jsonl), "--append", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    again = [json.loads(line) for line in jsonl.read_text().splitlines()][len(records) :]
    assert len(again) == len(records) and {r["model"] for r in again} == {main}
    # a fallback of other weights is refused by name, not served
    meta_path = out / "fallback" / "without-acc" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["info"]["holdout"] = ["p02"]
    meta_path.write_text(json.dumps(meta))
    run_cfg.write_text(run_cfg.read_text().replace("fallbacks: false, ", ""))
    result = cli("run", str(run_cfg), cwd=tmp_path)
    assert result.returncode == 2
    assert "without-acc: not a fallback of" in result.stderr and "holdout ['p02']" in result.stderr
    # retrained without fallbacks, the folder keeps none that would belong to other weights
    spec.write_text(spec.read_text().replace("fallbacks: true, ", ""))
    result = cli("train", str(spec), "--out", str(out), "--quiet", "--fresh", cwd=sessions)
    assert result.returncode == 0, result.stderr
    assert not (out / "fallback").exists() and "finetune.fallbacks is off" in result.stdout


def _digest(model: Path, missing: str) -> str:
    import hashlib

    weights = model / "fallback" / f"without-{missing}" / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
