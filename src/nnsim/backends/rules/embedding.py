"""nn.Embedding: the per-sample gradient is sparse, rows idx_t receive delta_t.

It is an Outer factor with one-hot inputs given as indices, so a pair of samples costs the matches of
their tokens, never a vocabulary-sized vector (unless the cost model finds that cheaper).
"""

from __future__ import annotations

import torch
from torch import nn

from ...factors import Factor, Outer
from . import Call, register


@register(nn.Embedding)
def embedding(module: nn.Embedding, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    if "weight" not in names:
        return []
    B, d = calls[0].deltas[0].shape[:2]
    idx = torch.cat([c.input().reshape(B, -1) for c in calls], dim=1)
    delta = torch.cat([c.deltas[0].reshape(B, d, -1, module.embedding_dim) for c in calls], dim=2)
    if module.padding_idx is not None:
        # The padding row never receives a gradient.
        delta = delta * (idx != module.padding_idx)[:, None, :, None].to(delta.dtype)
    return [Outer(layer, idx[:, None], delta[:, :, None], (names["weight"], module.weight.shape),
                  vocab=module.num_embeddings, weight_transposed=True)]
