"""Self-denoising in multimodal registration (method spec §14, §10; issue 5 part 2).

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
the gradients and one pixel for the predictions; their own note asks for the centre pixel, spec §10.4).

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

    scene: SceneConfig = SceneConfig()
    sizes: tuple[int, ...] = (500, 2000)
    sigmas: tuple[float, ...] = (0.0, 1.0, 2.0, 3.0)
    n_test: int = 500
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-5
    analysis_sigma: float = 2.0  # the analysed model: the largest N at this sigma
    analysis_sigmas: tuple[float, ...] = (1.0, 2.0, 3.0)  # label-free prediction also computed at these sigmas
    knn_sources: int = 4
    k: int = 10
    seed: int = 0
    net: dict = field(default_factory=lambda: {"levels": 3, "image_base": 6, "map_base": 4, "common_base": 8})

    @staticmethod
    def full() -> Settings:
        return Settings()

    @staticmethod
    def quick() -> Settings:
        return Settings(sizes=(32, 64), sigmas=(0.0, 2.0), n_test=32, steps=30, batch=16, analysis_sigmas=(2.0,),
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
def run(s: Settings, out: Path, log=print) -> dict:
    """Run the whole experiment, write figures and results.json into ``out``, return the results."""
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

    out_size = RegistrationNet(**s.net).output_size(s.scene.size)
    test_true_c = centre(_crop(test["disp"], out_size))
    runs, models = [], {}
    for n in s.sizes:
        for sigma in s.sigmas:
            tr = {k: pool[k][:n] for k in ("image", "polygons")}
            tr["label"] = pool["disp"][:n] + sigma * unit_noise[:n]
            t1 = time.perf_counter()
            model, losses = train(tr, s, seed=s.seed + 100)
            t_train = time.perf_counter() - t1
            true_c = centre(_crop(pool["disp"][:n], out_size))
            label_c = centre(_crop(tr["label"], out_size))
            pred_tr = predict(model, tr)
            pred_te = predict(model, test)
            r = {
                "n_train": n, "sigma": sigma, "train_seconds": t_train, "final_loss": losses[-1],
                "label_noise_rms_centre": rms(label_c - true_c),
                "train_rms_centre": rms(centre(pred_tr) - true_c),
                "train_rms_vs_labels_centre": rms(centre(pred_tr) - label_c),
                "test_rms_centre": rms(centre(pred_te) - test_true_c),
                "test_rms_map": rms(pred_te - _crop(test["disp"], out_size)),
                "zero_predictor_rms_centre": rms(true_c),
            }
            runs.append(r)
            models[(n, sigma)] = (model, losses)
            log(f"N={n:5d} sigma={sigma:.1f}: label noise {r['label_noise_rms_centre']:.3f} px, train error "
                f"{r['train_rms_centre']:.3f} px, test error {r['test_rms_centre']:.3f} px ({t_train:.0f} s)")

    # Label-free prediction on the largest training set, for every analysed sigma.
    predictions = []
    analysis: dict = {}
    true_c = centre(_crop(pool["disp"], out_size))
    data = (pool["image"], pool["polygons"])
    for sigma in s.analysis_sigmas:
        if (n_max, sigma) not in models:
            continue
        model = models[(n_max, sigma)][0]
        sim = nnsim.Similarity(model, output=nnsim.outputs.center_pixel, progress=False)
        t1 = time.perf_counter()
        rep = sim.denoising(data, noise_std=sigma)
        t_den = time.perf_counter() - t1
        pred_c = centre(predict(model, {"image": pool["image"], "polygons": pool["polygons"]}))
        actual = per_sample_rms(pred_c - true_c)
        label_err = per_sample_rms(sigma * centre(_crop(unit_noise, out_size)))
        p = {
            "n_train": n_max, "sigma": sigma, "denoising_seconds": t_den,
            "actual_rms": rms(pred_c - true_c),
            "predicted_rms": float(rep.predicted_error.pow(2).mean().sqrt()),
            "predicted_median": float(rep.predicted_error.median()),
            "actual_median": float(actual.median()),
            "effective_neighbors_median": float(rep.effective_neighbors.median()),
            "factor_median": float(rep.factor.median()),
            "consistency_median": float(rep.consistency.median()),
            "ill_conditioned": int(rep.ill_conditioned.sum()),
            "spearman_predicted_vs_actual": _spearman(rep.predicted_error, actual),
            "spearman_neff_vs_actual": _spearman(rep.effective_neighbors, actual),
            "spearman_label_error_vs_actual": _spearman(label_err, actual),
        }
        predictions.append(p)
        log(f"denoising sigma={sigma}: predicted RMS {p['predicted_rms']:.3f} px vs actual {p['actual_rms']:.3f} "
            f"px, Spearman {p['spearman_predicted_vs_actual']:.3f}, median N_eff "
            f"{p['effective_neighbors_median']:.1f} ({t_den:.0f} s)")
        if sigma == s.analysis_sigma:
            analysis = {"report": rep, "actual": actual, "sim": sim, "model": model}
            p["calibration"] = _calibration(rep.predicted_error, actual)

    figures = {}
    from . import _regplots as plots  # matplotlib only when figures are drawn

    figures["examples"] = plots.examples(pool, unit_noise, s, out_size, out / "registration_examples.png")
    figures["denoising"] = plots.denoising_curves(runs, predictions, s, out / "registration_denoising.png")
    nsoft_info, knn_info = {}, {}
    if analysis:
        rep, actual, sim = analysis["report"], analysis["actual"], analysis["sim"]
        figures["calibration"] = plots.calibration(rep, actual, s.analysis_sigma, out / "registration_calibration.png")
        t1 = time.perf_counter()
        nsoft = sim.density(data)
        t_density = time.perf_counter() - t1
        edges = np.histogram_bin_edges(nsoft.numpy(), bins=10)
        chosen = [int((nsoft - float(e)).abs().argmin()) for e in edges[1:]]
        figures["nsoft_hist"] = plots.nsoft_histogram(nsoft, edges, chosen, pool, out / "registration_nsoft_hist.png")
        nsoft_info = {
            "seconds": t_density, "min": float(nsoft.min()), "median": float(nsoft.median()),
            "max": float(nsoft.max()), "bin_edges": edges.tolist(), "patches_at_edges": chosen,
            "spearman_nsoft_vs_actual": _spearman(nsoft, actual),
            "spearman_nsoft_vs_neff": _spearman(nsoft, rep.effective_neighbors),
        }
        # Sources: spread over the N_soft range (few, median, many neighbours).
        order = torch.argsort(nsoft)
        picks = torch.linspace(0, len(order) - 1, s.knn_sources).round().long()
        sources = [int(order[i]) for i in picks]
        src = (pool["image"][sources], pool["polygons"][sources])
        t1 = time.perf_counter()
        vals, idx = sim.neighbors(src, data, k=s.k)
        rows = sim.similarity(src, data)  # [Q, N]
        t_knn = time.perf_counter() - t1
        figures["knn"] = plots.knn_grid(sources, vals, idx, pool, out / "registration_knn.png")
        figures["similarity_hist"] = plots.similarity_histograms(sources, rows, nsoft, pool,
                                                                 out / "registration_similarity_hist.png")
        knn_info = {
            "seconds": t_knn, "sources": sources, "source_nsoft": [float(nsoft[i]) for i in sources],
            "neighbors": idx.tolist(), "similarities": vals.tolist(),
            "neighbor_disp_spread": [_disp_spread(true_c, idx[q].tolist()) for q in range(len(sources))],
            "random_disp_spread": _disp_spread(true_c, list(range(min(len(true_c), 200)))),
            "fraction_negative_similarity": [float((rows[q] < 0).float().mean()) for q in range(len(sources))],
        }

    results = {
        "experiment": "registration",
        "settings": _jsonable(asdict(s)),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "output_size": out_size,
        "n_parameters": sum(p.numel() for p in RegistrationNet(**s.net).parameters()),
        "data_seconds": t_data,
        "runs": runs,
        "label_free_prediction": predictions,
        "n_soft": nsoft_info,
        "knn": knn_info,
        "figures": figures,
        "loss_curves": {f"{n}_{sig}": m[1] for (n, sig), m in models.items()},
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
    args = ap.parse_args(argv)
    s = Settings.quick() if args.quick else Settings.full()
    s = replace(s, seed=args.seed)
    run(s, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

