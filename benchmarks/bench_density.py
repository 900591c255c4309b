"""Soft density (neighbour counts) on Fashion-MNIST: the authors' recipe vs torch.func vs nnsim matrix-free.

Data: Fashion-MNIST training images (Debian's dataset-fashion-mnist; ``--n`` of them, default all 60 000).
Models (seeded random init, float32): MLP 784-256-256-10 and CNN conv(1->16,3) relu pool conv(16->32,3) relu
pool linear(800->10). Output: the 10 logits; density = sum_j tr K~(x_i, x_j) / 10 (normalised, self included).

Methods, each computing the same N_soft for every sample:
  * authors: the recipe of the authors' code: one sample at a time, d backward passes give G [P, d],
    U = G K^-1/2 (eigendecomposition), pass 1 accumulates S = sum U, pass 2 recomputes U and scores
    tr(U^T S) / d. Run on ``--n-authors`` samples and extrapolated linearly to N (both passes are linear).
  * functorch: per-sample Jacobians materialised by ``vmap(jacrev)`` in chunks of 64, same two passes.
    Run on ``--n-functorch`` samples, extrapolated linearly.
  * nnsim: ``Similarity(model).density(x)`` on all N (matrix-free: layer factors, no per-sample gradient).
Unit: one epoch = a forward + backward pass (cross-entropy) over the same N samples in batches of 256.
Peak memory: each method (and one training step of batch 256) in a fresh spawn worker; the figure is the
peak RSS during the call minus the RSS before it (VmHWM after resetting it through /proc/self/clear_refs).
Correctness: nnsim's counts are compared with the functorch recipe's on the first ``--n-check`` samples
(both using that subset as the reference set).

Neighbours: exact ``sim.neighbors`` for ``--queries`` test images among the N training images (k = 10);
and, when ``nnsim.FeatureIndex`` exists, its build and query time and recall@10.

Usage: python benchmarks/bench_density.py [--n 60000] [--quick] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import tempfile
import time

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import nnsim


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "MLP":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                             nn.Linear(256, 10))
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 10))


def inv_sqrt(K: Tensor) -> Tensor:
    return nnsim.algebra.inv_sqrt_psd(K)[0]


# ------------------------------------------------------------------------------------------------ methods
def epoch(model: nn.Module, x: Tensor) -> None:
    y = torch.zeros(len(x), dtype=torch.long)
    for s in range(0, len(x), 256):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[s : s + 256]), y[s : s + 256]).backward()


def authors(model: nn.Module, x: Tensor) -> Tensor:
    params = [p for p in model.parameters()]

    def U(i: int) -> Tensor:
        y = model(x[i : i + 1])[0]
        G = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(y[c], params, retain_graph=True)])
                         for c in range(y.shape[0])], dim=1)  # [P, d]
        return G @ inv_sqrt(G.T @ G)

    S = sum(U(i) for i in range(len(x)))
    return torch.stack([(U(i) * S).sum() / 10 for i in range(len(x))])


def functorch(model: nn.Module, x: Tensor, chunk: int = 64) -> Tensor:
    p0 = {n: p.detach() for n, p in model.named_parameters()}

    def f(p: dict, xi: Tensor) -> Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),))[0]

    def U(xs: Tensor) -> Tensor:
        jac = vmap(jacrev(f), in_dims=(None, 0))(p0, xs)
        G = torch.cat([j.reshape(len(xs), 10, -1) for j in jac.values()], dim=2)  # [B, d, P]
        return inv_sqrt(G @ G.transpose(1, 2)) @ G

    S = sum(U(x[s : s + chunk]).sum(0) for s in range(0, len(x), chunk))
    return torch.cat([(U(x[s : s + chunk]) * S).sum((1, 2)) / 10 for s in range(0, len(x), chunk)])


def nnsim_density(model: nn.Module, x: Tensor) -> Tensor:
    return nnsim.Similarity(model, progress=False).density(x)


METHODS = {"authors": authors, "functorch": functorch, "nnsim": nnsim_density}


# ------------------------------------------------------------------------------------------------- memory
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def _memory_worker(args: tuple) -> float:
    name, method, n, threads = args
    torch.set_num_threads(threads)
    model = build(name)
    x = nnsim.datasets.load_fashion_mnist("train", limit=n)[0]
    fn = (lambda m, d: epoch(m, d[:256])) if method == "train step" else METHODS[method]
    fn(model, x[:8])  # warm-up: imports, allocator, planning
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak-RSS mark
    before = _rss_kb("VmRSS")
    fn(model, x)
    return (_rss_kb("VmHWM") - before) / 1024


def peak_mb(name: str, method: str, n: int, threads: int) -> float:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.map(_memory_worker, [(name, method, n, threads)])[0]


# ------------------------------------------------------------------------------------------------- main
def timed(fn, *args) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--n-authors", type=int, default=300)
    ap.add_argument("--n-functorch", type=int, default=3000)
    ap.add_argument("--n-check", type=int, default=500)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.n, args.n_authors, args.n_functorch, args.n_check, args.queries = 2000, 30, 200, 100, 50
    torch.set_num_threads(args.threads)
    x = nnsim.datasets.load_fashion_mnist("train", limit=args.n)[0]
    q = nnsim.datasets.load_fashion_mnist("test", limit=args.queries)[0]
    N = len(x)
    print(f"# bench_density: N = {N} Fashion-MNIST training images, torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}\n")
    print("| model | method | samples run | time for N (s) | epochs | vs authors | peak MB | "
          "peak / train step |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("MLP", "CNN"):
        model = build(name)
        nnsim_density(model, x[:16])  # warm-up
        t_epoch, _ = timed(epoch, model, x)
        sub_a, sub_f = x[: args.n_authors], x[: args.n_functorch]
        t_a, _ = timed(authors, model, sub_a)
        t_f, _ = timed(functorch, model, sub_f)
        t_n, _ = timed(nnsim_density, model, x)
        times = {"authors": t_a * N / len(sub_a), "functorch": t_f * N / len(sub_f), "nnsim": t_n}
        runs = {"authors": len(sub_a), "functorch": len(sub_f), "nnsim": N}
        mem_n = min(N, 5000)
        mem_train = peak_mb(name, "train step", mem_n, args.threads)
        for method in ("authors", "functorch", "nnsim"):
            mem = peak_mb(name, method, {"authors": 50, "functorch": 500, "nnsim": mem_n}[method], args.threads)
            extrap = "" if runs[method] == N else " (extrapolated)"
            print(f"| {name} | {method}{extrap} | {runs[method]} | {times[method]:.1f} | "
                  f"{times[method] / t_epoch:.1f} | {times['authors'] / times[method]:.0f}x | {mem:.0f} | "
                  f"{mem / max(mem_train, 1e-9):.2f} |")
        print(f"| {name} | one epoch (fwd+bwd, batch 256) | {N} | {t_epoch:.2f} | 1.0 | | {mem_train:.0f} "
              "(one step) | 1.00 |")
        check = x[: args.n_check]
        err = (nnsim_density(model, check) - functorch(model, check)).abs().max().item()
        print(f"\n{name}: max |nnsim - functorch recipe| on {len(check)} samples = {err:.2e}\n")

        sim = nnsim.Similarity(model, progress=False)
        t_nb, (vals, idx) = timed(sim.neighbors, q, x, 10)
        line = f"{name} neighbours: exact top-10 of {len(q)} queries among {N}: {t_nb:.1f} s"
        if hasattr(nnsim, "FeatureIndex"):
            with tempfile.TemporaryDirectory() as tmp:
                t_b, index = timed(nnsim.FeatureIndex.build, sim, x, tmp)
                t_q, (_, i2) = timed(index.search, q, 10)
                t_r, (_, i3) = timed(index.search, q, 10, None, x)  # candidates re-ranked exactly on x
                recall, recall_r = (sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, found))
                                    / idx.numel() for found in (i2, i3))
            line += (f"; FeatureIndex build {t_b:.1f} s, query {t_q:.2f} s (recall@10 {recall:.3f}), "
                     f"query + exact re-rank {t_r:.1f} s (recall@10 {recall_r:.3f})")
        print(line + "\n")


if __name__ == "__main__":
    main()
