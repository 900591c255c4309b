"""The full analysis behind ``nnsim analyze`` and ``nnsim demo``: public-API calls plus bookkeeping.

Per sample: the soft density, its k nearest neighbours, the denoising factor / effective number of
neighbours, label consistency (how far the kernel-weighted average of the neighbours' labels is from the
sample's own label) and neighbour label agreement. Nothing here reads or writes files.

Under ``torchrun`` (an initialised default process group) every rank runs :func:`run_analysis`: the three
nnsim calls are collective (each rank computes a share, every rank gets the full result), the cheap local
steps between them run on every rank inside :class:`nnsim.distributed.together`, so that a failure on one
rank is raised on all of them instead of leaving the others waiting in the next collective.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from .. import Similarity, distributed
from ..errors import InputError, ModelError

T = TypeVar("T")


@dataclass
class Analysis:
    """Per-sample arrays (numpy, length N) and the summary numbers of one analysis."""

    columns: dict[str, np.ndarray]
    neighbor_index: np.ndarray  # [N, k] int, best first (the sample itself excluded)
    neighbor_similarity: np.ndarray  # [N, k]
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# The library's exact method="linearized" eigendecomposes the [N d, N d] kernel up to this many rows (and refuses
# more); above it the analysis asks for its Nystroem approximation instead of failing.
LINEARIZED_EXACT_MAX_ROWS = 6000


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, device: str, batch: int = 1024) -> Tensor:
    """Model outputs flattened to [N, d] (float32, on the CPU)."""
    return torch.cat([model(b.to(device)).flatten(1).float().cpu() for b in x.split(batch)])


def run_analysis(sim: Similarity, model: nn.Module, x: Tensor, y: Tensor | None, *, k: int = 10,
                 exact_denoising: bool = False, dim: int = 256, device: str = "cpu",
                 log: Callable[[str], None] = print, noisy_targets: Tensor | None = None) -> Analysis:
    """Density, neighbours, denoising and label consistency of ``x [N, ...]`` (labels ``y [N]`` optional).

    ``noisy_targets`` [N, d]: the regression targets the network was trained on; adds the label-free sigma
    estimate and the predicted noise-induced error (``method="linearized"``, Nystroem above N d = 6000).
    """
    n = len(x)
    if n < 2 or not 1 <= k < n:
        raise InputError(f"the analysis needs at least 2 samples and 1 <= k < N, got N = {n}, k = {k}")
    timings: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        log(f"[{name}] ...")
        t0 = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        log(f"[{name}] done in {timings[name]:.1f} s")
        return out

    comm = distributed.resolve(None)  # the group of the nnsim calls below (None in a plain run)
    with distributed.together(comm):
        logits, cols = _prediction_columns(model, x, y, k, device)
    density = step("density", lambda: nonzero_gradients(lambda: sim.density(x)))
    cols["density"] = density.double().numpy()
    vals, idx = step("neighbors", lambda: sim.neighbors(x, k=k, exclude_self=True))
    nn_idx, nn_sim = idx.numpy(), vals.double().numpy()

    with distributed.together(comm):
        d = sim.d
        label_targets = None
        if y is not None and d == logits.shape[1] > 1 and int(y.max()) < d:
            label_targets = torch.nn.functional.one_hot(y, d).to(logits.dtype)
        elif y is not None:  # said, not silent: which consistency the columns hold, and why
            log(f"the analysed output has {d} value(s) per sample, not one per class of the {logits.shape[1]}-output "
                "model: prediction_consistency (of the model's outputs) is computed instead of label_consistency")
    report = step("denoising", lambda: sim.denoising(x, predictions=label_targets, approximate=not exact_denoising,
                                                     dim=dim))
    lin = None
    if noisy_targets is not None:
        rows = n * noisy_targets.reshape(n, -1).shape[1]
        lin = step("denoising (linearized)", lambda: sim.denoising(
            x, targets=noisy_targets.to(x.dtype), method="linearized", approximate=rows > LINEARIZED_EXACT_MAX_ROWS))
    with distributed.together(comm):
        result = _finish(cols, report, label_targets is not None, nn_idx, nn_sim, y, n, d, k, exact_denoising, dim,
                         timings)
        if lin is not None:
            _add_linearized(result, lin)
        return result


def _prediction_columns(model: nn.Module, x: Tensor, y: Tensor | None, k: int, device: str
                        ) -> tuple[Tensor, dict[str, np.ndarray]]:
    """The model's logits [N, C] and the per-sample columns that need no eNTK: prediction and confidence (a
    classifier), and with labels the loss, cleanlab's self-confidence and the input-space kNN baseline."""
    logits = predict(model, x, device)
    cols: dict[str, np.ndarray] = {"index": np.arange(len(x))}
    classifier = logits.shape[1] > 1
    if classifier:
        prob = logits.softmax(1)
        cols["prediction"] = logits.argmax(1).numpy()
        cols["confidence"] = prob.max(1).values.numpy()
    if y is not None:
        cols["label"] = y.numpy()
        if classifier:
            if int(y.max()) >= logits.shape[1]:
                raise InputError(f"labels go up to {int(y.max())} but the model has {logits.shape[1]} outputs: "
                                 "labels must be the model's class indices")
            cols["prediction_matches_label"] = (cols["prediction"] == cols["label"])
            cols["loss"] = torch.nn.functional.cross_entropy(logits, y, reduction="none").numpy()
            confidence = self_confidence(y.numpy(), prob.double().numpy())
            if confidence is not None:
                cols["self_confidence"] = confidence
        # Baseline: the same neighbour vote with plain input-space (Euclidean) neighbours.
        cols["input_knn_disagreement"] = input_knn_disagreement(x, y, k)
    return logits, cols


def _add_linearized(result: Analysis, lin: Any) -> None:
    """The label-free sigma estimate and predicted error (columns and summary)."""
    result.columns["predicted_error"] = lin.predicted_error.double().numpy()
    result.columns["predicted_error_untrusted"] = lin.ill_conditioned.numpy()
    result.summary["label_noise"] = {
        "sigma_hat": float(lin.noise_std), "predicted_error": _stats(result.columns["predicted_error"]),
        "untrusted_samples": int(lin.ill_conditioned.sum()), "smoother_fit_error": float(lin.fit_error),
        "method": "linearized" + (" (Nystroem)" if lin.approximate else " (exact)")}


def self_confidence(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray | None:
    """cleanlab's label quality score ``method="self_confidence"`` (the predicted probability of the given
    label; low: likely mislabelled), or None when cleanlab is not installed. Here the model's own predictions on
    its training data, not cleanlab's recommended out-of-sample ones: a baseline, as the training loss is."""
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        return None
    return np.asarray(get_label_quality_scores(labels, pred_probs, method="self_confidence"), dtype=float)


@torch.no_grad()
def input_knn_disagreement(x: Tensor, y: Tensor, k: int) -> np.ndarray:
    """[N] share of the k nearest neighbours in input space (Euclidean on the flattened inputs, the sample
    itself excluded) whose label differs from the sample's: the label-noise baseline that needs no network."""
    flat = x.flatten(1).double()
    sq = (flat * flat).sum(1)
    out = np.empty(len(x))
    chunk = max(16, min(512, 2**23 // len(x)))  # rows of squared distances per step: at most ~64 MB
    for s in range(0, len(x), chunk):
        d2 = sq[s:s + chunk, None] - 2 * flat[s:s + chunk] @ flat.T + sq[None]
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = float("inf")  # not its own neighbour
        idx = d2.topk(k, dim=1, largest=False).indices
        out[s:s + chunk] = (y[idx] != y[s:s + chunk, None]).double().mean(1).numpy()
    return out


def nonzero_gradients(compute: Callable[[], T], values: Callable[[T], Tensor] = lambda r: r) -> T:
    """``compute()``, refused with a :class:`ModelError` when ``values`` of it (per-sample values, NaN where a
    sample's gradient is zero) are all NaN: all gradients are zero and nothing can be compared. The library's
    per-sample warnings are held meanwhile, and shown when only some samples are affected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = compute()
    v = values(result)
    if len(v) and not bool(torch.isfinite(v).any()):
        raise ModelError("the model's gradients are zero for every sample, so their similarity is undefined: a "
                         "constant output (e.g. a dead ReLU before the output), or parameters the output does not "
                         "depend on (check --params / params=)")
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return result


def _finish(cols: dict[str, np.ndarray], report: Any, one_hot_labels: bool, nn_idx: np.ndarray, nn_sim: np.ndarray,
            y: Tensor | None, n: int, d: int | None, k: int, exact_denoising: bool, dim: int,
            timings: dict[str, float]) -> Analysis:
    """The columns and summary derived from the three nnsim results (local work)."""
    cols["denoising_factor"] = report.factor.double().numpy()
    cols["effective_neighbors"] = report.effective_neighbors.double().numpy()
    # |onehot(y_i) - sum_j W_ij onehot(y_j)|, or the same of the model's outputs
    cols["label_consistency" if one_hot_labels else "prediction_consistency"] = report.consistency.double().numpy()
    if y is not None:
        valid = nn_idx >= 0
        same = (y.numpy()[np.where(valid, nn_idx, 0)] == y.numpy()[:, None]) & valid
        cols["neighbor_label_agreement"] = same.sum(1) / np.maximum(valid.sum(1), 1)
        # Most likely mislabelled first: the label the network's neighbours disagree with the most.
        score = 1.0 - cols["neighbor_label_agreement"]
        if "label_consistency" in cols:
            score = score + cols["label_consistency"] / np.sqrt(2.0)  # consistency of one-hot labels is <= ~sqrt(2)
        cols["mislabel_score"] = score

    mode = "exact" if exact_denoising else f"approximate (dim={dim}); label consistency exact"
    s: dict[str, Any] = {"samples": n, "output_dim": d, "k": k, "denoising": mode, "density": _stats(cols["density"]),
                         "effective_neighbors": _stats(cols["effective_neighbors"])}
    if "prediction_matches_label" in cols:
        s["accuracy"] = float(cols["prediction_matches_label"].mean())
    for key in ("neighbor_label_agreement", "label_consistency", "prediction_consistency"):
        if key in cols:
            s[key] = _stats(cols[key])
    return Analysis(cols, nn_idx, nn_sim, s, timings)


def _stats(v: np.ndarray) -> dict[str, float]:
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {}
    return {"min": float(v.min()), "median": float(np.median(v)), "mean": float(v.mean()), "max": float(v.max())}
