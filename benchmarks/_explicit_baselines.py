"""Opacus and BackPACK as per-sample gradient baselines of ``bench_models.py``, and the Gram of their explicit
gradients, normalised as every other method of the zoo benchmark (``bench_kernel.normalise``).

Both libraries compute the per-sample gradients of a *scalar* loss whose terms are the samples' own; for d outputs
one backward pass per output column gives the per-sample Jacobians, per parameter J_k [B, d, P_k] (as the
libraries give them: no concatenation into one [B, d, P], which would copy every gradient once more), and
K = sum_k J_k J_k^T [N, N, d, d], as the torch.func recipe's per-parameter contraction. Each works on its own
deep copy of the model, wrapped once (the wrapped modules keep hooks that must not touch the other methods'
runs). What a library cannot handle raises, with its own message: the benchmark reports "n/a: <reason>", never a
partial result.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Jacobians = Callable[..., list[Tensor]]  # inputs (a batch of B samples) -> per parameter J_k [B, d, P_k]
Columns = Callable[[Tensor], Tensor]  # model output [B, ...] -> the d outputs [B, d]


def opacus_jacobians(model: nn.Module, columns: Columns, probe: tuple[Tensor, ...]) -> tuple[Jacobians, str]:
    """Per-sample Jacobians by ``opacus.GradSampleModule`` (loss_reduction="sum"): one forward and one backward
    pass per output column (Opacus pops the activations it stored at each backward, so a forward serves one).

    Opacus's documented replacements (``ModuleValidator.fix``: nn.MultiheadAttention -> DPMultiheadAttention,
    nn.LSTM -> DPLSTM, nn.GRU -> DPGRU, weights copied) are used only where the fixed model computes the same
    outputs on ``probe`` (Opacus 1.6's DPMultiheadAttention with batch_first=True does not); its BatchNorm ->
    GroupNorm replacement (another function) never: a model with BatchNorm is left to GradSampleModule, which
    rejects it. Opacus records activations only in training mode, so every module except BatchNorm is put in
    training mode, checked on ``probe`` to change nothing (no active dropout in the zoo).
    Returns the Jacobian function and a note of the replacement path taken."""
    from opacus import GradSampleModule
    from opacus.validators import ModuleValidator

    with torch.no_grad():
        ref = columns(model(*probe))
    m = _train_mode(copy.deepcopy(model))
    note = ""
    fixable = sorted({type(s).__name__ for s in m.modules() if type(s) in ModuleValidator.FIXERS})
    if fixable and not any(isinstance(s, _BatchNorm) for s in m.modules()):
        fixed = _train_mode(ModuleValidator.fix(m))
        diff = _max_diff(fixed, columns, probe, ref)
        if diff <= 1e-5 * float(ref.abs().max()):
            m, note = fixed, "ModuleValidator.fix: " + ", ".join(fixable) + " -> Opacus's DP layers (same outputs)"
        else:
            note = (f"not ModuleValidator.fix: its {', '.join(fixable)} replacement changes the outputs by up to "
                    f"{diff:.2g}; Opacus's own path for the model as it is")
    diff = _max_diff(m, columns, probe, ref)
    if diff > 1e-5 * float(ref.abs().max()):
        raise RuntimeError(f"the model in training mode changes its outputs by {diff:.2g}")
    gsm = GradSampleModule(m, batch_first=True, loss_reduction="sum")  # strict: raises on layers with buffers
    named = [(n.removeprefix("_module."), p) for n, p in gsm.named_parameters() if p.requires_grad]

    def jacobians(*xs: Tensor) -> list[Tensor]:
        cols, c, d = [], 0, 1
        try:
            while c < d:
                for _, p in named:
                    p.grad_sample, p.grad = None, None
                y = columns(gsm(*xs))
                d = y.shape[1]
                y[:, c].sum().backward()
                cols.append(_flatten([(n, p.grad_sample) for n, p in named], xs[0].shape[0], "opacus", m))
                c += 1
        finally:
            for _, p in named:
                p.grad_sample, p.grad = None, None
        return _stack(cols)

    return jacobians, note


def backpack_jacobians(model: nn.Module, columns: Columns) -> tuple[Jacobians, str]:
    """Per-sample Jacobians by BackPACK: ``backpack.extend`` on a copy of the model, then one forward pass and,
    per output column, a backward inside ``with backpack(BatchGrad())`` (the stored inputs/outputs retained
    until the last column). Parameters BackPACK leaves without ``grad_batch`` (modules it has no extension for)
    are named in the error."""
    import backpack
    from backpack.extensions import BatchGrad

    m = backpack.extend(copy.deepcopy(model))
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]

    def jacobians(*xs: Tensor) -> list[Tensor]:
        y = columns(m(*xs))
        d, cols = y.shape[1], []
        try:
            for c in range(d):
                for _, p in named:
                    p.grad_batch, p.grad = None, None
                last = c == d - 1
                with backpack.backpack(BatchGrad(), retain_graph=not last):
                    y[:, c].sum().backward(retain_graph=not last)
                cols.append(_flatten([(n, getattr(p, "grad_batch", None)) for n, p in named], xs[0].shape[0],
                                     "backpack", m))
        finally:
            for _, p in named:
                p.grad_batch, p.grad = None, None
        return _stack(cols)

    return jacobians, ""


def _train_mode(m: nn.Module) -> nn.Module:
    for s in m.modules():
        s.training = not isinstance(s, _BatchNorm)
    return m


def _max_diff(m: nn.Module, columns: Columns, probe: tuple[Tensor, ...], ref: Tensor) -> float:
    with torch.no_grad():
        return float((columns(m(*probe)) - ref).abs().max())


def _stack(cols: list[list[Tensor]]) -> list[Tensor]:
    """Per output column, per parameter [B, P_k] -> per parameter [B, d, P_k] (a view where d = 1)."""
    if len(cols) == 1:
        return [g[:, None] for g in cols[0]]
    return [torch.stack(gs, 1) for gs in zip(*cols, strict=True)]


def _flatten(grads: list[tuple[str, object]], B: int, lib: str, model: nn.Module) -> list[Tensor]:
    """Per parameter, its per-sample gradients [B, ...] viewed as [B, P_k]; a clear error naming the parameters
    (and their modules' types) where the library left none or another number of rows than samples."""
    bad = {n: ("none" if g is None else "a list" if isinstance(g, list) else f"{g.shape[0]} rows")
           for n, g in grads if not (isinstance(g, Tensor) and g.shape[0] == B)}
    if bad:
        modules = dict(model.named_modules())
        owners = sorted({type(modules[n.rpartition(".")[0]]).__name__ for n in bad})
        shown = ", ".join(f"{n} ({v})" for n, v in list(bad.items())[:3])
        raise RuntimeError(f"{lib} gave no per-sample gradient of the {B} samples for {len(bad)} parameter(s) of "
                           f"{', '.join(owners)}: {shown}{', ...' if len(bad) > 3 else ''}")
    return [g.detach().reshape(B, -1) for _, g in grads]


def explicit_kernel(jacobians: Jacobians, x: tuple[Tensor, ...], d: int, P: int,
                    budget_bytes: float = 2**31) -> Tensor:
    """K [N, N, d, d] = sum_k J_k J_k^T from per-sample Jacobians J_k [N, d, P_k]: all at once where they fit
    ``budget_bytes``, else by blocks of samples, the column blocks' Jacobians recomputed (upper triangle only)."""
    N = x[0].shape[0]
    per_sample = 4 * d * P

    def gram(ja: list[Tensor], jb: list[Tensor]) -> Tensor:
        k = sum(a.flatten(0, 1) @ b.flatten(0, 1).T for a, b in zip(ja, jb, strict=True))
        return k.view(ja[0].shape[0], d, jb[0].shape[0], d).permute(0, 2, 1, 3)

    if N * per_sample <= budget_bytes:
        J = jacobians(*x)
        return gram(J, J)
    block = max(1, int(budget_bytes // (2 * per_sample)))
    K = None
    for s in range(0, N, block):
        ja = jacobians(*(t[s : s + block] for t in x))
        if K is None:
            K = ja[0].new_empty(N, N, d, d)
        for t in range(s, N, block):
            k = gram(ja, ja if t == s else jacobians(*(u[t : t + block] for u in x)))
            K[s : s + block, t : t + block] = k
            if t != s:
                K[t : t + block, s : s + block] = k.transpose(0, 1).transpose(-1, -2)
    return K
