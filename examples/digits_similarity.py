"""Which digits does a trained network lump together? (run by `make demo`)

Trains a small MLP on scikit-learn's bundled 8x8 digits (seeded, a few seconds on a CPU), then asks nnsim
how similar the network considers the test digits: the class-by-class mean similarity table and, for a
few test digits, the training digits the network sees as most similar.
"""

from __future__ import annotations

import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import nnsim


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        for idx in train[torch.randperm(len(train))].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"MLP 64-64-64-10 on sklearn digits: test accuracy {acc:.3f} ({len(train)} train, {len(test)} test)")

    # Vector output: the 10 logits, normalised kernel, scalar summary tr(K~)/d.
    sim = nnsim.Similarity(model, progress=False)
    t0 = time.perf_counter()
    S = sim.similarity(x[test])  # [397, 397]
    t1 = time.perf_counter()
    print(f"\n{len(test)}x{len(test)} similarity, d = 10 logits, all {sum(p.numel() for p in sim.params.values())} "
          f"parameters: {t1 - t0:.2f} s")
    print("\nMean similarity between test digits of each pair of classes (rows/cols: true class)")
    yt = y[test]
    print("     " + "".join(f"{c:>6d}" for c in range(10)))
    for a in range(10):
        row = [S[yt == a][:, yt == b].nanmean().item() for b in range(10)]
        print(f"{a:>5d}" + "".join(f"{v:6.2f}" for v in row))

    # Scalar output: the authors' posnegflat score of the predicted class; retrieval among training digits.
    scalar = nnsim.Similarity(model, output=nnsim.outputs.log_softmax_mask("predicted"), progress=False)
    queries = test[:5]
    Sq = scalar.similarity(x[queries], x[train])  # [5, 1400] gradient cosines
    top = Sq.topk(5, dim=1)
    print("\nMost similar training digits for five test digits (scalar posnegflat output, gradient cosine)")
    for i, q in enumerate(queries.tolist()):
        pairs = zip(top.values[i].tolist(), top.indices[i].tolist())
        neigh = ", ".join(f"{y[train[j]].item()} ({s:.2f})" for s, j in pairs)
        print(f"  test digit {y[q].item()} -> {neigh}")


if __name__ == "__main__":
    main()
