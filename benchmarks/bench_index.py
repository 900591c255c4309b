"""Recall of ``nnsim.FeatureIndex``'s projection against the exact neighbours, per row width, before / after.

For each model: exact top-10 (``Similarity.neighbors``) of the queries among the data, then, per projection
and row width W (numbers per sample and output-summed row), the recall@10 of the projected scores alone
("proj") and the fraction of the exact top-10 among the top-C projected candidates (= recall@10 after the
exact re-ranking of C candidates, which is exact) for C in --candidates. Projections:

* ``kronecker``: the per-layer Kronecker-structured Gaussian projection of nnsim <= 0.x (``Similarity.features``,
  ``dim`` per layer, the width is what that gives), as stored before this change;
* ``gaussian``: a dense Gaussian projection of the explicit U(x) to W dims (the reference; small models only);
* ``sketch``: the index's CountSketch of vec(U(x)), uncentred;
* ``sketch+centre``: the same, centred as the store does (rows [S u, <u, c>], queries [S u_q - S c, 1]).

Then one real ``FeatureIndex.build`` + ``search(data=...)`` at the defaults: recall, build time per sample, size.
Models: the demo (``nnsim demo``: CNN trained 30 epochs on scikit-learn digits with 10 % flipped labels; 200
queries held out of the 1 797 digits), and the benchmark MLP and CNN of bench_density.py (random init,
Fashion-MNIST, --n training images, --queries test images), all with the 10 logits (d = 10).

    python benchmarks/bench_index.py [--n 5000] [--queries 200] [--widths 1024 2048 4096] [--quick]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

import nnsim
from nnsim.cli.demo import noisy_digits, train_demo_model
from nnsim.index import DEFAULT_DIM, FeatureIndex
from nnsim.index import features as ft
from nnsim.inputs import as_source

sys.path.insert(0, str(Path(__file__).parent))
from bench_density import build  # noqa: E402


def recalls(scores: Tensor, exact: Tensor, cands: list[int]) -> list[float]:
    """[proj recall@10, candidate recall at each C]."""
    out = []
    for c in [exact.shape[1], *cands]:
        top = scores.topk(min(c, scores.shape[1]), dim=1).indices
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(exact, top))
        out.append(hits / exact.numel())
    return out


def rows_of(sim: nnsim.Similarity, x: Tensor, proj: ft.Projection, chunk: int = 64) -> tuple[Tensor, Tensor, float]:
    """Data rows [N, W+1] and query-style rows without centring [N, W]; seconds per sample (data rows)."""
    data, plain = [], []
    t0 = time.perf_counter()
    for s in range(0, len(x), chunk):
        r, _ = ft.data_rows(sim, (x[s : s + chunk],), s, proj)
        data.append(r.double())
    t = (time.perf_counter() - t0) / len(x)
    for s in range(0, len(x), chunk):
        factors, _ = sim.corrected_factors((x[s : s + chunk],), s)
        plain.append(proj.sketch(sim, factors).double())
    return torch.cat(data), torch.cat(plain), t


def gaussian_rows(sim: nnsim.Similarity, x: Tensor, width: int, seed: int = 0, chunk: int = 64) -> Tensor:
    out = []
    gen = torch.Generator().manual_seed(seed)
    R = None
    for s in range(0, len(x), chunk):
        factors, _ = sim.corrected_factors((x[s : s + chunk],), s)
        u = torch.cat([f.dense().g for f in factors], -1).flatten(1).double() / math.sqrt(sim.d_eff)
        if R is None:
            R = torch.randn(u.shape[1], width, generator=gen, dtype=torch.float64) / math.sqrt(width)
        out.append(u @ R)
    return torch.cat(out)


def run_case(name: str, sim: nnsim.Similarity, x: Tensor, q: Tensor, widths: list[int], cands: list[int],
             dense_max: int) -> None:
    t0 = time.perf_counter()
    _, exact = sim.neighbors(q, x, 10)
    t_exact = time.perf_counter() - t0
    n_params = sum(p.numel() for p in sim.params.values())
    ex_sims = sim.similarity(q, x)
    tenth = ex_sims.topk(10, dim=1).values[:, -1]
    print(f"\n### {name}: N = {len(x)}, {len(q)} queries, P = {n_params}, d = {sim.d}; exact top-10 {t_exact:.1f} s; "
          f"median similarity {ex_sims.median():.3f}, median 10th-best {tenth.median():.3f}\n")
    head = " | ".join(f"C={c}" for c in cands)
    print(f"| projection | W (numbers per row) | proj recall@10 | {head} | rows ms/sample | float16 MB |")
    print("|---|---|---|" + "---|" * len(cands) + "---|---|")

    def line(label: str, width: int, scores: Tensor, ms: float | str) -> None:
        r = recalls(scores, exact, cands)
        mb = len(x) * (width + 1) * 2 / 2**20
        ms_s = f"{ms:.2f}" if isinstance(ms, float) else ms
        print(f"| {label} | {width} | {r[0]:.3f} | " + " | ".join(f"{v:.3f}" for v in r[1:])
              + f" | {ms_s} | {mb:.1f} |", flush=True)

    for dim in (1024,):  # the old default: dim per layer
        t0 = time.perf_counter()
        fx = sim.features(x, dim).flatten(1).double()
        ms = (time.perf_counter() - t0) / len(x) * 1e3
        fq = sim.features(q, dim).flatten(1).double()
        line(f"kronecker (before, dim={dim}/layer)", fx.shape[1], fq @ fx.T, ms)
    for width in widths:
        if sim.d * n_params <= dense_max:
            gx, gq = gaussian_rows(sim, x, width), gaussian_rows(sim, q, width)
            line("gaussian (dense, reference)", width, gq @ gx.T, "-")
        proj = ft.make_projection(sim, as_source(x, "data"), width, 0)
        data, plain_x, per = rows_of(sim, x, proj)
        _, plain_q, _ = rows_of(sim, q, proj)
        line("sketch", width, plain_q @ plain_x.T, "-")
        qc = torch.cat([plain_q - proj.centre_projected, torch.ones(len(q), 1, dtype=torch.float64)], 1)
        line("sketch+centre (after)", width, qc @ data.T, per * 1e3)


def end_to_end(name: str, sim: nnsim.Similarity, x: Tensor, q: Tensor) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        index = FeatureIndex.build(sim, x, tmp)  # defaults
        t_b = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 2**20
        t0 = time.perf_counter()
        r = index.recall(q, x, 10)
        t_q = time.perf_counter() - t0
        print(f"\n{name}, FeatureIndex defaults (dim={DEFAULT_DIM}, dtype={index.dtype}, candidates="
              f"{nnsim.index.feature_index.default_candidates(10)}): recall@10 after re-ranking {r:.4f}; build "
              f"{t_b:.1f} s ({t_b / len(x) * 1e3:.2f} ms/sample), store {size:.1f} MB, recall() {t_q:.1f} s",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--widths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--candidates", type=int, nargs="+", default=[50, 100, 200])
    ap.add_argument("--dense-max", type=int, default=100_000, help="largest d P with a dense Gaussian reference")
    ap.add_argument("--models", nargs="+", default=["demo", "MLP", "CNN"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.n, args.queries, args.widths = 1000, 50, [1024]
    torch.set_num_threads(args.threads)
    print(f"# bench_index: torch {torch.__version__}, {args.threads} thread(s)")
    for name in args.models:
        if name == "demo":
            data = noisy_digits()
            model = train_demo_model(data)
            x, q = data.x[200:], data.x[:200]
        else:
            model = build(name)
            x = nnsim.datasets.load_fashion_mnist("train", limit=args.n)[0]
            q = nnsim.datasets.load_fashion_mnist("test", limit=args.queries)[0]
        sim = nnsim.Similarity(model, progress=False)
        run_case(name, sim, x, q, args.widths, args.candidates, args.dense_max)
        end_to_end(name, sim, x, q)


if __name__ == "__main__":
    main()
