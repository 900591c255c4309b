"""The toy 1-D experiment: the stacked trainer against plain per-run training, the estimators against a
brute-force oracle, and the quick end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from oracles import jacobian

from nnsim.experiments import _toy_training as tt
from nnsim.experiments import toy1d

torch.set_num_threads(1)


def test_stacked_training_equals_independent_runs():
    """Same seeds -> same weights as training each run alone with its own torch.optim.Adam (the oracle)."""
    n, epochs, seeds, shuffles = 96, 3, [3, 7, 11], [101, 102, 103]
    datasets = [toy1d.make_data(n, f) for f in (1, 2, 4)]
    models = [tt.init_mlp(s) for s in seeds]
    state = tt.new_state(models, shuffles)
    x = torch.stack([d.x for d in datasets])
    y = torch.stack([d.noisy for d in datasets])
    tt.train_stacked(state, x, y, epochs, batch_size=64)  # 2 steps per epoch, the last one a partial batch
    for r in range(3):
        ref = tt.train_single(tt.init_mlp(seeds[r]), datasets[r].x, datasets[r].noisy, epochs, shuffles[r])
        got = tt.unstack_params(state.params, r)
        moved = 0.0
        for p_ref, p_got, p0 in zip(ref.parameters(), got.parameters(), tt.init_mlp(seeds[r]).parameters()):
            torch.testing.assert_close(p_got, p_ref, atol=2e-6, rtol=1e-4)
            moved = max(moved, float((p_ref - p0).detach().abs().max()))
        assert moved > 3e-4  # 6 Adam steps of lr 1e-4 really moved the weights
    assert state.epoch == epochs and len(state.epoch_loss) == epochs


def test_stacked_training_resumes_exactly():
    """A checkpointed state continues exactly as an uninterrupted training (weights, Adam, shuffling)."""
    d = toy1d.make_data(64, 2)
    x, y = d.x.unsqueeze(0).repeat(2, 1, 1), d.noisy.unsqueeze(0).repeat(2, 1, 1)
    a = tt.new_state([tt.init_mlp(1), tt.init_mlp(2)], [5, 6])
    tt.train_stacked(a, x, y, 4, batch_size=16)
    b = tt.new_state([tt.init_mlp(1), tt.init_mlp(2)], [5, 6])
    tt.train_stacked(b, x, y, 2, batch_size=16)
    c = tt.new_state([tt.init_mlp(9), tt.init_mlp(9)], [0, 0])
    c.load_state_dict(b.state_dict())
    tt.train_stacked(c, x, y, 2, batch_size=16)
    for p, q in zip(a.params, c.params):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_mlp_is_the_authors_network():
    m = tt.make_mlp()
    assert sum(p.numel() for p in m.parameters()) == 21_057  # docs/method.md, "Experiments"
    assert sum(isinstance(layer, torch.nn.ReLU) for layer in m) == 6


def test_data_and_curvature():
    d = toy1d.make_data(512, 4)
    assert torch.all(d.alpha[1:] >= d.alpha[:-1]) and 0 <= float(d.alpha.min()) and float(d.alpha.max()) <= 1
    torch.testing.assert_close(d.x.norm(dim=1), torch.ones(512))
    torch.testing.assert_close(d.target.squeeze(1), torch.sin(2 * math.pi * 4 * d.alpha), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.noisy, d.target)  # s = 0: trained on the clean target
    # Curvature by central finite differences of the target function, written out independently.
    a, h, f = d.alpha.double(), 1e-4, 4

    def y(t):
        return torch.sin(2 * math.pi * f * t)

    d1 = (y(a + h) - y(a - h)) / (2 * h)
    d2 = (y(a + h) - 2 * y(a) + y(a - h)) / h**2
    torch.testing.assert_close(d.curvature.double(), d2.abs() / (1 + d1**2) ** 1.5, atol=2e-3, rtol=1e-4)
    # The same (n, f) always gives the same dataset; label noise is an option.
    torch.testing.assert_close(toy1d.make_data(512, 4).x, d.x)
    noisy = toy1d.make_data(512, 4, noise_std=0.1)
    assert 0.08 < float((noisy.noisy - noisy.target).std()) < 0.12


def test_estimators_match_brute_force():
    """Every count of the experiment against per-sample autograd gradients in float64, counted explicitly."""
    torch.manual_seed(0)
    model = tt.make_mlp(width=8, hidden=3).double().eval()
    x = toy1d.make_data(40, 2).x.double()
    cfg = toy1d.Config(hard_thresholds=(0.5, 0.9), less_soft_powers=(2, 3))
    got = toy1d.estimators(model, x, cfg)
    G = jacobian(model, (x,))[:, 0, :]  # [n, P]
    K = G @ G.T
    rho = K / torch.outer(G.norm(dim=1), G.norm(dim=1))
    # the authors' zero diagonal (docs/method.md, "Density and neighbour counts": self-terms)
    off = rho.clone().fill_diagonal_(0.0)
    want = {"soft": rho.sum(1), "soft_unnormalized": K.sum(1),
            "less_soft_n2": off.clamp_min(0).pow(2).sum(1), "less_soft_n3": off.clamp_min(0).pow(3).sum(1),
            "hard_t0.5": (off > 0.5).sum(1).double(), "hard_t0.9": (off > 0.9).sum(1).double()}
    assert set(got) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(got[k].double(), v, atol=1e-8, rtol=1e-8, msg=k)


def test_quick_run_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nnsim.experiments.toy1d", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    cfg = toy1d.QUICK
    for name in ("fig4_3d.png", "nsoft_curvature.png", "estimators.png", "fits.png", "training_loss.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert res["config"]["epochs"] == cfg.epochs and res["timing"]["steps_total"] == cfg.epochs * 4
    names = toy1d.estimator_names(cfg)
    assert set(res["estimator_mean_vs_f"]) == set(names)
    arrays = np.load(tmp_path / "per_sample.npz")
    for f in cfg.freqs:
        pf = res["per_frequency"][str(f)]
        m = pf["estimator_mean_of_median"]
        # Properties that hold for any network: 1 <= N_soft <= n (self included, |rho| <= 1 ... summed),
        # the hard count falls with the threshold, the less-soft counts fall with the power.
        soft = arrays[f"f{f}_soft"]
        assert soft.shape == (cfg.n,) and np.all(soft <= cfg.n + 1e-3) and np.all(soft > -cfg.n)
        hard = [m[f"hard_t{t}"] for t in cfg.hard_thresholds]
        assert all(a >= b for a, b in zip(hard, hard[1:]))
        ls = [m[f"less_soft_n{n}"] for n in cfg.less_soft_powers]
        assert all(a >= b for a, b in zip(ls, ls[1:]))
        assert m["hard_t0.5"] <= cfg.n - 1
        assert -1 <= pf["corr_soft_vs_log1p_curvature"]["spearman"] <= 1
        assert len(pf["train_l1_per_run"]) == cfg.runs and max(pf["train_l1_per_run"]) < 0.5
    # A rerun with the same settings reuses the trained weights instead of training again.
    logs = []
    data = {f: toy1d.make_data(cfg.n, f) for f in cfg.freqs}
    params, _ = toy1d.train_grid(cfg, data, tmp_path, log=logs.append)
    assert logs and "reusing trained weights" in logs[0]
    assert len(params) == 14 and params[0].shape == (len(cfg.freqs) * cfg.runs, 64, 2)
    # The stored N_soft against brute force on the trained networks: per-sample float64 autograd gradients,
    # cosines summed (self included), the lower median over runs (torch's convention, as the experiment).
    for fi, f in enumerate(cfg.freqs):
        runs = []
        for r in range(cfg.runs):
            net = tt.unstack_params(params, fi * cfg.runs + r).double().eval()
            G = jacobian(net, (data[f].x.double(),))[:, 0, :]
            Gn = G / G.norm(dim=1, keepdim=True)
            runs.append((Gn @ Gn.T).sum(1))
        want = torch.stack(runs).median(dim=0).values.numpy()
        np.testing.assert_allclose(arrays[f"f{f}_soft"], want, rtol=1e-4, atol=1e-3)
    # A known effect on the seeded quick run: N_soft is larger where the target is flat than at its extrema
    # (the paper's Fig. 4), at the lowest frequency where the quick networks fit the sine.
    fp = res["per_frequency"]["1"]["soft_flat_vs_peak"]
    assert fp["low_curvature_decile"] > fp["high_curvature_decile"]


def test_cli_rejects_bad_settings(tmp_path):
    with pytest.raises(SystemExit):
        toy1d.main(["--out", str(tmp_path), "--runs", "0"])
