"""Channels-first LayerNorms, parametrized modules (torch.nn.utils.parametrize) and float32-computing RMSNorms on
their layer rules, against the per-sample loop oracle in float64 (float32 where stated): Hugging Face ConvNeXt
(its ``data_format="channels_first"`` LayerNorms), Wav2Vec2 (a weight-normed positional convolution) and
Llama-style models from tiny configs; hand-written models with weight_norm (both kinds), spectral_norm,
orthogonal and custom parametrizations, and a parametrization that torch.func cannot differentiate, which falls
back exactly with a warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import rel_err
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import nnsim
from nnsim import outputs

torch.set_num_threads(1)
N = 4


def _kernels(model: nn.Module, x, output, tol: float = 1e-10) -> nnsim.Similarity:
    """The kernel twice on one Similarity against the loop oracle; returns the Similarity (for describe)."""
    ref = nnsim.Similarity(model, output=output, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, output=output, progress=False)
    for _ in range(2):
        assert rel_err(sim.kernel(x), ref) <= tol
    return sim


def _specs(d: int):
    return outputs.logits() if d == 3 else (lambda o, i: o.logits[:, 1:2])


# ------------------------------------------------------------------ Hugging Face
transformers = pytest.importorskip("transformers")


def _convnext() -> tuple[nn.Module, dict]:
    cfg = transformers.ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                                      image_size=16)
    x = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return transformers.ConvNextForImageClassification(cfg), {"pixel_values": x}


def _wav2vec2() -> tuple[nn.Module, dict]:
    cfg = transformers.Wav2Vec2Config(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=24, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
                                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, num_labels=3,
                                      classifier_proj_size=8, mask_time_prob=0.0)
    x = torch.randn(N, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return transformers.Wav2Vec2ForSequenceClassification(cfg), {"input_values": x}


@pytest.mark.parametrize("d", [1, 3])
def test_hf_convnext_channels_first_layernorms_on_the_norm_rule(d):
    torch.manual_seed(0)
    model, x = _convnext()
    model = model.double().eval()
    norms = [n for n, m in model.named_modules() if getattr(m, "data_format", None) == "channels_first"]
    assert {"convnext.embeddings.layernorm", "convnext.encoder.stages.1.downsampling_layer.0"} <= set(norms)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        plan = _kernels(model, x, _specs(d)).describe()
    assert all(plan[n] == "norm" for n in norms), plan
    assert not [v for v in plan.values() if v.startswith(("fallback", "functorch", "loop"))], plan


def _other_channels_first(name: str) -> tuple[nn.Module, dict]:
    if name == "convnextv2":
        cfg = transformers.ConvNextV2Config(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                            num_labels=3, image_size=16)
        x = torch.randn(N, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return transformers.ConvNextV2ForImageClassification(cfg), {"pixel_values": x}
    # SqueezeBERT's LayerNorm normalises axis 1 of [B, C, T] and says so only through the input's shape
    cfg = transformers.SqueezeBertConfig(vocab_size=30, hidden_size=16, embedding_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=24, max_position_embeddings=16,
                                         num_labels=3, q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1,
                                         intermediate_groups=1, output_groups=1)
    ids = torch.randint(1, 30, (N, 6), generator=torch.Generator().manual_seed(0))
    return transformers.SqueezeBertForSequenceClassification(cfg), {"input_ids": ids}


@pytest.mark.parametrize("name", ["convnextv2", "squeezebert"])
def test_other_channels_first_layernorms_on_the_norm_rule(name):
    torch.manual_seed(0)
    model, x = _other_channels_first(name)
    model = model.double().eval()
    plan = _kernels(model, x, outputs.logits()).describe()
    norms = [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(plan[n] == "norm" for n in norms), plan


@pytest.mark.parametrize("d", [1, 3])
def test_hf_wav2vec2_weight_normed_conv_on_the_conv_rule(d):
    torch.manual_seed(0)
    model, x = _wav2vec2()
    model = model.double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        plan = _kernels(model, x, _specs(d)).describe()
    assert plan["wav2vec2.encoder.pos_conv_embed.conv"] == "conv (parametrized)"
    assert not [k for k, v in plan.items() if v.startswith(("fallback", "functorch", "loop"))], plan


# ------------------------------------------------------------------ hand-written parametrizations
class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(4 * 6, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.conv(x)).flatten(1))))


class Symmetric(nn.Module):
    def forward(self, X: Tensor) -> Tensor:
        return X.triu() + X.triu(1).T


class ScaledRows(nn.Module):
    """Two originals (a direction and per-row log-scales, from right_inverse) and a parameter of its own."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, rows)[:, None])

    def forward(self, v: Tensor, log_s: Tensor) -> Tensor:
        return self.gain * log_s.exp() * v / v.norm(dim=1, keepdim=True)

    def right_inverse(self, W: Tensor) -> tuple[Tensor, Tensor]:
        return W, W.norm(dim=1, keepdim=True).log()


class Affine(nn.Module):  # for a parametrized bias
    def forward(self, b: Tensor) -> Tensor:
        return 2.0 * b + torch.sin(b)


def _x(shape=(N, 2, 8)) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _params(model: nn.Module, layer: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(layer + ".")}


def _case(name: str) -> tuple[nn.Module, dict[str, str]]:
    """A model and the rule each parametrized layer must use."""
    torch.manual_seed(0)
    m = ConvNet()
    if name == "weight_norm":
        weight_norm(m.conv, dim=0)
        weight_norm(m.fc)
        want = {"conv": "conv (parametrized)", "fc": "linear (parametrized)"}
    elif name == "hook_weight_norm":  # the deprecated torch.nn.utils.weight_norm (HF EnCodec, DAC, HiFi-GAN)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            nn.utils.weight_norm(m.conv)
            nn.utils.weight_norm(m.fc, dim=None)
        want = {"conv": "conv (parametrized)", "fc": "linear (parametrized)"}
    elif name == "spectral_norm":
        spectral_norm(m.fc)
        spectral_norm(m.conv)
        want = {"conv": "conv (parametrized)", "fc": "linear (parametrized)"}
    elif name == "orthogonal":
        m.head = nn.Linear(5, 5)
        orthogonal(m.head)
        m = nn.Sequential(m, nn.Linear(5, 3))
        want = {"0.head": "linear (parametrized)"}
    else:  # custom: a symmetric weight, a multi-original one with its own parameter, a parametrized bias
        m.head = nn.Linear(5, 5)
        parametrize.register_parametrization(m.head, "weight", Symmetric())
        parametrize.register_parametrization(m.fc, "weight", ScaledRows(5))
        parametrize.register_parametrization(m.fc, "bias", Affine())
        m = nn.Sequential(m, nn.Linear(5, 3))
        want = {"0.head": "linear (parametrized)", "0.fc": "linear (parametrized)"}
    return m.double().eval(), want


@pytest.mark.parametrize("d", [1, 3])
@pytest.mark.parametrize("name", ["weight_norm", "hook_weight_norm", "spectral_norm", "orthogonal", "custom"])
def test_parametrized_modules_on_their_rules(name, d):
    model, want = _case(name)
    if name == "custom":  # every parameter of the lists (originals and the parametrization's own) is analysed
        assert {"0.fc.parametrizations.weight.original0", "0.fc.parametrizations.weight.original1",
                "0.fc.parametrizations.weight.0.gain", "0.fc.parametrizations.bias.original"} <= _params(model, "0.fc")
    output = None if d == 3 else (lambda y, x: y[:, 1:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        plan = _kernels(model, _x(), output).describe()
    assert {k: plan[k] for k in want} == want
    assert not [v for v in plan.values() if v.startswith(("fallback", "functorch", "loop"))], plan


class Flipped(nn.Module):
    def forward(self, X: Tensor) -> Tensor:
        return X + 0.1 * X.flip(0)


class Attention(nn.Module):
    """Parametrized tensors read by a parent's functional code (MultiheadAttention's in_proj_weight and its
    never-called out_proj's weight), an Embedding and a LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.ln = nn.LayerNorm(8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)
        weight_norm(self.emb)
        parametrize.register_parametrization(self.ln, "weight", Flipped())
        parametrize.register_parametrization(self.att, "in_proj_weight", Flipped())
        weight_norm(self.att.out_proj)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln(self.emb(x))
        return self.fc(self.att(h, h, h)[0].mean(1))


@pytest.mark.parametrize("d", [1, 3])
def test_parametrized_attention_embedding_and_norm_on_their_rules(d):
    torch.manual_seed(0)
    model = Attention().double().eval()
    assert "att.out_proj.parametrizations.weight.original1" in dict(model.named_parameters())
    x = torch.randint(0, 10, (N, 5), generator=torch.Generator().manual_seed(0))
    output = None if d == 3 else (lambda y, i: y[:, 1:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        plan = _kernels(model, x, output).describe()
    assert plan == {"emb": "embedding (parametrized)", "ln": "norm (parametrized)",
                    "att": "multihead_attention (parametrized)", "fc": "linear"}


class _Opaque(torch.autograd.Function):  # no setup_context / vmap support: torch.func cannot run it
    @staticmethod
    def forward(ctx, X: Tensor) -> Tensor:
        ctx.save_for_backward(X)
        return X * X

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (X,) = ctx.saved_tensors
        return 2 * X * g


class Squared(nn.Module):
    def forward(self, X: Tensor) -> Tensor:
        return _Opaque.apply(X)


def test_a_parametrization_torch_func_cannot_run_falls_back_exactly():
    torch.manual_seed(0)
    model = ConvNet()
    parametrize.register_parametrization(model.fc, "weight", Squared(), unsafe=True)
    model = model.double().eval()
    with pytest.warns(nnsim.FallbackWarning, match=r"module 'fc' \(ParametrizedLinear\) raised"):
        plan = _kernels(model, _x(), None).describe()
    assert plan["fc"].startswith("fallback") and plan["conv"] == "conv"


def test_parametrized_factors_name_the_loop_backends_layers():
    model, _ = _case("weight_norm")
    x = _x()
    sims = [nnsim.Similarity(model, backend=b, progress=False) for b in ("loop", "structured")]
    per = [s.kernel(x, by="layer") for s in sims]
    keys = [set(p) for p in per]
    assert keys[0] == keys[1] and {"conv", "conv.parametrizations.weight"} <= keys[0]
    for k in keys[0]:
        assert rel_err(per[1][k], per[0][k]) <= 1e-10


# ------------------------------------------------------------------ RMSNorms of Llama-style models (float32)
def _llama_like(name: str) -> nn.Module:
    common = dict(vocab_size=30, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, num_labels=3, pad_token_id=0)
    cls, cfg = {"llama": ("LlamaForSequenceClassification", "LlamaConfig"),
                "qwen2": ("Qwen2ForSequenceClassification", "Qwen2Config"),
                "mistral": ("MistralForSequenceClassification", "MistralConfig"),
                "gemma": ("GemmaForSequenceClassification", "GemmaConfig")}[name]
    extra = {"head_dim": 4} if name == "gemma" else {}
    return getattr(transformers, cls)(getattr(transformers, cfg)(**common, **extra))


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma"])
def test_llama_style_rmsnorms_on_the_norm_rule_in_float32(name):
    torch.manual_seed(0)
    model = _llama_like(name).eval()
    ids = torch.randint(1, 30, (N, 6), generator=torch.Generator().manual_seed(0))
    sim = _kernels(model, {"input_ids": ids}, outputs.logits(), tol=1e-4)
    norms = [n for n, m in model.named_modules() if "RMSNorm" in type(m).__name__]
    assert len(norms) == 3
    plan = sim.describe()
    assert all(plan[n] == "norm" for n in norms), plan


@pytest.mark.parametrize("name", ["llama", "qwen2", "mistral", "gemma"])
def test_float32_computing_rmsnorms_in_a_float64_model(name):
    """Their x_hat is computed in float32 (the model's own rounding): Llama, Qwen2 and Mistral multiply the weight
    in float64 afterwards, which the rule reproduces exactly; Gemma multiplies and reduces the weight's gradient in
    float32 too, which the rule does not emulate: its RMSNorms take the exact fallback."""
    torch.manual_seed(0)
    model = _llama_like(name).double().eval()
    ids = torch.randint(1, 30, (N, 6), generator=torch.Generator().manual_seed(0))
    plan = _kernels(model, {"input_ids": ids}, outputs.logits()).describe()
    norms = [n for n, m in model.named_modules() if "RMSNorm" in type(m).__name__]
    want = "fallback" if name == "gemma" else "norm"
    assert all(plan[n] == want for n in norms), plan


def test_similarity_loss_through_weight_norm_matches_finite_differences():
    """The differentiable criterion's gradient through a weight-normed layer, against central differences of the
    criterion itself. The chain uses weight_norm's decomposed formula; torch's fused kernel (what autograd through
    the model, and so the functorch backend, uses) has a wrong double backward on CPU (its gradgradcheck fails)."""
    model, _ = _case("weight_norm")
    x, pairs = _x(), torch.tensor([[0, 1], [2, 3]])
    reg = nnsim.SimilarityLoss(model, backend="structured")
    for p in (model.fc.parametrizations.weight.original1, model.conv.parametrizations.weight.original0):
        D = torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype)
        (g,) = torch.autograd.grad(reg(x, pairs), [p])
        eps, losses = 1e-6, []
        with torch.no_grad():
            for s in (1, -2, 1):
                p += s * eps * D
                losses.append(float(reg(x, pairs)))
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert abs(float((g * D).sum()) - fd) <= 1e-6 * max(abs(fd), 1e-3)


def test_t5_layernorm_with_float32_statistics_in_a_float64_model():
    """T5LayerNorm computes only the variance in float32 (promoted back in the product): on the norm rule."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=30, d_model=16, d_kv=4, d_ff=24, num_layers=1, num_heads=2,
                                relative_attention_num_buckets=8)
    model = transformers.T5EncoderModel(cfg).double().eval()
    ids = torch.randint(1, 30, (N, 6), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", nnsim.FallbackWarning)  # its relative-attention embedding: not a norm
        plan = _kernels(model, {"input_ids": ids}, lambda o, i: o.last_hidden_state[:, 0, :3]).describe()
    norms = [n for n, m in model.named_modules() if type(m).__name__ == "T5LayerNorm"]
    assert len(norms) == 3 and all(plan[n] == "norm" for n in norms), plan
