"""More Hugging Face families against the per-sample loop oracle, in float64, from tiny configs (no weights
downloaded): Llama-style decoders (rotary embeddings, grouped-query attention, RMSNorm, gated MLP; eager and
SDPA attention), ALBERT (one layer's weights shared by every layer), RoBERTa and ELECTRA (padding-offset
positions, a projected embedding), BLOOM (ALiBi), GPT-NeoX and Phi (partial rotary, parallel blocks), DeiT
(two special tokens) and a Hugging Face ResNet. Each is called twice on the same Similarity, at d = 1 and
d = 3, and ``describe()`` must show every Linear, Embedding and (non-RMS) norm on its rule."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import rel_err
from torch import Tensor, nn

import nnsim
from nnsim import outputs

tf = pytest.importorskip("transformers")
torch.set_num_threads(1)
N, T, V = 4, 6, 30


def _ids() -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (N, T), generator=g)
    mask = torch.ones(N, T, dtype=torch.long)
    mask[1, 4:] = 0  # a padded sample
    return {"input_ids": ids, "attention_mask": mask}


def _images(size: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(N, 3, size, size, generator=g, dtype=torch.float64)}


def _decoder(config_cls: type, model_cls: type, **kw: object) -> nn.Module:
    cfg = config_cls(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
                     max_position_embeddings=32, num_labels=3, pad_token_id=0, **kw)
    return model_cls(cfg)


FAMILIES = {
    "llama": lambda: _decoder(tf.LlamaConfig, tf.LlamaForSequenceClassification, num_key_value_heads=2,
                              attn_implementation="eager"),
    "llama_sdpa": lambda: _decoder(tf.LlamaConfig, tf.LlamaForSequenceClassification, num_key_value_heads=2,
                                   attn_implementation="sdpa"),
    "qwen2": lambda: _decoder(tf.Qwen2Config, tf.Qwen2ForSequenceClassification, num_key_value_heads=2),
    "mistral": lambda: _decoder(tf.MistralConfig, tf.MistralForSequenceClassification, num_key_value_heads=2),
    "phi": lambda: _decoder(tf.PhiConfig, tf.PhiForSequenceClassification),
    "gpt_neox": lambda: _decoder(tf.GPTNeoXConfig, tf.GPTNeoXForSequenceClassification),
    "bloom": lambda: tf.BloomForSequenceClassification(tf.BloomConfig(vocab_size=V, hidden_size=16, n_layer=1,
                                                                      n_head=2, num_labels=3, pad_token_id=0)),
    "albert": lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(
        vocab_size=V, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=3)),
    "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(
        vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=20, num_labels=3, pad_token_id=0)),
    "electra": lambda: tf.ElectraForSequenceClassification(tf.ElectraConfig(
        vocab_size=V, embedding_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=3)),
    "deit": lambda: tf.DeiTForImageClassification(tf.DeiTConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, num_labels=3)),
    "resnet": lambda: tf.ResNetForImageClassification(tf.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3)),
}
INPUTS = {"deit": lambda: _images(8), "resnet": lambda: _images(16)}
RULES = {nn.Linear: "linear", nn.Embedding: "embedding", nn.LayerNorm: "norm", nn.Conv2d: "conv",
         nn.BatchNorm2d: "norm"}


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("d", [1, 3])
def test_family_exact_twice_on_its_rules(name, d):
    torch.manual_seed(0)
    model = FAMILIES[name]().double().eval()
    x = INPUTS.get(name, _ids)()
    spec = outputs.logits() if d == 3 else outputs.logits(target=2)
    ref = nnsim.Similarity(model, output=spec, backend="loop", progress=False).kernel(x)
    assert ref.shape == (N, N, d, d)
    sim = nnsim.Similarity(model, output=spec, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)  # no rule of these models may fail
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10
    plan = sim.describe()
    checked = [(n, RULES[type(m)]) for n, m in model.named_modules() if type(m) in RULES]
    assert len(checked) >= 4
    for layer, rule in checked:
        assert plan[layer] == rule, (layer, plan[layer])
    assert not any(v.startswith(("functorch", "loop")) for v in plan.values()), plan


def test_float64_llama_with_ten_outputs_is_verified_on_its_rules():
    """Llama's RMSNorm computes in float32 inside a float64 model: a random combination of the 10 outputs,
    backpropagated through it, is rounded at 1e-7, so planning must check the outputs one by one (before, it
    could verify no plan and raised)."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False)
    model = tf.LlamaForCausalLM(cfg).double().eval()
    spec = lambda out, inputs: out.logits[:, -1, :10]  # noqa: E731
    x = {"input_ids": _ids()["input_ids"]}
    ref = nnsim.Similarity(model, output=spec, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, output=spec, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        assert rel_err(sim.kernel(x), ref) <= 1e-10
    plan = sim.describe()
    assert all(plan[n] == RULES[type(m)] for n, m in model.named_modules() if type(m) in RULES)
    assert all(v in ("linear", "embedding", "norm") for v in plan.values()), plan
