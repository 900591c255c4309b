"""The registration gap experiment: the linearised twin against the written-out linear model and the network."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.func import functional_call, jvp

from nnsim.experiments import registration as reg
from nnsim.experiments import registration_linear as rl
from nnsim.experiments._regnet import ShiftNet
from nnsim.experiments._scenes import make_shift_scenes

torch.set_num_threads(1)

BASE = replace(reg.Settings.quick(), cases=((24, 3.0),))


@pytest.fixture(scope="module")
def scenes64():
    """24 quick-size patches in float64 (the tolerances below are float64 ones)."""
    d = make_shift_scenes(24, BASE.scene, BASE.max_shift, seed=5)
    return d["image"].double(), d["polygons"].double(), d["shift"].double()


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # reg.make_model then builds a float64 network
    yield
    torch.set_default_dtype(old)


def test_jacobian_is_the_jvp_of_the_network(scenes64, float64_default):
    """f(θ0) + J δ with the flattened per-sample Jacobians equals torch.func.jvp of the network along δ (column
    order, output rows, every parameter): false for a wrong flattening or a missing parameter."""
    image, polygons, _ = scenes64
    model = reg.make_model(BASE).eval()
    J = rl.jacobian(model, image, polygons, chunk=7)
    P = sum(p.numel() for p in model.parameters())
    assert J.shape == (24, 2, P)
    delta = torch.randn(P, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    tangents, pos = {}, 0
    for k, v in params.items():
        tangents[k] = delta[pos:pos + v.numel()].reshape(v.shape)
        pos += v.numel()
    _, jv = jvp(lambda p: functional_call(model, p, (image, polygons)), (params,), (tangents,))
    torch.testing.assert_close(J @ delta, jv, rtol=1e-10, atol=1e-12)
    K = rl.kernel_matrix(J)
    torch.testing.assert_close(K, torch.einsum("icp,jep->icje", J, J).reshape(48, 48), rtol=1e-12, atol=1e-14)


def test_twin_at_a_small_learning_rate_is_the_taylor_model_of_the_network(scenes64, float64_default):
    """At a small learning rate the network trained by ``registration.train`` stays in its linear regime: its
    outputs, its Taylor model f(θ0) + J (θ_T - θ0) and the linearised twin trained with the same Adam, batches and
    schedule agree to a small fraction of how far they moved. At a large learning rate they do not (the test
    would pass vacuously if the comparison could not tell them apart)."""
    image, polygons, shift = scenes64
    y = shift + 3.0 * torch.randn(shift.shape, generator=torch.Generator().manual_seed(2))
    model0 = reg.make_model(BASE).eval()
    f0 = reg.predict(model0, image, polygons)
    J = rl.jacobian(model0, image, polygons)
    theta0 = rl.flat_params(model0)
    gaps = {}
    for lr in (1e-6, 1e-5, 3e-2):
        s = replace(BASE, lr=lr, steps=20, batch=8)
        net, _ = reg.train(s, image, polygons, y)
        f_net = reg.predict(net, image, polygons)
        taylor = f0 + J @ (rl.flat_params(net) - theta0)
        delta, p = rl.train_linear(s, J, f0, y)
        twin = f0 + J @ delta
        moved = (f_net - f0).norm()
        gaps[lr] = (float((twin - taylor).norm() / moved), float((f_net - twin).norm() / moved))
        assert p.shape == delta.shape and bool((p > 0).all())
    # Second order in the step: ten times smaller steps, about ten times smaller gaps.
    assert gaps[1e-6][0] < 2e-4 and gaps[1e-6][1] < 2e-4, gaps
    assert gaps[1e-5][1] > 4 * gaps[1e-6][1], gaps
    assert gaps[3e-2][1] > 0.1, gaps


@pytest.mark.parametrize("batch", [12, 24])
def test_sgd_twin_noise_induced_error_is_the_closed_form(batch):
    """Plain SGD on the squared loss (mean over the B x d entries of a batch) of f0 + J δ, cosine learning rate
    lr_t = lr (1 + cos(π t / T)) / 2: the noise-induced part f_noisy - f_clean obeys, written out on the outputs,
    Δ_{t+1} = Δ_t - (2 lr_t / (B d)) K[:, b_t] (Δ_t[b_t] - eps[b_t]), K = J J^T; full batch, Δ_T = (I - Π_t (I -
    (2 lr_t / (N d)) K)) eps. J is random (any fixed-kernel linear model), the batches are registration's."""
    N, d, P = 24, 2, 30
    gen = torch.Generator().manual_seed(3)
    J = torch.randn(N, d, P, generator=gen, dtype=torch.float64) / math.sqrt(P)
    f0 = torch.randn(N, d, generator=gen, dtype=torch.float64)
    clean = torch.randn(N, d, generator=gen, dtype=torch.float64)
    eps = 0.7 * torch.randn(N, d, generator=gen, dtype=torch.float64)
    s = replace(BASE, steps=40, batch=batch, lr=0.4)
    f_noisy = f0 + J @ rl.train_linear(s, J, f0, clean + eps, optimizer="sgd")[0]
    f_clean = f0 + J @ rl.train_linear(s, J, f0, clean, optimizer="sgd")[0]
    K = rl.kernel_matrix(J).numpy()
    e = eps.reshape(-1).numpy()
    delta = np.zeros(N * d)
    prod = np.eye(N * d)
    for t, idx in enumerate(reg.batches(s, N)):
        lr_t = 0.4 * (1 + math.cos(math.pi * t / s.steps)) / 2
        rows = (idx[:, None] * d + torch.arange(d)).reshape(-1).numpy()
        delta = delta - (2 * lr_t / (len(idx) * d)) * K[:, rows] @ (delta[rows] - e[rows])
        prod = (np.eye(N * d) - (2 * lr_t / (N * d)) * K) @ prod
    got = (f_noisy - f_clean).reshape(-1).numpy()
    np.testing.assert_allclose(got, delta, rtol=1e-9, atol=1e-12)
    if batch == N:
        np.testing.assert_allclose(got, (np.eye(N * d) - prod) @ e, rtol=1e-9, atol=1e-12)
    assert np.linalg.norm(got) > 0.05 * np.linalg.norm(e)  # the dynamics moved (not a vacuous 0 = 0)


def test_smoothed_noise_ratio_is_one_for_an_independent_kernel():
    """Over many noise draws independent of the kernel, E ||S eps||^2 = σ^2 tr S S^T: the mean squared ratio is 1,
    and a kernel built to contain the noise direction gives a ratio well above 1."""
    gen = torch.Generator().manual_seed(4)
    N, d = 40, 2
    A = torch.randn(N * d, 6, generator=gen, dtype=torch.float64)
    spec = rl.linearized.exact_spectrum(A @ A.T + 0.01 * torch.eye(N * d, dtype=torch.float64))
    f = torch.randn(N, d, generator=gen, dtype=torch.float64)
    ratios = []
    for _ in range(100):
        eps = torch.randn(N, d, generator=gen, dtype=torch.float64)
        ratios.append(rl.smoother_predictions(spec, f + eps, f, 1.0, eps)["ridge"]["smoothed_noise_ratio"] ** 2)
    assert abs(np.mean(ratios) - 1) < 0.2  # std of the mean ~0.06 here
    eps = torch.randn(N, d, generator=gen, dtype=torch.float64)
    e = eps.reshape(-1, 1)
    aligned = rl.linearized.exact_spectrum(A @ A.T + 50 * e @ e.T / (e.T @ e))
    assert rl.smoother_predictions(aligned, f + eps, f, 1.0, eps)["ridge"]["smoothed_noise_ratio"] > 2


def test_quick_run_end_to_end_and_resumes(tmp_path):
    s = replace(rl.Settings.quick(), base=replace(rl.Settings.quick().base, steps=60), checkpoints=(30,))
    res = rl.run(s, tmp_path, log=lambda m: None)
    summ = res["summary"]
    assert set(summ["models"]) == {"real", "linear", "linear_at_clean"}
    kernels = {"real": ("K0", "KT_noisy", "KT_clean", "K_checkpoint_avg", "K0_adam"),
               "linear_at_clean": ("KT_clean", "KT_clean_adam")}
    for m, row in summ["models"].items():
        assert row["actual_noise_rms"] > 0
        assert set(row["estimators"]) == {f"{k}/{sm}" for k in kernels.get(m, kernels["real"]) for sm in rl.SMOOTHERS}
        for cell in row["estimators"].values():
            assert cell["calibration_true_sigma"] > 0 and -1 <= cell["spearman_true_sigma"] <= 1
            assert cell["calibration_sigma_hat"] / cell["calibration_true_sigma"] == pytest.approx(
                cell["sigma_hat_over_sigma"], rel=0.3)
            rel = cell["reliability_true_sigma"]  # the ranking next to the actual error's reliability
            assert rel["spearman"] == pytest.approx(cell["spearman_true_sigma"]) and rel["draws"] == s.draws
    assert summ["drift_noisy"] > 0 and summ["drift_clean"] > 0
    assert 0 < summ["cos_noisy_K0"] <= 1 + 1e-12 and 0 < summ["cos_clean_K0"] <= 1 + 1e-12
    dec = summ["decomposition"]
    assert dec["noise_term_rms"] > 0 and dec["signal_term_rms"] > 0 and -1 <= dec["sum_vs_actual_corr"] <= 1
    parts = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert len(parts) == 3 + 4 * s.draws  # real, twin and linear-at-clean per training (clean + draws); eval per draw
    again = rl.run(s, tmp_path, log=lambda m: None)
    assert json.dumps(again["summary"], sort_keys=True) == json.dumps(summ, sort_keys=True)
    model = ShiftNet(**s.base.net)
    assert res["n_parameters"] == sum(p.numel() for p in model.parameters())
