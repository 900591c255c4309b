"""Running nnsim's dataset-scale operations on several processes with ``torch.distributed``.

Every rank calls the same nnsim function with the same arguments (``torchrun`` runs the same script on every
rank). The work is split by rank in whole chunks, so every per-sample quantity and every tile is computed
exactly as in one process; only small reductions cross the network (parameter-shaped sums, per-sample vectors,
top-k lists, status messages), never the data or the per-sample gradients. Every rank returns the full result.
The collectives work on gloo (CPU tensors) and NCCL (tensors moved to the rank's CUDA device and back).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

from .errors import InputError

T = TypeVar("T")

try:  # torch builds without distributed support exist (some macOS / mobile wheels)
    import torch.distributed as dist

    _AVAILABLE = dist.is_available()
except ImportError:  # pragma: no cover
    dist = None  # type: ignore[assignment]
    _AVAILABLE = False


class DistributedError(InputError):
    """Ranks disagree (different data, model or arguments) or another rank failed: raised on every rank."""


@dataclass(frozen=True)
class Comm:
    """A resolved process group: this process's ``rank`` among ``world`` processes (world >= 2)."""

    group: Any
    rank: int
    world: int

    @property
    def device(self) -> torch.device:
        """Where collective tensors must live: the current CUDA device for NCCL, else the CPU."""
        nccl = "nccl" in str(dist.get_backend(self.group)).lower()
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def resolve(group: Any = None) -> Comm | None:
    """The process group an operation runs on, or None to run in this process alone.

    ``group``: a ``torch.distributed`` process group; ``None`` = the default group when
    ``torch.distributed`` is initialised (e.g. under ``torchrun``), else this process alone; ``False`` = this
    process alone even when a default group exists. A group of one process is the single-process path.
    """
    if group is False:
        return None
    if group is None:
        if not (_AVAILABLE and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    elif not (_AVAILABLE and dist.is_initialized()):
        raise InputError("a process group was given but torch.distributed is not initialised; call "
                         "torch.distributed.init_process_group first (torchrun sets the environment for it)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise InputError("this process is not a member of the given process group; pass group=None (the default "
                         "group) or a group this rank belongs to")
    world = dist.get_world_size(group)
    return None if world == 1 else Comm(group, rank, world)


def rank() -> int:
    """This process's rank in the default group (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if _AVAILABLE and dist.is_initialized() else 0


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if _AVAILABLE and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0 of the default group, and in a plain (non-distributed) run."""
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main_process():
        print(*args, **kwargs)


F = TypeVar("F", bound=Callable[..., Any])


def main_only(fn: F) -> F:
    """Decorator: run ``fn`` on rank 0 only (other ranks get None). For report writers and printers.

    It does not synchronise: when other ranks need what rank 0 wrote, call :func:`barrier` afterwards.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if is_main_process() else None

    return wrapper  # type: ignore[return-value]


def barrier(group: Any = None) -> None:
    """Wait for every rank of the group (no-op in a single process)."""
    comm = resolve(group)
    if comm is not None:
        dist.barrier(group=comm.group)


def broadcast_module(module: torch.nn.Module, src: int = 0, group: Any = None) -> torch.nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank (in place; returns it).

    For scripts that train or load the model on one rank only: nnsim refuses to run when the ranks' analysed
    parameters differ. A no-op in a single process.
    """
    comm = resolve(group)
    if comm is None:
        return module
    root = src if comm.group is dist.group.WORLD else dist.get_global_rank(comm.group, src)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            buf = t.detach().to(comm.device).contiguous()
            dist.broadcast(buf, src=root, group=comm.group)
            t.copy_(buf.to(t.device))
    return module


def setup_from_env(backend: str | None = None) -> Comm | None:
    """Initialise the default group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ...) when present.

    Returns the resolved group (None in a plain run). ``backend`` defaults to NCCL when CUDA is available
    (after selecting ``cuda:LOCAL_RANK``), gloo otherwise. Does nothing when already initialised.
    """
    if _AVAILABLE and not dist.is_initialized() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return resolve(None)


def split(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rank's contiguous share [a, b) of range(n): sizes differ by at most one, earlier ranks larger."""
    base, extra = divmod(n, world)
    a = rank * base + min(rank, extra)
    return a, a + base + (1 if rank < extra else 0)


def tile_segments(n_a: int, n_b: int, symmetric: bool, rank: int, world: int) -> list[tuple[int, int, int]]:
    """This rank's tiles of a chunk grid, as row segments (row i, first column, end column).

    * symmetric (upper triangle j >= i, n_a = n_b): a contiguous, balanced range of the tiles in row-major
      order (rows are unequal: row i has n - i tiles, so ranges of rows would not balance);
    * otherwise the longer side is split: column ranges (every rank sweeps all rows against its share of the
      second argument: a data shard) when n_b >= n_a, else row ranges.
    """
    if symmetric:
        total = n_a * (n_a + 1) // 2
        t0, t1 = split(total, rank, world)
        out = []
        i, row_start = 0, 0  # row_start: index of tile (i, i)
        while i < n_a and row_start < t1:
            row_end = row_start + n_a - i
            lo, hi = max(t0, row_start), min(t1, row_end)
            if lo < hi:
                out.append((i, i + lo - row_start, i + hi - row_start))
            row_start, i = row_end, i + 1
        return out
    if n_b >= n_a:
        c0, c1 = split(n_b, rank, world)
        return [(i, c0, c1) for i in range(n_a)] if c1 > c0 else []
    r0, r1 = split(n_a, rank, world)
    return [(i, 0, n_b) for i in range(r0, r1)]


def all_gather_object(comm: Comm, obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small picklable values), indexed by rank."""
    out: list[Any] = [None] * comm.world
    dist.all_gather_object(out, obj, group=comm.group)
    return out


def broadcast_object(comm: Comm, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (``src`` is a rank of ``comm``'s group)."""
    box = [obj]
    root = src if comm.group is dist.group.WORLD else dist.get_global_rank(comm.group, src)
    dist.broadcast_object_list(box, src=root, group=comm.group)
    return box[0]


def topk_lowest_index(v: Tensor, i: Tensor, k: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Top-k per row of (values, indices), ties resolved by the lowest index; missing (-1) entries last."""
    key = torch.where(i < 0, torch.full_like(i, torch.iinfo(torch.long).max), i)
    order = key.argsort(dim=1, stable=True)
    v, i = v.gather(1, order), i.gather(1, order)
    order = v.argsort(dim=1, descending=True, stable=True)[:, :k]
    v, i = v.gather(1, order), i.gather(1, order)
    return (v, i) if device is None else (v.to(device), i.to(device))


def agree(comm: Comm | None, what: str, value: Any) -> None:
    """Check that every rank passed the same ``value`` (lengths, shapes, digests); raise on every rank if not."""
    if comm is None:
        return
    values = all_gather_object(comm, value)
    if any(v != values[0] for v in values):
        lines = "\n  ".join(f"rank {r}: {v}" for r, v in enumerate(values))
        raise DistributedError(f"the ranks disagree on {what}; every rank must call nnsim with the same model, data "
                               f"and arguments (the data are split by rank, not sent):\n  {lines}")


class together(contextlib.AbstractContextManager):  # noqa: N801 - used as a context manager, like a function
    """Context manager around a rank's local work (no collective inside): if it raises on any rank, every
    rank raises when leaving the block, so that no rank is left waiting in the next collective. The failing
    rank re-raises its own exception, the others a :class:`DistributedError` naming it."""

    def __init__(self, comm: Comm | None) -> None:
        self.comm = comm

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> bool:
        if self.comm is None or (error is not None and not isinstance(error, Exception)):
            return False  # interrupts are not negotiated: the launcher tears the group down
        status = all_gather_object(self.comm, None if error is None else f"{type(error).__name__}: {error}")
        failed = [(r, s) for r, s in enumerate(status) if s is not None]
        if error is None and failed:  # the failing rank re-raises its own exception (returning False)
            raise DistributedError(f"rank {failed[0][0]} failed: {failed[0][1]}")
        return False


def run_together(comm: Comm | None, fn: Callable[[], T]) -> T:
    """``fn()`` inside :class:`together`: an exception on any rank is raised on every rank."""
    with together(comm):
        return fn()


class Ranks:
    """How one dataset-scale operation is spread over the processes of ``comm`` (None: this process alone).

    The estimators work on this rank's share (:meth:`tiles`, :meth:`samples`) and combine shares with the
    reductions below; each of them handles a rank that got no work (an empty dict, no rows), and each is the
    identity in a single process."""

    def __init__(self, comm: Comm | None, device: torch.device, progress: bool = False) -> None:
        self.comm, self.device = comm, device
        self.rank, self.world = (0, 1) if comm is None else (comm.rank, comm.world)
        self.progress = progress and self.rank == 0  # progress bars: asked for, and on rank 0 only

    def tiles(self, n_a: int, n_b: int, symmetric: bool) -> list[tuple[int, int, int]]:
        """This rank's tiles of an n_a x n_b chunk grid (:func:`tile_segments`)."""
        return tile_segments(n_a, n_b, symmetric, self.rank, self.world)

    def samples(self, n: int, size: int) -> tuple[int, int]:
        """This rank's samples [a, b) when n samples are cut into chunks of ``size`` (whole chunks per rank)."""
        c0, c1 = split(math.ceil(n / size), self.rank, self.world)
        return min(n, c0 * size), min(n, c1 * size)

    def together(self) -> together:
        return together(self.comm)

    def sum(self, sums: dict[str, Tensor]) -> dict[str, Tensor]:
        """Sum over ranks of a dict of tensors, in one collective per dtype; a rank may lack keys (it had no
        work: zeros stand in)."""
        if self.comm is None:
            return sums
        spec: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for part in all_gather_object(self.comm, {k: (tuple(v.shape), v.dtype) for k, v in sums.items()}):
            spec.update(part)
        out: dict[str, Tensor] = {}
        for dtype in sorted({dt for _, dt in spec.values()}, key=str):
            keys = sorted(k for k, (_, dt) in spec.items() if dt == dtype)
            local = [sums[k] if k in sums else torch.zeros(spec[k][0], dtype=dtype, device=self.device) for k in keys]
            flat = torch.cat([t.to(self.comm.device).reshape(-1) for t in local])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.comm.group)
            for k, t, part in zip(keys, local, flat.split([t.numel() for t in local]), strict=True):
                out[k] = part.reshape(t.shape).to(t.device)
        return out

    def rows(self, parts: list[Tensor], start: int, n: int) -> Tensor:
        """The [n, ...] tensor in dataset order from each rank's rows [start, start + rows of ``parts``); the
        ranks' row ranges must tile [0, n) without overlap (checked)."""
        if self.comm is None:
            return torch.cat(parts)
        local = torch.cat(parts) if parts else None
        like = None if local is None else (local.shape[1:], local.dtype)
        spans = all_gather_object(self.comm, (start, 0 if local is None else local.shape[0], like))
        pos = 0
        for s, m, _ in sorted(spans, key=lambda span: span[:2]):
            if m and s != pos:  # a gap or an overlap
                break
            pos += m
        if pos != n or sum(m for _, m, _ in spans) != n:
            raise DistributedError(f"internal error: the ranks' rows {[sp[:2] for sp in spans]} do not tile [0, {n})")
        shape, dtype = next(span[2] for span in spans if span[2] is not None)
        if local is None:
            local = torch.zeros(0, *shape, dtype=dtype, device=self.device)
        buf = local.to(self.comm.device).new_zeros((max(m for _, m, _ in spans), *shape))
        buf[: local.shape[0]] = local
        gathered = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(gathered, buf, group=self.comm.group)
        out = buf.new_empty((n, *shape))
        for (s, m, _), g in zip(spans, gathered, strict=True):
            out[s : s + m] = g[:m]
        return out.to(local.device)

    def topk(self, values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The exact top-k over every rank's lists [Q, k] (missing entries -inf / -1), ties broken by the lowest
        index as a single process's running top-k over increasing columns does."""
        if self.comm is None:
            return values, indices
        gathered = []
        for t in (values, indices):
            t = t.to(self.comm.device).contiguous()
            parts = [torch.empty_like(t) for _ in range(self.world)]
            dist.all_gather(parts, t, group=self.comm.group)
            gathered.append(torch.cat(parts, 1))
        return topk_lowest_index(*gathered, k, values.device)

    def merge(self, report: Any) -> None:
        """Every rank's notes of a :class:`nnsim.engine.RankReport` merged into ``report`` (on every rank)."""
        if self.comm is not None:
            report.merge(all_gather_object(self.comm, report.notes()))


def for_call(group: Any, op: str, sources: tuple[Any, ...], params: dict[str, Tensor], args: Any,
             device: torch.device, progress: bool) -> Ranks:
    """The :class:`Ranks` of a dataset-scale operation, after checking that every rank called it alike
    (sample counts, first-sample digests, model parameters, arguments)."""
    comm = resolve(group)
    if comm is not None:
        seen = [(len(s), batch_digest(s.first())) for s in sources]
        agree(comm, f"the {op} call (sample counts and first-sample digests, model parameters, arguments)",
              (op, seen, params_checksum(params), repr(args)))
    return Ranks(comm, device, progress)


def batch_digest(batch: tuple[Tensor, ...]) -> str:
    """sha256 of a small batch's shapes, dtypes and bytes (to check that ranks see the same samples)."""
    h = hashlib.sha256()
    for t in batch:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{tuple(t.shape)}\0{t.dtype}\0".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def params_checksum(params: dict[str, Tensor]) -> list[tuple[str, tuple[int, ...], str, float, float]]:
    """Cheap, on-device summary of the analysed parameters (sum and sum of squares in float64 per tensor):
    ranks holding different weights disagree on it."""
    out = []
    with torch.no_grad():
        for name, p in params.items():
            q = p.detach().double()
            # 10 significant digits: the float64 sums may differ in the last bits between devices or thread
            # counts; different weights differ far more.
            out.append((name, tuple(p.shape), str(p.dtype), float(f"{float(q.sum()):.10g}"),
                        float(f"{float(q.square().sum()):.10g}")))
    return out
