"""nn.Embedding: the per-sample gradient is sparse, rows idx_t receive delta_t.

It is an Outer factor with one-hot inputs given as indices, so a pair of samples costs the matches of
their tokens, never a vocabulary-sized vector (unless the cost model finds that cheaper). Indices shared
by the whole batch (position ids [1, T], broadcast against token embeddings [B, T, C]) are expanded to
every sample: the structured pass hands the rule per-sample signals of the broadcast output.
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
    C = module.embedding_dim
    idx_parts, d_parts = [], []
    for c in calls:
        idx = c.batched_input()
        delta = c.deltas[0]
        if tuple(delta.shape[2:]) != (*idx.shape[1:], C):
            raise ValueError(f"output signals {tuple(delta.shape)} do not match indices {tuple(idx.shape)}")
        idx_parts.append(idx.reshape(B, -1))
        d_parts.append(delta.reshape(B, d, -1, C))
    idx = torch.cat(idx_parts, dim=1)
    delta = torch.cat(d_parts, dim=2)
    if module.padding_idx is not None:
        # The padding row never receives a gradient.
        delta = delta * (idx != module.padding_idx)[:, None, :, None].to(delta.dtype)
    return [Outer(layer, idx[:, None], delta[:, :, None], (names["weight"], module.weight.shape),
                  vocab=module.num_embeddings, weight_transposed=True)]
