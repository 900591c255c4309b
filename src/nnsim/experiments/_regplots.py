"""Figures of the registration experiment (matplotlib, Agg). Each function writes one PNG, returns its name."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.offsetbox import AnnotationBbox, OffsetImage  # noqa: E402
from torch import Tensor  # noqa: E402


def _rgb(pool: dict[str, Tensor], i: int) -> np.ndarray:
    return ((pool["image"][i].permute(1, 2, 0).numpy() + 1) / 2).clip(0, 1)


def _draw_patch(ax, pool: dict[str, Tensor], i: int, lw: float = 1.0) -> None:
    """The image with the misaligned annotation polygons (red), as in the authors' plots."""
    ax.imshow(_rgb(pool, i), interpolation="nearest")
    for b in range(pool["valid"].shape[1]):
        if pool["valid"][i, b]:
            c = pool["moved"][i, b].numpy()
            ax.plot(np.r_[c[:, 0], c[:1, 0]], np.r_[c[:, 1], c[:1, 1]], "r-", lw=lw)
    S = pool["image"].shape[-1]
    ax.set_xlim(-0.5, S - 0.5)
    ax.set_ylim(S - 0.5, -0.5)
    ax.set_xticks([])
    ax.set_yticks([])


def _patch_image(pool: dict[str, Tensor], i: int, px: int = 96) -> np.ndarray:
    """The patch with its polygons rendered to an RGB array (for insets)."""
    fig = plt.figure(figsize=(px / 100, px / 100), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    _draw_patch(ax, pool, i, lw=0.6)
    ax.axis("off")
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr


def shift_examples(pool: dict[str, Tensor], unit_noise: Tensor, sigma: float, path: Path, n: int = 4) -> str:
    """Rows: image + misaligned annotations, polygon map, the true shift and the noisy label (arrows)."""
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.6 * n))
    S = pool["image"].shape[-1]
    for r in range(n):
        _draw_patch(axes[r, 0], pool, r)
        axes[r, 1].imshow(pool["polygons"][r].permute(1, 2, 0).numpy())
        axes[r, 1].set_xticks([])
        axes[r, 1].set_yticks([])
        ax = axes[r, 2]
        ax.imshow(_rgb(pool, r), alpha=0.35)
        t = pool["shift"][r].numpy()
        y = t + sigma * unit_noise[r].numpy()
        for v, colour, name in ((t, "b", "true shift t"), (y, "r", f"label t + eps (sigma={sigma:g})")):
            ax.annotate("", xy=(S / 2 + 2 * v[0], S / 2 + 2 * v[1]), xytext=(S / 2, S / 2),
                        arrowprops={"arrowstyle": "->", "color": colour, "lw": 1.5})
            ax.plot([], [], colour + "-", label=name)
        ax.set_xticks([])
        ax.set_yticks([])
        if r == 0:
            axes[r, 0].set_title("image + annotations", fontsize=9)
            axes[r, 1].set_title("map (fill, edge, vertex)", fontsize=9)
            ax.set_title("shift (arrows x2)", fontsize=9)
            ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def error_vs_sigma(cases: list[dict], path: Path) -> str:
    """Error against the true shift (training and held-out patches) vs sigma, per N, with sigma and baselines."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sizes = sorted({c["n_train"] for c in cases})
    top = max(c["sigma"] for c in cases)
    for ax, key, clean_key, base_key, title in (
            (axes[0], "train_rms", "clean_train_rms", "predict_mean_rms", "training patches"),
            (axes[1], "test_rms", "clean_test_rms", "test_predict_mean_rms", "held-out patches")):
        for n in sizes:
            cs = sorted((c for c in cases if c["n_train"] == n), key=lambda c: c["sigma"])
            xs = [0.0] + [c["sigma"] for c in cs]
            ax.plot(xs, [cs[0][clean_key]] + [c[key] for c in cs], "o-", label=f"N = {n}: error vs truth")
            if key == "train_rms":
                ax.plot([c["sigma"] for c in cs], [c["methods"]["linearized_ridge"]["predicted_rms"] for c in cs],
                        "s", mfc="none", label=f"N = {n}: linearized prediction of the noise-induced part")
                ax.plot([c["sigma"] for c in cs], [c["actual_noise_rms"] for c in cs], "x",
                        label=f"N = {n}: actual noise-induced part")
        ax.plot([0, top], [0, top], "k--", lw=1, label="label noise sigma")
        ax.axhline(cases[0][base_key], color="grey", ls=":", label="predict the mean")
        ax.set_xlabel("label noise sigma (px per component)")
        ax.set_ylabel("RMS error per component (px)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def calibration_methods(per_sample: dict[str, np.ndarray], methods: tuple[str, ...], summary: dict, path: Path) -> str:
    """Per method: predicted vs actual noise-induced error per training patch (log-log) and the decile means."""
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 3.8), squeeze=False)
    a = per_sample["actual"]
    for ax, m in zip(axes[0], methods):
        p = per_sample[m]
        ax.loglog(a, p, ".", ms=2, alpha=0.4)
        dec = summary["methods"][m]["deciles"]
        ax.loglog([d["actual_rms"] for d in dec], [d["predicted_rms"] for d in dec], "ro-", ms=4, label="deciles")
        lo, hi = min(a.min(), p.min()), max(a.max(), p.max())
        ax.plot([lo, hi], [lo, hi], "k--", lw=1)
        s = summary["methods"][m]
        ax.set_title(f"{m}\nRMS ratio {s['calibration']:.2f}, Spearman {s['spearman']:.2f}", fontsize=9)
        ax.set_xlabel("actual noise-induced error (px)")
        ax.set_ylabel("predicted, label-free (px)")
        ax.legend(fontsize=7)
    fig.suptitle(f"N = {summary['n_train']}, sigma = {summary['sigma']:g}, {summary['draws']} draws", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def nsoft_histogram(nsoft: Tensor, edges: np.ndarray, chosen: list[int], pool: dict[str, Tensor], path: Path) -> str:
    """10-bin histogram of N_soft (bars at the left bin edges), the patch nearest each right edge above it."""
    v = nsoft.double().numpy()
    counts, _ = np.histogram(v, bins=edges)
    freq = counts / counts.sum()
    fig, ax = plt.subplots(figsize=(14, 6.5))
    width = edges[1] - edges[0]
    ax.bar(edges[:-1], freq, width=width, align="edge", alpha=0.7, ec="k")
    top = max(freq.max() * 1.9, 0.3)
    ax.set_ylim(0, top)
    for j, (e, i) in enumerate(zip(edges[1:], chosen)):
        img = OffsetImage(_patch_image(pool, i), zoom=0.75)
        y = top * (0.62 if j % 2 == 0 else 0.84)
        ab = AnnotationBbox(img, (float(v[i]), freq[min(j, len(freq) - 1)]), xybox=(float(e), y), xycoords="data",
                            boxcoords="data", arrowprops={"arrowstyle": "->", "lw": 0.6}, pad=0.1)
        ax.add_artist(ab)
    ax.set_xlabel("Neighbors soft (N_soft over the training patches)")
    ax.set_ylabel("Frequency")
    ax.set_title("Soft neighbour count of every training patch; the patch nearest each right bin edge above it")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def knn_grid(sources: list[int], vals: Tensor, idx: Tensor, pool: dict[str, Tensor], path: Path) -> str:
    """One row per source: the source, then its k most similar training patches with their similarity."""
    q, k = idx.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.35 * (k + 1), 1.55 * q))
    axes = np.atleast_2d(axes)
    for r, src in enumerate(sources):
        _draw_patch(axes[r, 0], pool, src, lw=0.6)
        axes[r, 0].set_title("Source", fontsize=8)
        for c in range(k):
            j = int(idx[r, c])
            ax = axes[r, c + 1]
            if j < 0:
                ax.axis("off")
                continue
            _draw_patch(ax, pool, j, lw=0.6)
            ax.set_title(f"{float(vals[r, c]):.3g}" + (" (self)" if j == src else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def similarity_histograms(sources: list[int], rows: Tensor, nsoft: Tensor, pool: dict[str, Tensor],
                          path: Path) -> str:
    """Per source: the histogram of its similarities to every training patch (100 bins on [-1, 1])."""
    q = len(sources)
    cols = min(q, 4)
    nr = (q + cols - 1) // cols
    fig, axes = plt.subplots(nr, cols, figsize=(4.2 * cols, 3.4 * nr), squeeze=False)
    for a in axes.flat[q:]:
        a.axis("off")
    for r, src in enumerate(sources):
        ax = axes.flat[r]
        v = rows[r].double().numpy()
        w = np.full_like(v, 1.0 / len(v))
        ax.hist(v, bins=100, range=(-1, 1), weights=w, alpha=0.8)
        ax.set_xlim(-1, 1)
        ax.set_title(f"Neighbors soft: {float(nsoft[src]):.1f}", fontsize=9)
        ax.set_xlabel("similarity to the source")
        ax.set_ylabel("fraction of patches")
        img = OffsetImage(_patch_image(pool, src), zoom=0.6)
        ax.add_artist(AnnotationBbox(img, (0.2, 0.72), xycoords="axes fraction", frameon=False))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name

