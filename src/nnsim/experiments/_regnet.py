"""The registration experiment's network, after the authors' multi-branch network for map alignment
(docs/method.md, "Experiments"), scaled down for a CPU and reduced to one translation per patch.

The first version of the experiment used a 3-level U-Net with a dense displacement head (``RegistrationNet``);
it never learned the task in the CPU budget and is in the git history.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _pair(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3), nn.ELU(), nn.Conv2d(cout, cout, 3), nn.ELU())


class ShiftNet(nn.Module):
    """(image [B, 3, S, S], map [B, 3, S, S]) -> the patch's translation [B, 2] (pixels, x then y).

    The stand-in for the redesigned experiment (a simpler displacement model: one translation per patch):
    the authors' two input branches (VALID 3x3 convolutions with ELU, ``image_width`` and
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
