"""The cost of analysing a torch.export program (.pt2) instead of the nn.Module, on the demo CNN.

    make demo && python benchmarks/bench_pt2.py nnsim-demo

Side by side in one process, one torch thread, best of two runs: the demo's model rebuilt from its factory and
state dict (nnsim's structured layer rules apply) against the same weights loaded from ``model.pt2`` by the
command line's loader (a graph of aten operations: nnsim's generic per-module path). Prints a markdown table.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

import nnsim
from nnsim.cli.demo import digits_cnn
from nnsim.cli.loading import load_model


def main(folder: str) -> None:
    torch.set_num_threads(1)
    module = digits_cnn()
    module.load_state_dict(torch.load(f"{folder}/weights.pt", weights_only=True))
    module.eval()
    program = load_model(f"{folder}/model.pt2")
    x = torch.from_numpy(np.load(f"{folder}/data.npz")["x"])
    steps = {
        f"density ({len(x)}, linear)": lambda s: s.density(x),
        f"neighbors k=10 ({len(x)} x {len(x)})": lambda s: s.neighbors(x, k=10, exclude_self=True),
        f"denoising approximate dim=256 ({len(x)})": lambda s: s.denoising(x, approximate=True, dim=256),
        "denoising exact (first 300)": lambda s: s.denoising(x[:300]),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(2):
        for name, fn in steps.items():
            for route, model in (("module", module), ("pt2", program)):
                sim = nnsim.Similarity(model, progress=False)
                t0 = time.perf_counter()
                fn(sim)
                times.setdefault((name, route), []).append(time.perf_counter() - t0)
    print("| step | nn.Module | .pt2 | .pt2 / module |\n|---|---|---|---|")
    for name in steps:
        a, b = min(times[(name, "module")]), min(times[(name, "pt2")])
        print(f"| {name} | {a:.2f} s | {b:.2f} s | {b / a:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "nnsim-demo")
