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


def examples(pool: dict[str, Tensor], unit_noise: Tensor, s, out_size: int, path: Path, n: int = 4) -> str:
    """Rows: image + annotations, polygon map, true field, noisy label (at the analysed sigma)."""
    fig, axes = plt.subplots(n, 4, figsize=(10, 2.6 * n))
    S = s.scene.size
    yy, xx = np.mgrid[0:S:6, 0:S:6]
    for r in range(n):
        _draw_patch(axes[r, 0], pool, r)
        axes[r, 1].imshow(pool["polygons"][r].permute(1, 2, 0).numpy())
        t = pool["disp"][r].numpy()
        y = (pool["disp"][r] + s.analysis_sigma * unit_noise[r]).numpy()
        panels = ((axes[r, 2], t, "true misalignment t"), (axes[r, 3], y, f"label t + eps, sigma={s.analysis_sigma:g}"))
        for ax, f, name in panels:
            ax.imshow(_rgb(pool, r), alpha=0.35)
            ax.quiver(xx, yy, f[0][yy, xx], f[1][yy, xx], angles="xy", scale_units="xy", scale=0.6, color="b")
            off = (S - out_size) / 2 - 0.5
            ax.add_patch(plt.Rectangle((off, off), out_size, out_size, fill=False, ec="k", lw=1))
            if r == 0:
                ax.set_title(name, fontsize=9)
        if r == 0:
            axes[r, 0].set_title("image + annotations (red)", fontsize=9)
            axes[r, 1].set_title("map: fill / edges / vertices", fontsize=9)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("Procedural stand-in for aerial images + OSM (arrows x1.7; box: output window)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


def denoising_curves(runs: list[dict], predictions: list[dict], s, path: Path) -> str:
    """Error at the centre against the true displacement vs label noise sigma, per training-set size."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    sig_max = max(s.sigmas)
    for ax, key, title in ((axes[0], "train_rms_centre", "training patches (self-denoising)"),
                           (axes[1], "test_rms_centre", "held-out patches")):
        ax.plot([0, sig_max], [0, sig_max], "k--", lw=1, label="label noise (error of the labels)")
        zkey = "zero_predictor_rms_centre" if key == "train_rms_centre" else "test_zero_predictor_rms_centre"
        zero = [r[zkey] for r in runs if r["n_train"] == max(s.sizes) and zkey in r]
        if zero:
            ax.axhline(zero[0], color="0.5", ls=":", lw=1, label="predicting 0 (no registration)")
        for n in s.sizes:
            rs = [r for r in runs if r["n_train"] == n]
            ax.plot([r["sigma"] for r in rs], [r[key] for r in rs], "o-", label=f"network, N = {n}")
        if key == "train_rms_centre" and predictions:
            pn = predictions[0]["n_train"]
            base = {r["sigma"]: r[key] for r in runs if r["n_train"] == pn and r["sigma"] == 0.0}
            ax.plot([p["sigma"] for p in predictions], [p["predicted_rms"] for p in predictions], "s:",
                    color="C3", label=f"nnsim predicted noise part, N = {pn}")
            if 0.0 in base:
                ax.plot([p["sigma"] for p in predictions],
                        [float(np.hypot(base[0.0], p["predicted_rms"])) for p in predictions], "^:", color="C4",
                        label="sqrt(error at sigma=0 ^2 + predicted^2)")
        ax.set_xlabel("label noise sigma (px, per component)")
        ax.set_ylabel("RMS error vs true displacement at the centre (px)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def calibration(predicted: Tensor, effective: Tensor, actual: Tensor, sigma: float, path: Path, bins: int = 10) -> str:
    """Per-sample predicted vs actual error (log-log), binned calibration, and N_eff vs actual error."""
    pred = predicted.double().numpy()
    act = actual.double().numpy()
    neff = effective.double().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    ax.loglog(pred, act.clip(1e-3), ".", ms=2, alpha=0.4)
    lo, hi = min(pred.min(), 1e-2), max(pred.max(), act.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="actual = predicted")
    ax.set_xlabel("predicted error sigma sqrt(tr D / d) (px)")
    ax.set_ylabel("actual error |f - t| / sqrt(2) (px)")
    ax.set_title(f"per training patch, sigma = {sigma:g}", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[1]
    order = np.argsort(pred)
    chunks = np.array_split(order, bins)
    bp = [np.sqrt((pred[c] ** 2).mean()) for c in chunks]
    ba = [np.sqrt((act[c] ** 2).mean()) for c in chunks]
    ax.plot(bp, ba, "o-", label="RMS actual error per decile of predicted")
    m = max(max(bp), max(ba))
    ax.plot([0, m], [0, m], "k--", lw=1, label="perfect calibration")
    ax.set_xlabel("predicted error, RMS within bin (px)")
    ax.set_ylabel("actual error, RMS within bin (px)")
    ax.set_title("calibration", fontsize=10)
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.loglog(neff, act.clip(1e-3), ".", ms=2, alpha=0.4)
    ax.set_xlabel("effective neighbours N_eff = d / tr D")
    ax.set_ylabel("actual error (px)")
    ax.set_title("effective neighbour count vs actual error", fontsize=10)
    for a in axes:
        a.grid(alpha=0.3, which="both")
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

