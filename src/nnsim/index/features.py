"""What a store row is: the centred CountSketch of a sample's kernel-corrected gradient, and what ties rows
to a model.

With u(x) = vec U(x) / sqrt(d_eff), U(x) the kernel-corrected per-sample gradient (its Gram is the normalised
kernel K~, :meth:`nnsim.Similarity.corrected_factors`), sim(x, x') = <u(x), u(x')>. A data row is
[S u(x), <u(x), c>] and a query row [S u(q) - S c, 1] (:class:`Projection`; S: :mod:`nnsim.index.sketch`),
so the plain inner product of the two is an unbiased estimate of the similarity.

Also here: the fingerprints that tie a store to a model and its settings (checked on open and resume), the
one-warning-per-kind report of zero-gradient and rank-deficient samples.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..engine import ALL, RankReport
from ..factors import Dense, Outer, batch_sum, inner
from ..inputs import Batch, Source, as_source, sample_signature
from ..similarity import Similarity
from . import sketch as sk

# The projection scheme written into manifests (informational: ``projection_probe`` detects any change).
PROJECTION = "countsketch-centred/3"
_FEATURE_BYTES = 2**27  # bytes of one block of computed or loaded features


# ---------------------------------------------------------------------------------------------- fingerprints
def hash_tensor(h: Any, kind: str, name: str, t: Tensor) -> None:
    """Feed a tensor's name, shape, dtype and bytes to the hash ``h``."""
    h.update(f"{kind}\0{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
    hash_bytes(h, t)


def hash_bytes(h: Any, t: Tensor) -> None:
    """Feed a tensor's row-major bytes to the hash ``h``."""
    t = t.detach().to("cpu").contiguous()
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


MODEL_KEYS = ["model_fingerprint", "params", "output", "metric", "rtol", "atol", "singular"]


def model_config(sim: Similarity) -> dict[str, Any]:
    """The entries that tie a store to a model and its similarity settings (:data:`MODEL_KEYS`)."""
    return dict(zip(MODEL_KEYS, (model_fingerprint(sim), list(sim.params), _output_name(sim.output),
                                 _metric_spec(sim), sim.rtol, sim.atol, sim.singular), strict=True))


def projection_probe(dim: int, seed: int) -> list[float]:
    """Summary numbers of the sketch of fixed synthetic gradients (both the explicit and the FFT path, two
    output columns): they change exactly when the projection (hashes, seeding, path choice) changes, so a
    store is never searched with a different projection."""
    r = math.isqrt(int(sk.STRUCTURED_FACTOR * dim * math.log2(max(2, dim)))) + 2  # r^2 > dim log2(dim): the FFT path
    f64 = torch.float64
    a = torch.cos(torch.arange(2 * r, dtype=f64)).reshape(1, 1, 2, r)
    delta = torch.sin(torch.arange(4 * r, dtype=f64) + 0.5).reshape(1, 2, 1, 2, r)
    factors: list[Any] = [Outer("nnsim-probe", a, delta, ("w", torch.Size([r, r]))),
                          Dense("nnsim-probe-dense", torch.cos(torch.arange(34, dtype=f64) * 0.3).reshape(1, 2, 17),
                                [("v", torch.Size([17]))])]
    v = sk.sketch(factors, dim, seed).flatten()
    w = torch.cos(torch.arange(v.numel(), dtype=f64) * 0.7)
    return [float(v.numel()), float(v @ v), float(v @ w), float(v.sum())]


def probe_matches(stored: Any, now: list[float]) -> bool:
    if not isinstance(stored, list) or len(stored) != len(now):
        return False
    return all(isinstance(s, (int, float)) and math.isclose(s, c, rel_tol=1e-6, abs_tol=1e-9)
               for s, c in zip(stored, now))


# ---------------------------------------------------------------------------------------------- features
def rank_notes(side: str) -> RankReport:
    """The report of zero-gradient and rank-deficient samples of ``side`` ("data" or "queries")."""
    effect = ("they are stored but never returned as neighbours" if side == "data"
              else "their similarities are NaN and their indices -1")
    return RankReport("features", effect=effect, stacklevel=3)


@dataclass
class Projection:
    """How rows are made: a CountSketch of vec(U(x)) / sqrt(d_eff) into ``width`` buckets (``exact``: U itself,
    when d P <= dim), centred on the mean ``c`` of ``centre_rows`` reference rows.

    A data row is [S u(x), <u(x), c>] and a query row [S u(q) - S c, 1]: their dot product is
    <S(u - c), S(u_q - c)> + <u, c> + <S u_q, S c> - |S c|^2, an unbiased estimate of <u, u_q> whose noise,
    in the ranking of the data for one query, scales with |u - c| |u_q - c| instead of |u| |u_q|: small
    when the similarities sit in a narrow band. <u, c> is exact (``centre_sum`` = sum of the reference U)."""

    width: int
    seed: int
    exact: bool
    centre_rows: int = 0
    centre_sum: dict[str, Tensor] | None = None
    centre_projected: Tensor | None = None  # S c [width]

    def sketch(self, sim: Similarity, factors: list[Any]) -> Tensor:
        with torch.no_grad():
            raw = sk.explicit(factors) if self.exact else sk.sketch(factors, self.width, self.seed)
        return raw / math.sqrt(sim.d_eff)

    def centre_scores(self, sim: Similarity, factors: list[Any]) -> Tensor:
        """<u(x), c> for the chunk, exact: [B]."""
        if not self.centre_sum:
            return torch.zeros(factors[0].batch_size, dtype=torch.float64)
        with torch.no_grad():
            score = inner(factors, self.centre_sum).diagonal(dim1=-2, dim2=-1).sum(-1)
        return score / (self.centre_rows * sim.d_eff)


CENTRE_ROWS = 256  # reference rows of the centre c (any fixed vector keeps the estimate unbiased)
_CENTRE_CHUNK = 32  # fixed, so that every process and every resume sums the centre in the same order (fewer
# where the chunk budget allows fewer: the library's chunk size, measured alike by every process)
_CENTRE_BYTES = 2**30  # no centring when d P numbers exceed this (c has the size of one gradient)


def make_projection(sim: Similarity, src: Source, dim: int, seed: int) -> Projection:
    """The projection of a store: its width, and the centre computed from evenly spaced reference rows."""
    sim.corrected_factors(src.first(), 0, "data")  # measures d
    n_params = sum(p.numel() for p in sim.params.values())
    d = sim.d or 1
    exact = d * n_params <= dim
    width = d * n_params if exact else dim
    proj = Projection(width, seed, exact)
    if d * n_params * 8 > _CENTRE_BYTES:
        return proj
    N = len(src)
    M = min(N, CENTRE_ROWS)
    ids = sorted({round(i * (N - 1) / max(1, M - 1)) for i in range(M)})
    chunk = min(_CENTRE_CHUNK, sim.chunk_size_for(src.data))
    rows = src.take(ids, chunk)
    ref = as_source(rows, "data")
    total: dict[str, Tensor] = {}
    projected = torch.zeros(width, dtype=torch.float64)
    for s, batch in ref.chunks(chunk):
        factors, _ = sim.corrected_factors(batch, ids[s], "data")
        with torch.no_grad():
            batch_sum(factors, total)
        projected += proj.sketch(sim, factors).sum(0).double().cpu()
    proj.centre_rows, proj.centre_sum, proj.centre_projected = len(ids), total, projected / len(ids)
    return proj


def _corrected(sim: Similarity, batch: Batch, start: int, side: str, report: RankReport | None
               ) -> tuple[list[Any], Tensor]:
    factors, rank = sim.corrected_factors(batch, start, side)
    if report is not None:
        report.note(side, ALL, start, rank, sim.d_eff)
    return factors, rank


def data_rows(sim: Similarity, batch: Batch, start: int, proj: Projection, report: RankReport | None = None
              ) -> tuple[Tensor, Tensor]:
    """Store rows of one chunk of data, [B, width + 1] = [S u(x), <u(x), c>], and the ranks [B]."""
    factors, rank = _corrected(sim, batch, start, "data", report)
    rows = proj.sketch(sim, factors)
    score = proj.centre_scores(sim, factors).to(device=rows.device, dtype=rows.dtype)
    return torch.cat([rows, score[:, None]], dim=1), rank


def query_rows(sim: Similarity, batch: Batch, start: int, width: int, seed: int, exact: bool,
               centre: Tensor | None, report: RankReport | None = None) -> tuple[Tensor, Tensor]:
    """Query vectors of one chunk, [B, width + 1] = [S u(q) - S c, 1], and the ranks [B]."""
    factors, rank = _corrected(sim, batch, start, "queries", report)
    rows = Projection(width, seed, exact).sketch(sim, factors)
    if centre is not None:
        rows = rows - centre.to(device=rows.device, dtype=rows.dtype)
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1), rank


def chunk_features(sim: Similarity, batch: Batch, start: int, proj: Projection,
                   report: RankReport | None = None) -> tuple[Tensor, Tensor]:
    """Store rows of one chunk of data (:func:`data_rows`), as the build computes them."""
    return data_rows(sim, batch, start, proj, report)


def compute_chunk(sim: Similarity, src: Source, width: int | None) -> int:
    """Samples per feature chunk: the library's chunk size, bounded so one chunk's rows stay small."""
    size = sim.chunk_size_for(src.data)
    if width:
        size = min(size, max(1, _FEATURE_BYTES // (8 * width)))
    return max(1, size)
