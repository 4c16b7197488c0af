"""The model's forward contract, masking, loss and bad-input errors."""

from __future__ import annotations

import pytest
import torch

from crossl_stream.errors import InputError
from crossl_stream.model import CroSSL, LatentMasker, ModalitySpec, ModelConfig, vicreg_loss


def test_forward_gives_embeddings_and_probabilities(model, batch):
    out = model(batch)
    assert out.embedding.shape == (5, 32)
    assert out.logits.shape == (5, 3)
    assert torch.allclose(out.probs.sum(dim=1), torch.ones(5))
    assert out.visible.all()


def test_modalities_may_differ_in_channels_and_samples():
    specs = [
        ModalitySpec(name="eeg", channels=8, rate_hz=250, samples=500),
        ModalitySpec(name="imu", channels=6, rate_hz=50, samples=100),
    ]
    model = CroSSL(specs, ["rest", "move"]).eval()
    out = model({"eeg": torch.randn(2, 8, 500), "imu": torch.randn(2, 6, 100)})
    assert out.probs.shape == (2, 2)


def test_unavailable_modality_never_reaches_its_encoder(model, batch):
    seen: list[int] = []
    model.encoders["gyro"].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    available = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 0]], dtype=torch.bool)
    model(batch, available)
    assert seen == [2]  # only the two windows where gyro is available were encoded
    seen.clear()
    model({"acc": batch["acc"]})
    assert seen == []


def test_missing_modality_is_the_mask_token_not_its_data(model, batch):
    available = torch.tensor([[1, 0]] * 5, dtype=torch.bool)
    garbage = dict(batch, gyro=torch.full((5, 3, 100), float("nan")))
    a = model(batch, available).logits
    b = model(garbage, available).logits  # NaN in unavailable windows is never read
    c = model({"acc": batch["acc"]}).logits
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, model(batch).logits)


def test_attention_aggregator_ignores_hidden_modalities(specs, batch):
    torch.manual_seed(0)
    model = CroSSL(specs, ["a", "b"], ModelConfig(aggregator="attention")).eval()
    available = torch.tensor([[1, 0]] * 5, dtype=torch.bool)
    with torch.no_grad():
        model.mask_token.add_(5.0)  # padding, not the token, carries the mask
    a = model(batch, available).logits
    b = model({"acc": batch["acc"]}).logits
    assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
    ("inputs", "available", "message"),
    [
        ({"acc": torch.randn(2, 4, 100)}, None, "'acc': expected [batch, 3 channels, 100 samples]"),
        ({"acc": torch.randn(2, 3, 90)}, None, "got [2, 3, 90]"),
        ({"acc": torch.randn(3, 100)}, None, "expected [batch"),
        ({"magnetometer": torch.randn(2, 3, 100)}, None, "unknown modalities ['magnetometer']"),
        ({}, None, "no modality given"),
        ({"acc": torch.randn(2, 3, 100), "gyro": torch.randn(3, 3, 100)}, None, "batch of 3"),
        ({"acc": torch.randn(2, 3, 100)}, torch.ones(2, 3, dtype=torch.bool), "expected [2, 2]"),
        ({"acc": torch.randn(2, 3, 100)}, torch.ones(2, 2, dtype=torch.bool), "['gyro'] available"),
        ({"acc": torch.randn(2, 3, 100)}, torch.zeros(2, 2, dtype=torch.bool), "no available"),
    ],
)
def test_bad_inputs_name_what_and_where(model, inputs, available, message):
    with pytest.raises(InputError) as err:
        model(inputs, available)
    assert message in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_in_an_available_window_are_an_error_naming_it(model, batch, bad):
    batch["gyro"][3, 1, 50] = bad
    with pytest.raises(InputError, match=r"'gyro': NaN or Inf in available windows \[3\]"):
        model(batch)


def test_bad_model_definitions_are_rejected(specs):
    with pytest.raises(InputError, match="unique"):
        CroSSL([specs[0], specs[0]], ["a", "b"])
    with pytest.raises(InputError, match="two distinct class"):
        CroSSL(specs, ["a"])
    short = ModalitySpec(name="x", channels=1, rate_hz=10, samples=20)
    with pytest.raises(InputError, match="fewer than 46 samples"):
        CroSSL([short], ["a", "b"])


def test_spatial_masking_keeps_at_least_one_available_modality():
    g = torch.Generator().manual_seed(0)
    available = torch.rand(2000, 3, generator=g) < 0.7
    nothing = ~available.any(dim=1)
    assert nothing.any()
    kept = LatentMasker("spatial", keep=0.3).modality_mask(available, g)
    assert kept[~nothing].any(dim=1).all()
    assert not kept[nothing].any()  # nothing available: nothing to keep
    assert not (kept & ~available).any()  # never un-hides a missing modality
    assert 0.2 < kept.sum() / available.sum() < 0.55


def test_temporal_masking_hides_one_contiguous_span():
    g = torch.Generator().manual_seed(0)
    keep = LatentMasker("temporal", keep=0.7).time_mask(64, 55, g, torch.device("cpu"))
    hidden = ~keep
    assert (hidden.sum(dim=1) == round((1 - 0.7) * 55)).all()
    # one contiguous run per row: exactly one start of a hidden run
    starts = hidden[:, 1:] & ~hidden[:, :-1]
    assert ((starts.sum(dim=1) + hidden[:, 0].long()) == 1).all()


def test_random_masking_hides_elements_at_the_requested_rate():
    g = torch.Generator().manual_seed(0)
    keep = LatentMasker("random", keep=0.8).element_mask((256, 2, 96), g, torch.device("cpu"))
    assert abs(float(keep.float().mean()) - 0.8) < 0.01


def test_masking_views_differ_and_need_a_generator_for_repeatability(model, batch):
    model.train()
    masker = LatentMasker("temporal", keep=0.5)
    torch.manual_seed(0)
    a = model(batch, masker=masker, generator=torch.Generator().manual_seed(3)).embedding
    torch.manual_seed(0)
    b = model(batch, masker=masker, generator=torch.Generator().manual_seed(3)).embedding
    c = model(batch, masker=masker, generator=torch.Generator().manual_seed(4)).embedding
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_masker_settings():
    with pytest.raises(ValueError, match="unknown masking strategy"):
        LatentMasker("sideways", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keep probability"):
        LatentMasker("spatial", 0.0)


def test_vicreg_penalises_collapse_and_rewards_agreement():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 16, generator=g) * 2
    spread, parts = vicreg_loss(x, x)
    assert parts["invariance"] == 0.0 and parts["variance"] == 0.0
    _, cparts = vicreg_loss(torch.zeros(256, 16), torch.zeros(256, 16))
    assert cparts["variance"] == pytest.approx(0.99, abs=0.01)  # both views, hinge at std 1
    correlated = torch.randn(256, 1, generator=g).repeat(1, 16) * 2
    _, rparts = vicreg_loss(correlated, correlated)
    assert rparts["covariance"] > 10 * parts["covariance"]
    shifted, sparts = vicreg_loss(x, x + 1.0)
    assert sparts["invariance"] == pytest.approx(1.0) and shifted > spread
    with pytest.raises(ValueError, match="two"):
        vicreg_loss(x[:1], x[:1])
