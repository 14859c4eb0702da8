"""The training loop of both stages, on Accelerate.

    result = train(load_config("configs/stage1_256.yaml", {"data_dir": ..., "output_dir": ...}))

Writes under ``output_dir``: ``config.yaml`` (the settings used), ``checkpoints/`` (see
:mod:`diffrig.training.checkpoint`), ``logs/`` (TensorBoard), ``samples/step-NNNNNN.png`` and, when
``max_steps`` is reached, ``model/`` (and ``model_ema/`` with EMA), ``save_pretrained`` dirs.

A step counts whether it was applied or skipped (non-finite loss): either way it consumed its
batch, so the data position and the step number stay in lockstep. The GPU runs ahead of the loop:
losses are read back every ``host_sync_every`` steps (and before logging, sampling or saving), and
a stop signal or a run of non-finite losses is acted on at the next such step: on SIGTERM/SIGINT
training goes on to it, writes a checkpoint and :func:`train` returns with ``interrupted=True``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import is_tensorboard_available, set_seed
from torchvision.utils import save_image
from tqdm.auto import tqdm

from diffrig.diffusion import seeded_noise
from diffrig.errors import CheckpointError, DiffrigError
from diffrig.models import DiffusionRigModel
from diffrig.training.checkpoint import (
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    resolve_resume,
    run_on_every_process,
    save_checkpoint,
)
from diffrig.training.config import TrainConfig, save_config
from diffrig.training.data import close_dataset, fixed_batch, make_batches, open_training_dataset, stream_batches
from diffrig.training.ema import ema_weights
from diffrig.training.model_source import load_model, new_model
from diffrig.training.samples import sample_grid
from diffrig.training.signals import StopRequest
from diffrig.training.step import StepStats, build_training

logger = logging.getLogger(__name__)


class NonFiniteLossError(DiffrigError):
    """The loss stayed non-finite for too many consecutive steps; a checkpoint was written first."""


@dataclass
class TrainingResult:
    step: int  # the step reached
    losses: list[float] = field(default_factory=list)  # each step's mean loss in this call (nan: skipped)
    interrupted: bool = False  # stopped by a signal before max_steps
    checkpoint: Path | None = None  # the last checkpoint written
    model_dir: Path | None = None  # the final save_pretrained dir (when max_steps was reached)


def make_accelerator(config: TrainConfig, with_tracker: bool = True) -> Accelerator:
    log_with = None
    if with_tracker and config.tracker == "tensorboard":
        if is_tensorboard_available():
            log_with = "tensorboard"
        else:
            logger.warning("tensorboard is not installed (pip install tensorboard): training without logs")
    try:
        accelerator = Accelerator(
            mixed_precision=config.mixed_precision, log_with=log_with, project_dir=config.output_dir or None,
            kwargs_handlers=[DistributedDataParallelKwargs(gradient_as_bucket_view=True)])
    except (ValueError, RuntimeError) as error:
        raise DiffrigError(f"cannot set up training with mixed_precision={config.mixed_precision!r}: {error}") from None
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.allow_tf32 = config.allow_tf32
        torch.backends.cudnn.benchmark = True
    return accelerator


def _initial_model(config: TrainConfig, resume_dir: Path | None) -> DiffusionRigModel:
    if resume_dir is not None:  # weights follow in load_checkpoint
        return DiffusionRigModel.from_config(DiffusionRigModel.load_config(resume_dir / "model"))
    if config.init_from:
        return load_model(config.init_from, config.model)
    return new_model(config.model)


def _check_paths(config: TrainConfig) -> None:
    if not config.data_dir:
        raise DiffrigError("no data_dir: pass the LMDB dataset made by scripts/create_data.py")
    if not config.output_dir:
        raise DiffrigError("no output_dir: pass a directory for checkpoints, logs and the trained model")


def _export(model, directory: Path) -> Path:
    """``save_pretrained`` into ``directory`` atomically (staged, then renamed over any older one)."""
    staging, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, safe_serialization=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _flat(config: TrainConfig) -> dict:
    values = {k: v for k, v in config.to_dict().items() if k != "model"}
    values.update({f"model.{k}": v for k, v in config.model.items()})
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in values.items()}


def train(config: TrainConfig, progress: bool = True) -> TrainingResult:
    """Run (or continue) training as configured; see the module docstring for what is written.
    ``progress``: a progress bar on the main process."""
    config.validate()
    _check_paths(config)
    accelerator = make_accelerator(config)
    checkpoints = Path(config.output_dir) / "checkpoints"
    earlier = list_checkpoints(checkpoints)
    if not config.resume and earlier:  # starting at step 0 here would mix two runs' checkpoints
        raise DiffrigError(f"{config.output_dir} already holds an earlier run (newest: {earlier[-1].name}); "
                           "continue it with --resume latest, or choose another --output_dir")
    resume_dir = resolve_resume(checkpoints, config.resume)
    if config.stage == 2 and resume_dir is None and not config.init_from:
        raise DiffrigError("stage 2 fine-tunes a trained model: pass --model_path (a diffrig model "
                           "directory or an official model*.pt)")
    resumed = read_trainer_state(resume_dir) if resume_dir else None
    set_seed(config.seed, device_specific=True)  # per-process timesteps, noise and dropout
    model = _initial_model(config, resume_dir)
    dataset = open_training_dataset(config.stage, config.data_dir, model.config.image_size)
    try:
        return _run(config, accelerator, model, dataset, resume_dir, resumed, progress)
    finally:
        close_dataset(dataset)
        accelerator.end_training()


def _run(config, accelerator, model, dataset, resume_dir, resumed, show_progress: bool) -> TrainingResult:
    """The loop, once the run's model and data are open."""
    output = Path(config.output_dir)
    checkpoints = output / "checkpoints"
    main = accelerator.is_main_process
    parts = build_training(config, accelerator, model)

    per_step = config.batch_size * config.gradient_accumulation_steps  # indices per process per step
    start_step, consumed, streak = 0, 0, 0
    if resumed:
        start_step, streak = resumed["step"], resumed.get("nonfinite_streak", 0)
        consumed = resumed["consumed"] * resumed["num_processes"] // accelerator.num_processes
    batches = stream_batches(
        dataset, make_batches(dataset, accelerator.process_index, accelerator.num_processes, config.batch_size,
                              config.seed, consumed),
        accelerator.device, config.num_workers, config.channels_last)
    if resume_dir:  # after the data stream exists: restoring the RNG must be the last draw-affecting act
        load_checkpoint(resume_dir, accelerator=accelerator, model=model, optimizer=parts.optimizer, ema=parts.ema)
        if main:
            logger.info("resumed from %s at step %d", resume_dir, start_step)

    if main:
        output.mkdir(parents=True, exist_ok=True)
        save_config(config, output / "config.yaml")
    if accelerator.log_with:
        accelerator.init_trackers("logs", config=_flat(config))
    if main and config.sample_every:
        validation = fixed_batch(dataset, config.sample_count, accelerator.device)
        validation_noise = seeded_noise(validation["image"].shape, config.seed, accelerator.device)

    step = start_step
    result = TrainingResult(step=step, checkpoint=resume_dir)

    def save() -> Path:
        trainer_state = {"consumed": consumed + (step - start_step) * per_step, "nonfinite_streak": streak,
                         "batch_size": config.batch_size,
                         "gradient_accumulation_steps": config.gradient_accumulation_steps,
                         "config": config.to_dict()}
        result.checkpoint = save_checkpoint(checkpoints, step, accelerator=accelerator, model=model,
                                            optimizer=parts.optimizer, ema=parts.ema, trainer_state=trainer_state,
                                            keep=config.keep_checkpoints)
        return result.checkpoint

    progress = tqdm(total=config.max_steps or None, initial=step, disable=not (main and show_progress),
                    dynamic_ncols=True, desc=f"stage {config.stage}")
    window = {"loss": [], "grad_norm": [], "skipped": 0, "start": time.perf_counter(), "steps": 0}
    pending: list[tuple[int, StepStats]] = []  # steps whose stats are still on the device
    with StopRequest() as stop, progress:
        while config.max_steps == 0 or step < config.max_steps:
            stats = parts.step([next(batches) for _ in range(config.gradient_accumulation_steps)], stop.requested)
            step += 1
            progress.update(1)
            pending.append((step, stats))
            if not _read_back_due(config, step):
                continue
            StepStats.read_all([stats for _, stats in pending])
            stop_seen = False
            for at, stats in pending:
                result.losses.append(stats.loss)
                stop_seen |= stats.stop
                window["steps"] += 1
                if not stats.nonfinite:
                    streak = 0
                    window["loss"].append(stats.loss)
                    window["grad_norm"].append(stats.grad_norm)
                    continue
                streak += 1
                window["skipped"] += 1
                if main:
                    logger.warning("step %d: non-finite loss (%s); optimizer step skipped (%d in a row, "
                                   "stopping at %d)", at, stats.loss, streak, config.max_nonfinite_steps)
                if streak >= config.max_nonfinite_steps:
                    path = save()
                    raise NonFiniteLossError(
                        f"the loss was not finite for {streak} consecutive steps (steps {at - streak + 1} to "
                        f"{at}), which were skipped; the weights of step {step} are saved in {path}. Lower lr, "
                        "use mixed_precision bf16 or no, or check the data for NaN/Inf values")
            pending.clear()

            if step % config.log_every == 0:
                elapsed = time.perf_counter() - window["start"]
                logs = {"loss": _mean(window["loss"]), "lr": parts.optimizer.param_groups[0]["lr"],
                        "skipped_steps": window["skipped"],
                        "images_per_s": window["steps"] * per_step * accelerator.num_processes / max(elapsed, 1e-9)}
                if config.max_grad_norm > 0:
                    logs["grad_norm"] = _mean(window["grad_norm"])
                accelerator.log(logs, step=step)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
                window = {"loss": [], "grad_norm": [], "skipped": 0, "start": time.perf_counter(), "steps": 0}

            if main and config.sample_every and step % config.sample_every == 0:
                _write_samples(accelerator, parts, validation, validation_noise, config, output, step)

            if stop_seen and (config.max_steps == 0 or step < config.max_steps):
                save()
                result.interrupted = True
                if main:
                    logger.debug("stopped by %s at step %d; continue with --resume latest (%s)",
                                 stop.signal_name or "a signal", step, result.checkpoint)
                break
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                save()

    result.step = step
    if not result.interrupted:
        if result.checkpoint is None or result.checkpoint.name != checkpoint_name(step):
            save()

        def export_models():
            if main:
                _export(model, output / "model")
                if parts.ema is not None:
                    with ema_weights(parts.ema, model):
                        _export(model, output / "model_ema")

        failure = run_on_every_process(accelerator, export_models)
        if failure is not None:
            raise CheckpointError(f"could not write the trained model to {output} ({failure}); the same "
                                  f"weights are in {result.checkpoint / 'model'}")
        if main:
            logger.debug("training finished at step %d; model written to %s", step, output / "model")
        result.model_dir = output / "model"
    return result


def _read_back_due(config: TrainConfig, step: int) -> bool:
    """Whether the steps run so far are read back now: at the same steps on every process (so that
    all of them act on a stop or a run of non-finite losses together), and before anything that
    logs or saves them."""
    return (step % config.host_sync_every == 0 or step % config.log_every == 0 or step == config.max_steps
            or any(every and step % every == 0 for every in (config.checkpoint_every, config.sample_every)))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _write_samples(accelerator, parts, validation, noise, config, output: Path, step: int) -> None:
    with ema_weights(parts.ema, parts.model):
        grid = sample_grid(parts.model, validation, noise, parts.schedule, config.sample_steps, accelerator.autocast)
    (output / "samples").mkdir(parents=True, exist_ok=True)
    save_image(grid, output / "samples" / f"step-{step:06d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": grid[None]}, step=step)
