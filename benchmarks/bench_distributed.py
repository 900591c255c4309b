"""1 process vs K processes (torch.distributed, gloo on CPU): soft density and FeatureIndex build.

Data: the first ``--n`` Fashion-MNIST training images (Debian's dataset-fashion-mnist). Model: seeded random
init, float32, MLP 784-256-256-10 or the CNN of ``bench_density.py``; output the 10 logits (d = 10).
Each configuration runs in fresh spawned workers with ``--threads`` threads per process (default 1, so that
K processes use K cores), ``--repeats`` times in the same workers; the figures are medians. Timed between two
barriers: ``sim.density(x)`` (normalised soft count, linear algorithm) and ``FeatureIndex.build(sim, x, tmp,
dim=--dim)`` into a fresh folder. Efficiency = t_1 / (K t_K) (1 = perfect scaling). On a shared machine
the wall times depend on what else runs; the CPU seconds of each rank (``time.process_time``), summed over the
ranks, do not: CPU efficiency = c_1 / (sum of the K ranks' c_K) measures the work the split adds (duplicated
reads and probes, reductions, waiting in collectives is not CPU time with gloo's blocking waits).

Correctness: the K-process density is compared with the 1-process one (max relative difference), the stores
byte for byte.

Usage: python benchmarks/bench_distributed.py [--n 20000] [--model MLP] [--procs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_density import build  # the same MLP / CNN as the single-process density benchmark

import nnsim


def worker(rank: int, world: int, args: argparse.Namespace, init: str, out: str) -> None:
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    group = None if world > 1 else False

    def sync() -> None:
        if world > 1:
            dist.barrier()

    x, _ = nnsim.datasets.load_fashion_mnist("train", limit=args.n)
    sim = nnsim.Similarity(build(args.model), progress=False)
    times: dict[str, list[float]] = {"density": [], "index": []}
    cpu: dict[str, list[float]] = {"density": [], "index": []}  # this rank's CPU seconds (load-independent)
    density = None
    for r in range(args.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        density = sim.density(x, group=group)
        cpu["density"].append(time.process_time() - c0)
        sync()
        times["density"].append(time.perf_counter() - t0)
        store = Path(out) / "store"
        if rank == 0 and store.exists():
            shutil.rmtree(store)
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        nnsim.FeatureIndex.build(sim, x, store, dim=args.dim, group=group)
        cpu["index"].append(time.process_time() - c0)
        sync()
        times["index"].append(time.perf_counter() - t0)
        if r == args.repeats - 1 and rank == 0:
            manifest = json.loads((store / "manifest.json").read_text())
            stored = np.concatenate([np.load(store / e["file"]) for e in manifest["shards"]])
            np.save(Path(out) / "features.npy", stored)
    if world > 1:  # total CPU seconds over the ranks
        sums = torch.tensor([cpu["density"], cpu["index"]], dtype=torch.float64)
        dist.all_reduce(sums)
        cpu = {"density": sums[0].tolist(), "index": sums[1].tolist()}
    if rank == 0:
        torch.save({"times": times, "cpu": cpu, "density": density, "load": os.getloadavg()}, Path(out) / "result.pt")
    if world > 1:
        dist.destroy_process_group()


def run(world: int, args: argparse.Namespace, root: Path) -> dict:
    out = root / f"w{world}"
    out.mkdir()
    load_before = os.getloadavg()
    mp.spawn(worker, args=(world, args, str(root / f"init{world}"), str(out)), nprocs=world, join=True)
    result = torch.load(out / "result.pt", weights_only=False)
    result["features"] = np.load(out / "features.npy")
    result["load_before"] = load_before
    return result


def _r(load: tuple[float, ...]) -> str:
    return "/".join(f"{v:.1f}" for v in load)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--model", choices=["MLP", "CNN"], default="MLP")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dim", type=int, default=1024)
    args = p.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"N = {args.n}, {args.model}, d = 10, {args.threads} thread(s) per process, {args.repeats} repeats")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        one = run(1, args, root)
        many = run(args.procs, args, root)
    rel = ((many["density"] - one["density"]).abs() / one["density"].abs()).max().item()
    same = np.array_equal(many["features"], one["features"])
    print(f"density: max relative difference {args.procs} vs 1 process = {rel:.1e}; index stores identical: {same}")
    print(f"load average (1, 5, 15 min) before / after: 1 process {_r(one['load_before'])} / {_r(one['load'])}, "
          f"{args.procs} processes {_r(many['load_before'])} / {_r(many['load'])}")
    K = args.procs
    print(f"| step | wall, 1 process (median of {args.repeats}) | wall, {K} processes | speed-up | efficiency "
          f"t1/({K} tK) | CPU s, 1 process | CPU s, sum of {K} | CPU efficiency | CPU per sample (1 process) "
          f"| all wall runs (1 / {K}) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for step in ("density", "index"):
        t1, tk = statistics.median(one["times"][step]), statistics.median(many["times"][step])
        c1, ck = statistics.median(one["cpu"][step]), statistics.median(many["cpu"][step])
        runs = " ".join(f"{t:.1f}" for t in one["times"][step]) + " / " + " ".join(
            f"{t:.1f}" for t in many["times"][step])
        print(f"| {step} | {t1:.1f} s | {tk:.1f} s | {t1 / tk:.2f}x | {t1 / (K * tk):.2f} | {c1:.1f} | {ck:.1f} | "
              f"{c1 / ck:.2f} | {1e6 * c1 / args.n:.0f} us | {runs} |")


if __name__ == "__main__":
    main()
