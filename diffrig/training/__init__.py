"""Accelerate trainer for stage 1 (generic prior) and stage 2 (personal prior)."""

from diffrig.training.checkpoint import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from diffrig.training.config import TrainConfig, load_config
from diffrig.training.trainer import NonFiniteLossError, TrainingResult, train

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "TrainingResult",
    "list_checkpoints",
    "load_checkpoint",
    "load_config",
    "resolve_resume",
    "save_checkpoint",
    "train",
]
