"""The whole DiffusionRig pipeline on the synthetic world, scored against its ground truth.

``python scripts/demo.py`` (or ``diffrig demo``):

1. **data**: a synthetic world (:mod:`diffrig.data.synthetic`) writes a stage-1 set (many
   identities) and the album of one more person (identity 0, absent from stage 1), and
   ``create_data`` turns both into LMDB datasets from the ground-truth codes (the album with its
   mean shape, as for a real person);
2. **stage 1** trains a small model on the many identities, **stage 2** fine-tunes it on the album;
3. **edits**: held-out photos of the person take their pose, light and expression from photos of
   other people (one target per source), with the official fixed seeded noise and with DDIM
   inversion of the source;
4. **scores**: the world renders the true photo under each edited rig (same person, framing,
   background and clothes, face kept at its FFHQ centre as the pipeline does); PSNR and SSIM are
   measured on the face (where the edited rig covers the picture) and on the rest.

Writes ``OUT/grids/<sampling>.png`` (per source: source | target | per mode: buffers, result,
truth) and ``OUT/metrics.json``. Finished steps are reused when the demo is run again with the
same settings (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffrig.cliargs import check_device
from diffrig.errors import DiffrigError

logger = logging.getLogger(__name__)

EDIT_MODES = ("pose", "light", "expression")
SAMPLINGS = {"fixed_noise": False, "inverted": True}
PERSON = 0  # the album's identity; stage 1 uses identities 1..N
TARGET_IDENTITY_OFFSET = 10_000  # targets are people seen by neither stage


@dataclass
class DemoSettings:
    """Sizes and lengths of one demo run (see :data:`PRESETS`)."""

    image_size: int = 64
    identities: int = 16  # stage-1 people
    per_identity: int = 8  # stage-1 photos per person
    album: int = 20  # stage-2 photos of the person
    sources: int = 4  # held-out photos of the person that are edited
    stage1_steps: int = 300
    stage2_steps: int = 120
    batch_size: int = 8
    stage1_lr: float = 1e-3
    stage2_lr: float = 2e-4
    edit_steps: int = 20  # DDIM steps
    model: dict = field(default_factory=lambda: dict(
        num_channels=32, num_res_blocks=1, channel_mult="1,1,2", attention_resolutions="16", dropout=0.0,
        latent_dim=32, encoder_type="resnet18"))
    seed: int = 0


PRESETS = {
    # the README's command on a 2-core CPU: under 10 minutes (410 s of one core's time)
    "cpu": DemoSettings(),
    # a CI-sized run of every step (a minute on a CPU); not a useful model
    "quick": DemoSettings(identities=2, per_identity=3, album=4, sources=2, stage1_steps=6, stage2_steps=3,
                          batch_size=4, edit_steps=4,
                          model=dict(num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="",
                                     dropout=0.0, latent_dim=16, encoder_type="resnet18")),
    # one GPU: a larger world, image size and model
    "cuda": DemoSettings(image_size=128, identities=300, per_identity=12, album=20, sources=8, stage1_steps=5000,
                         stage2_steps=1000, batch_size=32, stage1_lr=2e-4, stage2_lr=2e-5,
                         model=dict(num_channels=64, num_res_blocks=2, channel_mult="1,1,2,3,4",
                                    attention_resolutions="16", dropout=0.0, latent_dim=64,
                                    encoder_type="resnet18")),
}


def masked_scores(prediction: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict[str, dict[str, float]]:
    """PSNR (dB) and SSIM of prediction vs truth (B, 3, H, W) in [0, 1] inside ``mask`` (B, 1, H, W)
    ("face") and outside it ("rest"), over all pixels of the batch. SSIM is kornia's 11×11 map
    averaged over the region."""
    import kornia

    ssim_map = kornia.metrics.ssim(prediction, truth, window_size=11, max_val=1.0)
    squared = (prediction - truth).pow(2)
    out = {}
    for region, weight in (("face", mask), ("rest", 1 - mask)):
        weight = weight.expand_as(squared)
        total = weight.sum().clamp(min=1.0)
        mse = (squared * weight).sum() / total
        out[region] = {"psnr": round(float(10 * torch.log10(1.0 / mse.clamp(min=1e-10))), 3),
                       "ssim": round(float((ssim_map * weight).sum() / total), 4),
                       "pixels": int(weight[:, 0].sum())}
    return out


def _quantize(images: torch.Tensor) -> torch.Tensor:
    """As the photos are stored: 8 bits per channel."""
    return (images * 255).round() / 255


def _save_settings(path: Path, settings: DemoSettings) -> bool:
    """Write the settings and the built-in assets' fingerprint; True when different ones were
    there (finished steps must then be redone)."""
    from diffrig.data.create import asset_fingerprint
    from diffrig.deca.assets import resolve_deca_dir

    record = {**asdict(settings), "deca_assets": asset_fingerprint(resolve_deca_dir("builtin"))}
    text = json.dumps(record, indent=2, sort_keys=True)
    changed = path.is_file() and path.read_text() != text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return changed


def make_data(out: Path, settings: DemoSettings, device: str, progress: bool) -> dict[str, Path]:
    """Synthetic folders and their LMDB datasets; returns their paths."""
    from diffrig.data.create import create_dataset
    from diffrig.data.synthetic.world import SyntheticWorld

    world = SyntheticWorld("builtin", size=settings.image_size, seed=settings.seed, device=device)
    paths = {"stage1_photos": out / "data" / "stage1", "album_photos": out / "data" / "album",
             "stage1": out / "data" / "stage1.lmdb", "album": out / "data" / "album.lmdb"}
    if not (paths["stage1_photos"] / "world" / "world.json").is_file():
        world.write_folder(paths["stage1_photos"], range(1, 1 + settings.identities), settings.per_identity,
                           progress=progress)
    if not (paths["album_photos"] / "world" / "world.json").is_file():
        world.write_folder(paths["album_photos"], [PERSON], settings.album, progress=progress)
    create_dataset(paths["stage1_photos"], paths["stage1"], image_size=settings.image_size, deca_dir="builtin",
                   codes="ground_truth", device=device, progress=progress)
    create_dataset(paths["album_photos"], paths["album"], image_size=settings.image_size, deca_dir="builtin",
                   codes="ground_truth", use_meanshape=True, device=device, progress=progress)
    return paths


def train_stage(stage: int, data: Path, output: Path, settings: DemoSettings, device: str, progress: bool,
                init_from: Path | None = None) -> Path:
    """Train (or reuse a finished) stage; returns the model folder."""
    from diffrig.training import load_config, train

    model_dir = output / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    cuda = device.startswith("cuda")
    overrides = dict(
        stage=stage, data_dir=str(data), output_dir=str(output),
        model=dict(settings.model, image_size=settings.image_size),
        lr=settings.stage1_lr if stage == 1 else settings.stage2_lr, batch_size=settings.batch_size,
        max_steps=settings.stage1_steps if stage == 1 else settings.stage2_steps, seed=settings.seed,
        mixed_precision="bf16" if cuda else "no", channels_last=cuda, compile=False, num_workers=4 if cuda else 0,
        log_every=10, checkpoint_every=0, sample_every=0, tracker="none", freeze_encoder=stage == 2,
        resume="latest",  # a run stopped by a signal continues where it was
    )
    if init_from is not None:
        overrides["init_from"] = str(init_from)
    config = load_config(None, overrides)
    result = train(config, progress=progress)
    if result.model_dir is None:
        raise DiffrigError(f"stage {stage} stopped before the end; run the demo again to continue")
    return result.model_dir


@torch.no_grad()
def edit_and_score(out: Path, model_dir: Path, album: Path, settings: DemoSettings, device: str) -> dict:
    """Edit held-out photos of the person with and without inversion; scores and grids."""
    from torchvision.utils import make_grid

    from diffrig.data.synthetic.world import Portraits as WorldPortraits
    from diffrig.data.synthetic.world import SyntheticWorld
    from diffrig.deca.rig import DECA
    from diffrig.pipeline import Portraits, RigEditPipeline, read_meanshape, save_png

    world = SyntheticWorld("builtin", size=settings.image_size, seed=settings.seed, device=device)
    person = world.identity(PERSON)
    held_out = world.sample(person, range(settings.album, settings.album + settings.sources))
    targets = WorldPortraits.cat([world.sample(world.identity(TARGET_IDENTITY_OFFSET + i), [0])
                                  for i in range(settings.sources)])
    sources = Portraits(_quantize(world.render_portraits(held_out)), held_out.codes, held_out.tform,
                        [f"person_{k:04d}" for k in held_out.image])
    target = Portraits(_quantize(world.render_portraits(targets)), targets.codes, targets.tform,
                       [f"target_{i:05d}" for i in targets.identity])

    pipeline = RigEditPipeline.from_pretrained(model_dir, deca_dir="builtin",
                                               meanshape=read_meanshape(album / "mean_shape.safetensors"),
                                               device=device)
    if not isinstance(pipeline.deca, DECA):
        raise DiffrigError("the demo needs diffrig's DECA rig")
    centre = pipeline.deca.ffhq_center(sources.codes.to(device))
    truths, metrics, grids = {}, {}, {}
    for sampling, invert in SAMPLINGS.items():
        start = time.perf_counter()
        result = pipeline.edit(sources, target, EDIT_MODES, invert=invert, num_inference_steps=settings.edit_steps,
                               batch_size=settings.batch_size * len(EDIT_MODES))
        seconds = time.perf_counter() - start
        if not truths:  # the true photos under the edited rigs, and how far the unedited source is from them
            truths = {mode: _quantize(world.render(person, result.codes[mode], sources.tforms, held_out.nuisance_seed,
                                                   ffhq_center=centre)) for mode in EDIT_MODES}
            baseline = {mode: masked_scores(sources.images, truths[mode], result.masks[mode]) for mode in EDIT_MODES}
            metrics["unedited_source"] = {"edits": _with_mean(baseline)}
        scores, tiles = {}, [[sources.images[i], target.images[i]] for i in range(len(sources))]
        for mode in EDIT_MODES:
            scores[mode] = masked_scores(result.edits[mode], truths[mode], result.masks[mode])
            for i in range(len(sources)):
                tiles[i] += [result.buffers[mode][i, :3].clamp(0, 1), result.edits[mode][i], truths[mode][i]]
        metrics[sampling] = {"edits": _with_mean(scores), "seconds": round(seconds, 2)}
        flat = [tile.float().cpu() for row in tiles for tile in row]
        grids[sampling] = save_png(make_grid(torch.stack(flat), nrow=2 + 3 * len(EDIT_MODES), padding=2,
                                             pad_value=1.0), out / "grids" / f"{sampling}.png")
    return {"metrics": metrics, "grids": {k: str(v) for k, v in grids.items()}}


def _with_mean(scores: dict) -> dict:
    """Per-mode scores plus their mean over the modes ("mean")."""
    scores["mean"] = {region: {name: round(sum(scores[m][region][name] for m in EDIT_MODES) / len(EDIT_MODES), 4)
                               for name in ("psnr", "ssim")} for region in ("face", "rest")}
    return scores


def better_sampling(metrics: dict) -> str:
    """The sampling (of :data:`SAMPLINGS`) whose edits score best: mean over modes and regions of
    PSNR/40 + SSIM."""
    def score(entry):
        mean = entry["edits"]["mean"]
        return sum(mean[region]["psnr"] / 40 + mean[region]["ssim"] for region in ("face", "rest"))

    return max((name for name in metrics if name in SAMPLINGS), key=lambda name: score(metrics[name]))


def run_demo(output_dir: str | Path = "demo_output", preset: str = "cpu", device: str | None = None,
             fresh: bool = False, progress: bool = True, **overrides) -> dict:
    """Run every step (reusing finished ones) and write ``OUT/metrics.json``; returns its content."""
    if preset not in PRESETS:
        raise DiffrigError(f"unknown demo preset {preset!r}: use one of {', '.join(PRESETS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # train where the demo runs
    settings = replace(PRESETS[preset], **overrides)
    out = Path(output_dir)
    if fresh and out.exists():
        shutil.rmtree(out)
    if _save_settings(out / "settings.json", settings):
        for stale in ("data", "stage1", "stage2", "grids"):
            shutil.rmtree(out / stale, ignore_errors=True)
    timings = {}
    clock = time.perf_counter()
    paths = make_data(out, settings, device, progress)
    timings["data"] = time.perf_counter() - clock
    clock = time.perf_counter()
    stage1 = train_stage(1, paths["stage1"], out / "stage1", settings, device, progress)
    timings["stage1"] = time.perf_counter() - clock
    clock = time.perf_counter()
    stage2 = train_stage(2, paths["album"], out / "stage2", settings, device, progress, init_from=stage1)
    timings["stage2"] = time.perf_counter() - clock
    clock = time.perf_counter()
    scored = edit_and_score(out, stage2, paths["album"], settings, device)
    timings["edits"] = time.perf_counter() - clock
    report = {
        "preset": preset, "device": device, "settings": asdict(settings),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        **scored,
        "better_sampling": better_sampling(scored["metrics"]),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summary_lines(report: dict) -> list[str]:
    """A few lines for the console."""
    lines = []
    for sampling, entry in report["metrics"].items():
        for mode, scores in entry["edits"].items():
            face, rest = scores["face"], scores["rest"]
            lines.append(f"{sampling:11s} {mode:10s} face PSNR {face['psnr']:6.2f} SSIM {face['ssim']:.3f} | "
                         f"rest PSNR {rest['psnr']:6.2f} SSIM {rest['ssim']:.3f}")
    total = sum(report["timings_s"].values())
    lines.append(f"better: {report['better_sampling']}; {total:.0f} s in all ({report['timings_s']})")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrig demo", description="Run the whole DiffusionRig pipeline on the "
                                     "synthetic world and score the edits against its ground truth.")
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default="demo_output",
                        help="folder for data, models, grids and metrics.json (default: demo_output)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--preset", choices=list(PRESETS), default=None,
                        help="sizes and lengths (default: cuda on a GPU, else cpu)")
    parser.add_argument("--quick", action="store_true", help="same as --preset quick: every step, minimal sizes")
    parser.add_argument("--seed", type=int, default=None, help="the synthetic world and training seed")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first instead of reusing "
                                                             "finished steps")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``scripts/demo.py`` and ``diffrig demo``: one line on stderr and exit 1 for a DiffrigError."""
    import sys

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    for noisy in ("accelerate", "diffusers", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        device = check_device(args.device) or ("cuda" if torch.cuda.is_available() else "cpu")
        preset = "quick" if args.quick else args.preset or ("cuda" if device.startswith("cuda") else "cpu")
        overrides = {} if args.seed is None else {"seed": args.seed}
        report = run_demo(args.output_dir, preset=preset, device=device, fresh=args.fresh,
                          progress=not args.quiet, **overrides)
    except DiffrigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(report)))
    print(f"wrote {Path(args.output_dir) / 'metrics.json'} and {Path(args.output_dir) / 'grids'}/")
    return 0

