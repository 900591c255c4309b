"""Real architectures against the per-sample loop oracle, in float64: Hugging Face ``transformers`` models
built from tiny configs (no weights downloaded) with keyword inputs and ``ModelOutput`` results,
nn.TransformerEncoder (batch_first both ways), and blocks with free parameters (class token, position table,
layer scale). Each is called twice on the same Similarity, at d = 1 and d > 1, with density and neighbours
checked against the oracle's similarities, and ``describe()`` showing which layers use which rule."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import rel_err
from torch import Tensor, nn

import nnsim
from nnsim import outputs

transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)
N, T, V = 4, 5, 30


def _ids(n: int = N, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    mask[1, 3:] = 0  # a padded sample
    return {"input_ids": ids, "attention_mask": mask}


def bert(impl: str = "eager") -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, num_labels=3,
                                  attn_implementation=impl)
    return transformers.BertForSequenceClassification(cfg)


def distilbert() -> nn.Module:
    cfg = transformers.DistilBertConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, hidden_dim=24,
                                        max_position_embeddings=16, num_labels=3, attn_implementation="eager")
    return transformers.DistilBertForSequenceClassification(cfg)


def gpt2(impl: str = "eager") -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=16, num_labels=3,
                                  pad_token_id=0, bos_token_id=0, eos_token_id=0, attn_implementation=impl)
    return transformers.GPT2ForSequenceClassification(cfg)


def vit(impl: str = "eager") -> nn.Module:
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=24, num_labels=3, attn_implementation=impl)
    return transformers.ViTForImageClassification(cfg)


class EncoderClassifier(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(V, 8)
        layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)
        h = self.enc(h if self.batch_first else h.transpose(0, 1))
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(1))


class TinyViT(nn.Module):
    """Patch embedding, class token and position table used directly by the root's forward, a layer-scaled
    MLP block (ConvNeXt / CaiT style) and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8) * 0.5)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.5)
        self.block = LayerScaleBlock(8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, 8]
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.block(h))[:, 0])


class LayerScaleBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5) + 0.1 * torch.randn(c))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.gamma * self.fc2(torch.tanh(self.fc1(self.ln(h))))


def _images(n: int = N, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, 8, 8, generator=g, dtype=torch.float64)}


ZOO = {
    "bert": (bert, _ids),
    "bert_sdpa": (lambda: bert("sdpa"), _ids),
    "distilbert": (distilbert, _ids),
    "gpt2": (gpt2, _ids),
    "vit": (vit, _images),
    "encoder_batch_first": (lambda: EncoderClassifier(True), lambda: (_ids()["input_ids"],)),
    "encoder_seq_first": (lambda: EncoderClassifier(False), lambda: (_ids()["input_ids"],)),
    "tiny_vit_free_params": (TinyViT, lambda: (_images()["pixel_values"],)),
}


def _build(name: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    make, inputs = ZOO[name]
    return make().double().eval(), inputs()


def _modules_of(model: nn.Module, cls: type) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is cls]


@pytest.mark.parametrize("name", list(ZOO))
@pytest.mark.parametrize("output", [None, "scalar"])
def test_zoo_exact_twice_with_density_and_neighbors(name, output):
    model, x = _build(name)
    spec = outputs.logits() if output is None else outputs.logits(target=1)  # d = 3 or d = 1
    loop = nnsim.Similarity(model, output=spec, backend="loop", progress=False)
    ref = loop.kernel(x)
    assert ref.shape == (N, N, 3, 3) if output is None else (N, N, 1, 1)
    sim = nnsim.Similarity(model, output=spec, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rule of these models may fail (FallbackWarning is an error here)
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10
        S = loop.similarity(x)
        assert torch.allclose(sim.density(x), S.sum(1), atol=1e-9)
        vals, idx = sim.neighbors(x, k=2)
    assert torch.allclose(vals, S.topk(2, dim=1).values, atol=1e-9)
    assert torch.allclose(S.gather(1, idx), vals, atol=1e-9)


def _plan(name: str) -> tuple[nn.Module, dict[str, str]]:
    model, x = _build(name)
    sim = nnsim.Similarity(model, output=outputs.logits(), progress=False)
    sim.kernel(x)
    return model, sim.describe()


@pytest.mark.parametrize("name", ["bert", "distilbert", "gpt2", "vit"])
def test_hf_layers_use_their_rules(name):
    model, plan = _plan(name)
    expected = {nn.Linear: "linear", nn.Embedding: "embedding", nn.LayerNorm: "norm", nn.Conv2d: "conv"}
    checked = 0
    for cls, rule in expected.items():
        for layer in _modules_of(model, cls):
            assert plan[layer] == rule, (layer, plan)
            checked += 1
    if name == "vit":  # ViTEmbeddings' class token and position table: from the operations that use them
        assert plan["vit.embeddings"] == "free parameters"
    if name == "gpt2":
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        assert conv1d and all(plan[n] == "conv1d_transposed" for n in conv1d)
    assert checked >= 5
    assert not any(v.startswith(("functorch", "loop")) for v in plan.values()), plan


def test_free_parameters_keep_the_children_rules():
    model, plan = _plan("tiny_vit_free_params")
    # the class token, position table and layer scale: from the few operations that use them
    assert plan[""] == "free parameters" and plan["block"] == "free parameters"
    assert plan["patch"] == "conv" and plan["head"] == "linear" and plan["norm"] == "norm"
    assert plan["block.fc1"] == "linear" and plan["block.fc2"] == "linear" and plan["block.ln"] == "norm"


@pytest.mark.parametrize("name", ["encoder_batch_first", "encoder_seq_first"])
def test_transformer_encoder_submodules_use_rules(name):
    model, plan = _plan(name)
    for layer in ["enc.layers.0.linear1", "enc.layers.0.linear2", "head"]:
        assert plan[layer] == "linear", plan
    assert plan["enc.layers.0.norm1"] == "norm" and plan["emb"] == "embedding"


def test_padded_tokens_change_nothing_on_bert():
    model, x = _build("bert")
    sim = nnsim.Similarity(model, output=outputs.logits(), progress=False)
    K = sim.kernel(x)
    y = dict(x)
    y["input_ids"] = x["input_ids"].clone()
    y["input_ids"][1, 3:] = (x["input_ids"][1, 3:] + 7) % V  # other tokens where the mask is 0
    assert not torch.equal(y["input_ids"], x["input_ids"])
    assert torch.allclose(sim.kernel(y), K, atol=1e-12 * float(K.abs().max()))
    z = dict(x)
    z["input_ids"] = x["input_ids"].clone()
    z["input_ids"][1, 0] = (x["input_ids"][1, 0] + 7) % V  # an attended token does change the kernel
    assert not torch.allclose(sim.kernel(z), K, atol=1e-6)


def test_batch_encoding_and_chunking_and_model_output():
    model, x = _build("bert")
    enc = transformers.BatchEncoding(x)
    ref = nnsim.Similarity(model, backend="loop", output=outputs.logits(), progress=False).similarity(x)
    sim = nnsim.Similarity(model, output=lambda out, inputs: out.logits * inputs["attention_mask"][:, :1],
                           chunk_size=3, progress=False)
    assert torch.allclose(sim.similarity(enc), ref, atol=1e-10)
    assert torch.allclose(nnsim.Similarity(model, progress=False, chunk_size=3).similarity(enc), ref, atol=1e-10)
    loader = torch.utils.data.DataLoader([{k: v[i] for k, v in x.items()} for i in range(N)], batch_size=3)
    assert torch.allclose(nnsim.Similarity(model, progress=False).similarity(loader), ref, atol=1e-10)


def test_model_output_without_logits_is_a_clear_error():
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> dict:
            return {"hidden": self.lin(x)}

    sim = nnsim.Similarity(Hidden().double(), progress=False)
    with pytest.raises(nnsim.ModelError, match="logits"):
        sim.kernel(torch.randn(3, 3, dtype=torch.float64))
    x = {"input_ids": torch.randint(0, V, (3, T)), "attention_mask": [1, 1, 1]}
    with pytest.raises(nnsim.InputError, match="not tensors"):
        nnsim.Similarity(bert().double(), progress=False).kernel(x)


def test_similarity_loss_takes_keyword_inputs():
    """The criterion on a mapping input equals 1 - the oracle's similarity of the pairs, and back-propagates."""
    model, x = _build("bert")
    pairs = torch.tensor([[0, 1], [2, 3]])
    S = nnsim.Similarity(model, output=outputs.logits(), backend="loop", progress=False).similarity(x)
    reg = nnsim.SimilarityLoss(model, output=outputs.logits())
    loss = reg(x, pairs)
    assert torch.allclose(loss.detach(), (1 - S[pairs[:, 0], pairs[:, 1]]).mean(), atol=1e-10)
    (g,) = torch.autograd.grad(loss, [model.classifier.weight])
    assert torch.isfinite(g).all() and float(g.abs().max()) > 0


def test_similarity_loss_with_free_parameters_matches_functorch():
    """In the criterion's double-backward pass free parameters take the (differentiable) module fallback."""
    model, x = _build("tiny_vit_free_params")
    pairs = torch.tensor([[0, 1], [2, 3], [1, 2]])
    out = []
    for backend in ("structured", "functorch"):
        loss = nnsim.SimilarityLoss(model, output=outputs.logits(), backend=backend)(x, pairs)
        out.append((loss.detach(), torch.autograd.grad(loss, [model.cls_token, model.block.gamma, model.head.weight])))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-10)
    for a, b in zip(out[0][1], out[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-9)
