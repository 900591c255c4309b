"""How does a small CNN see Fashion-MNIST? Density, neighbours and denoising with nnsim.

Trains a small CNN on a seeded subset of Fashion-MNIST (Debian's ``dataset-fashion-mnist`` files, read offline),
then asks nnsim three dataset-scale questions and draws one figure for each:

1. density (``density.png``): the soft neighbour count N_soft(x) = sum_j sim(x, x_j) of every training image
   (d = 10 logits, normalised kernel, linear time), and whether isolated images are the misclassified ones;
2. neighbours (``neighbors.png``): the training images the network considers most similar to six test images
   (the authors' scalar posnegflat output of the predicted class, i.e. gradient cosines);
3. denoising (``denoising.png``): exact self-denoising statistics (d = 10 logits, O(N^2) by tiles) on a subset,
   and the linear-time projected approximation compared against them.

Every number is printed and saved in ``results.json`` next to the figures (see docs/analysis.md).

    python examples/fashion_mnist_analysis.py                # full run, writes docs/figures/
    python examples/fashion_mnist_analysis.py --quick --out /tmp/fig   # smoke test, well under a minute
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch import nn  # noqa: E402

import nnsim  # noqa: E402

CLASSES = nnsim.datasets.FASHION_MNIST_CLASSES
FULL = {"train": 10_000, "epochs": 5, "denoise": 2_000, "queries": 500, "dims": [256, 1024, 4096]}
QUICK = {"train": 1_000, "epochs": 2, "denoise": 300, "queries": 50, "dims": [256]}
SHOW = 6  # test images drawn in neighbors.png
K = 8  # neighbours per test image


class Timer:
    """Wall-clock and process CPU seconds of each step (the CPU time is what the step costs on a busy machine)."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        timer = self

        class _Step:
            def __enter__(self):
                self.w, self.c = time.perf_counter(), time.process_time()
                print(f"[{name}] ...", flush=True)

            def __exit__(self, *exc):
                wall, cpu = time.perf_counter() - self.w, time.process_time() - self.c
                timer.steps[name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2)}
                print(f"[{name}] {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

        return _Step()


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),  # 28 -> 26 -> 13
        nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),  # 13 -> 11 -> 5
        nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
    )


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * ((len(x) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(b) for b in x.split(2048)])


def rnd(v: float, n: int = 4) -> float:
    return float(round(float(v), n))


def img(ax, x: torch.Tensor, title: str, color: str = "black") -> None:
    ax.imshow(x[0].numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7.5, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------------- density
def density_step(sim, x, y, pred, loss, conf, T, out: Path) -> dict:
    with T("density"):
        dens = sim.density(x).double().numpy()  # [N] sum_j tr(K~(x_i, x_j)) / 10, self-term included
    yn, correct = y.numpy(), (pred == y).numpy()
    err = ~correct
    rho_loss = spearmanr(dens, loss).statistic
    rho_correct = spearmanr(dens, correct).statistic
    rho_conf = spearmanr(dens, conf).statistic
    rho_ink = spearmanr(dens, x.flatten(1).mean(1).numpy()).statistic
    auc = roc_auc_score(err, -dens) if 0 < err.sum() < len(err) else float("nan")  # low density -> error?
    # Within-class version: density differs a lot between classes, so compare images of one class only.
    within = []
    for c in range(10):
        m = yn == c
        if m.sum() > 10 and 0 < err[m].sum() < m.sum():
            within.append(roc_auc_score(err[m], -dens[m]))
    # Error rate per density quintile (within class: quintiles of each class's own densities).
    q = np.zeros(len(dens), dtype=int)
    for c in range(10):
        m = np.flatnonzero(yn == c)
        ranks = dens[m].argsort().argsort()
        q[m] = ranks * 5 // max(len(m), 1)
    err_by_q = [float(err[q == k].mean()) for k in range(5)]
    res = {
        "n": len(dens), "d": 10, "method": "soft", "normalized": True, "include_self": True,
        "mean": rnd(dens.mean(), 1), "min": rnd(dens.min(), 1), "max": rnd(dens.max(), 1),
        "mean_over_n": rnd(dens.mean() / len(dens)),
        "per_class_median": {CLASSES[c]: rnd(np.median(dens[yn == c]), 1) for c in range(10)},
        "train_error_rate": rnd(err.mean()),
        "spearman_density_vs_loss": rnd(rho_loss), "spearman_density_vs_correct": rnd(rho_correct),
        "spearman_density_vs_confidence": rnd(rho_conf), "spearman_density_vs_mean_pixel": rnd(rho_ink),
        "auroc_low_density_flags_error": rnd(auc),
        "auroc_low_density_flags_error_within_class_mean": rnd(np.mean(within)) if within else None,
        "error_rate_by_within_class_density_quintile": [rnd(e) for e in err_by_q],
    }
    print(f"  N_soft: mean {dens.mean():.0f} of N = {len(dens)} (min {dens.min():.0f}, max {dens.max():.0f}); "
          f"Spearman(density, loss) = {rho_loss:.3f}, AUROC(low density -> misclassified) = {auc:.3f} "
          f"(within class, mean {res['auroc_low_density_flags_error_within_class_mean']}); "
          f"error rate by within-class density quintile {[round(e, 3) for e in err_by_q]}; "
          f"Spearman with max softmax {rho_conf:.3f}, with mean pixel value {rho_ink:.3f}")

    order = np.argsort(dens)
    fig = plt.figure(figsize=(13, 8.6))
    gs = fig.add_gridspec(3, 16, height_ratios=[2.3, 1, 1], hspace=0.55, wspace=0.3)
    ax = fig.add_subplot(gs[0, :10])
    ax.boxplot([dens[yn == c] for c in range(10)], showfliers=True, flierprops={"markersize": 2, "alpha": 0.4})
    ax.set_xticks(range(1, 11), CLASSES, rotation=25, fontsize=8)
    ax.set_ylabel(r"$N_{soft}(x)=\sum_j \mathrm{sim}(x, x_j)$")
    ax.set_title(f"Soft density of the {len(dens)} training images by true class (d = 10 logits, normalised)",
                 fontsize=9.5)
    ax.axhline(dens.mean(), color="gray", lw=0.8, ls="--")
    ax2 = fig.add_subplot(gs[0, 11:])
    ax2.bar(range(1, 6), [100 * e for e in err_by_q], color="tab:red", alpha=0.75)
    ax2.set_xticks(range(1, 6), ["lowest", "2", "3", "4", "highest"], fontsize=8)
    ax2.set_xlabel("density quintile within the image's class", fontsize=8.5)
    ax2.set_ylabel("training error rate (%)", fontsize=8.5)
    ax2.set_title(f"Misclassified vs density\nAUROC(low density flags error) = {auc:.2f}", fontsize=9.5)
    for row, (name, idx) in enumerate((("most isolated", order[:8]), ("most crowded", order[::-1][:8]))):
        for k, i in enumerate(idx):
            a = fig.add_subplot(gs[1 + row, 2 * k : 2 * k + 2])
            ok = bool(correct[i])
            title = f"{CLASSES[yn[i]]}\nN={dens[i]:.0f}" + ("" if ok else f"\npred {CLASSES[int(pred[i])]}")
            img(a, x[i], title, "black" if ok else "tab:red")
            if k == 0:
                a.set_ylabel(name, fontsize=9)
    fig.suptitle("Density: how many training images does the network lump with each one? "
                 "(red titles: misclassified, with the prediction)", fontsize=10.5)
    fig.savefig(out / "density.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return res


# ---------------------------------------------------------------------------------------------------- neighbours
def neighbors_step(model, x, y, pred_train, xt, yt, pred_test, n_queries, T, out: Path) -> dict:
    scalar = nnsim.Similarity(model, output=nnsim.outputs.log_softmax_mask("predicted"), progress=False,
                              chunk_size=128)
    g = torch.Generator().manual_seed(1)
    qidx = torch.randperm(len(xt), generator=g)[:n_queries]
    with T("neighbors"):
        sims, idx = scalar.neighbors(xt[qidx], x, k=K)  # [Q, K] gradient cosines, indices into x
    ytq, pq = yt[qidx], pred_test[qidx]
    nlab = y[idx]  # [Q, K] true labels of the neighbours
    agree_true = (nlab == ytq[:, None]).float().mean().item()
    agree_pred = (nlab == pq[:, None]).float().mean().item()
    wrong = pq != ytq
    res = {
        "output": "log_softmax_mask('predicted') (posnegflat, d = 1: gradient cosine)",
        "n_queries": int(n_queries), "n_data": len(x), "k": K,
        "top1_similarity_median": rnd(sims[:, 0].median()), "topk_similarity_median": rnd(sims[:, -1].median()),
        "neighbor_label_equals_query_true_label": rnd(agree_true),
        "neighbor_label_equals_query_prediction": rnd(agree_pred),
        "misclassified_queries": int(wrong.sum()),
        "misclassified_queries_neighbor_label_equals_prediction":
            rnd((nlab[wrong] == pq[wrong][:, None]).float().mean()) if wrong.any() else None,
        "misclassified_queries_neighbor_label_equals_true_label":
            rnd((nlab[wrong] == ytq[wrong][:, None]).float().mean()) if wrong.any() else None,
    }
    print(f"  {n_queries} test queries vs {len(x)} training images: top-1 similarity median "
          f"{res['top1_similarity_median']}; neighbour labels = query's true label {agree_true:.3f}, "
          f"= query's predicted class {agree_pred:.3f}")

    # Six rows: four correctly classified test images of different classes, then two misclassified ones.
    rows, seen = [], set()
    for r in range(len(qidx)):
        c = int(ytq[r])
        if not wrong[r] and c not in seen and len(rows) < SHOW - 2:
            rows.append(r)
            seen.add(c)
    rows += [int(r) for r in torch.nonzero(wrong).flatten()[: SHOW - len(rows)]]
    rows += [r for r in range(len(qidx)) if r not in rows][: SHOW - len(rows)]
    res["shown_test_indices"] = [int(qidx[r]) for r in rows]
    fig, axes = plt.subplots(len(rows), K + 1, figsize=(1.5 * (K + 1), 2.05 * len(rows)))
    for row, r in enumerate(rows):
        ok = not bool(wrong[r])
        img(axes[row, 0], xt[qidx[r]], f"TEST: {CLASSES[int(ytq[r])]}\npred {CLASSES[int(pq[r])]}",
            "black" if ok else "tab:red")
        for spine in axes[row, 0].spines.values():
            spine.set_edgecolor("tab:blue")
            spine.set_linewidth(2.5)
        for k in range(K):
            j = int(idx[r, k])
            same = int(y[j]) == int(ytq[r])
            img(axes[row, k + 1], x[j], f"{CLASSES[int(y[j])]}\nsim {float(sims[r, k]):.3f}",
                "black" if same else "tab:red")
    fig.suptitle(f"The {K} training images most similar to each test image, for the network "
                 f"(scalar posnegflat output of the predicted class: gradient cosine)\n"
                 "Blue frame: test image (true class, prediction). Red: neighbour label differs from the test image's "
                 "true label / misclassified test image", fontsize=9.5)
    fig.tight_layout(rect=(0, 0, 1, 0.955), h_pad=1.2)
    fig.savefig(out / "neighbors.png", dpi=110)
    plt.close(fig)
    return res


# ---------------------------------------------------------------------------------------------------- denoising
def denoising_step(sim, x, y, logits, dims, T, out: Path) -> dict:
    with T("denoising_exact"):
        rep = sim.denoising(x)
    res: dict = {"n": len(x), "d": 10, "output": "10 logits, unnormalised kernel"}
    f = rep.factor.double()
    eff = rep.effective_neighbors.double().numpy()
    cons = rep.consistency.double().numpy()
    correct = (logits.argmax(1) == y).numpy()
    # Distance of each prediction to the plain mean prediction: how far the kernel average is from a global mean.
    to_mean = (logits - logits.mean(0)).norm(dim=1).numpy()
    res.update({
        "ill_conditioned": int(rep.ill_conditioned.sum()),
        "effective_neighbors_median": rnd(np.median(eff), 1),
        "effective_neighbors_p10": rnd(np.percentile(eff, 10), 1),
        "effective_neighbors_p90": rnd(np.percentile(eff, 90), 1),
        "effective_neighbors_median_correct": rnd(np.median(eff[correct]), 1),
        "effective_neighbors_median_incorrect": rnd(np.median(eff[~correct]), 1) if (~correct).any() else None,
        "consistency_median_correct": rnd(np.median(cons[correct]), 3),
        "consistency_median_incorrect": rnd(np.median(cons[~correct]), 3) if (~correct).any() else None,
        "auroc_consistency_flags_error": rnd(roc_auc_score(~correct, cons)) if 0 < (~correct).sum() < len(x)
        else None,
        "auroc_low_effective_neighbors_flags_error": rnd(roc_auc_score(~correct, -eff))
        if 0 < (~correct).sum() < len(x) else None,
        "spearman_effective_neighbors_vs_consistency": rnd(spearmanr(eff, cons).statistic),
        "spearman_consistency_vs_distance_to_mean_prediction": rnd(spearmanr(cons, to_mean).statistic),
        "train_error_rate": rnd((~correct).mean()),
    })
    print(f"  effective neighbours: median {res['effective_neighbors_median']} of N = {len(x)} "
          f"(p10 {res['effective_neighbors_p10']}, p90 {res['effective_neighbors_p90']}); consistency median "
          f"correct {res['consistency_median_correct']} / incorrect {res['consistency_median_incorrect']}; "
          f"AUROC(consistency flags error) = {res['auroc_consistency_flags_error']}")

    approx, approx_factors = {}, {}
    for dim in dims:
        with T(f"denoising_approx_dim{dim}"):
            a = sim.denoising(x, approximate=True, dim=dim)
        rel = ((a.factor.double() - f).abs() / f.abs()).numpy()
        ratio = (a.factor.double() / f).numpy()
        approx_factors[dim] = a.factor.double().numpy()
        approx[str(dim)] = {"rel_error_median": rnd(np.median(rel)), "rel_error_p90": rnd(np.percentile(rel, 90)),
                            "ratio_median": rnd(np.median(ratio)),
                            "spearman_vs_exact": rnd(spearmanr(a.factor.numpy(), f.numpy()).statistic),
                            "time_wall_s": T.steps[f"denoising_approx_dim{dim}"]["wall_s"]}
        print(f"  approximate=True, dim={dim}: relative error of factor median {np.median(rel):.3f}, "
              f"90th percentile {np.percentile(rel, 90):.3f}; approx/exact median {np.median(ratio):.3f}; "
              f"Spearman vs exact {approx[str(dim)]['spearman_vs_exact']}")
    res["approximation"] = approx

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.8))
    a1.hist([eff[correct], eff[~correct]], bins=40, stacked=True, color=["tab:blue", "tab:red"],
            label=[f"correct ({correct.sum()})", f"misclassified ({(~correct).sum()})"])
    a1.set_xlabel("effective number of neighbours 1 / (tr D / d)")
    a1.set_ylabel("training images")
    a1.set_title(f"Exact denoising of {len(x)} training images (d = 10 logits)", fontsize=10)
    a1.legend(fontsize=8)
    a2.scatter(eff[correct], cons[correct], s=5, alpha=0.35, color="tab:blue", label="correct", rasterized=True)
    a2.scatter(eff[~correct], cons[~correct], s=12, alpha=0.85, color="tab:red", marker="x",
               label="misclassified")
    a2.set_xlabel("effective number of neighbours")
    a2.set_ylabel(r"consistency $\|\hat y_i - \sum_j W_{ij}\hat y_j\|$ (logits)")
    a2.set_title("Prediction vs kernel-weighted average of the predictions", fontsize=10)
    a2.legend(fontsize=8)
    fe = f.numpy()
    ratios = {dim: fa / fe for dim, fa in approx_factors.items()}
    lo = min(r.min() for r in ratios.values()) * 0.9
    hi = max(r.max() for r in ratios.values()) * 1.1
    rbins = np.geomspace(min(lo, 0.5), max(hi, 2.0), 60)
    for dim, r in ratios.items():
        a3.hist(r, bins=rbins, histtype="step", lw=1.6,
                label=f"dim={dim}: median {np.median(r):.2f}, Spearman {approx[str(dim)]['spearman_vs_exact']:.2f}")
    a3.axvline(1.0, color="black", lw=1, ls="--", label="exact")
    a3.set_xscale("log")
    ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32) if rbins[0] <= t <= rbins[-1]]
    a3.set_xticks(ticks, [f"{t:g}" for t in ticks])
    a3.set_xlabel("approximate factor / exact factor (approximate=True)")
    a3.set_ylabel("training images")
    a3.set_title("Linear-time projected approximation vs exact", fontsize=10)
    a3.set_ylim(0, a3.get_ylim()[1] * 1.35)  # room for the legend
    a3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "denoising.png", dpi=110)
    plt.close(fig)
    return res


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/figures", help="folder for the PNGs and results.json")
    ap.add_argument("--train", type=int, default=None, help="training images (default 10000; --quick: 1000)")
    ap.add_argument("--quick", action="store_true", help="tiny smoke-test version (well under a minute)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared, busy 2-core machine 2 OpenMP threads were "
                         "5-25x slower)")
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else FULL)
    if args.train is not None:
        cfg["train"] = args.train
    cfg["denoise"] = min(cfg["denoise"], cfg["train"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    T = Timer()
    t_start, c_start = time.perf_counter(), time.process_time()

    with T("load"):
        x_all, y_all = nnsim.datasets.load_fashion_mnist("train")
        xt, yt = nnsim.datasets.load_fashion_mnist("test")
        sub = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))[: cfg["train"]]
        x, y = x_all[sub].contiguous(), y_all[sub].contiguous()
    model = make_model()
    n_params = sum(p.numel() for p in model.parameters())
    with T("train"):
        train(model, x, y, cfg["epochs"])
    logits_train, logits_test = predict(model, x), predict(model, xt)
    pred, pred_test = logits_train.argmax(1), logits_test.argmax(1)
    loss = nn.functional.cross_entropy(logits_train, y, reduction="none").numpy()
    acc_train, acc_test = (pred == y).float().mean().item(), (pred_test == yt).float().mean().item()
    print(f"CNN ({n_params} parameters), {cfg['train']} training images, {cfg['epochs']} epochs: "
          f"train accuracy {acc_train:.4f}, test accuracy {acc_test:.4f} (10000 test images)")

    sim = nnsim.Similarity(model, progress=False, chunk_size=128)  # d = 10 logits, euclidean metric
    results = {
        "config": {**cfg, "quick": args.quick, "threads": args.threads, "seed": 0, "chunk_size": 128,
                   "torch": torch.__version__, "python": platform.python_version()},
        "model": {"architecture": "conv(1->16,3x3)-relu-maxpool2-conv(16->32,3x3)-relu-maxpool2-linear(800->10)",
                  "parameters": n_params, "optimizer": "Adam, one-cycle lr (max 4e-3), batch 64",
                  "train_images": cfg["train"], "epochs": cfg["epochs"],
                  "train_accuracy": rnd(acc_train), "test_accuracy": rnd(acc_test), "test_images": len(xt)},
    }
    conf = logits_train.softmax(1).max(1).values.numpy()
    results["density"] = density_step(sim, x, y, pred, loss, conf, T, out)
    results["neighbors"] = neighbors_step(model, x, y, pred, xt, yt, pred_test, cfg["queries"], T, out)
    nd = cfg["denoise"]
    results["denoising"] = denoising_step(sim, x[:nd], y[:nd], logits_train[:nd], cfg["dims"], T, out)
    results["timings"] = T.steps
    results["timings"]["total"] = {"wall_s": round(time.perf_counter() - t_start, 1),
                                   "cpu_s": round(time.process_time() - c_start, 1)}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"total {results['timings']['total']['wall_s']} s wall, {results['timings']['total']['cpu_s']} s CPU; "
          f"wrote {out}/density.png, neighbors.png, denoising.png, results.json")


if __name__ == "__main__":
    main()
