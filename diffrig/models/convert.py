"""Official DiffusionRig checkpoints (``model*.pt``) to :class:`DiffusionRigModel`, without loss.

An official checkpoint is the plain ``state_dict`` of the official ``DiffusionRig`` module,
saved with ``torch.save``; it is read with ``torch.load(weights_only=True)``. A ``module.``
prefix (a state dict taken from a DDP wrapper) is accepted and removed.

Key mapping (official → ours). ``n`` numbers the official ``input_blocks`` in order:
``0`` is ``conv_in``; then, for level ``l`` = 0..L-1, one block per ResBlock ``j`` and, except
at the last level, one block for the downsampler. ``m`` numbers the ``output_blocks``: level
``k`` of ``up_blocks`` (deepest first) holds ``m = k·(N+1) + j`` for ``j`` = 0..N.

=======================================================  ==============================================
official                                                 ours
=======================================================  ==============================================
``denoisingUNet.time_embed.0`` / ``.2``                  ``unet.time_embedding.linear_1`` / ``linear_2``
``denoisingUNet.input_blocks.0.0``                       ``unet.conv_in``
``denoisingUNet.input_blocks.n.0`` (ResBlock)            ``unet.down_blocks.l.resnets.j``
``denoisingUNet.input_blocks.n.1`` (attention)           ``unet.down_blocks.l.attentions.j``
``denoisingUNet.input_blocks.n.0`` (downsampler)         ``unet.down_blocks.l.downsampler``
``denoisingUNet.middle_block.0`` / ``.1`` / ``.2``       ``unet.mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``denoisingUNet.output_blocks.m.0`` (ResBlock)           ``unet.up_blocks.k.resnets.j``
``denoisingUNet.output_blocks.m.1`` (attention)          ``unet.up_blocks.k.attentions.j``
``denoisingUNet.output_blocks.m.1`` or ``.2`` (upsampler, ``unet.up_blocks.k.upsampler``
after the level's last ResBlock, ``.2`` with attention)
``denoisingUNet.out.0`` / ``.2``                         ``unet.norm_out`` / ``unet.conv_out``
``encoder.*`` (torchvision ResNet)                       ``encoder.backbone.*``
=======================================================  ==============================================

Inside a ResBlock: ``in_layers.0`` → ``norm1``, ``in_layers.2`` → ``conv1``, ``emb_layers.1``
→ ``time_emb_proj``, ``cond_emb_layers.1`` → ``latent_emb_proj``, ``out_layers.0`` →
``norm2``, ``out_layers.3`` → ``conv2``, ``skip_connection`` → ``conv_shortcut``. Inside an
attention block: ``norm`` → ``norm``, ``qkv`` → ``to_qkv``, ``proj_out`` → ``to_out``, their
1-D convolution weights ``(O, I, 1)`` becoming linear weights ``(O, I)``. A conv downsampler's
``op`` → ``conv``; a conv upsampler's ``conv`` → ``conv``. Every other tensor keeps its value
and shape; the conversion checks that the two key sets and all shapes match exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from diffrig.errors import CheckpointError
from diffrig.models.blocks import AttentionBlock, Downsample, ResBlock, Upsample
from diffrig.models.diffusion_rig import DiffusionRigModel
from diffrig.models.unet import DiffusionRigUNet

OFFICIAL_UNET = "denoisingUNet"

RESBLOCK_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "latent_emb_proj": "cond_emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
ATTENTION_NAMES = {"norm": "norm", "to_qkv": "qkv", "to_out": "proj_out"}
ATTENTION_LINEARS = ("to_qkv", "to_out")

ARCHITECTURE_FLAGS = (
    "--image_size, --num_channels, --num_res_blocks, --channel_mult, --attention_resolutions, "
    "--num_heads, --num_head_channels, --resblock_updown, --latent_dim, --encoder_type, --learn_sigma"
)


def _module_names(unet: DiffusionRigUNet) -> dict[str, tuple[str, nn.Module]]:
    """Our UNet module prefix -> (official prefix, module), for every mapped sub-module."""
    names: dict[str, tuple[str, nn.Module]] = {
        "time_embedding.linear_1": ("time_embed.0", unet.time_embedding.linear_1),
        "time_embedding.linear_2": ("time_embed.2", unet.time_embedding.linear_2),
        "conv_in": ("input_blocks.0.0", unet.conv_in),
        "norm_out": ("out.0", unet.norm_out),
        "conv_out": ("out.2", unet.conv_out),
    }
    n = 0
    for level, block in enumerate(unet.down_blocks):
        for j, resnet in enumerate(block.resnets):
            n += 1
            names[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{n}.0", resnet)
            if len(block.attentions):
                names[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{n}.1", block.attentions[j])
        if block.downsampler is not None:
            n += 1
            names[f"down_blocks.{level}.downsampler"] = (f"input_blocks.{n}.0", block.downsampler)
    mid = unet.mid_block
    names["mid_block.resnets.0"] = ("middle_block.0", mid.resnets[0])
    names["mid_block.attentions.0"] = ("middle_block.1", mid.attentions[0])
    names["mid_block.resnets.1"] = ("middle_block.2", mid.resnets[1])
    m = -1
    for k, block in enumerate(unet.up_blocks):
        for j, resnet in enumerate(block.resnets):
            m += 1
            names[f"up_blocks.{k}.resnets.{j}"] = (f"output_blocks.{m}.0", resnet)
            if len(block.attentions):
                names[f"up_blocks.{k}.attentions.{j}"] = (f"output_blocks.{m}.1", block.attentions[j])
        if block.upsampler is not None:
            position = 2 if len(block.attentions) else 1
            names[f"up_blocks.{k}.upsampler"] = (f"output_blocks.{m}.{position}", block.upsampler)
    return names


def _child_names(module: nn.Module) -> dict[str, str]:
    """Our child name -> official child name inside one mapped module ('' for a leaf layer)."""
    if isinstance(module, ResBlock):
        return RESBLOCK_NAMES
    if isinstance(module, AttentionBlock):
        return ATTENTION_NAMES
    if isinstance(module, Downsample):
        return {"conv": "op"}
    if isinstance(module, Upsample):
        return {"conv": "conv"}
    return {"": ""}


def official_key_map(model: DiffusionRigModel) -> dict[str, str]:
    """Every key of ``model.state_dict()`` -> the key of the same tensor in an official checkpoint."""
    mapping: dict[str, str] = {}
    for ours, (official, module) in _module_names(model.unet).items():
        children = _child_names(module)
        for key in module.state_dict():
            child, _, tensor = key.rpartition(".")
            if child not in children:
                raise AssertionError(f"unmapped tensor {ours}.{key}")  # a layout change without a mapping
            official_child = children[child]
            official_key = f"{official}.{official_child}.{tensor}" if official_child else f"{official}.{tensor}"
            mapping[f"unet.{ours}.{key}"] = f"{OFFICIAL_UNET}.{official_key}"
    for key in model.encoder.backbone.state_dict():
        mapping[f"encoder.backbone.{key}"] = f"encoder.{key}"
    missing = set(model.state_dict()) - set(mapping)
    if missing:
        raise AssertionError(f"tensors without an official name: {sorted(missing)[:5]}")
    return mapping


def _is_attention_linear(our_key: str) -> bool:
    parts = our_key.split(".")
    return len(parts) >= 2 and parts[-2] in ATTENTION_LINEARS and parts[-1] == "weight"


def to_official_state_dict(model: DiffusionRigModel) -> dict[str, torch.Tensor]:
    """Our model's weights in the official layout (the inverse of :func:`convert_state_dict`)."""
    ours = model.state_dict()
    official = {}
    for key, official_key in official_key_map(model).items():
        tensor = ours[key].detach().clone()
        official[official_key] = tensor[..., None] if _is_attention_linear(key) else tensor
    return official


def _strip_ddp_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def _examples(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def describe_official(official: Mapping[str, torch.Tensor]) -> str:
    """The architecture options that can be read off an official state dict directly (for error messages)."""
    unet = f"{OFFICIAL_UNET}."
    found = {}
    if (w := official.get(unet + "time_embed.0.weight")) is not None and w.ndim == 2:
        found["num_channels"] = w.shape[1]
    if (w := official.get(unet + "input_blocks.0.0.weight")) is not None and w.ndim == 4:
        found["in_channels"] = w.shape[1]
    if (w := official.get(unet + "out.2.weight")) is not None and w.ndim == 4:
        found["learn_sigma"] = w.shape[0] == 6
    if (w := official.get("encoder.fc.weight")) is not None and w.ndim == 2:
        found["latent_dim"] = w.shape[0]
        found["encoder_type"] = "resnet50" if "encoder.layer1.0.conv3.weight" in official else "resnet18"
    return ", ".join(f"{name}={value}" for name, value in found.items())


def convert_state_dict(official: Mapping[str, torch.Tensor], model: DiffusionRigModel) -> dict[str, torch.Tensor]:
    """An official ``DiffusionRig`` state dict -> a state dict for ``model`` (strict keys and shapes).

    Raises CheckpointError naming the first mismatching keys when the checkpoint was
    trained with another architecture than ``model``'s configuration.
    """
    official = _strip_ddp_prefix(official)
    bad = [key for key, value in official.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"not a model state dict: entries {_examples(bad)} are not tensors")
    if not any(key.startswith(f"{OFFICIAL_UNET}.") for key in official):
        raise CheckpointError(
            f"not an official DiffusionRig checkpoint: no '{OFFICIAL_UNET}.' keys "
            f"(found e.g. {_examples(official, 3) or 'nothing'})"
        )
    key_map = official_key_map(model)
    expected = set(key_map.values())
    missing, unexpected = expected - set(official), set(official) - expected
    hint = f"; build the model with the architecture flags it was trained with ({ARCHITECTURE_FLAGS})"
    if described := describe_official(official):
        hint += f"; the checkpoint has {described}"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_examples(missing)}")
        if unexpected:
            parts.append(f"unexpected {_examples(unexpected)}")
        raise CheckpointError("checkpoint layout differs from the model: " + "; ".join(parts) + hint)
    ours_shapes = {key: value.shape for key, value in model.state_dict().items()}
    converted, mismatches = {}, []
    for key, official_key in key_map.items():
        tensor = official[official_key]
        if _is_attention_linear(key):
            if tensor.ndim != 3 or tensor.shape[-1] != 1:
                raise CheckpointError(f"{official_key} has shape {tuple(tensor.shape)}, expected (out, in, 1)" + hint)
            tensor = tensor[..., 0]
        if tensor.shape != ours_shapes[key]:
            mismatches.append(f"{official_key} has shape {tuple(tensor.shape)}, the model expects {tuple(ours_shapes[key])}")
        converted[key] = tensor
    if mismatches:
        more = f" (+{len(mismatches) - 3} more)" if len(mismatches) > 3 else ""
        raise CheckpointError(
            f"{len(mismatches)} tensors differ in shape: " + "; ".join(mismatches[:3]) + more + hint
        )
    return converted


def read_official_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load an official ``model*.pt`` safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or unsafe files
        from diffrig.deca.formats import torch_load_reason

        raise CheckpointError(f"cannot read {path} as a PyTorch weights file: {torch_load_reason(error)}") from error
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, not a state dict of tensors")
    return dict(state_dict)


def build_model(**architecture) -> DiffusionRigModel:
    """A :class:`DiffusionRigModel` from official architecture options; invalid options raise CheckpointError."""
    try:
        return DiffusionRigModel(**architecture)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"invalid architecture: {error}") from error


def load_official_checkpoint(path: str | os.PathLike, **architecture) -> DiffusionRigModel:
    """Read an official checkpoint into a new model built with the given official options."""
    state_dict = read_official_checkpoint(path)
    model = build_model(**architecture)
    try:
        converted = convert_state_dict(state_dict, model)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error
    model.load_state_dict(converted, strict=True)
    return model


def convert_official_checkpoint(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, **architecture
) -> DiffusionRigModel:
    """Convert ``checkpoint`` and write it with ``save_pretrained`` (config.json + safetensors) to ``output_dir``."""
    model = load_official_checkpoint(checkpoint, **architecture)
    try:
        model.save_pretrained(output_dir, safe_serialization=True)
    except OSError as error:
        raise CheckpointError(f"cannot write the converted model to {output_dir}: {error}") from error
    return model
