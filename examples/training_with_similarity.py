"""Enforcing similarity in a plain PyTorch training loop (nnsim.SimilarityLoss).

A small CNN learns scikit-learn's 8x8 digits from few labelled images. Besides the cross-entropy, the
criterion asks the network to treat as similar (1 - cosine of the parameter gradients of the class score)
two kinds of known-similar pairs in every minibatch:

* same-label pairs, drawn from the minibatch (``nnsim.pairs.same_label``);
* an image and a randomly shifted copy of it (``nnsim.pairs.augmented``).

Run: ``python examples/training_with_similarity.py [--steps 150] [--weight 0.3]``. It prints the test
accuracy and the mean similarity of same-label test pairs, with and without the criterion, over a few seeds.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import nnsim


def make_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def shift(x: torch.Tensor) -> torch.Tensor:
    """Each image moved by one pixel in a random direction (zero fill)."""
    dx, dy = torch.randint(-1, 2, (2,)).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(x, y, steps: int, weight: float, seed: int, batch: int = 32) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    # The class score of each image's own label (the authors' "posnegflat" scalarisation).
    reg = nnsim.SimilarityLoss(model, output="posnegflat", variant="one_minus", weight=weight)
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,))
        xb, yb = x[idx], y[idx]
        loss = F.cross_entropy(model(xb), yb)
        if weight > 0:
            # Same-label pairs inside the batch, and (image, shifted image) pairs.
            same = nnsim.pairs.same_label(yb, 16, replacement=True)
            both, aug = nnsim.pairs.augmented(xb[:8], shift)
            loss = loss + reg(xb, same, yb) + reg(both, aug, torch.cat([yb[:8], yb[:8]]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--weight", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--train", type=int, default=300, help="labelled training images")
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, y = nnsim.datasets.load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[: args.train], perm[args.train :]
    test_pairs = nnsim.pairs.same_label(y[te], 500, generator=torch.Generator().manual_seed(1))
    print(f"{args.train} training images, {len(te)} test images, {args.steps} steps of 32 images")
    print("| criterion weight | seed | test accuracy | same-label test pair similarity | time / step |")
    print("|---|---|---|---|---|")
    for weight in (0.0, args.weight):
        for seed in range(args.seeds):
            model, dt = train(x[tr], y[tr], args.steps, weight, seed)
            with torch.no_grad():
                acc = float((model(x[te]).argmax(1) == y[te]).float().mean())
            probe = nnsim.SimilarityLoss(model, output="posnegflat")
            rho = float(probe.pair_similarities(x[te], test_pairs, y[te]).detach().mean())
            print(f"| {weight} | {seed} | {100 * acc:.1f} % | {rho:.3f} | {1e3 * dt:.0f} ms |")


if __name__ == "__main__":
    main()
