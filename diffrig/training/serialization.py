"""Nested training state (optimizer, EMA, RNG, scaler) as one safetensors file, without pickle.

A *tree* is any nesting of dicts (str or int keys), lists, tuples, tensors and JSON scalars, such
as ``optimizer.state_dict()``. :func:`save_tree` stores its tensors in a safetensors file and its
structure as JSON in the file's metadata; :func:`load_tree` rebuilds the same tree, tuples and
integer keys included. Only tensors and JSON ever leave the process: nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from diffrig.errors import CheckpointError

STRUCTURE_KEY = "diffrig.tree"


def _encode(node, tensors: dict[str, torch.Tensor], path: str):
    if isinstance(node, torch.Tensor):
        key = path or "root"
        tensors[key] = node.detach().cpu().contiguous()
        return {"$tensor": key}
    if isinstance(node, tuple):
        return {"$tuple": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(node)]}
    if isinstance(node, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(node)]
    if isinstance(node, dict):
        items = [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in node.items()]
        if all(isinstance(k, str) and not k.startswith("$") for k in node):
            return dict(items)
        if not all(isinstance(k, (str, int)) for k in node):
            raise TypeError(f"cannot store dict keys of type {sorted({type(k).__name__ for k in node})} at {path!r}")
        return {"$items": items}
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    raise TypeError(f"cannot store a {type(node).__name__} at {path!r} (only tensors, containers and scalars)")


def _decode(node, tensors: dict[str, torch.Tensor]):
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if isinstance(node, dict):
        if "$tensor" in node:
            return tensors[node["$tensor"]]
        if "$tuple" in node:
            return tuple(_decode(v, tensors) for v in node["$tuple"])
        if "$items" in node:
            return {k: _decode(v, tensors) for k, v in node["$items"]}
        return {k: _decode(v, tensors) for k, v in node.items()}
    return node


def save_tree(path: str | os.PathLike, tree) -> None:
    """Write ``tree`` to ``path`` (a .safetensors file)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, tensors, "")
    save_file(tensors, str(path), metadata={STRUCTURE_KEY: json.dumps(structure)})


def load_tree(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Read a tree written by :func:`save_tree`; tensors land on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; resume from another one")
    try:
        tensors = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        structure = json.loads(metadata[STRUCTURE_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable diffrig state file ({error}); the checkpoint "
                              "is damaged: resume from another one") from None
    return _decode(structure, tensors)
