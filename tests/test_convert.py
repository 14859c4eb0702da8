"""Official checkpoint conversion: the documented key mapping, lossless round trip, clear errors, CLI.

Official checkpoints are ``torch.save``'d state dicts; these tests write such files (a
third-party format reproduced for testing) from our model through the inverse mapping.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffrig.errors import CheckpointError
from diffrig.models import (
    DiffusionRigModel,
    convert_official_checkpoint,
    convert_state_dict,
    load_official_checkpoint,
    official_key_map,
    to_official_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import convert_official  # noqa: E402

# image 32², 32 channels, two levels (1, 2), two ResBlocks per level, attention at 16² (level 1)
ARCH = dict(image_size=32, num_channels=32, channel_mult="1,2", num_res_blocks=2, attention_resolutions="16")

# The official UNet layout for ARCH, as the official code names it (read off its state dict).
RES = ("in_layers.0", "in_layers.2", "emb_layers.1", "cond_emb_layers.1", "out_layers.0", "out_layers.3")
RES_SKIP = RES + ("skip_connection",)
ATTN = ("norm", "qkv", "proj_out")
OFFICIAL_UNET_LAYOUT = {
    "time_embed.0": ("",), "time_embed.2": ("",), "input_blocks.0.0": ("",),
    "input_blocks.1.0": RES, "input_blocks.2.0": RES,
    "input_blocks.3.0": RES,  # down-ResBlock
    "input_blocks.4.0": RES_SKIP, "input_blocks.4.1": ATTN, "input_blocks.5.0": RES, "input_blocks.5.1": ATTN,
    "middle_block.0": RES, "middle_block.1": ATTN, "middle_block.2": RES,
    "output_blocks.0.0": RES_SKIP, "output_blocks.0.1": ATTN, "output_blocks.1.0": RES_SKIP,
    "output_blocks.1.1": ATTN, "output_blocks.2.0": RES_SKIP, "output_blocks.2.1": ATTN,
    "output_blocks.2.2": RES,  # up-ResBlock
    "output_blocks.3.0": RES_SKIP, "output_blocks.4.0": RES_SKIP, "output_blocks.5.0": RES_SKIP,
    "out.0": ("",), "out.2": ("",),
}


def official_unet_keys() -> set[str]:
    keys = set()
    for module, children in OFFICIAL_UNET_LAYOUT.items():
        for child in children:
            prefix = f"denoisingUNet.{module}" + (f".{child}" if child else "")
            keys |= {f"{prefix}.weight", f"{prefix}.bias"}
    return keys


def random_model(seed=0, **overrides) -> DiffusionRigModel:
    torch.manual_seed(seed)
    model = DiffusionRigModel(**{**ARCH, **overrides})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise / math.sqrt(p[0].numel()) if p.ndim > 1 else 1 + 0.1 * noise)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=g))
            elif name.endswith("running_var"):
                buffer.copy_(0.5 + torch.rand(buffer.shape, generator=g))
    return model.eval()


def outputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    noisy, buffers = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 9, 32, 32, generator=g)
    image = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    with torch.no_grad():
        return model(noisy, torch.tensor([10, 900]), buffers, image=image)


def write_official(path: Path, state_dict) -> Path:
    torch.save(state_dict, path)
    return path


def test_key_map_produces_the_official_layout():
    model = random_model()
    official = to_official_state_dict(model)
    unet_keys = {key for key in official if key.startswith("denoisingUNet.")}
    assert unet_keys == official_unet_keys()
    encoder_keys = {key[len("encoder."):] for key in official if key.startswith("encoder.")}
    assert encoder_keys == set(model.encoder.backbone.state_dict())
    assert len(official) == len(model.state_dict())
    assert official["denoisingUNet.input_blocks.4.1.qkv.weight"].shape == (192, 64, 1)
    assert official["denoisingUNet.middle_block.1.proj_out.weight"].shape == (64, 64, 1)
    assert official["denoisingUNet.output_blocks.2.2.emb_layers.1.weight"].shape == (128, 128)
    assert official["denoisingUNet.output_blocks.3.0.skip_connection.weight"].shape == (32, 96, 1, 1)
    assert official["encoder.fc.weight"].shape == (64, 512)
    key_map = official_key_map(model)
    assert key_map["unet.down_blocks.0.downsampler.latent_emb_proj.weight"] == (
        "denoisingUNet.input_blocks.3.0.cond_emb_layers.1.weight"
    )
    assert key_map["unet.up_blocks.0.upsampler.conv2.bias"] == "denoisingUNet.output_blocks.2.2.out_layers.3.bias"


def test_conv_resamplers_map_to_op_and_conv():
    official = to_official_state_dict(random_model(resblock_updown=False, num_res_blocks=1))
    assert official["denoisingUNet.input_blocks.2.0.op.weight"].shape == (32, 32, 3, 3)
    assert official["denoisingUNet.output_blocks.1.2.conv.weight"].shape == (64, 64, 3, 3)


def test_round_trip_through_an_official_checkpoint_is_lossless(tmp_path):
    source = random_model()
    checkpoint = write_official(tmp_path / "model005000.pt", to_official_state_dict(source))
    out_dir = tmp_path / "converted"
    convert_official_checkpoint(checkpoint, out_dir, **ARCH)
    assert (out_dir / "config.json").is_file() and (out_dir / "diffusion_pytorch_model.safetensors").is_file()
    converted = DiffusionRigModel.from_pretrained(out_dir).eval()
    for key, value in source.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(outputs(converted), outputs(source), rtol=0, atol=0)


def test_ddp_prefixed_checkpoint_is_accepted(tmp_path):
    source = random_model()
    prefixed = {f"module.{key}": value for key, value in to_official_state_dict(source).items()}
    model = load_official_checkpoint(write_official(tmp_path / "m.pt", prefixed), **ARCH).eval()
    torch.testing.assert_close(outputs(model), outputs(source), rtol=0, atol=0)


def test_other_architecture_is_refused_with_a_hint():
    official = to_official_state_dict(random_model())
    with pytest.raises(CheckpointError, match=r"tensors differ in shape: .*time_embed.0.weight has shape \(128, 32\), the model expects \(256, 64\).*--num_channels.*the checkpoint has num_channels=32, in_channels=12, learn_sigma=False, latent_dim=64, encoder_type=resnet18"):
        convert_state_dict(official, DiffusionRigModel(**{**ARCH, "num_channels": 64}))
    with pytest.raises(CheckpointError, match="missing .*input_blocks.6"):
        convert_state_dict(official, DiffusionRigModel(**{**ARCH, "num_res_blocks": 3}))
    with pytest.raises(CheckpointError, match="unexpected .*encoder.layer1.0.bn3.*encoder_type=resnet50"):
        convert_state_dict(to_official_state_dict(random_model(encoder_type="resnet50")), DiffusionRigModel(**ARCH))


def test_malformed_checkpoints_are_refused(tmp_path):
    model = DiffusionRigModel(**ARCH)
    official = to_official_state_dict(random_model())
    with pytest.raises(CheckpointError, match="not an official DiffusionRig checkpoint"):
        convert_state_dict(model.state_dict(), model)  # our own layout
    with pytest.raises(CheckpointError, match="not tensors"):
        convert_state_dict({**official, "step": 5}, model)
    broken = dict(official)
    broken["denoisingUNet.middle_block.1.qkv.weight"] = broken["denoisingUNet.middle_block.1.qkv.weight"][..., 0]
    with pytest.raises(CheckpointError, match=r"middle_block.1.qkv.weight has shape \(192, 64\), expected \(out, in, 1\)"):
        convert_state_dict(broken, model)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_checkpoint(tmp_path / "absent.pt", **ARCH)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read .*garbage.pt.*not a file written by torch.save"):
        load_official_checkpoint(tmp_path / "garbage.pt", **ARCH)
    (tmp_path / "settings.json").write_text('{"lr": 1e-4}')
    with pytest.raises(CheckpointError, match="settings.json.*not a file written by torch.save"):
        load_official_checkpoint(tmp_path / "settings.json", **ARCH)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_official_checkpoint(write_official(tmp_path / "list.pt", [1, 2]), **ARCH)
    with pytest.raises(CheckpointError, match="invalid architecture: no default channel_mult"):
        load_official_checkpoint(write_official(tmp_path / "ok.pt", official), **{**ARCH, "image_size": 96, "channel_mult": ""})


def test_pickled_code_is_never_run(tmp_path):
    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    torch.save({"denoisingUNet.x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot read .*evil.pt.*names the global") as info:
        load_official_checkpoint(tmp_path / "evil.pt", **ARCH)
    assert not (tmp_path / "pwned").exists()
    # torch's own message advises weights_only=False, which would run the payload: never passed on
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "config.json").write_text('{"image_size": 32}')
    with pytest.raises(CheckpointError, match="cannot read .*config.json") as info:
        load_official_checkpoint(tmp_path / "config.json", **ARCH)
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)


def test_cli_converts_with_official_and_dash_flags(tmp_path, capsys):
    source = random_model(num_heads=2, dropout=0.0)
    checkpoint = write_official(tmp_path / "model.pt", to_official_state_dict(source))
    argv = ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"), "--image_size", "32",
            "--num-channels", "32", "--channel_mult", "1,2", "--num_res_blocks", "2",
            "--attention-resolutions", "16", "--num_heads", "2", "--dropout", "0", "--resblock_updown", "True"]
    assert convert_official.main(argv) == 0
    assert "wrote" in capsys.readouterr().out
    converted = DiffusionRigModel.from_pretrained(tmp_path / "out").eval()
    assert converted.config.num_heads == 2 and converted.config.dropout == 0.0
    torch.testing.assert_close(outputs(converted), outputs(source), rtol=0, atol=0)


def test_cli_reports_errors_in_one_line(tmp_path):
    write_official(tmp_path / "model.pt", to_official_state_dict(random_model()))
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "convert_official.py"), "--checkpoint", str(tmp_path / "model.pt"),
         "--output", str(tmp_path / "out"), "--image_size", "32", "--channel_mult", "1,2"],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--num_channels" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
