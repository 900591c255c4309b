"""The paper's toy 1-D problem (Charpiat et al. 2019, Fig. 4 and the estimator comparison; docs/method.md,
"Experiments").

alpha ~ U[0, 1] (sorted), input (cos 2 pi alpha, sin 2 pi alpha), target sin(2 pi f alpha), n samples per
frequency f; an MLP 2 -> 64 (six ReLU hidden layers of width 64) -> 1 trained with Adam (lr 1e-4), batch 64,
L1 loss, for ``epochs`` epochs, ``runs`` runs per f. All runs train at once (stacked weights, batched matmuls,
one Adam over the stacked tensors = independent Adams; see ``_toy_training``). Then every trained network is
analysed with ``nnsim.Similarity(model).density(...)`` on its own training set: soft (self included),
unnormalised soft, less-soft n = 2, 3, 4 and hard at the authors' nine thresholds (self excluded, the authors'
convention), aggregated per sample by the median over runs.

Writes to ``--out``: ``results.json`` (every number the docs quote), ``per_sample.npz`` (the per-sample
medians), ``weights.pt`` (the trained stacked weights: a rerun with the same settings reuses them),
``checkpoint.pt`` (an interrupted run, or a rerun with more ``--epochs``, continues from it), and the
figures ``fig4_3d.png``, ``nsoft_curvature.png``, ``estimators.png``, ``fits.png``, ``training_loss.png``.

    python -m nnsim.experiments.toy1d --out runs/toy1d            # the authors' settings
    python -m nnsim.experiments.toy1d --quick --out /tmp/toy1d     # smoke test (under a minute)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import nnsim

from . import _toy_training as tt

# The authors' grids (docs/method.md, "Density and neighbour counts").
HARD_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.925, 0.95, 0.975, 0.99)
LESS_SOFT_POWERS = (2, 3, 4)
PAPER_FIG4_FREQS = (1, 2, 4, 8)


@dataclass
class Config:
    n: int = 2048
    freqs: tuple[int, ...] = (1, 2, 4, 8, 16)
    runs: int = 5
    epochs: int = 5000
    batch_size: int = 64
    lr: float = 1e-4
    noise_std: float = 0.0
    data_seed: int = 0
    model_seed: int = 0
    hard_thresholds: tuple[float, ...] = HARD_THRESHOLDS
    less_soft_powers: tuple[int, ...] = LESS_SOFT_POWERS

    def training_key(self) -> dict:
        """What determines the trained weights (a checkpoint is reused only when this matches)."""
        d = asdict(self)
        return {k: d[k] for k in ("n", "freqs", "runs", "batch_size", "lr", "noise_std", "data_seed", "model_seed")}


QUICK = Config(n=256, freqs=(1, 2, 4), runs=2, epochs=150)


# ---------------------------------------------------------------------------------------------------- data
@dataclass
class ToyData:
    """One frequency's dataset, sorted by alpha: x [n, 2], target [n, 1] (clean), noisy [n, 1] (trained on)."""

    alpha: Tensor
    x: Tensor
    target: Tensor
    noisy: Tensor
    curvature: Tensor
    f: int = 0
    meta: dict = field(default_factory=dict)


def curvature(alpha: Tensor, f: float) -> Tensor:
    """Curvature of the graph of alpha -> sin(2 pi f alpha): |y''| / (1 + y'^2)^(3/2) (docs/method.md,
    "Experiments")."""
    w = 2 * math.pi * f
    d1 = w * torch.cos(w * alpha)
    d2 = -(w**2) * torch.sin(w * alpha)
    return d2.abs() / (1 + d1**2) ** 1.5


def make_data(n: int, f: int, noise_std: float = 0.0, seed: int = 0, split: str = "train") -> ToyData:
    """The authors' generator (uniform alpha, sorted): a fixed data seed per (n, f, split), independent of models."""
    offset = {"train": 0, "val": 1}[split]
    g = torch.Generator().manual_seed(1_000_003 * seed + 1009 * n + 17 * f + offset)
    alpha, _ = torch.sort(torch.rand(n, generator=g, dtype=torch.float64))
    x = torch.stack([torch.cos(2 * math.pi * alpha), torch.sin(2 * math.pi * alpha)], dim=1)
    target = torch.sin(2 * math.pi * f * alpha).unsqueeze(1)
    noise = noise_std * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return ToyData(alpha.float(), x.float(), target.float(), (target + noise).float(), curvature(alpha, f).float(), f)


def run_seeds(cfg: Config) -> list[tuple[int, int, int]]:
    """(f, init seed, shuffle seed) for every run, frequency-major."""
    out = []
    for f in cfg.freqs:
        for r in range(cfg.runs):
            out.append((f, 10_000 * cfg.model_seed + 100 * f + r, 10_000 * cfg.model_seed + 100 * f + r + 50))
    return out


# ---------------------------------------------------------------------------------------------------- training
def train_grid(cfg: Config, data: dict[int, ToyData], out: Path, log=print) -> tuple[list[Tensor], dict]:
    """Train (or resume, or reuse) every run of the grid at once; returns the stacked weights and timing."""
    key = cfg.training_key()
    weights, ckpt = out / "weights.pt", out / "checkpoint.pt"
    if weights.exists():
        saved = torch.load(weights, weights_only=False)
        if saved["key"] == key and saved["epochs"] == cfg.epochs:
            log(f"reusing trained weights from {weights}")
            return saved["params"], saved["timing"]
    seeds = run_seeds(cfg)
    models = [tt.init_mlp(s) for _, s, _ in seeds]
    state = tt.new_state(models, [s for _, _, s in seeds], lr=cfg.lr)
    x = torch.stack([data[f].x for f, _, _ in seeds])
    y = torch.stack([data[f].noisy for f, _, _ in seeds])
    timing = {"train_cpu_s": 0.0, "train_wall_s": 0.0, "steps_trained_here": 0}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        if saved["key"] == key and saved["state"]["epoch"] <= cfg.epochs:
            state.load_state_dict(saved["state"])
            timing = saved["timing"]
            log(f"resuming from {ckpt} at epoch {state.epoch}")
    steps_per_epoch = math.ceil(cfg.n / cfg.batch_size)
    t0, c0, e0 = time.perf_counter(), time.process_time(), state.epoch
    last = [time.perf_counter()]

    def save(st: tt.TrainState) -> None:
        if st.epoch % 100 == 0 or st.epoch == cfg.epochs:
            steps = (st.epoch - e0) * steps_per_epoch
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            tm = dict(timing, train_wall_s=timing["train_wall_s"] + wall, train_cpu_s=timing["train_cpu_s"] + cpu,
                      steps_trained_here=timing["steps_trained_here"] + steps)
            torch.save({"key": key, "state": st.state_dict(), "timing": tm}, ckpt)
            if time.perf_counter() - last[0] > 30 or st.epoch == cfg.epochs:
                last[0] = time.perf_counter()
                loss = st.epoch_loss[-1].view(len(cfg.freqs), cfg.runs).mean(1)
                log(f"epoch {st.epoch}/{cfg.epochs}: {steps / max(cpu, 1e-9):.1f} steps/s per CPU s, mean L1 per f "
                    + ", ".join(f"f={f}: {v:.4f}" for f, v in zip(cfg.freqs, loss.tolist())))

    tt.train_stacked(state, x, y, cfg.epochs - state.epoch, cfg.batch_size, callback=save)
    saved = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
    if saved is not None:
        timing = saved["timing"]
    timing["steps_total"] = cfg.epochs * steps_per_epoch
    timing["runs_stacked"] = len(seeds)
    timing["steps_per_cpu_s"] = timing["steps_trained_here"] / max(timing["train_cpu_s"], 1e-9)
    params = [p.detach().clone() for p in state.params]
    torch.save({"key": key, "epochs": cfg.epochs, "params": params, "timing": timing,
                "epoch_loss": torch.stack(state.epoch_loss) if state.epoch_loss else torch.empty(0)}, weights)
    return params, timing  # checkpoint.pt stays: a rerun with more --epochs continues from it


# ---------------------------------------------------------------------------------------------------- analysis
def estimator_names(cfg: Config) -> list[str]:
    return (["soft", "soft_unnormalized"] + [f"less_soft_n{n}" for n in cfg.less_soft_powers]
            + [f"hard_t{t}" for t in cfg.hard_thresholds])


def estimators(model: torch.nn.Module, x: Tensor, cfg: Config) -> dict[str, Tensor]:
    """Every neighbour count of the authors' analysis for one trained network on its training inputs, [n] each.

    Self-term conventions as in the authors' code (docs/method.md, "Density and neighbour counts"): included in
    the soft counts, excluded from the hard and less-soft counts.
    """
    sim = nnsim.Similarity(model, progress=False)
    out = {"soft": sim.density(x), "soft_unnormalized": sim.density(x, normalized=False)}
    for n in cfg.less_soft_powers:
        out[f"less_soft_n{n}"] = sim.density(x, method="less_soft", power=n, include_self=False)
    for t in cfg.hard_thresholds:
        out[f"hard_t{t}"] = sim.density(x, method="hard", threshold=t, include_self=False)
    return out


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def analyse(cfg: Config, data: dict[int, ToyData], val: dict[int, ToyData], params: list[Tensor], log=print
            ) -> tuple[dict, dict[str, np.ndarray]]:
    names = estimator_names(cfg)
    per_f: dict[str, dict] = {}
    arrays: dict[str, np.ndarray] = {}
    seeds = run_seeds(cfg)
    for fi, f in enumerate(cfg.freqs):
        d, v = data[f], val[f]
        counts = {k: [] for k in names}
        preds, train_l1, val_l1 = [], [], []
        for r in range(cfg.runs):
            idx = fi * cfg.runs + r
            assert seeds[idx][0] == f
            model = tt.unstack_params(params, idx).eval()
            with torch.no_grad():
                p = model(d.x)
                train_l1.append(float((p - d.noisy).abs().mean()))
                val_l1.append(float((model(v.x) - v.target).abs().mean()))
            preds.append(p.squeeze(1))
            for k, c in estimators(model, d.x, cfg).items():
                counts[k].append(c)
        med = {k: torch.stack(vs).median(dim=0).values.double().numpy() for k, vs in counts.items()}
        run_means = {k: torch.stack(vs).double().mean(dim=1).numpy() for k, vs in counts.items()}
        pred_med = torch.stack(preds).median(dim=0).values.double().numpy()
        logk = np.log1p(d.curvature.double().numpy())
        target = d.target.squeeze(1).double().numpy()
        err = np.abs(pred_med - target)
        from scipy.stats import pearsonr

        per_f[str(f)] = {
            "train_l1_per_run": train_l1,
            "val_l1_per_run": val_l1,
            "abs_error_of_median_prediction_mean": float(err.mean()),
            "estimator_mean_of_median": {k: float(med[k].mean()) for k in names},
            "estimator_run_means": {k: run_means[k].tolist() for k in names},
            "soft_median_min": float(med["soft"].min()),
            "soft_median_max": float(med["soft"].max()),
            "corr_soft_vs_log1p_curvature": {"spearman": spearman(med["soft"], logk),
                                             "pearson": float(pearsonr(med["soft"], logk).statistic)},
            "corr_soft_vs_abs_error": {"spearman": spearman(med["soft"], err)},
            "soft_flat_vs_peak": _flat_vs_peak(med["soft"], d.curvature.numpy()),
            # Does the cheap soft count rank the samples like the quadratic estimators do?
            "spearman_soft_vs_estimator": {k: spearman(med["soft"], med[k]) for k in names if k != "soft"},
        }
        for k in names:
            arrays[f"f{f}_{k}"] = med[k]
        arrays[f"f{f}_alpha"] = d.alpha.double().numpy()
        arrays[f"f{f}_log1p_curvature"] = logk
        arrays[f"f{f}_target"] = target
        arrays[f"f{f}_prediction"] = pred_med
        log(f"f={f}: mean N_soft {per_f[str(f)]['estimator_mean_of_median']['soft']:.1f}, "
            f"Spearman(N_soft, log(1+curv)) {per_f[str(f)]['corr_soft_vs_log1p_curvature']['spearman']:+.3f}, "
            f"train L1 {np.mean(train_l1):.4f}, val L1 {np.mean(val_l1):.4f}")
    return per_f, arrays


def _flat_vs_peak(soft: np.ndarray, curv: np.ndarray) -> dict:
    """Median N_soft over the highest-curvature 10 % of samples (the sine's extrema) and the lowest 10 %."""
    lo, hi = np.quantile(curv, [0.1, 0.9])
    return {"high_curvature_decile": float(np.median(soft[curv >= hi])),
            "low_curvature_decile": float(np.median(soft[curv <= lo]))}


def log_log_slopes(cfg: Config, per_f: dict) -> dict[str, float]:
    """Least-squares slope of log(mean count) against log f, per estimator (counts <= 0 are skipped)."""
    out = {}
    lf = np.log(np.array(cfg.freqs, dtype=float))
    for k in estimator_names(cfg):
        m = np.array([per_f[str(f)]["estimator_mean_of_median"][k] for f in cfg.freqs])
        ok = m > 0
        out[k] = float(np.polyfit(lf[ok], np.log(m[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------- figures
def figures(cfg: Config, arrays: dict[str, np.ndarray], per_f: dict, epoch_loss: Tensor | None, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(cfg.freqs)))
    col = dict(zip(cfg.freqs, colors))

    # Fig. 4: 3-D, alpha x log(1 + curvature) x N_soft, the paper's frequencies.
    fig4 = [f for f in cfg.freqs if f in PAPER_FIG4_FREQS] or list(cfg.freqs)
    fig = plt.figure(figsize=(9, 7))
    ax = fig.add_subplot(projection="3d")
    for f in fig4:
        ax.plot(arrays[f"f{f}_alpha"], arrays[f"f{f}_log1p_curvature"], arrays[f"f{f}_soft"], color=col[f],
                lw=1, label=f"n = {cfg.n}, f = {f}")
    ax.set_xlabel("alpha")
    ax.set_ylabel("log(1 + curvature)")
    ax.set_zlabel("N_soft (median over runs)")
    ax.set_title("Neighbors_Soft vs Curvature (log) vs Alpha")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig4_3d.png", dpi=110)
    plt.close(fig)
    written.append("fig4_3d.png")

    # A readable 2-D version: per f, N_soft and log(1 + curvature) against alpha, and N_soft against curvature.
    rows = len(cfg.freqs)
    fig, axes = plt.subplots(rows, 2, figsize=(12, 2.3 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]})
    for i, f in enumerate(cfg.freqs):
        a, s, k = arrays[f"f{f}_alpha"], arrays[f"f{f}_soft"], arrays[f"f{f}_log1p_curvature"]
        ax = axes[i, 0]
        ax.plot(a, s, color=col[f], lw=1)
        ax.set_ylabel(f"f = {f}\nN_soft", color=col[f])
        tw = ax.twinx()
        tw.plot(a, k, color="0.6", lw=0.8, ls="--")
        tw.set_ylabel("log(1+curv.)", color="0.4")
        if i == rows - 1:
            ax.set_xlabel("alpha")
        ax2 = axes[i, 1]
        ax2.scatter(k, s, s=2, color=col[f], alpha=0.5)
        rho = per_f[str(f)]["corr_soft_vs_log1p_curvature"]["spearman"]
        ax2.set_title(f"Spearman {rho:+.2f}", fontsize=9)
        if i == rows - 1:
            ax2.set_xlabel("log(1 + curvature)")
    axes[0, 0].set_title(f"N_soft (solid, median of {cfg.runs} runs) and log(1 + curvature) (dashed) against alpha")
    fig.tight_layout()
    fig.savefig(out / "nsoft_curvature.png", dpi=110)
    plt.close(fig)
    written.append("nsoft_curvature.png")

    # Every estimator, averaged over samples, against f (log-log), the authors' styles.
    fig, ax = plt.subplots(figsize=(9, 6.5))
    fr = np.array(cfg.freqs, dtype=float)
    for k in estimator_names(cfg):
        if k == "soft_unnormalized":
            continue
        m = np.array([per_f[str(f)]["estimator_mean_of_median"][k] for f in cfg.freqs])
        if k == "soft":
            style = {"marker": "o", "ls": "-", "ms": 8, "lw": 2, "color": "k"}
        elif k.startswith("less"):
            style = {"marker": "s", "ls": ":", "ms": 5, "lw": 1.5}
        else:
            style = {"marker": "^", "ls": "--", "ms": 5, "lw": 1}
        ax.plot(fr, np.where(m > 0, m, np.nan), label=k, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("frequency f")
    ax.set_ylabel("Neighbor count (log)")
    ax.set_title("Avg of all measures across all samples")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "estimators.png", dpi=110)
    plt.close(fig)
    written.append("estimators.png")

    # The dataset and the fits (median prediction over runs).
    fig, axes = plt.subplots(1, len(cfg.freqs), figsize=(3.2 * len(cfg.freqs), 2.8), squeeze=False)
    for i, f in enumerate(cfg.freqs):
        ax = axes[0, i]
        ax.plot(arrays[f"f{f}_alpha"], arrays[f"f{f}_target"], color="0.6", lw=2, label="target")
        ax.plot(arrays[f"f{f}_alpha"], arrays[f"f{f}_prediction"], color=col[f], lw=1, label="median prediction")
        ax.set_title(f"f = {f}")
        ax.set_xlabel("alpha")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fits.png", dpi=110)
    plt.close(fig)
    written.append("fits.png")

    if epoch_loss is not None and len(epoch_loss):
        fig, ax = plt.subplots(figsize=(7, 4))
        el = epoch_loss.view(len(epoch_loss), len(cfg.freqs), cfg.runs).numpy()
        ep = np.arange(1, len(el) + 1)
        for i, f in enumerate(cfg.freqs):
            ax.plot(ep, np.median(el[:, i, :], axis=1), color=col[f], label=f"f = {f}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training L1 (median over runs)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "training_loss.png", dpi=110)
        plt.close(fig)
        written.append("training_loss.png")
    return written


# ---------------------------------------------------------------------------------------------------- main
def run(cfg: Config, out: Path, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = {f: make_data(cfg.n, f, cfg.noise_std, cfg.data_seed, "train") for f in cfg.freqs}
    val = {f: make_data(cfg.n, f, 0.0, cfg.data_seed, "val") for f in cfg.freqs}
    t0 = time.perf_counter()
    params, timing = train_grid(cfg, data, out, log)
    log(f"training: {timing['train_wall_s']:.0f} s wall, {timing['train_cpu_s']:.0f} s CPU, "
        f"{timing['steps_per_cpu_s']:.1f} stacked steps per CPU second")
    t1, c1 = time.perf_counter(), time.process_time()
    per_f, arrays = analyse(cfg, data, val, params, log)
    timing["analysis_wall_s"] = time.perf_counter() - t1
    timing["analysis_cpu_s"] = time.process_time() - c1
    saved = torch.load(out / "weights.pt", weights_only=False)
    np.savez_compressed(out / "per_sample.npz", **arrays)
    results = {
        "config": asdict(cfg),
        "timing": timing,
        "per_frequency": per_f,
        "estimator_mean_vs_f": {k: [per_f[str(f)]["estimator_mean_of_median"][k] for f in cfg.freqs]
                                for k in estimator_names(cfg)},
        "log_log_slope_vs_f": log_log_slopes(cfg, per_f),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads()},
    }
    results["figures"] = figures(cfg, arrays, per_f, saved.get("epoch_loss"), out)
    results["total_wall_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"wrote {out / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m nnsim.experiments.toy1d", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (results.json, figures, weights)")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: n={QUICK.n}, f={QUICK.freqs}, {QUICK.runs} runs, {QUICK.epochs} epochs")
    ap.add_argument("--n", type=int, help="samples per frequency (default 2048)")
    ap.add_argument("--freqs", type=int, nargs="+", help="frequencies (default 1 2 4 8 16)")
    ap.add_argument("--runs", type=int, help="runs per frequency (default 5)")
    ap.add_argument("--epochs", type=int, help="epochs (default 5000)")
    ap.add_argument("--noise-std", type=float, help="std of Gaussian label noise added to the training targets "
                    "(default 0: the authors train on the clean target)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else Config()
    over = {"n": a.n, "freqs": tuple(a.freqs) if a.freqs else None, "runs": a.runs, "epochs": a.epochs,
            "noise_std": a.noise_std}
    bad = [k for k, v in over.items() if v is not None and k != "noise_std" and (
        (isinstance(v, int) and v < 1) or (isinstance(v, tuple) and (not v or min(v) < 1)))]
    if bad or (a.noise_std is not None and a.noise_std < 0):
        ap.error(f"{', '.join(bad) or 'noise-std'} must be positive")
    cfg = Config(**{**asdict(cfg), **{k: v for k, v in over.items() if v is not None}})
    torch.set_num_threads(a.threads)
    run(cfg, Path(a.out), log=functools.partial(print, flush=True))


if __name__ == "__main__":
    main()
