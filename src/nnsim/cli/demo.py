"""The embedded demo: a small CNN trained on scikit-learn's digits with 10 % of the labels flipped.

The digits carry nuisance variation, as real images do: each 8x8 digit is placed on a 12x12 canvas shifted by up
to 2 pixels, with a random contrast, background level and pixel noise. Neighbours in pixel space then often
carry another label (a shifted 1 is closer to a shifted 7 than to a centred 1), the network's neighbours much
less: that is where its similarity adds something to an input-space k-NN vote.

Everything is seeded. :func:`digits_cnn` is importable as a model factory (``nnsim.cli.demo:digits_cnn``),
so the demo's weights also work through the ``package.module:factory`` + state-dict route.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import datasets, distributed
from .runtime import write_file

NOISE_FRACTION = 0.10
CANVAS = 12  # the 8x8 digits on a 12x12 canvas
MAX_SHIFT = 2  # pixels, each axis, around the centre
EPOCHS = 30
SEED = 0


def digits_cnn() -> nn.Sequential:
    """conv(1->16, 3x3) - ReLU - maxpool 2 - conv(16->32, 3x3) - ReLU - maxpool 2 - linear(288->10), 12x12 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 12 -> 6
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 6 -> 3
        nn.Flatten(), nn.Linear(32 * 3 * 3, 10),
    )


@dataclass
class DemoData:
    """Digits ``x [N, 1, 12, 12]`` (with nuisance variation, see :func:`nuisance`), the noisy labels ``y [N]`` the
    model is trained on, the true labels, and which labels were flipped ``[N] bool``."""

    x: Tensor
    y: Tensor
    y_true: Tensor
    flipped: Tensor


def nuisance(x: Tensor, seed: int = SEED + 1) -> Tensor:
    """[N, 1, 8, 8] digits in [0, 1] -> [N, 1, 12, 12]: each shifted by up to :data:`MAX_SHIFT` pixels per axis,
    scaled by a contrast in [0.35, 1], on a background level in [0, 0.3], plus Gaussian noise (std 0.08); seeded."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    offset = torch.randint(-MAX_SHIFT, MAX_SHIFT + 1, (n, 2), generator=g) + (CANVAS - 8) // 2
    contrast = 0.35 + 0.65 * torch.rand(n, 1, 1, 1, generator=g)
    background = 0.3 * torch.rand(n, 1, 1, 1, generator=g)
    out = torch.zeros(n, 1, CANVAS, CANVAS)
    for i, (r, c) in enumerate(offset.tolist()):
        out[i, :, r:r + 8, c:c + 8] = x[i]
    return background + contrast * out + 0.08 * torch.randn(out.shape, generator=g)


def noisy_digits(fraction: float = NOISE_FRACTION, seed: int = SEED) -> DemoData:
    """All 1797 digits (with :func:`nuisance` variation) with ``fraction`` of the labels replaced by a different
    class drawn uniformly (seeded)."""
    x, y_true = datasets.load_digits()
    x = nuisance(x)
    g = torch.Generator().manual_seed(seed)
    n = len(y_true)
    flip = torch.randperm(n, generator=g)[: round(fraction * n)]
    y = y_true.clone()
    y[flip] = (y_true[flip] + torch.randint(1, 10, (len(flip),), generator=g)) % 10  # never the true class
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[flip] = True
    return DemoData(x, y, y_true, flipped)


def train_demo_model(data: DemoData, epochs: int = EPOCHS, seed: int = SEED, progress: bool = False) -> nn.Sequential:
    """Adam, batch 64, ``epochs`` epochs on the noisy labels (seeded); returns the model in eval mode."""
    torch.manual_seed(seed)
    model = digits_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="nnsim demo: training", unit="epoch", disable=not progress):
        for idx in torch.randperm(len(data.x), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            opt.step()
    return model.eval()


def export_model(model: nn.Module, example: Tensor, path: str) -> None:
    """Save ``model`` as a ``torch.export`` program with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example[:2],), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)


def _train_and_save(out: Path, log: Callable[[str], None], progress: bool, comm: Any, main: bool
                    ) -> tuple[DemoData, nn.Module, float, float]:
    """Rank 0 trains the CNN and writes model.pt2, weights.pt and data.npz; the other ranks receive its weights.
    Returns the data, the model and its agreement with the noisy and with the true labels."""
    with distributed.together(comm):
        data = noisy_digits()  # seeded: the same samples on every rank
        if main:
            out.mkdir(parents=True, exist_ok=True)
            log(f"[train] CNN on {len(data.x)} scikit-learn digits (shifted, contrast, noise), "
                f"{int(data.flipped.sum())} labels flipped ({NOISE_FRACTION:.0%}), {EPOCHS} epochs ...")
            t = time.perf_counter()
            model = train_demo_model(data, progress=progress)
        else:
            model = digits_cnn().eval()  # rank 0's weights arrive below
    distributed.broadcast_module(model)
    with distributed.together(comm):
        with torch.no_grad():
            pred = model(data.x).argmax(1)
        acc_noisy = float((pred == data.y).float().mean())
        acc_true = float((pred == data.y_true).float().mean())
        if main:
            log(f"[train] done in {time.perf_counter() - t:.1f} s: agrees with the noisy labels on {acc_noisy:.3f}, "
                f"with the true labels on {acc_true:.3f}")
            write_file(out / "model.pt2", lambda tmp: export_model(model, data.x, str(tmp)))
            write_file(out / "weights.pt", lambda tmp: torch.save(model.state_dict(), tmp))
            write_file(out / "data.npz", lambda tmp: np.savez(tmp, x=data.x.numpy(), y=data.y.numpy(),
                                                              y_true=data.y_true.numpy(), flipped=data.flipped.numpy()))
            log(f"wrote {out}/model.pt2 (torch.export), {out}/weights.pt (state dict of nnsim.cli.demo:digits_cnn), "
                f"{out}/data.npz (x, noisy labels y, y_true, flipped)")
    return data, model, acc_noisy, acc_true


def _flipped_label_scores(result: Any, flipped: np.ndarray, acc_noisy: float, acc_true: float) -> dict[str, Any]:
    """How well the mislabel score and the baselines find the flipped labels (AUROCs, share of the top list)."""
    from sklearn.metrics import roc_auc_score

    from ..report import SCORES

    score = result.columns["mislabel_score"]
    top = np.argsort(-score, kind="stable")[: int(flipped.sum())]
    return {
        "flipped_labels": int(flipped.sum()),
        "model_agrees_with_noisy_labels": round(acc_noisy, 4), "model_agrees_with_true_labels": round(acc_true, 4),
        "mislabel_score_auroc_for_flipped": round(float(roc_auc_score(flipped, score)), 4),
        "flipped_among_top_scored": round(float(flipped[top].mean()), 4),
        # The same AUROC for the baselines and nnsim's components (sign: higher = more likely flipped).
        "auroc_for_flipped": {key: round(float(roc_auc_score(flipped, sign * result.columns[key])), 4)
                              for key, _, sign in SCORES if key in result.columns},
    }


def run_demo(out: Path, log: Callable[[str], None], progress: bool, write_outputs: Callable[..., None],
             args: Any) -> dict[str, Any]:
    """Train, save ``model.pt2`` / ``weights.pt`` / ``data.npz`` in ``out``, analyse, write the report.

    The analysis runs on the in-memory model (the structured layer rules apply to its Conv2d/Linear layers);
    ``nnsim analyze --model out/model.pt2`` gives the same numbers through the exported program.

    Under ``torchrun``: rank 0 trains and writes the files, :func:`nnsim.distributed.broadcast_module` gives
    its weights to the other ranks (training on every rank would give the same weights only as long as every
    rank sums in the same order: same device, same thread count), then every rank runs the analysis (collective)
    and rank 0 writes the report. Each local step runs inside :class:`nnsim.distributed.together`, so that a
    failure on one rank fails them all instead of leaving them waiting.
    """
    from .. import Similarity
    from .analysis import run_analysis
    from .loading import Data

    t0 = time.perf_counter()
    comm = distributed.resolve(None)
    main = distributed.is_main_process()
    data, model, acc_noisy, acc_true = _train_and_save(out, log, progress, comm, main)
    sim = Similarity(model, progress=progress and main)
    result = run_analysis(sim, model, data.x, data.y, log=log)
    with distributed.together(comm):
        flipped = data.flipped.numpy()
        result.columns["known_mislabelled"] = flipped  # the truth the analysis never saw, for the report's AUROCs
        demo = result.summary["demo"] = _flipped_label_scores(result, flipped, acc_noisy, acc_true)
        log(f"mislabel score finds the flipped labels with AUROC {demo['mislabel_score_auroc_for_flipped']}; "
            f"{demo['flipped_among_top_scored']:.1%} of the {demo['flipped_labels']} top-scored samples were flipped")
        log("AUROC of the baselines: " + ", ".join(f"{key} {v}" for key, v in demo["auroc_for_flipped"].items()))
        result.summary.update(data=f"{out}/data.npz", model=f"{out}/model.pt2")
        result.timings["total"] = round(time.perf_counter() - t0, 2)
        write_outputs(out, Data(data.x, data.y), result, args,
                      title="nnsim demo: a CNN on scikit-learn digits with 10 % flipped labels",
                      subtitle=f"{len(data.x)} digits, shifted, with random contrast and noise; {int(flipped.sum())} "
                               "labels flipped at random; the network's own similarity finds them")
    return result.summary
