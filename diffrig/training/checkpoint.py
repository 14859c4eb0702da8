"""Training checkpoints: everything needed to continue a run exactly, written atomically, no pickle.

``<output_dir>/checkpoints/checkpoint-000500/``

- ``model/``                   the weights, a ``save_pretrained`` dir (``from_pretrained`` loads it)
- ``optimizer.safetensors``    ``optimizer.state_dict()`` (tensors + JSON structure, see ``serialization``)
- ``ema.safetensors``          shadow weights by parameter name (when EMA is on)
- ``scaler.safetensors``       fp16 gradient-scaler state (with fp16 mixed precision)
- ``rng-<rank>.safetensors``   each process's random generators
- ``trainer_state.json``       step, data position, process count, the run's configuration

A checkpoint is written into ``checkpoint-000500.tmp`` and renamed when complete, so a directory
without the suffix is always whole; ``latest`` is the highest-numbered one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError
from safetensors.torch import load_file

from diffrig.errors import CheckpointError
from diffrig.training.ema import ema_state, load_ema_state
from diffrig.training.rng import capture_rng_state, restore_rng_state
from diffrig.training.serialization import load_tree, save_tree

logger = logging.getLogger(__name__)

FORMAT = "diffrig.checkpoint/1"
STATE_FILE = "trainer_state.json"
NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := NAME.match(p.name)) and (p / STATE_FILE).is_file()]
    return [path for _, path in sorted(found)]


def resolve_resume(root: str | os.PathLike, spec: str) -> Path | None:
    """The checkpoint to resume from: ``""`` none, ``"latest"`` the newest under ``root`` (None if
    there is none yet, so the same command starts and resumes a run), otherwise a checkpoint dir."""
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(spec)
    if not (path / STATE_FILE).is_file():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")  # a checkpoints folder or a run
        hint = f"; checkpoints found there: {', '.join(str(p) for p in found)}" if found else ""
        raise CheckpointError(f"{path} is not a complete training checkpoint (no {STATE_FILE}){hint}; "
                              "pass a checkpoint-NNNNNN directory or --resume latest")
    return path


def read_trainer_state(path: str | os.PathLike) -> dict:
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {file} ({error}); resume from another checkpoint") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{file} has format {state.get('format')!r}; this diffrig reads {FORMAT!r}")
    return state


def _fsync_tree(path: Path) -> None:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb+") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(root, step: int, *, accelerator, model, optimizer, ema=None, trainer_state: dict,
                    keep: int = 0) -> Path:
    """Write a checkpoint of ``step`` under ``root`` (every process calls this), then keep the newest ``keep``.

    If any process fails to write (a full disk, say), every process raises :class:`CheckpointError`
    together, the partial folder is removed and the checkpoints already there are left as they were."""
    root = Path(root)
    final = root / checkpoint_name(step)
    staging = final.with_name(final.name + ".tmp")
    main = accelerator.is_main_process

    def make_staging():
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

    def write_parts():
        save_tree(staging / f"rng-{accelerator.process_index}.safetensors", capture_rng_state(accelerator.device))
        if main:
            _write_main_parts(staging, step, accelerator, model, optimizer, ema, trainer_state)

    def sync_to_disk():  # a full disk may only show here, when delayed writes are flushed
        if main:
            _fsync_tree(staging)

    for phase in (make_staging, write_parts, sync_to_disk):  # each ends with all processes agreeing
        failure = run_on_every_process(accelerator, phase)
        if failure is not None:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
            previous = list_checkpoints(root)
            then = (f"the newest complete checkpoint, {previous[-1]}, is untouched. Free disk space, then "
                    "continue with --resume latest" if previous else "there is no earlier checkpoint. Free "
                    "disk space, then start again")
            raise CheckpointError(
                f"could not write the checkpoint of step {step} in {root} ({failure}); {then}") from None
    if main:
        replaced = final.with_name(final.name + ".old")
        if final.exists():  # an older run's checkpoint of this step (resumed from an earlier one)
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(staging, final)
        _fsync_dir(root)
        shutil.rmtree(replaced, ignore_errors=True)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def run_on_every_process(accelerator, phase) -> str | None:
    """Run ``phase`` here; return None if it succeeded on every process, else what went wrong
    (every process returns together, so none is left waiting at a barrier)."""
    try:
        phase()
        failed = None
    except (OSError, SafetensorError) as error:
        failed = str(error)
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor([float(failed is not None)], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() == 0:
        return None
    return failed or "it failed on another process"


def _write_main_parts(staging: Path, step: int, accelerator, model, optimizer, ema, trainer_state: dict) -> None:
    """What only the main process writes: weights, optimizer, EMA, scaler, state file."""
    model.save_pretrained(staging / "model", safe_serialization=True)
    save_tree(staging / "optimizer.safetensors", optimizer.state_dict())
    if ema is not None:
        save_tree(staging / "ema.safetensors", ema_state(ema, model))
    if accelerator.scaler is not None:
        save_tree(staging / "scaler.safetensors", accelerator.scaler.state_dict())
    state = {"format": FORMAT, "step": step, "num_processes": accelerator.num_processes, **trainer_state}
    (staging / STATE_FILE).write_text(json.dumps(state, indent=2))


def prune_checkpoints(root: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (``keep=0`` keeps all)."""
    if keep <= 0:
        return
    for path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module) -> None:
    """Copy a checkpoint's weights into ``model`` in place (its layout and device are kept)."""
    file = Path(path) / "model" / SAFETENSORS_WEIGHTS_NAME
    try:
        weights = load_file(str(file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read {file} ({error}); resume from another checkpoint") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{file} holds another architecture than the model being trained: "
                              f"{str(error).splitlines()[0]}") from None


def _match_parameter_layouts(optimizer) -> None:
    """Give every per-parameter state tensor its parameter's strides (channels_last), which the
    fused and foreach optimizer kernels expect; ``load_state_dict`` restores plain contiguous ones."""
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for key, value in state.items():
                if (isinstance(value, torch.Tensor) and value.shape == parameter.shape
                        and value.stride() != parameter.stride()):
                    state[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def load_checkpoint(path, *, accelerator, model, optimizer, ema=None, restore_rng: bool = True) -> dict:
    """Restore weights, optimizer, EMA, gradient scaler and (last) this process's RNG; returns trainer state."""
    path = Path(path)
    state = read_trainer_state(path)
    load_model_weights(path, model)
    try:
        optimizer.load_state_dict(load_tree(path / "optimizer.safetensors"))
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: the optimizer state does not fit the parameters being trained "
                              f"({error}); was it written for another stage or architecture?") from None
    _match_parameter_layouts(optimizer)
    if ema is not None:
        if (path / "ema.safetensors").is_file():
            load_ema_state(ema, model, load_tree(path / "ema.safetensors"))
        else:
            logger.warning("%s has no EMA weights; the moving average restarts from the current weights", path)
    if accelerator.scaler is not None and (path / "scaler.safetensors").is_file():
        accelerator.scaler.load_state_dict(load_tree(path / "scaler.safetensors"))
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if restore_rng:
        if state.get("num_processes") == accelerator.num_processes and rng_file.is_file():
            restore_rng_state(load_tree(rng_file), accelerator.device)
        else:
            logger.warning("%s was written by %s processes, this run has %s: random streams restart "
                           "(training continues, but not bit-for-bit as the original run would have)",
                           path, state.get("num_processes"), accelerator.num_processes)
    return state
