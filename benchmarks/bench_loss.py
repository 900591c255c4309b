"""Cost of the training criterion (nnsim.SimilarityLoss), side by side in one process.

1. Wall-clock of one training step (forward, loss, backward, Adam) of the authors' MNIST CNN for the
   baseline and each criterion variant, at 1 / 8 / 32 same-class pairs per step.
2. The criterion (value + backward to the parameters) for n pairs: nnsim's batched pairs (one forward, d
   backward passes to the layer outputs with create_graph, pair products from the layer factors) against the
   naive recipe (one ``autograd.grad(create_graph=True)`` per sample, flattened gradients, cosines), at
   8 / 32 / 128 pairs, on the authors' CNN and an MLP 784-256-256-10. Both give the same numbers (checked).

Run: ``python benchmarks/bench_loss.py [--repeats 5] [--threads 1]``. Prints markdown tables (medians).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import nnsim
from nnsim.experiments.mnist_criterion import InnerConvNet


def naive_loss(model: nn.Module, x: torch.Tensor, pairs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The authors' recipe, per pair: create_graph gradients of the posnegflat score, flattened, cosine."""
    params = [p for p in model.parameters() if p.requires_grad]
    cache: dict[int, torch.Tensor] = {}

    def g(i: int) -> torch.Tensor:
        if i not in cache:
            z = model(x[i : i + 1])
            m = nnsim.outputs.posnegflat_mask(targets[i : i + 1], z.shape[1], z.dtype)
            s = (m * torch.log_softmax(z, -1)).sum()
            cache[i] = torch.cat([t.reshape(-1) for t in torch.autograd.grad(s, params, create_graph=True)])
        return cache[i]

    terms = [1 - F.cosine_similarity(g(i), g(j), dim=0) for i, j in pairs.tolist()]
    return torch.stack(terms).mean()


def train_step(model, opt, reg, x, y, pairs) -> None:
    loss = F.cross_entropy(model(x), y)
    if reg is not None:
        loss = loss + reg(x, pairs, y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def criterion_grads(loss_fn, params, x, pairs, y) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss_fn(x, pairs, y), params))


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (plans, allocator)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", default="8,32,128")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats}\n")

    # 1. one training step per variant
    print("| pairs/step | baseline | one_minus | authors | distance | one_minus / baseline |")
    print("|---|---|---|---|---|---|")
    for P in (1, 8, 32):
        x = torch.randn(2 * P, 1, 28, 28)
        y = torch.arange(P).repeat_interleave(2) % 10
        pairs = torch.arange(2 * P).view(P, 2)
        row = {}
        for v in ("baseline", "one_minus", "authors", "distance"):
            model = InnerConvNet()
            opt = torch.optim.Adam(model.parameters())
            reg = None if v == "baseline" else nnsim.SimilarityLoss(model, output="posnegflat", variant=v)
            row[v] = timed(functools.partial(train_step, model, opt, reg, x, y, pairs), args.repeats)
        print(f"| {P} | " + " | ".join(f"{row[v] * 1e3:.0f} ms" for v in row)
              + f" | {row['one_minus'] / row['baseline']:.1f}× |")

    # 2. batched pairs vs the naive per-pair create_graph loop
    print("\n| model | pairs | nnsim (batched) | naive per-sample create_graph | speed-up | max rel. diff of grads |")
    print("|---|---|---|---|---|---|")
    for name, make in (("authors' CNN (317k)", InnerConvNet), ("MLP 784-256-256-10 (269k)", mlp)):
        for P in (int(p) for p in args.pairs.split(",")):
            torch.manual_seed(1)
            model = make()
            params = list(model.parameters())
            x = torch.randn(2 * P, 1, 28, 28)
            y = torch.arange(P).repeat_interleave(2) % 10
            pairs = torch.arange(2 * P).view(P, 2)
            reg = nnsim.SimilarityLoss(model, output="posnegflat")
            ours = functools.partial(criterion_grads, reg, params, x, pairs, y)
            naive = functools.partial(criterion_grads, functools.partial(naive_loss, model), params, x, pairs, y)
            ga, gb = ours(), naive()
            diff = max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(ga, gb))
            t_ours, t_naive = timed(ours, args.repeats), timed(naive, max(1, args.repeats // 2))
            print(f"| {name} | {P} | {t_ours * 1e3:.0f} ms | {t_naive * 1e3:.0f} ms | {t_naive / t_ours:.1f}× "
                  f"| {diff:.1e} |")


if __name__ == "__main__":
    main()
