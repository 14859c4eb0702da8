"""Portraits per second of the synthetic world, written to disk with their sidecars.

    OMP_NUM_THREADS=2 python benchmarks/synthetic_speed.py --size 64 --count 512 --threads 2

Times ``SyntheticWorld.write_folder`` for an FFHQ-like folder (one photo per identity: every
photo also builds an identity's UV maps) and a personal album (one identity), after a warm-up.
Reports wall-clock and CPU time per portrait (of this process: with ``--workers`` the workers'
time is not in it), and the machine's load average, since the machine may be shared.

    python benchmarks/synthetic_speed.py --threads 1 --workers 2   # one process per core
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


def run(world, folder: str, identities, per_identity: int, batch_size: int, workers: int) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    written = world.write_folder(folder, identities, per_identity, batch_size=batch_size, workers=workers)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    count = len(written)
    return {"portraits": count, "per_second": round(count / wall, 1), "wall_ms_each": round(1000 * wall / count, 2),
            "cpu_ms_each": round(1000 * cpu / count, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--count", type=int, default=512, help="portraits per measurement")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workers", type=int, default=1, help="write_folder's worker processes (CPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deca_dir", default="builtin")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffrig.data.synthetic.world import SyntheticWorld

    start = time.perf_counter()
    world = SyntheticWorld(args.deca_dir, size=args.size, seed=0, device=args.device)
    report = {"size": args.size, "threads": torch.get_num_threads(), "workers": args.workers, "device": args.device,
              "setup_seconds": round(time.perf_counter() - start, 2), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as folder:
        world.write_folder(os.path.join(folder, "warmup"), 2, args.batch_size // 2, batch_size=args.batch_size)
        report["ffhq_like"] = run(world, os.path.join(folder, "ffhq"), range(100, 100 + args.count), 1,
                                  args.batch_size, args.workers)
        report["album"] = run(world, os.path.join(folder, "album"), [7], args.count, args.batch_size, args.workers)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
