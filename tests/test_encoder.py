"""DecaEncoder: DECA's ResnetEncoder key layout, output shape, strict loading."""

import pytest
import torch

from diffrig.deca.encoder import DecaEncoder, load_deca_encoder
from diffrig.errors import CheckpointError


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return DecaEncoder(236).eval()


def test_state_dict_matches_deca_layout(encoder):
    state = encoder.state_dict()
    # ResNet-50 (53 conv/bn/downsample modules -> 320 tensors without fc) + 2 linear layers
    assert len(state) == 322
    assert next(iter(state)) == "encoder.conv1.weight"
    assert tuple(state["encoder.conv1.weight"].shape) == (64, 3, 7, 7)
    assert tuple(state["encoder.layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(state["encoder.layer4.2.bn3.running_var"].shape) == (2048,)
    assert "encoder.layer3.5.conv2.weight" in state
    assert tuple(state["layers.0.weight"].shape) == (1024, 2048)
    assert tuple(state["layers.2.weight"].shape) == (236, 1024)
    assert tuple(state["layers.2.bias"].shape) == (236,)
    assert not any(key.startswith("encoder.fc") for key in state)


def test_forward_shape_and_determinism(encoder):
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        out = encoder(images)
        again = encoder(images[1:])
    assert out.shape == (2, 236)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:], again, atol=1e-5, rtol=1e-5)


def test_load_roundtrip_infers_outsize(encoder):
    loaded = load_deca_encoder(encoder.state_dict())
    assert loaded.outsize == 236 and not loaded.training
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), encoder(images))


def test_load_rejects_missing_key(encoder):
    state = dict(encoder.state_dict())
    del state["encoder.layer2.1.bn2.weight"]
    with pytest.raises(CheckpointError, match=r"missing: encoder\.layer2\.1\.bn2\.weight"):
        load_deca_encoder(state)


def test_load_rejects_unexpected_and_misshaped_keys(encoder):
    state = dict(encoder.state_dict())
    state["encoder.fc.weight"] = torch.zeros(1000, 2048)
    state["layers.0.bias"] = torch.zeros(512)
    with pytest.raises(CheckpointError) as info:
        load_deca_encoder(state)
    message = str(info.value)
    assert "unexpected: encoder.fc.weight" in message
    assert "layers.0.bias (512,) != (1024,)" in message


def test_load_rejects_wrong_outsize_and_foreign_dicts(encoder):
    with pytest.raises(CheckpointError, match="236 values but 128"):
        load_deca_encoder(encoder.state_dict(), outsize=128)
    with pytest.raises(CheckpointError, match="layers.2.weight"):
        load_deca_encoder({"conv.weight": torch.zeros(3, 3)})
