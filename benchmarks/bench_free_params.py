"""Free parameters (class token, position table, layer scale) used directly by a parent's forward: the
"free parameters" method (pull back only the operations that use them) against the per-module fallback of
the parent (a re-run of the whole parent per sample, the behaviour before), torch.func and the loop oracle,
side by side in one process. Run: PYTHONPATH=src python benchmarks/bench_free_params.py [N]"""

from __future__ import annotations

import sys
import time

import torch
from torch import Tensor, nn

import nnsim
from nnsim.backends import structured

torch.set_num_threads(1)


class ViTRoot(nn.Module):
    """Patch embedding, class token and position table in the root's forward, 2 encoder layers, a head."""

    def __init__(self, C: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, C, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.pos = nn.Parameter(torch.randn(1, 17, C))
        self.blocks = nn.ModuleList([nn.TransformerEncoderLayer(C, 2, 64, dropout=0.0, batch_first=True)
                                     for _ in range(layers)])
        self.gamma = nn.Parameter(torch.full((C,), 0.5))  # a layer scale on the last block's output
        self.head = nn.Linear(C, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.head(self.gamma * h[:, 0])


def _no_free(plan_fn):
    def wrapped(self, probe):
        plan = plan_fn(self, probe)
        for e in plan.hooked.values():
            e.free = False
        return plan
    return wrapped


def timed(sim: nnsim.Similarity, x: Tensor, reps: int = 3) -> float:
    sim.kernel(x[:4])  # planning, paid once
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        sim.kernel(x)
        best = min(best, time.perf_counter() - t)
    return best


def main(N: int = 64) -> None:
    torch.manual_seed(0)
    model = ViTRoot().eval()
    x = torch.randn(N, 3, 16, 16)
    print(f"ViT-like model, P = {sum(p.numel() for p in model.parameters())}, N = {N}, best of 3 (s)")
    print("| d | free parameters | parent fallback (before) | ratio | torch.func | loop |")
    print("|---|---|---|---|---|---|")
    original = structured.Structured._initial_plan
    for d, output in ((1, nnsim.outputs.logits(0)), (10, None)):
        t_free = timed(nnsim.Similarity(model, output=output, progress=False), x)
        structured.Structured._initial_plan = _no_free(original)
        try:
            t_fb = timed(nnsim.Similarity(model, output=output, progress=False), x)
        finally:
            structured.Structured._initial_plan = original
        t_func = timed(nnsim.Similarity(model, output=output, backend="functorch", progress=False), x, 1)
        t_loop = timed(nnsim.Similarity(model, output=output, backend="loop", progress=False), x, 1)
        print(f"| {d} | {t_free:.3f} | {t_fb:.3f} | {t_fb / t_free:.2f}x | {t_func:.3f} | {t_loop:.3f} |", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64)
