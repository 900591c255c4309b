"""Identities of the similarity kernels on small random float64 models (docs/method.md: "Kernels" to
"Classification outputs").

Oracles are computed in the tests only: per-sample, per-output gradients from ``torch.autograd.grad``
(flattened, float64), inverse square roots by the Denman-Beavers iteration (no eigendecomposition),
closed-form formulas, finite differences, and properties that must hold exactly.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import db_sqrt
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import nnsim
from nnsim import outputs
from nnsim.errors import InputError, RankDeficiencyWarning

torch.set_num_threads(1)

F64 = torch.float64
BACKENDS = ("loop", "functorch", "structured", "auto")
SETTINGS = settings(max_examples=25, deadline=None)
seeds = st.integers(0, 2**31 - 1)
backends = st.sampled_from(BACKENDS)
chunks = st.sampled_from([None, 1, 2, 3])

# The structured backend's planning check calls float() on a tensor that requires grad (harmless here).
pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")


# ---------------------------------------------------------------------------------------------- helpers
def mlp(d: int, seed: int, hidden: int = 6) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, d)).double()


def inputs(n: int, seed: int, shape: tuple[int, ...] = (4,)) -> torch.Tensor:
    return torch.randn(n, *shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def brute_jacobian(model: nn.Module, x: torch.Tensor, output=None, params=None) -> torch.Tensor:
    """G [N, d, P]: one torch.autograd.grad call per sample and output, in eval mode, float64."""
    output = outputs.flatten if output is None else output
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    was = model.training
    model.eval()
    rows = []
    try:
        for i in range(x.shape[0]):
            xi = x[i : i + 1]
            y = output(model(xi), (xi,)).reshape(-1)
            per_out = []
            for c in range(y.shape[0]):
                gs = torch.autograd.grad(y[c], params, retain_graph=True, allow_unused=True)
                per_out.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                          for g, p in zip(gs, params, strict=True)]))
            rows.append(torch.stack(per_out))
    finally:
        model.train(was)
    return torch.stack(rows).detach()


def gram(Ga: torch.Tensor, Gb: torch.Tensor) -> torch.Tensor:
    """K[i, j] = G(a_i) G(b_j)^T, [N, M, d, d]."""
    return torch.einsum("iap,jbp->ijab", Ga, Gb)


def ktilde_oracle(Kaa, Kab, Kbb):
    """K~[i, j] = Kaa_i^-1/2 Kab[i, j] Kbb_j^-1/2 with Denman-Beavers roots."""
    Xa, Xb = db_sqrt(Kaa)[1], db_sqrt(Kbb)[1]
    return Xa[:, None] @ Kab @ Xb[None]


def diag_blocks(K: torch.Tensor) -> torch.Tensor:
    return torch.stack([K[i, i] for i in range(K.shape[0])])


def trace(K: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(K, dim1=-2, dim2=-1).sum(-1)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10, ref=None) -> None:
    """max |a - b| <= rtol * max |ref| (ref defaults to b)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.isfinite(a).all(), a
    scale = float((b if ref is None else torch.as_tensor(ref)).abs().max())
    err = float((a - b).abs().max())
    assert err <= rtol * max(scale, 1e-300), f"max abs error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def make(model, backend="auto", **kw) -> nnsim.Similarity:
    return nnsim.Similarity(model, backend=backend, progress=False, **kw)


class Linear_out(nn.Module):
    """f -> A f (+ c(x)): a fixed linear change of output coordinates applied after a model."""

    def __init__(self, base: nn.Module, A: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("A", A)

    def forward(self, x):
        return self.base(x) @ self.A.T


def rand_orthogonal(d: int, seed: int) -> torch.Tensor:
    Q, R = torch.linalg.qr(torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    return Q * torch.sign(torch.diagonal(R))


# ---------------------------------------------------------------------------------------------- kernel
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=seeds, d=st.integers(1, 4), n=st.integers(1, 6), m=st.integers(1, 5), chunk=chunks)
def test_kernel_equals_bruteforce(backend, seed, d, n, m, chunk):
    model = mlp(d, seed)
    xa, xb = inputs(n, seed + 1), inputs(m, seed + 2)
    Ga, Gb = brute_jacobian(model, xa), brute_jacobian(model, xb)
    sim = make(model, backend, chunk_size=chunk)
    Kab = gram(Ga, Gb)
    close(sim.kernel(xa, xb), Kab)
    Kaa = gram(Ga, Ga)
    close(sim.kernel(xa), Kaa)
    close(sim.self_kernel(xa), diag_blocks(Kaa))
    assert torch.equal(sim.rank(xa), torch.full((n,), d))


def _conv_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 3, 3))


def _conv_linear():
    return nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, bias=False), nn.Tanh(), nn.Flatten(), nn.Linear(12, 2))


def _mlp_norms():
    return nn.Sequential(nn.Linear(4, 5, bias=False), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.5),
                         nn.LayerNorm(5), nn.Linear(5, 3))


ARCHS = {
    "conv_center_pixel": (_conv_net, (1, 5, 5), outputs.center_pixel),
    "conv_pixel": (_conv_net, (1, 5, 5), outputs.pixel(0, 2)),
    "conv_spatial_sum": (_conv_net, (1, 5, 5), outputs.spatial_sum),
    "conv_spatial_mean": (_conv_net, (1, 5, 5), outputs.spatial_mean),
    "conv_flatten": (_conv_net, (1, 5, 5), None),
    "conv_linear_nobias": (_conv_linear, (2, 6, 6), None),
    "mlp_batchnorm_dropout_layernorm": (_mlp_norms, (4,), None),
    "mlp_logit_target": (lambda: mlp(4, 0), (4,), outputs.logits(2)),
    "mlp_logit_predicted": (lambda: mlp(4, 0), (4,), outputs.logits("predicted")),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_kernel_equals_bruteforce_architectures(arch, backend):
    """Per-layer rules (docs/method.md, "Layer-wise structure") against explicit flattened gradients, several
    layer types."""
    build, shape, output = ARCHS[arch]
    torch.manual_seed(3)
    model = build().double()
    if arch.startswith("mlp_batchnorm"):
        with torch.no_grad():  # give BatchNorm non-trivial running statistics, then leave it in train mode
            model(inputs(16, 9, shape) * 2 + 1)
    xa, xb = inputs(3, 4, shape), inputs(2, 5, shape)
    before = [p.detach().clone() for p in model.parameters()]
    Ga, Gb = brute_jacobian(model, xa, output), brute_jacobian(model, xb, output)
    sim = make(model, backend, output=output)
    close(sim.kernel(xa, xb), gram(Ga, Gb))
    close(sim.kernel(xa), gram(Ga, Ga))
    # the model is left untouched: parameters, .grad, training mode
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())
    assert model.training


@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_subset_and_zero_gradient(backend):
    """params= restricts G to the chosen columns; a zero gradient gives rank 0, NaN similarities and a warning."""
    model = mlp(2, 11)
    x = inputs(4, 12)
    x[2] = 0.0  # d f / d W1 = (d f / d h) x^T = 0 at x = 0
    W1 = model[0].weight
    G = brute_jacobian(model, x, params=[W1])
    assert float(G[2].abs().max()) == 0.0
    sim = make(model, backend, params="0.weight")
    close(sim.kernel(x), gram(G, G))
    assert torch.equal(sim.rank(x), torch.tensor([2, 2, 0, 2]))
    with pytest.warns(RankDeficiencyWarning, match=r"zero gradient"):
        S = sim.similarity(x, reduce=None)
    keep = torch.tensor([0, 1, 3])
    assert torch.isnan(S[2]).all() and torch.isnan(S[:, 2]).all()
    K = gram(G[keep], G[keep])
    close(S[keep][:, keep], ktilde_oracle(diag_blocks(K), K, diag_blocks(K)), 1e-9, ref=1.0)
    with pytest.warns(RankDeficiencyWarning):
        infl = sim.influence(x)
    assert torch.isnan(infl[2]).all()
    close(infl[keep][:, 2], torch.zeros(3, 2, 2, dtype=F64), 0.0, ref=1.0)  # nothing moves a sample with G = 0


# ---------------------------------------------------------------------------------------------- normalised
@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(seed=seeds, d=st.integers(1, 4), n=st.integers(1, 6), m=st.integers(1, 5), chunk=chunks)
def test_normalised_kernel_matches_oracle(backend, seed, d, n, m, chunk):
    model = mlp(d, seed)
    xa, xb = inputs(n, seed + 1), inputs(m, seed + 2)
    Ga, Gb = brute_jacobian(model, xa), brute_jacobian(model, xb)
    Kaa, Kbb = diag_blocks(gram(Ga, Ga)), diag_blocks(gram(Gb, Gb))
    sim = make(model, backend, chunk_size=chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficiencyWarning)  # every K(x, x) here has full rank d
        T_ab = ktilde_oracle(Kaa, gram(Ga, Gb), Kbb)
        close(sim.similarity(xa, xb, reduce=None), T_ab, 1e-9, ref=1.0)
        close(sim.similarity(xa, xb), trace(T_ab) / d, 1e-9, ref=1.0)
        T_aa = ktilde_oracle(Kaa, gram(Ga, Ga), Kaa)
        close(sim.similarity(xa, reduce=None), T_aa, 1e-9, ref=1.0)
        close(sim.similarity(xa), trace(T_aa) / d, 1e-9, ref=1.0)


@SETTINGS
@given(seed=seeds, d=st.integers(1, 4), n=st.integers(2, 6), backend=backends, chunk=chunks)
def test_similarity_properties(seed, d, n, backend, chunk):
    """Normalisation: symmetry, sim(x,x) = 1, |sim| <= 1, K~(x,x) = I, K~(x',x) = K~(x,x')^T,
    singular values of K~ in [0, 1]."""
    model = mlp(d, seed)
    xa, xb = inputs(n, seed + 1), inputs(3, seed + 2)
    sim = make(model, backend, chunk_size=chunk)
    S = sim.similarity(xa)
    close(S, S.T, 1e-12, ref=1.0)
    close(torch.diagonal(S), torch.ones(n, dtype=F64), 1e-10, ref=1.0)
    assert float(S.abs().max()) <= 1 + 1e-12
    T = sim.similarity(xa, reduce=None)
    close(diag_blocks(T), torch.eye(d, dtype=F64).expand(n, d, d), 1e-10, ref=1.0)
    close(T, T.transpose(0, 1).transpose(-1, -2), 1e-12, ref=1.0)
    T_ab, T_ba = sim.similarity(xa, xb, reduce=None), sim.similarity(xb, xa, reduce=None)
    close(T_ba, T_ab.transpose(0, 1).transpose(-1, -2), 1e-12, ref=1.0)
    close(sim.similarity(xb, xa), sim.similarity(xa, xb).T, 1e-12, ref=1.0)
    sv = torch.linalg.svdvals(T_ab)
    assert float(sv.min()) >= -1e-12 and float(sv.max()) <= 1 + 1e-10
    # Tr K~ / d <= mean singular value (von Neumann), hence |sim| <= 1
    assert bool((trace(T_ab).abs() / d <= sv.mean(-1) + 1e-12).all())


@SETTINGS
@given(seed=seeds, n=st.integers(1, 6), backend=backends)
def test_scalar_similarity_is_gradient_cosine(seed, n, backend):
    """Normalisation, d = 1: sim = K~ = rho = cos(g(x), g(x')); influence = k / |g(x)|^2;
    rho^2 = k^C(x->x') k^C(x'->x)."""
    model = mlp(1, seed)
    xa, xb = inputs(n, seed + 1), inputs(3, seed + 2)
    ga, gb = brute_jacobian(model, xa)[:, 0], brute_jacobian(model, xb)[:, 0]
    cos = (ga @ gb.T) / (ga.norm(dim=1)[:, None] * gb.norm(dim=1)[None])
    sim = make(model, backend)
    close(sim.similarity(xa, xb), cos, 1e-10, ref=1.0)
    close(sim.similarity(xa, xb, reduce=None)[..., 0, 0], cos, 1e-10, ref=1.0)
    close(sim.kernel(xa, xb)[..., 0, 0], ga @ gb.T)
    inf = sim.influence(xa, xb)[..., 0, 0]
    close(inf, (ga @ gb.T) / (ga.norm(dim=1) ** 2)[:, None])
    rho = sim.similarity(xa)
    inf_aa = sim.influence(xa)[..., 0, 0]
    close(rho**2, inf_aa * inf_aa.T, 1e-10, ref=1.0)
    assert torch.equal(torch.sign(rho), torch.sign(sim.kernel(xa)[..., 0, 0]))


# ---------------------------------------------------------------------------------------------- invariances
@SETTINGS
@given(seed=seeds, d=st.integers(2, 4), backend=backends)
def test_output_rotation_and_linear_change(seed, d, backend):
    """Output metrics: rotation invariance."""
    model = mlp(d, seed)
    x, xb = inputs(5, seed + 1), inputs(3, seed + 2)
    base = make(model, backend)
    S, T, K = base.similarity(x, xb), base.similarity(x, xb, reduce=None), base.kernel(x, xb)
    R = rand_orthogonal(d, seed + 3)
    rot = make(Linear_out(model, R), backend)
    close(rot.kernel(x, xb), R @ K @ R.T)
    close(rot.similarity(x, xb), S, 1e-10, ref=1.0)
    close(rot.similarity(x, xb, reduce=None), R @ T @ R.T, 1e-10, ref=1.0)
    # a non-orthogonal invertible A: singular values of K~ (principal-angle cosines) kept, the trace is not
    s = torch.logspace(-0.7, 0.7, d, dtype=F64)
    A = R @ torch.diag(s) @ rand_orthogonal(d, seed + 4)
    lin = make(Linear_out(model, A), backend)
    close(lin.kernel(x, xb), A @ K @ A.T)
    TA = lin.similarity(x, xb, reduce=None)
    close(torch.linalg.svdvals(TA), torch.linalg.svdvals(T), 1e-9, ref=1.0)
    close(diag_blocks(lin.similarity(x, reduce=None)), torch.eye(d, dtype=F64).expand(5, d, d), 1e-10, ref=1.0)
    assert float((lin.similarity(x, xb) - S).abs().max()) > 1e-6


@SETTINGS
@given(seed=seeds, lam=st.floats(0.01, 100.0) | st.floats(-100.0, -0.01), c=st.floats(-10.0, 10.0),
       backend=backends)
def test_scalar_output_scale_and_shift_invariance(seed, lam, c, backend):
    """Kernels: rho invariant to f -> lambda f + c (lambda != 0); k scales by lambda^2."""
    model = mlp(1, seed)
    x, xb = inputs(5, seed + 1), inputs(3, seed + 2)
    base = make(model, backend)
    moved = make(model, backend, output=lambda out, inp: lam * out + c)
    close(moved.similarity(x, xb), base.similarity(x, xb), 1e-10, ref=1.0)
    close(moved.similarity(x), base.similarity(x), 1e-10, ref=1.0)
    close(moved.kernel(x, xb), lam**2 * base.kernel(x, xb), 1e-10)
    close(moved.influence(x, xb), base.influence(x, xb), 1e-10)


# ---------------------------------------------------------------------------------------------- influence
@SETTINGS
@given(seed=seeds, d=st.integers(1, 3), n=st.integers(1, 4), backend=backends, chunk=chunks)
def test_influence_matches_formula(seed, d, n, backend, chunk):
    """Influence: influence[i, j] = K(xb_j, xa_i) K(xa_i, xa_i)^-1; influence(x, x) = I_d."""
    model = mlp(d, seed)
    xa, xb = inputs(n, seed + 1), inputs(3, seed + 2)
    Ga, Gb = brute_jacobian(model, xa), brute_jacobian(model, xb)
    Kaa = diag_blocks(gram(Ga, Ga))
    K_ba = gram(Gb, Ga)  # K_ba[j, i] = K(xb_j, xa_i)
    # (K(b_j, a_i) Kaa_i^-1)^T = Kaa_i^-1 K(b_j, a_i)^T, Kaa_i symmetric: one LU solve per pair
    ref = torch.linalg.solve(Kaa[:, None], K_ba.transpose(0, 1).transpose(-1, -2)).transpose(-1, -2)
    sim = make(model, backend, chunk_size=chunk)
    close(sim.influence(xa, xb), ref, 1e-9)
    close(diag_blocks(sim.influence(xa)), torch.eye(d, dtype=F64).expand(n, d, d), 1e-10, ref=1.0)


@SETTINGS
@given(seed=seeds, d=st.integers(1, 3), backend=backends)
def test_influence_first_order_move(seed, d, backend):
    """Influence: theta += eps * G(x)^T K(x,x)^-1 v moves f(x') by eps * influence v + O(eps^2)."""
    model = mlp(d, seed)
    x, xb = inputs(1, seed + 1), inputs(3, seed + 2)
    G = brute_jacobian(model, x)[0]  # [d, P]
    v = torch.randn(d, dtype=F64, generator=torch.Generator().manual_seed(seed + 3))
    step = G.T @ torch.linalg.solve(G @ G.T, v)
    v, step = v / step.norm(), step / step.norm()  # a unit step in parameter space
    infl = make(model, backend).influence(x, xb)[0]  # [3, d, d]
    predicted = infl @ v  # [3, d]
    theta = parameters_to_vector(model.parameters()).detach()
    with torch.no_grad():
        f0 = model(xb)

        def moved(eps: float) -> torch.Tensor:
            m = copy.deepcopy(model)
            vector_to_parameters(theta + eps * step, m.parameters())
            return m(xb) - f0

        # central difference: first-order term to O(eps^2)
        eps = 1e-4
        close((moved(eps) - moved(-eps)) / (2 * eps), predicted, 1e-6, ref=1.0 + predicted.abs().max())
        # one-sided remainder is second order: shrinking eps by 10 shrinks it by ~100
        e1 = float((moved(1e-3) - 1e-3 * predicted).abs().max())
        e2 = float((moved(1e-4) - 1e-4 * predicted).abs().max())
        assert e1 <= 1e3 * 1e-3**2
        assert e2 <= 0.03 * e1 + 1e-12, (e1, e2)
        # and at x itself the move is v (central difference)
        fx = []
        for sgn in (1.0, -1.0):
            m = copy.deepcopy(model)
            vector_to_parameters(theta + sgn * eps * step, m.parameters())
            fx.append(m(x)[0])
        close((fx[0] - fx[1]) / (2 * eps), v, 1e-6, ref=1.0 + v.abs().max())


# ---------------------------------------------------------------------------------------------- classification
EXACT_MASK_C = [2, 3, 4, 5, 6, 9, 10]

def _margin_score_error(seed: int, C: int, b: int, target) -> tuple[float, float]:
    z = 3.0 * torch.randn(b, C, dtype=F64, generator=torch.Generator().manual_seed(seed))
    t = z.argmax(1) if target == "predicted" else torch.full((b,), target)
    zt = z.gather(1, t[:, None])
    margin = zt - (z.sum(1, keepdim=True) - zt) / (C - 1)
    s = outputs.log_softmax_mask(target)(z, (z,))
    assert s.shape == (b, 1)
    return float((s - margin).abs().max()), 1.0 + float(z.abs().max())


@SETTINGS
@given(seed=seeds, C=st.sampled_from(EXACT_MASK_C), b=st.integers(1, 5),
       target=st.integers(0, 8) | st.just("predicted"))
def test_posnegflat_is_logit_margin(seed, C, b, target):
    """Classification outputs (posnegflat): sum_c m_c log_softmax(z)_c = z_t - mean_{c != t} z_c."""
    if isinstance(target, int):
        target = target % C
    err, scale = _margin_score_error(seed, C, b, target)
    assert err <= 1e-12 * scale


@pytest.mark.parametrize("C", [4, 6, 10])
@pytest.mark.parametrize("part", ["score", "similarity"])
def test_posnegflat_is_float64_exact(part, C):
    if part == "score":
        for seed in range(5):
            for target in (0, "predicted"):
                err, scale = _margin_score_error(seed, C, 3, target)
                assert err <= 1e-12 * scale, (seed, target, err)
    else:
        for seed in range(3):
            _check_margin_similarity(seed, C, "loop")


def _check_margin_similarity(seed: int, C: int, backend: str) -> None:
    model = mlp(C, seed)
    x, xb = inputs(4, seed + 1), inputs(3, seed + 2)

    def margin(out, inp):  # written out here, with the target = argmax of each sample
        t = out.detach().argmax(1, keepdim=True)
        zt = out.gather(1, t)
        return zt - (out.sum(1, keepdim=True) - zt) / (C - 1)

    ga, gb = brute_jacobian(model, x, margin)[:, 0], brute_jacobian(model, xb, margin)[:, 0]
    cos = (ga @ gb.T) / (ga.norm(dim=1)[:, None] * gb.norm(dim=1)[None])
    sim = make(model, backend, output=outputs.log_softmax_mask("predicted"))
    close(sim.kernel(x, xb)[..., 0, 0], ga @ gb.T, 1e-10)
    close(sim.similarity(x, xb), cos, 1e-10, ref=1.0)


@SETTINGS
@given(seed=seeds, C=st.sampled_from(EXACT_MASK_C[:3]), backend=backends)
def test_posnegflat_similarity_is_margin_gradient_cosine(seed, C, backend):
    _check_margin_similarity(seed, C, backend)


def test_output_helpers_reject_bad_arguments():
    z = torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError):
        outputs.log_softmax_mask(0, mask="random")
    with pytest.raises(ValueError):
        outputs.log_softmax_mask(0)(z[:, :1], (z,))
    with pytest.raises(ValueError):
        outputs.logits(3)(z, (z,))
    with pytest.raises(ValueError):
        outputs.pixel(0, 0)(z, (z,))


FISHER_RTOL = 1e-11


def _fisher_oracle(Ga, Gb, za, zb):
    """K_F and its normalised form on the (C-1)-dimensional range, all roots by Denman-Beavers.

    F 1 = 0 and J = 11^T / C is the projector on 1, so F + J is SPD and F^1/2 = (F + J)^1/2 - J; likewise
    K_F(x, x) (null vector 1, rank C-1) has the pseudo-inverse root (K_F + J)^-1/2 - J.
    """
    C = za.shape[1]
    J = torch.full((C, C), 1.0 / C, dtype=F64)

    def half(z):
        p = torch.softmax(z, dim=1)
        F = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return db_sqrt(F + J)[0] - J

    Ha, Hb = half(za), half(zb)
    KF = Ha[:, None] @ gram(Ga, Gb) @ Hb[None]
    KFa = Ha @ diag_blocks(gram(Ga, Ga)) @ Ha
    KFb = Hb @ diag_blocks(gram(Gb, Gb)) @ Hb
    Xa, Xb = db_sqrt(KFa + J)[1] - J, db_sqrt(KFb + J)[1] - J
    return KF, KFa, Xa[:, None] @ KF @ Xb[None]


@SETTINGS
@given(seed=seeds, C=st.integers(2, 4), backend=backends)
def test_fisher_metric_matches_oracle(seed, C, backend):
    """Classification outputs (Fisher metric): K_F = F^1/2 K F^1/2, normalised on its C-1 dimensional range,
    trace over C-1; sim(x, x) = 1."""
    model = mlp(C, seed)
    x, xb = inputs(4, seed + 1), inputs(3, seed + 2)
    Ga, Gb = brute_jacobian(model, x), brute_jacobian(model, xb)
    with torch.no_grad():
        za, zb = model(x), model(xb)
    KF, KFa, T = _fisher_oracle(Ga, Gb, za, zb)
    sim = make(model, backend, metric="fisher")
    close(sim.kernel(x, xb), KF, FISHER_RTOL)
    close(sim.self_kernel(x), KFa, FISHER_RTOL)
    assert torch.equal(sim.rank(x), torch.full((4,), C - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RankDeficiencyWarning)  # rank C-1 is the expected, full rank here
        close(sim.similarity(x, xb, reduce=None), T, FISHER_RTOL, ref=1.0)
        close(sim.similarity(x, xb), trace(T) / (C - 1), FISHER_RTOL, ref=1.0)
        S = sim.similarity(x)
    close(torch.diagonal(S), torch.ones(4, dtype=F64), 1e-10, ref=1.0)
    close(S, S.T, 1e-12, ref=1.0)
    assert float(S.abs().max()) <= 1 + 1e-10


class _Shifted(nn.Module):
    """z -> z + c(x, theta) 1 with c = beta * sum(z) + sum(x): a per-input, parameter-dependent logit shift."""

    def __init__(self, base: nn.Module, beta: float):
        super().__init__()
        self.base, self.beta = base, beta

    def forward(self, x):
        z = self.base(x)
        return z + self.beta * z.sum(1, keepdim=True) + x.sum(1, keepdim=True)


@SETTINGS
@given(seed=seeds, C=st.integers(2, 4), beta=st.sampled_from([0.0, 0.5, -0.3]), backend=backends)
def test_fisher_invariant_to_per_input_logit_shift(seed, C, beta, backend):
    model = mlp(C, seed)
    x, xb = inputs(4, seed + 1), inputs(3, seed + 2)
    shifted = _Shifted(model, beta)
    plain_f, shift_f = make(model, backend, metric="fisher"), make(shifted, backend, metric="fisher")
    close(shift_f.kernel(x, xb), plain_f.kernel(x, xb), FISHER_RTOL)
    close(shift_f.similarity(x, xb, reduce=None), plain_f.similarity(x, xb, reduce=None), FISHER_RTOL, ref=1.0)
    close(shift_f.similarity(x), plain_f.similarity(x), FISHER_RTOL, ref=1.0)
    if beta != 0.0:  # the shift is not a no-op: the Euclidean similarity on logits does see it
        e_plain, e_shift = make(model, backend), make(shifted, backend)
        assert float((e_plain.similarity(x, xb) - e_shift.similarity(x, xb)).abs().max()) > 1e-6


@pytest.mark.parametrize("check", ["oracle", "shift"])
def test_fisher_is_float64_accurate(check):
    for seed in range(3):
        model = mlp(3, seed)
        x, xb = inputs(4, seed + 1), inputs(3, seed + 2)
        sim = make(model, "loop", metric="fisher")
        if check == "oracle":
            Ga, Gb = brute_jacobian(model, x), brute_jacobian(model, xb)
            with torch.no_grad():
                KF = _fisher_oracle(Ga, Gb, model(x), model(xb))[0]
            close(sim.kernel(x, xb), KF, 1e-11)
        else:
            shifted = make(_Shifted(model, 5.0), "loop", metric="fisher")
            close(shifted.similarity(x, xb), sim.similarity(x, xb), 1e-11, ref=1.0)  # the trace holds...
            close(shifted.kernel(x, xb), sim.kernel(x, xb), 1e-11)  # ...K_F and K~ do not
            close(shifted.similarity(x, xb, reduce=None), sim.similarity(x, xb, reduce=None), 1e-11, ref=1.0)


# ---------------------------------------------------------------------------------------------- custom metric
@SETTINGS
@given(seed=seeds, d=st.integers(1, 4), backend=backends)
def test_custom_metric_tensor(seed, d, backend):
    """Output metrics: K_M(x, x') = M^1/2 K(x, x') M^1/2, then normalised as usual."""
    model = mlp(d, seed)
    x, xb = inputs(4, seed + 1), inputs(3, seed + 2)
    A = torch.randn(d, d, dtype=F64, generator=torch.Generator().manual_seed(seed + 3))
    M = A @ A.T + 0.3 * torch.eye(d, dtype=F64)
    H = db_sqrt(M)[0]
    Ga, Gb = brute_jacobian(model, x), brute_jacobian(model, xb)
    KM = H @ gram(Ga, Gb) @ H
    KMa, KMb = H @ diag_blocks(gram(Ga, Ga)) @ H, H @ diag_blocks(gram(Gb, Gb)) @ H
    sim = make(model, backend, metric=M)
    close(sim.kernel(x, xb), KM, 1e-9)
    T = ktilde_oracle(KMa, KM, KMb)
    close(sim.similarity(x, xb, reduce=None), T, 1e-8, ref=1.0)
    close(sim.similarity(x, xb), trace(T) / d, 1e-8, ref=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [2, 3])
def test_singular_custom_metric_normalises_on_range(backend, d):
    """Normalisation (rank-deficient K): a metric with a zero direction e_k gives rank d-1,
    K~(x,x) = I - e_k e_k^T and self-sim (d-1)/d."""
    model = mlp(d, 21)
    x = inputs(4, 22)
    m = torch.linspace(0.5, 2.0, d, dtype=F64)
    m[1] = 0.0
    M = torch.diag(m)
    G = brute_jacobian(model, x)
    H = torch.diag(m.sqrt())
    sim = make(model, backend, metric=M)
    close(sim.kernel(x), H @ gram(G, G) @ H, 1e-10)
    assert torch.equal(sim.rank(x), torch.full((4,), d - 1))
    with pytest.warns(RankDeficiencyWarning, match="rank-deficient"):
        T = sim.similarity(x, reduce=None)
    P = torch.eye(d, dtype=F64)
    P[1, 1] = 0.0
    close(diag_blocks(T), P.expand(4, d, d), 1e-10, ref=1.0)
    with pytest.warns(RankDeficiencyWarning):
        S = sim.similarity(x)
    close(torch.diagonal(S), torch.full((4,), (d - 1) / d, dtype=F64), 1e-10, ref=1.0)
    # on the remaining coordinates it is the ordinary normalised kernel of the sub-output
    keep = [i for i in range(d) if i != 1]
    Gk = G[:, keep] * m[keep].sqrt()[None, :, None]
    Kk = gram(Gk, Gk)
    close(T[..., keep, :][..., keep], ktilde_oracle(diag_blocks(Kk), Kk, diag_blocks(Kk)), 1e-9, ref=1.0)


def test_invalid_metric_is_rejected():
    model = mlp(2, 0)
    x = inputs(2, 1)
    with pytest.raises(InputError):
        make(model, metric=torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64)).similarity(x)
    with pytest.raises(InputError):
        make(model, metric=torch.diag(torch.tensor([1.0, -1.0], dtype=F64))).similarity(x)
    with pytest.raises(InputError):
        make(model, metric=torch.eye(3, dtype=F64)).similarity(x)
    with pytest.raises(InputError):
        make(mlp(1, 0), metric="fisher").similarity(x)
