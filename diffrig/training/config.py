"""Training configuration: one dataclass, read from YAML, overridden key by key from the command line.

Names follow the official ``scripts/train.py`` flags where one exists (``lr``, ``batch_size``,
``max_steps``, ``weight_decay``, ``num_workers``); ``model`` holds the official architecture options
(``image_size``, ``num_channels``, ``latent_dim``, ``encoder_type``, ...) of :class:`DiffusionRigModel`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffrig.errors import DiffrigError

MIXED_PRECISION = ("no", "fp16", "bf16")
TRACKERS = ("tensorboard", "none")


def setting(default, help: str):
    """A field of :class:`TrainConfig` with its ``--help`` text."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what to train on, where to write it
    stage: int = setting(1, "1: generic prior (LMDB of many faces); 2: personal prior (album LMDB)")
    data_dir: str = setting("", "LMDB dataset made by scripts/create_data.py")
    output_dir: str = setting("", "folder for checkpoints/, logs/, samples/ and the trained model/")
    init_from: str = setting("", "diffrig model dir or official model*.pt; stage 2 starts from one")
    resume: str = setting(
        "", "latest (the newest checkpoint in output_dir, if any) or a checkpoint-NNNNNN dir; empty: start fresh")
    model: dict = field(default_factory=dict, metadata={"help": "DiffusionRigModel options, official names"})

    # diffusion objective (official: 1000 linear-β steps, P2 weighting γ = k = 1)
    num_train_timesteps: int = setting(1000, "diffusion steps of the linear beta schedule")
    p2_gamma: float = setting(1.0, "P2 loss weighting gamma (0 turns the weighting off)")
    p2_k: float = setting(1.0, "P2 loss weighting k")

    # optimisation (official: Adam, constant lr, gradient norm clipped at 1.0)
    lr: float = setting(1e-4, "learning rate, constant (paper: 1e-4 stage 1, 1e-5 stage 2)")
    weight_decay: float = setting(0.0, "Adam weight decay")
    adam_beta1: float = setting(0.9, "Adam beta1")
    adam_beta2: float = setting(0.999, "Adam beta2")
    adam_eps: float = setting(1e-8, "Adam epsilon")
    batch_size: int = setting(32, "photos per step and process")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    max_steps: int = setting(50000, "optimizer steps in all; 0 trains until stopped")
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this; 0 turns clipping off")
    freeze_encoder: bool = setting(False, "stage 2: only the UNet learns")
    freeze_encoder_batchnorm: bool = setting(False, "also hold the frozen encoder's BatchNorm statistics")
    ema: bool = setting(False, "keep an exponential moving average of the weights (written as model_ema/)")
    ema_decay: float = setting(0.9999, "EMA decay per step")
    seed: int = setting(0, "seed of timesteps, noise, dropout and data order")

    # precision and speed
    mixed_precision: str = setting("bf16", "no, fp16 or bf16")
    channels_last: bool = setting(True, "channels-last memory layout (faster convolutions on GPUs)")
    compile: bool = setting(False, "torch.compile the model and loss")
    compile_mode: str = setting("default", "torch.compile mode: default, reduce-overhead, max-autotune, ...")
    fast_compile: bool = setting(
        False, "with compile: skip Inductor's kernel tuning and loop reordering (shorter compilation, same step time)")
    cuda_graph: bool = setting(
        False, "without compile, on one GPU: record the whole training step once as a CUDA graph and replay it")
    fused_norm: bool = setting(
        False, "without compile, on CUDA: GroupNorm, FiLM, SiLU and dropout as diffrig's Triton kernels")
    activation_memory_budget: float = setting(
        1.0, "with compile: below 1 recomputes cheap ops to keep fewer activations")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass to save memory")
    fused_optimizer: bool = setting(True, "fused Adam kernel (also skips a non-finite step on the device)")
    allow_tf32: bool = setting(True, "TF32 for float32 matrix products and convolutions (Ampere and newer GPUs)")
    num_workers: int = setting(4, "data loader processes (stage 2 holds the album on the device)")

    # bookkeeping
    log_every: int = setting(10, "steps between logged scalars (loss, grad_norm, images_per_s)")
    host_sync_every: int = setting(10, "steps between reading losses back (the GPU runs ahead in between)")
    checkpoint_every: int = setting(5000, "steps between checkpoints; 0: only at the end (and on a stop signal)")
    keep_checkpoints: int = setting(2, "checkpoints kept, the newest; 0 keeps all")
    sample_every: int = setting(1000, "steps between sample grids; 0: none")
    sample_count: int = setting(8, "photos in the sample grid")
    sample_steps: int = setting(20, "DDIM steps of each sample grid")
    max_nonfinite_steps: int = setting(5, "consecutive skipped steps before training stops")
    tracker: str = setting("tensorboard", "tensorboard or none")

    def validate(self) -> TrainConfig:
        """Check values a run cannot start with; raises DiffrigError naming the setting."""
        problems = []
        if self.stage not in (1, 2):
            problems.append(f"stage must be 1 or 2, got {self.stage}")
        if self.mixed_precision not in MIXED_PRECISION:
            problems.append(f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {self.mixed_precision!r}")
        if self.tracker not in TRACKERS:
            problems.append(f"tracker must be one of {', '.join(TRACKERS)}, got {self.tracker!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "sample_count", "sample_steps",
                     "max_nonfinite_steps", "log_every", "host_sync_every", "num_train_timesteps"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "checkpoint_every", "keep_checkpoints", "sample_every", "num_workers",
                     "max_grad_norm", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if not 0.0 < self.activation_memory_budget <= 1.0:
            problems.append(f"activation_memory_budget must be in (0, 1], got {self.activation_memory_budget}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.cuda_graph and self.compile:
            problems.append("cuda_graph and compile exclude each other: compile_mode reduce-overhead is "
                            "torch.compile's own CUDA graphs")
        if self.fused_norm and self.compile:
            problems.append("fused_norm and compile exclude each other: torch.compile fuses the norms itself")
        if self.cuda_graph and (self.mixed_precision == "fp16" or self.ema or not self.fused_optimizer):
            problems.append("cuda_graph needs mixed_precision bf16 or no, ema false and fused_optimizer true "
                            "(a step must be decided on the GPU)")
        if not isinstance(self.model, dict):
            problems.append("model must be a mapping of architecture options (image_size: 256, ...)")
        if problems:
            raise DiffrigError("invalid training configuration: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """A YAML or command-line value as the field's type ("1e-4" -> 1e-4, "false" -> False)."""
    kind = type(getattr(TrainConfig(), name))
    if name == "model":
        if not isinstance(value, dict):
            raise DiffrigError(f"model must be a mapping of architecture options, got {value!r}")
        return dict(value)
    if value is None and kind is str:
        return ""
    try:
        if kind is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in ("true", "yes", "1", "on"):
                    return True
                if lowered in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            if isinstance(value, (bool, int)):
                return bool(value)
            raise ValueError(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise DiffrigError(f"{name} must be a {kind.__name__}, got {value!r}") from None


def config_from_dict(values: dict) -> TrainConfig:
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise DiffrigError(f"unknown training setting(s) {', '.join(unknown)}; valid settings: {', '.join(FIELDS)}")
    return TrainConfig(**{name: _coerce(name, value) for name, value in values.items()})


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """The defaults, updated by the YAML file at ``path`` and then by ``overrides``.

    ``overrides`` may hold ``model`` as a mapping: its keys update the file's model options one by one.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DiffrigError(f"config file {path} not found")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise DiffrigError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise DiffrigError(f"{path} must hold a mapping of settings, not a {type(loaded).__name__}")
        values.update(loaded or {})
    for name, value in (overrides or {}).items():
        if name == "model" and isinstance(values.get("model"), dict) and isinstance(value, dict):
            values["model"] = {**values["model"], **value}
        else:
            values[name] = value
    return config_from_dict(values).validate()


def save_config(config: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
