"""Editing speed: 20-step DDIM edits of 256² photos, diffrig vs the official ddim_sample_loop.

Times ``RigEditPipeline.generate`` (the sampling loop alone) for each batch size and variant:

- ``fp32-eager``: float32, one kernel launch at a time (what the official code does);
- ``fp32-graph``: float32, the whole DDIM loop replayed as one CUDA graph (same numbers as eager);
- ``bf16-graph``: the UNet on a bfloat16 copy of its weights, channels-last, CUDA graph;
- ``bf16-graph-fused``: the same with diffrig's fused GroupNorm/FiLM/SiLU kernels, no compile;
- ``bf16-graph-compile``: the same with ``torch.compile`` (``--compile``);
- ``bf16-graph-autotune``: compiled with ``max-autotune-no-cudagraphs`` (``--autotune``: Inductor
  times candidate kernels, convolutions included, which takes minutes);

and, with ``--with_rig`` (default), whole one-photo edits (``pipeline.edit``: rig rendering of
the built-in DECA at 256², latent encoding, sampling from the seeded noise, or DDIM inversion of
the source and sampling: 40 model calls). With ``--official_repo`` the official
model (the same weights, converted back) samples with ``SpacedDiffusion.ddim_sample_loop`` at
batch sizes 1 and 8, and the float32 results of both are compared from the same x_T.

    python benchmarks/edit_speed.py --official_repo .ref/diffusion-rig
    python benchmarks/edit_speed.py --batch_sizes 1 8 32 64 --compile --model_path converted/
    python benchmarks/edit_speed.py --batch_sizes 64 --variants bf16-graph-fused --no-with_rig --profile 3

Prints one JSON object per measurement and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of ``fn`` (synchronised), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return times


def report(rows: list[dict], **row) -> dict:
    times = row.pop("times")
    row.update(median_s=round(statistics.median(times), 4), min_s=round(min(times), 4),
               images_per_s=round(row["batch_size"] / statistics.median(times), 2))
    print(json.dumps(row), flush=True)
    rows.append(row)
    return row


def official_sampler(repo: Path, model, respacing: str):
    """The official model with ``model``'s weights and its ddim20 sampler."""
    sys.path.insert(0, str(repo))
    from diffusion import gaussian_diffusion as gd
    from diffusion.model import DiffusionRig
    from diffusion.respace import SpacedDiffusion, space_timesteps

    from diffrig.models import to_official_state_dict

    c = model.config
    official = DiffusionRig(c.image_size, c.learn_sigma, c.num_channels, c.num_res_blocks, c.channel_mult, c.num_heads,
                            c.num_head_channels, c.num_heads_upsample, c.attention_resolutions, c.dropout, False,
                            True, c.resblock_updown, c.use_new_attention_order, c.latent_dim, c.in_channels,
                            c.encoder_type)
    official.load_state_dict(to_official_state_dict(model))
    diffusion = SpacedDiffusion(use_timesteps=space_timesteps(1000, respacing),
                                betas=gd.get_named_beta_schedule("linear", 1000),
                                model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_LARGE,
                                loss_type=gd.LossType.MSE, rescale_timesteps=False)
    return official.to(model.device).eval(), diffusion


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", help="a diffrig model folder or official .pt (default: random 256² model)")
    parser.add_argument("--official_repo", type=Path, help="a checkout of adobe-research/diffusion-rig")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--variants", nargs="+", help="time only these (default: all; see above)")
    parser.add_argument("--official_batch_sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--timestep_respacing", default="ddim20")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile + bf16 + CUDA graph")
    parser.add_argument("--autotune", action="store_true",
                        help="also time max-autotune compilation + bf16 + CUDA graph")
    parser.add_argument("--with_rig", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a whole one-photo edit with the built-in DECA rig")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing each variant at its largest batch, profile N more calls: "
                             "device time per call by kernel")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cuda (cpu only checks that the script runs)")
    parser.add_argument("--tiny", action="store_true", help="a 64² model of a few channels (a smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU here (use --device cpu --tiny for a smoke test)", file=sys.stderr)
        return 1

    from diffrig.models import DiffusionRigModel
    from diffrig.pipeline import RigEditPipeline
    from diffrig.training.model_source import load_model

    torch.manual_seed(0)
    if args.model_path:
        model = load_model(args.model_path)
    elif args.tiny:
        model = DiffusionRigModel(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2",
                                  attention_resolutions="16", dropout=0.0)
    else:
        model = DiffusionRigModel()
    with torch.no_grad():  # random weights with a non-zero output layer: realistic magnitudes
        for parameter in model.unet.conv_out.parameters():
            parameter.normal_(0, 0.02)
    pipeline = RigEditPipeline(model.eval().to(device), None)
    size, respacing = pipeline.image_size, args.timestep_respacing
    rows: list[dict] = []
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    common = dict(device=name, image_size=size, respacing=respacing)

    def inputs(batch):
        g = torch.Generator().manual_seed(batch)
        buffers = (torch.rand(batch, 9, size, size, generator=g) * 2 - 1).to(device)
        latent = torch.randn(batch, model.config.latent_dim, generator=g).to(device)
        return buffers, latent, pipeline.noise(batch)

    # name, dtype, CUDA graph, compile mode (None: eager), fused norms
    variants = [("fp32-eager", None, False, None, False), ("fp32-graph", None, True, None, False),
                ("bf16-graph", torch.bfloat16, True, None, False),
                ("bf16-graph-fused", torch.bfloat16, True, None, True)]
    if args.compile:
        variants.append(("bf16-graph-compile", torch.bfloat16, True, "default", False))
    if args.autotune:
        variants.append(("bf16-graph-autotune", torch.bfloat16, True, "max-autotune-no-cudagraphs", False))
    if args.variants:
        variants = [v for v in variants if v[0] in args.variants]
    eager_fp32 = {}
    for name, dtype, graphs, compile_mode, fused in variants:
        pipeline.denoiser, pipeline._fast = pipeline.model, None
        pipeline.model.to(memory_format=torch.contiguous_format)
        if graphs or dtype is not None:
            pipeline.enable_fast_sampling(dtype=dtype, channels_last=dtype is not None,
                                          compile=compile_mode is not None, compile_mode=compile_mode or "default",
                                          cuda_graphs=graphs, fused_norm=fused)
        for batch in args.batch_sizes:
            buffers, latent, noise = inputs(batch)
            run = lambda: pipeline.generate(buffers, latent, noise, timestep_respacing=respacing)  # noqa: E731
            try:
                times = timed(run, args.repeats, args.warmup)
            except torch.OutOfMemoryError:
                print(json.dumps({"variant": name, "batch_size": batch, "error": "out of memory"}))
                pipeline._graphs.clear()
                torch.cuda.empty_cache()
                continue
            row = report(rows, **common, implementation="diffrig", variant=name, batch_size=batch, times=times)
            if args.profile and batch == max(args.batch_sizes):
                from train_speed import kernel_profile  # the sibling benchmark script

                row["profile"] = kernel_profile(run, device, args.profile)
                print(json.dumps({"variant": name, "batch_size": batch, "profile": row["profile"]}))
            if name == "fp32-eager":
                eager_fp32[batch] = run()
            elif batch in eager_fp32:
                row["max_abs_diff_vs_fp32_eager"] = float((run() - eager_fp32[batch]).abs().max())
                print(json.dumps({"variant": name, "batch_size": batch,
                                  "max_abs_diff_vs_fp32_eager": row["max_abs_diff_vs_fp32_eager"]}))
        pipeline._graphs.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.with_rig:
        from diffrig.data.synthetic.world import SyntheticWorld
        from diffrig.deca.rig import DECA
        from diffrig.pipeline import Portraits
        from diffrig.rigs import HandRig

        pipeline.deca = DECA.from_dir("builtin", device=device)
        pipeline.enable_fast_sampling(dtype=torch.bfloat16, compile=args.compile, cuda_graphs=True)
        world = SyntheticWorld("builtin", size=size, device=device, rig=pipeline.deca)
        photo = world.sample(world.identity(0), [0])
        source = Portraits(world.render_portraits(photo), photo.codes, photo.tform, ["photo"])
        rig = HandRig(yaw=20.0, light="left")
        for invert in (False, True):
            edit = lambda: pipeline.edit(source, rig=rig, timestep_respacing=respacing, invert=invert)  # noqa: E731
            what = "rig + latent + DDIM inversion + DDIM" if invert else "rig + latent + DDIM from seeded noise"
            variant = "bf16-graph-compile" if args.compile else "bf16-graph"
            report(rows, **common, implementation="diffrig", variant=f"{variant} whole edit ({what})",
                   batch_size=1, times=timed(edit, args.repeats, args.warmup))

    if args.official_repo:
        official, diffusion = official_sampler(args.official_repo.resolve(), pipeline.model.float(), respacing)
        for batch in args.official_batch_sizes:
            buffers, latent, noise = inputs(batch)
            kwargs = {"physic_cond": buffers, "detail_cond": latent}

            def run_official():
                with torch.no_grad():
                    return diffusion.ddim_sample_loop(official, (batch, 3, size, size), noise=noise.contiguous(),
                                                      clip_denoised=True, model_kwargs=kwargs)

            row = report(rows, **common, implementation="official", variant="ddim_sample_loop fp32", batch_size=batch,
                         times=timed(run_official, min(args.repeats, 3), 1))
            if batch in eager_fp32:
                diff = float((run_official() - eager_fp32[batch]).abs().max())
                row["max_abs_diff_diffrig_fp32_vs_official"] = diff
                print(json.dumps({"batch_size": batch, "max_abs_diff_diffrig_fp32_vs_official": diff}))

    ours = [r for r in rows if r["implementation"] == "diffrig" and "whole" not in r["variant"]]
    theirs = [r for r in rows if r["implementation"] == "official"]
    single = min((r for r in ours if r["batch_size"] == 1), key=lambda r: r["median_s"], default=None)
    best = max(ours, key=lambda r: r["images_per_s"], default=None)
    print("\nsummary")
    if single:
        print(f"  one photo, {respacing}: diffrig {single['median_s']:.3f} s ({single['variant']})")
    if best:
        print(f"  throughput: diffrig {best['images_per_s']:.1f} images/s "
              f"(batch {best['batch_size']}, {best['variant']})")
    for r in theirs:
        print(f"  official batch {r['batch_size']}: {r['median_s']:.3f} s ({r['images_per_s']:.1f} images/s)")
    if theirs and best:
        ratio = best["images_per_s"] / max(r["images_per_s"] for r in theirs)
        print(f"  throughput ratio diffrig / official: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
