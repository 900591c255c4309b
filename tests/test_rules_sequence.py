"""Layer rules for sequence models: nn.LSTM, nn.GRU, nn.MultiheadAttention, and SDPA blocks on Linear rules.

Every case in float64 against backend="loop" (or the brute-force per-sample autograd oracle of
tests/oracles.py), called twice on the same Similarity, and with ``describe()`` asserting that the rule
itself was used: no parameter sent to the fallback or to torch.func.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import jacobian, kernel, rel_err
from torch import Tensor, nn

import nnsim
from nnsim.backends.rules import Call
from nnsim.backends.rules.attention import multihead_attention
from nnsim.backends.rules.recurrent import recurrent
from nnsim.errors import ModelError

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zoo_models import RNNClassifier  # noqa: E402  (the benchmark zoo's LSTM / GRU classifier)

torch.set_num_threads(1)


def check_exact(model: nn.Module, x: tuple[Tensor, ...], rules: dict[str, str], output=None) -> nnsim.Similarity:
    ref = nnsim.Similarity(model, output=output, backend="loop", progress=False).kernel(*x)
    sim = nnsim.Similarity(model, output=output, progress=False)
    for _ in range(2):  # the second call reuses the stored plan
        assert rel_err(sim.kernel(*x), ref) < 1e-11
    desc = sim.describe()
    for layer, rule in rules.items():
        assert desc[layer] == rule, desc
    assert not any(v in ("fallback",) or "functorch" in v for v in desc.values()), desc
    return sim


# ---------------------------------------------------------------------------------------------- LSTM / GRU
class Recurrent(nn.Module):
    """x [B, T, 4] -> (LSTM | GRU) -> head on the mean output, plus the final h_n (and c_n) states.

    ``h0``: the initial state is computed from the input by a Linear layer (its gradient flows through hx).
    ``twice``: the recurrent module is called on both halves of the sequence (two captured calls).
    """

    def __init__(self, cell: type, d: int, *, h0: bool = False, twice: bool = False, **options) -> None:
        super().__init__()
        self.rnn = cell(4, 6, **options)
        self.batch_first = options.get("batch_first", False)
        D = 2 if options.get("bidirectional") else 1
        self.states = options.get("num_layers", 1) * D
        P = options.get("proj_size", 0) or 6
        self.init = nn.Linear(4, P) if h0 else None
        self.head = nn.Linear(D * P, d)
        self.twice = twice

    def _run(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        hx = None
        if self.init is not None:
            h = torch.tanh(self.init(x.mean(1)))[None].repeat(self.states, 1, 1)
            hx = (h, torch.zeros(self.states, B, self.rnn.hidden_size, dtype=x.dtype)) if isinstance(
                self.rnn, nn.LSTM) else h
        seq = x if self.batch_first else x.transpose(0, 1)
        out, state = self.rnn(seq, hx) if hx is not None else self.rnn(seq)
        out = out if self.batch_first else out.transpose(0, 1)
        y = self.head(out.mean(1)) + state[0].sum(0).sum(-1, keepdim=True) if isinstance(state, tuple) else \
            self.head(out.mean(1)) + state.sum(0).sum(-1, keepdim=True)
        if isinstance(state, tuple):  # c_n's signal too
            y = y + 0.5 * state[1].pow(2).sum((0, 2))[:, None]
        return y

    def forward(self, x: Tensor) -> Tensor:
        if self.twice:
            return self._run(x[:, :3]) + self._run(x[:, 2:])
        return self._run(x)


RECURRENT_CASES = [
    (nn.LSTM, {}),
    (nn.GRU, {}),
    (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (nn.GRU, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (nn.LSTM, dict(bias=False, h0=True)),
    (nn.GRU, dict(bias=False, h0=True, bidirectional=True)),
    (nn.LSTM, dict(proj_size=3, num_layers=2, bidirectional=True, h0=True)),
    (nn.LSTM, dict(proj_size=2, batch_first=True, twice=True)),
    (nn.GRU, dict(num_layers=3, twice=True)),
]


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize(("cell", "options"), RECURRENT_CASES)
def test_recurrent_rule_is_exact(cell, options, d):
    torch.manual_seed(0)
    model = Recurrent(cell, d, **options).double()
    x = torch.randn(4, 5, 4, dtype=torch.float64)
    check_exact(model, (x,), {"rnn": "recurrent", "head": "linear"})


@settings(max_examples=6, deadline=None)
@given(T=st.integers(1, 6), hidden=st.integers(1, 8), layers=st.integers(1, 2), bidirectional=st.booleans(),
       gru=st.booleans(), proj=st.integers(0, 3), batch=st.integers(1, 4))
def test_recurrent_rule_random_shapes(T, hidden, layers, bidirectional, gru, proj, batch):
    torch.manual_seed(T * 100 + hidden)
    options = dict(num_layers=layers, bidirectional=bidirectional, batch_first=True)
    if not gru and 0 < proj < hidden:
        options["proj_size"] = proj
    rnn = (nn.GRU if gru else nn.LSTM)(3, hidden, **options).double()
    model = nn.Sequential()
    model.rnn = rnn
    out = lambda o, _: o[0][:, -1] + o[0].mean(1)  # noqa: E731  (d = D * H outputs mixing all time steps)
    x = torch.randn(batch, T, 3, dtype=torch.float64)
    check_exact(model, (x,), {"rnn": "recurrent"}, output=out)


def text_classifier(cell: type) -> nn.Module:
    """The zoo's Embedding -> (LSTM | GRU) -> Linear head on the last output, at test sizes."""
    return RNNClassifier(cell, vocab=13, dim=6, hidden=8, classes=3)


def _oracle_similarity(model: nn.Module, x: Tensor) -> Tensor:
    """tr(K~)/d from brute-force per-sample autograd, the normalisation written out by eigendecomposition."""
    G = jacobian(model, (x,))
    lam, V = torch.linalg.eigh(G @ G.transpose(1, 2))
    U = V @ torch.diag_embed(lam.rsqrt()) @ V.transpose(1, 2) @ G
    return torch.einsum("icp,jcp->ij", U, U) / G.shape[1]


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_text_classifier_against_bruteforce_oracle(cell):
    torch.manual_seed(1)
    model = text_classifier(cell).double()
    x = torch.randint(0, 13, (5, 6))
    G = jacobian(model, (x,))
    sim = nnsim.Similarity(model, progress=False)
    for _ in range(2):
        assert rel_err(sim.kernel(x), kernel(G, G)) < 1e-11
    assert sim.describe() == {"emb": "embedding", "rnn": "recurrent", "head": "linear"}
    S = _oracle_similarity(model, x)
    torch.testing.assert_close(sim.similarity(x), S, atol=1e-10, rtol=0)
    torch.testing.assert_close(sim.density(x), S.sum(1), atol=1e-10, rtol=0)
    vals, idx = sim.neighbors(x, k=3)
    torch.testing.assert_close(vals, S.topk(3, dim=1).values, atol=1e-10, rtol=0)
    assert torch.equal(idx, S.topk(3, dim=1).indices)


class PackedClassifier(nn.Module):
    """Embedding -> pack_padded_sequence (lengths from the padding token 0, unsorted) -> LSTM | GRU -> head."""

    def __init__(self, cell: type, **options) -> None:
        super().__init__()
        self.emb = nn.Embedding(13, 5, padding_idx=0)
        self.rnn = cell(5, 6, batch_first=True, **options)
        D = 2 if options.get("bidirectional") else 1
        self.head = nn.Linear(D * (options.get("proj_size") or 6), 3)

    def forward(self, tokens: Tensor) -> Tensor:
        lengths = (tokens != 0).sum(1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(tokens), lengths, batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        h = state[0] if isinstance(state, tuple) else state
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return self.head(padded.sum(1)) + h.sum(0).sum(-1, keepdim=True)


@pytest.mark.parametrize(("cell", "options"), [(nn.LSTM, dict(num_layers=2, bidirectional=True)),
                                               (nn.GRU, dict(bidirectional=True)), (nn.LSTM, dict(proj_size=2))])
def test_packed_sequences(cell, options):
    torch.manual_seed(7)
    model = PackedClassifier(cell, **options).double()
    tokens = torch.randint(1, 13, (5, 6))
    for b, n in enumerate([6, 2, 4, 1, 4]):  # unsorted lengths with a tie
        tokens[b, n:] = 0
    check_exact(model, (tokens,), {"rnn": "recurrent", "emb": "embedding", "head": "linear"})


def _call_of(module: nn.Module, *args, **kwargs) -> Call:
    """A Call as the structured backend captures it, with random output signals (d = 2)."""
    out = module(*args, **kwargs)
    leaves = [t for t in torch.utils._pytree.tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    return Call(args, kwargs, deltas=[torch.randn(t.shape[0], 2, *t.shape[1:], dtype=t.dtype) for t in leaves])


def test_rules_refuse_what_they_cannot_reproduce():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, dropout=0.5, num_layers=2).double().train()  # dropout between layers: not recomputable
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    names = {n: n for n, _ in lstm.named_parameters()}
    with torch.no_grad():
        call = _call_of(lstm, x)
    with pytest.raises(ModelError, match="differs from the module's"):
        recurrent(lstm, "rnn", [call], names)
    with pytest.raises(ModelError, match="unbatched"):
        recurrent(lstm, "rnn", [Call((x[:, 0],), {}, deltas=[])], names)
    mha = nn.MultiheadAttention(4, 2).double()
    q = torch.randn(3, 2, 4, dtype=torch.float64)
    with pytest.raises(ModelError, match="unbatched"):
        multihead_attention(mha, "attn", [Call((q[:, 0], q[:, 0], q[:, 0]), {}, deltas=[])],
                            {n: n for n, _ in mha.named_parameters()})


# ---------------------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """tokens -> Embedding -> MultiheadAttention (self or cross, masks from the tokens) -> mean -> Linear."""

    def __init__(self, d: int, *, mask: str = "none", call: dict | None = None, cross: bool = False,
                 use_weights: bool = False, **options) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        kdim = options.get("kdim")
        self.kv = nn.Linear(8, kdim) if kdim else None
        self.attn = nn.MultiheadAttention(8, 2, **options)
        self.head = nn.Linear(8, d)
        self.mask, self.call, self.cross, self.use_weights = mask, call or {}, cross, use_weights
        self.batch_first = options.get("batch_first", False)

    def forward(self, tokens: Tensor) -> Tensor:
        q = self.emb(tokens)
        kv = q[:, :4] if self.cross else q
        if self.kv is not None:
            kv = self.kv(kv)
        L, S = q.shape[1], kv.shape[1]
        kw = dict(self.call)
        pad = tokens[:, :S] == 0  # padded keys (token 0); token 1 at position 0 keeps every row valid
        if self.mask in ("padding", "both"):
            kw["key_padding_mask"] = pad
        if self.mask in ("causal", "both"):
            kw["attn_mask"] = torch.ones(L, S, dtype=torch.bool).triu(1)
        if self.mask == "float":
            kw["attn_mask"] = torch.linspace(-1, 1, L * S, dtype=q.dtype).reshape(L, S)
            kw["key_padding_mask"] = pad.to(q.dtype) * -3.0
        if self.mask == "per_sample":  # [B * heads, L, S]: a different additive mask for every sample
            kw["attn_mask"] = (tokens[:, :L, None] - tokens[:, None, :S]).to(q.dtype).repeat_interleave(2, 0) / 10
        if not self.batch_first:
            q, kv = q.transpose(0, 1), kv.transpose(0, 1)
        out, w = self.attn(q, kv, kv, **kw)
        out = out if self.batch_first else out.transpose(0, 1)
        y = self.head(out.mean(1))
        if self.use_weights:  # the attention weights' signal reaches q and k too
            y = y + w.pow(2).flatten(1).sum(1, keepdim=True)
        return y


CAUSAL_MASK = dict(is_causal=True, need_weights=False)
ATTENTION_CASES = [
    (dict(), dict()),
    (dict(batch_first=True), dict(call=dict(need_weights=False))),
    (dict(batch_first=True), dict(mask="padding", use_weights=True)),
    (dict(), dict(mask="causal", call=CAUSAL_MASK)),
    (dict(batch_first=True), dict(mask="both", call=dict(is_causal=True))),
    (dict(batch_first=True), dict(mask="float", use_weights=True, call=dict(average_attn_weights=False))),
    (dict(), dict(mask="per_sample")),
    (dict(add_bias_kv=True, add_zero_attn=True), dict(mask="padding")),
    (dict(kdim=5, vdim=5, batch_first=True), dict(cross=True, mask="padding")),
    (dict(bias=False), dict(cross=True, use_weights=True)),
]


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize(("options", "model_options"), ATTENTION_CASES)
def test_attention_rule_is_exact(options, model_options, d):
    torch.manual_seed(0)
    model = Attention(d, **model_options, **options).double()
    tokens = torch.randint(0, 11, (4, 6))
    tokens[:, 0] = 1
    rules = {"attn": "multihead_attention", "head": "linear", "emb": "embedding"}
    if options.get("kdim"):
        rules["kv"] = "linear"
    check_exact(model, (tokens,), rules)


class SelfAttention(nn.Module):
    """x [B, L, E] -> MultiheadAttention (batch first or not) -> every output of every token."""

    def __init__(self, E: int, heads: int, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(E, heads, batch_first=batch_first)

    def forward(self, x: Tensor) -> Tensor:
        s = x if self.attn.batch_first else x.transpose(0, 1)
        out = self.attn(s, s, s)[0]
        return (out if self.attn.batch_first else out.transpose(0, 1)).flatten(1)


@settings(max_examples=6, deadline=None)
@given(L=st.integers(1, 6), heads=st.sampled_from([1, 2, 4]), width=st.integers(1, 3), batch=st.integers(1, 4),
       batch_first=st.booleans())
def test_attention_rule_random_shapes(L, heads, width, batch, batch_first):
    torch.manual_seed(L * 10 + heads)
    model = SelfAttention(heads * width, heads, batch_first).double()
    x = torch.randn(batch, L, heads * width, dtype=torch.float64)
    check_exact(model, (x,), {"attn": "multihead_attention"})


def test_attention_classifier_against_bruteforce_oracle_and_per_layer():
    torch.manual_seed(2)
    model = Attention(3, mask="padding", batch_first=True).double()
    tokens = torch.randint(0, 11, (5, 6))
    tokens[:, 0] = 1
    G = jacobian(model, (tokens,))
    sim = nnsim.Similarity(model, progress=False)
    assert rel_err(sim.kernel(tokens), kernel(G, G)) < 1e-11
    # per-layer terms are named after the owning modules, out_proj included, and sum to the kernel
    parts = sim.kernel(tokens, by="layer")
    loop = nnsim.Similarity(model, backend="loop", progress=False).kernel(tokens, by="layer")
    assert set(parts) == set(loop) >= {"attn", "attn.out_proj"}
    for name in loop:
        assert rel_err(parts[name], loop[name]) < 1e-11
    S = _oracle_similarity(model, tokens)
    torch.testing.assert_close(sim.density(tokens), S.sum(1), atol=1e-10, rtol=0)


def test_attention_called_twice_and_frozen_out_proj():
    torch.manual_seed(3)
    model = Attention(2, batch_first=True).double()
    model.attn.out_proj.requires_grad_(False)
    tokens = torch.randint(1, 11, (4, 5))

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, t: Tensor) -> Tensor:
            return self.inner(t) + self.inner(t.flip(1)) ** 2

    check_exact(Twice(), (tokens,), {"inner.attn": "multihead_attention"})


# ------------------------------------------------------------------------- SDPA blocks (HF-style attention)
class SDPABlock(nn.Module):
    """Hand-written self-attention as in HF BERT / GPT-2 / ViT: nn.Linear q, k, v, o and F.scaled_dot_product_attention
    with a padding mask (from the tokens) and a causal mask."""

    def __init__(self, causal: bool, d: int = 2, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.head = nn.Linear(dim, d)
        self.causal, self.heads = causal, heads

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens)
        B, T, C = h.shape
        q, k, v = (f(h).view(B, T, self.heads, C // self.heads).transpose(1, 2) for f in (self.q, self.k, self.v))
        allowed = (tokens != 0)[:, None, None, :]  # padding: keys of token 0 are never attended
        if self.causal:
            allowed = allowed & torch.ones(T, T, dtype=torch.bool).tril()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        h = h + self.o(a.transpose(1, 2).reshape(B, T, C))
        return self.head(h.mean(1))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_block_uses_linear_rules_and_is_exact(causal):
    torch.manual_seed(4)
    model = SDPABlock(causal).double()
    tokens = torch.randint(0, 11, (4, 6))
    tokens[:, 0] = 1
    check_exact(model, (tokens,), {n: "linear" for n in ("q", "k", "v", "o", "head")} | {"emb": "embedding"})


class ShortWide(nn.Module):
    """Two time steps / tokens of width 16: the cost model keeps the position-factored form."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.seq = nn.MultiheadAttention(16, 4, batch_first=True) if kind == "attention" else \
            getattr(nn, kind)(16, 16, batch_first=True, bidirectional=True)
        self.head = nn.Linear(32 if kind != "attention" else 16, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.seq(x, x, x, need_weights=False)[0] if self.kind == "attention" else self.seq(x)[0]
        return self.head(out.mean(1))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "attention"])
def test_short_wide_sequences_keep_position_factors(kind):
    from nnsim._model import analysis_mode
    from nnsim.factors import Outer

    torch.manual_seed(5)
    model = ShortWide(kind).double()
    x = torch.randn(4, 2, 16, dtype=torch.float64)
    rule = "multihead_attention" if kind == "attention" else "recurrent"
    sim = check_exact(model, (x,), {"seq": rule})
    with analysis_mode(model, sim.params):
        factors, _ = sim._factor_fn((x,), 0)
    assert any(isinstance(f, Outer) and f.layer.startswith("seq") for f in factors)
    torch.testing.assert_close(sim.similarity(x), _oracle_similarity(model, x), atol=1e-10, rtol=0)


@pytest.mark.parametrize("model_fn", [lambda: text_classifier(nn.LSTM), lambda: text_classifier(nn.GRU),
                                      lambda: Attention(2, mask="padding", batch_first=True,
                                                        add_bias_kv=True)], ids=["LSTM", "GRU", "attention"])
def test_similarity_loss_double_backward_through_the_rules(model_fn):
    from test_training import assert_close_grads, grads, oracle_loss

    torch.manual_seed(6)
    model = model_fn().double()
    tokens = torch.randint(1, 11, (5, 4))
    pairs = torch.tensor([[0, 1], [2, 3], [4, 0]])
    out = lambda o, _: o[:, :2]  # noqa: E731
    reg = nnsim.SimilarityLoss(model, output=out, variant="one_minus")
    loss = reg(tokens, pairs)
    ref = oracle_loss(model, tokens, pairs, "one_minus", out)
    assert abs(float(loss.detach()) - float(ref.detach())) <= 1e-10
    assert_close_grads(grads(loss, model), grads(ref, model))
    desc = reg._factor_fn.__self__.plan.describe()  # the rules ran in the graph, no fallback
    assert "recurrent" in desc.values() or "multihead_attention" in desc.values(), desc
    assert not any(v == "fallback" or "functorch" in v for v in desc.values()), desc


@pytest.mark.parametrize("which", ["lstm", "attention"])
def test_signals_with_the_batch_axis_moved_to_the_front(which):
    """A backend may hand the signals with each output's batch axis moved to the front (``call.out_batched``,
    {output index: axis}): the rules give the same factors in both layouts."""
    torch.manual_seed(8)
    if which == "lstm":
        module = nn.LSTM(3, 4, num_layers=2).double()  # output [T, B, H], h_n / c_n [L, B, H]: batch on axis 1
        args = (torch.randn(5, 2, 3, dtype=torch.float64),)
        rule, axes = recurrent, {0: 1, 1: 1, 2: 1}
    else:
        module = nn.MultiheadAttention(4, 2).double()  # output [L, B, E], weights [B, L, S]
        q = torch.randn(3, 2, 4, dtype=torch.float64)
        args, rule, axes = (q, q, q), multihead_attention, {0: 1, 1: 0}
    names = {n: n for n, _ in module.named_parameters()}
    with torch.no_grad():
        plain = _call_of(module, *args)
    moved = Call(args, {}, deltas=[g.movedim(1, 0).movedim(axes[j] + 1, 1).movedim(0, 1)
                                   for j, g in enumerate(plain.deltas)])
    moved.out_batched = axes
    for f, g in zip(rule(module, "m", [plain], names), rule(module, "m", [moved], names), strict=True):
        torch.testing.assert_close(f.dense().g, g.dense().g, rtol=1e-12, atol=1e-12)
