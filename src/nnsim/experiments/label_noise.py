"""Label noise on real data: do nnsim's scores find flipped Fashion-MNIST labels? Side by side with cleanlab.

A seeded subset of Fashion-MNIST gets a known fraction of its labels flipped (uniformly to another class).
One small CNN recipe is trained with K-fold cross-validation (K models, each scoring the fold it did not see)
and once on everything (the "full" model). Scores for flagging the flipped samples, all from these models:

* cleanlab 2.9 on the out-of-sample predicted probabilities: ``find_label_issues`` (boolean flags: precision,
  recall, F1) and its self-confidence score ``get_label_quality_scores(method="self_confidence")`` (AUROC);
* nnsim, out of sample (the same K fold models; each held-out image is compared with the fold's training
  images, which its model was trained on):
  - ``density_oos``: soft neighbour count of the held-out image among the training images (label-free);
  - ``knn_disagreement_oos``: share of its k most similar training images (``Similarity.neighbors``) whose
    given label differs from its own given label (uses labels, like cleanlab);
* nnsim, in sample (the paper's setting: the full model analysed on its own training set):
  - ``density``: soft neighbour count with the 10 logits (d = 10) and with the scalar posnegflat score of
    the predicted class (d = 1) (label-free; the paper reads few neighbours as fitted on its own / memorised);
  - ``consistency``: neighbour consistency |yhat_i - e_i| from ``Similarity.denoising`` (d = 1, exact;
    label-free: it uses the network's predictions, never the labels);
  - ``knn_disagreement``: as above among the other training images (uses labels);
  - the full model's own in-sample self-confidence, for reference.

All similarities come from the public API (``nnsim.Similarity``). Writes ``results.json`` (every number the
docs quote), ``scores.npz`` (every per-image score), ``roc.png`` and ``scores.png`` to ``--out``.

    python -m nnsim.experiments.label_noise --out runs/label_noise          # full settings, minutes
    python -m nnsim.experiments.label_noise --quick --out /tmp/label_noise   # smoke test, about a minute
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

import nnsim


@dataclass
class Config:
    n: int = 8000
    flip_fraction: float = 0.2
    folds: int = 4
    epochs: int = 10
    batch_size: int = 64
    max_lr: float = 4e-3
    k: int = 10
    seed: int = 0


QUICK = Config(n=800, folds=2, epochs=3, k=5)


def flip_labels(y: Tensor, fraction: float, classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Flip exactly round(fraction * N) labels, chosen at random, each to a uniformly drawn *other* class.

    Returns (noisy labels [N], flipped mask [N] bool).
    """
    g = torch.Generator().manual_seed(seed)
    n_flip = round(fraction * len(y))
    idx = torch.randperm(len(y), generator=g)[:n_flip]
    shift = torch.randint(1, classes, (n_flip,), generator=g)
    noisy = y.clone()
    noisy[idx] = (y[idx] + shift) % classes
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[idx] = True
    return noisy, mask


def make_model() -> nn.Module:
    """The small CNN of ``examples/fashion_mnist_analysis.py`` (12 810 parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
    )


def train(x: Tensor, y: Tensor, cfg: Config, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.max_lr / 2)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.max_lr, total_steps=cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x), generator=g)
        for s in range(steps_per_epoch):
            idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor) -> Tensor:
    return torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])


def knn_disagreement(idx: Tensor, ref_labels: Tensor, labels: Tensor) -> np.ndarray:
    """Share of the neighbours (indices into the reference set, [Q, k]) whose label differs from the query's."""
    return (ref_labels[idx] != labels.unsqueeze(1)).double().mean(1).numpy()


def auroc(flipped: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` (higher = more suspicious) for the flipped samples; NaN scores rank as least suspicious."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(flipped, _nan_last(score)))


def _nan_last(score: np.ndarray) -> np.ndarray:
    ok = np.isfinite(score)
    floor = score[ok].min() - 1.0 if ok.any() else 0.0
    return np.where(ok, score, floor)


def cross_validate(x: Tensor, y_noisy: Tensor, cfg: Config, log) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """K-fold out-of-sample probabilities and nnsim out-of-sample scores from the same fold models."""
    from sklearn.model_selection import StratifiedKFold

    N = len(x)
    probs = np.zeros((N, 10))
    dens = np.full(N, np.nan)
    knn = np.full(N, np.nan)
    info = {"fold_heldout_accuracy_vs_noisy": [], "fold_seconds": []}
    skf = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    for f, (tr, te) in enumerate(skf.split(np.zeros(N), y_noisy.numpy())):
        t0 = time.perf_counter()
        tr_t, te_t = torch.from_numpy(tr), torch.from_numpy(te)
        model = train(x[tr_t], y_noisy[tr_t], cfg, seed=cfg.seed + 1 + f)
        lg = logits_of(model, x[te_t])
        probs[te] = lg.softmax(1).double().numpy()
        info["fold_heldout_accuracy_vs_noisy"].append(float((lg.argmax(1) == y_noisy[te_t]).float().mean()))
        scalar = nnsim.Similarity(model, output=nnsim.outputs.log_softmax_mask("predicted"), progress=False)
        dens[te] = scalar.density(x[te_t], reference=x[tr_t]).double().numpy()
        _, nb = scalar.neighbors(x[te_t], x[tr_t], k=cfg.k)
        knn[te] = knn_disagreement(nb, y_noisy[tr_t], y_noisy[te_t])
        info["fold_seconds"].append(time.perf_counter() - t0)
        log(f"fold {f + 1}/{cfg.folds}: {info['fold_seconds'][-1]:.0f} s, held-out accuracy against the noisy "
            f"labels {info['fold_heldout_accuracy_vs_noisy'][-1]:.3f}")
    return probs, {"density_oos": dens, "knn_disagreement_oos": knn}, info


def in_sample(x: Tensor, y_noisy: Tensor, cfg: Config, log) -> tuple[dict[str, np.ndarray], dict, nn.Module]:
    t0 = time.perf_counter()
    model = train(x, y_noisy, cfg, seed=cfg.seed + 100)
    lg = logits_of(model, x)
    pred = lg.argmax(1)
    info = {"train_seconds": time.perf_counter() - t0,
            "train_accuracy_vs_noisy": float((pred == y_noisy).float().mean())}
    t1 = time.perf_counter()
    logits_sim = nnsim.Similarity(model, progress=False, chunk_size=128)
    scalar = nnsim.Similarity(model, output=nnsim.outputs.log_softmax_mask("predicted"), progress=False)
    scores = {
        "density_logits": logits_sim.density(x).double().numpy(),
        "density_scalar": scalar.density(x).double().numpy(),
        # Neighbour consistency |yhat_i - e_i| (d = 1: the predicted-class score), exact by tiles.
        "consistency": scalar.denoising(x).consistency.double().numpy(),
    }
    _, nb = scalar.neighbors(x, k=cfg.k, exclude_self=True)
    scores["knn_disagreement"] = knn_disagreement(nb, y_noisy, y_noisy)
    p = lg.softmax(1).double().numpy()
    scores["in_sample_self_confidence"] = p[np.arange(len(x)), y_noisy.numpy()]
    info["nnsim_seconds"] = time.perf_counter() - t1
    log(f"full model: train accuracy against the noisy labels {info['train_accuracy_vs_noisy']:.3f}; "
        f"nnsim scores {info['nnsim_seconds']:.0f} s")
    return scores, info, model


# Which way each score points: +1 = higher is more suspicious, -1 = lower is more suspicious.
DIRECTION = {
    "cleanlab_self_confidence": -1, "density_oos": -1, "knn_disagreement_oos": +1,
    "density_logits": -1, "density_scalar": -1, "consistency": +1, "knn_disagreement": +1,
    "in_sample_self_confidence": -1,
}
LABEL_FREE = {"density_oos", "density_logits", "density_scalar", "consistency"}
OUT_OF_SAMPLE = {"cleanlab_self_confidence", "density_oos", "knn_disagreement_oos"}


def run(cfg: Config, out: Path, log=print) -> dict:
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    x_all, y_all = nnsim.datasets.load_fashion_mnist("train")
    sub = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.n]
    x, y_true = x_all[sub].contiguous(), y_all[sub].contiguous()
    y_noisy, flipped_t = flip_labels(y_true, cfg.flip_fraction, 10, cfg.seed + 12345)
    flipped = flipped_t.numpy()
    log(f"{cfg.n} images, {int(flipped.sum())} labels flipped ({cfg.flip_fraction:.0%})")

    probs, oos_scores, cv_info = cross_validate(x, y_noisy, cfg, log)
    labels = y_noisy.numpy()
    issues = find_label_issues(labels, probs)
    conf = get_label_quality_scores(labels, probs, method="self_confidence")
    ins_scores, ins_info, model = in_sample(x, y_noisy, cfg, log)
    scores = {"cleanlab_self_confidence": conf, **oos_scores, **ins_scores}

    tp = int((issues & flipped).sum())
    precision = tp / max(int(issues.sum()), 1)
    recall = tp / int(flipped.sum())
    aurocs = {k: auroc(flipped, DIRECTION[k] * v) for k, v in scores.items()}
    oos_acc_true = float((probs.argmax(1) == y_true.numpy()).mean())
    results = {
        "config": asdict(cfg),
        "data": {"images": cfg.n, "flipped": int(flipped.sum()), "source": "Fashion-MNIST train, seeded subset"},
        "model": {"architecture": "conv(1->16,3x3)-relu-maxpool2-conv(16->32,3x3)-relu-maxpool2-linear(800->10)",
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "optimizer": f"Adam, one-cycle lr (max {cfg.max_lr}), batch {cfg.batch_size}, {cfg.epochs} epochs"},
        "cross_validation": {**cv_info, "out_of_sample_accuracy_vs_true_labels": oos_acc_true},
        "full_model": {**ins_info,
                       "train_accuracy_vs_true_labels": float((logits_of(model, x).argmax(1) == y_true).float().mean()),
                       "accuracy_on_flipped_vs_noisy_label": float(
                           (logits_of(model, x[flipped_t]).argmax(1) == y_noisy[flipped_t]).float().mean())},
        "cleanlab_find_label_issues": {"flagged": int(issues.sum()), "true_positives": tp,
                                       "precision": precision, "recall": recall,
                                       "f1": 2 * precision * recall / max(precision + recall, 1e-12)},
        "auroc": aurocs,
        "score_kinds": {k: {"label_free": k in LABEL_FREE, "out_of_sample": k in OUT_OF_SAMPLE,
                            "direction": "higher = suspicious" if DIRECTION[k] > 0 else "lower = suspicious"}
                        for k in scores},
        "score_means": {k: {"flipped": float(np.nanmean(v[flipped])), "clean": float(np.nanmean(v[~flipped]))}
                        for k, v in scores.items()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
    }
    np.savez_compressed(out / "scores.npz", flipped=flipped, noisy_label=labels, true_label=y_true.numpy(),
                        cleanlab_flag=issues, **scores)
    results["figures"] = figures(scores, flipped, aurocs, out)
    results["total_wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log("AUROC for flagging flipped labels: " + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()))
    log(f"cleanlab find_label_issues: precision {precision:.3f}, recall {recall:.3f}; wrote {out / 'results.json'}")
    return results


def figures(scores: dict[str, np.ndarray], flipped: np.ndarray, aurocs: dict[str, float], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, group, title in ((axes[0], OUT_OF_SAMPLE, "out of sample (K-fold models)"),
                             (axes[1], set(scores) - OUT_OF_SAMPLE, "in sample (the full model)")):
        for k in sorted(group):
            s = DIRECTION[k] * scores[k]
            fpr, tpr, _ = roc_curve(flipped, _nan_last(s))
            ls = "-" if k in LABEL_FREE else "--"
            ax.plot(fpr, tpr, ls=ls, label=f"{k} ({aurocs[k]:.3f})")
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8)
        ax.set_title(title)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate (flipped labels found)")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Flagging flipped labels: ROC (solid: label-free nnsim scores, dashed: scores that use labels)")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=110)
    plt.close(fig)

    keys = list(scores)
    fig, axes = plt.subplots(2, (len(keys) + 1) // 2, figsize=(3.2 * ((len(keys) + 1) // 2), 6), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        v = scores[k]
        if k == "consistency":  # heavy-tailed: |yhat - e| explodes where sum_j k_ij is near 0
            v = np.log10(v + 1e-6)
        ok = np.isfinite(v)
        bins = np.linspace(np.min(v[ok]), np.max(v[ok]), 40)
        ax.hist(v[ok & ~flipped], bins=bins, alpha=0.6, density=True, label="clean")
        ax.hist(v[ok & flipped], bins=bins, alpha=0.6, density=True, label="flipped")
        name = "log10 consistency" if k == "consistency" else k
        ax.set_title(f"{name}\nAUROC {aurocs[k]:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)
    return ["roc.png", "scores.png"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nnsim.experiments.label_noise", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (results.json, figures)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: {QUICK.n} images, {QUICK.folds} folds, {QUICK.epochs} epochs")
    ap.add_argument("--n", type=int, help=f"images (default {Config.n})")
    ap.add_argument("--flip-fraction", type=float, help=f"fraction of flipped labels (default {Config.flip_fraction})")
    ap.add_argument("--folds", type=int, help=f"cross-validation folds (default {Config.folds})")
    ap.add_argument("--epochs", type=int, help=f"training epochs (default {Config.epochs})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else Config()
    over = {"n": a.n, "flip_fraction": a.flip_fraction, "folds": a.folds, "epochs": a.epochs}
    cfg = Config(**{**asdict(cfg), **{k: v for k, v in over.items() if v is not None}})
    if not 0 < cfg.flip_fraction < 1:
        ap.error("--flip-fraction must be in (0, 1)")
    if cfg.folds < 2 or cfg.epochs < 1 or cfg.n < 10 * cfg.folds:
        ap.error("need --folds >= 2, --epochs >= 1 and --n >= 10 * folds")
    missing = [m for m in ("cleanlab", "sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:  # checked before any training, not after minutes of it
        ap.error(f"needs {', '.join(missing)}: pip install \"nnsim[experiments]\"")
    torch.set_num_threads(a.threads)
    run(cfg, Path(a.out), log=functools.partial(print, flush=True))


if __name__ == "__main__":
    main()
