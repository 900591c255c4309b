"""The per-sample pass at d > 1: the structured backend's signals stored as the rules read them, or not.

For each zoo model and case (``d=10``: ``sim.similarity(x, reduce=None)`` [N, N, 10, 10]; ``d=1``: the first
logit, ``sim.similarity(x)``), nnsim's default backend runs with the signal layouts of issue 14 part 8 ("new":
the d outputs' signals assembled once in the order the Linear / Conv rules' products read, see
``nnsim.backends.rules.SIGNAL_LAYOUTS``) and without them ("old": contiguous [B, d, *S] signals, permuted and
copied again by the rules, as in git 4f4d15d), alternating, on a plan kept from a warm-up call; nnsim's
``functorch`` backend runs in the same loop as the baseline. Reported: median CPU time (``time.process_time``,
1 thread) of the whole call and of the per-sample gradients (``Chunker._factor_groups``), the ratios, and the
largest relative difference of old and new results.

Usage: PYTHONPATH=src python benchmarks/bench_speed_pass.py [--models convnext-like,vit] [--cases d=10,d=1]
       [--n 256] [--repeats 3]
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

chunks = importlib.import_module("nnsim.engine.chunks")
structured = importlib.import_module("nnsim.backends.structured")

warnings.filterwarnings("ignore")

NEW_LAYOUT = structured.signal_layout


def _no_layout(rule, module, ndim):  # noqa: ANN001, ANN202  (the old path: contiguous [B, d, *S] signals)
    return None


def call(sim: nnsim.Similarity, x: torch.Tensor, case: str, layout) -> tuple[torch.Tensor, float, float]:  # noqa: ANN001
    spent = [0.0]
    inner = chunks.Chunker._factor_groups

    def timed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        c0 = time.process_time()
        out = inner(self, *args, **kwargs)
        spent[0] += time.process_time() - c0
        return out

    chunks.Chunker._factor_groups, structured.signal_layout = timed, layout
    try:
        gc.collect()
        c0 = time.process_time()
        out = sim.similarity(x, reduce="trace" if case == "d=1" else None)
        return out, time.process_time() - c0, spent[0]
    finally:
        chunks.Chunker._factor_groups, structured.signal_layout = inner, NEW_LAYOUT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="convnext-like,vit,transformer-encoder,hf-bert,resnet-small")
    p.add_argument("--cases", default="d=10")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    print("| model | case | total old [s] | total new [s] | new/old | pass old [s] | pass new [s] | "
          "functorch total [s] | functorch pass [s] | vs functorch old | vs functorch new | max rel diff |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model, xs = ZOO[name](args.n)
        x = xs[0]
        for case in args.cases.split(","):
            output = (lambda out, inputs: out[:, :1]) if case == "d=1" else None
            sims = {b: nnsim.Similarity(model, output=output, backend=b, progress=False) for b in ("auto", "functorch")}
            for sim in sims.values():  # warm-up: the plan is kept
                sim.similarity(x[:4], reduce="trace" if case == "d=1" else None)
            runs: dict[str, list] = {"old": [], "new": [], "functorch": []}
            outs = {}
            for _ in range(args.repeats):
                for label, sim, layout in (("old", sims["auto"], _no_layout), ("new", sims["auto"], NEW_LAYOUT),
                                           ("functorch", sims["functorch"], NEW_LAYOUT)):
                    outs[label], total, g = call(sim, x, case, layout)
                    runs[label].append((total, g))
                    print(f"  {name} {case} {label}: {total:.3f} s (pass {g:.3f} s)", file=sys.stderr, flush=True)
            med = {k: (statistics.median(t for t, _ in v), statistics.median(g for _, g in v)) for k, v in runs.items()}
            a, b = outs["old"].double(), outs["new"].double()
            fin = torch.isfinite(a)
            diff = float((a[fin] - b[fin]).abs().max() / a[fin].abs().max())
            o, n, f = med["old"], med["new"], med["functorch"]
            print(f"| {name} | {case} | {o[0]:.3f} | {n[0]:.3f} | {n[0] / o[0]:.2f} | {o[1]:.3f} | {n[1]:.3f} | "
                  f"{f[0]:.3f} | {f[1]:.3f} | {f[0] / o[0]:.2f}x | {f[0] / n[0]:.2f}x | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
