"""Configs: the shipped ones load; bad ones name the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossl_stream.config import TrainConfig, load_config
from crossl_stream.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["train-watch.yaml", "train-basicmotions.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, TrainConfig)


def test_watch_config_holds_out_the_demo_subject():
    assert load_config(CONFIGS / "train-watch.yaml").holdout == ("10",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pretrain: {stepz: 3}\n", "pretrain.stepz: unknown key"),
        ("masking: {strategy: sideways}\n", "masking.strategy: Input should be"),
        ("masking: {keep: 1.5}\n", "masking.keep: Input should be less than or equal to 1"),
        ("data: {window: {length_s: -2}}\n", "data.window.length_s: Input should be greater"),
        ("data: {recordings: [a.xdf], sensors: {}}\n", "data.sensors: Dictionary should have"),
        ("data: {recordings: [], sensors: {a: {rate_hz: 5}}}\n", "data.recordings: Tuple should"),
        ("data: {ids: '(?P<who>x)'}\n", "data.ids: Value error, unknown groups ['who']"),
        ("data: {labels: {}}\n", "data.labels: Value error, give exactly one of markers"),
        ("data: {labels: {markers: {hold: -1}}}\n", "data.labels.markers.hold"),
        ("data: {sensors: {acc: {rate: 5}}}\n", "data.sensors.acc.rate: unknown key"),
        ("dataset: seglearn-watch\n", "dataset: unknown key"),
        ("evaluation: {by: person}\n", "evaluation.by: Input should be 'subject' or 'session'"),
        ("pretrain: {batch_size: 8}\n", "pretrain.batch_size: Input should be greater than"),
        ("model: {aggregator: gru}\n", "model.aggregator: Input should be 'mlp' or 'attention'"),
        ("seed: abc\n", "seed: Input should be a valid integer"),
        ("- a list\n", "top level must be a mapping"),
        ("a: [unclosed\n", "not valid YAML"),
        ("finetune: {min_steps: 500, max_steps: 200}\n", "min_steps (500) exceeds max_steps"),
        ("evaluation: {arms: {crossl: [0.1, 2.0]}}\n", "arms.crossl.1: Input should be less"),
        ("evaluation: {arms: {crossl: []}}\n", "name at least one arm"),
        ("evaluation: {arms: {ssl: [0.1]}}\n", "evaluation.arms.ssl.[key]: Input should be"),
        ("evaluation: {ablation: {a: {}}}\n", "needs ablation_folds"),
        ("evaluation: {seeds: []}\n", "evaluation.seeds: Tuple should have at least 1"),
        ("pretrain: {augment: {rotate: 5}}\n", "pretrain.augment.rotate: unknown key"),
        ("pretrain: {expander: [0]}\n", "pretrain.expander.0: Input should be greater"),
        ("finetune: {modality_dropout: 1}\n", "finetune.modality_dropout: Input should be less"),
        ("recipe: ssl\n", "recipe: Input should be 'crossl', 'supervised' or 'best'"),
    ],
)
def test_bad_config_names_file_key_and_reason(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value)
    assert message in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_one_sensor_bound_cuts_the_watch_spec_to_one_sensor_and_one_arm():
    """tools/one_sensor_bound.py: what it evaluates is a valid spec with that sensor only, no
    modality dropout (nothing to drop) and only supervised on every label."""
    import importlib.util

    import yaml

    root = Path(__file__).resolve().parents[1]
    path = root / "tools" / "one_sensor_bound.py"
    spec = importlib.util.spec_from_file_location("one_sensor_bound", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    watch = yaml.safe_load((root / "configs" / "train-watch.yaml").read_text())
    for sensor in ("acc", "gyro"):
        cfg = TrainConfig.model_validate(tool.one_sensor_spec(watch, sensor))
        assert list(cfg.data.sensors) == [sensor]
        assert cfg.finetune.modality_dropout == 0.0
        assert cfg.evaluation.arms == {"supervised": (1.0,)}
        assert not cfg.evaluation.ablation and cfg.evaluation.seeds == (0,)
        assert cfg.evaluation.supervised_goal is None  # the goal is the two-sensor model's
        # everything else is the watch protocol's
        assert cfg.finetune.patience == watch["finetune"]["patience"]
        assert cfg.evaluation.by == "subject"
    assert list(watch["data"]["sensors"]) == ["acc", "gyro"]  # the input is left alone
