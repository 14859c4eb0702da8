"""Portraits per second of the synthetic world, written to disk with their sidecars.

    OMP_NUM_THREADS=1 python benchmarks/synthetic_speed.py --size 64 --count 512

Times ``SyntheticWorld.write_folder`` (its defaults: one single-threaded worker process per
core) for an FFHQ-like folder (one photo per identity: every photo also builds an identity's UV
maps) and a personal album (one identity), after a warm-up. Reports, per measurement, wall-clock
time and the CPU time of this process and its workers per portrait, and, since the machine may
be shared, the load average and (on Linux) how many cores other processes kept busy meanwhile
and, on a virtual machine, how many the host took away.

    python benchmarks/synthetic_speed.py --workers 1 --threads 2   # one process, two torch threads
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, stolen) CPU time of the whole machine in clock ticks (Linux), else None. Stolen:
    time a virtual machine's cores waited for the host."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    steal = fields[7] if len(fields) > 7 else 0
    return sum(fields[:7]) - fields[3] - fields[4], steal  # user..softirq, less idle and iowait


def _own_cpu() -> float:
    """CPU seconds of this process and of its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(world, folder: str, identities, per_identity: int, batch_size: int, workers: int | None) -> dict:
    ticks, cpu, wall = _machine_ticks(), _own_cpu(), time.perf_counter()
    written = world.write_folder(folder, identities, per_identity, batch_size=batch_size, workers=workers)
    wall, cpu = time.perf_counter() - wall, _own_cpu() - cpu
    count = len(written)
    report = {"portraits": count, "per_second": round(count / wall, 1), "wall_ms_each": round(1000 * wall / count, 2),
              "cpu_ms_each": round(1000 * cpu / count, 2)}
    if ticks is not None:
        busy, stolen = ((after - before) / os.sysconf("SC_CLK_TCK") for after, before in zip(_machine_ticks(), ticks))
        report["other_processes_cores"] = round(max(busy - cpu, 0.0) / wall, 2)
        report["stolen_cores"] = round(stolen / wall, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--count", type=int, default=512, help="portraits per measurement")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of this process (default: torch's)")
    parser.add_argument("--workers", type=int, default=None,
                        help="write_folder's worker processes (default: its own, one per core)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deca_dir", default="builtin")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffrig.data.synthetic.world import SyntheticWorld

    start = time.perf_counter()
    world = SyntheticWorld(args.deca_dir, size=args.size, seed=0, device=args.device)
    report = {"size": args.size, "threads": torch.get_num_threads(), "workers": args.workers or "default",
              "device": args.device, "setup_seconds": round(time.perf_counter() - start, 2),
              "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as folder:
        world.write_folder(os.path.join(folder, "warmup"), 2, args.batch_size // 2, batch_size=args.batch_size,
                           workers=1)
        report["ffhq_like"] = run(world, os.path.join(folder, "ffhq"), range(100, 100 + args.count), 1,
                                  args.batch_size, args.workers)
        report["album"] = run(world, os.path.join(folder, "album"), [7], args.count, args.batch_size, args.workers)
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
