"""The pieces of a training run and its optimisation step, shared by the trainer and the speed benchmark.

One step: for each micro-batch draw timesteps and noise, compute the P2-weighted loss and
backpropagate (gradients synchronised on the last micro-batch only); clip the gradient norm; agree
across processes on the mean loss, whether any process saw a non-finite loss and whether any was
asked to stop (one all-reduce of four numbers); then either take the optimizer (and EMA) step or,
after a non-finite loss, drop the gradients and put back the BatchNorm statistics that the forward
pass moved, so that a skipped step leaves no trace.

With a fused Adam and neither a gradient scaler nor EMA, that choice is made on the device (the
fused kernel's ``found_inf`` input skips the update; the statistics are put back with
``torch.where``), so a step never waits for the GPU: its :class:`StepStats` are read back later,
many steps at once (:meth:`StepStats.read_all`). Otherwise the step reads its stats at once.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from torch._functorch import config as functorch_config
from torch._inductor import list_mode_options

from diffrig.diffusion import NoiseSchedule, make_schedule
from diffrig.errors import DiffrigError
from diffrig.models import DiffusionRigModel
from diffrig.training.config import TrainConfig
from diffrig.training.ema import create_ema
from diffrig.training.objective import DiffusionObjective

logger = logging.getLogger(__name__)

# Inductor options that cut compile time, which a stage-2 run (5000 short steps) is much of. Stage 2
# on an H200, cold cache: first step 184 s with pointwise tuning off alone, 138 s with both off, at
# 0.0332 and 0.0331 s/step; the whole 5000-step train() went from 6.7 to 5.8 minutes.
FAST_COMPILE_OPTIONS = {"triton.autotune_pointwise": False, "loop_ordering_after_fusion": False}


def allow_cached_custom_functions() -> None:
    """Let AOTAutograd's on-disk cache hold graphs with custom autograd functions.

    Torch leaves such graphs out of that cache by default, because a custom function could depend
    on Python state that its traced graph does not show. The one in our model
    (:func:`diffrig.models.blocks.concat_channels`) is pure tensor code, traced whole into the
    graph that the cache key hashes. Without this, a run whose Inductor cache is warm (a second
    stage-2 fine-tune on the same machine) still re-traces and re-partitions the whole joint graph.
    """
    if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):  # absent from older torch
        functorch_config.autograd_cache_allow_custom_autograd_functions = True


# Inductor options for long runs. Inductor stores a pointwise result that several kernels read once its
# expression exceeds 30 operations (realize_opcount_threshold); with 100, more of the GroupNorm, FiLM
# and SiLU chains stay inlined. A stage-1 step (256², batch 32, H200, both built in one process) took
# 174.0 rather than 178.7 ms of device time: 175.4 vs 171.1 images/s. (GroupNorm's float32
# pre-activation is still stored in the backward pass: it reads more than 4 buffers, another threshold,
# whose raising measured slower.)
STEP_COMPILE_OPTIONS = {"realize_opcount_threshold": 100}


def mode_options(mode: str) -> dict:
    """The Inductor options that torch.compile ``mode`` stands for (``triton.cudagraphs``: it makes CUDA
    graphs of its own); an unknown mode raises DiffrigError."""
    try:
        return dict(list_mode_options(mode))
    except (KeyError, RuntimeError):  # torch words an unknown mode as a RuntimeError from a KeyError
        raise DiffrigError(f"unknown compile_mode {mode!r}: use default, reduce-overhead, max-autotune, "
                           "max-autotune-no-cudagraphs") from None


def compile_options(mode: str, fast: bool) -> dict:
    """The Inductor options of torch.compile ``mode``, with :data:`FAST_COMPILE_OPTIONS` when ``fast``,
    else with :data:`STEP_COMPILE_OPTIONS`."""
    return {**mode_options(mode), **(FAST_COMPILE_OPTIONS if fast else STEP_COMPILE_OPTIONS)}


class StepStats:
    """One step's outcome, agreed across processes, kept on the device until first read:
    ``loss`` (mean over micro-batches and processes; nan when non-finite), ``grad_norm`` (before
    clipping; 0 when clipping is off), ``nonfinite`` (some process saw a non-finite loss: the step
    was skipped), ``stop`` (some process was asked to stop)."""

    def __init__(self, summed: torch.Tensor, world: int):
        self._summed, self._world, self._host = summed, world, None  # (4,): loss, nonfinite, stop, grad_norm

    @staticmethod
    def read_all(stats: list[StepStats]) -> None:
        """Copy every pending value to the host with one synchronisation."""
        pending = [s for s in stats if s._host is None]
        if pending:
            for s, values in zip(pending, torch.stack([s._summed for s in pending]).tolist()):
                s._host = values

    def _values(self) -> list[float]:
        if self._host is None:
            StepStats.read_all([self])
        return self._host

    @property
    def loss(self) -> float:
        return self._values()[0] / self._world

    @property
    def nonfinite(self) -> bool:
        return self._values()[1] > 0

    @property
    def stop(self) -> bool:
        return self._values()[2] > 0

    @property
    def grad_norm(self) -> float:
        return self._values()[3] / self._world


@dataclass
class TrainingParts:
    model: DiffusionRigModel  # the plain module (weights, sampling, saving)
    objective: torch.nn.Module  # DiffusionObjective as prepared by Accelerate (DDP, autocast)
    optimizer: torch.optim.Optimizer  # as prepared by Accelerate
    ema: EMAModel | None
    schedule: NoiseSchedule
    step: TrainStep | GraphedStep


class TrainStep:
    def __init__(self, accelerator: Accelerator, objective, optimizer, model, ema, config: TrainConfig):
        self.accelerator, self.objective, self.optimizer, self.model, self.ema = (
            accelerator, objective, optimizer, model, ema)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        # BatchNorm statistics change in the forward pass; a skipped step puts them back
        self.buffers = [b for b in model.buffers() if b.is_floating_point() or b.dtype == torch.long]
        self.buffer_snapshot = [b.clone() for b in self.buffers]
        self.max_grad_norm = config.max_grad_norm
        self.num_train_timesteps = config.num_train_timesteps
        if config.compile:
            # the min-cut partitioner's trade of recomputation for activation memory (1.0: its default)
            functorch_config.activation_memory_budget = config.activation_memory_budget
            allow_cached_custom_functions()
        options = compile_options(config.compile_mode, config.fast_compile) if config.compile else {}
        self.forward = torch.compile(objective, options=options) if config.compile else objective
        self.mark_cuda_graph_step = bool(options.get("triton.cudagraphs"))
        fused = getattr(optimizer, "optimizer", optimizer).defaults.get("fused")
        self.skip_on_device = bool(fused) and accelerator.scaler is None and ema is None

    def __call__(self, micro_batches: list[dict], stop_requested: bool = False) -> StepStats:
        summed = self.summed_stats(micro_batches, stop_requested)
        stats = StepStats(summed, self.accelerator.num_processes)
        if not self.skip_on_device:
            self._step_or_skip_on_host(stats)
        return stats

    def summed_stats(self, micro_batches: list[dict], stop_requested: bool | torch.Tensor) -> torch.Tensor:
        """The step itself; returns the (4,) statistics summed over processes (see :class:`StepStats`).
        With ``skip_on_device`` the update is applied or skipped here too, else by the caller.
        ``stop_requested`` may be a float tensor on the device (1: asked to stop)."""
        accelerator = self.accelerator
        if self.mark_cuda_graph_step:
            torch.compiler.cudagraph_mark_step_begin()
        if self.buffers:
            torch._foreach_copy_(self.buffer_snapshot, self.buffers)
        total = torch.zeros((), device=accelerator.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            image = batch["image"]
            timesteps = torch.randint(0, self.num_train_timesteps, (image.shape[0],), device=image.device)
            noise = torch.randn_like(image)
            with contextlib.nullcontext() if last else accelerator.no_sync(self.objective):
                loss = self.forward(image, batch["buffers"], timesteps, noise).mean()
                accelerator.backward(loss / len(micro_batches))
            total += loss.detach().float()
        if self.max_grad_norm > 0:
            grad_norm = accelerator.clip_grad_norm_(self.trainable, self.max_grad_norm).float()
        else:
            grad_norm = torch.zeros((), device=accelerator.device)
        mean_loss = total / len(micro_batches)
        if not isinstance(stop_requested, torch.Tensor):
            stop_requested = torch.full((), float(stop_requested), device=accelerator.device)
        local = torch.stack([mean_loss, (~torch.isfinite(mean_loss)).float(), stop_requested, grad_norm])
        summed = accelerator.reduce(local, reduction="sum")
        if self.skip_on_device:
            self._step_or_skip_on_device(summed[1] > 0)
        return summed

    def _step_or_skip_on_host(self, stats: StepStats) -> None:
        """The optimizer (and EMA) step, or after a non-finite loss none and the BatchNorm statistics put
        back, decided from ``stats`` read back at once."""
        if stats.nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.buffers:
                torch._foreach_copy_(self.buffers, self.buffer_snapshot)
            scaler = self.accelerator.scaler
            if scaler is not None:  # forget this step's unscale and back the scale off, as an overflow would
                scaler.update(new_scale=scaler.get_scale() * scaler.get_backoff_factor())
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.step(self.model.parameters())

    def _step_or_skip_on_device(self, skip: torch.Tensor) -> None:
        """The optimizer step, or (``skip``: a bool tensor on the device) none and the BatchNorm
        statistics put back, decided without a host synchronisation."""
        getattr(self.optimizer, "optimizer", self.optimizer).found_inf = skip.float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for buffer, saved in zip(self.buffers, self.buffer_snapshot):
            buffer.copy_(torch.where(skip, saved, buffer))


class GraphedStep:
    """A :class:`TrainStep`, same call, replayed as one CUDA graph.

    At batch 4 (stage 2) an eager step takes longer to launch its few thousand kernels than the GPU
    takes to run them; a replayed graph launches them all at once. The first ``warmup`` calls run
    eagerly on a side stream (cuDNN chooses its algorithms, Triton compiles, Adam creates its state),
    the next records the step on static copies of its inputs and every call from then on copies its
    batch in and replays. Timesteps, noise and dropout masks are drawn inside the graph from the CUDA
    generator, which moves on at each replay as it would eagerly. A batch of another shape runs eagerly.
    """

    def __init__(self, step: TrainStep, warmup: int = 3):
        self.step, self.warmup, self.calls = step, warmup, 0
        self.stream = torch.cuda.Stream(step.accelerator.device)
        self.stop_flag = torch.zeros((), device=step.accelerator.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[dict] = []
        self.outputs: torch.Tensor | None = None

    def __call__(self, micro_batches: list[dict], stop_requested: bool = False) -> StepStats:
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            return self._on_side_stream(lambda: self.step(micro_batches, stop_requested))
        if self.graph is None:
            self._record(micro_batches)
        elif not self._fits(micro_batches):
            return self.step(micro_batches, stop_requested)
        for static, batch in zip(self.inputs, micro_batches):
            for key, value in static.items():
                value.copy_(batch[key])
        self.stop_flag.fill_(float(stop_requested))
        self.graph.replay()
        return StepStats(self.outputs.clone(), self.step.accelerator.num_processes)

    def _on_side_stream(self, run):
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            result = run()
        current.wait_stream(self.stream)
        return result

    def _fits(self, micro_batches: list[dict]) -> bool:
        return len(micro_batches) == len(self.inputs) and all(
            batch[key].shape == value.shape and batch[key].dtype == value.dtype
            and batch[key].stride() == value.stride()
            for static, batch in zip(self.inputs, micro_batches) for key, value in static.items())

    def _record(self, micro_batches: list[dict]) -> None:
        self.inputs = [{key: value.clone() for key, value in batch.items() if isinstance(value, torch.Tensor)}
                       for batch in micro_batches]
        groups = self.step.optimizer.param_groups
        capturable = [group.get("capturable", False) for group in groups]
        for group in groups:  # Adam refuses to be recorded otherwise; the recorded kernels are the same
            group["capturable"] = True
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
                self.outputs = self.step.summed_stats(self.inputs, self.stop_flag)
        finally:
            for group, value in zip(groups, capturable):
                group["capturable"] = value


def build_training(config: TrainConfig, accelerator: Accelerator, model: DiffusionRigModel) -> TrainingParts:
    """Freeze, lay out and place ``model``, make the optimizer, EMA and objective, let Accelerate wrap them."""
    if config.freeze_encoder:
        model.freeze_encoder(True, freeze_batchnorm=config.freeze_encoder_batchnorm)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.enable_fused_norm(config.fused_norm)
    model.train()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device=accelerator.device, memory_format=memory_format)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2),
                                 eps=config.adam_eps, weight_decay=config.weight_decay,
                                 fused=config.fused_optimizer or None)
    ema = create_ema(model, config.ema_decay) if config.ema else None
    schedule = make_schedule(config.num_train_timesteps, config.p2_gamma, config.p2_k)
    objective, optimizer = accelerator.prepare(DiffusionObjective(model, schedule), optimizer)
    step = TrainStep(accelerator, objective, optimizer, model, ema, config)
    if config.cuda_graph:
        step = graphed(step)
    return TrainingParts(model, objective, optimizer, ema, schedule, step)


def graphed(step: TrainStep) -> TrainStep | GraphedStep:
    """``step`` replayed as a CUDA graph where it can be (one CUDA process, decided on the device), else
    ``step`` itself, with a warning saying why."""
    accelerator = step.accelerator
    reason = None
    if accelerator.device.type != "cuda":
        reason = f"training runs on {accelerator.device.type}, not CUDA"
    elif accelerator.num_processes > 1:
        reason = f"{accelerator.num_processes} processes (CUDA graphs are used by one alone)"
    elif not step.skip_on_device:
        reason = "the step is decided on the host (fp16 loss scaling, EMA or an unfused optimizer)"
    if reason is None:
        return GraphedStep(step)
    logger.warning("cuda_graph: %s; the step runs eagerly", reason)
    return step
