"""Optional exponential moving average of the weights, on diffusers' ``EMAModel``.

The official DiffusionRig training keeps no EMA; guided-diffusion, which it derives from, used
a rate of 0.9999, the default here. diffusers' EMAModel ramps the decay up as (1 + n) / (10 + n)
over the first updates, which keeps early averages from being dominated by the random init.
Shadow weights are stored by parameter name, so a checkpoint's ``ema.safetensors`` is readable
without this code.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from diffrig.errors import CheckpointError

SCALARS = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")


def create_ema(model: nn.Module, decay: float) -> EMAModel:
    return EMAModel(model.parameters(), decay=decay, foreach=True)


def ema_state(ema: EMAModel, model: nn.Module) -> dict:
    """A tree (see ``serialization``): shadow weights by parameter name, and the averaging settings."""
    state = ema.state_dict()
    names = [name for name, _ in model.named_parameters()]
    return {"weights": dict(zip(names, state["shadow_params"])),
            "settings": {key: state[key] for key in SCALARS}}


def load_ema_state(ema: EMAModel, model: nn.Module, state: dict) -> None:
    weights = state["weights"]
    parameters = dict(model.named_parameters())
    if set(weights) != set(parameters):
        raise CheckpointError("the checkpoint's EMA weights belong to another architecture")
    # keep each shadow tensor in its parameter's layout (channels_last) for the fused update
    shadow = [torch.empty_like(p).copy_(weights[name]) for name, p in parameters.items()]
    ema.load_state_dict({**state["settings"], "shadow_params": shadow})


@contextlib.contextmanager
def ema_weights(ema: EMAModel | None, model: nn.Module):
    """Temporarily put the averaged weights into ``model`` (a no-op without EMA)."""
    if ema is None:
        yield model
        return
    ema.store(model.parameters())
    ema.copy_to(model.parameters())
    try:
        yield model
    finally:
        ema.restore(model.parameters())
