"""nn.Embedding: the per-sample gradient is sparse, rows idx_t receive delta_t.

It is an Outer factor with one-hot inputs given as indices, so a pair of samples costs the matches of
their tokens, never a vocabulary-sized vector (unless the cost model finds that cheaper). Indices shared
by the whole batch (position ids [1, T], broadcast against token embeddings [B, T, C]) are expanded to
every sample: the structured pass hands the rule per-sample signals of the broadcast output. Indices
without a batch axis at all (T5's relative-position buckets [T, T], whose output [T, T, H] is permuted and
broadcast over the batch later) give signals summed over the batch: the rule raises :class:`NoBatchAxis` and
the backend tracks the weight to the operation where it meets the batch instead (rules/free.py).

Subclasses that override ``forward`` (Hugging Face's scaled word embeddings, ``x * embed_scale``; BART's
learned positions, which look up ``arange(T) + 2`` whatever their argument) are handled by what their forward
actually does: it is run again with its ``F.embedding`` lookups of the weight captured, which gives the indices
really used, and the module's output signals are pulled back through whatever the forward did after the lookups
(one VJP of that small, per-sample computation). The planner's verification against autograd covers the rest.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ...factors import Factor, Outer
from . import Call, NoBatchAxis, register


@register(nn.Embedding)
def embedding(module: nn.Embedding, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    if set(names) - {"weight"}:
        raise ValueError(f"the embedding rule handles the weight only, not {sorted(set(names) - {'weight'})}")
    if module.scale_grad_by_freq:
        raise ValueError("scale_grad_by_freq scales gradients by counts within the batch")
    B, d = calls[0].batch_size or calls[0].deltas[0].shape[0], calls[0].deltas[0].shape[1]
    C = module.embedding_dim
    own_forward = type(module).forward is not nn.Embedding.forward
    idx_parts, d_parts = [], []
    for c in calls:
        for idx, delta, padding in (_lookups(module, c, B) if own_forward else [_plain(module, c)]):
            if tuple(delta.shape[2:]) != (*idx.shape[1:], C):
                raise ValueError(f"output signals {tuple(delta.shape)} do not match indices {tuple(idx.shape)}")
            delta = delta.reshape(B, d, -1, C)
            if padding is not None:  # the padding row never receives a gradient
                delta = delta * (idx.reshape(B, -1) != padding)[:, None, :, None].to(delta.dtype)
            idx_parts.append(idx.reshape(B, -1).long())
            d_parts.append(delta)
    if not idx_parts:
        raise ValueError("the module's forward looked up nothing in its weight")
    idx = idx_parts[0] if len(idx_parts) == 1 else torch.cat(idx_parts, dim=1)
    delta = d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, dim=2)
    return [Outer(layer, idx[:, None], delta[:, :, None], (names["weight"], module.weight.shape),
                  vocab=module.num_embeddings, weight_transposed=True)]


def _plain(module: nn.Embedding, c: Call) -> tuple[Tensor, Tensor, int | None]:
    """nn.Embedding's own forward: its input are the indices, its output signals theirs."""
    B, delta = c.batch_size or c.deltas[0].shape[0], c.deltas[0]
    unbatched = c.out_batched is not None and 0 not in c.out_batched  # at planning (after the pass's expansion)
    if delta.shape[0] != B or (unbatched and c.leaves and c.leaves[0].shape[0] != 1):
        raise NoBatchAxis(f"output signals {tuple(delta.shape)} have no batch axis 0 of size {B}")
    return c.batched_input(), delta, module.padding_idx


class _Capture(TorchFunctionMode):
    """Replaces each ``F.embedding`` lookup of ``weight`` by a leaf holding its result, and records the
    indices, the padding row and that leaf. A lookup of ids shared by the batch (leading size 1, BART's decoder
    positions [1, T]) is given to every sample: its leaf is expanded to the batch, like its output in the pass.
    ``graph``: the lookup itself is kept (not a detached leaf), so that the signals pulled back to it depend on
    the weight through what the forward does after it (``tanh(lookup)``), as the double backward needs."""

    def __init__(self, weight: Tensor, B: int, graph: bool) -> None:
        super().__init__()
        self.weight, self.B, self.graph = weight, B, graph
        self.found: list[tuple[Tensor, int | None, Tensor]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.embedding:
            bound = dict(zip(("input", "weight", "padding_idx"), args, strict=False)) | kwargs
            if bound.get("weight") is self.weight:
                padding = bound.get("padding_idx")
                if padding is not None and padding < 0:
                    padding += self.weight.shape[0]
                idx, value = bound["input"], out if self.graph else out.detach()
                if isinstance(idx, Tensor) and idx.dim() > 0 and idx.shape[0] == 1 and self.B > 1:
                    idx, value = idx.expand(self.B, *idx.shape[1:]), value.expand(self.B, *value.shape[1:])
                leaf = value if value.requires_grad else value.clone().requires_grad_()
                self.found.append((idx, padding, leaf))
                return leaf
        return out


def _lookups(module: nn.Embedding, c: Call, B: int) -> list[tuple[Tensor, Tensor, int | None]]:
    """(indices [B, ...], their signals [B, d, ..., C], padding row) of each lookup of the weight in one call of
    a subclass's own forward, from the module's output signals pulled back through the rest of that forward."""
    if any(delta.shape[0] != B for delta in c.deltas):  # an output shared by the batch: summed signals
        raise NoBatchAxis(f"output signals {tuple(c.deltas[0].shape)} have no batch axis 0 of size {B}")
    capture = _Capture(module.weight, B, c.graph)
    with torch.enable_grad(), capture:
        out = type(module).forward(module, *c.args, **c.kwargs)
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor) and t.is_floating_point()]
    if len(outs) != len(c.deltas):
        raise ValueError(f"the forward run again gave {len(outs)} floating outputs, the pass {len(c.deltas)}")
    found = [(i, p, leaf) for i, p, leaf in capture.found if isinstance(i, Tensor) and i.dim() > 0]
    if not found or len(found) != len(capture.found):
        raise ValueError("the forward looks up its weight with no index tensor" if capture.found else
                         "the forward never looks up its weight through F.embedding")
    for i, _, _ in found:
        if i.shape[0] != B:
            raise NoBatchAxis(f"indices of shape {tuple(i.shape)} have no batch axis 0 of size {B}")
    for k, o in enumerate(outs):  # per-sample signals of the output as the pass gave them: batch first, B rows
        axis = (c.out_batched or {}).get(k, 0)
        o = o.movedim(axis, 0)
        if o.shape[0] == 1 and B > 1:  # broadcast by the pass to every sample
            o = o.expand(B, *o.shape[1:])
        if o.shape[0] != B or tuple(o.shape[1:]) != tuple(c.deltas[k].shape[2:]):
            raise ValueError(f"output {k} of shape {tuple(o.shape)} does not match its signals")
        outs[k] = o
    d = c.deltas[0].shape[1]
    leaves = [leaf for _, _, leaf in found]
    # d y_c / d lookup for every output c: the forward after the lookups acts on each sample alone (else the
    # verification disagrees), so the batch-summed VJP of each sample's signal is that sample's signal.
    signals = _pulled(outs, leaves, c.deltas, d, c.graph)
    return [(i, g.movedim(0, 1) if c.graph else g.movedim(0, 1).detach(), p)
            for (i, p, _), g in zip(found, signals, strict=True)]


def _pulled(outs: list[Tensor], leaves: list[Tensor], deltas: list[Tensor], d: int, graph: bool) -> list[Tensor]:
    """[d, *leaf.shape] per leaf: the VJP of the d outputs' signals, in one vmapped backward where autograd can
    batch it (else one backward per output)."""
    if d > 1 and not graph:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a slow per-output fallback of vmap: the plain loop instead
                pulled = torch.autograd.grad(outs, leaves, [delta.movedim(1, 0) for delta in deltas],
                                             retain_graph=True, allow_unused=True, is_grads_batched=True)
            return [leaf.new_zeros(d, *leaf.shape) if g is None else g for g, leaf in zip(pulled, leaves, strict=True)]
        except Exception:  # noqa: BLE001  (no batching rule for an operation of the forward: one pass per output)
            pass
    grads: list[list[Tensor]] = [[] for _ in leaves]
    for j in range(d):
        pulled = torch.autograd.grad(outs, leaves, [delta[:, j] for delta in deltas],
                                     retain_graph=graph or j < d - 1, create_graph=graph, allow_unused=True)
        for g_list, g, leaf in zip(grads, pulled, leaves, strict=True):
            g_list.append(torch.zeros_like(leaf) if g is None else g)
    return [torch.stack(g_list) for g_list in grads]
