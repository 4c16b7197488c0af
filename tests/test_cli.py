"""The `crossl-stream` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crossl_stream.model import load_model
from crossl_stream.training.datasets import shipped_recording

CLI = [sys.executable, "-m", "crossl_stream.cli"]


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_train_writes_a_model_folder_that_loads_predicts_and_resumes(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(
        f"data:\n  recordings: ['{shipped_recording()}']\n"
        "  sensors: {acc: {rate_hz: 50}, gyro: {rate_hz: 50}}\n"
        "  window: {length_s: 2.0, hop_s: 2.0}\n"
        "  labels: {markers: {prefix: 'label:', end: [none]}}\n"
        "model: {code_size: 16}\n"
        "pretrain: {steps: 3, batch_size: 32}\n"
        "finetune: {batch_size: 16, max_epochs: 2, min_epoch_steps: 3}\n"
    )
    out = tmp_path / "model"
    result = run("train", str(spec), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    model = load_model(out)
    info = json.loads((out / "model.json").read_text())["info"]
    assert info["data"]["subjects"] == ["10"] and info["stage"] == "finetuned"
    assert model.modality_names == ["acc", "gyro"] and len(model.classes) == 7
    assert (out / "pretrained" / "pretrain.state").is_file() and (out / "finetune.state").is_file()
    assert json.loads((out / "pretrained" / "model.json").read_text())["classes"] == []
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    # the same command again resumes two finished runs: nothing changes, not even model.json
    result = run("train", str(spec), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    # a fine-tuned folder is no starting point for another fine-tuning
    result = run("finetune", str(spec), "--from", str(out), "--out", str(tmp_path / "again"))
    assert result.returncode == 2 and "already fine-tuned" in result.stderr
    result = run("predict", "--model", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1].startswith("accuracy")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "--model", "no/such/dir"], "no/such/dir: not a directory"),
        (["predict", "absent.xdf"], "recording not found: absent.xdf"),
        (["replay", "--stream", "acc"], "--stream 'acc': expected MODALITY=STREAM"),
        (["replay", "--stream", "eeg=EEG"], "--stream: the model has no modality ['eeg']"),
        (["replay", "--stream", "acc=ACC"], "no stream for sensor 'acc' (name 'ACC')"),
        (["pretrain", "absent.yaml"], "absent.yaml: config file not found"),
    ],
)
def test_errors_are_one_clear_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_spec_names_the_key(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "data: {recordings: [a.xdf], sensors: {acc: {rate_hz: 50}}}\npretrain: {epochs: 3}\n"
    )
    result = run("train", str(spec), "--out", str(tmp_path / "m"))
    assert result.returncode == 2
    assert f"{spec}: pretrain.epochs: unknown key" in result.stderr
