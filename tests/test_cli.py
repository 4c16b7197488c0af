"""The `crossl-stream` command, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crossl_stream.model import load_model

CLI = [sys.executable, "-m", "crossl_stream.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def test_train_writes_a_checkpoint_that_loads_and_predicts(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "dataset: seglearn-watch\nholdout_subject: 10\nhop_s: 2.0\n"
        "model: {code_size: 16}\n"
        "pretrain: {steps: 3, batch_size: 32}\n"
        "finetune: {epochs: 1, min_steps: 3, max_steps: 3, batch_size: 16}\n"
    )
    out = tmp_path / "model"
    result = run("train", str(config), "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    model = load_model(out)
    meta = (out / "model.json").read_text()
    assert '"holdout_subject": 10' in meta
    assert 10 not in json.loads(meta)["info"]["train_subjects"]
    assert model.modality_names == ["acc", "gyro"]
    result = run("predict", "--model", str(out))
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout.splitlines()[-1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["predict", "--model", "no/such/dir"], "no/such/dir: not a directory"),
        (["predict", "--recording", "absent.npz"], "seglearn watch data not found at absent.npz"),
    ],
)
def test_errors_are_one_clear_line_and_exit_2(args, message):
    result = run(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_names_the_key(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("dataset: seglearn-watch\npretrain: {epochs: 3}\n")
    result = run("train", str(config), "--out", str(tmp_path / "m"))
    assert result.returncode == 2
    assert f"{config}: pretrain.epochs: unknown key" in result.stderr
