"""Self-denoising in multimodal registration (docs/method.md, "Experiments", "Self-denoising"; issue 5 part 2).

A two-branch U-Net learns to predict the misalignment between an aerial-like image and a building map from
labels that are themselves wrong by a smooth random field of known standard deviation sigma. The data are
a procedural stand-in for the paper's aerial images + OpenStreetMap polygons (``_scenes``). We measure:

1. self-denoising: the trained network's error against the *true* displacement, for several sigma and
   training-set sizes N (the paper: far below the label noise);
2. the label-free prediction: nnsim's ``denoising`` (predicted error sigma sqrt(tr D / d), effective
   neighbour count) per training patch against the actual error (Spearman correlation, calibration);
3. the soft neighbour count N_soft over the training patches, with example patches at the bin edges;
4. the k nearest neighbours of a few source patches with their similarities;
5. each source's histogram of similarities to all training patches.

The analysed output is the displacement at the centre of the output map (``nnsim.outputs.center_pixel``,
d = 2) for the gradients and the predictions alike (the authors' code used the sum over the 4 x 4 map for
the gradients and one pixel for the predictions; their own note asks for the centre pixel: docs/method.md,
"Analysed outputs and parameters").

Run: ``python -m nnsim.experiments.registration [--quick] --out DIR``. Writes DIR/results.json and the
figures DIR/registration_*.png. Only the public API of nnsim is used.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import nnsim

from ._regnet import RegistrationNet
from ._scenes import SceneConfig, make_scenes


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run (``full()`` and ``quick()`` are the two documented presets)."""

    scene: SceneConfig = SceneConfig(n_modes=4, mode_width=(12.0, 32.0))
    sizes: tuple[int, ...] = (200, 800)
    sigmas: tuple[float, ...] = (0.0, 1.5, 3.0)
    n_test: int = 300
    steps: int = 500
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-5
    analysis_sigma: float = 1.5  # the analysed model: the largest N at this sigma
    analysis_sigmas: tuple[float, ...] = (1.5, 3.0)  # label-free prediction also computed at these sigmas
    knn_sources: int = 4
    k: int = 10
    seed: int = 0
    workers: int = 1  # processes for the independent trainings / analyses
    net: dict = field(default_factory=lambda: {"levels": 3, "image_base": 6, "map_base": 4, "common_base": 8})

    @staticmethod
    def full() -> Settings:
        return Settings(workers=3)

    @staticmethod
    def quick() -> Settings:
        return Settings(sizes=(32, 64), sigmas=(0.0, 2.0), n_test=32, steps=30, batch=16, analysis_sigma=2.0,
                        analysis_sigmas=(2.0,),
                        knn_sources=2, k=4, net={"levels": 3, "image_base": 4, "map_base": 2, "common_base": 4})


# ---------------------------------------------------------------------- training and evaluation
def _crop(x: Tensor, size: int) -> Tensor:
    off = (x.shape[-1] - size) // 2
    return x[..., off:off + size, off:off + size]


def train(data: dict[str, Tensor], s: Settings, seed: int) -> tuple[RegistrationNet, list[float]]:
    """Adam on the mean squared error between the displacement map and the (noisy) labels, cropped to the
    output window. Returns the model (eval mode) and the loss curve (mean per 50 steps)."""
    torch.manual_seed(seed)
    model = RegistrationNet(max_disp=s.scene.max_disp, **s.net)
    out = model.output_size(s.scene.size)
    target = _crop(data["label"], out)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.steps)
    gen = torch.Generator().manual_seed(seed)
    n, losses, acc = len(target), [], []
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    for _ in range(s.steps):
        if pos + s.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + s.batch]
        pos += s.batch
        loss = (model(data["image"][idx], data["polygons"][idx]) - target[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        acc.append(loss.item())
        if len(acc) == 50:
            losses.append(float(np.mean(acc)))
            acc = []
    if acc:
        losses.append(float(np.mean(acc)))
    return model.eval(), losses


@torch.no_grad()
def predict(model: RegistrationNet, data: dict[str, Tensor], batch: int = 256) -> Tensor:
    """The displacement maps [N, 2, S_out, S_out]."""
    return torch.cat([model(data["image"][i:i + batch], data["polygons"][i:i + batch])
                      for i in range(0, len(data["image"]), batch)])


def centre(maps: Tensor) -> Tensor:
    """[N, 2, H, W] -> [N, 2] at (H // 2, W // 2), the position ``nnsim.outputs.center_pixel`` analyses."""
    return nnsim.outputs.center_pixel(maps, ())


def rms(err: Tensor) -> float:
    """Root-mean-square per component (pixels)."""
    return float(err.pow(2).mean().sqrt())


def per_sample_rms(err: Tensor) -> Tensor:
    """[N, d] -> [N] sqrt(|e|^2 / d), the per-component RMS that sigma sqrt(tr D / d) predicts."""
    return err.pow(2).mean(1).sqrt()


# ---------------------------------------------------------------------- the experiment
# Worker processes inherit the scenes by fork (set before the pool starts), so nothing large is pickled.
_SHARED: dict = {}


def _map(fn, tasks: list, workers: int) -> list:
    """``[fn(t) for t in tasks]``, in ``workers`` forked processes when workers > 1."""
    if workers <= 1 or len(tasks) <= 1:
        return [fn(t) for t in tasks]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("fork")) as ex:
        return list(ex.map(fn, tasks))


def _train_task(task: tuple[int, float]) -> tuple[dict, list[float], float]:
    torch.set_num_threads(1)
    n, sigma = task
    s, pool, unit = _SHARED["settings"], _SHARED["pool"], _SHARED["unit_noise"]
    tr = {"image": pool["image"][:n], "polygons": pool["polygons"][:n], "label": pool["disp"][:n] + sigma * unit[:n]}
    t1 = time.perf_counter()
    model, losses = train(tr, s, seed=s.seed + 100)
    return model.state_dict(), losses, time.perf_counter() - t1


def _model(state: dict) -> RegistrationNet:
    s = _SHARED["settings"]
    model = RegistrationNet(max_disp=s.scene.max_disp, **s.net)
    model.load_state_dict(state)
    return model.eval()


def _analysis_task(task: tuple[str, float]) -> dict:
    """("denoising", sigma): nnsim's label-free statistics; ("maps", sigma): N_soft, neighbours, similarity rows."""
    torch.set_num_threads(1)
    kind, sigma = task
    s, pool = _SHARED["settings"], _SHARED["pool"]
    model = _model(_SHARED["states"][sigma])
    sim = nnsim.Similarity(model, output=nnsim.outputs.center_pixel, progress=False)
    data = (pool["image"], pool["polygons"])
    t1 = time.perf_counter()
    if kind == "denoising":
        rep = sim.denoising(data, noise_std=sigma)
        return {"report": {k: v for k, v in rep.to_dict().items()}, "seconds": time.perf_counter() - t1}
    nsoft = sim.density(data)
    t_density = time.perf_counter() - t1
    order = torch.argsort(nsoft)  # sources spread over the N_soft range: few ... many neighbours
    sources = [int(order[i]) for i in torch.linspace(0, len(order) - 1, s.knn_sources).round().long()]
    src = (pool["image"][sources], pool["polygons"][sources])
    t1 = time.perf_counter()
    vals, idx = sim.neighbors(src, data, k=s.k)
    rows = sim.similarity(src, data)  # [Q, N]
    return {"nsoft": nsoft, "density_seconds": t_density, "sources": sources, "vals": vals, "idx": idx,
            "rows": rows, "knn_seconds": time.perf_counter() - t1}


def run(s: Settings, out: Path, log=None) -> dict:
    """Run the whole experiment, write figures and results.json into ``out``, return the results."""
    if log is None:
        def log(msg: str) -> None:
            print(msg, flush=True)
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    n_max = max(s.sizes)
    # One pool of scenes; smaller training sets are prefixes, and the label noise of every sigma is the same
    # unit field scaled, so the runs differ only in what they vary.
    pool = make_scenes(n_max, s.scene, noise_std=1.0, seed=s.seed)
    unit_noise = pool["label"] - pool["disp"]
    test = make_scenes(s.n_test, s.scene, noise_std=0.0, seed=s.seed + 1)
    t_data = time.perf_counter() - t0
    log(f"data: {n_max} training + {s.n_test} test scenes in {t_data:.1f} s")
    _SHARED.update(settings=s, pool=pool, unit_noise=unit_noise)

    out_size = RegistrationNet(**s.net).output_size(s.scene.size)
    test_true_c = centre(_crop(test["disp"], out_size))
    tasks = [(n, sigma) for n in s.sizes for sigma in s.sigmas]
    trained = dict(zip(tasks, _map(_train_task, tasks, s.workers)))
    runs = []
    for (n, sigma), (state, losses, t_train) in trained.items():
        model = _model(state)
        tr = {"image": pool["image"][:n], "polygons": pool["polygons"][:n]}
        true_c = centre(_crop(pool["disp"][:n], out_size))
        label_c = true_c + sigma * centre(_crop(unit_noise[:n], out_size))
        pred_tr, pred_te = predict(model, tr), predict(model, test)
        r = {
            "n_train": n, "sigma": sigma, "train_seconds": t_train, "final_loss": losses[-1],
            "label_noise_rms_centre": rms(label_c - true_c),
            "train_rms_centre": rms(centre(pred_tr) - true_c),
            "train_rms_vs_labels_centre": rms(centre(pred_tr) - label_c),
            "test_rms_centre": rms(centre(pred_te) - test_true_c),
            "test_rms_map": rms(pred_te - _crop(test["disp"], out_size)),
            "zero_predictor_rms_centre": rms(true_c),
            "test_zero_predictor_rms_centre": rms(test_true_c),
        }
        runs.append(r)
        log(f"N={n:5d} sigma={sigma:.1f}: label noise {r['label_noise_rms_centre']:.3f} px, train error "
            f"{r['train_rms_centre']:.3f} px, test error {r['test_rms_centre']:.3f} px (zero predictor "
            f"{r['test_zero_predictor_rms_centre']:.3f}; {t_train:.0f} s)")

    # Label-free prediction on the largest training set, for every analysed sigma, and the similarity maps of
    # the analysed model, all in parallel.
    sigmas = [sg for sg in s.analysis_sigmas if (n_max, sg) in trained]
    _SHARED["states"] = {sg: trained[(n_max, sg)][0] for sg in s.sigmas if (n_max, sg) in trained}
    jobs = [("denoising", sg) for sg in sigmas]
    if s.analysis_sigma in _SHARED["states"]:
        jobs.append(("maps", s.analysis_sigma))
    done = dict(zip(jobs, _map(_analysis_task, jobs, s.workers)))
    true_c = centre(_crop(pool["disp"], out_size))
    predictions, calib = [], None
    for sigma in sigmas:
        rep, t_den = done[("denoising", sigma)]["report"], done[("denoising", sigma)]["seconds"]
        pred_c = centre(predict(_model(_SHARED["states"][sigma]), pool))
        actual = per_sample_rms(pred_c - true_c)
        label_err = per_sample_rms(sigma * centre(_crop(unit_noise, out_size)))
        # The part of the error the labels' noise caused: the same network trained on clean labels (same seed,
        # same data) is the reference the derivation's f_i - y~_i ~ sum_j W_ij eps_j is about.
        noise_part = None
        if 0.0 in _SHARED["states"]:
            noise_part = per_sample_rms(pred_c - centre(predict(_model(_SHARED["states"][0.0]), pool)))
        p = {
            "n_train": n_max, "sigma": sigma, "denoising_seconds": t_den,
            "actual_rms": rms(pred_c - true_c),
            "predicted_rms": float(rep["predicted_error"].pow(2).mean().sqrt()),
            "predicted_median": float(rep["predicted_error"].median()),
            "actual_median": float(actual.median()),
            "effective_neighbors_median": float(rep["effective_neighbors"].median()),
            "effective_neighbors_min": float(rep["effective_neighbors"].min()),
            "effective_neighbors_max": float(rep["effective_neighbors"].max()),
            "factor_median": float(rep["factor"].median()),
            "consistency_median": float(rep["consistency"].median()),
            "ill_conditioned": int(rep["ill_conditioned"].sum()),
            "spearman_predicted_vs_actual": _spearman(rep["predicted_error"], actual),
            "spearman_neff_vs_actual": _spearman(rep["effective_neighbors"], actual),
            "spearman_label_error_vs_actual": _spearman(label_err, actual),
            "calibration": _calibration(rep["predicted_error"], actual),
        }
        if noise_part is not None:
            p["noise_part_rms"] = rms(noise_part)
            p["spearman_predicted_vs_noise_part"] = _spearman(rep["predicted_error"], noise_part)
            p["calibration_noise_part"] = _calibration(rep["predicted_error"], noise_part)
        predictions.append(p)
        log(f"denoising sigma={sigma}: predicted RMS {p['predicted_rms']:.3f} px vs actual {p['actual_rms']:.3f} "
            f"px, Spearman {p['spearman_predicted_vs_actual']:.3f}, median N_eff "
            f"{p['effective_neighbors_median']:.1f} ({t_den:.0f} s)")
        if sigma == s.analysis_sigma:
            calib = (rep, actual)

    from . import _regplots as plots  # matplotlib only when figures are drawn

    figures = {
        "examples": plots.examples(pool, unit_noise, s, out_size, out / "registration_examples.png"),
        "denoising": plots.denoising_curves(runs, predictions, s, out / "registration_denoising.png"),
    }
    if calib is not None:
        figures["calibration"] = plots.calibration(calib[0]["predicted_error"], calib[0]["effective_neighbors"],
                                                   calib[1], s.analysis_sigma, out / "registration_calibration.png")
    nsoft_info, knn_info = {}, {}
    if ("maps", s.analysis_sigma) in done:
        m = done[("maps", s.analysis_sigma)]
        nsoft, sources, vals, idx, rows = m["nsoft"], m["sources"], m["vals"], m["idx"], m["rows"]
        edges = np.histogram_bin_edges(nsoft.numpy(), bins=10)
        chosen = [int((nsoft - float(e)).abs().argmin()) for e in edges[1:]]
        figures["nsoft_hist"] = plots.nsoft_histogram(nsoft, edges, chosen, pool, out / "registration_nsoft_hist.png")
        nsoft_info = {
            "n_train": n_max, "sigma": s.analysis_sigma, "seconds": m["density_seconds"],
            "min": float(nsoft.min()), "median": float(nsoft.median()), "max": float(nsoft.max()),
            "bin_edges": edges.tolist(), "patches_at_edges": chosen,
        }
        if calib is not None:
            nsoft_info["spearman_nsoft_vs_actual"] = _spearman(nsoft, calib[1])
            nsoft_info["spearman_nsoft_vs_neff"] = _spearman(nsoft, calib[0]["effective_neighbors"])
        figures["knn"] = plots.knn_grid(sources, vals, idx, pool, out / "registration_knn.png")
        figures["similarity_hist"] = plots.similarity_histograms(sources, rows, nsoft, pool,
                                                                 out / "registration_similarity_hist.png")
        knn_info = {
            "seconds": m["knn_seconds"], "sources": sources, "source_nsoft": [float(nsoft[i]) for i in sources],
            "neighbors": idx.tolist(), "similarities": vals.tolist(),
            "neighbor_disp_spread": [_disp_spread(true_c, idx[q].tolist()) for q in range(len(sources))],
            "random_disp_spread": _disp_spread(true_c, list(range(min(len(true_c), 200)))),
            "fraction_negative_similarity": [float((rows[q] < 0).float().mean()) for q in range(len(sources))],
            "rows_topk_agree": bool(torch.equal(rows.topk(s.k, dim=1).indices.sort(1).values,
                                                idx.sort(1).values)),
        }

    results = {
        "experiment": "registration",
        "settings": _jsonable(asdict(s)),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads_per_worker": 1, "workers": s.workers},
        "output_size": out_size,
        "n_parameters": sum(p.numel() for p in RegistrationNet(**s.net).parameters()),
        "data_seconds": t_data,
        "runs": runs,
        "label_free_prediction": predictions,
        "n_soft": nsoft_info,
        "knn": knn_info,
        "figures": figures,
        "loss_curves": {f"{n}_{sig}": v[1] for (n, sig), v in trained.items()},
        "total_seconds": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    log(f"done in {results['total_seconds']:.0f} s -> {out / 'results.json'}")
    return results


def _spearman(a: Tensor, b: Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.detach().cpu().numpy(), b.detach().cpu().numpy()).statistic)


def _calibration(predicted: Tensor, actual: Tensor, bins: int = 10) -> list[dict]:
    """Samples binned by predicted error (equal counts): mean predicted vs RMS actual error per bin."""
    order = torch.argsort(predicted)
    out = []
    for chunk in torch.tensor_split(order, bins):
        if len(chunk):
            out.append({"n": len(chunk), "predicted_rms": float(predicted[chunk].pow(2).mean().sqrt()),
                        "actual_rms": float(actual[chunk].pow(2).mean().sqrt())})
    return out


def _disp_spread(true_c: Tensor, idx: list[int]) -> float:
    """RMS distance of the true centre displacements of a set of patches to their mean (pixels)."""
    t = true_c[idx]
    return float((t - t.mean(0)).pow(2).sum(1).mean().sqrt())


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nnsim.experiments.registration", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (about a minute), what CI runs")
    ap.add_argument("--out", type=Path, required=True, help="output folder for results.json and the figures")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="training-set sizes (default: the preset's); the largest is analysed")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: 3 full, 1 quick)")
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings.full()
    s = replace(s, seed=args.seed, workers=s.workers if args.workers is None else args.workers)
    if args.sizes:
        s = replace(s, sizes=tuple(args.sizes))
    run(s, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

