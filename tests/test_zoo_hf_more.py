"""A second sweep of Hugging Face families against the per-sample loop oracle, in float64, from tiny configs (no
weights downloaded): DeBERTa (v1 and v2: disentangled relative attention), XLNet, MPNet, Funnel, ConvBERT, BigBird
(full attention), CLIP (vision classifier, text projection), BEiT and Data2Vec-Vision (relative position bias,
layer scale), DINOv2, Segformer, PoolFormer, CvT, RegNet, MobileNetV2, EfficientNet, Falcon, GPT-J, CodeGen,
StableLM, MPT, Whisper's encoder classifier and Mamba. Each Similarity is called twice, at d = 1 and d = 3,
and ``describe()`` must show the family's Linear, Embedding, norm and conv modules on their rules (or on the
free-parameter tracking), nothing on a fallback or the whole-model residual.

Then the fixes this sweep made, each on a hand-written model as well:

* a model whose output dtype is not its parameters' (Mamba's ``logits.float()`` in a float64 model): the plan's
  check mixed float64 factors with float32 weights and no plan could be verified (a ModelError);
* a Linear whose input and output are shared by the batch (DeBERTa's ``pos_proj`` of the relative position
  table [1, 2k, C]): its rule raised a RuntimeError and the module went to the whole-model functorch residual
  with a warning; it now raises NoBatchAxis and the free-parameter tracking takes its parameters to where that
  output meets the batch;
* an in-place operation on a free parameter (ConvBERT's ``x += self.bias``, a layer scale ``x *= gamma``): its
  replay mutated a captured tensor under ``torch.func.vjp`` and the module went to its fallback; it is replayed
  out of place, on the argument as it was before the operation;
* an operation combining several tracked parameters (``F.linear(table, weight, bias)``, DeBERTa's pos_q_proj,
  Mamba's reference scan taking A, D and dt_proj's bias) broke the tracking of every module involved: each
  parameter's lineage is now followed on its own (partial derivatives, summed);
* the parameters of children a module reads without calling them (DeBERTa's ``rel_embeddings.weight``,
  Mamba's ``conv1d.weight``, a BEiT relative bias table) are tracked with the module's own: DeBERTa's encoder
  and Mamba's mixer were on the exact per-module fallback (Mamba's on the per-sample loop);
* a parameter meeting a batch on another axis than 0 (XLNet's time-major [T, B, C] activations in the
  einsums of its relative attention, with q, k, v, o, r and r_w_bias its own parameters): tracked with that
  axis (before: the attention on its exact per-module fallback);
* torch 2.13's CPU batch norm (eval) differentiates a batch of one sample wrongly when the gradient reaching it
  is not contiguous (CvT's ``view(...).permute(0, 2, 1)`` after its BatchNorm2d projections): the loop oracle and
  the structured backend's check, which run samples one by one, were wrong (the loop silently, the structured
  backend could verify no plan); a model called on one sample now runs its batch norms decomposed."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import rel_err
from torch import Tensor, nn

import nnsim

tf = pytest.importorskip("transformers")
torch.set_num_threads(1)
N, T, V = 4, 6, 30
ENC = dict(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
           max_position_embeddings=20, num_labels=3)


def _ids(mask: bool = True) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = {"input_ids": torch.randint(1, V, (N, T), generator=g)}
    if mask:
        x["attention_mask"] = torch.ones(N, T, dtype=torch.long)
        x["attention_mask"][1, 4:] = 0  # a padded sample
    return x


def _images(size: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(N, 3, size, size, generator=g, dtype=torch.float64)}


def _decoder(config_cls: type, model_cls: type, **kw: object) -> nn.Module:
    return model_cls(config_cls(vocab_size=V, num_labels=3, pad_token_id=0, **kw))


_VISION = dict(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=24, num_labels=3)
_GPTJ = dict(n_embd=16, n_layer=1, n_head=4, rotary_dim=2, n_positions=32)
_LM = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=4,
           max_position_embeddings=32)

FAMILIES = {
    "deberta": lambda: tf.DebertaForSequenceClassification(tf.DebertaConfig(
        **ENC, relative_attention=True, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
        pooler_hidden_size=16)),
    "deberta_v2": lambda: tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(
        **ENC, relative_attention=True, position_buckets=8, max_relative_positions=16, pos_att_type=["p2c", "c2p"],
        pooler_hidden_size=16)),
    "xlnet": lambda: tf.XLNetForSequenceClassification(tf.XLNetConfig(vocab_size=V, d_model=16, n_layer=1, n_head=2,
                                                                      d_inner=24, num_labels=3)),
    "mpnet": lambda: tf.MPNetForSequenceClassification(tf.MPNetConfig(**ENC)),
    "funnel": lambda: tf.FunnelForSequenceClassification(tf.FunnelConfig(
        vocab_size=V, d_model=16, n_head=2, d_head=8, d_inner=24, block_sizes=[1, 1], num_decoder_layers=1,
        num_labels=3)),
    "convbert": lambda: tf.ConvBertForSequenceClassification(tf.ConvBertConfig(**ENC, embedding_size=16, head_ratio=2,
                                                                               conv_kernel_size=3)),
    "bigbird": lambda: tf.BigBirdForSequenceClassification(tf.BigBirdConfig(**ENC, attention_type="original_full")),
    "clip_vision": lambda: tf.CLIPForImageClassification(tf.CLIPConfig(
        text_config=dict(vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           image_size=8, patch_size=4), num_labels=3)),
    "clip_text": lambda: tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(
        vocab_size=V, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=8)),
    "beit": lambda: tf.BeitForImageClassification(tf.BeitConfig(
        **_VISION, use_relative_position_bias=True, layer_scale_init_value=0.1, use_mean_pooling=True)),
    "data2vec_vision": lambda: tf.Data2VecVisionForImageClassification(tf.Data2VecVisionConfig(
        **_VISION, use_relative_position_bias=True, layer_scale_init_value=0.1)),
    "dinov2": lambda: tf.Dinov2ForImageClassification(tf.Dinov2Config(
        image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
        num_labels=3)),
    "segformer": lambda: tf.SegformerForImageClassification(tf.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
        strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], num_labels=3)),
    "poolformer": lambda: tf.PoolFormerForImageClassification(tf.PoolFormerConfig(
        num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3], strides=[2, 2],
        padding=[1, 1], pool_size=3, mlp_ratio=2.0, num_labels=3)),
    "cvt": lambda: tf.CvtForImageClassification(tf.CvtConfig(
        patch_sizes=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], embed_dim=[8, 16], num_heads=[1, 2],
        depth=[1, 2], mlp_ratio=[2.0, 2.0], cls_token=[False, True], drop_path_rate=[0.0, 0.0],
        attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0], qkv_bias=[True, True], padding_kv=[1, 1],
        stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1], kernel_qkv=[3, 3], qkv_projection_method=["dw_bn"] * 2,
        num_labels=3)),
    "regnet": lambda: tf.RegNetForImageClassification(tf.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, layer_type="y", num_labels=3)),
    "mobilenet_v2": lambda: tf.MobileNetV2ForImageClassification(tf.MobileNetV2Config(image_size=16,
                                                                                      depth_multiplier=0.25,
                                                                                      num_labels=3)),
    "efficientnet": lambda: tf.EfficientNetForImageClassification(tf.EfficientNetConfig(
        image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, kernel_sizes=[3, 3, 3],
        in_channels=[32, 16, 24], out_channels=[16, 24, 40], depthwise_padding=[], strides=[1, 2, 2],
        num_block_repeats=[1, 1, 1], expand_ratios=[1, 6, 6], num_labels=3)),
    "falcon": lambda: _decoder(tf.FalconConfig, tf.FalconForSequenceClassification, hidden_size=16,
                               num_hidden_layers=1, num_attention_heads=4),
    "gptj": lambda: _decoder(tf.GPTJConfig, tf.GPTJForSequenceClassification, **_GPTJ),
    "codegen": lambda: tf.CodeGenForCausalLM(tf.CodeGenConfig(vocab_size=V, **_GPTJ)),
    "stablelm": lambda: _decoder(tf.StableLmConfig, tf.StableLmForSequenceClassification, num_key_value_heads=2,
                                 **_LM),
    "mpt": lambda: _decoder(tf.MptConfig, tf.MptForSequenceClassification, d_model=16, n_layers=1, n_heads=2,
                            expansion_ratio=2, max_seq_len=32),
    "whisper": lambda: tf.WhisperForAudioClassification(tf.WhisperConfig(
        vocab_size=V, num_mel_bins=8, d_model=16, encoder_layers=1, encoder_attention_heads=2, decoder_layers=1,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, max_source_positions=8, num_labels=3,
        classifier_proj_size=8)),
    "mamba": lambda: tf.MambaForCausalLM(tf.MambaConfig(vocab_size=V, hidden_size=8, state_size=4,
                                                        num_hidden_layers=1, expand=2, conv_kernel=3,
                                                        time_step_rank=2)),
}
INPUTS = {
    "clip_vision": lambda: _images(8), "beit": lambda: _images(8), "data2vec_vision": lambda: _images(8),
    "dinov2": lambda: _images(8), "segformer": lambda: _images(16), "poolformer": lambda: _images(16),
    "regnet": lambda: _images(16), "cvt": lambda: _images(16), "mobilenet_v2": lambda: _images(16),
    "efficientnet": lambda: _images(32),
    "clip_text": lambda: _ids(mask=False),
    "mamba": lambda: _ids(mask=False),
    "whisper": lambda: {"input_features": torch.randn(N, 8, 16, generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.float64)},
}
# What stays off the rules, and why: nothing in these families (LeViT is left out of the zoo: its eval-mode
# attention-bias cache makes its gradients depend on the calls before; see the report of this sweep)
LEFT: dict[str, set[str]] = {}
RULES = {nn.Linear: "linear", nn.Embedding: "embedding", nn.LayerNorm: "norm", nn.Conv1d: "conv",
         nn.Conv2d: "conv", nn.BatchNorm2d: "norm", nn.GroupNorm: "norm"}


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _output(o: object) -> Tensor:
    y = o.text_embeds[:, None] if hasattr(o, "text_embeds") else o.logits
    return y if y.dim() == 3 else y[:, None]


# Their initialisation (BatchNorm with unit running variance after tiny weights) makes the outputs independent
# of the sample (logits spread 1e-28): the kernels would be the classifier bias's alone, equal for every pair.
RESCALED = {"mobilenet_v2", "efficientnet"}


def _scale_preserving(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.1)
                m.bias.normal_(0.0, 0.1)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
    return model


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("d", [1, 3])
def test_family_exact_twice_on_its_rules(name, d):
    torch.manual_seed(0)
    model = FAMILIES[name]().double().eval()
    if name in RESCALED:
        model = _scale_preserving(model)
    x = INPUTS.get(name, _ids)()
    spec = (lambda o, i: _output(o)[:, -1, :3]) if d == 3 else (lambda o, i: _output(o)[:, -1, 1:2])  # noqa: E731
    ref = nnsim.Similarity(model, output=spec, backend="loop", progress=False).kernel(x)
    assert ref.shape == (N, N, d, d)
    sim = nnsim.Similarity(model, output=spec, progress=False)
    left = LEFT.get(name, set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", nnsim.FallbackWarning)
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, nnsim.FallbackWarning)]
    assert all(any(f".{m}'" in msg for m in left) for msg in fallbacks), fallbacks
    plan = sim.describe()
    checked = [(n, RULES[type(m)]) for n, m in model.named_modules()
               if type(m) in RULES and any(p.requires_grad for p in m.parameters())]  # (Whisper's frozen positions)
    assert len(checked) >= 4
    for layer, rule in checked:
        if not any(layer.endswith(m) for m in left):
            # (a module whose output is shared by the batch, a position table, is on the free-parameter
            # tracking its rule routes it to, exactly)
            # (a module never called, whose parameters its parent reads, DeBERTa's rel_embeddings, Mamba's
            # conv1d in the reference scan: described under that parent)
            owner = next(n for n in _ancestors(layer) if n in plan)
            assert plan[owner] in (rule, "free parameters"), (layer, owner, plan[owner])
    off = [k for k, v in plan.items() if v.startswith(("functorch", "loop", "fallback"))]
    assert all(any(m in k for m in left) for k in off), off


def _exact_twice(model: nn.Module, x: Tensor, d: int) -> dict[str, str]:
    """The kernel twice vs the loop oracle with no FallbackWarning; returns ``describe()``."""
    spec = nnsim.outputs.logits() if d == 3 else nnsim.outputs.logits(target=1)
    ref = nnsim.Similarity(model, output=spec, backend="loop", progress=False).kernel(x)
    sim = nnsim.Similarity(model, output=spec, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10
    return sim.describe()


class _Float32Logits(nn.Module):
    """A float64 model that returns float32 logits, as Hugging Face's Mamba (``logits.float()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x))).float()


@pytest.mark.parametrize("d", [1, 3])
def test_float32_outputs_of_a_float64_model_are_planned_on_the_rules(d):
    torch.manual_seed(0)
    model = _Float32Logits().double()
    x = torch.randn(N, 5, dtype=torch.float64)
    plan = _exact_twice(model, x, d)
    assert plan == {"fc1": "linear", "fc2": "linear"}


class _SharedTableProjection(nn.Module):
    """A position table [1, P, C] projected by a Linear before it meets the batch (DeBERTa's ``pos_proj`` of its
    relative embeddings): the Linear's input and output are shared by the samples."""

    def __init__(self) -> None:
        super().__init__()
        # F.linear(table, weight, bias) combines three tracked parameters, of two modules (DeBERTa's pos_q_proj)
        self.table = nn.Parameter(torch.randn(1, 4, 6))
        self.proj, self.inp, self.head = nn.Linear(6, 6), nn.Linear(3, 6), nn.Linear(24, 3)

    def forward(self, x: Tensor) -> Tensor:
        # [4, 6]: a view that takes the table's size (so that the output cannot be expanded to the batch)
        pos = self.proj(self.table).view(4, 6)
        h = torch.tanh(self.inp(x) + pos)  # [B, 4, 6]: meets the batch here
        return self.head(h.flatten(1))


@pytest.mark.parametrize("d", [1, 3])
def test_linear_on_a_batch_shared_input_goes_to_the_free_parameter_tracking(d):
    torch.manual_seed(0)
    model = _SharedTableProjection().double()
    x = torch.randn(N, 4, 3, dtype=torch.float64)
    plan = _exact_twice(model, x, d)
    # before: the rule raised RuntimeError, the Linear went to the whole-model functorch residual with a warning
    assert plan["proj"] == plan[""] == "free parameters"  # (the table: the root module's own parameter)
    assert plan["inp"] == plan["head"] == "linear"
    assert not any(v.startswith(("functorch", "loop", "fallback")) for v in plan.values()), plan


class _InPlaceScaleShift(nn.Module):
    """``h *= gamma`` then ``h += beta`` on a module's own parameters (ConvBERT's ``x += self.bias``, a layer
    scale in place): the gradient of gamma needs h as it was before the multiplication."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma, self.beta = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(6))

    def forward(self, h: Tensor) -> Tensor:
        h = h.clone()
        h *= self.gamma
        h += self.beta
        return h


@pytest.mark.parametrize("d", [1, 3])
def test_in_place_operations_on_free_parameters_are_replayed_out_of_place(d):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), _InPlaceScaleShift(), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(N, 3, dtype=torch.float64)
    plan = _exact_twice(model, x, d)
    assert plan == {"0": "linear", "1": "free parameters", "3": "linear"}  # before: "1" on its fallback


class _ReadsChildWeights(nn.Module):
    """DeBERTa's encoder: a relative table read as ``rel_embeddings.weight`` (the Embedding never called) and
    normalised with ``F.layer_norm(w, ln.weight, ln.bias)``, the children's parameters used by the parent."""

    def __init__(self) -> None:
        super().__init__()
        self.rel, self.ln = nn.Embedding(4, 6), nn.LayerNorm(6)
        self.inp, self.head = nn.Linear(3, 6), nn.Linear(24, 3)

    def forward(self, x: Tensor) -> Tensor:
        table = nn.functional.layer_norm(self.rel.weight, (6,), self.ln.weight, self.ln.bias)
        return self.head(torch.tanh(self.inp(x) + table).flatten(1))


@pytest.mark.parametrize("d", [1, 3])
def test_children_parameters_used_by_their_parent_are_tracked(d):
    torch.manual_seed(0)
    model = _ReadsChildWeights().double()
    x = torch.randn(N, 4, 3, dtype=torch.float64)
    plan = _exact_twice(model, x, d)
    # before: the root module (owning the uncalled children's parameters) on its exact per-module fallback
    assert plan == {"": "free parameters", "inp": "linear", "head": "linear"}


class _TimeMajorAttention(nn.Module):
    """XLNet's relative attention in small: time-major [T, B, C] activations meet the module's own parameters in
    einsums (``ibh,hnd->ibnd``) and a bias added on the heads axis."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Parameter(torch.randn(5, 2, 3)), nn.Parameter(torch.randn(5, 2, 3))
        self.r_w_bias = nn.Parameter(torch.randn(2, 3))

    def forward(self, h: Tensor) -> Tensor:  # h [T, B, 5]
        q = torch.einsum("ibh,hnd->ibnd", h, self.q) + self.r_w_bias
        score = torch.einsum("ibnd,jbnd->bnij", q, q).softmax(-1)
        return torch.einsum("bnij,jbnd,hnd->ibh", score, q, self.o)


class _TimeMajorModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn, self.head = nn.Linear(3, 5), _TimeMajorAttention(), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, 3]
        h = self.attn(self.inp(x).transpose(0, 1))
        return self.head(torch.tanh(h[-1]))


@pytest.mark.parametrize("d", [1, 3])
def test_parameters_meeting_a_time_major_batch_are_tracked(d):
    torch.manual_seed(0)
    model = _TimeMajorModel().double()
    x = torch.randn(N, 5, 3, dtype=torch.float64)
    plan = _exact_twice(model, x, d)
    assert plan == {"inp": "linear", "attn": "free parameters", "head": "linear"}  # before: attn on its fallback


class _BatchNormPermuted(nn.Module):
    """A BatchNorm2d with running statistics whose output is read through ``view(...).permute(0, 2, 1)`` (CvT's
    convolutional projection) and weighted position by position: the gradient reaching the norm is a permuted
    (channels-last) one."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.register_buffer("w", torch.randn(16, 4))
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn(self.conv(x))
        h = h.view(h.shape[0], 4, -1).permute(0, 2, 1)  # [B, HW, C], not contiguous
        return (h * self.w).sum(1)


def _batched_jacobian_kernel(model: nn.Module, x: Tensor) -> Tensor:
    """The oracle: per-sample gradients from one batched pass (eval mode: each output depends on its own sample
    only; the fused batch norm is right on several samples), K[a, b, c, e] = <J_a c, J_b e>."""
    y = model(x)
    params = [p for p in model.parameters() if p.requires_grad]
    J = torch.stack([torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(y[b, c], params,
                                                                                       retain_graph=True)])
                                  for c in range(y.shape[1])]) for b in range(y.shape[0])])
    return torch.einsum("acp,bep->abce", J, J)


@pytest.mark.parametrize("backend", ["loop", "structured", "functorch"])
def test_one_sample_batch_norm_before_a_permute_is_differentiated_exactly(backend):
    torch.manual_seed(0)
    model = _BatchNormPermuted().double().eval()
    x = torch.randn(N, 3, 4, 4, dtype=torch.float64)
    ref = _batched_jacobian_kernel(model, x)
    sim = nnsim.Similarity(model, output=nnsim.outputs.logits(), backend=backend, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", nnsim.FallbackWarning)
        for _ in range(2):
            assert rel_err(sim.kernel(x), ref) <= 1e-10  # before: loop 1.5e-1 off, structured a ModelError
    if backend == "structured":
        assert sim.describe() == {"conv": "conv", "bn": "norm"}
