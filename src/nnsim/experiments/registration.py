"""Self-denoising in multimodal registration (docs/method.md, "Experiments", "Self-denoising"; issue 12 item 4b,
the redesigned stand-in).

A two-branch convolutional network learns the translation between an aerial-like image and a building map
(``_scenes.make_shift_scenes``: the map's polygons are the true buildings moved by one shift t per patch) from
labels y = t + eps that are themselves wrong by eps ~ N(0, sigma^2 I_2). We measure, with the validation
protocol of ``denoising`` (docs/experiments/denoising.md):

* a **clean-label twin** trained on t from the same initialisation and the same mini-batches gives f_clean;
  ``draws`` independent noise draws eps_k give networks f_k (same initialisation, same batches);
* **self-denoising**: the error against the truth RMS(f_k - t) on the training patches and on held-out
  patches, against sigma and against the predict-the-mean baseline;
* the **actual noise-induced error** of patch i, RMS over draws and the 2 components of f_k,i - f_clean,i,
  against the label-free predictions of every f_k on its own training set: ``method="paper"`` (sigma
  sqrt(tr D_i / 2), with the true sigma and with the linearized sigma_hat) and ``method="linearized"``
  (ridge smoother, sigma estimated); calibration ratio RMS(pred) / RMS(actual), Spearman, sigma_hat / sigma,
  split-half reliability of the actual error, a calibration figure;
* on the first noisy network of the main case: soft neighbour counts, nearest neighbours and similarity rows.

The analysed output is the network's whole output, the translation (d = 2). Every training and every analysis
is saved under ``DIR/parts/`` as it finishes and skipped on a rerun with the same settings, so an interrupted
run resumes. Only the public API of nnsim is used.

Run: ``python -m nnsim.experiments.registration [--quick] --out DIR [--workers W]``. Writes DIR/results.json
and the figures DIR/registration_*.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import nnsim

from ..estimators import linearized
from . import _reliability
from ._regnet import ShiftNet
from ._reliability import spearman
from ._scenes import SceneConfig, make_shift_scenes

METHODS = ("paper_true_sigma", "paper_sigma_hat", "linearized_ridge", "ridge_realized")


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run (``full()`` and ``quick()`` are the two documented presets)."""

    scene: SceneConfig = SceneConfig(size=32, buildings=(3, 8), building_size=(4.0, 9.0))
    max_shift: float = 3.0
    # (N, sigma) in priority order; the first is the main case (neighbours, figures). Smaller N are prefixes.
    cases: tuple[tuple[int, float], ...] = ((1000, 1.5), (1000, 3.0), (250, 1.5))
    draws: int = 6
    n_test: int = 500
    steps: int = 800
    batch: int = 64
    lr: float = 3e-3
    knn_sources: int = 4
    k: int = 10
    seed: int = 0
    workers: int = 2  # processes for the independent trainings / analyses (one thread each)
    net: dict = field(default_factory=lambda: {"image_width": 8, "map_width": 4, "common_width": 16})

    @staticmethod
    def full() -> Settings:
        return Settings()

    @staticmethod
    def quick() -> Settings:
        return Settings(scene=SceneConfig(size=24, buildings=(2, 6), building_size=(4.0, 8.0)), cases=((96, 3.0),),
                        draws=2, n_test=64, steps=200, batch=32, knn_sources=2, k=4, workers=1,
                        net={"image_width": 4, "map_width": 2, "common_width": 8})

    def key(self) -> str:
        """A hash of everything a training depends on (saved parts of other settings are not reused)."""
        d = asdict(self)
        for k in ("cases", "workers", "knn_sources", "k", "n_test", "draws"):
            d.pop(k)
        d["n_max"] = max(n for n, _ in self.cases)  # the scenes and noise draws are drawn for the largest N
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------- training
def make_model(s: Settings) -> ShiftNet:
    torch.manual_seed(s.seed + 100)  # the same initialisation for the clean twin and every noisy draw
    return ShiftNet(**s.net)


def batches(s: Settings, n: int) -> Iterator[Tensor]:
    """The indices of the ``s.steps`` mini-batches (a seeded order that does not depend on the labels, so the
    clean twin, every noisy draw and the linearised twins of ``registration_linear`` see the same batches)."""
    gen = torch.Generator().manual_seed(s.seed + 200)
    batch = min(s.batch, n)
    order, pos = torch.randperm(n, generator=gen), 0
    for _ in range(s.steps):
        if pos + batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        yield order[pos:pos + batch]
        pos += batch


def train(s: Settings, image: Tensor, polygons: Tensor, labels: Tensor,
          on_step: Callable[[int, ShiftNet], None] | None = None) -> tuple[ShiftNet, list[float]]:
    """Adam (cosine decay to 0) on the squared error to ``labels`` [N, 2] over :func:`batches`. Returns the
    model (eval mode) and the loss curve (mean per 50 steps). ``on_step(step, model)`` is called after each
    update (step = 1 ... s.steps), e.g. to keep checkpoints."""
    model = make_model(s)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.steps)
    losses, acc = [], []
    model.train()
    for step, idx in enumerate(batches(s, len(labels)), 1):
        loss = (model(image[idx], polygons[idx]) - labels[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if on_step is not None:
            on_step(step, model)
        acc.append(loss.item())
        if len(acc) == 50:
            losses.append(float(np.mean(acc)))
            acc = []
    if acc:
        losses.append(float(np.mean(acc)))
    return model.eval(), losses


@torch.no_grad()
def predict(model: ShiftNet, image: Tensor, polygons: Tensor, batch: int = 500) -> Tensor:
    """The predicted translations [N, 2]."""
    return torch.cat([model(image[i:i + batch], polygons[i:i + batch]) for i in range(0, len(image), batch)])


def rms(err: Tensor | np.ndarray) -> float:
    """Root-mean-square over every entry (pixels per component)."""
    return float(np.sqrt(np.mean(np.square(np.asarray(err, dtype=np.float64)))))


# ---------------------------------------------------------------------- parts (each saved when done)
# Worker processes inherit the scenes by fork (set before the pool starts), so nothing large is pickled.
_SHARED: dict = {}


def _labels(n: int, sigma: float, draw: int) -> Tensor:
    """Training labels of draw ``draw`` (-1: the clean twin): t + sigma * unit noise of that draw."""
    t = _SHARED["pool"]["shift"][:n]
    if draw < 0:
        return t.clone()
    return t + sigma * _SHARED["unit_noise"][draw][:n]


def _part(kind: str, n: int, sigma: float, draw: int) -> Path:
    tag = "clean" if draw < 0 else f"s{sigma:g}_d{draw}"
    return _SHARED["parts"] / f"{kind}_{_SHARED['key']}_n{n}_{tag}.pt"


def _train_task(task: tuple[int, float, int]) -> str:
    torch.set_num_threads(1)
    n, sigma, draw = task
    path = _part("model", n, sigma, draw)
    if not path.exists():
        s, pool = _SHARED["settings"], _SHARED["pool"]
        t1 = time.perf_counter()
        model, losses = train(s, pool["image"][:n], pool["polygons"][:n], _labels(n, sigma, draw))
        torch.save({"state": model.state_dict(), "losses": losses, "seconds": time.perf_counter() - t1}, path)
        _SHARED["log"](f"trained N={n} {'clean' if draw < 0 else f'sigma={sigma:g} draw {draw}'} "
                       f"in {time.perf_counter() - t1:.0f} s")
    return str(path)


def _load(n: int, sigma: float, draw: int) -> tuple[ShiftNet, dict]:
    saved = torch.load(_part("model", n, sigma, draw), weights_only=False)
    model = ShiftNet(**_SHARED["settings"].net)
    model.load_state_dict(saved["state"])
    return model.eval(), saved


def _analysed(n: int, sigma: float, draw: int) -> tuple[ShiftNet, tuple[Tensor, Tensor], nnsim.Similarity]:
    """One noisy network, its training set (the first n patches) and a Similarity on it."""
    pool = _SHARED["pool"]
    model, _ = _load(n, sigma, draw)
    return model, (pool["image"][:n], pool["polygons"][:n]), nnsim.Similarity(model, progress=False)


def _analysis_task(task: tuple[int, float, int]) -> str:
    """nnsim's label-free statistics of one noisy network on its own training set."""
    torch.set_num_threads(1)
    n, sigma, draw = task
    path = _part("analysis", n, sigma, draw)
    if not path.exists():
        _, data, sim = _analysed(n, sigma, draw)
        t1 = time.perf_counter()
        lin = sim.denoising(data, targets=_labels(n, sigma, draw), method="linearized")
        t_lin = time.perf_counter() - t1
        paper = sim.denoising(data, noise_std=sigma)
        assert lin.predicted_error is not None and paper.predicted_error is not None and lin.noise_std is not None
        torch.save({
            "linearized_ridge": lin.predicted_error.double(), "paper_true_sigma": paper.predicted_error.double(),
            "paper_sigma_hat": lin.noise_std * paper.factor.double().clamp_min(0).sqrt(),
            "flag_paper": paper.ill_conditioned, "flag_linearized": lin.ill_conditioned,
            "neighbors_paper": paper.effective_neighbors.double(), "neighbors_linearized": lin.effective_neighbors,
            "sigma_hat": lin.noise_std, "dof": lin.dof, "fit_error": lin.fit_error, "lam": lin.lam,
            "seconds_linearized": t_lin, "seconds_paper": time.perf_counter() - t1 - t_lin}, path)
        _SHARED["log"](f"analysed N={n} sigma={sigma:g} draw {draw}: sigma_hat {lin.noise_std:.3f}, "
                       f"fit error {lin.fit_error:.3f} ({time.perf_counter() - t1:.0f} s)")
    _realized_task(task)
    return str(path)


def _realized_task(task: tuple[int, float, int]) -> str:
    """The ridge smoother with realized noise energies (``estimators.linearized.realized_fit``) of one noisy
    network, from its kernel matrix (``Similarity.kernel``, [N, N, 2, 2] -> [2N, 2N])."""
    torch.set_num_threads(1)
    n, sigma, draw = task
    path = _part("realized", n, sigma, draw)
    if not path.exists():
        model, data, sim = _analysed(n, sigma, draw)
        t1 = time.perf_counter()
        K = sim.kernel(data).double()  # [N, N, d, d]
        d = K.shape[-1]
        spec = linearized.exact_spectrum(K.permute(0, 2, 1, 3).reshape(n * d, n * d))
        f = predict(model, *data).double()
        y = _labels(n, sigma, draw)
        fit = linearized.linearized_fit(spec, y, f)
        sig, n_signal, D = linearized.realized_fit(spec, y, fit)
        torch.save({"ridge_realized": (D.diagonal(dim1=-2, dim2=-1).sum(-1) / d).sqrt(), "sigma_realized": sig,
                    "n_signal": n_signal, "lam_realized": fit.lam, "seconds_realized": time.perf_counter() - t1}, path)
    return str(path)


def _maps_task(task: tuple[int, float, int]) -> str:
    """Soft neighbour counts, exact top-k neighbours and similarity rows of a few sources."""
    torch.set_num_threads(1)
    n, sigma, draw = task
    path = _part("maps", n, sigma, draw)
    if not path.exists():
        s, pool = _SHARED["settings"], _SHARED["pool"]
        model, _ = _load(n, sigma, draw)
        sim = nnsim.Similarity(model, progress=False)
        data = (pool["image"][:n], pool["polygons"][:n])
        t1 = time.perf_counter()
        nsoft = sim.density(data)
        t_density = time.perf_counter() - t1
        order = torch.argsort(nsoft)  # sources spread over the N_soft range: few ... many neighbours
        sources = [int(order[i]) for i in torch.linspace(0, len(order) - 1, s.knn_sources).round().long()]
        t1 = time.perf_counter()
        src = (pool["image"][sources], pool["polygons"][sources])
        vals, idx = sim.neighbors(src, data, k=s.k)
        rows = sim.similarity(src, data)  # [Q, N]
        torch.save({"nsoft": nsoft, "density_seconds": t_density, "sources": sources, "vals": vals, "idx": idx,
                    "rows": rows, "knn_seconds": time.perf_counter() - t1}, path)
    return str(path)


def _train_and_analyse(task: tuple[int, float, int]) -> str:
    _train_task(task)
    return _analysis_task(task) if task[2] >= 0 else ""


def _map(fn, tasks: list, workers: int) -> list:
    """``[fn(t) for t in tasks]``, in ``workers`` forked processes when workers > 1."""
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("fork")) as ex:
        return list(ex.map(fn, tasks))


# ---------------------------------------------------------------------- assembling a case
def _case(s: Settings, n: int, sigma: float, test: dict) -> dict:
    pool = _SHARED["pool"]
    t = pool["shift"][:n].double()
    clean, clean_saved = _load(n, sigma, -1)
    f_clean = predict(clean, pool["image"][:n], pool["polygons"][:n]).double()
    g_clean = predict(clean, test["image"], test["polygons"]).double()
    f, g, an, losses, secs = [], [], [], [], []
    for k in range(s.draws):
        model, saved = _load(n, sigma, k)
        f.append(predict(model, pool["image"][:n], pool["polygons"][:n]).double())
        g.append(predict(model, test["image"], test["polygons"]).double())
        an.append(torch.load(_part("analysis", n, sigma, k), weights_only=False))
        if _part("realized", n, sigma, k).exists():
            an[-1].update(torch.load(_part("realized", n, sigma, k), weights_only=False))
        losses.append(saved["losses"])
        secs.append(saved["seconds"])
    F_, G_ = torch.stack(f), torch.stack(g)  # [draws, N, 2], [draws, N_test, 2]
    labels = torch.stack([_labels(n, sigma, k).double() for k in range(s.draws)])
    actual = (F_ - f_clean).pow(2).mean((0, 2)).sqrt().numpy()  # [N] RMS over draws and components
    half = s.draws // 2
    res: dict = {
        "n_train": n, "sigma": sigma, "draws": s.draws,
        "train_seconds_mean": float(np.mean(secs)), "clean_train_seconds": clean_saved["seconds"],
        "label_noise_rms": rms(labels - t),
        "predict_mean_rms": rms(t - t.mean(0)), "test_predict_mean_rms": rms(test["shift"] - t.mean(0)),
        "clean_train_rms": rms(f_clean - t), "clean_test_rms": rms(g_clean - test["shift"]),
        "train_rms": rms(F_ - t), "train_rms_vs_labels": rms(F_ - labels), "test_rms": rms(G_ - test["shift"]),
        "actual_noise_rms": rms(actual), "test_actual_noise_rms": rms(G_ - g_clean),
        "split_half_spearman": spearman((F_[:half] - f_clean).pow(2).mean((0, 2)).sqrt().numpy(),
                                        (F_[half:] - f_clean).pow(2).mean((0, 2)).sqrt().numpy())
        if half >= 1 and s.draws - half >= 1 else float("nan"),
        "sigma_hat_over_sigma": float(np.mean([a["sigma_hat"] for a in an]) / sigma),
        "dof_mean": float(np.mean([a["dof"] for a in an])),
        "fit_error_mean": float(np.mean([a["fit_error"] for a in an])),
        "neighbors_paper_median": float(np.median(torch.stack([a["neighbors_paper"] for a in an]).numpy())),
        "neighbors_linearized_median": float(np.median(torch.stack([a["neighbors_linearized"] for a in an]).numpy())),
        "analysis_seconds_linearized": float(np.mean([a["seconds_linearized"] for a in an])),
        "analysis_seconds_paper": float(np.mean([a["seconds_paper"] for a in an])),
        "final_loss_mean": float(np.mean([lc[-1] for lc in losses])), "clean_final_loss": clean_saved["losses"][-1],
        "loss_curve_clean": clean_saved["losses"], "loss_curve_draw0": losses[0], "methods": {},
    }
    per_sample = {"actual": actual}
    if all("ridge_realized" in a for a in an):
        res["sigma_realized_over_sigma"] = float(np.mean([a["sigma_realized"] for a in an]) / sigma)
        res["signal_directions_realized"] = float(np.mean([a["n_signal"] for a in an]))
        # The same fit as the library's (one lam from the same kernel): a consistency check of the two paths.
        res["lam_check_max"] = float(max(abs(a["lam_realized"] / a["lam"] - 1) for a in an))
    scores = (F_ - f_clean).pow(2).mean(2).numpy()  # [draws, N] per-draw squared error (mean over components)
    res["reliability"] = {"methods": {}}
    for m in METHODS:
        if not all(m in a for a in an):
            continue
        pred = torch.stack([a[m] for a in an]).pow(2).mean(0).sqrt().numpy()
        if s.draws >= 2:  # the Spearman next to the reliability of the s.draws-draw actual error (_reliability)
            rep = _reliability.ranking_reliability(scores, pred, torch.stack([a[m] for a in an]).pow(2).numpy())
            for k in ("draws", "split_half_first", "split_half", "split_half_sd", "rel_actual", "ceiling"):
                res["reliability"][k] = rep.pop(k)
            res["reliability"]["methods"][m] = rep
        flag = torch.stack([a["flag_paper" if m.startswith("paper") else "flag_linearized"] for a in an]).any(0).numpy()
        ok = ~flag
        res["methods"][m] = {
            "predicted_rms": rms(pred), "calibration": rms(pred) / rms(actual), "spearman": spearman(pred, actual),
            "flagged": int(flag.sum()),
            "calibration_trusted": rms(pred[ok]) / rms(actual[ok]) if ok.any() else float("nan"),
            "spearman_trusted": spearman(pred[ok], actual[ok]) if ok.sum() > 2 else float("nan"),
            "deciles": _deciles(pred, actual),
        }
        per_sample[m] = pred
    return {"summary": res, "per_sample": per_sample}


def _deciles(predicted: np.ndarray, actual: np.ndarray, bins: int = 10) -> list[dict]:
    """Samples binned by predicted error (equal counts): RMS predicted vs RMS actual error per bin."""
    out = []
    for chunk in np.array_split(np.argsort(predicted), bins):
        if len(chunk):
            out.append({"n": len(chunk), "predicted_rms": rms(predicted[chunk]), "actual_rms": rms(actual[chunk])})
    return out


def run(s: Settings, out: Path, log=None, assemble: bool = False) -> dict:
    """Run (or resume) the whole experiment, write figures and results.json into ``out``, return the results.

    ``assemble``: train nothing, write results.json and the figures from the finished cases (the main case
    must be finished; the others are listed in ``missing_cases``)."""
    if log is None:
        def log(msg: str) -> None:
            print(msg, flush=True)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    n_max = max(n for n, _ in s.cases)
    pool = make_shift_scenes(n_max, s.scene, s.max_shift, seed=s.seed)
    test = make_shift_scenes(s.n_test, s.scene, s.max_shift, seed=s.seed + 1)
    gen = torch.Generator().manual_seed(s.seed + 7919)
    unit_noise = [torch.randn((n_max, 2), generator=gen) for _ in range(s.draws)]
    log(f"data: {n_max} training + {s.n_test} test scenes in {time.perf_counter() - t0:.1f} s")
    _SHARED.update(settings=s, pool=pool, unit_noise=unit_noise, parts=out / "parts", key=s.key(), log=log)

    # Tasks in priority order (the main case first): a clean twin when its N first appears, then every draw
    # of the case (trained, then analysed in the same process: the analysis does not need the clean twin).
    tasks, seen = [], set()
    for n, sg in s.cases:
        if n not in seen:
            seen.add(n)
            tasks.append((n, 0.0, -1))
        tasks += [(n, sg, k) for k in range(s.draws)]
    main = (s.cases[0][0], s.cases[0][1], 0)
    if not assemble:
        _map(_train_and_analyse, tasks, s.workers)
        _maps_task(main)
    done = [(n, sg) for n, sg in s.cases if _part("model", n, sg, -1).exists()
            and all(_part("analysis", n, sg, k).exists() for k in range(s.draws))]
    missing = [c for c in s.cases if c not in done]
    if s.cases[0] in missing or not _part("maps", *main).exists():
        raise SystemExit(f"the main case {s.cases[0]} is not finished: run without --assemble first")
    cases, per_sample = [], {}
    for n, sigma in done:
        c = _case(s, n, sigma, test)
        cases.append(c["summary"])
        per_sample[f"{n}_{sigma:g}"] = c["per_sample"]
        r = c["summary"]
        log(f"N={n} sigma={sigma:g}: error vs truth {r['train_rms']:.3f} px (clean twin {r['clean_train_rms']:.3f}, "
            f"predict-the-mean {r['predict_mean_rms']:.3f}); noise-induced {r['actual_noise_rms']:.3f}; sigma_hat/"
            f"sigma {r['sigma_hat_over_sigma']:.3f}; " + ", ".join(
                f"{m} {v['calibration']:.2f}/{v['spearman']:.2f}" for m, v in r["methods"].items()))

    from . import _regplots as plots  # matplotlib only when figures are drawn

    maps = torch.load(_part("maps", *main), weights_only=False)
    nsoft = maps["nsoft"]
    edges = np.histogram_bin_edges(nsoft.numpy(), bins=10)
    chosen = [int((nsoft - float(e)).abs().argmin()) for e in edges[1:]]
    t_main = pool["shift"][:main[0]]
    figures = {
        "examples": plots.shift_examples(pool, unit_noise[0], s.cases[0][1], out / "registration_examples.png"),
        "denoising": plots.error_vs_sigma(cases, out / "registration_denoising.png"),
        "calibration": plots.calibration_methods(per_sample[f"{s.cases[0][0]}_{s.cases[0][1]:g}"], METHODS,
                                                 cases[0], out / "registration_calibration.png"),
        "nsoft_hist": plots.nsoft_histogram(nsoft, edges, chosen, pool, out / "registration_nsoft_hist.png"),
        "knn": plots.knn_grid(maps["sources"], maps["vals"], maps["idx"], pool, out / "registration_knn.png"),
        "similarity_hist": plots.similarity_histograms(maps["sources"], maps["rows"], nsoft, pool,
                                                       out / "registration_similarity_hist.png"),
    }
    idx = maps["idx"]
    knn_info = {
        "n_train": main[0], "sigma": main[1], "density_seconds": maps["density_seconds"],
        "knn_seconds": maps["knn_seconds"], "sources": maps["sources"],
        "source_nsoft": [float(nsoft[i]) for i in maps["sources"]],
        "nsoft_min": float(nsoft.min()), "nsoft_median": float(nsoft.median()), "nsoft_max": float(nsoft.max()),
        "neighbors": idx.tolist(), "similarities": maps["vals"].tolist(),
        # Do the most similar patches have similar true shifts? RMS distance to the source's shift.
        "neighbor_shift_distance": [rms(t_main[idx[q, 1:]] - t_main[src]) for q, src in enumerate(maps["sources"])],
        "random_shift_distance": rms(t_main[:, None] - t_main[None, :200]),
        "rows_topk_agree": bool(torch.equal(maps["rows"].topk(s.k, dim=1).indices.sort(1).values, idx.sort(1).values)),
    }
    results = {
        "experiment": "registration",
        "settings": json.loads(json.dumps(asdict(s), default=str)),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads_per_worker": 1,
                        "workers": s.workers},
        "n_parameters": sum(p.numel() for p in ShiftNet(**s.net).parameters()),
        "cases": cases,
        "missing_cases": [list(c) for c in missing],
        "knn": knn_info,
        "figures": figures,
        "total_seconds_this_invocation": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"done in {results['total_seconds_this_invocation']:.0f} s -> {out / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nnsim.experiments.registration", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (well under a minute), what the tests run")
    ap.add_argument("--out", type=Path, required=True, help="output folder for results.json, figures and parts/")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: 2 full, 1 quick)")
    ap.add_argument("--assemble", action="store_true",
                    help="compute nothing: results.json and figures from the finished cases (while a run goes on)")
    ap.add_argument("--draws", type=int, default=None,
                    help="noise draws per case (default 6 full, 2 quick); the first draws of a longer run are "
                    "those of a shorter one (same seeds), so finished parts are reused")
    ap.add_argument("--cases", nargs="+", metavar="N:SIGMA", default=None,
                    help="only these (N, sigma) cases, the first is the main one, e.g. --cases 1000:1.5")
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings.full()
    s = replace(s, seed=args.seed, workers=s.workers if args.workers is None else args.workers)
    if args.draws is not None:
        s = replace(s, draws=args.draws)
    if args.cases is not None:
        try:
            cases = tuple((int(c.split(":")[0]), float(c.split(":")[1])) for c in args.cases)
        except (IndexError, ValueError):
            ap.error(f"--cases takes N:SIGMA pairs such as 1000:1.5, got {args.cases}")
        s = replace(s, cases=cases)
    run(s, args.out, assemble=args.assemble)
    return 0


if __name__ == "__main__":
    sys.exit(main())
