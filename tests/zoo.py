"""The model zoo every backend must agree on (issue: core, section 3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(d: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, d))


class CNN(nn.Module):
    """conv (zeros, reflect, groups, stride, dilation), 1-D conv, pooling, BatchNorm, Dropout."""

    def __init__(self, d: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect", groups=2, dilation=1)
        self.c3 = nn.Conv2d(6, 4, 2, stride=2, dilation=1, bias=False)
        self.c1d = nn.Conv1d(4, 3, 3, padding="same", dilation=2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3 * 4 + 4 * 4, d)
        with torch.no_grad():  # non-trivial running statistics, as after training
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn(self.c1(x)))
        h = F.max_pool2d(F.relu(self.c2(h)), 2)  # 8x8 -> 4x4
        h = self.c3(h)  # [B, 4, 2, 2]
        s = self.c1d(h.flatten(2))  # [B, 3, 4]
        return self.fc(self.drop(torch.cat([s.flatten(1), h.flatten(1)], 1)))


class Registration(nn.Module):
    """Two-input (image + polygon map) branches, merged, U-Net-like with a skip and an upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.poly = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)  # no layer rule: per-module fallback
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, image: Tensor, polygons: Tensor) -> Tensor:
        h = torch.cat([self.img(image), self.poly(polygons)], 1)
        u = self.up(F.relu(self.gn(self.down(h))))
        return self.head(torch.cat([h, u], 1))  # [B, 2, H, W] displacement map


class AttentionBlock(nn.Module):
    """Embedding + LayerNorm + hand-written attention (Linear q/k/v over a sequence) + MultiheadAttention."""

    def __init__(self, vocab: int = 11, dim: int = 8, d: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.ln = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ln2 = nn.LayerNorm(dim, elementwise_affine=True)
        self.out = nn.Linear(dim, d)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.ln(self.emb(tokens))
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5, -1)
        h = h + att @ self.v(h)
        h = self.ln2(h + self.mha(h, h, h, need_weights=False)[0])
        return self.out(h.mean(1))


class TiedFrozen(nn.Module):
    """Tied embedding / output weights, a module called twice, a frozen layer, and a root parameter."""

    def __init__(self, vocab: int = 9, dim: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.shared = nn.Linear(dim, dim)
        self.frozen = nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.proj = nn.Parameter(torch.randn(dim, 2) / dim**0.5)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens).mean(1)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))  # the same module twice
        h = self.frozen(h) * self.scale
        logits = self.head(h)  # tied weight through a hooked module
        direct = F.linear(h, self.emb.weight)  # tied weight used outside any module's forward
        return torch.cat([(logits + direct)[:, :3], h @ self.proj], 1)


def dead_relu(n: int, dead: int) -> tuple[nn.Module, Tensor]:
    """A ReLU MLP and inputs where sample ``dead`` switches every hidden unit off: the gradient of the first
    layer's parameters is exactly zero there (the last layer's bias gradient is not)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4, 3))
        model[0].bias.zero_()
    x = torch.randn(n, 3, dtype=torch.float64).abs() + 0.1
    x[dead] = -1.0
    return model, x


def cases(seed: int = 0) -> dict[str, tuple[nn.Module, tuple[Tensor, ...], tuple[Tensor, ...], object]]:
    """name -> (model, xa, xb, output spec), all in float64."""
    from nnsim import outputs

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def rn(*s: int) -> Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64)

    def tok(n: int, t: int, v: int) -> Tensor:
        return torch.randint(0, v, (n, t), generator=g)

    return {
        "mlp": (mlp().double(), (rn(5, 6),), (rn(4, 6),), None),
        "mlp_scalar": (mlp(1).double(), (rn(5, 6),), (rn(4, 6),), None),
        "cnn": (CNN().double(), (rn(4, 2, 8, 8),), (rn(3, 2, 8, 8),), None),
        "registration": (Registration().double(), (rn(3, 3, 8, 8), rn(3, 3, 8, 8)), (rn(2, 3, 8, 8), rn(2, 3, 8, 8)),
                         outputs.spatial_sum),
        "registration_pixel": (Registration().double(), (rn(3, 3, 8, 8), rn(3, 3, 8, 8)),
                               (rn(2, 3, 8, 8), rn(2, 3, 8, 8)), outputs.center_pixel),
        "attention": (AttentionBlock().double(), (tok(4, 5, 11),), (tok(3, 5, 11),), None),
        "tied_frozen": (TiedFrozen().double(), (tok(4, 3, 9),), (tok(3, 3, 9),), None),
    }
