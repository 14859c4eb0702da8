"""The UNet's GroupNorm, nearest upsampling and skip concatenation: torch's values, in the input's memory layout."""

import pytest
import torch
import torch.nn.functional as F

from diffrig.models import DiffusionRigModel
from diffrig.models.blocks import concat_channels, group_norm, upsample_nearest_2x

CHANNELS_LAST = torch.channels_last


def layout(x: torch.Tensor) -> str:
    return "channels_last" if x.is_contiguous(memory_format=CHANNELS_LAST) and not x.is_contiguous() else "contiguous"


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_matches_torch_values_and_gradients_and_keeps_layout(channels_last):
    torch.manual_seed(0)
    x = torch.randn(3, 64, 7, 5, dtype=torch.float64) * 3 + 2  # offset mean: the pooled variance must include it
    if channels_last:
        x = x.contiguous(memory_format=CHANNELS_LAST)
    x.requires_grad_(True)
    weight = torch.randn(64, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(64, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(3, 64, 7, 5, dtype=torch.float64)
    ours = group_norm(x.float(), 32, weight.float(), bias.float(), 1e-5)
    ref = F.group_norm(x, 32, weight, bias, 1e-5)
    torch.testing.assert_close(ours.double(), ref, rtol=0, atol=1e-5)
    assert layout(ours) == layout(x)
    grads = torch.autograd.grad((group_norm(x, 32, weight, bias, 1e-5) * grad_out).sum(), (x, weight, bias))
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), (x, weight, bias))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # computed in float32


def test_group_norm_returns_bf16_for_bf16_input():
    x = torch.randn(2, 32, 4, 4).bfloat16().contiguous(memory_format=CHANNELS_LAST)
    out = group_norm(x, 32, torch.ones(32), torch.zeros(32), 1e-5)
    assert out.dtype == torch.bfloat16 and layout(out) == "channels_last"
    torch.testing.assert_close(out.float(), F.group_norm(x.float(), 32, eps=1e-5), rtol=0, atol=2e-2)


@pytest.mark.parametrize("channels_last", [False, True])
def test_upsample_matches_interpolate_and_keeps_layout(channels_last):
    x = torch.randn(2, 8, 3, 5)
    if channels_last:
        x = x.contiguous(memory_format=CHANNELS_LAST)
    x.requires_grad_(True)
    out = upsample_nearest_2x(x)
    ref = F.interpolate(x, scale_factor=2.0, mode="nearest")
    assert out.shape == (2, 8, 6, 10) and torch.equal(out, ref) and layout(out) == layout(x)
    grad_out = torch.randn(2, 8, 6, 10)
    torch.testing.assert_close(torch.autograd.grad((out * grad_out).sum(), x)[0],
                               torch.autograd.grad((ref * grad_out).sum(), x)[0])


@pytest.mark.parametrize("channels_last", [False, True])
def test_concat_channels_matches_cat_and_hands_back_dense_gradients(channels_last):
    torch.manual_seed(0)
    fmt = CHANNELS_LAST if channels_last else torch.contiguous_format
    first = torch.randn(2, 6, 5, 4).contiguous(memory_format=fmt).requires_grad_(True)
    second = torch.randn(2, 10, 5, 4).contiguous(memory_format=fmt).requires_grad_(True)
    out = concat_channels(first, second)
    assert torch.equal(out, torch.cat([first, second], dim=1))
    grad = torch.randn(2, 16, 5, 4).contiguous(memory_format=fmt)
    out.backward(grad)
    assert torch.equal(first.grad, grad[:, :6]) and torch.equal(second.grad, grad[:, 6:])
    for g in (first.grad, second.grad):  # a channel slice of a channels_last tensor is not dense
        assert g.is_contiguous(memory_format=fmt)
    assert layout(first.grad) == layout(first)


def test_channels_last_model_gives_the_same_noise_prediction():
    torch.manual_seed(0)
    model = DiffusionRigModel(image_size=32, num_channels=32, channel_mult="1,2", num_res_blocks=1,
                              attention_resolutions="16", latent_dim=16, dropout=0.0).eval()
    for parameter in model.unet.conv_out.parameters():  # zero-initialised: make the output depend on the input
        torch.nn.init.normal_(parameter, std=0.1)
    noisy, buffers = torch.randn(2, 3, 32, 32), torch.randn(2, 9, 32, 32)
    t, latent = torch.tensor([3, 700]), torch.randn(2, 16)
    with torch.no_grad():
        ref = model(noisy, t, buffers, latent=latent)
        model.to(memory_format=CHANNELS_LAST)
        out = model(noisy.contiguous(memory_format=CHANNELS_LAST), t,
                    buffers.contiguous(memory_format=CHANNELS_LAST), latent=latent)
    assert ref.abs().max() > 0.1
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
