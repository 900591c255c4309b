"""A scaled-down version of the authors' multi-branch U-Net for map alignment (docs/method.md, "Experiments").

Two input branches (image, polygon map) of VALID 3x3 convolutions with ELU and 2x2 max-pooling; at each
level the two branches' features are concatenated and passed through a common pair of convolutions; the
decoder upsamples bilinearly, convolves (SAME, ReLU), concatenates the centre-cropped common features and
applies two VALID convolutions; a 1x1 head and tanh give the displacement. Differences from the authors'
network, all for CPU budget: 3 levels instead of 4, base widths (6, 4, 8) by default instead of (32, 16, 48), no
segmentation branch, a single level-0 head, He initialisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pair(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3), nn.ELU(), nn.Conv2d(cout, cout, 3), nn.ELU())


def _crop(x: Tensor, size: int) -> Tensor:
    off = (x.shape[-1] - size) // 2
    return x[..., off:off + size, off:off + size]


class RegistrationNet(nn.Module):
    """(image [B, 3, S, S], map [B, 3, S, S]) -> displacement [B, 2, S_out, S_out] in pixels.

    ``max_disp``: the output is 2 max_disp tanh(z), the authors' scaling (targets in [-0.5, 0.5] for +-max_disp,
    tanh range +-1). ``output_size(S)`` gives S_out (S = 64: 8, centred on the input).
    """

    def __init__(self, levels: int = 3, image_base: int = 8, map_base: int = 4, common_base: int = 12,
                 max_disp: float = 4.0) -> None:
        super().__init__()
        self.levels, self.max_disp = levels, max_disp
        self.image = nn.ModuleList(_pair(3 if l == 0 else image_base * 2 ** (l - 1), image_base * 2**l)
                                   for l in range(levels))
        self.map = nn.ModuleList(_pair(3 if l == 0 else map_base * 2 ** (l - 1), map_base * 2**l)
                                 for l in range(levels))
        self.common = nn.ModuleList(_pair((image_base + map_base) * 2**l, common_base * 2**l) for l in range(levels))
        self.up = nn.ModuleList(nn.Conv2d(common_base * 2 ** (l + 1), common_base * 2**l, 3, padding=1)
                                for l in range(levels - 1))
        self.decode = nn.ModuleList(_pair(2 * common_base * 2**l, common_base * 2**l) for l in range(levels - 1))
        self.head = nn.Conv2d(common_base, 2, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # He (not the authors' Xavier-like) initialisation: with a few hundred Adam steps instead of
                # their 100 000, the Xavier-initialised stack of ~20 ELU convolutions did not leave the
                # predict-the-mean plateau in our pilot runs, the He-initialised one did.
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        std = (2.0 / (self.head.in_channels + self.head.out_channels)) ** 0.5  # the authors' head initialisation
        nn.init.trunc_normal_(self.head.weight, std=std, a=-2 * std, b=2 * std)

    def output_size(self, size: int) -> int:
        """Side of the output map for inputs of side ``size`` (by a dry run)."""
        with torch.no_grad():
            x = torch.zeros(1, 3, size, size, dtype=self.head.weight.dtype, device=self.head.weight.device)
            return int(self(x, x).shape[-1])

    def forward(self, image: Tensor, polygons: Tensor) -> Tensor:
        a, b, skips = image, polygons, []
        for l in range(self.levels):
            a, b = self.image[l](a), self.map[l](b)
            skips.append(self.common[l](torch.cat([a, b], 1)))
            if l < self.levels - 1:
                a, b = F.max_pool2d(a, 2), F.max_pool2d(b, 2)
        h = skips[-1]
        for l in range(self.levels - 2, -1, -1):
            h = F.relu(self.up[l](F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)))
            h = self.decode[l](torch.cat([_crop(skips[l], h.shape[-1]), h], 1))
        return 2 * self.max_disp * torch.tanh(self.head(h))


class ShiftNet(nn.Module):
    """(image [B, 3, S, S], map [B, 3, S, S]) -> the patch's translation [B, 2] (pixels, x then y).

    The stand-in for the redesigned experiment (a simpler displacement model: one translation per patch):
    the two input branches of :class:`RegistrationNet` (VALID 3x3 convolutions with ELU, ``image_width`` and
    ``map_width`` channels), concatenated at full resolution as the authors' levels are, then common
    convolutions (``common_width``; one before and two after a 2x2 max-pooling), a global average over the
    remaining positions and a linear head. The global average makes the output a function of the whole patch,
    as a single translation is. Default PyTorch initialisation; linear output (no tanh), so that the squared
    loss on the analysed output is the one the denoising derivation assumes.
    """

    def __init__(self, image_width: int = 8, map_width: int = 4, common_width: int = 16) -> None:
        super().__init__()
        self.image = _pair(3, image_width)
        self.map = _pair(3, map_width)
        c = common_width
        self.common = nn.Sequential(nn.Conv2d(image_width + map_width, c, 3), nn.ELU(), nn.MaxPool2d(2),
                                    nn.Conv2d(c, c, 3), nn.ELU(), nn.Conv2d(c, c, 3), nn.ELU())
        self.head = nn.Linear(c, 2)

    def forward(self, image: Tensor, polygons: Tensor) -> Tensor:
        h = self.common(torch.cat([self.image(image), self.map(polygons)], 1))
        return self.head(h.mean((2, 3)))
