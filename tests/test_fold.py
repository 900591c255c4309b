"""Modules called on a batch folded with another axis, [B*k, ...] (HF OPT's [B*T, C] feed-forward, Swin's
[B*nW, N, C] windows, MobileViT's [B*P, N, C] patches): their rules see the B*k rows as samples and the factors
are folded back to the B samples. Against the per-sample loop oracle in float64, each Similarity called twice,
d = 3 and d = 1; ``describe()`` shows the folded layers on their rules. A fold whose rows are not sample-major
(time-major, row j*B + b) must still be exact: the plan's check sends its parameters to the exact fallback,
with a FallbackWarning."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import rel_err
from torch import Tensor, nn

import nnsim
from nnsim import outputs
from nnsim.errors import FallbackWarning
from nnsim.factors import Dense, Outer

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
N, T, V = 4, 6, 30


def _ids() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 4:] = 0  # a padded sample
    return {"input_ids": torch.randint(2, V, (N, T), generator=g), "attention_mask": mask}


def _images(size: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(N, 3, size, size, generator=g, dtype=torch.float64)}


def opt() -> nn.Module:
    cfg = transformers.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=24,
                                 max_position_embeddings=32, word_embed_proj_dim=16, num_labels=3, pad_token_id=1)
    return transformers.OPTForSequenceClassification(cfg)


def swin() -> nn.Module:
    # two blocks in the first stage: the second one shifts its windows (its attention mask meets the bias too)
    cfg = transformers.SwinConfig(image_size=16, patch_size=2, num_channels=3, embed_dim=8, depths=[2, 1],
                                  num_heads=[2, 2], window_size=4, num_labels=3)
    return transformers.SwinForImageClassification(cfg)


def mobilevit() -> nn.Module:
    cfg = transformers.MobileViTConfig(image_size=32, patch_size=2, num_channels=3, hidden_sizes=[16, 16, 16],
                                       neck_hidden_sizes=[8, 8, 8, 8, 8, 8, 16], num_labels=3)
    model = transformers.MobileViTForImageClassification(cfg)
    # Its initialisation (weights of std 0.02, BatchNorm with unit running variance) scales every stage down by
    # ~1e-2: the outputs would not depend on the sample. Scale-preserving weights and norms of about one instead.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
    return model


HF = {
    "opt": (opt, _ids, ["fc1", "fc2", "final_layer_norm"]),
    "swin": (swin, lambda: _images(16), ["attention.q_proj", "mlp.fc1", "layernorm_before"]),
    "mobilevit": (mobilevit, lambda: _images(32), ["transformer.layer.0.intermediate.dense",
                                                   "transformer.layer.0.layernorm_before"]),
}


def _build(name: str) -> tuple[nn.Module, dict[str, Tensor]]:
    torch.manual_seed(0)
    make, inputs, _ = HF[name]
    return make().double().eval(), inputs()


def _folded_params(model: nn.Module, name: str) -> list[str]:
    """The parameters of the folded layers (and Swin's relative position tables): a kernel of their own, so that
    an error in them is not lost next to larger gradients of other layers."""
    keys = HF[name][2] + ["relative_position_bias_table"]
    return [n for n, _ in model.named_parameters() if any(k in n for k in keys)]


@pytest.mark.parametrize("name", list(HF))
@pytest.mark.parametrize("output", [None, "scalar"])
def test_hf_folded_models_exact_twice(name, output):
    model, x = _build(name)
    spec = outputs.logits() if output is None else outputs.logits(target=1)  # d = 3 or d = 1
    for params in (None, _folded_params(model, name)):
        ref = nnsim.Similarity(model, output=spec, params=params, backend="loop", progress=False).kernel(x)
        assert rel_err(ref[0, 1], ref[0, 0]) > 1e-3  # the samples differ: a fold that mixes them is seen
        sim = nnsim.Similarity(model, output=spec, params=params, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            for _ in range(2):
                assert rel_err(sim.kernel(x), ref) <= 1e-10


@pytest.mark.parametrize("name", list(HF))
def test_hf_folded_layers_use_their_rules(name):
    model, x = _build(name)
    sim = nnsim.Similarity(model, output=outputs.logits(), progress=False)
    sim.kernel(x)
    plan = sim.describe()
    expected = {nn.Linear: "linear", nn.LayerNorm: "norm"}
    layers = [(n, expected[type(m)]) for n, m in model.named_modules() if type(m) in expected]
    assert len(layers) >= 6
    for layer, rule in layers:
        assert plan[layer] == rule, (layer, plan)
    for key in HF[name][2]:  # the folded ones among them
        assert any(key in layer for layer, _ in layers)
    if name == "swin":  # the tables indexed in the bias module, added to the scores of the B*nW windows
        bias = [n for n, m in model.named_modules() if type(m).__name__ == "SwinRelativePositionBias"]
        assert len(bias) == 3 and all(plan[n] == "free parameters" for n in bias), plan
    assert not any(v.startswith(("functorch", "loop")) for v in plan.values()), plan


class FoldedMLP(nn.Module):
    """A Linear and a LayerNorm on [B*T, C] (sample-major, or time-major: row j*B + b), a Conv2d on [B*2, C, H, W]."""

    def __init__(self, time_major: bool = False) -> None:
        super().__init__()
        self.time_major = time_major
        self.emb = nn.Linear(3, 8)
        self.fc = nn.Linear(8, 6)
        self.ln = nn.LayerNorm(6)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(6 + 3 * 16, 2)

    def forward(self, x: Tensor) -> Tensor:  # [B, 16, 3]
        B, L, _ = x.shape
        h = torch.tanh(self.emb(x))
        rows = h.transpose(0, 1).reshape(L * B, 8) if self.time_major else h.reshape(B * L, 8)
        z = self.ln(torch.tanh(self.fc(rows)))
        z = z.view(L, B, 6).transpose(0, 1) if self.time_major else z.view(B, L, 6)
        img = x[:, :, :2].reshape(B, L // 4, 4, 2).permute(0, 3, 1, 2)  # [B, 2, 4, 4]
        two = torch.stack([img, img.flip(-1)], 1).reshape(B * 2, 2, L // 4, 4)
        c = torch.tanh(self.conv(two)).view(B, 2, -1).sum(1)
        return self.head(torch.cat([(z * z).mean(1), c], 1))


class RelativeBias(nn.Module):
    """A table indexed into a batch-shared [1, heads, n, n] bias (as Swin's), which the parent adds to the
    scores of its B*nW windows: expanding it to B would break the model."""

    def __init__(self, heads: int, n: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))
        self.register_buffer("index", torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1)

    def forward(self) -> Tensor:
        return self.table[self.index].permute(2, 0, 1).unsqueeze(0)


class WindowAttention(nn.Module):
    """[B, 8, 4] in windows of 4 tokens, [B*2, 4, 4]; a per-head scale used by the root on the folded scores."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.bias = RelativeBias(2, 4)
        self.scale = nn.Parameter(torch.rand(2, 1, 1) + 0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        w = x.reshape(B * 2, 4, 4)
        q, k, v = self.qkv(w).view(B * 2, 4, 3, 2, 2).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) * self.scale + self.bias()
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, 8, 4)
        return self.head(torch.tanh(o).mean(1))


def _kernels(model: nn.Module, x: Tensor) -> tuple[Tensor, nnsim.Similarity, list]:
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10
    return ref, sim, [w for w in caught if issubclass(w.category, FallbackWarning)]


def test_sample_major_fold_on_the_rules():
    torch.manual_seed(0)
    _, sim, caught = _kernels(FoldedMLP().double(), torch.randn(5, 16, 3, dtype=torch.float64))
    assert not caught
    assert sim.describe() == {"emb": "linear", "fc": "linear", "ln": "norm", "conv": "conv", "head": "linear"}


def test_time_major_fold_is_caught_and_exact():
    torch.manual_seed(0)
    _, sim, caught = _kernels(FoldedMLP(time_major=True).double(), torch.randn(5, 16, 3, dtype=torch.float64))
    plan = sim.describe()
    assert plan["fc.weight"].startswith("functorch (exact") and plan["fc.bias"].startswith("functorch (exact")
    assert plan["emb"] == "linear" and plan["conv"] == "conv" and plan["head"] == "linear"
    messages = [str(w.message) for w in caught]
    assert any("'fc'" in m and "folded" in m for m in messages), messages


def test_free_parameters_on_a_folded_batch():
    torch.manual_seed(0)
    model = WindowAttention().double()
    x = torch.randn(5, 8, 4, dtype=torch.float64)
    for params in (None, ["bias.table", "scale"]):
        ref = nnsim.Similarity(model, params=params, backend="loop", progress=False).kernel(x)
        sim = nnsim.Similarity(model, params=params, progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            for _ in range(2):
                assert rel_err(sim.kernel(x), ref) <= 1e-10
    assert sim.describe() == {"": "free parameters", "bias": "free parameters"}


class BucketWindowAttention(nn.Module):
    """Both at once: T5's bucketed bias (an Embedding on buckets [n, n] shared by the batch, whose rule raises
    NoBatchAxis) added, permuted to [H, n, n] with H = 2 = the small probe's batch size, to the scores of
    Swin-like windows [B*2, H, n, n] (a folded batch) whose projection is a folded call."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.bias, self.head = nn.Linear(4, 12), nn.Embedding(7, 2), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        B = x.shape[0]
        q, k, v = self.qkv(x.reshape(B * 2, 4, 4)).view(B * 2, 4, 3, 2, 2).permute(2, 0, 3, 1, 4)
        buckets = torch.arange(4)[None, :] - torch.arange(4)[:, None] + 3  # [n, n], no batch axis
        s = q @ k.transpose(-1, -2) + self.bias(buckets).permute(2, 0, 1)
        o = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, 8, 4)
        return self.head(torch.tanh(o).mean(1))


def test_a_batch_shared_embedding_meets_a_folded_batch():
    torch.manual_seed(0)
    _, sim, caught = _kernels(BucketWindowAttention().double(), torch.randn(5, 8, 4, dtype=torch.float64))
    assert not caught, [str(w.message) for w in caught]
    assert sim.describe() == {"qkv": "linear", "bias": "free parameters", "head": "linear"}


def test_fold_of_factors_sums_each_samples_rows():
    g = torch.Generator().manual_seed(0)
    B, k, d, G, L, n, m = 3, 4, 2, 1, 2, 3, 5
    a = torch.randn(B * k, G, L, m, generator=g, dtype=torch.float64)
    delta = torch.randn(B * k, d, G, L, n, generator=g, dtype=torch.float64)
    rows = Outer("l", a, delta, ("w", torch.Size([n, m])))
    # oracle: each row's explicit gradient sum_t delta_t a_t^T, summed over the rows of its sample
    per_row = torch.einsum("rcgtn,rgtm->rcnm", delta, a).reshape(B, k, d, n * m)
    expected = per_row.sum(1)
    assert torch.allclose(rows.folded(B).dense().g, expected, atol=1e-12)
    assert torch.allclose(rows.dense().folded(B).g, expected, atol=1e-12)
    folded = rows.folded(B)
    assert folded.batch_size == B and folded.positions == k * L
    K = torch.einsum("icn,jen->icje", expected, expected)  # the [B1, d, B2, d] layout of a factor's gram
    assert torch.allclose(folded.gram(folded, "full"), K, atol=1e-10)
    dense = Dense("l", torch.randn(B * k, d, 7, generator=g, dtype=torch.float64), [("w", torch.Size([7]))])
    assert torch.allclose(dense.folded(B).g, dense.g.view(B, k, d, 7).sum(1))


class SharedAcrossFolds(nn.Module):
    """One Linear called on [B*6, C], [B*2, C] and [B, C] in the same pass."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:  # [B, 6, 4]
        B = x.shape[0]
        a = torch.tanh(self.fc(x.reshape(B * 6, 4))).view(B, 6, 3).mean(1)
        b = torch.tanh(self.fc(x[:, :2].reshape(B * 2, 4))).view(B, 2, 3).mean(1)
        return self.head(a * b + torch.tanh(self.fc(x[:, 0])))


def test_module_called_on_several_folds():
    torch.manual_seed(0)
    _, sim, caught = _kernels(SharedAcrossFolds().double(), torch.randn(5, 6, 4, dtype=torch.float64))
    assert not caught
    assert sim.describe() == {"fc": "linear", "head": "linear"}


def test_similarity_loss_through_folded_layers():
    # the factors stay in the autograd graph (double backward): against the torch.func backend's gradients
    torch.manual_seed(0)
    model = SharedAcrossFolds().double()
    x = torch.randn(6, 6, 4, dtype=torch.float64)
    pairs = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 4]])
    grads = []
    for backend in ("structured", "functorch"):
        model.zero_grad()
        nnsim.SimilarityLoss(model, backend=backend)(x, pairs).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.fc.parameters()]))
    assert float(grads[1].norm()) > 0 and rel_err(grads[0], grads[1]) <= 1e-10
