"""nn.MultiheadAttention: its four projections are Linear maps over tokens.

With q_t = W_q x^q_t + b_q (and k, v alike over the key / value tokens) and out_t = W_o c_t + b_o (c the
merged heads), the per-sample gradients are sums over tokens of outer products (docs/method.md, "Layer-wise structure"):

    d in_proj_weight = [sum_t dq_t x^q_t^T ; sum_s dk_s x^k_s^T ; sum_s dv_s x^v_s^T]   (three groups),
    d out_proj.weight = sum_t dout_t c_t^T,  biases: the same sums without the inputs;
    bias_k / bias_v (one extra key / value token): the signal of that token.

``dout`` is the captured output signal itself. ``dq, dk, dv`` ([B, d, T, E]) come from recomputing the
attention from the captured query / key / value with the module's weights (zero-valued taps on the projected
q, k, v) and back-propagating the captured signals of the output and of the attention weights, all d outputs
at once. Masks follow ``F.multi_head_attention_forward``: key_padding_mask and attn_mask (bool: True = masked;
float: added; 2-D or per-sample-and-head 3-D), is_causal, add_zero_attn. The recomputed outputs are
compared with the module's own; a mismatch raises, so that the module goes to an exact fallback instead.

The out_proj child is never called (it is used through F.linear), so the rule claims its parameters
(``register(..., children=True)``); its factor is named after it ("attn.out_proj"), as on other backends.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._model import layer_of
from ...errors import ModelError
from ...factors import Dense, Factor
from . import Call, register, tensor
from .recurrent import check_recomputed, outer_factor, output_signal

_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A bool mask (True = masked) or a float mask -> an additive float mask."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ModelError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return mask.to(dtype)


# What the recomputation reads, by attribute (a parametrized weight is computed on access, not a parameter)
_TENSORS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k", "bias_v",
            "out_proj.weight", "out_proj.bias")


def _attention(module: nn.MultiheadAttention, q_in: Tensor, k_in: Tensor, v_in: Tensor, opts: dict,
               graph: bool) -> dict[str, Tensor]:
    """Recompute on batch-major q_in [B, L, E], k_in / v_in [B, S, .]: the tensors the factors and the
    signals need: heads qh (scaled), kh, vh [B, h, ., dh], attention weights w [B, h, L, S'], merged heads
    c [B, L, E], output out [B, L, E], returned weights (or None), out_proj weight."""
    p = {n: (t if graph else t.detach()) for n in _TENSORS if (t := tensor(module, n)) is not None}
    B, L, E = q_in.shape
    h = module.num_heads
    dh = E // h
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = p["in_proj_weight"].chunk(3)
    else:
        w_q, w_k, w_v = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    b_q, b_k, b_v = p["in_proj_bias"].chunk(3) if "in_proj_bias" in p else (None, None, None)
    S = k_in.shape[1]
    q, k, v = F.linear(q_in, w_q, b_q), F.linear(k_in, w_k, b_k), F.linear(v_in, w_v, b_v)

    kpm = _additive(opts["key_padding_mask"], q.dtype)
    need_weights, is_causal = opts["need_weights"], opts["is_causal"]
    if is_causal and opts["attn_mask"] is None:
        raise ModelError("is_causal=True needs attn_mask in nn.MultiheadAttention")
    if is_causal and kpm is None and not need_weights:  # torch then applies a true causal mask, not attn_mask
        mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril().logical_not()
        mask = _additive(mask, q.dtype)[None, None]
    else:
        mask = _additive(opts["attn_mask"], q.dtype)
        if mask is not None:
            mask = mask[None, None] if mask.dim() == 2 else mask.view(B, h, L, S)
    extra = []  # appended key / value tokens: bias_k / bias_v, then add_zero_attn's zeros
    if "bias_k" in p:
        extra.append((p["bias_k"].reshape(1, 1, E).expand(B, 1, E), p["bias_v"].reshape(1, 1, E).expand(B, 1, E)))
    if module.add_zero_attn:
        extra.append((k.new_zeros(B, 1, E), v.new_zeros(B, 1, E)))
    if extra:
        k = torch.cat([k] + [e[0] for e in extra], dim=1)
        v = torch.cat([v] + [e[1] for e in extra], dim=1)
        mask = None if mask is None else F.pad(mask, (0, len(extra)))
        kpm = None if kpm is None else F.pad(kpm, (0, len(extra)))
    if kpm is not None:
        kpm = kpm[:, None, None, :]
        mask = kpm if mask is None else mask + kpm
    qh, kh, vh = (t.reshape(B, -1, h, dh).transpose(1, 2) for t in (q, k, v))  # [B, h, ., dh]
    qh = qh * math.sqrt(1.0 / dh)
    scores = qh @ kh.transpose(-1, -2)
    if mask is not None:
        scores = scores + mask
    w = torch.softmax(scores, dim=-1)
    if not need_weights and mask is not None:  # scaled_dot_product_attention: fully masked rows get zero weights
        w = w.masked_fill(torch.isneginf(scores).all(-1, keepdim=True), 0.0)
    c = (w @ vh).transpose(1, 2).reshape(B, L, E)
    out = F.linear(c, p["out_proj.weight"], p.get("out_proj.bias"))
    weights = (w.mean(1) if opts["average_attn_weights"] else w) if need_weights else None
    return {"qh": qh, "kh": kh, "vh": vh, "w": w, "c": c, "out": out, "weights": weights,
            "w_o": p["out_proj.weight"]}


def _signals(r: dict[str, Tensor], d_out: Tensor, d_weights: Tensor | None, average: bool) -> dict[str, Tensor]:
    """The attention's backward written out, for all d outputs at once (no autograd, one batched pass).

    d_out [d, B, L, E] and the signal of the returned weights ([d, B, (h,) L, S'] or None) ->
    {"q": [B, d, L, E], "k": [B, d, S', E], "v": [B, d, S', E]}: signals of the projected q, k, v (the key /
    value tokens appended by bias_k / add_zero_attn come last). The d outputs are folded into the rows of
    the per-head matrix products, so each is one plain batched GEMM over (sample, head).
    """
    d, B, L, E = d_out.shape
    qh, kh, vh, w = r["qh"], r["kh"], r["vh"], r["w"]
    h, dh, S = qh.shape[1], qh.shape[-1], kh.shape[2]
    dc = (d_out @ r["w_o"]).reshape(d, B, L, h, dh).permute(1, 3, 0, 2, 4)  # [B, h, d, L, dh]
    dw = (dc.reshape(B, h, d * L, dh) @ vh.transpose(-1, -2)).view(B, h, d, L, S)
    if d_weights is not None:  # [d, B, (h,) L, S] -> [B, h | 1, d, L, S]
        dwt = d_weights.permute(1, 0, 2, 3)[:, None] / h if average else d_weights.permute(1, 2, 0, 3, 4)
        dw = dw + dwt
    dv = w.transpose(-1, -2) @ dc.transpose(2, 3).reshape(B, h, L, d * dh)  # [B, h, S, d * dh]
    ds = dw * w[:, :, None]
    ds = ds - w[:, :, None] * ds.sum(-1, keepdim=True)  # softmax backward; masked entries have w = 0
    dq = (ds.reshape(B, h, d * L, S) @ kh) * math.sqrt(1.0 / dh)  # [B, h, d * L, dh]
    dk = ds.transpose(-1, -2).reshape(B, h, d * S, L) @ qh  # qh is already scaled
    return {"q": dq.view(B, h, d, L, dh).permute(0, 2, 3, 1, 4).reshape(B, d, L, E),
            "k": dk.view(B, h, d, S, dh).permute(0, 2, 3, 1, 4).reshape(B, d, S, E),
            "v": dv.view(B, h, S, d, dh).permute(0, 3, 2, 1, 4).reshape(B, d, S, E)}


@register(nn.MultiheadAttention, children=True)
def multihead_attention(module: nn.MultiheadAttention, layer: str, calls: list[Call],
                        names: dict[str, str]) -> list[Factor]:
    bf = module.batch_first
    same = module._qkv_same_embed_dim
    # factor key -> list over calls of (a [B, G, T, m], delta [B, d, G, T, n]) or Dense g [B, d, n]
    outer_parts: dict[str, list[tuple[Tensor, Tensor]]] = {}
    dense_parts: dict[str, Tensor] = {}
    for call in calls:
        bound = _SIGNATURE.bind(module, *call.args, **call.kwargs)
        bound.apply_defaults()
        opts = bound.arguments
        q_in, k_in, v_in = opts["query"], opts["key"], opts["value"]
        if q_in.dim() != 3:
            raise ModelError(f"{layer} (MultiheadAttention): unbatched input of shape {tuple(q_in.shape)}: the "
                             "attention rule needs a batch axis")
        if not bf:
            q_in, k_in, v_in = (t.transpose(0, 1) for t in (q_in, k_in, v_in))
        graph = call.graph
        r = _attention(module, q_in, k_in, v_in, opts, graph)
        out, weights = call.module_output(module)
        mine = [r["out"]] + ([] if r["weights"] is None else [r["weights"]])
        theirs = [out if bf else out.transpose(0, 1)] + ([] if weights is None else [weights])
        check_recomputed(f"{layer} (MultiheadAttention)", mine, theirs)
        # signals of the output -> [d, B, L, E], of the returned weights -> [d, B, (h,) L, S]
        d_out = output_signal(call, 0) if bf else output_signal(call, 0).transpose(1, 2)  # [d, B, L, E]
        d_weights = output_signal(call, 1) if len(call.deltas) > 1 else None
        sig = _signals(r, d_out, d_weights, opts["average_attn_weights"])  # [B, d, T, E]
        c = r["c"]
        S = k_in.shape[1]
        if "bias_k" in names or "bias_v" in names:
            sig["bias_k"], sig["bias_v"] = sig["k"][:, :, S], sig["v"][:, :, S]
        sig["k"], sig["v"] = sig["k"][:, :, :S], sig["v"][:, :, :S]
        if not graph:
            c, q_in, k_in, v_in = c.detach(), q_in.detach(), k_in.detach(), v_in.detach()
        outer_parts.setdefault("out_proj", []).append((c[:, None], d_out.transpose(0, 1)[:, :, None]))
        if same:
            T = max(q_in.shape[1], k_in.shape[1])  # the three groups padded to T tokens (zero signal there)
            a = torch.stack([F.pad(t, (0, 0, 0, T - t.shape[1])) for t in (q_in, k_in, v_in)], dim=1)
            delta = torch.stack([F.pad(sig[n], (0, 0, 0, T - sig[n].shape[2])) for n in "qkv"], dim=2)
            outer_parts.setdefault("in_proj", []).append((a, delta))
        else:
            for n, t in zip("qkv", (q_in, k_in, v_in), strict=True):
                outer_parts.setdefault(n, []).append((t[:, None], sig[n][:, :, None]))
            g = torch.cat([sig[n].sum(2) for n in "qkv"], dim=-1)
            dense_parts["in_proj_bias"] = dense_parts.get("in_proj_bias", 0) + g
        for n in ("bias_k", "bias_v"):
            if n in sig:
                dense_parts[n] = dense_parts.get(n, 0) + sig[n]
    specs = {  # factor key -> (weight local name, bias local name)
        "out_proj": ("out_proj.weight", "out_proj.bias"),
        "in_proj": ("in_proj_weight", "in_proj_bias"),
        "q": ("q_proj_weight", None), "k": ("k_proj_weight", None), "v": ("v_proj_weight", None),
    }
    factors: list[Factor] = []
    for key, parts in outer_parts.items():
        w, b = specs[key]
        weight = (names[w], tensor(module, w).shape) if w in names else None
        bias = (names[b], tensor(module, b).shape) if b is not None and b in names else None
        if weight is None and bias is None:
            continue
        a = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=2)
        delta = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=3)
        factors.extend(outer_factor(layer_of((weight or bias)[0]), a, delta, weight, bias, calls[0].graph))
    for n, g in dense_parts.items():
        if n in names:
            factors.append(Dense(layer_of(names[n]), g, [(names[n], tensor(module, n).shape)]))
    return factors
