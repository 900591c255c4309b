"""Robustness of the structured backend's plan check, and embeddings that are not plain lookups of batched ids.

* A rule whose factor is malformed (wrong batch size, wrong rank) or raises while it is checked sends only its
  own module to the exact fallback, with one FallbackWarning naming it; the other modules keep their rules.
* Hugging Face BART (learned positions that look up ``arange(T) + 2`` whatever their argument, a word embedding
  tied to an uncalled ``shared`` module, an eos-gathering classification head), T5 (a relative-attention-bias
  Embedding called on buckets [T, T] shared by the batch) and Gemma (a scaled word embedding), built from
  tiny configs, are exact against the per-sample loop with their Linears and Embeddings on rules.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from oracles import rel_err
from torch import Tensor, nn

import nnsim
from nnsim import outputs
from nnsim.backends.rules import Call
from nnsim.backends.rules.linear import linear as linear_rule
from nnsim.factors import Dense, Outer

torch.set_num_threads(1)
N, T, V = 4, 6, 30


# ------------------------------------------------------------------ malformed or raising factors
class ShortBatchLinear(nn.Linear):
    pass


class FlatInputLinear(nn.Linear):
    pass


class GradRaisingLinear(nn.Linear):
    pass


class _RaisingDense(Dense):
    def batch_grad(self) -> list[Tensor]:
        raise RuntimeError("this factor cannot sum its batch")


def _short_batch(module, layer, calls, names):
    """Factors of one sample fewer than the batch."""
    return [f.dense().select(torch.arange(f.batch_size - 1)) for f in linear_rule(module, layer, calls, names)]


def _flat_input(module, layer, calls, names):
    """An Outer factor whose inputs lack the group axis: [B, T, m] where [B, G, T, m] is due (BART's crash)."""
    c = calls[0]
    a = torch.nn.functional.pad(c.batched_input()[:, None], (0, 1), value=1.0)  # [B, 1, m + 1]
    return [Outer(layer, a, c.deltas[0][:, :, None, None], (names["weight"], module.weight.shape),
                  (names["bias"], module.bias.shape))]


def _grad_raising(module, layer, calls, names):
    return [_RaisingDense(f.layer, f.dense().g, f.params) for f in linear_rule(module, layer, calls, names)]


nnsim.register_rule(ShortBatchLinear, _short_batch)
nnsim.register_rule(FlatInputLinear, _flat_input)
nnsim.register_rule(GradRaisingLinear, _grad_raising)


@pytest.mark.parametrize(("cls", "reason"), [
    (ShortBatchLinear, r"raised ValueError: a Dense factor of \(2, 2, 25\), expected \[B, d, n\] = \(3, 2, 25\)"),
    (FlatInputLinear, r"raised ValueError: an Outer factor's inputs are \(3, 1, 5\), expected \[B, G, T, m\] with "
                      r"\[B, G, T\] = \[3, 1, 1\]"),
    (GradRaisingLinear, r"raised RuntimeError when its factor was checked: this factor cannot sum its batch"),
])
def test_a_malformed_or_raising_factor_demotes_only_its_module(cls, reason):
    torch.manual_seed(0)
    model = nn.Sequential(cls(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False, chunk_size=6)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        K = sim.kernel(x)
        K2 = sim.kernel(x)  # the plan is kept: no second warning
    fallback = [str(w.message) for w in seen if issubclass(w.category, nnsim.FallbackWarning)]
    assert len(fallback) == 1, fallback
    assert f"module '0' ({cls.__name__})" in fallback[0]
    assert re.search(reason, fallback[0]), fallback[0]
    assert rel_err(K, ref) <= 1e-10 and rel_err(K2, ref) <= 1e-10
    assert sim.describe() == {"0": "fallback", "2": "linear", "4": "linear"}


def test_a_factor_naming_a_parameter_of_another_module_is_the_rules_error():
    class Thief(nn.Linear):
        pass

    def rule(module, layer, calls, names):
        (f,) = linear_rule(module, layer, calls, names)
        return [Dense(layer, f.dense().g, [("2.weight", torch.Size([5, 4])), ("2.bias", torch.Size([5]))])]

    nnsim.register_rule(Thief, rule)
    torch.manual_seed(0)
    model = nn.Sequential(Thief(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Thief\) raised ValueError: a factor names "
                                                   r"'2.weight', not one of the parameters"):
        K = sim.kernel(x)
    assert rel_err(K, ref) <= 1e-10
    assert sim.describe() == {"0": "fallback", "2": "linear"}


class WindowBias(nn.Module):
    """Swin-style: a bias [1, H, N, N] computed from no input, added to attention scores [B * W, H, N, N]."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(1, 2, 3, 3))

    def forward(self) -> Tensor:
        return torch.tanh(self.table)


class Windowed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias, self.lin, self.head = WindowBias(), nn.Linear(3, 3), nn.Linear(2 * 2 * 3 * 3, 2)

    def forward(self, x: Tensor) -> Tensor:  # x [B, W = 2, H = 2, 3, 3]
        h = self.lin(x).reshape(-1, 2, 3, 3) + self.bias()  # [B * W, H, N, N]: the bias broadcast over B * W
        return self.head(torch.tanh(h).reshape(x.shape[0], -1))


def test_a_model_that_fails_under_the_recording_hooks_is_planned_around():
    """Expanding the batch-shared bias to B (as the pass does for position embeddings) breaks the model's own
    broadcast against B * W windows while the batch axes are being recorded: planned without the expansion."""
    torch.manual_seed(0)
    model = Windowed().double()
    x = torch.randn(5, 2, 2, 3, 3, dtype=torch.float64)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    for _ in range(2):
        assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe()["head"] == "linear"


# ------------------------------------------------------------------ embeddings that are not plain lookups
class RelativeBias(nn.Module):
    """T5-style attention over [B, T, C] with a bias table looked up on buckets [T, T] shared by the batch,
    permuted to [1, H, T, T] and broadcast over the batch (H = 2: the permuted table [H, T, T] has the size of
    a probe batch on axis 0 without carrying it)."""

    def __init__(self, c: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.emb, self.heads = nn.Embedding(V, c), heads
        self.bias = nn.Embedding(7, heads)
        self.q, self.head = nn.Linear(c, heads * c), nn.Linear(c, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)  # [B, T, C]
        B, L, C = h.shape
        buckets = (torch.arange(L)[None, :] - torch.arange(L)[:, None]).clamp(-3, 3) + 3  # [T, T]
        bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, H, T, T]
        q = self.q(h).view(B, L, self.heads, C).transpose(1, 2)  # [B, H, T, C]
        att = torch.softmax(q @ h[:, None].transpose(-1, -2) + bias, -1)  # [B, H, T, T]
        return self.head((att @ h[:, None]).mean((1, 2)))


class SquashedEmbedding(nn.Embedding):
    """A subclass whose forward transforms its lookup (nonlinearly, with a buffer scale)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("scale", torch.tensor(1.7))

    def forward(self, ids: Tensor) -> Tensor:
        return torch.tanh(super().forward(ids)) * self.scale


class Positions(nn.Embedding):
    """BART-style learned positions: looks up arange(T) + 2 whatever its argument (here a float [B, T])."""

    def forward(self, like: Tensor) -> Tensor:
        return super().forward(torch.arange(like.shape[1]).expand(like.shape[0], -1) + 2)


class SubclassedEmbeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos = SquashedEmbedding(V, 4, padding_idx=0), Positions(T + 2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids)
        h = h + self.pos(h[:, :, -1])
        return self.head(torch.tanh(h).mean(1))


def _toy_ids(n: int = N, length: int = T) -> Tensor:
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("target", [None, 1])
@pytest.mark.parametrize("length", [T, 3, 2])  # 3 and 2: the buckets [T, T] have the probes' batch sizes
def test_an_embedding_of_ids_shared_by_the_batch_is_tracked_to_where_it_meets_the_batch(target, length):
    torch.manual_seed(0)
    model = RelativeBias().double()
    x = _toy_ids(length=length)
    spec = outputs.logits(target=target)
    ref = nnsim.Similarity(model, output=spec, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, output=spec, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe() == {"emb": "embedding", "bias": "free parameters", "q": "linear", "head": "linear"}


@pytest.mark.parametrize("target", [None, 1])
def test_embedding_subclasses_use_the_lookups_their_forward_makes(target):
    torch.manual_seed(0)
    model = SubclassedEmbeddings().double()
    x = _toy_ids()
    x[0, :2] = 0  # the padding row
    spec = outputs.logits(target=target)
    ref = nnsim.Similarity(model, output=spec, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, output=spec, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe() == {"tok": "embedding", "pos": "embedding", "head": "linear"}


@pytest.mark.parametrize("make", [SubclassedEmbeddings, RelativeBias])
def test_similarity_loss_double_backward_through_these_embeddings(make):
    """With the graph kept (SimilarityLoss), a subclass's pulled-back signals depend on the weight through its
    forward (tanh of the lookup): the double backward must see that; a batch-shared embedding, which the
    free-parameter tracking cannot keep in the graph, goes to the whole-model fallback (with a warning)."""
    torch.manual_seed(0)
    model = make().double()
    x, pairs = _toy_ids(), torch.tensor([[0, 1], [2, 3], [1, 2]])
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnsim.FallbackWarning)
        losses = [nnsim.SimilarityLoss(model, backend=b)(x, pairs) for b in ("functorch", "auto")]
    grads = [torch.autograd.grad(loss, params, allow_unused=True) for loss in losses]
    assert abs(float((losses[0] - losses[1]).detach())) <= 1e-12 * abs(float(losses[0].detach()))
    for g_ref, g in zip(*grads, strict=True):
        assert (g_ref is None) == (g is None)
        if g is not None:
            assert rel_err(g, g_ref) <= 1e-10
    # the graph mode's plan is kept for the graph mode only: a Similarity on the model still tracks the bias
    sim = nnsim.Similarity(model, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        sim.kernel(x)
    assert sim.describe()["bias" if make is RelativeBias else "tok"] == ("free parameters" if make is RelativeBias
                                                                         else "embedding")


def test_the_embedding_rule_refuses_batch_summed_signals():
    module = nn.Embedding(7, 2).double()
    ids = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).clamp(-3, 3) + 3
    call = Call((ids,), {}, deltas=[torch.randn(T, 1, T, 2, dtype=torch.float64)], batch_size=3)
    with pytest.raises(nnsim.backends.rules.NoBatchAxis, match="no batch axis 0 of size 3"):
        nnsim.backends.rules.embedding.embedding(module, "bias", [call], {"weight": "bias.weight"})


# ------------------------------------------------------------------ Hugging Face models
transformers = pytest.importorskip("transformers")


def _hf_ids(mask: bool = True, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(3, V, (N, T), generator=g)}
    if mask:
        m = torch.ones(N, T, dtype=torch.long)
        m[1, 4:] = 0
        x["attention_mask"] = m
    return x


def bart() -> tuple[nn.Module, dict[str, Tensor]]:
    cfg = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                                  decoder_ffn_dim=24, max_position_embeddings=16, num_labels=3, pad_token_id=0,
                                  eos_token_id=2, bos_token_id=1, attn_implementation="eager")
    x = _hf_ids(mask=False)
    x["input_ids"][:, -1] = 2  # the classification head reads the hidden state of each sample's last eos
    return transformers.BartForSequenceClassification(cfg), x


def t5enc() -> tuple[nn.Module, dict[str, Tensor]]:
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=4, d_ff=24, num_layers=2, num_heads=2,
                                relative_attention_num_buckets=8, attn_implementation="eager")
    return transformers.T5EncoderModel(cfg), _hf_ids()


def gemma() -> tuple[nn.Module, dict[str, Tensor]]:
    cfg = transformers.GemmaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=4,
                                   max_position_embeddings=32, num_labels=3, pad_token_id=0,
                                   attn_implementation="eager")
    return transformers.GemmaForSequenceClassification(cfg), _hf_ids()


HF = {"bart": bart, "t5enc": t5enc, "gemma": gemma}
# embeddings of ids shared by the batch: tracked to where they meet it (no per-sample signals at their output);
# BART's decoder positions [1, T], called with the batched ids, are expanded to the batch like position ids
SHARED = {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias"}


def _spec(name: str, d: int):
    if name == "t5enc":  # an encoder without a head: the first token's first features
        return lambda out, inputs: out.last_hidden_state[:, 0, 1 : 1 + d] if d == 1 else \
            out.last_hidden_state[:, 0, :d]
    return outputs.logits(target=1) if d == 1 else outputs.logits()


@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("d", [3, 1])
def test_hf_models_exact_with_linears_and_embeddings_on_rules(name, d):
    torch.manual_seed(0)
    model, x = HF[name]()
    model = model.double().eval()
    ref = nnsim.Similarity(model, output=_spec(name, d), backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, output=_spec(name, d), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10
    plan = sim.describe()
    assert not any(v.startswith(("functorch", "loop")) for v in plan.values()), plan
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    embeddings = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and n in plan]
    assert linears and all(plan[n] == "linear" for n in linears), plan
    assert embeddings and all(plan[n] == ("free parameters" if n in SHARED else "embedding") for n in embeddings), plan
    if name == "t5enc":
        assert SHARED <= set(embeddings)
    if name == "bart":
        assert plan["model.decoder.embed_positions"] == "embedding"
