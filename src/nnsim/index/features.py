"""What a store row is: the projected kernel-corrected gradient of a sample, and what ties rows to a model.

phi(x) = vec(P U(x)) / sqrt(d_eff), with U(x) the kernel-corrected per-sample gradient (its Gram is the
normalised kernel K~, :meth:`nnsim.Similarity.corrected_factors`) and P a seeded random projection generated
on the fly and never stored; E[phi(x) . phi(x')] = tr K~(x, x') / d_eff, the scalar similarity.

Also here: the fingerprints that tie a store to a model and its settings (checked on open and resume), and
the one-warning-per-kind report of zero-gradient and rank-deficient samples.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from typing import Any

import torch
from torch import Tensor

from ..errors import RankDeficiencyWarning
from ..factors import Dense, Outer, project
from ..inputs import Batch, Source, sample_signature
from ..similarity import Similarity

# The projection scheme written into manifests (informational: ``projection_probe`` detects any change).
PROJECTION = "kronecker-gaussian/2"
_FEATURE_BYTES = 2**27  # bytes of one block of computed or loaded features


# ---------------------------------------------------------------------------------------------- fingerprints
def hash_tensor(h: Any, kind: str, name: str, t: Tensor) -> None:
    """Feed a tensor's name, shape, dtype and bytes to the hash ``h``."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{kind}\0{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def model_fingerprint(sim: Similarity) -> str:
    """sha256 over names, shapes, dtypes and values of the selected parameters, then of every other tensor
    of the model's state (frozen parameters, buffers such as BatchNorm statistics), which also shape the
    gradients."""
    h = hashlib.sha256(b"nnsim-model/1\0")
    for name, p in sim.params.items():
        hash_tensor(h, "param", name, p)
    selected = {id(p) for p in sim.params.values()}
    for name, t in sim.model.state_dict(keep_vars=True).items():
        if isinstance(t, Tensor) and id(t) not in selected:
            hash_tensor(h, "state", name, t)
    return h.hexdigest()


def _output_name(fn: Any) -> str:
    """A readable identifier of the analysed output: qualified name plus simple closure values."""
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    cells = getattr(fn, "__closure__", None) or ()
    simple = []
    for c in cells:
        try:
            v = c.cell_contents
        except ValueError:
            continue
        if isinstance(v, (int, float, str, bool, tuple, type(None))):
            simple.append(repr(v))
    return name + (f"({', '.join(simple)})" if simple else "")


def _metric_spec(sim: Similarity) -> Any:
    if isinstance(sim.metric, Tensor):
        h = hashlib.sha256()
        hash_tensor(h, "metric", "M", sim.metric)
        return {"tensor_sha256": h.hexdigest(), "shape": list(sim.metric.shape)}
    return sim.metric


def sample_digest(batch: Batch) -> str:
    h = hashlib.sha256(b"nnsim-sample/1\0")
    for k, t in enumerate(batch):
        hash_tensor(h, "input", str(k), t)
    return h.hexdigest()


def signature(batch: Batch) -> list[list[Any]]:
    return [[list(shape), str(dtype)] for shape, dtype in sample_signature(batch)]


def model_config(sim: Similarity) -> dict[str, Any]:
    """The entries that tie a store to a model and its similarity settings."""
    return {
        "model_fingerprint": model_fingerprint(sim),
        "params": list(sim.params),
        "output": _output_name(sim.output),
        "metric": _metric_spec(sim),
        "rtol": sim.rtol,
        "atol": sim.atol,
        "singular": sim.singular,
    }


MODEL_KEYS = ["model_fingerprint", "params", "output", "metric", "rtol", "atol", "singular"]


def projection_probe(dim: int, seed: int) -> list[float]:
    """Summary numbers of the projection of fixed synthetic gradients: they change exactly when the projection
    (generator, seeding, layer split) changes, so a store is never searched with a different projection."""
    r = math.isqrt(dim) + 2  # an r x r layer with r^2 > dim is projected, not kept exact
    f64 = torch.float64
    a = torch.cos(torch.arange(2 * r, dtype=f64)).reshape(1, 1, 2, r)
    delta = torch.sin(torch.arange(2 * r, dtype=f64) + 0.5).reshape(1, 1, 1, 2, r)
    factors: list[Any] = [Outer("nnsim-probe", a, delta, ("w", torch.Size([r, r])))]
    if dim <= 4096:  # the dense projection costs dim^2 random numbers
        factors.append(Dense("nnsim-probe-dense", torch.cos(torch.arange(dim + 1, dtype=f64) * 0.3)[None, None],
                             [("v", torch.Size([dim + 1]))]))
    v = project(factors, dim, seed).flatten()
    w = torch.cos(torch.arange(v.numel(), dtype=f64) * 0.7)
    return [float(v.numel()), float(v @ v), float(v @ w), float(v.sum())]


def probe_matches(stored: Any, now: list[float]) -> bool:
    if not isinstance(stored, list) or len(stored) != len(now):
        return False
    return all(isinstance(s, (int, float)) and math.isclose(s, c, rel_tol=1e-6, abs_tol=1e-9)
               for s, c in zip(stored, now))


# ---------------------------------------------------------------------------------------------- features
class RankNotes:
    """Zero-gradient and rank-deficient samples seen while computing features; one warning each at the end."""

    def __init__(self, side: str) -> None:
        self.side = side
        self.zero: list[int] = []
        self.deficient: list[int] = []

    def add(self, start: int, rank: Tensor, full: int) -> None:
        self.zero += (torch.nonzero(rank == 0).flatten() + start).tolist()
        self.deficient += (torch.nonzero((rank > 0) & (rank < full)).flatten() + start).tolist()

    def emit(self) -> None:
        if self.zero:
            effect = ("they are stored but never returned as neighbours" if self.side == "data"
                      else "their similarities are NaN and their indices -1")
            warnings.warn(f"{len(self.zero)} sample(s) of {self.side} have a zero gradient (no direction): {effect}. "
                          f"Samples: {self.zero[:20]}", RankDeficiencyWarning, stacklevel=3)
        if self.deficient:
            warnings.warn(f"{len(self.deficient)} sample(s) of {self.side} have a rank-deficient K(x, x): normalised "
                          f"on its range (self-similarity rank/d < 1). Samples: {self.deficient[:20]}",
                          RankDeficiencyWarning, stacklevel=3)


def chunk_features(sim: Similarity, batch: Batch, start: int, dim: int, seed: int, name: str,
                   report: RankNotes | None = None) -> tuple[Tensor, Tensor]:
    """Projected kernel-corrected gradients of one chunk, pre-divided by sqrt(d_eff): ([B, d k], rank [B])."""
    factors, rank = sim.corrected_factors(batch, start, name)
    if report is not None:
        report.add(start, rank, sim.d_eff)
    with torch.no_grad():
        phi = project(factors, dim, seed)
    return phi.reshape(phi.shape[0], -1) / math.sqrt(sim.d_eff), rank


def compute_chunk(sim: Similarity, src: Source, width: int | None) -> int:
    """Samples per feature chunk: the library's chunk size, bounded so one chunk's rows stay small."""
    size = sim.chunk_size_for(src.data)
    if width:
        size = min(size, max(1, _FEATURE_BYTES // (8 * width)))
    return max(1, size)
