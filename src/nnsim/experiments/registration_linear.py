"""Why the registration network's noise-induced error exceeds the linear-smoother predictions (issue 12's
closing question; docs/experiments/registration.md, section 4, "Why the label-free predictions fall short").

The label-free estimators of docs/method.md, "Self-denoising", model the trained network as a linear smoother
in one fixed kernel. The registration stand-in's actual noise-induced error f_noisy - f_clean is ~2x what
``method="linearized"`` predicts. Three causes are separated here, on the registration experiment's main case
(same scenes, noise draws, initialisation θ0, mini-batches, Adam and cosine schedule):

* (a) **finite-time, finite-learning-rate, optimiser dynamics of a fixed-kernel linear model**: the
  *linearised twin* f_lin(x; θ) = f(x; θ0) + J(x; θ0)(θ - θ0), trained exactly as the real network, on the
  noisy labels of every draw and on the clean labels. Its noise-induced error f_lin,noisy - f_lin,clean is what
  a fixed-kernel linear model trained this way does; the smoothers of its kernel K_0 = J J^T (and of the
  Adam-preconditioned K_0 diag(p) with p the twin's time-averaged step sizes lr_t / (sqrt(v_t) + eps)) are
  compared with it;
* (b) **feature learning**: the kernel drift ||K_T - K_0||_F / ||K_0||_F of the noisy and the clean networks,
  the alignment of each final kernel with its own noise (eps^T K eps / ||eps||^2 over tr K / (N d): 1 for a
  kernel independent of eps), and the smoothers of K_0, K_T (noisy), K_T (clean twin) and a checkpoint average;
* (c) **nonlinearity of f in θ**: the distance between the real network and its linearised twin trained on the
  same labels.

J is computed once per parameter vector (torch.func, per-sample Jacobians [N, d, P]); since f_lin is linear in θ,
training it is Adam on the flat δ = θ - θ0 with f_lin = f(θ0) + J δ, which is exact (the test checks it against
torch.func.jvp and the real network at a small learning rate). Every training and every draw's evaluation is saved
under ``DIR/parts/`` and skipped on a rerun with the same settings.

Run: ``python -m nnsim.experiments.registration_linear [--quick] --out DIR``; writes DIR/results.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, jacrev, vmap

from ..estimators import linearized
from . import _reliability
from . import registration as reg
from ._regnet import ShiftNet
from ._scenes import make_shift_scenes

SMOOTHERS = ("ridge", "flow")


@dataclass(frozen=True)
class Settings:
    """The registration experiment's settings (``base``) and the one case analysed here."""

    base: reg.Settings = field(default_factory=reg.Settings.full)
    n: int = 1000
    sigma: float = 1.5
    draws: int = 6
    checkpoints: tuple[int, ...] = (200, 400, 600)  # steps whose kernels (with θ0 and θ_T) make the average

    @staticmethod
    def full() -> Settings:
        return Settings()

    @staticmethod
    def quick() -> Settings:
        return Settings(base=replace(reg.Settings.quick(), cases=((64, 3.0),), steps=100), n=64, sigma=3.0, draws=2,
                        checkpoints=(50,))

    def key(self) -> str:
        d = asdict(self)
        d["base"] = self.base.key()
        return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


# ---------------------------------------------------------------------- the linearised model
def flat_params(model: torch.nn.Module) -> Tensor:
    """θ as one vector [P] in ``model.parameters()`` order (the column order of :func:`jacobian`)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def jacobian(model: ShiftNet, image: Tensor, polygons: Tensor, chunk: int = 50) -> Tensor:
    """Per-sample Jacobians J [N, d, P] of the outputs with respect to every parameter (columns in
    :func:`flat_params` order), by torch.func.vmap(jacrev)."""
    names = [k for k, _ in model.named_parameters()]
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(p: dict, a: Tensor, b: Tensor) -> Tensor:
        return functional_call(model, p, (a[None], b[None]))[0]

    jac = vmap(jacrev(f), in_dims=(None, 0, 0), chunk_size=chunk)(params, image, polygons)
    n = len(image)
    return torch.cat([jac[k].reshape(n, jac[k].shape[1], -1) for k in names], -1)


def kernel_matrix(J: Tensor, metric: Tensor | None = None) -> Tensor:
    """K = J diag(metric) J^T as an [N d, N d] float64 matrix (row (i, c): sample i, output c)."""
    Jf = J.double().reshape(-1, J.shape[-1])
    return Jf @ (Jf if metric is None else Jf * metric.double()).T


def train_linear(s: reg.Settings, J: Tensor, f0: Tensor, labels: Tensor, optimizer: str = "adam",
                 lr: float | None = None, batch: int | None = None, schedule: bool = True) -> tuple[Tensor, Tensor]:
    """Train the linearised twin f_lin = f0 + J δ (J [N, d, P], f0 [N, d]) from δ = 0 on the squared error to
    ``labels`` [N, d] as :func:`registration.train` trains the network: ``s.steps`` steps over
    :func:`registration.batches`, Adam (or plain SGD) at ``s.lr`` with cosine decay, in float64.

    Returns (δ [P], p [P]): p = Σ_t lr_t / (sqrt(v̂_t) + eps), Adam's step sizes summed over training (the
    parameter metric of the preconditioned kernel; for SGD, Σ_t lr_t for every parameter)."""
    J, f0, labels = J.double(), f0.double(), labels.double()
    delta = torch.zeros(J.shape[-1], dtype=torch.float64, requires_grad=True)
    lr = s.lr if lr is None else lr
    opt = torch.optim.Adam([delta], lr=lr) if optimizer == "adam" else torch.optim.SGD([delta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, s.steps) if schedule else None
    p = torch.zeros_like(delta, requires_grad=False)
    s_b = s if batch is None else replace(s, batch=batch)
    for idx in reg.batches(s_b, len(labels)):
        loss = (f0[idx] + J[idx] @ delta - labels[idx]).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        group = opt.param_groups[0]
        opt.step()
        if optimizer == "adam":
            st = opt.state[delta]
            t = float(st["step"])
            v_hat = st["exp_avg_sq"] / (1 - group["betas"][1] ** t)
            p += group["lr"] / (v_hat.sqrt() + group["eps"])
        else:
            p += group["lr"]
        if sched is not None:
            sched.step()
    return delta.detach(), p


# ---------------------------------------------------------------------- the estimators on one kernel
def smoother_predictions(spec: linearized.Spectrum, y: Tensor, f: Tensor, sigma: float, eps: Tensor) -> dict:
    """The linearized estimator (both smoothers) of one spectrum, targets y [N, d], predictions f [N, d]:
    per-sample predicted noise-induced error with the estimated σ̂ and with the true σ, σ̂, fit error, and
    ``smoothed_noise_ratio`` = ||S eps|| / (σ sqrt(tr S S^T)) for the true noise eps [N, d] (1 in expectation
    for a kernel independent of eps; above 1 when the kernel aligns with its own noise)."""
    out = {}
    d = y.shape[1]
    e = eps.double().reshape(-1)
    for sm in SMOOTHERS:
        fit = linearized.linearized_fit(spec, y, f, smoother=sm)
        sv = linearized.filter_values(spec.ev, fit.lam, sm)
        shape = (fit.factor_matrix.diagonal(dim1=-2, dim2=-1).sum(-1) / d).clamp_min(0).sqrt()
        out[sm] = {"pred_sigma_hat": fit.noise_std_estimated * shape, "pred_true_sigma": sigma * shape,
                   "sigma_hat": fit.noise_std_estimated, "fit_error": fit.fit_error, "trace": fit.trace,
                   "lam": fit.lam,
                   "smoothed_noise_ratio": float((sv * (spec.U.T @ e)).norm() / (sigma * sv.square().sum().sqrt()))}
    return out


def noise_alignment(K: Tensor, eps: Tensor) -> float:
    """(eps^T K eps / ||eps||^2) / (tr K / M): 1 in expectation for a kernel independent of the noise eps [M]."""
    e = eps.double().reshape(-1)
    return float((e @ K @ e) / (e @ e) / (K.diagonal().sum() / len(e)))


def rel_fro(A: Tensor, B: Tensor) -> float:
    """||A - B||_F / ||B||_F."""
    return float((A - B).norm() / B.norm())


def kernel_cosine(A: Tensor, B: Tensor) -> float:
    """<A, B>_F / (||A||_F ||B||_F): 1 when two kernels differ only by scale (which the smoothers, with their
    fitted lam, ignore), lower the more their shapes differ."""
    return float((A * B).sum() / (A.norm() * B.norm()))


def smooth(spec: linearized.Spectrum, lam: float, v: Tensor, smoother: str = "ridge") -> Tensor:
    """S v for the smoother of ``spec`` at ``lam`` (v [N, d])."""
    s = linearized.filter_values(spec.ev, lam, smoother)
    return (spec.U @ (s * (spec.U.T @ v.double().reshape(-1)))).reshape(v.shape)


def decomposition(spec_noisy: linearized.Spectrum, y: Tensor, f_noisy: Tensor, spec_clean: linearized.Spectrum,
                  t: Tensor, f_clean: Tensor) -> dict:
    """With each network modelled as the ridge smoother of its own final kernel (f_noisy ~ S_n y, f_clean ~ S_c t,
    lam fitted to each), f_noisy - f_clean ~ S_n eps + (S_n - S_c) t: the noise averaged by the noisy network's
    smoother, plus the difference in how the two networks' kernels smooth the *signal*. Returns both terms
    [N, d] and the fit errors."""
    fit_n = linearized.linearized_fit(spec_noisy, y, f_noisy)
    fit_c = linearized.linearized_fit(spec_clean, t, f_clean)
    Sn_t = smooth(spec_noisy, fit_n.lam, t)
    return {"noise_term": smooth(spec_noisy, fit_n.lam, y - t), "signal_term": Sn_t - smooth(spec_clean, fit_c.lam, t),
            "fit_error_noisy": fit_n.fit_error, "fit_error_clean": fit_c.fit_error}


def _shape_numbers(KT: Tensor, K0: Tensor, K_clean: Tensor) -> dict:
    return {"cos_noisy_K0": kernel_cosine(KT, K0), "cos_noisy_clean": kernel_cosine(KT, K_clean),
            "scale_noisy_K0": float(KT.norm() / K0.norm())}


# ---------------------------------------------------------------------- the run
class _Run:
    """The data, the parts folder and the saved trainings of one run."""

    def __init__(self, s: Settings, out: Path, log) -> None:
        self.s, self.log = s, log
        b = s.base
        pool = make_shift_scenes(s.n, b.scene, b.max_shift, seed=b.seed)
        self.image, self.polygons, self.shift = pool["image"], pool["polygons"], pool["shift"]
        # The registration experiment's noise draws: drawn for its largest N, the first n rows used.
        n_max = max([s.n] + [n for n, _ in b.cases])
        gen = torch.Generator().manual_seed(b.seed + 7919)
        self.unit_noise = [torch.randn((n_max, 2), generator=gen)[:s.n] for _ in range(s.draws)]
        self.parts = out / "parts"
        self.parts.mkdir(parents=True, exist_ok=True)
        self.key = s.key()

    def labels(self, draw: int) -> Tensor:
        return self.shift.clone() if draw < 0 else self.shift + self.s.sigma * self.unit_noise[draw]

    def part(self, kind: str, draw: int) -> Path:
        return self.parts / f"{kind}_{self.key}_{'clean' if draw < 0 else f'd{draw}'}.pt"

    def real(self, draw: int) -> dict:
        """The real network trained on draw ``draw``'s labels, its checkpoints and training predictions."""
        path = self.part("real", draw)
        if not path.exists():
            s, ckpts = self.s, {}
            t1 = time.perf_counter()

            def keep(step: int, model: ShiftNet) -> None:
                if step in s.checkpoints:
                    ckpts[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

            model, losses = reg.train(s.base, self.image, self.polygons, self.labels(draw), on_step=keep)
            torch.save({"state": model.state_dict(), "checkpoints": ckpts, "losses": losses,
                        "f": reg.predict(model, self.image, self.polygons).double(),
                        "seconds": time.perf_counter() - t1}, path)
            self.log(f"trained the network on {'clean' if draw < 0 else f'draw {draw}'} in "
                     f"{time.perf_counter() - t1:.0f} s")
        return torch.load(path, weights_only=False)

    def model(self, state: dict) -> ShiftNet:
        m = ShiftNet(**self.s.base.net)
        m.load_state_dict(state)
        return m.eval()

    def linear(self, draw: int, J0: Tensor, f0: Tensor, kind: str = "linear") -> dict:
        """The linearised model f0 + J0 δ (``kind="linear"``: the twin, at θ0; ``"linear_at_clean"``: at the
        clean network's final θ) trained from δ = 0 on draw ``draw``'s labels: training predictions, metric p."""
        path = self.part(kind, draw)
        if not path.exists():
            t1 = time.perf_counter()
            delta, p = train_linear(self.s.base, J0, f0, self.labels(draw))
            torch.save({"f": f0.double() + J0.double() @ delta, "delta_norm": float(delta.norm()), "p": p,
                        "seconds": time.perf_counter() - t1}, path)
            self.log(f"trained the {kind} model on {'clean' if draw < 0 else f'draw {draw}'} in "
                     f"{time.perf_counter() - t1:.0f} s")
        return torch.load(path, weights_only=False)


def _evaluate_draw(r: _Run, k: int, J0: Tensor, K0: Tensor, spec0: linearized.Spectrum, K_clean: Tensor,
                   spec_clean: linearized.Spectrum, f0: Tensor) -> dict:
    """Every kernel's estimator for the real network and the twin of draw k, the drift and alignment numbers."""
    path = r.part("eval", k)
    s, t1 = r.s, time.perf_counter()
    real, lin = r.real(k), r.linear(k, J0, f0)
    y = r.labels(k).double()
    t, f_clean = r.shift.double(), r.real(-1)["f"]
    if path.exists():
        res = torch.load(path, weights_only=False)
        if "shape" not in res or "decomposition" not in res:  # parts saved before these numbers existed
            KT = kernel_matrix(jacobian(r.model(real["state"]), r.image, r.polygons))
            res["shape"] = _shape_numbers(KT, K0, K_clean)
            res["decomposition"] = decomposition(linearized.exact_spectrum(KT), y, real["f"], spec_clean, t, f_clean)
            torch.save(res, path)
        return res
    eps = (y - r.shift.double()).reshape(-1)
    model = r.model(real["state"])
    KT = kernel_matrix(jacobian(model, r.image, r.polygons))
    K_avg = K0 + KT
    for step in s.checkpoints:
        K_avg += kernel_matrix(jacobian(r.model(real["checkpoints"][step]), r.image, r.polygons))
    K_avg /= len(s.checkpoints) + 2
    K_adam = kernel_matrix(J0, lin["p"])
    spectra = {"K0": spec0, "KT_noisy": linearized.exact_spectrum(KT), "KT_clean": spec_clean,
               "K_checkpoint_avg": linearized.exact_spectrum(K_avg), "K0_adam": linearized.exact_spectrum(K_adam)}
    res = {"real": {}, "linear": {}}
    for name, spec in spectra.items():
        res["real"][name] = smoother_predictions(spec, y, real["f"], s.sigma, y - r.shift)
        res["linear"][name] = smoother_predictions(spec, y, lin["f"], s.sigma, y - r.shift)
    res["drift_noisy"] = rel_fro(KT, K0)
    res["drift_noisy_vs_clean"] = rel_fro(KT, K_clean)
    res["shape"] = _shape_numbers(KT, K0, K_clean)
    res["decomposition"] = decomposition(spectra["KT_noisy"], y, real["f"], spec_clean, t, f_clean)
    res["alignment"] = {"K0": noise_alignment(K0, eps), "KT_noisy": noise_alignment(KT, eps),
                        "KT_clean": noise_alignment(K_clean, eps), "K_checkpoint_avg": noise_alignment(K_avg, eps),
                        "K0_adam": noise_alignment(K_adam, eps)}
    res["seconds"] = time.perf_counter() - t1
    torch.save(res, path)
    r.log(f"evaluated draw {k} in {res['seconds']:.0f} s: drift {res['drift_noisy']:.3f}, alignment "
          + ", ".join(f"{n} {v:.2f}" for n, v in res["alignment"].items()))
    return res


def _rms(x) -> float:
    return reg.rms(x)


def run(s: Settings, out: Path, log=None) -> dict:
    """Run (or resume) the experiment; write and return ``out/results.json``."""
    if log is None:
        def log(msg: str) -> None:
            print(msg, flush=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    r = _Run(s, out, log)
    model0 = reg.make_model(s.base).eval()
    f0 = reg.predict(model0, r.image, r.polygons).double()
    J0 = jacobian(model0, r.image, r.polygons)
    K0 = kernel_matrix(J0)
    clean, lin_clean = r.real(-1), r.linear(-1, J0, f0)
    K_clean = kernel_matrix(jacobian(r.model(clean["state"]), r.image, r.polygons))
    spec0, spec_clean = linearized.exact_spectrum(K0), linearized.exact_spectrum(K_clean)
    evals = [_evaluate_draw(r, k, J0, K0, spec0, K_clean, spec_clean, f0) for k in range(s.draws)]
    # The linearised model at the clean network's final parameters (fixed kernel K_T,clean, the kernel the
    # network ends with, independent of the noise), trained from there as the network was: what a fixed
    # trained kernel absorbs under the same optimiser, without feature learning during training.
    J_clean = jacobian(r.model(clean["state"]), r.image, r.polygons)
    late = {k: r.linear(k, J_clean, clean["f"], kind="linear_at_clean") for k in [-1, *range(s.draws)]}
    for k, e in enumerate(evals):
        y = r.labels(k).double()
        e["linear_at_clean"] = {
            "KT_clean": smoother_predictions(spec_clean, y, late[k]["f"], s.sigma, y - r.shift),
            "KT_clean_adam": smoother_predictions(linearized.exact_spectrum(kernel_matrix(J_clean, late[k]["p"])), y,
                                                  late[k]["f"], s.sigma, y - r.shift)}
    del J_clean

    t = r.shift.double()
    models = {"real": ([r.real(k)["f"] for k in range(s.draws)], clean["f"]),
              "linear": ([r.linear(k, J0, f0)["f"] for k in range(s.draws)], lin_clean["f"]),
              "linear_at_clean": ([late[k]["f"] for k in range(s.draws)], late[-1]["f"])}
    kernels = list(evals[0]["alignment"])
    summary: dict = {"models": {}, "drift_clean": rel_fro(K_clean, K0),
                     "drift_noisy": float(np.mean([e["drift_noisy"] for e in evals])),
                     "drift_noisy_vs_clean": float(np.mean([e["drift_noisy_vs_clean"] for e in evals])),
                     "cos_clean_K0": kernel_cosine(K_clean, K0), "scale_clean_K0": float(K_clean.norm() / K0.norm()),
                     **{n: float(np.mean([e["shape"][n] for e in evals])) for n in evals[0]["shape"]},
                     "alignment": {n: float(np.mean([e["alignment"][n] for e in evals])) for n in kernels},
                     "alignment_per_draw": {n: [e["alignment"][n] for e in evals] for n in kernels}}
    half = s.draws // 2
    for m, (fs, fc) in models.items():
        F_ = torch.stack(fs)  # [draws, N, 2]
        labels = torch.stack([r.labels(k).double() for k in range(s.draws)])
        actual = (F_ - fc).pow(2).mean((0, 2)).sqrt().numpy()
        row = {"clean_vs_truth": _rms(fc - t), "noisy_vs_truth": _rms(F_ - t), "noisy_vs_labels": _rms(F_ - labels),
               "actual_noise_rms": _rms(actual), "actual_noise_over_sigma": _rms(actual) / s.sigma,
               "split_half_spearman": reg.spearman((F_[:half] - fc).pow(2).mean((0, 2)).sqrt().numpy(),
                                                   (F_[half:] - fc).pow(2).mean((0, 2)).sqrt().numpy())
               if half >= 1 else float("nan"), "estimators": {}}
        for kern in evals[0][m]:
            for sm in SMOOTHERS:
                cell = {}
                for which in ("pred_sigma_hat", "pred_true_sigma"):
                    pred_scores = torch.stack([e[m][kern][sm][which] for e in evals]).pow(2)  # [draws, N]
                    pred = pred_scores.mean(0).sqrt().numpy()
                    tag = which.removeprefix("pred_")
                    cell[f"calibration_{tag}"] = _rms(pred) / _rms(actual)
                    cell[f"spearman_{tag}"] = reg.spearman(pred, actual)
                    if s.draws >= 2:  # the Spearman next to the reliability of the actual error (_reliability)
                        cell[f"reliability_{tag}"] = _reliability.ranking_reliability(
                            (F_ - fc).pow(2).mean(2).numpy(), pred, pred_scores.numpy())
                cell["sigma_hat_over_sigma"] = float(np.mean([e[m][kern][sm]["sigma_hat"] for e in evals])) / s.sigma
                cell["fit_error"] = float(np.mean([e[m][kern][sm]["fit_error"] for e in evals]))
                cell["trace"] = float(np.mean([e[m][kern][sm]["trace"] for e in evals]))
                cell["smoothed_noise_ratio"] = float(np.mean([e[m][kern][sm]["smoothed_noise_ratio"] for e in evals]))
                row["estimators"][f"{kern}/{sm}"] = cell
        summary["models"][m] = row
    # The noise-induced error of the real network split into noise averaging and signal-smoothing difference.
    actual_real = (torch.stack(models["real"][0]) - clean["f"]).pow(2).mean((0, 2)).sqrt().numpy()
    dec = {}
    for term in ("noise_term", "signal_term"):
        per = torch.stack([e["decomposition"][term] for e in evals])  # [draws, N, d]
        dec[f"{term}_rms"] = _rms(per)
        dec[f"{term}_spearman"] = reg.spearman(per.pow(2).mean((0, 2)).sqrt().numpy(), actual_real)
    both = torch.stack([e["decomposition"]["noise_term"] + e["decomposition"]["signal_term"] for e in evals])
    dec["sum_rms"] = _rms(both)
    dec["sum_spearman"] = reg.spearman(both.pow(2).mean((0, 2)).sqrt().numpy(), actual_real)
    dec["sum_vs_actual_corr"] = float(np.corrcoef(both.reshape(-1).numpy(), (torch.stack(models["real"][0])
                                                                             - clean["f"]).reshape(-1).numpy())[0, 1])
    dec["fit_error_noisy"] = float(np.mean([e["decomposition"]["fit_error_noisy"] for e in evals]))
    dec["fit_error_clean"] = evals[0]["decomposition"]["fit_error_clean"]
    summary["decomposition"] = dec
    # (c) How far the real network is from its linearised twin trained on the same labels.
    noise_real = torch.stack([r.real(k)["f"] - clean["f"] for k in range(s.draws)]).reshape(-1)
    noise_twin = torch.stack([r.linear(k, J0, f0)["f"] - lin_clean["f"] for k in range(s.draws)]).reshape(-1)
    summary["real_minus_twin_rms"] = {
        "clean": _rms(clean["f"] - lin_clean["f"]),
        "noisy": _rms(torch.stack([r.real(k)["f"] - r.linear(k, J0, f0)["f"] for k in range(s.draws)])),
        "real_move_rms": _rms(torch.stack([r.real(k)["f"] - f0 for k in range(s.draws)])),
        "noise_part_real_vs_twin_corr": float(np.corrcoef(noise_real.numpy(), noise_twin.numpy())[0, 1]),
    }
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=False).stdout.strip()
    except OSError:
        git = ""
    results = {
        "experiment": "registration_linear", "git": git,
        "settings": json.loads(json.dumps(asdict(s), default=str)),
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "n_parameters": int(J0.shape[-1]), "summary": summary,
        "train_seconds_real_mean": float(np.mean([r.real(k)["seconds"] for k in range(s.draws)])),
        "train_seconds_linear_mean": float(np.mean([r.linear(k, J0, f0)["seconds"] for k in range(s.draws)])),
        "eval_seconds_mean": float(np.mean([e["seconds"] for e in evals])),
        "total_seconds_this_invocation": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    for m, row in summary["models"].items():
        log(f"{m}: noise-induced {row['actual_noise_rms']:.3f} (clean vs truth {row['clean_vs_truth']:.3f}); "
            + ", ".join(f"{k} {v['calibration_true_sigma']:.2f}/{v['spearman_true_sigma']:.2f}"
                        for k, v in row["estimators"].items() if k.endswith("ridge")))
    log(f"drift noisy {summary['drift_noisy']:.3f}, clean {summary['drift_clean']:.3f}; "
        f"done in {results['total_seconds_this_invocation']:.0f} s -> {out / 'results.json'}")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nnsim.experiments.registration_linear",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny settings (seconds), what the tests run")
    ap.add_argument("--out", type=Path, required=True, help="output folder for results.json and parts/")
    args = ap.parse_args(argv)
    run(Settings.quick() if args.quick else Settings.full(), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
