"""The Gram at d > 1: nnsim's engine before and after issue 14 part 7, side by side in one process.

For each zoo model and case (``d=10``: ``sim.similarity(x, reduce=None)`` [N, N, 10, 10]; ``d=1``: the first
logit, ``sim.similarity(x)``), nnsim's default backend and its ``functorch`` backend are each run with the
engine as it is ("new") and with the engine of git 8d55d82 ("old": ``factors.gram`` adding one new product
per factor, the symmetric tile by square blocks copied into place, no joined factors), alternating, on a plan
kept from a warm-up call. Reported: median CPU time (``time.process_time``, 1 thread) of the whole call and of
the Gram tiles (``engine.sweep.gram``), the ratios, and the largest relative difference of the results.

Usage: PYTHONPATH=src python benchmarks/bench_gram.py [--models vit,hf-bert] [--cases d=10,d=1] [--n 256]
       [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from zoo_models import ZOO  # noqa: E402

import nnsim  # noqa: E402
from nnsim import factors as F  # noqa: E402

chunks = importlib.import_module("nnsim.engine.chunks")
sweep = importlib.import_module("nnsim.engine.sweep")  # the module (nnsim.engine.sweep is also a function)

warnings.filterwarnings("ignore")


def _old_self_product(A: torch.Tensor) -> torch.Tensor:
    """git 8d55d82's _gemm.self_gram: square row blocks of R // 128, each product copied into place."""
    R = A.shape[0]
    k = R // 128
    if k < 2 or A.requires_grad or A.device.type != "cpu" or A.dim() != 2:
        return A @ A.T
    bounds = [R * i // k for i in range(k + 1)]
    out = A.new_empty(R, R)
    for i in range(k):
        rows = slice(bounds[i], bounds[i + 1])
        for j in range(i, k):
            cols = slice(bounds[j], bounds[j + 1])
            block = A[rows] @ A[cols].T
            out[rows, cols] = block
            if j != i:
                out[cols, rows] = block.T
    return out


def _old_dense_gram(ga: torch.Tensor, gb: torch.Tensor, mode: str) -> torch.Tensor:
    B1, d, n = ga.shape
    B2 = gb.shape[0]
    if ga is gb:
        if mode == "trace":
            return _old_self_product(ga.reshape(B1, d * n))
        return _old_self_product(ga.reshape(B1 * d, n)).view(B1, d, B1, d)
    if mode == "trace":
        return ga.reshape(B1, d * n) @ gb.reshape(B2, d * n).T
    return (ga.reshape(B1 * d, n) @ gb.reshape(B2 * d, n).T).view(B1, d, B2, d)


def old_gram(fa: list, fb: list, mode: str) -> torch.Tensor:
    """git 8d55d82's factors.gram: one new tile per factor, added."""
    out = None
    for x, y in zip(fa, fb, strict=True):
        if isinstance(x, F.Dense) and isinstance(y, F.Dense):
            t = _old_dense_gram(x.g, y.g, mode)
        else:
            t = x.gram(y, mode)
        out = t if out is None else out.add_(t)
    return out if mode == "trace" else out.permute(0, 2, 1, 3)


def old_prepare(factors: list, mode: str) -> list:
    return [f.dense() if f.prefers_dense(mode) else f for f in factors]


NEW = {"gram": sweep.gram, "prepare": chunks.prepare}
OLD = {"gram": old_gram, "prepare": old_prepare}


def call(model: torch.nn.Module, x: torch.Tensor, case: str, backend: str, engine: dict) -> tuple[torch.Tensor, float,
                                                                                                    float]:
    spent = [0.0]

    def timed_gram(fa: list, fb: list, mode: str) -> torch.Tensor:
        c0 = time.process_time()
        t = engine["gram"](fa, fb, mode)
        spent[0] += time.process_time() - c0
        return t

    sweep.gram, chunks.prepare = timed_gram, engine["prepare"]
    try:
        output = (lambda out, inputs: out[:, :1]) if case == "d=1" else None
        sim = nnsim.Similarity(model, output=output, backend=backend, progress=False)
        gc.collect()
        c0 = time.process_time()
        out = sim.similarity(x, reduce="trace" if case == "d=1" else None)
        return out, time.process_time() - c0, spent[0]
    finally:
        sweep.gram, chunks.prepare = NEW["gram"], NEW["prepare"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="vit,transformer-encoder,convnext-like,resnet-small,hf-bert")
    p.add_argument("--cases", default="d=10")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| model | case | backend | total old [s] | total new [s] | new/old | Gram old [s] | Gram new [s] | "
          "max rel diff |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model, xs = ZOO[name](args.n)
        x = xs[0]
        for case in args.cases.split(","):
            rows = {}
            for backend in ("auto", "functorch"):
                call(model, x[:4], case, backend, NEW)  # warm-up: the plan is kept
                runs = {"old": [], "new": []}
                outs = {}
                for _ in range(args.repeats):
                    for label, engine in (("old", OLD), ("new", NEW)):
                        outs[label], total, g = call(model, x, case, backend, engine)
                        runs[label].append((total, g))
                        print(f"  {name} {case} {backend} {label}: {total:.3f} s (Gram {g:.3f} s)", file=sys.stderr,
                              flush=True)
                med = {k: (statistics.median(t for t, _ in v), statistics.median(g for _, g in v))
                       for k, v in runs.items()}
                a, b = outs["old"].double(), outs["new"].double()
                fin = torch.isfinite(a)
                diff = float((a[fin] - b[fin]).abs().max() / a[fin].abs().max())
                rows[backend] = med
                print(f"| {name} | {case} | {backend} | {med['old'][0]:.3f} | {med['new'][0]:.3f} | "
                      f"{med['new'][0] / med['old'][0]:.2f} | {med['old'][1]:.3f} | {med['new'][1]:.3f} | "
                      f"{diff:.1e} |", flush=True)
            s, f = rows["auto"], rows["functorch"]
            print(f"| {name} | {case} | default vs functorch | {f['old'][0] / s['old'][0]:.2f}x | "
                  f"{f['new'][0] / s['new'][0]:.2f}x | | | | |", flush=True)


if __name__ == "__main__":
    main()
