"""Training throughput and peak memory of diffrig's trainer step, optionally beside the official code.

Step mode (default) times ``diffrig.training``'s own optimisation step (the one ``train()`` runs:
P2 loss, backward, clipping, agreement on the loss across processes, Adam, optional EMA) on
synthetic batches already on the device, after ``--warmup`` steps (which include compilation).
``--official_repo PATH`` builds the official DiffusionRig model from a checkout of
adobe-research/diffusion-rig and times its ``TrainLoop`` step in the same process (fp16 autocast,
GradScaler, Adam, clipping at 1.0, the per-step loss logging; without DDP on one GPU), then
prints the ratios. End-to-end mode (``--end_to_end``) runs ``train()`` itself on a synthetic
LMDB (an album for stage 2) and reports the wall time, checkpoints and sample grids included.
With compilation on, both modes also report where the compilation time went (``compile_phases_s``:
torch.compile's timed phases, which nest).

    # stage 1, the paper's 256² settings, batch 32, one GPU:
    python benchmarks/train_speed.py --preset paper --official_repo ../diffusion-rig
    # stage 2 (batch 4, encoder frozen): step time, then the whole 5000-step run
    python benchmarks/train_speed.py --preset paper --stage 2 --official_repo ../diffusion-rig
    python benchmarks/train_speed.py --preset paper --stage 2 --end_to_end --max_steps 5000
    # variants: --compile false, --compile_mode max-autotune-no-cudagraphs, --activation_memory_budget 0.5,
    #           --gradient_checkpointing true, --compile false --cuda_graph true --fused_norm true
    # where the device time goes (per kernel, after the timing): --profile 5
    # on a CPU, in seconds:
    python benchmarks/train_speed.py --preset tiny
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffrig.cliargs import str2bool as _bool
from diffrig.training.config import load_config
from diffrig.training.model_source import new_model
from diffrig.training.step import build_training
from diffrig.training.trainer import make_accelerator, train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = {("paper", 1): "stage1_256.yaml", ("paper", 2): "stage2_256.yaml",
           ("tiny", 1): "tiny_cpu.yaml", ("tiny", 2): "tiny_cpu.yaml"}
OVERRIDABLE = {"batch_size": int, "mixed_precision": str, "compile": _bool, "compile_mode": str,
               "channels_last": _bool, "activation_memory_budget": float, "gradient_checkpointing": _bool, "fused_optimizer": _bool, "ema": _bool,
               "gradient_accumulation_steps": int, "max_steps": int, "fast_compile": _bool, "cuda_graph": _bool,
               "fused_norm": _bool}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_gib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def synthetic_batch(batch_size: int, size: int, device, channels_last: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return {"image": (torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1).to(device).contiguous(memory_format=layout),
            "buffers": torch.rand(batch_size, 9, size, size, generator=g).to(device).contiguous(memory_format=layout)}


def time_steps(run_step, device, warmup: int, steps: int) -> dict:
    reset_memory(device)
    start = time.perf_counter()
    for _ in range(warmup):
        run_step()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        run_step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    return {"warmup_s": warmup_s, "s_per_step": elapsed / steps, **memory_gib(device)}


def compile_phases(min_seconds: float = 1.0) -> dict:
    """Seconds spent so far in torch.compile's timed phases (Dynamo, AOTAutograd, Inductor) of at least
    ``min_seconds``, longest first. The timers nest: a phase's time includes the phases it calls."""
    names, values = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    phases = {name: round(float(value), 1) for name, value in zip(names, values) if float(value) >= min_seconds}
    return dict(sorted(phases.items(), key=lambda item: -item[1]))


def kernel_profile(run, device, calls: int, top: int = 25) -> dict:
    """Where the device time of ``run()`` goes: over ``calls`` profiled calls, the total per call and
    the ``top`` kernels taking the most (self time in milliseconds per call; CPU operators on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            run()
        synchronize(device)
    rows = [(event.key, (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3 / calls,
             event.count / calls) for event in prof.key_averages()]
    rows.sort(key=lambda row: -row[1])
    return {"calls": calls, "total_ms_per_call": round(sum(row[1] for row in rows), 3),
            "top": [{"name": name[:160], "ms_per_call": round(ms, 3), "launches_per_call": count}
                    for name, ms, count in rows[:top]]}


def bench_ours(config, warmup: int, steps: int, profile_steps: int = 0) -> dict:
    accelerator = make_accelerator(config, with_tracker=False)
    torch.manual_seed(0)
    parts = build_training(config, accelerator, new_model(config.model))
    batch = synthetic_batch(config.batch_size, config.model["image_size"], accelerator.device, config.channels_last)
    micro = [batch] * config.gradient_accumulation_steps
    result = time_steps(lambda: parts.step(micro), accelerator.device, warmup, steps)
    if profile_steps:
        result["profile"] = kernel_profile(lambda: parts.step(micro), accelerator.device, profile_steps)
    if config.compile:
        result["compile_phases_s"] = compile_phases()
    del parts
    torch._dynamo.reset()
    reset_memory(accelerator.device)
    return result


def bench_official(repo: Path, config, warmup: int, steps: int) -> dict:
    """The official TrainLoop.run_step, rebuilt from the user's checkout (one process, no DDP)."""
    sys.path.insert(0, str(repo))
    from diffusion.resample import create_named_schedule_sampler
    from utils.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    options = model_and_diffusion_defaults()
    options.update({k: v for k, v in config.model.items() if k in options})
    options.update(p2_weight=True, p2_gamma=config.p2_gamma, p2_k=config.p2_k,
                   diffusion_steps=config.num_train_timesteps)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, diffusion = create_model_and_diffusion(**options)
    model.to(device).train()
    if config.stage == 2:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("denoisingUNet."))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    sampler = create_named_schedule_sampler("uniform", diffusion)
    batch = synthetic_batch(config.batch_size, config.model["image_size"], device, channels_last=False)

    def run_step():
        optimizer.zero_grad()
        t, weights = sampler.sample(batch["image"].shape[0], device)
        with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            losses = diffusion.training_losses(model, batch["image"], t,
                                               model_kwargs={"physic_cond": batch["buffers"], "x_start": batch["image"]})
            loss = (losses["loss"] * weights).mean()
        for values in losses.values():  # log_loss_dict: one .item() per loss term
            (values * weights).mean().item()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()

    result = time_steps(run_step, device, warmup, steps)
    del model, optimizer
    reset_memory(device)
    return result


def end_to_end(config, steps: int) -> dict:
    """``train()`` on a synthetic dataset (20 photos for stage 2, 64 for stage 1) for ``steps`` steps."""
    from diffrig.data.lmdb_store import DatasetMeta, RecordWriter
    from diffrig.data.records import Sample

    size = config.model["image_size"]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        g = torch.Generator().manual_seed(0)
        with RecordWriter(scratch / "data.lmdb", DatasetMeta(size, "benchmark", {"codes": 236})) as writer:
            for i in range(20 if config.stage == 2 else 64):
                writer.append([Sample(name=f"{i}.png", image=torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
                                      buffers=torch.rand(9, size, size, generator=g), codes=torch.zeros(236),
                                      tform=torch.eye(3))])
            writer.finish()
        overrides = {"data_dir": str(scratch / "data.lmdb"), "output_dir": str(scratch / "run"), "max_steps": steps}
        if config.stage == 2:
            torch.manual_seed(0)
            new_model(config.model).save_pretrained(scratch / "stage1")
            overrides["init_from"] = str(scratch / "stage1")
        run_config = load_config(None, {**config.to_dict(), **overrides})
        start = time.perf_counter()
        result = train(run_config)
        elapsed = time.perf_counter() - start
    report = {"steps": result.step, "wall_s": elapsed, "wall_min": elapsed / 60}
    if config.compile:
        report["compile_phases_s"] = compile_phases()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["paper", "tiny"], default="paper")
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--image_size", type=int, help="override the preset's model image_size")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation happens here)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--official_repo", type=Path, help="a checkout of adobe-research/diffusion-rig")
    parser.add_argument("--official_only", action="store_true")
    parser.add_argument("--end_to_end", action="store_true", help="run train() on synthetic data instead")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile N more steps of ours: device time per step by kernel")
    for name, kind in OVERRIDABLE.items():
        parser.add_argument(f"--{name}", type=kind)
    args = parser.parse_args()

    overrides = {name: getattr(args, name) for name in OVERRIDABLE if getattr(args, name) is not None}
    overrides.update(stage=args.stage, tracker="none")
    if args.image_size:
        overrides["model"] = {"image_size": args.image_size}
    config = load_config(CONFIGS / PRESETS[(args.preset, args.stage)], overrides)
    if args.preset == "tiny" and args.stage == 2:
        config.freeze_encoder = True
    setting = {"preset": args.preset, "stage": config.stage, "batch_size": config.batch_size,
               "image_size": config.model["image_size"], "mixed_precision": config.mixed_precision,
               "compile": config.compile, "compile_mode": config.compile_mode, "channels_last": config.channels_last,
               "activation_memory_budget": config.activation_memory_budget,
               "gradient_checkpointing": config.gradient_checkpointing, "ema": config.ema,
               "fast_compile": config.fast_compile, "cuda_graph": config.cuda_graph, "fused_norm": config.fused_norm,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    report = {"setting": setting}

    if args.end_to_end:
        report["end_to_end"] = end_to_end(config, config.max_steps)
    else:
        images_per_step = config.batch_size * config.gradient_accumulation_steps
        if args.official_repo:
            report["official"] = bench_official(args.official_repo.resolve(), config, args.warmup, args.steps)
        if not args.official_only:
            report["ours"] = bench_ours(config, args.warmup, args.steps, args.profile)
        for side in ("official", "ours"):
            if side in report:
                report[side]["images_per_s"] = images_per_step / report[side]["s_per_step"]
                report[side]["projected_5000_steps_min"] = (report[side]["warmup_s"]
                                                            + 5000 * report[side]["s_per_step"]) / 60
        if "official" in report and "ours" in report:
            ours, official = report["ours"], report["official"]
            report["ratios"] = {"throughput": ours["images_per_s"] / official["images_per_s"]}
            for key in ("peak_allocated_gib", "peak_reserved_gib"):
                if key in ours:
                    report["ratios"][key.replace("_gib", "_memory")] = ours[key] / official[key]

    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
