"""Independent oracles: brute-force per-sample, per-output autograd, and the formulas written out."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def jacobian(model: nn.Module, inputs: tuple[Tensor, ...], output=None, params=None) -> Tensor:
    """G [N, d, P]: one sample, one output at a time, in eval mode."""
    was = model.training
    model.eval()
    plist = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rows = []
    for b in range(inputs[0].shape[0]):
        xb = tuple(t[b : b + 1] for t in inputs)
        out = model(*xb)
        y = out.reshape(1, -1) if output is None else output(out, xb)
        cols = []
        for c in range(y.shape[1]):
            gs = torch.autograd.grad(y[0, c], plist, retain_graph=True, allow_unused=True)
            cols.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, plist)]))
        rows.append(torch.stack(cols))
    model.train(was)
    return torch.stack(rows).detach()


def kernel(Ga: Tensor, Gb: Tensor) -> Tensor:
    """K[i, j] = G_a[i] G_b[j]^T, [N, M, d, d]."""
    return torch.einsum("icp,jep->ijce", Ga, Gb)


def db_sqrt(K: Tensor, iters: int = 60) -> tuple[Tensor, Tensor]:
    """(K^1/2, K^-1/2) of SPD matrices [..., d, d] by the Denman-Beavers iteration (LU inverses, no eigh)."""
    eye = torch.eye(K.shape[-1], dtype=K.dtype).expand_as(K)
    Y, Z = K.clone(), eye.clone()
    for _ in range(iters):
        Y, Z = 0.5 * (Y + torch.linalg.inv(Z)), 0.5 * (Z + torch.linalg.inv(Y))
    return Y, Z


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def overflowing(out: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
    """An output spec whose gradients overflow to inf where x_0 > 5 (a sample with non-finite gradients)."""
    return out * (1 + 1e300 * (inputs[0][:, :1] > 5).to(out.dtype))
