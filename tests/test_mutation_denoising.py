"""nnsim.estimators.denoising_from_sums and DenoisingReport against the formulas written out (mutation testing).

The oracle inverts R_i with torch.linalg.inv (full-rank cases) and forms D_i = R_i^-1 Q_i R_i^-T, tr D_i / d,
e_i = R_i^-1 Y_i entry by entry; boundaries (factor exactly 1, cancellation exactly 1/2, a singular value
exactly at rtol) are built so that the strict and non-strict comparisons differ.
"""

from __future__ import annotations

import csv
import math
import os
import warnings

import pytest
import torch
from oracles import jacobian, overflowing
from test_estimators_asymmetric import mlp2

import nnsim
from nnsim.distributed import Ranks
from nnsim.errors import InputError, ModelError
from nnsim.estimators import DenoisingReport, denoising_from_sums
from nnsim.estimators.denoising import approximate_sums, kernel_matrix
from nnsim.inputs import as_source

torch.set_num_threads(1)
F64 = torch.float64


def _sums(N: int, d: int, M: int, seed: int, dtype=F64):
    """R, Q, Y, yhat and sum_j ||K_ij||_F from random non-symmetric kernel blocks K_ij [N, M, d, d]."""
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(N, M, d, d, dtype=F64, generator=g) + 0.8 * torch.eye(d, dtype=F64)
    yref = torch.randn(M, d, dtype=F64, generator=g)
    R = K.sum(1)
    Q = torch.einsum("njab,njcb->nac", K, K)
    Y = torch.einsum("njab,jb->na", K, yref)
    yhat = torch.randn(N, d, dtype=F64, generator=g)
    norm_sum = K.flatten(2).norm(dim=2).sum(1)
    return [t.to(dtype) for t in (R, Q, Y, yhat, norm_sum)], K


def _oracle(R, Q, Y, yhat, d):
    D, fac, cons = [], [], []
    for i in range(R.shape[0]):
        Ri = torch.linalg.inv(R[i].double())
        Di = Ri @ Q[i].double() @ Ri.T
        D.append(Di)
        fac.append(sum(float(Di[a, a]) for a in range(d)) / d)
        e = Ri @ Y[i].double()
        cons.append(math.sqrt(sum((float(yhat[i, a]) - float(e[a])) ** 2 for a in range(d))))
    return torch.stack(D), torch.tensor(fac, dtype=F64), torch.tensor(cons, dtype=F64)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("d", [2, 3])
def test_denoising_from_sums_is_the_formula(dtype, d):
    N = 4
    (R, Q, Y, yhat, norm_sum), K = _sums(N, d, 5, seed=d, dtype=dtype)
    rep = denoising_from_sums(R, Q, Y, yhat, noise_std=0.3, norm_sum=norm_sum)
    D, fac, cons = _oracle(R, Q, Y, yhat, d)
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == F64 else dict(rtol=2e-4, atol=1e-6)
    for name, t, shape in [("factor_matrix", rep.factor_matrix, (N, d, d)), ("factor", rep.factor, (N,)),
                           ("effective_neighbors", rep.effective_neighbors, (N,)),
                           ("consistency", rep.consistency, (N,)), ("predicted_error", rep.predicted_error, (N,)),
                           ("cancellation", rep.cancellation, (N,))]:
        assert t.dtype == dtype and t.shape == shape, name
    torch.testing.assert_close(rep.factor_matrix.double(), 0.5 * (D + D.transpose(1, 2)), **tol)
    torch.testing.assert_close(rep.factor.double(), fac, **tol)
    torch.testing.assert_close(rep.effective_neighbors.double(), 1 / fac, **tol)
    torch.testing.assert_close(rep.consistency.double(), cons, **tol)
    torch.testing.assert_close(rep.predicted_error.double(), 0.3 * fac.sqrt(), **tol)
    canc = torch.tensor([float(R[i].double().norm()) / float(norm_sum[i]) for i in range(N)], dtype=F64)
    torch.testing.assert_close(rep.cancellation.double(), canc, **tol)
    assert rep.noise_std == pytest.approx(0.3) and isinstance(rep.noise_std, float)
    assert rep.approximate is False and rep.method == "paper"
    assert rep.singular.dtype == torch.bool and not rep.singular.any()
    # the factor matrix is exactly symmetric (symmetrised, not only up to rounding)
    assert torch.equal(rep.factor_matrix, rep.factor_matrix.transpose(1, 2))


def test_optional_fields_absent_without_noise_or_norms():
    (R, Q, Y, yhat, _), _ = _sums(3, 2, 4, seed=7)
    rep = denoising_from_sums(R, Q, Y, yhat, approximate=True)
    assert rep.predicted_error is None and rep.noise_std is None and rep.cancellation is None
    assert rep.approximate is True


def _diag(*rows):
    return torch.stack([torch.diag(torch.tensor(r, dtype=F64)) for r in rows])


def test_untrusted_rows_factor_above_one_strictly():
    # R = I; Q = diag: factor = tr Q / 2 = 1 exactly (one effective neighbour: trusted), 1.5 and 0.25
    R = _diag([1.0, 1.0], [1.0, 1.0], [1.0, 1.0])
    Q = _diag([1.0, 1.0], [2.0, 1.0], [0.25, 0.25])
    z = torch.zeros(3, 2, dtype=F64)
    rep = denoising_from_sums(R, Q, z, z, noise_std=2.0)
    assert rep.factor.tolist() == [1.0, 1.5, 0.25]
    assert rep.ill_conditioned.tolist() == [False, True, False]
    assert rep.singular.tolist() == [False, False, False]
    # predicted error sigma sqrt(factor): 2, 2 sqrt(1.5), 1
    torch.testing.assert_close(rep.predicted_error, torch.tensor([2.0, 2 * math.sqrt(1.5), 1.0], dtype=F64))


def test_negative_rounding_factor_gives_zero_predicted_error():
    # a (slightly) indefinite Q, as rounding can make it: tr D < 0 must not give NaN
    R = _diag([1.0, 1.0])
    Q = _diag([-1e-3, -1e-3])
    z = torch.zeros(1, 2, dtype=F64)
    rep = denoising_from_sums(R, Q, z, z, noise_std=1.0)
    assert rep.predicted_error.tolist() == [0.0]


def test_cancellation_threshold_is_strict_at_one_half():
    R = _diag([1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0])  # ||R||_F = sqrt 2 (last: zero sum)
    Q = _diag([0.5, 0.5], [0.5, 0.5], [0.5, 0.5], [0.0, 0.0])
    z = torch.zeros(4, 2, dtype=F64)
    s2 = math.sqrt(2.0)
    norm_sum = torch.tensor([2 * s2, 2 * s2 * 1.01, s2, 0.0], dtype=F64)  # ratios 1/2, < 1/2, 1, 0/0
    rep = denoising_from_sums(R, Q, z, z, norm_sum=norm_sum)
    torch.testing.assert_close(rep.cancellation[:3], torch.tensor([0.5, 0.5 / 1.01, 1.0], dtype=F64))
    assert rep.cancellation[3].item() == 0.0  # 0 / 0 is read as full cancellation, not NaN
    assert rep.ill_conditioned.tolist() == [False, True, False, True]


@pytest.mark.parametrize("dtype,flagged", [(F64, False), (torch.float32, True)])
def test_singular_threshold_follows_the_dtype(dtype, flagged):
    # singular-value ratio 1e-7: singular for float32 sums (rtol 1e-5), regular for float64 (rtol 1e-10)
    R = _diag([1.0, 1e-7]).to(dtype)
    Q = _diag([1.0, 1e-14]).to(dtype)
    Y = torch.tensor([[1.0, 1e-7]], dtype=dtype)
    rep = denoising_from_sums(R, Q, Y, torch.zeros(1, 2, dtype=dtype))
    assert rep.singular.tolist() == [flagged] and rep.ill_conditioned.tolist() == [flagged]
    # pinv on the range when singular: e = (1, 0); else e = R^-1 Y = (1, 1)
    want = [1.0, 0.0] if flagged else [1.0, 1.0]
    torch.testing.assert_close(rep.consistency.double(), torch.tensor([math.hypot(*want)], dtype=F64),
                               rtol=1e-5, atol=1e-6)


def test_explicit_rtol_singular_value_exactly_at_the_threshold_counts_as_singular():
    R = _diag([1.0, 1e-3], [1.0, 1e-2])
    Q = _diag([1.0, 1e-6], [1.0, 1e-4])
    Y = torch.tensor([[1.0, 1e-3], [1.0, 1e-2]], dtype=F64)
    rep = denoising_from_sums(R, Q, Y, torch.zeros(2, 2, dtype=F64), rtol=1e-3)
    assert rep.singular.tolist() == [True, False]
    # row 0: R pseudo-inverted on its range: D = diag(1, 0), e = (1, 0)
    torch.testing.assert_close(rep.factor_matrix[0], torch.diag(torch.tensor([1.0, 0.0], dtype=F64)))
    torch.testing.assert_close(rep.consistency, torch.tensor([1.0, math.sqrt(2.0)], dtype=F64))


def _report(with_optional: bool) -> DenoisingReport:
    (R, Q, Y, yhat, norm_sum), _ = _sums(3, 2, 4, seed=11)
    R[1] = 0.0  # a singular row, flagged
    kw = dict(noise_std=0.5, norm_sum=norm_sum) if with_optional else {}
    return denoising_from_sums(R, Q, Y, yhat, **kw)


@pytest.mark.parametrize("with_optional", [True, False])
def test_to_csv_rows_are_the_report_fields(tmp_path, with_optional):
    rep = _report(with_optional)
    path = tmp_path / "r.csv"
    rep.to_csv(path)
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    cols = ["factor", "effective_neighbors", "consistency"] + (["predicted_error"] if with_optional else []) + [
        "ill_conditioned"] + (["cancellation"] if with_optional else [])
    assert rows[0] == ["index"] + cols + ["D_00", "D_01", "D_10", "D_11"]
    assert len(rows) == 4
    for i, row in enumerate(rows[1:]):
        assert row[0] == str(i)
        cells = dict(zip(rows[0], row))
        assert cells["ill_conditioned"] == str(bool(rep.ill_conditioned[i]))
        for c in cols:
            if c != "ill_conditioned":
                want = float(getattr(rep, c)[i])
                got = float(cells[c])
                assert got == want or (math.isnan(got) and math.isnan(want)), (c, i)
        for a in range(2):
            for b in range(2):
                assert float(cells[f"D_{a}{b}"]) == float(rep.factor_matrix[i, a, b])
    assert rows[2][1 + cols.index("ill_conditioned")] == "True"


def test_to_dict_has_exactly_the_tensor_fields():
    rep = _report(True)
    dct = rep.to_dict()
    assert set(dct) == {"factor_matrix", "factor", "effective_neighbors", "consistency", "predicted_error",
                        "ill_conditioned", "singular", "cancellation"}
    for name, t in dct.items():
        assert t is getattr(rep, name)
    assert "predicted_error" not in _report(False).to_dict()


def test_repr_shows_shapes_and_medians_not_tensors():
    f = torch.tensor([0.5, float("nan"), 0.25, 2.0], dtype=F64)
    rep = DenoisingReport(factor_matrix=torch.zeros(4, 3, 3, dtype=F64), factor=f, effective_neighbors=1 / f,
                          consistency=torch.tensor([1.0, 3.0, 2.0, float("inf")], dtype=F64),
                          predicted_error=torch.full((4,), float("nan"), dtype=F64),
                          ill_conditioned=torch.tensor([True, False, True, False]))
    text = repr(rep)
    # medians of the finite entries (torch's lower median for an even count)
    assert text == ("DenoisingReport(N=4, d=3, approximate=False, factor_matrix [4, 3, 3], effective_neighbors "
                    "median 2, consistency median 2, predicted_error median nan, ill_conditioned 2)")
    rep.predicted_error = None
    rep.approximate = True
    assert repr(rep) == ("DenoisingReport(N=4, d=3, approximate=True, factor_matrix [4, 3, 3], effective_neighbors "
                         "median 2, consistency median 2, ill_conditioned 2)")


def test_singular_threshold_is_relative_to_the_largest_singular_value():
    # R = 100 diag(1, 1e-4): ratio 1e-4 <= rtol 1e-3, singular although its smallest value 1e-2 exceeds rtol
    R = 100 * _diag([1.0, 1e-4])
    rep = denoising_from_sums(R, _diag([1.0, 1.0]), torch.zeros(1, 2, dtype=F64), torch.zeros(1, 2, dtype=F64),
                              rtol=1e-3)
    assert rep.singular.tolist() == [True]
    torch.testing.assert_close(rep.factor_matrix[0], torch.diag(torch.tensor([1e-4, 0.0], dtype=F64)))


# --------------------------------------------- kernel_matrix (method="linearized"): the [N d, M d] kernel swept
# Oracle: the kernel from per-sample autograd (tests/oracles.py) on the two-hidden-layer MLP of
# tests/test_estimators_asymmetric.py (d = 2), chunks of 3: 3 row chunks.

def _kernel_setup(progress=False):
    model, x = mlp2(2)
    x = x[:8].clone()
    G = jacobian(model, (x,))  # [N, d, P]
    K = torch.einsum("icp,jep->icje", G, G).reshape(16, 16)  # row (i, c), column (j, e)
    return model, x, K, nnsim.Similarity(model, chunk_size=3, progress=progress)


def _bar_states(err: str, desc: str) -> list[str]:
    return [seg for seg in err.replace("\r", "\n").split("\n") if seg.startswith(desc + ":")]


def test_kernel_matrix_is_the_kernel_swept_once_per_pair_of_chunks(capsys):
    model, x, K, sim = _kernel_setup(progress=True)
    ranks = Ranks(None, torch.device("cpu"), progress=True)
    src = as_source(x, "data")
    got = kernel_matrix(sim._chunker, src, src, ranks)
    torch.testing.assert_close(got, K, rtol=1e-10, atol=1e-12)
    assert got.dtype == F64
    states = _bar_states(capsys.readouterr().err, "nnsim kernel")
    assert states and "6/6" in states[-1] and not any("/9" in s for s in states), states  # 3 (3 + 1) / 2 tiles
    cols = [0, 2, 3, 5, 6, 7, 1]  # landmarks in any order: 3 chunks of columns, 3 x 3 tiles
    got = kernel_matrix(sim._chunker, src, as_source(x[cols], "landmarks"), ranks)
    torch.testing.assert_close(got, K.reshape(8, 2, 8, 2)[:, :, cols].reshape(16, 14), rtol=1e-10, atol=1e-12)
    states = _bar_states(capsys.readouterr().err, "nnsim kernel")
    assert states and "9/9" in states[-1], states


def test_kernel_matrix_sweeps_only_the_tiles_of_its_share():
    class FirstRowChunk(Ranks):
        def tiles(self, n_a, n_b, symmetric):
            return [s for s in super().tiles(n_a, n_b, symmetric) if s[0] == 0]

    model, x, K, sim = _kernel_setup()
    src = as_source(x, "data")
    got = kernel_matrix(sim._chunker, src, src, FirstRowChunk(None, torch.device("cpu")))
    mine = torch.zeros(8, 8, dtype=torch.bool)
    mine[:3, :] = mine[:, :3] = True  # tiles (0, j) and their mirrors (j, 0); the other processes sum the rest
    mask = mine[:, None, :, None].expand(8, 2, 8, 2).reshape(16, 16)
    torch.testing.assert_close(got, torch.where(mask, K, torch.zeros_like(K)), rtol=1e-10, atol=1e-12)


def test_linearized_denoising_names_the_side_of_a_failing_sample():
    model, x, _, _ = _kernel_setup()

    xs = x.clone()
    xs[4, 0] = 10.0
    y = torch.zeros(8, 2, dtype=F64)
    sim = nnsim.Similarity(model, overflowing, chunk_size=3, progress=False)
    with pytest.raises(ModelError, match=r"^data: the output gradients are not finite .* at samples \[4\]"):
        sim.denoising(xs, targets=y, method="linearized")
    with pytest.raises(ModelError, match=r"^landmarks: the output gradients are not finite .* at samples \[4\]"):
        sim.denoising(xs, targets=y, method="linearized", approximate=True, landmarks=8)


def test_approximate_denoising_with_a_measured_chunk_size_is_the_chunked_one():
    """The sketches depend on the seed and the layer, not on the chunks: a measured chunk size (one chunk of 8)
    and chunks of 3 give the same sums."""

    model, x, _, _ = _kernel_setup()
    measured = nnsim.Similarity(model, progress=False).denoising(x, approximate=True, dim=6, seed=3)
    chunked = nnsim.Similarity(model, chunk_size=3, progress=False).denoising(x, approximate=True, dim=6, seed=3)
    torch.testing.assert_close(measured.factor_matrix, chunked.factor_matrix, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(measured.consistency, chunked.consistency, rtol=1e-9, atol=1e-12)


def test_approximate_denoising_names_the_data_when_a_chunk_fails():
    model, x, _, _ = _kernel_setup()

    xs = x.clone()
    xs[1, 0] = 10.0  # inside the probe's samples
    with pytest.raises(ModelError, match=r"^data: the output gradients are not finite .* at samples \[1\]"):
        nnsim.Similarity(model, overflowing, progress=False).denoising(xs, approximate=True, dim=6)
    with pytest.raises(ModelError, match=r"^data: the output gradients are not finite .* at samples \[1\]"):
        # no probe
        nnsim.Similarity(model, overflowing, chunk_size=3, progress=False).denoising(xs, approximate=True, dim=6)


def test_approximate_sums_of_a_share_with_given_predictions_are_the_exact_row_sums():
    """R_i = sum_j K_ij and Y_i = sum_j K_ij yhat_j are exact in the sketched path (only Q is sketched): for a
    process owning the samples [3, 9) of 11 (chunks of 3), over j in [3, 9), the rows placed at 3."""

    class MiddleShare(Ranks):
        def samples(self, n, size):
            return size, min(n, 3 * size)

        def rows(self, parts, start, n):
            local = torch.cat(parts)
            out = torch.full((n, *local.shape[1:]), float("nan"), dtype=local.dtype)
            out[start : start + local.shape[0]] = local
            return out


    model, x = mlp2(2)  # 11 samples
    G = jacobian(model, (x,))
    K = torch.einsum("icp,jep->ijce", G, G)  # [N, N, d, d]
    p = torch.randn(11, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    sim.similarity(x[:1])
    R, Q, Y, yhat, none = approximate_sums(sim._chunker, as_source(x, "data"), p, 6, 0,
                                           MiddleShare(None, torch.device("cpu")))
    assert none is None and R.shape == (11, 2, 2) and Y.shape == (11, 2) and yhat.shape == (11, 2)
    share = list(range(3, 9))
    nan = torch.full((2, 2), float("nan"), dtype=F64)
    want_R = torch.stack([sum(K[i, j] for j in share) if i in share else nan for i in range(11)])
    want_Y = torch.stack([sum(K[i, j] @ p[j] for j in share) if i in share else nan[0] for i in range(11)])
    want_yhat = torch.where(torch.tensor([i in share for i in range(11)])[:, None], p, float("nan"))
    torch.testing.assert_close(R, want_R, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(Y, want_Y, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(yhat, want_yhat, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(Q[3:9]).all() and torch.isnan(Q[:3]).all() and torch.isnan(Q[9:]).all()
    assert torch.equal(Q[3:9], Q[3:9].transpose(-1, -2))  # the sketched phi_i C psi_i^T, symmetrised exactly


# ------------------------------------------------ linearized_report (method="linearized") against numpy formulas
# Given the fitted lam (its search is tested in test_mutation_linearized.py), the report of the ridge smoother
# S = K (K + lam I)^-1 of the autograd kernel K [N d, N d] written out: D_i = sum_j S_ij S_ij^T, tr D_i / d,
# |f_i - (S y)_i|, sigma^2 = ||y - f||^2 / (N d - 2 tr S + tr S S^T), the flag |f_i - (S y)_i| / sqrt(d) > 2 sigma.

def _linearized_oracle(K, y, f, lam, noise_std=None):
    import numpy as np

    n, d = y.shape
    Kn = K.numpy()
    S = np.linalg.solve((Kn + lam * np.eye(n * d)).T, Kn.T).T
    yv, fv = y.numpy().reshape(-1), f.numpy().reshape(-1)
    SS = S @ S.T
    D = np.stack([SS[i * d:(i + 1) * d, i * d:(i + 1) * d] for i in range(n)])
    factor = np.trace(D, axis1=1, axis2=2) / d
    cons = np.linalg.norm((fv - S @ yv).reshape(n, d), axis=1)
    dof = n * d - 2 * np.trace(S) + np.trace(SS)
    sigma = math.sqrt(float(((yv - fv) ** 2).sum()) / dof) if noise_std is None else noise_std
    return {"factor_matrix": D, "factor": factor, "effective_neighbors": 1 / factor, "consistency": cons,
            "predicted_error": sigma * np.sqrt(factor), "ill_conditioned": cons / math.sqrt(d) > 2 * sigma}, sigma


def _linearized_case(dtype=F64, n=8):
    model, x = mlp2(2)
    x = x[:n].clone()
    G = jacobian(model, (x,))
    K = torch.einsum("icp,jep->icje", G, G).reshape(n * 2, n * 2)
    with torch.no_grad():
        f = model(x)
    y = f + 0.05 * torch.randn(n, 2, dtype=F64, generator=torch.Generator().manual_seed(4))
    return model.to(dtype), x.to(dtype), K, f, y


def _check_report(rep, want, dtype, atol=1e-9, flags=True):
    for name, w in want.items():
        if name == "ill_conditioned" and not flags:
            continue
        got = getattr(rep, name)
        assert got.dtype == (torch.bool if name == "ill_conditioned" else dtype), name
        if name == "ill_conditioned":
            assert got.tolist() == w.tolist()
        else:
            torch.testing.assert_close(got.double(), torch.from_numpy(w), rtol=atol, atol=atol)


@pytest.mark.parametrize("given", [False, True])
def test_linearized_report_is_the_ridge_smoother_written_out(given):
    model, x, K, f, y = _linearized_case()
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    rep = sim.denoising(x, f.clone() if given else None, targets=y, method="linearized")
    want, sigma = _linearized_oracle(K, y, f, rep.lam)
    _check_report(rep, want, F64)
    assert (rep.method, rep.smoother, rep.approximate, rep.singular, rep.cancellation) == (
        "linearized", "ridge", False, None, None)
    assert rep.noise_std == pytest.approx(sigma, rel=1e-9) and rep.noise_std_estimated == rep.noise_std
    c = rep.consistency / math.sqrt(2)
    # sigma given: a row exactly at 2 sigma is trusted (strict >), one between 2 and 3 sigma is not
    at = float(c[2]) / 2
    rep = sim.denoising(x, targets=y, method="linearized", noise_std=at)
    want, _ = _linearized_oracle(K, y, f, rep.lam, noise_std=at)
    _check_report(rep, want, F64, flags=False)  # (numpy's consistency may round the other way at the tie)
    assert not bool(rep.ill_conditioned[2])
    assert rep.ill_conditioned.tolist() == (c > 2 * at).tolist()
    between = float(c[5]) / 2.5
    rep = sim.denoising(x, targets=y, method="linearized", noise_std=between)
    assert bool(rep.ill_conditioned[5])
    assert rep.ill_conditioned.tolist() == (c > 2 * between).tolist()
    assert 0 < int(rep.ill_conditioned.sum()) < 8


def test_linearized_report_in_float32_keeps_the_model_dtype():
    model, x, K, f, y = _linearized_case(torch.float32)
    rep = nnsim.Similarity(model, chunk_size=3, progress=False).denoising(x, targets=y.float(), method="linearized")
    want, _ = _linearized_oracle(K, y.float().double(), model(x).detach().double(), rep.lam)
    _check_report(rep, want, torch.float32, atol=2e-3)


def test_approximate_linearized_report_uses_the_seeded_landmarks():
    import numpy as np

    model, x, K, f, y = _linearized_case()
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    torch.manual_seed(1)
    rep = sim.denoising(x, targets=y, method="linearized", approximate=True, landmarks=5, seed=11)
    torch.manual_seed(2)  # the landmarks come from the seed alone, not from torch's global generator
    again = sim.denoising(x, targets=y, method="linearized", approximate=True, landmarks=5, seed=11)
    assert torch.equal(rep.factor_matrix, again.factor_matrix)
    idx = torch.randperm(8, generator=torch.Generator().manual_seed(11))[:5].sort().values
    cols = torch.stack([2 * idx, 2 * idx + 1], 1).reshape(-1)
    K_nm = K[:, cols].numpy()
    K_ny = K_nm @ np.linalg.pinv(K_nm[cols.numpy()], rcond=1e-10, hermitian=True) @ K_nm.T
    want, _ = _linearized_oracle(torch.from_numpy(K_ny), y, f, rep.lam)
    _check_report(rep, want, F64, atol=1e-7)
    assert rep.approximate and rep.method == "linearized"


def test_linearized_exact_size_limit_is_inclusive(monkeypatch):
    from nnsim.estimators import denoising

    model, x, K, f, y = _linearized_case(n=9)
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    monkeypatch.setattr(denoising, "LINEARIZED_EXACT_MAX", 16)
    rep = sim.denoising(x[:8], targets=y[:8], method="linearized")  # N d = 16: exact
    assert rep.factor_matrix.shape == (8, 2, 2)
    with pytest.raises(InputError) as err:
        sim.denoising(x, targets=y, method="linearized")
    assert str(err.value) == ("method='linearized' exact needs the eigendecomposition of an [N d, N d] = [18, 18] "
                              "kernel (limit 16); pass approximate=True for the Nystroem version (landmarks=...)")


def test_linearized_warns_at_the_callers_line_when_the_smoother_misses_the_network(monkeypatch):
    from nnsim.estimators import denoising

    model, x, K, f, y = _linearized_case()
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    y_far = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(9))  # labels it did not fit
    with pytest.warns(nnsim.RankDeficiencyWarning) as rec:
        rep = sim.denoising(x, targets=y_far, method="linearized")
    assert rep.fit_error > 0.5
    assert [str(r.message) for r in rec] == [
        f"the ridge smoother of the network's kernel reproduces its training predictions only to a relative error "
        f"of {rep.fit_error:.2f} (> 0.5): the linearized predicted errors are unreliable for this network"]
    if "MUTANT_UNDER_TEST" not in os.environ:  # (mutmut's trampoline frames move stacklevel's target)
        assert rec[0].filename == __file__  # at the caller's line
    monkeypatch.setattr(denoising, "FIT_WARN", rep.fit_error)  # exactly at the limit: no warning (strict >)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sim.denoising(x, targets=y_far, method="linearized")


def test_paper_report_uses_the_given_predictions_and_rtol_and_warns_about_singular_rows():
    """Sketched or not, R_i = sum_j K_ij and Y_i = sum_j K_ij yhat_j are exact: the consistency with given
    predictions is |yhat_i - R_i^-1 Y_i| written out; rows whose R_i has s_min <= rtol s_max (Similarity's rtol)
    are flagged singular, with a warning naming them."""
    model, x = mlp2(2)
    x = x[:8].clone()
    G = jacobian(model, (x,))
    K = torch.einsum("icp,jep->ijce", G, G)  # [N, N, d, d]
    p = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(5))
    R = K.sum(1)
    sv = torch.linalg.svdvals(R)
    ratio = sorted((float(sv[i, -1] / sv[i, 0]), i) for i in range(8))
    rtol = (ratio[2][0] + ratio[3][0]) / 2  # three rows below it
    flagged = sorted(i for _, i in ratio[:3])
    for approximate in (False, True):
        sim = nnsim.Similarity(model, chunk_size=3, rtol=rtol, progress=False)
        with pytest.warns(nnsim.RankDeficiencyWarning) as rec:
            rep = sim.denoising(x, p, approximate=approximate, dim=6)
        assert rep.approximate is approximate
        assert [i for i in range(8) if rep.singular[i]] == flagged
        assert [str(r.message) for r in rec] == [
            f"3 sample(s) have a (near-)singular kernel row sum sum_j K_ij: pseudo-inverted, their denoising "
            f"statistics are unreliable. Samples: {flagged}"]
        if "MUTANT_UNDER_TEST" not in os.environ:  # (mutmut's trampoline frames move stacklevel's target)
            assert rec[0].filename == __file__  # at the caller's line
        for i in set(range(8)) - set(flagged):
            e = torch.linalg.inv(R[i]) @ sum(K[i, j] @ p[j] for j in range(8))
            assert float(rep.consistency[i]) == pytest.approx(float((p[i] - e).norm()), rel=1e-8)


def test_singular_row_warning_names_the_first_20_samples():
    model, x = mlp2(2)
    x = torch.cat([x, x, x])[:24].clone()
    x[1:23, 0] = 0.0  # 22 samples with no gradient: R_i = 0

    def gate(out, inputs):
        return out * (inputs[0][:, :1] != 0).to(out.dtype)

    with pytest.warns(nnsim.RankDeficiencyWarning) as rec:
        rep = nnsim.Similarity(model, gate, chunk_size=8, progress=False).denoising(x)
    assert rep.singular.tolist() == [False] + [True] * 22 + [False]
    assert str(rec[0].message).endswith(f"unreliable. Samples: {list(range(1, 21))}")
    assert str(rec[0].message).startswith("22 sample(s) have")


def test_exact_sums_of_a_share_of_the_tiles_and_of_none():
    """R, Q, Y and sum_j ||K_ij|| over the pairs of a process's tiles (those of row chunk 0 and their mirrors),
    written out from the autograd kernel; a process without tiles hands an empty dict to the all-reduce."""
    from nnsim.estimators.denoising import exact_sums

    class FirstRowChunk(Ranks):
        def tiles(self, n_a, n_b, symmetric):
            return [s for s in super().tiles(n_a, n_b, symmetric) if s[0] == 0]

    model, x = mlp2(2)
    x = x[:8].clone()
    G = jacobian(model, (x,))
    K = torch.einsum("icp,jep->ijce", G, G)  # [N, N, d, d]
    with torch.no_grad():
        y = model(x)
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    sim.similarity(x[:1])
    src = as_source(x, "data")
    R, Q, Y, yhat, A = exact_sums(sim._chunker, src, None, FirstRowChunk(None, torch.device("cpu")))
    for i in range(8):
        js = range(8) if i < 3 else range(3)
        torch.testing.assert_close(R[i], sum(K[i, j] for j in js), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(Q[i], sum(K[i, j] @ K[i, j].T for j in js), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(Y[i], sum(K[i, j] @ y[j] for j in js), rtol=1e-10, atol=1e-12)
        assert float(A[i]) == pytest.approx(sum(float(K[i, j].norm()) for j in js), rel=1e-10)
    torch.testing.assert_close(yhat[:3], y[:3], rtol=0, atol=0)  # each row's diagonal tile sets its prediction
    assert not yhat[3:].any()
    full = exact_sums(sim._chunker, src, None, Ranks(None, torch.device("cpu")))
    for i in range(8):  # every tile: the rows of the last chunk are columns of two row chunks' tiles
        torch.testing.assert_close(full[0][i], sum(K[i, j] for j in range(8)), rtol=1e-10, atol=1e-12)
        assert float(full[4][i]) == pytest.approx(sum(float(K[i, j].norm()) for j in range(8)), rel=1e-10)

    class NoTiles(Ranks):
        def tiles(self, n_a, n_b, symmetric):
            return []

        def sum(self, sums):  # the all-reduce with a process that swept every tile
            return {k: w + sums[k] if k in sums else w for k, w in zip(("R", "Q", "Y", "yhat", "A"), full, strict=True)}

    got = exact_sums(sim._chunker, src, None, NoTiles(None, torch.device("cpu")))
    for g, w in zip(got, full, strict=True):
        assert torch.equal(g, w)


def test_exact_sums_of_a_float32_model_accumulate_in_float64_and_show_their_tiles(capsys):
    from nnsim.estimators.denoising import exact_sums

    model, x = mlp2(2)
    x = x[:8].clone()
    K = torch.einsum("icp,jep->ijce", *[jacobian(model, (x,))] * 2)
    sim = nnsim.Similarity(model.float(), chunk_size=3, progress=False)
    sim.similarity(x[:1].float())
    R, Q, Y, yhat, A = exact_sums(sim._chunker, as_source(x.float(), "data"), None,
                                  Ranks(None, torch.device("cpu"), progress=True))
    assert (R.dtype, Q.dtype, Y.dtype, A.dtype, yhat.dtype) == (F64, F64, F64, F64, torch.float32)
    torch.testing.assert_close(R, K.sum(1), rtol=1e-4, atol=1e-5)
    states = _bar_states(capsys.readouterr().err, "nnsim kernel")
    assert states and "6/6" in states[-1], states  # 3 row chunks: 6 tiles of the symmetric sweep


def test_exact_denoising_names_the_data_when_a_chunk_fails():
    model, x = mlp2(2)

    xs = x[:8].clone()
    xs[4, 0] = 10.0
    with pytest.raises(ModelError, match=r"^data: the output gradients are not finite .* at samples \[4\]"):
        nnsim.Similarity(model, overflowing, chunk_size=3, progress=False).denoising(xs)


def test_linearized_landmarks_must_be_a_positive_integer_and_one_is_enough():
    model, x, K, f, y = _linearized_case()
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    for bad in (2.5, True, 0, "4"):
        with pytest.raises(InputError) as err:
            sim.denoising(x, targets=y, method="linearized", approximate=True, landmarks=bad)
        assert str(err.value) == f"landmarks must be a positive integer, got {bad!r}"
    with pytest.warns(nnsim.RankDeficiencyWarning, match="smoother of the network's kernel reproduces"):
        rep = sim.denoising(x, targets=y, method="linearized", approximate=True, landmarks=1, seed=0)  # rank 2
    assert rep.factor_matrix.shape == (8, 2, 2) and rep.approximate and rep.fit_error > 0.5


def test_denoising_refuses_what_each_method_does_not_take_with_the_full_message():
    model, x, K, f, y = _linearized_case()
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    cases = [
        (dict(targets=y), "targets are used by method='linearized' only; the paper's factor is label-free (pass "
                          "method='linearized' to estimate sigma from the targets)"),
        (dict(approximate=True, dim=2.5), "dim must be a positive integer (the projection size of approximate=True), "
                                          "got 2.5"),
        (dict(approximate=True, dim=0), "dim must be a positive integer (the projection size of approximate=True), "
                                        "got 0"),
        (dict(predictions=f[:, 0]), "predictions must be a [N, d] tensor with N = 8 rows, got (8,)"),
        (dict(predictions=f[:7]), "predictions must be a [N, d] tensor with N = 8 rows, got (7, 2)"),
        (dict(predictions=f.tolist()), "predictions must be a [N, d] tensor with N = 8 rows, got list"),
        (dict(method="linearized"), "method='linearized' needs the noisy training targets: denoising(data, "
                                    "targets=y, method='linearized'), y [N, d] the labels the network was trained on"),
        (dict(method="linearized", targets=y[:, :1, None]), "targets must be a [N, d] tensor with N = 8 rows, got "
                                                            "(8, 1, 1)"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError) as err:
            sim.denoising(x, **kwargs)
        assert str(err.value) == message, kwargs
    with pytest.raises(InputError, match="^data: expected a tensor, a tuple of tensors"):
        sim.denoising("x")
    # accepted: dim=1 (the paper's sketch), a dim the linearized method does not use
    rep = sim.denoising(x, approximate=True, dim=1)
    assert rep.approximate and rep.factor_matrix.shape == (8, 2, 2)
    rep = sim.denoising(x, targets=y, method="linearized", approximate=True, landmarks=8, dim=0)
    assert rep.method == "linearized"


def test_linearized_targets_of_one_output_may_be_a_vector():
    model, x = mlp2(1)
    x = x[:8].clone()
    with torch.no_grad():
        y = model(x) + 0.05 * torch.randn(8, 1, dtype=F64, generator=torch.Generator().manual_seed(4))
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    column = sim.denoising(x, targets=y, method="linearized")
    vector = sim.denoising(x, targets=y[:, 0], method="linearized")
    assert torch.equal(column.factor_matrix, vector.factor_matrix) and column.lam == vector.lam


def test_sweeps_of_denoising_show_no_progress_bar_unless_asked(capsys):
    from nnsim.estimators.denoising import exact_sums

    model, x, K, sim = _kernel_setup()
    src = as_source(x, "data")
    quiet = Ranks(None, torch.device("cpu"), progress=False)
    exact_sums(sim._chunker, src, None, quiet)
    kernel_matrix(sim._chunker, src, src, quiet)
    assert "nnsim" not in capsys.readouterr().err


def test_paper_predictions_check_names_the_first_sample_when_it_fails():
    model, x = mlp2(2)

    xs = x[:8].clone()
    xs[0, 0] = 10.0
    sim = nnsim.Similarity(model, overflowing, chunk_size=3, progress=False)  # d unknown: measured on the first sample
    with pytest.raises(ModelError, match=r"^data: the output gradients are not finite .* at samples \[0\]"):
        sim.denoising(xs, torch.zeros(8, 2, dtype=F64))
