"""DECA's image encoder: a ResNet-50 feature extractor and a two-layer MLP head.

The module tree reproduces DECA's ``ResnetEncoder`` so that the ``E_flame`` (and ``E_detail``)
state dicts of ``deca_model.tar`` load without renaming: ``encoder.*`` is torchvision's ResNet-50
without its classifier, ``layers.0`` / ``layers.2`` are the MLP's linear layers.
"""

from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from diffrig.errors import CheckpointError

FEATURE_SIZE = 2048  # ResNet-50's pooled feature width
HIDDEN_SIZE = 1024


class DecaEncoder(nn.Module):
    """Regresses ``outsize`` parameters from a face crop.

    Input: images (B, 3, 224, 224) in [0, 1] (DECA applies no ImageNet normalisation).
    Output: (B, outsize).
    """

    def __init__(self, outsize: int):
        super().__init__()
        self.outsize = outsize
        self.encoder = torchvision.models.resnet50(weights=None)
        # DECA's ResNet stops at the pooled 2048-vector; an identity "fc" adds no state-dict keys.
        self.encoder.fc = nn.Identity()
        self.layers = nn.Sequential(
            nn.Linear(FEATURE_SIZE, HIDDEN_SIZE),
            nn.ReLU(),
            nn.Linear(HIDDEN_SIZE, outsize),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(images))


def encoder_outsize(state_dict: Mapping[str, torch.Tensor], name: str = "encoder") -> int:
    """Output width of a DECA encoder state dict (rows of its last linear layer)."""
    weight = state_dict.get("layers.2.weight")
    if weight is None or weight.ndim != 2:
        raise CheckpointError(
            f"{name}: not a DECA ResnetEncoder state dict (no 2-D 'layers.2.weight'); "
            "pass the 'E_flame' entry of deca_model.tar"
        )
    return int(weight.shape[0])


def load_deca_encoder(
    state_dict: Mapping[str, torch.Tensor], outsize: int | None = None, name: str = "E_flame"
) -> DecaEncoder:
    """Build a :class:`DecaEncoder` from a DECA state dict, checking every key and shape.

    ``outsize`` defaults to the width stored in the state dict; when given, it must match.
    Raises :class:`CheckpointError` naming the missing, unexpected or mis-shaped entries.
    The returned encoder is in eval mode (DECA runs its encoders with frozen batch norm).
    """
    stored = encoder_outsize(state_dict, name)
    if outsize is not None and stored != outsize:
        raise CheckpointError(
            f"{name}: encoder predicts {stored} values but {outsize} are expected "
            "(shape 100 + tex 50 + exp 50 + pose 6 + cam 3 + light 27 = 236 for E_flame); "
            "is this DECA's deca_model.tar?"
        )
    model = DecaEncoder(stored)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mis_shaped = sorted(
        f"{key} {tuple(state_dict[key].shape)} != {tuple(expected[key].shape)}"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
        if items:
            shown = ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(
            f"{name}: not a DECA ResnetEncoder state dict ({'; '.join(problems)}); "
            "use deca_model.tar from DECA's README"
        )
    model.load_state_dict(dict(state_dict))
    return model.eval()
