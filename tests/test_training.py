"""SimilarityLoss against a brute-force per-pair oracle (per-sample autograd.grad with create_graph, float64):
the loss value and its parameter gradients, on several architectures, variants, outputs and batch modes."""

from __future__ import annotations

import pytest
import torch
from oracles import db_sqrt
from torch import Tensor, nn

import nnsim
from nnsim.experiments.mnist_criterion import InnerConvNet
from nnsim.training import _InvSqrtPSD

torch.set_num_threads(1)


# ---------------------------------------------------------------------------- the oracle
def _per_sample_G(model, x, i, out_fn, params, targets=None):
    """G(x_i) [d, P], differentiable with respect to every parameter (create_graph)."""
    y = out_fn(model(x[i : i + 1]), None if targets is None else targets[i : i + 1])
    rows = []
    for c in range(y.shape[1]):
        gs = torch.autograd.grad(y[0, c], params, create_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)


def _rho(Kab, Kaa, Kbb):
    d = Kab.shape[0]
    if d == 1:
        return Kab[0, 0] / (Kaa[0, 0] * Kbb[0, 0]).sqrt()
    return (db_sqrt(Kaa)[1] @ Kab @ db_sqrt(Kbb)[1]).trace() / d


def oracle_loss(model, x, pairs, variant, out_fn, params=None, targets=None, batch_mode="per_pair"):
    """The criterion written out: one create_graph gradient per sample of each pair, then the formula."""
    params = [p for p in model.parameters() if p.requires_grad] if params is None else params
    was = model.training
    model.eval()
    G = {i: _per_sample_G(model, x, i, out_fn, params, targets) for i in set(pairs.flatten().tolist())}
    model.train(was)
    if batch_mode == "mean_gradient":
        A = torch.stack([G[i] for i in pairs[:, 0].tolist()]).mean(0)
        B = torch.stack([G[j] for j in pairs[:, 1].tolist()]).mean(0)
        couples = [(A, B)]
    else:
        couples = [(G[i], G[j]) for i, j in pairs.tolist()]
    terms = []
    for A, B in couples:
        Kab, Kaa, Kbb = A @ B.T, A @ A.T, B @ B.T
        if variant == "distance":
            terms.append(((A - B) ** 2).sum() / (A.norm() * B.norm()))
        elif variant == "one_minus":
            terms.append(1 - _rho(Kab, Kaa, Kbb))
        else:
            terms.append(_rho(Kab, Kaa, Kbb))
    return torch.stack(terms).mean()


def grads(loss: Tensor, model: nn.Module) -> list[Tensor]:
    ps = list(model.parameters())
    gs = torch.autograd.grad(loss, ps, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, ps)]


def assert_close_grads(a: list[Tensor], b: list[Tensor], tol: float = 1e-9) -> None:
    scale = max(float(t.abs().max()) for t in b)
    assert scale > 0
    for s, t in zip(a, b):
        assert float((s - t).abs().max()) <= tol * scale + 1e-14


# ---------------------------------------------------------------------------- models
class NoRule(nn.Module):
    """A convolution, GroupNorm, and a ConvTranspose2d (no layer rule: the per-module fallback)."""

    def __init__(self, d: int = 3) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 3, 3)
        self.gn = nn.GroupNorm(1, 3)
        self.up = nn.ConvTranspose2d(3, 2, 2, stride=2)
        self.fc = nn.Linear(2 * 10 * 10, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.up(torch.tanh(self.gn(self.c(x)))).flatten(1))


def mlp(d: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, d))


def first(k):
    return lambda out, inputs=None: out[:, :k]


def make(name):
    torch.manual_seed(0)
    if name == "mlp":
        return mlp().double(), torch.randn(7, 6, dtype=torch.float64)
    if name == "norule":
        return NoRule().double(), torch.randn(7, 1, 7, 7, dtype=torch.float64)
    return InnerConvNet().double(), torch.randn(5, 1, 28, 28, dtype=torch.float64)


PAIRS = torch.tensor([[0, 1], [2, 3], [1, 4], [4, 0]])


@pytest.mark.parametrize("name", ["mlp", "norule", "cnn"])
@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("variant", ["one_minus", "authors", "distance"])
def test_matches_per_pair_oracle(name, d, variant):
    model, x = make(name)
    reg = nnsim.SimilarityLoss(model, output=lambda o, i: o[:, :d], variant=variant, weight=0.7)
    loss = reg(x, PAIRS)
    ref = 0.7 * oracle_loss(model, x, PAIRS, variant, first(d))
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-10 * max(1.0, abs(float(ref.detach())))
    assert_close_grads(grads(loss, model), grads(ref, model))


@pytest.mark.parametrize("d", [1, 2])
@pytest.mark.parametrize("variant", ["one_minus", "distance"])
def test_mean_gradient_mode_matches_oracle(d, variant):
    model, x = make("norule")
    pairs = torch.tensor([[0, 1], [2, 3], [5, 6]])
    reg = nnsim.SimilarityLoss(model, output=lambda o, i: o[:, :d], variant=variant, batch_mode="mean_gradient")
    loss = reg(x, pairs)
    ref = oracle_loss(model, x, pairs, variant, first(d), batch_mode="mean_gradient")
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-10
    assert_close_grads(grads(loss, model), grads(ref, model))
    # One pair: both modes agree.
    one = pairs[:1]
    a = nnsim.SimilarityLoss(model, output=lambda o, i: o[:, :d], variant=variant)(x, one)
    b = nnsim.SimilarityLoss(model, output=lambda o, i: o[:, :d], variant=variant, batch_mode="mean_gradient")(x, one)
    assert abs(float(a.detach()) - float(b.detach())) <= 1e-12


def test_posnegflat_targets_match_oracle_and_authors_mask():
    """The authors' score: mask from the label, for same-class pairs identical to their mask of the second image."""
    model, x = make("cnn")
    targets = torch.tensor([3, 3, 7, 7, 3])
    pairs = torch.tensor([[0, 1], [2, 3], [4, 0]])

    def score(out, t):  # written out: s = log p_t - 1/(C-1) sum_{c != t} log p_c
        lp = torch.log_softmax(out, -1)
        return (lp[0, t[0]] - (lp.sum() - lp[0, t[0]]) / 9).reshape(1, 1)

    reg = nnsim.SimilarityLoss(model, output="posnegflat", variant="authors")
    loss = reg(x, pairs, targets)
    ref = oracle_loss(model, x, pairs, "authors", score, targets=targets)
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-10
    assert_close_grads(grads(loss, model), grads(ref, model))


def test_functorch_backend_and_param_subset():
    model, x = make("mlp")
    for backend in ("functorch", "structured"):
        reg = nnsim.SimilarityLoss(model, output=first(2), params=["2.*", "4.weight"], backend=backend)
        loss = reg(x, PAIRS)
        sel = [model[2].weight, model[2].bias, model[4].weight]
        ref = oracle_loss(model, x, PAIRS, "one_minus", first(2), params=sel)
        assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-10
        # The gradient flows to every parameter the criterion depends on, selected or not.
        g, gr = grads(loss, model), grads(ref, model)
        assert float(g[0].abs().max()) > 0
        assert_close_grads(g, gr)


def test_similarities_agree_with_similarity_api():
    """The in-graph pair similarities equal nnsim.Similarity's (no-graph) values, for d = 1 and d = 3."""
    model, x = make("norule")
    for d in (1, 3):
        reg = nnsim.SimilarityLoss(model, output=first(d))
        rho = reg.pair_similarities(x, PAIRS)
        S = nnsim.Similarity(model, output=first(d), progress=False).similarity(x)
        assert not S.requires_grad
        assert torch.allclose(rho.detach(), S[PAIRS[:, 0], PAIRS[:, 1]], atol=1e-10)
        loss, rho2 = reg(x, PAIRS, return_similarities=True)
        assert not rho2.requires_grad and torch.allclose(rho2, rho.detach())
        assert abs(float(loss.detach()) - float((1 - rho).mean().detach())) < 1e-12


def test_only_paired_rows_run_and_unused_rows_are_ignored():
    model, x = make("mlp")
    reg = nnsim.SimilarityLoss(model, output=first(1))
    pairs = torch.tensor([[5, 2]])
    a = reg(x, pairs)
    x2 = x.clone()
    x2[[0, 1, 3, 4, 6]] = 1e3  # rows outside the pairs do not matter
    assert abs(float(a.detach()) - float(reg(x2, pairs).detach())) < 1e-14


def test_model_state_untouched_and_training_loop():
    """Modes, requires_grad and .grad are left alone; minimising one_minus raises the pairs' similarity,
    minimising the authors' +cos lowers it (the sign issue, docs/method.md, "Training with the similarity
    criterion"), in a plain training loop."""
    torch.manual_seed(1)
    x = torch.randn(16, 6)
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    for variant, sign in (("one_minus", 1), ("authors", -1)):
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 1))
        model.train()
        model[0].bias.requires_grad_(False)
        reg = nnsim.SimilarityLoss(model, variant=variant)
        before = reg.pair_similarities(x, pairs).mean().item()
        assert model.training and model[2].training
        assert not model[0].bias.requires_grad and model[0].weight.grad is None
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(30):
            opt.zero_grad()
            reg(x, pairs).backward()
            opt.step()
        after = reg.pair_similarities(x, pairs).mean().item()
        assert sign * (after - before) > 0.05, (variant, before, after)
        assert model[0].bias.grad is None


def test_inv_sqrt_backward_matches_eigh_autograd_and_is_finite_when_degenerate():
    torch.manual_seed(0)
    A = torch.randn(4, 5, 3, dtype=torch.float64)
    K = (A.mT @ A).requires_grad_(True)
    W = torch.randn(4, 3, 3, dtype=torch.float64)
    ours = torch.autograd.grad((_InvSqrtPSD.apply(K, 0.0) * W).sum(), K)[0]
    ref = torch.autograd.grad((db_sqrt(K)[1] * W).sum(), K)[0]
    sym = (ref + ref.mT) / 2  # the input is symmetrised first: only the symmetric part is defined
    assert torch.allclose(ours, sym, atol=1e-8)
    eye = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).clone().requires_grad_(True)
    g = torch.autograd.grad((_InvSqrtPSD.apply(eye, 1e-8) * W[:2]).sum(), eye)[0]
    assert torch.isfinite(g).all()


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("pairs, match", [
    (torch.tensor([[0, 7]]), "valid: 0..6"),
    (torch.tensor([[-1, 2]]), "valid"),
    (torch.tensor([[0.0, 1.0]]), "integer"),
    (torch.tensor([[True, False]]), "integer"),
    (torch.tensor([0, 1]), r"\[n_pairs, 2\]"),
    (torch.tensor([[0, 1, 2]]), r"\[n_pairs, 2\]"),
    (torch.zeros(0, 2, dtype=torch.long), "empty"),
    ([[0, 1]], "LongTensor"),
])
def test_bad_pairs(pairs, match):
    model, x = make("mlp")
    with pytest.raises(nnsim.InputError, match=match):
        nnsim.SimilarityLoss(model)(x, pairs)


def test_bad_inputs_and_targets():
    model, x = make("mlp")
    reg = nnsim.SimilarityLoss(model)
    with pytest.raises(nnsim.InputError, match="empty"):
        reg(x[:0], torch.tensor([[0, 1]]))
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(nnsim.InputError, match="NaN"):
        reg(bad, torch.tensor([[0, 1]]))
    with pytest.raises(nnsim.InputError, match="targets are only used"):
        reg(x, torch.tensor([[0, 1]]), torch.zeros(7, dtype=torch.long))
    cnn, xc = make("cnn")
    pn = nnsim.SimilarityLoss(cnn, output="posnegflat")
    with pytest.raises(nnsim.InputError, match="needs targets"):
        pn(xc, torch.tensor([[0, 1]]))
    with pytest.raises(nnsim.InputError, match="shape"):
        pn(xc, torch.tensor([[0, 1]]), torch.zeros(3, dtype=torch.long))
    with pytest.raises(nnsim.InputError, match="integer"):
        pn(xc, torch.tensor([[0, 1]]), torch.zeros(5))
    with pytest.raises(nnsim.InputError, match=r"\[0, 10\)"):
        pn(xc, torch.tensor([[0, 1]]), torch.full((5,), 10))


@pytest.mark.parametrize("kwargs, match", [
    ({"variant": "plus"}, "variant"),
    ({"batch_mode": "sum"}, "batch_mode"),
    ({"weight": "1"}, "weight"),
    ({"backend": "loop"}, "backend"),
    ({"output": "logits"}, "output"),
    ({"output": 3}, "output"),
    ({"params": ["nope"]}, "unknown parameter"),
])
def test_bad_arguments(kwargs, match):
    model, _ = make("mlp")
    with pytest.raises(nnsim.InputError, match=match):
        nnsim.SimilarityLoss(model, **kwargs)


def test_aliases_and_repr():
    model, x = make("mlp")
    a = nnsim.SimilarityLoss(model, output=first(1), variant="enforce")
    b = nnsim.SimilarityLoss(model, output=first(1), variant="authors_literal")
    assert a.variant == "one_minus" and b.variant == "authors"
    assert abs(float(a(x, PAIRS).detach()) + float(b(x, PAIRS).detach()) - 1) < 1e-12  # (1 - rho) + rho
    assert "one_minus" in repr(a)


def test_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "training_with_similarity.py"
    out = subprocess.run([sys.executable, str(script), "--steps", "15", "--seeds", "1", "--train", "200"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 0")]
    assert len(rows) == 2 and all("%" in r for r in rows)


def test_prelu_rule_matches_oracle_in_similarity():
    """The PReLU layer rule (shared and per-channel weights) gives exact kernels in nnsim.Similarity too."""
    from oracles import jacobian, kernel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.PReLU(3), nn.Flatten(), nn.Linear(3 * 5 * 5, 4), nn.PReLU(),
                          nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.1, -0.3, 0.7]))
    x = torch.randn(6, 1, 7, 7, dtype=torch.float64)
    sim = nnsim.Similarity(model, progress=False)
    assert sim.kernel(x).shape == (6, 6, 2, 2)
    assert sim.describe()["1"] == "prelu" and sim.describe()["4"] == "prelu"
    G = jacobian(model, (x,))
    assert torch.allclose(sim.kernel(x), kernel(G, G), atol=1e-10)


def test_readme_training_snippet_runs():
    import re
    from pathlib import Path

    import torch.nn.functional as F

    src = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## Training with the similarity criterion\n.*?```python\n(.*?)```", src, re.S).group(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ns = {"nnsim": nnsim, "F": F, "model": model, "x": torch.randn(12, 6), "y": torch.arange(12) % 3}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["pairs"].shape == (16, 2) and model[0].weight.grad is not None
    assert 0 < float(ns["loss"].detach()) < 10


class OwnLayerNorm(nn.Module):
    """A layer norm of its own (no layer rule: the per-module vmap fallback in the criterion's graph)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(1 + 0.3 * torch.randn(c)), nn.Parameter(0.3 * torch.randn(c))

    def forward(self, h: Tensor) -> Tensor:
        return nn.functional.layer_norm(h, h.shape[-1:], self.w, self.b, 1e-5)


@pytest.mark.parametrize("backend", ["structured", "functorch"])
@pytest.mark.parametrize("norm", [OwnLayerNorm, nn.LayerNorm])
def test_layer_norm_under_vmap_has_the_oracles_double_backward(backend, norm):
    """torch.func's double backward through the fused layer_norm kernel is wrong (torch 2.13: 37 % off for the
    parameters before the norm); the vmapped paths of the criterion must still match the oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), norm(8), nn.Linear(8, 3)).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    loss = nnsim.SimilarityLoss(model, output=first(2), backend=backend)(x, PAIRS)
    ref = oracle_loss(model, x, PAIRS, "one_minus", first(2))
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-10
    g, gr = grads(loss, model), grads(ref, model)
    assert float(gr[0].abs().max()) > 0  # the first Linear's gradient goes back through the norm
    assert_close_grads(g, gr)


class WeightNormedByHand(nn.Module):
    """The oracle's twin of a weight-normed Linear: W = g v / ||v|| (rows) written out with plain operations."""

    def __init__(self, lin: nn.Module) -> None:
        super().__init__()
        self.g = lin.parametrizations.weight.original0
        self.v = lin.parametrizations.weight.original1
        self.bias = lin.bias

    def forward(self, h: Tensor) -> Tensor:
        return nn.functional.linear(h, self.v * (self.g / self.v.norm(dim=1, keepdim=True)), self.bias)


@pytest.mark.parametrize("backend", ["structured", "functorch"])
def test_weight_norm_has_the_oracles_double_backward(backend):
    """torch._weight_norm's double backward fails gradgradcheck (torch 2.13, CPU): the criterion through a
    weight-normed layer must still match the oracle run on the same parameters written out by hand."""
    torch.manual_seed(0)
    wn = nn.utils.parametrizations.weight_norm(nn.Linear(6, 8))
    model = nn.Sequential(wn, nn.Tanh(), nn.Linear(8, 3)).double()
    twin = nn.Sequential(WeightNormedByHand(model[0]), nn.Tanh(), model[2])
    x = torch.randn(5, 6, dtype=torch.float64)
    loss = nnsim.SimilarityLoss(model, output=first(2), backend=backend)(x, PAIRS)
    ref = oracle_loss(twin, x, PAIRS, "one_minus", first(2))
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-10
    ps = [model[0].parametrizations.weight.original0, model[0].parametrizations.weight.original1, model[0].bias,
          model[2].weight]
    g = torch.autograd.grad(loss, ps)
    gr = torch.autograd.grad(ref, ps)
    assert_close_grads(list(g), list(gr))
