"""Training many small MLPs at once: the runs of the toy experiment stacked along a leading run axis.

Every run r has its own weights W_l[r], its own data (x[r], y[r]) and its own shuffling generator. The forward
pass is a batched matmul over runs; the loss is the *sum over runs* of each run's mean L1 loss, so the
gradient that reaches W_l[r] is exactly run r's own gradient; Adam is element-wise (no weight decay, no
global clipping), so one Adam over the stacked tensors is exactly R independent Adams. The only difference
from training the R models one after another is floating-point summation order inside the batched matmuls.

Pure tensor code: no files, no CLI (the experiment module does those).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


def make_mlp(width: int = 64, hidden: int = 6, in_dim: int = 2) -> nn.Sequential:
    """The authors' ``Simple1DInputNet``: Linear(in->w), ReLU, (hidden-1) x [Linear(w->w), ReLU], Linear(w->1)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, width), nn.ReLU()]
    for _ in range(hidden - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def init_mlp(seed: int, width: int = 64, hidden: int = 6) -> nn.Sequential:
    """A freshly initialised MLP (PyTorch default init) drawn from ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_mlp(width, hidden)


def linear_layers(model: nn.Sequential) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def stack_params(models: Sequence[nn.Sequential]) -> list[Tensor]:
    """[W_1, b_1, W_2, b_2, ...] with a leading run axis: W_l [R, out, in], b_l [R, out] (copies, leaf tensors)."""
    per_model = [linear_layers(m) for m in models]
    out = []
    for layers in zip(*per_model):
        out.append(torch.stack([lin.weight.detach() for lin in layers]).clone().requires_grad_(True))
        out.append(torch.stack([lin.bias.detach() for lin in layers]).clone().requires_grad_(True))
    return out


def unstack_params(params: Sequence[Tensor], run: int, width: int = 64, hidden: int = 6) -> nn.Sequential:
    """Run ``run``'s weights as an ordinary ``nn.Sequential`` (for analysis with nnsim)."""
    model = make_mlp(width, hidden)
    with torch.no_grad():
        for i, lin in enumerate(linear_layers(model)):
            lin.weight.copy_(params[2 * i][run])
            lin.bias.copy_(params[2 * i + 1][run])
    return model


def stacked_forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """x [R, B, in] -> [R, B, 1]: every run's MLP applied to its own batch (ReLU between linear layers)."""
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        W, b = params[2 * i], params[2 * i + 1]
        h = torch.baddbmm(b.unsqueeze(1), h, W.transpose(1, 2))
        if i < n_layers - 1:
            h = torch.relu(h)
    return h


def epoch_orders(generators: Sequence[torch.Generator], n: int) -> Tensor:
    """One shuffled sample order per run for the next epoch, [R, n] (each run draws from its own generator)."""
    return torch.stack([torch.randperm(n, generator=g) for g in generators])


@dataclass
class TrainState:
    """Everything needed to continue a stacked training exactly where it stopped."""

    params: list[Tensor]
    optimizer: torch.optim.Adam
    generators: list[torch.Generator]
    epoch: int = 0
    epoch_loss: list[Tensor] = field(default_factory=list)  # per finished epoch: [R] mean training L1 loss

    def state_dict(self) -> dict:
        return {"params": [p.detach().clone() for p in self.params], "optimizer": self.optimizer.state_dict(),
                "generators": [g.get_state() for g in self.generators], "epoch": self.epoch,
                "epoch_loss": [t.clone() for t in self.epoch_loss]}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for p, q in zip(self.params, state["params"]):
                p.copy_(q)
        self.optimizer.load_state_dict(state["optimizer"])
        for g, s in zip(self.generators, state["generators"]):
            g.set_state(s)
        self.epoch = int(state["epoch"])
        self.epoch_loss = list(state["epoch_loss"])


def new_state(models: Sequence[nn.Sequential], shuffle_seeds: Sequence[int], lr: float = 1e-4) -> TrainState:
    """Stack ``models`` and give each run an Adam state and a shuffling generator seeded by ``shuffle_seeds``."""
    if len(models) != len(shuffle_seeds):
        raise ValueError(f"{len(models)} models but {len(shuffle_seeds)} shuffle seeds")
    params = stack_params(models)
    opt = make_adam(params, lr)
    gens = [torch.Generator().manual_seed(int(s)) for s in shuffle_seeds]
    return TrainState(params, opt, gens)


def make_adam(params: Sequence[Tensor], lr: float) -> torch.optim.Adam:
    """Adam with the fused CPU kernel when available (1.6x faster here than the per-tensor loop, same update)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # torch < 2.4 or a device without the fused kernel
        return torch.optim.Adam(params, lr=lr)


def train_stacked(state: TrainState, x: Tensor, y: Tensor, epochs: int, batch_size: int = 64,
                  callback: Callable[[TrainState], None] | None = None) -> TrainState:
    """Train every run for ``epochs`` more epochs of shuffled mini-batches with the mean L1 loss.

    Args:
        state: stacked weights, Adam state and per-run generators (see :func:`new_state`); updated in place.
        x: [R, n, in] inputs of each run; y: [R, n, 1] targets.
        epochs: epochs to add; each is ceil(n / batch_size) steps (the last batch may be smaller).
        callback: called after every epoch (checkpointing, progress).
    """
    R, n = x.shape[0], x.shape[1]
    if y.shape[:2] != (R, n) or len(state.generators) != R:
        raise ValueError(f"x {tuple(x.shape)}, y {tuple(y.shape)} and {len(state.generators)} runs disagree")
    steps = math.ceil(n / batch_size)
    rows = torch.arange(R).unsqueeze(1)
    for _ in range(epochs):
        order = epoch_orders(state.generators, n)
        total = torch.zeros(R)
        for s in range(steps):
            idx = order[:, s * batch_size : (s + 1) * batch_size]
            xb, yb = x[rows, idx], y[rows, idx]
            pred = stacked_forward(state.params, xb)
            per_run = (pred - yb).abs().mean(dim=(1, 2))  # [R]
            state.optimizer.zero_grad(set_to_none=True)
            per_run.sum().backward()
            state.optimizer.step()
            total += per_run.detach() * idx.shape[1]
        loss = total / n
        if not torch.isfinite(loss).all():
            bad = torch.nonzero(~torch.isfinite(loss)).flatten().tolist()
            raise FloatingPointError(f"runs {bad} produced a non-finite loss at epoch {state.epoch + 1}")
        state.epoch_loss.append(loss)
        state.epoch += 1
        if callback is not None:
            callback(state)
    return state


def train_single(model: nn.Module, x: Tensor, y: Tensor, epochs: int, shuffle_seed: int, batch_size: int = 64,
                 lr: float = 1e-4) -> nn.Module:
    """The plain, one-model-at-a-time reference: same batches (same generator draws), same loss, own Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(int(shuffle_seed))
    n = len(x)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(math.ceil(n / batch_size)):
            idx = order[s * batch_size : (s + 1) * batch_size]
            loss = (model(x[idx]) - y[idx]).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model
