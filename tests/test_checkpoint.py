"""Checkpoints round-trip exactly and refuse anything that is not one."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from crossl_stream.errors import CheckpointError
from crossl_stream.model import CroSSL, ModelConfig, load_model, save_model


def test_round_trip_keeps_weights_normalisation_classes_and_specs(tmp_path, specs, batch):
    torch.manual_seed(0)
    model = CroSSL(specs, ["walk", "run", "rest"], ModelConfig(aggregator="attention")).eval()
    model.set_normalisation(
        {"acc": (np.ones(3), np.full(3, 2.0)), "gyro": (np.zeros(3), np.ones(3))}
    )
    save_model(model, tmp_path / "m", {"dataset": "test"})
    loaded = load_model(tmp_path / "m")
    assert loaded.classes == ["walk", "run", "rest"]
    assert loaded.modalities == specs
    assert loaded.config.aggregator == "attention"
    assert torch.equal(loaded.norm_std_acc, torch.full((3,), 2.0))
    assert torch.equal(model(batch).logits, loaded(batch).logits)
    assert json.loads((tmp_path / "m" / "model.json").read_text())["info"] == {"dataset": "test"}


def test_a_pickled_state_dict_is_refused_not_unpickled(tmp_path, model):
    save_model(model, tmp_path)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")  # pickle in disguise
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(tmp_path)


def test_not_a_checkpoint(tmp_path, model):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no model.json"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="'format' is not"):
        load_model(tmp_path)


def test_damaged_checkpoints_say_what_is_wrong(tmp_path, model, specs):
    save_model(model, tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_model(tmp_path)
    save_model(model, tmp_path)
    meta["modalities"][0]["channels"] = 4
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="has shape"):
        load_model(tmp_path)
    meta["modalities"][0]["channels"] = 3
    meta["model"]["aggregator"] = "attention"
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="tensors do not match"):
        load_model(tmp_path)
    meta["model"]["aggregator"] = "transformer-xl"
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="invalid model description"):
        load_model(tmp_path)


def test_fallbacks_load_only_when_the_main_model_json_vouches_for_their_weights(
    tmp_path, model, specs
):
    from crossl_stream.model.checkpoint import fallback_digests, fallback_dir, load_fallbacks

    main = tmp_path / "m"
    info = {"holdout": ["s9"], "data": {"subjects": ["s1", "s2"]}}
    save_model(model, main, info)
    acc_only = CroSSL([s for s in specs if s.name == "acc"], model.classes)
    save_model(acc_only, fallback_dir(main, "gyro"), info)
    with pytest.raises(CheckpointError, match="records none"):  # written after the main model
        load_fallbacks(model, main)
    save_model(model, main, {**info, "fallbacks": fallback_digests(main)})
    assert list(load_fallbacks(model, main)) == ["gyro"]
    torch.manual_seed(5)  # other weights in its place: refused
    save_model(CroSSL(acc_only.modalities, model.classes), fallback_dir(main, "gyro"), info)
    with pytest.raises(CheckpointError, match="records another"):
        load_fallbacks(model, main)
    shutil.rmtree(fallback_dir(main, "gyro"))
    save_model(acc_only, fallback_dir(main, "mag"), info)  # a modality the model lacks
    with pytest.raises(CheckpointError, match="without 'mag', a modality the model"):
        load_fallbacks(model, main)
