"""DiffusionRigModel: architecture, API, save/load, encoder freezing, memory/speed options."""

import math

import pytest
import torch

from diffrig.models import DiffusionRigModel
from diffrig.models.blocks import AttentionBlock, GroupNorm32
from diffrig.models.unet import attention_downsample_rates, resolve_channel_mult

TINY = dict(image_size=32, num_channels=32, channel_mult="1,2", num_res_blocks=1, attention_resolutions="16")


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (including the zero-initialised output layers) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1 * noise)
    return model


def tiny(seed=0, **overrides) -> DiffusionRigModel:
    torch.manual_seed(seed)
    return randomize_(DiffusionRigModel(**{**TINY, "dropout": 0.0, **overrides}), seed).eval()


def inputs(batch=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    noisy = torch.randn(batch, 3, size, size, generator=g)
    buffers = torch.randn(batch, 9, size, size, generator=g)
    image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    timesteps = torch.randint(0, 1000, (batch,), generator=g)
    return noisy, timesteps, buffers, image


def test_official_256_settings_have_the_official_parameter_count():
    with torch.device("meta"):
        model = DiffusionRigModel()  # official script_util defaults: 256², 128 channels, ResNet-18
    assert sum(p.numel() for p in model.parameters()) == 144_610_179
    assert model.config.channel_mult == "" and model.config.attention_resolutions == "16"
    assert model.config.in_channels == 12 and model.config.latent_dim == 64 and model.config.dropout == 0.1


def test_channel_mult_defaults_and_parsing():
    assert resolve_channel_mult(256, "") == (1, 1, 2, 2, 4, 4)
    assert resolve_channel_mult(512, "") == (0.5, 1, 1, 2, 2, 4, 4)
    assert resolve_channel_mult(128, "") == (1, 1, 2, 3, 4)
    assert resolve_channel_mult(64, "") == (1, 2, 3, 4)
    assert resolve_channel_mult(32, "1,2") == (1, 2)
    assert resolve_channel_mult(32, [1, 2, 4]) == (1, 2, 4)
    with pytest.raises(ValueError, match="no default channel_mult for image_size 96"):
        resolve_channel_mult(96, "")
    with pytest.raises(ValueError, match="comma-separated integers"):
        resolve_channel_mult(64, "1,x")
    assert attention_downsample_rates(256, "32,16,8") == (8, 16, 32)
    assert attention_downsample_rates(32, [16]) == (2,)


def test_forward_shapes_and_latent_paths():
    model = tiny()
    noisy, t, buffers, image = inputs()
    with torch.no_grad():
        latent = model.encode_latent(image)
        eps = model(noisy, t, buffers, image=image)
        eps_latent = model(noisy, t, buffers, latent=latent)
        other_t = model(noisy, (t + 500) % 1000, buffers, latent=latent)
    assert latent.shape == (2, 64)
    assert eps.shape == (2, 3, 32, 32)
    torch.testing.assert_close(eps, eps_latent, rtol=0, atol=0)
    assert (eps - other_t).abs().max() > 1e-3  # the timestep matters
    with torch.no_grad():
        other_latent = model(noisy, t, buffers, latent=latent + torch.randn(2, 64))
    assert (eps - other_latent).abs().max() > 1e-3  # so does the global latent


def test_scalar_timestep_is_broadcast():
    model = tiny()
    noisy, _, buffers, image = inputs()
    with torch.no_grad():
        a = model(noisy, 123, buffers, image=image)
        b = model(noisy, torch.tensor([123, 123]), buffers, image=image)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_learn_sigma_doubles_output_channels():
    model = tiny(learn_sigma=True)
    noisy, t, buffers, image = inputs(batch=1)
    with torch.no_grad():
        assert model(noisy, t, buffers, image=image).shape == (1, 6, 32, 32)


def test_argument_errors():
    model = tiny()
    noisy, t, buffers, image = inputs()
    with pytest.raises(ValueError, match="exactly one of latent"):
        model(noisy, t, buffers)
    with pytest.raises(ValueError, match="exactly one of latent"):
        model(noisy, t, buffers, latent=torch.zeros(2, 64), image=image)
    with pytest.raises(ValueError, match="in_channels=12"):
        model(noisy, t, buffers[:, :6], image=image)


def test_inputs_that_do_not_fit_together_are_refused_by_name():
    model = tiny()
    noisy, t, buffers, image = inputs()
    with pytest.raises(ValueError, match="buffers .* must match noisy"):
        model(noisy, t, buffers[:1], image=image)
    with pytest.raises(ValueError, match="buffers .* must match noisy"):
        model(noisy, t, buffers[..., :16, :16], image=image)
    with pytest.raises(ValueError, match=r"latent must be \(2, 64\)"):
        model(noisy, t, buffers, latent=torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"latent must be \(2, 64\)"):
        model(noisy, t, buffers, latent=torch.zeros(64))
    with pytest.raises(ValueError, match="timesteps"):
        model(noisy, torch.tensor([1, 2, 3]), buffers, image=image)
    with pytest.raises(TypeError, match="image must be float"):
        model(noisy, t, buffers, image=((image + 1) * 127.5).to(torch.uint8))
    with pytest.raises(ValueError, match="batches"):
        model(noisy[0], t, buffers[0], image=image)
    with torch.no_grad():  # one latent row serves the whole batch
        assert model(noisy, t, buffers, latent=torch.zeros(1, 64)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="use_scale_shift_norm=False"):
        DiffusionRigModel(**TINY, use_scale_shift_norm=False)
    with pytest.raises(ValueError, match=r"positive multiple of 32 .* gives \[48, 96\]"):
        DiffusionRigModel(**{**TINY, "num_channels": 48})
    with pytest.raises(ValueError, match="unknown encoder_type 'vgg'"):
        DiffusionRigModel(**TINY, encoder_type="vgg")


def test_save_pretrained_round_trip(tmp_path):
    model = tiny(encoder_type="resnet18", latent_dim=16, num_heads=2)
    noisy, t, buffers, image = inputs()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    loaded = DiffusionRigModel.from_pretrained(tmp_path).eval()
    assert loaded.config.latent_dim == 16 and loaded.config.num_heads == 2
    assert loaded.config.channel_mult == "1,2"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(noisy, t, buffers, image=image), model(noisy, t, buffers, image=image))


def test_freeze_encoder_stops_its_gradients_only():
    model = tiny().train()
    model.freeze_encoder()
    assert model.encoder_frozen
    noisy, t, buffers, image = inputs()
    model(noisy, t, buffers, image=image).square().mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None for p in model.unet.parameters())
    assert model.encoder.training  # BatchNorm follows train(), as in the official stage 2
    model.freeze_encoder(False)
    assert not model.encoder_frozen


def test_freeze_encoder_can_hold_batchnorm_statistics():
    model = tiny().train()
    model.freeze_encoder(freeze_batchnorm=True)
    model.train()
    assert model.training and model.unet.training and not model.encoder.training
    before = model.encoder.backbone.bn1.running_mean.clone()
    _, _, _, image = inputs()
    model.encode_latent(image)
    torch.testing.assert_close(model.encoder.backbone.bn1.running_mean, before, rtol=0, atol=0)
    model.freeze_encoder(False)
    model.train()
    assert model.encoder.training


def test_channels_last_gives_the_same_output():
    model = tiny()
    noisy, t, buffers, image = inputs()
    with torch.no_grad():
        reference = model(noisy, t, buffers, image=image)
        model = model.to(memory_format=torch.channels_last)
        cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
        out = model(cl(noisy), t, cl(buffers), image=cl(image))
    torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    noisy, t, buffers, image = inputs()

    def run(model):
        model.train()
        model.zero_grad()
        torch.manual_seed(7)  # same dropout masks
        out = model(noisy, t, buffers, image=image)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = tiny(dropout=0.1)
    checkpointed = tiny(dropout=0.1)
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.unet.gradient_checkpointing
    out_a, grads_a = run(plain)
    out_b, grads_b = run(checkpointed)
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-5, atol=1e-6)
    assert DiffusionRigModel(**TINY, use_checkpoint=True).unet.gradient_checkpointing


def naive_attention(block: AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """Explicit softmax(q·k/√d)·v, with the qkv channels split per the block's layout."""
    b, c, h, w = x.shape
    heads, d = block.num_heads, c // block.num_heads
    qkv = block.to_qkv(block.norm(x).reshape(b, c, h * w).transpose(1, 2))  # (B, T, 3C)
    if block.legacy_order:
        qkv = qkv.reshape(b, h * w, heads, 3, d).permute(3, 0, 2, 1, 4)
    else:
        qkv = qkv.reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv  # (B, heads, T, d)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, h * w, c)
    return x + block.to_out(out).transpose(1, 2).reshape(b, c, h, w)


@pytest.mark.parametrize("legacy_order", [True, False])
def test_attention_matches_explicit_softmax(legacy_order):
    block = randomize_(AttentionBlock(64, num_heads=4, legacy_order=legacy_order))
    x = torch.randn(2, 64, 6, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x), naive_attention(block, x), rtol=1e-5, atol=1e-5)


def test_groupnorm_keeps_input_dtype_and_runs_in_bf16():
    norm = GroupNorm32(64)
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(norm(x), torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias))
    assert norm(x.bfloat16()).dtype == torch.bfloat16
    model = tiny().to(torch.bfloat16)
    noisy, t, buffers, image = inputs(batch=1)
    with torch.no_grad():
        out = model(noisy, t, buffers, latent=torch.zeros(1, 64))  # float32 inputs are cast
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
