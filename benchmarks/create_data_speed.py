"""Speed of the create_data pipeline (images/s) with the built-in DECA assets.

Inputs are synthetic: square pictures (smooth random colour fields with photo-like grain) each
with a DECA-style ``.txt`` landmark sidecar, so dlib's landmark search (a per-photo CPU cost of its
own, ~25 ms for a 224² photo on one core) does not dominate. Everything else runs as in
production: loading in DataLoader workers, crop + encode + render + quantise on the device, PNG
and safetensors encoding in a thread pool, one LMDB transaction per batch in a writer thread.

    python benchmarks/create_data_speed.py --device cuda                  # goal: >= 300 img/s at 256²
    python benchmarks/create_data_speed.py --device cpu --count 32 --image_size 64 --batch_size 8

It prints the end-to-end rate (``create_dataset`` on ``--count`` images, rig loading excluded),
then each stage alone (loader, device, record encoding on 1 and on N threads, LMDB writing) to
show which one limits, and a JSON line. PNG inputs of the output size are stored as their own
bytes; ``--input_format jpg`` makes every photo be compressed again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffrig.data.create import (
    CropInputs,
    _encode_workers,
    collate,
    create_dataset,
    default_device,
    encode_item,
    list_images,
    render_batch,
)
from diffrig.data.lmdb_store import DatasetMeta, RecordWriter


def make_inputs(folder: Path, count: int, size: int, distinct: int = 32, seed: int = 0, suffix: str = "png") -> None:
    """``count`` pictures of ``size``² (``distinct`` different ones, repeated) with landmark sidecars
    around a face-sized box that moves a little from picture to picture."""
    rng = np.random.default_rng(seed)
    encoded = []
    for _ in range(distinct):
        coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        grain = rng.normal(0, 4, (size, size, 3))
        path = folder / f".tmp.{suffix}"
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(path, quality=95)
        encoded.append(path.read_bytes())
        path.unlink()
    for i in range(count):
        (folder / f"{i:06d}.{suffix}").write_bytes(encoded[i % distinct])
        left, top = size * rng.uniform(0.2, 0.3, 2)
        right, bottom = size * rng.uniform(0.7, 0.8, 2)
        xs, ys = rng.uniform(left, right, 64), rng.uniform(top, bottom, 64)
        corners = [[left, top], [right, bottom], [left, bottom], [right, top]]
        np.savetxt(folder / f"{i:06d}.txt", np.concatenate([np.stack([xs, ys], 1), corners]), fmt="%.2f")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_rate(jobs: list[tuple], threads: int, repeats: int) -> float:
    """Records per second of ``encode_item`` over ``jobs`` (each ``repeats`` times) in ``threads`` threads."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda job: encode_item(*job), jobs[:threads]))  # start the threads
        start = time.perf_counter()
        list(pool.map(lambda job: encode_item(*job), jobs * repeats))
        return repeats * len(jobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=2048, help="images in the timed run (default: 2048)")
    parser.add_argument("--image_size", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--device", default=None, help="default: cuda when available")
    parser.add_argument("--deca_dir", default="builtin", help="DECA data folder (default: builtin)")
    parser.add_argument("--num_workers", type=int, default=None, help="loader processes (default: create_dataset's)")
    parser.add_argument("--encode_workers", type=int, default=None,
                        help="record encoding threads (default: create_dataset's, 8 at most on CUDA, 0 on CPU)")
    parser.add_argument("--input_format", choices=("png", "jpg"), default="png",
                        help="png: photos stored as their own files' bytes; jpg: compressed again")
    parser.add_argument("--workdir", default=None, help="folder for inputs and outputs (default: a temporary one)")
    args = parser.parse_args()

    device = torch.device(args.device) if args.device else default_device()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="create_data_speed_"))
    inputs, outputs = workdir / "inputs", workdir / "outputs"
    for folder in (inputs, outputs):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    make_inputs(inputs, args.count, args.image_size, suffix=args.input_format)
    options = dict(image_size=args.image_size, deca_dir=args.deca_dir, batch_size=args.batch_size, device=device,
                   num_workers=args.num_workers, encode_workers=args.encode_workers, progress=False)
    workers = args.num_workers if args.num_workers is not None else (
        min(8, os.cpu_count() or 1) if device.type == "cuda" else 0)
    encoders = args.encode_workers if args.encode_workers is not None else _encode_workers(None, device)

    # Warm-up: builds the built-in assets, starts CUDA, lets cuDNN pick its kernels.
    warm = workdir / "warm"
    warm.mkdir(exist_ok=True)
    for path in list_images(inputs)[: 2 * args.batch_size]:
        shutil.copy(path, warm / path.name)
        shutil.copy(path.with_suffix(".txt"), warm / path.with_suffix(".txt").name)
    create_dataset(warm, outputs / "warm.lmdb", **options)

    from diffrig.deca.assets import resolve_deca_dir
    from diffrig.deca.rig import DECA

    start = time.perf_counter()
    rig = DECA.from_dir(resolve_deca_dir(args.deca_dir), device=device)
    sync(device)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    summary = create_dataset(inputs, outputs / "timed.lmdb", **options)
    sync(device)
    total_s = time.perf_counter() - start
    assert summary.written == args.count, summary
    rate = args.count / max(total_s - load_s, 1e-9)
    record_bytes = (outputs / "timed.lmdb" / "data.mdb").stat().st_size / args.count
    print(f"end to end: {args.count} images at {args.image_size}² in {total_s:.1f} s, of which ~{load_s:.1f} s "
          f"loading the rig: {rate:.0f} images/s on {device} (batch {args.batch_size}, {workers} loader workers, "
          f"{encoders} encoding threads); ~{record_bytes / 1024:.0f} KiB per record on disk")

    # Stages alone, on the same inputs.
    files = list_images(inputs)
    dataset = CropInputs(files, [p.name for p in files], args.image_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate, num_workers=workers,
                        pin_memory=device.type == "cuda")
    start = time.perf_counter()
    batches = [batch for batch in loader]
    loader_rate = args.count / (time.perf_counter() - start)
    reused = sum(png is not None for batch in batches for png in batch.pngs) / args.count

    batch = batches[0]
    sync(device)
    start = time.perf_counter()
    repeats = max(1, min(len(batches), 8))
    for _ in range(repeats):
        rendered = render_batch(rig, batch, None, args.image_size)
    sync(device)
    device_rate = repeats * len(batch.names) / (time.perf_counter() - start)

    jobs = [(batch, rendered, i) for i in range(len(batch.names))]
    one_thread = encode_rate(jobs, 1, 2)
    threaded = encode_rate(jobs, max(1, encoders), 8)
    records = [(f"{i}", encode_item(*job)) for i, job in enumerate(jobs)]
    meta = DatasetMeta(image_size=args.image_size, asset_fingerprint="benchmark", codes_layout={})
    with RecordWriter(outputs / "write.lmdb", meta) as writer:
        start = time.perf_counter()
        for repeat in range(repeats):
            writer.append_encoded([(f"{repeat}/{name}", data) for name, data in records])
        write_rate = repeats * len(records) / (time.perf_counter() - start)
    official = 4 * 9 * args.image_size**2 + np.mean([len(png) for png in batch.pngs if png is not None] or [0])
    print(f"stages alone: loader {loader_rate:.0f}/s ({reused:.0%} of photos stored as their PNG files), "
          f"crop+encode+render+quantise {device_rate:.0f}/s (incl. copy to the host), record encoding "
          f"{one_thread:.0f}/s on 1 thread ({1000 / one_thread:.1f} ms a record) and {threaded:.0f}/s on "
          f"{max(1, encoders)} threads, LMDB writing {write_rate:.0f}/s")
    print(json.dumps({"images_per_s": round(rate, 1), "count": args.count, "image_size": args.image_size,
                      "batch_size": args.batch_size, "device": str(device),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "cpu_count": os.cpu_count(), "loader_workers": workers, "encode_threads": encoders,
                      "input_format": args.input_format, "photos_stored_as_files": round(reused, 3),
                      "loader_per_s": round(loader_rate, 1), "device_per_s": round(device_rate, 1),
                      "encode_per_s_1_thread": round(one_thread, 1), "encode_per_s": round(threaded, 1),
                      "lmdb_write_per_s": round(write_rate, 1), "record_kib": round(record_bytes / 1024, 1),
                      "record_vs_official_floats": round(record_bytes / max(official, 1), 3),
                      "rig_load_s": round(load_s, 2), "total_s": round(total_s, 2)}))
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
