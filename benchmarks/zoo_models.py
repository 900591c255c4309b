"""The model zoo of ``bench_models.py``: hand-written vision blocks (no torchvision/timm), PyTorch transformers
and RNNs, and Hugging Face models built from tiny configs (never downloaded).

Each builder returns ``(model, inputs)`` for N samples: the model in eval mode, float32, seeded; the inputs a
tuple of tensors (HF models are wrapped in a module taking tensors, so every backend sees the same call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _images(n: int, c: int = 3, hw: int = 32) -> tuple[Tensor]:
    return (torch.randn(n, c, hw, hw, generator=torch.Generator().manual_seed(1)),)


def _tokens(n: int, t: int = 16, vocab: int = 100) -> tuple[Tensor]:
    return (torch.randint(1, vocab, (n, t), generator=torch.Generator().manual_seed(1)),)


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, as after training."""
    gen = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)


# ------------------------------------------------------------------------------------------ vision
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.short is None else self.short(x)))


class ResNet(nn.Module):
    """CIFAR-style ResNet: stem conv 3x3, stages of BasicBlocks (stride 2 between stages), GAP, linear."""

    def __init__(self, widths: tuple[int, ...], blocks: tuple[int, ...], classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c = [], widths[0]
        for i, (w, b) in enumerate(zip(widths, blocks, strict=True)):
            for j in range(b):
                layers.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def small_resnet(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """16-32-64 channels, one block per stage, 32x32 inputs (P = 78k): convolutions over 64-1024 positions."""
    torch.manual_seed(0)
    model = ResNet((16, 32, 64), (1, 1, 1))
    _randomise_bn(model)
    return model.eval(), _images(n)


def resnet18_like(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """ResNet-18's layout (2-2-2-2 BasicBlocks) at a quarter of its width (16-32-64-128), 32x32 inputs."""
    torch.manual_seed(0)
    model = ResNet((16, 32, 64, 128), (2, 2, 2, 2))
    _randomise_bn(model)
    return model.eval(), _images(n)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of [B, C, H, W] (ConvNeXt's downsampling norm): its own forward."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """depthwise 7x7 conv, LayerNorm (channels last), Linear 4x, GELU, Linear, layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))  # layer scale: a free parameter of the block

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        h = self.pwconv2(F.gelu(self.pwconv1(h)))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class ConvNeXtTiny(nn.Module):
    """Patchify stem (4x4, stride 4), two ConvNeXt blocks, GAP, LayerNorm, linear head; 32x32 inputs."""

    def __init__(self, dim: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.blocks = nn.Sequential(ConvNeXtBlock(dim), ConvNeXtBlock(dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(self.stem(x)).mean((2, 3))))


def convnext_like(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    return ConvNeXtTiny().eval(), _images(n)


class ViTBlock(nn.Module):
    """torchvision's EncoderBlock: pre-LN, nn.MultiheadAttention, pre-LN MLP (GELU)."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.self_attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """torchvision-style VisionTransformer: conv patch embedding, class token, learned position embedding."""

    def __init__(self, image: int = 32, patch: int = 8, dim: int = 64, depth: int = 2, heads: int = 4,
                 mlp: int = 128, classes: int = 10) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, dim, patch, stride=patch)
        T = (image // patch) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embedding = nn.Parameter(torch.randn(1, T, dim) * 0.02)
        self.layers = nn.Sequential(*[ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_proj(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.class_token.expand(h.shape[0], -1, -1), h], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(h))[:, 0])


def vit(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """32x32 images, 8x8 patches: T = 17 tokens of width 64, 2 blocks."""
    torch.manual_seed(0)
    return ViT().eval(), _images(n)


# ------------------------------------------------------------------------------------------ sequences
class TokenTransformer(nn.Module):
    def __init__(self, vocab: int = 100, dim: int = 64, depth: int = 2, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 128, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.encoder(self.emb(tokens)).mean(1))


def transformer_encoder(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    return TokenTransformer().eval(), _tokens(n)


class RNNClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module], vocab: int = 100, dim: int = 32, hidden: int = 64,
                 classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = cell(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.rnn(self.emb(tokens))
        return self.head(out[:, -1])


def lstm(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    return RNNClassifier(nn.LSTM).eval(), _tokens(n)


def gru(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(0)
    return RNNClassifier(nn.GRU).eval(), _tokens(n)


# ------------------------------------------------------------------------------------------ Hugging Face
class HFLogits(nn.Module):
    """Tensor-in, logits-out wrapper of a Hugging Face model (keyword inputs, ``ModelOutput``)."""

    def __init__(self, model: nn.Module, key: str) -> None:
        super().__init__()
        self.model, self.key = model, key

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(**{self.key: x}).logits
        # GPT-2, Llama: the last position's next-token logits, the first 10 of the 100 (every zoo model has 10
        # outputs: the d = 10 case; all 100 would make a 2.4 GiB [256, 256, 100, 100] result)
        return out[:, -1, :10] if out.dim() == 3 else out


def _tiny(kind: str) -> tuple[nn.Module, str]:
    import transformers as tf

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if kind == "bert":
        cfg = tf.BertConfig(vocab_size=100, max_position_embeddings=32, num_labels=10, **common,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return tf.BertForSequenceClassification(cfg), "input_ids"
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=128,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return tf.GPT2LMHeadModel(cfg), "input_ids"
    if kind == "llama":  # grouped-query attention (4 heads, 2 key/value heads), rotary positions, RMSNorm, SwiGLU
        cfg = tf.LlamaConfig(vocab_size=100, max_position_embeddings=32, num_key_value_heads=2, **common,
                             tie_word_embeddings=False)
        return tf.LlamaForCausalLM(cfg), "input_ids"
    cfg = tf.ViTConfig(image_size=32, patch_size=8, num_channels=3, num_labels=10, **common,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.ViTForImageClassification(cfg), "pixel_values"


def _hf(kind: str) -> Callable[[int], tuple[nn.Module, tuple[Tensor, ...]]]:
    def build(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
        torch.manual_seed(0)
        model, key = _tiny(kind)
        if kind != "llama":  # Llama-style models run with PyTorch's scaled_dot_product_attention, as users run them
            model.config._attn_implementation = "eager"
        return HFLogits(model, key).eval(), _images(n) if kind == "vit" else _tokens(n)

    return build


def mlp(n: int) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """MLP 784-256-256-10 on 28x28 inputs (the neural-tangents comparison of issue 14)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    return model.eval(), (torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(1)),)


ZOO: dict[str, Callable[[int], tuple[nn.Module, tuple[Tensor, ...]]]] = {
    "mlp": mlp,
    "resnet-small": small_resnet,
    "resnet18-like": resnet18_like,
    "convnext-like": convnext_like,
    "vit": vit,
    "transformer-encoder": transformer_encoder,
    "hf-bert": _hf("bert"),
    "hf-gpt2": _hf("gpt2"),
    "hf-vit": _hf("vit"),
    "hf-llama": _hf("llama"),
    "lstm": lstm,
    "gru": gru,
}
