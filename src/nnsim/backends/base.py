"""What every backend shares: the analysis problem and the checked evaluation of the outputs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._model import layer_of
from ..errors import ModelError
from ..factors import Dense, Factor
from ..outputs import OutputFn
from .exact_ops import exact_batch_norm


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training for m in model.modules())


@dataclass
class Problem:
    """A model, the parameters analysed (name -> tensor, registration order) and the output spec.

    ``keys``: the input names when the inputs are a mapping (``{"input_ids": ..., "attention_mask": ...}``,
    a Hugging Face ``BatchEncoding``): a batch is always a tuple of tensors, and the model is called with
    them as keyword arguments. None: positional inputs.
    """

    model: nn.Module
    params: dict[str, nn.Parameter]
    output: OutputFn
    keys: tuple[str, ...] | None = None

    def inputs(self, batch: tuple[Tensor, ...]) -> tuple[Tensor, ...] | dict[str, Tensor]:
        """The batch as the user gave it: a tuple, or a dict for keyword inputs (what ``output`` receives)."""
        return batch if self.keys is None else dict(zip(self.keys, batch, strict=True))

    def call(self, batch: tuple[Tensor, ...], model: nn.Module | None = None) -> object:
        """Run the model (or ``model``, e.g. a functional stand-in) on a batch. One sample of a model with batch
        norms runs them decomposed (exact_ops: the fused kernel's backward is wrong there)."""
        model = self.model if model is None else model
        one = batch and batch[0].dim() > 0 and batch[0].shape[0] == 1 and _has_batch_norm(model)
        with exact_batch_norm() if one else contextlib.nullcontext():
            return model(*batch) if self.keys is None else model(**self.inputs(batch))


def checked_output(
    problem: Problem, raw: object, batch: tuple[Tensor, ...], start: int = 0, values: bool = True
) -> Tensor:
    """Apply the output spec and check its result is a [B, d] tensor (and finite, if ``values``)."""
    B = batch[0].shape[0]
    try:
        y = problem.output(raw, problem.inputs(batch))
    except TypeError as err:
        raise ModelError(str(err)) from err
    if not isinstance(y, Tensor) or y.dim() != 2 or y.shape[0] != B:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ModelError(f"the output spec must return a [B, d] tensor with B = {B} samples, got {shape}; "
                         "flatten or select the outputs to analyse per sample")
    if y.shape[1] == 0:
        raise ModelError("the output spec returned d = 0 outputs per sample")
    if not y.is_floating_point():
        raise ModelError(f"the analysed output must be floating point, got {y.dtype}")
    if values:
        check_finite_output(y, start)
    return y


def check_finite_output(y: Tensor, start: int = 0) -> None:
    finite = torch.isfinite(y.detach()).all(dim=1)
    if not bool(finite.all()):
        idx = (torch.nonzero(~finite).flatten() + start).tolist()
        raise ModelError(f"the model output contains NaN or Inf at samples {idx[:20]}")


def dense_by_layer(problem: Problem, grads: dict[str, Tensor]) -> list[Factor]:
    """Per-parameter Jacobians {name: [B, d, *shape]} -> one Dense factor per owning module."""
    layers: dict[str, list[str]] = {}
    for name in grads:
        layers.setdefault(layer_of(name), []).append(name)
    out: list[Factor] = []
    for layer, names in layers.items():
        g = torch.cat([grads[n].reshape(*grads[n].shape[:2], -1) for n in names], dim=2)
        out.append(Dense(layer, g, [(n, problem.params[n].shape) for n in names]))
    return out
