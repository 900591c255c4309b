"""nn.LSTM and nn.GRU: the gate pre-activations over time are affine maps shared over the time steps.

For layer l and direction k, the input projection ``gi_t = W_ih x_t + b_ih`` and the hidden projection
``gh_t = W_hh h_{t-1} + b_hh`` act like a Linear layer applied at every time step, so the per-sample
gradients are sums over positions (= time steps) of outer products (docs/method.md, "Layer-wise structure"):

    dW_ih = sum_t dgi_t x_t^T,  db_ih = sum_t dgi_t,  dW_hh = sum_t dgh_t h_{t-1}^T,  db_hh = sum_t dgh_t,

and, with ``proj_size`` (LSTM), ``dW_hr = sum_t dh_t u_t^T`` with u_t = o_t * tanh(c_t) the unprojected
state. For the LSTM ``dgh_t = dgi_t``; for the GRU the new-gate part of ``dgh_t`` is ``dgi_t * r_t`` (b_hn sits
inside ``r * (W_hn h + b_hn)``), so both projections get their own signal.

The signals dgi_t, dgh_t, dh_t ([B, d, T, .]) are obtained exactly by recomputing the recurrence from the
captured inputs with the module's own weights (an explicit per-step cell with zero-valued taps on gi, gh and
the projected h) and back-propagating the captured output signals (output, h_n, c_n) through it, all d
outputs at once. The recomputed outputs are compared with the module's own; a mismatch (an unknown variant,
dropout in training mode) raises, so that the module is computed by an exact fallback instead.
PackedSequence inputs are supported: the recurrence is recomputed on the padded sequences with each
sample's state held past its length, and the output is compared and back-propagated as packed data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ..._model import layer_of
from ...errors import ModelError
from ...factors import Dense, Factor, Outer, ParamSpec
from . import Call, register


def _param(module: nn.Module, name: str, graph: bool) -> Tensor | None:
    p = getattr(module, name, None)
    return p if p is None or graph else p.detach()


def _zero_leaf(shape: tuple[int, ...], like: Tensor) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device, requires_grad=True)


def check_recomputed(name: str, mine: list[Tensor], theirs: list[Tensor]) -> None:
    """Raise unless the recomputed outputs equal the module's own (to float rounding)."""
    for a, b in zip(mine, theirs, strict=True):
        if a.shape != b.shape:
            raise ModelError(f"{name}: the recomputed output has shape {tuple(a.shape)}, the module's "
                             f"{tuple(b.shape)}; the layer rule does not apply to this module")
        # float32 allows for fused / TF32 kernels; a variant the rule does not know differs by O(1)
        tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(b.dtype, 5e-2)
        err = float((a.detach() - b).abs().max()) if b.numel() else 0.0
        scale = float(b.abs().max()) if b.numel() else 0.0
        if not err <= tol * (1.0 + scale):  # also catches NaN
            raise ModelError(f"{name}: the recomputed output differs from the module's by {err:.3g} "
                             f"(tolerance {tol * (1 + scale):.3g}); the layer rule does not apply to this module "
                             "(a variant it does not know, or dropout in training mode)")


def outer_factor(layer: str, a: Tensor, delta: Tensor, weight: ParamSpec | None, bias: ParamSpec | None,
                 graph: bool = False) -> list[Factor]:
    """The factors of a weight [G*n, m] (inputs a [B, G, T, m]) and a bias [G*n], signals delta [B, d, G, T, n].

    An Outer factor, unless the cost model would pick the explicit gradient for every Gram mode (long
    sequences): then the explicit gradients are built here, once: one batched GEMM for the weight and a sum
    over positions for the bias, as two Dense factors (no ones column, no concatenation copy; measured 2x
    faster than building them through the pipeline on an LSTM at T = 32).
    """
    B, d, G, T, n = delta.shape
    m = a.shape[-1] if weight is not None else 0
    # the cost model reads shapes only: ask it with a stand-in, so that the padded inputs are built only if used
    stub = Outer(layer, a.new_zeros(()).expand(B, G, T, m + (bias is not None)), delta, weight, bias)
    if not (stub.prefers_dense("trace") and stub.prefers_dense("full")) or graph:
        a_ones = a if weight is not None else a[..., :0]
        if bias is not None:
            a_ones = F.pad(a_ones, (0, 1), value=1.0)
        f = Outer(layer, a_ones, delta, weight, bias)
        return [f.dense() if graph and stub.prefers_dense("trace") and stub.prefers_dense("full") else f]
    out: list[Factor] = []
    if weight is not None:  # [B, G, d, n, T] @ [B, G, 1, T, m] -> [B, G, d, n, m] -> [B, d, G n m]
        g = (delta.permute(0, 2, 1, 4, 3) @ a[:, :, None]).transpose(1, 2)
        out.append(Dense(layer, g.reshape(B, d, G * n * m), [weight]))
    if bias is not None:
        out.append(Dense(layer, delta.sum(3).reshape(B, d, G * n), [bias]))
    return out


def batched_vjp(outputs: list[Tensor], leaves: list[Tensor], deltas: list[Tensor], graph: bool) -> list[Tensor]:
    """d-batched vector-Jacobian products: deltas [d, *output.shape] -> [d, *leaf.shape] for every leaf."""
    d = deltas[0].shape[0]
    if d == 1:
        grads = torch.autograd.grad(outputs, leaves, [g[0] for g in deltas], allow_unused=True, create_graph=graph)
        grads = [None if g is None else g[None] for g in grads]
    else:
        grads = torch.autograd.grad(outputs, leaves, deltas, allow_unused=True, create_graph=graph,
                                    is_grads_batched=True)
    return [torch.zeros(d, *z.shape, dtype=z.dtype, device=z.device) if g is None else g
            for g, z in zip(grads, leaves, strict=True)]


class _Direction:
    """What one (layer, direction) of the recurrence needs for its factors, time-major."""

    def __init__(self, suffix: str, x: Tensor, h_prev: Tensor, u: Tensor | None, taps: dict[str, Tensor]) -> None:
        self.suffix, self.x, self.h_prev, self.u, self.taps = suffix, x, h_prev, u, taps


def _run(module: nn.LSTM | nn.GRU, x: Tensor, hx: object, graph: bool,
         lengths: Tensor | None = None) -> tuple[list[Tensor], list[_Direction]]:
    """Recompute the module on time-major x [T, B, I]: ([output, h_n(, c_n)], per-direction records).

    ``lengths`` [B] (packed sequences): a sample's state is held past its last step, so each direction
    sees exactly its own steps (the reverse one starts from h0 at the sample's last step)."""
    lstm = isinstance(module, nn.LSTM)
    T, B, _ = x.shape
    L, D, H = module.num_layers, 2 if module.bidirectional else 1, module.hidden_size
    P = module.proj_size if lstm and module.proj_size > 0 else H
    if hx is None:
        h0 = x.new_zeros(L * D, B, P)
        c0 = x.new_zeros(L * D, B, H)
    elif lstm:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    records: list[_Direction] = []
    h_n, c_n = [], []
    keep = None if lengths is None else [(t < lengths.to(x.device))[:, None] for t in range(T)]
    for layer in range(L):
        outs = []
        for k in range(D):
            sfx = f"_l{layer}" + ("_reverse" if k else "")
            w_ih, w_hh = _param(module, "weight_ih" + sfx, graph), _param(module, "weight_hh" + sfx, graph)
            b_ih, b_hh = _param(module, "bias_ih" + sfx, graph), _param(module, "bias_hh" + sfx, graph)
            w_hr = _param(module, "weight_hr" + sfx, graph) if P != H else None
            taps = {"gi": _zero_leaf((T, B, w_ih.shape[0]), x)}
            gis = (F.linear(x, w_ih, b_ih) + taps["gi"]).unbind(0)  # unbind: its backward is one stack
            if not lstm:
                taps["gh"] = _zero_leaf((T, B, w_hh.shape[0]), x)
            if w_hr is not None:
                taps["h"] = _zero_leaf((T, B, P), x)
            ghz = taps["gh"].unbind(0) if "gh" in taps else None
            hz = taps["h"].unbind(0) if "h" in taps else None
            h, c = h0[layer * D + k], None if c0 is None else c0[layer * D + k]
            hs, prev, us = [None] * T, [None] * T, [None] * T
            for t in range(T - 1, -1, -1) if k else range(T):
                prev[t] = h
                gh = F.linear(h, w_hh, b_hh)
                if lstm:
                    i, f, g, o = (gis[t] + gh).chunk(4, -1)
                    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h_new = us[t] = torch.sigmoid(o) * torch.tanh(c_new)
                    if w_hr is not None:
                        h_new = F.linear(h_new, w_hr) + hz[t]
                    c = c_new if keep is None else torch.where(keep[t], c_new, c)
                else:
                    gh = gh + ghz[t]
                    ir, iz, i_n = gis[t].chunk(3, -1)
                    hr, hzz, hn = gh.chunk(3, -1)
                    r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hzz)
                    h_new = (1 - z) * torch.tanh(i_n + r * hn) + z * h
                h = hs[t] = h_new if keep is None else torch.where(keep[t], h_new, h)
            records.append(_Direction(sfx, x, torch.stack(prev), torch.stack(us) if w_hr is not None else None,
                                      taps))
            outs.append(torch.stack(hs))
            h_n.append(h)
            c_n.append(c)
        x = outs[0] if D == 1 else torch.cat(outs, dim=-1)
    results = [x, torch.stack(h_n)]
    if lstm:
        results.append(torch.stack(c_n))
    return results, records


def _packed_rows(x: PackedSequence) -> tuple[Tensor, Tensor]:
    """(time step, sample) of each row of a packed sequence's data, samples in their original order."""
    sizes = x.batch_sizes.tolist()
    order = torch.arange(sizes[0]) if x.sorted_indices is None else x.sorted_indices.cpu()
    t = torch.repeat_interleave(torch.arange(len(sizes)), x.batch_sizes.cpu())
    b = torch.cat([order[:n] for n in sizes])
    dev = x.data.device
    return t.to(dev), b.to(dev)


def output_signal(call: Call, j: int) -> Tensor:
    """The signal of the j-th floating output as [d, *output_j.shape].

    ``deltas[j]`` is the output's shape with d inserted at axis 1, after the backend moved the output's
    batch axis to the front where it knows it (``call.out_batched``, {j: axis}); this undoes both.
    """
    axis = (getattr(call, "out_batched", None) or {}).get(j, 0)
    return call.deltas[j].movedim(1, 0).movedim(1, axis + 1)


def _as_outer(t: Tensor, graph: bool) -> Tensor:
    """Time-major [T, B, m] -> [B, 1, T, m] (layer inputs), detached unless graph."""
    t = t.permute(1, 0, 2)[:, None]
    return t if graph else t.detach()


def _signal(g: Tensor) -> Tensor:
    """[d, T, B, n] -> [B, d, 1, T, n]."""
    return g.permute(2, 0, 1, 3)[:, :, None]


@register(nn.LSTM, nn.GRU)
def recurrent(module: nn.LSTM | nn.GRU, layer: str, calls: list[Call], names: dict[str, str]) -> list[Factor]:
    kind = type(module).__name__
    lstm = isinstance(module, nn.LSTM)
    # (weight, bias) local names -> [(a [B, 1, T, m], delta [B, d, 1, T, n])] over calls
    pieces: dict[tuple[str, str | None], list[tuple[Tensor, Tensor]]] = {}
    for call in calls:
        x = call.input()
        hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
        lengths = rows = None
        if isinstance(x, PackedSequence):  # padded time-major, original sample order; rows of the packed data
            rows = _packed_rows(x)
            x, lengths = pad_packed_sequence(x)
        elif x.dim() != 3:
            raise ModelError(f"{layer} ({kind}): unbatched input of shape {tuple(x.shape)}: the {kind} rule needs "
                             "a batch axis")
        graph = call.graph
        x_tm = x.transpose(0, 1) if module.batch_first and rows is None else x
        with torch.enable_grad():
            results, records = _run(module, x_tm, hx, graph, lengths)
            out, state = call.module_output(module)
            if rows is not None:  # the packed output data [sum of lengths, D*P]
                results[0], out = results[0][rows], out.data
            theirs = [out.transpose(0, 1) if module.batch_first and rows is None else out]
            theirs += list(state) if lstm else [state]
            check_recomputed(f"{layer} ({kind})", results, theirs)
            # Output signals: [d, T, B, D*P] (packed: [d, rows, D*P]), h_n / c_n: [d, L*D, B, .].
            deltas = [output_signal(call, j) for j in range(len(call.deltas))]  # [d, *output shape]
            if module.batch_first and rows is None:
                deltas[0] = deltas[0].transpose(1, 2)  # [d, T, B, D*P] like the recomputed output
            leaves = [z for r in records for z in r.taps.values()]
            grads = iter(batched_vjp(results, leaves, deltas, graph))
        for r in records:
            g = {key: _signal(next(grads)) for key in r.taps}
            dgh = g["gh"] if "gh" in g else g["gi"]
            pieces.setdefault(("weight_ih" + r.suffix, "bias_ih" + r.suffix), []).append((_as_outer(r.x, graph),
                                                                                           g["gi"]))
            pieces.setdefault(("weight_hh" + r.suffix, "bias_hh" + r.suffix), []).append(
                (_as_outer(r.h_prev, graph), dgh))
            if r.u is not None:
                pieces.setdefault(("weight_hr" + r.suffix, None), []).append((_as_outer(r.u, graph), g["h"]))
    factors: list[Factor] = []
    for (w, b), parts in pieces.items():
        weight = (names[w], getattr(module, w).shape) if w in names else None
        bias = (names[b], getattr(module, b).shape) if b is not None and b in names else None
        if weight is None and bias is None:
            continue
        a = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=2)
        delta = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=3)
        factors.extend(outer_factor(layer_of((weight or bias)[0]), a, delta, weight, bias, calls[0].graph))
    return factors
