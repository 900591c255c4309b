"""Parameters used directly by their module's own ``forward`` (a ViT class token or position table, a
ConvNeXt / CaiT layer scale, a root-level projection, a child's weight read without calling the child):
per-sample gradients from the few operations that use them, never a re-run of the whole module.

A tensor may derive from several watched parameters, of one module or several (``F.linear(table, W, b)``
of a batch-shared table): it has one *lineage* per parameter, each followed with the others held at their
values, so that each lineage's VJP is a partial derivative and their sum the operation's gradient.

During the pass a ``TorchFunctionMode`` watches these parameters. An operation on a watched tensor whose
output has no batch yet (``pos[:, :T]``) yields a watched *derived* tensor (with the recipe that rebuilds it
from the parameter); the operation where it meets the batch (``h + pos``, ``cls.expand(B, -1, -1)``,
``gamma * h``) is recorded and its output tapped, so its signals δ are per sample. The gradient of sample b
is then the VJP of that one operation alone, on sample b's slice of the batched arguments (or, for an
operation that creates the batch axis itself, with the cotangent δ_b placed at row b).

An operation may meet a *folded* batch, [B*k, ...] with row b*k + j of sample b (Swin's relative position
bias added to the attention scores of its B*nW windows): sample b's slice is then its k rows.

Which operation is which is decided at planning from two probe batch sizes and replayed by position; any
deviation (a different operation sequence, data-dependent control flow) makes the rule hand the module to the
exact per-module fallback on the spot, and the planner's verification covers the rest.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...factors import Factor
from . import Call
from .fallback import _factors, fallback

# Operations that carry no gradient, seen only in some passes (the backend's hook detaches a module's output):
# not uses, so that the operation sequence matches the one recorded at planning.
_NO_USE = frozenset({Tensor.detach, torch.detach, torch.zeros_like})
_MASKED_LIMIT = 2**25  # elements of the [B, B, d, ...] cotangents of a batch-creating operation
_PLAIN = (Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)


@dataclass
class OpUse:
    """One recorded operation on a watched tensor that meets the batch (or, when recording, any operation)."""

    func: Any
    flat: list
    spec: Any
    hit: int  # position of the watched tensor in ``flat``
    local: str
    recipe: Any  # parameter value -> the watched tensor
    kind: str  # "vmap" (batched arguments sliced per sample) or "masked" (the operation creates the batch)
    batched: list[int] = field(default_factory=list)
    fold: int = 1  # k: the output's batch axis holds B*k rows, k per sample (batch-major)
    # the batch axis of each batched argument (its position in ``flat``) and of the output (-1), where not 0
    # (XLNet's time-major [T, B, C] activations)
    axes: dict[int, int] = field(default_factory=dict)
    call: Call = field(default_factory=lambda: Call((), {}))


class FreeUses(TorchFunctionMode):
    """Watches the direct parameters of some modules during one forward pass.

    ``plan_ops``: per module, the planned kinds of its k-th operation on a watched tensor
    (func name, kind, batched argument positions, fold); None while recording for planning. ``inputs``
    (recording): the model's input tensors, whose descendants carry the batch, however it is laid out."""

    def __init__(self, watched: dict[nn.Module, dict[str, Tensor]], B: int,
                 plan_ops: dict[nn.Module, list[tuple[str, str, list[int], int, dict[int, int]]] | None] | None,
                 inputs: tuple[Tensor, ...] = ()) -> None:
        super().__init__()
        # Recording: the tensors computed from the inputs (id -> weak reference, so that a reused id is not
        # mistaken for them). A folded batch [B*k, ...] cannot be told from the parameters' own tensors by its
        # sizes; by where it comes from it can.
        self.batchy: dict[int, weakref.ref] = {}
        self._mark(inputs)
        self.B, self.plan_ops = B, plan_ops
        # tensor id -> its lineages (module, local parameter name, recipe from the parameter, the recorded
        # operation that made it or -1)
        self.watch: dict[int, list[tuple[nn.Module, str, Any, int]]] = {}
        for m, params in watched.items():
            for local, p in params.items():
                self.watch[id(p)] = [(m, local, _identity, -1)]
        self.alive: list[Tensor] = []  # keeps derived tensors alive, so that their ids stay theirs
        self.ops: dict[nn.Module, list[OpUse]] = {m: [] for m in watched}
        self.seen: dict[nn.Module, list] = {m: [] for m in watched}  # recording: shapes per operation
        self.broken: dict[nn.Module, str] = {}
        self._quiet = False

    @contextlib.contextmanager
    def quiet(self, on: bool = True) -> Iterator[None]:
        """Operations of the backend's own hooks (shapes, detach, taps) are not the model's: not recorded
        (``on=False``: recorded again, inside a quiet block)."""
        was, self._quiet = self._quiet, on
        try:
            yield
        finally:
            self._quiet = was

    def passthrough(self, t: Tensor, z: Tensor) -> Tensor:
        """``t + z`` for the zero tap ``z`` of a watched tensor ``t`` (a module's output derived from its
        parameter, e.g. an embedding of batch-shared ids), not recorded and still tracked: the sum is watched as
        ``t`` is (the recordings of planning see no tap)."""
        with self.quiet():
            out = t + z
        self.watch[id(out)] = self.watch[id(t)]
        self.alive.append(out)
        return out

    def _may_use(self, args: tuple, kwargs: dict) -> bool:
        """False when no argument is a watched tensor (checked without flattening; any container: maybe)."""
        for t in (*args, *kwargs.values()):
            if isinstance(t, Tensor):
                if id(t) in self.watch:
                    return True
            elif not isinstance(t, (int, float, bool, str, type(None), torch.dtype, torch.device)):
                return True
        return False

    def _mark(self, tensors: Any) -> None:
        for t in tensors:
            if isinstance(t, Tensor):
                self.batchy[id(t)] = weakref.ref(t)

    def _from_batch(self, t: object) -> bool:
        ref = self.batchy.get(id(t)) if isinstance(t, Tensor) else None
        return ref is not None and ref() is t

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        # an in-place operation (ConvBERT's ``x += self.bias``) overwrites its first argument: kept as it was
        before = (args[0].detach().clone() if _out_of_place(func) is not None and args and isinstance(args[0], Tensor)
                  and not self._quiet and self._may_use(args[1:], kwargs) else None)
        out = func(*args, **kwargs)
        if self.batchy and self.plan_ops is None:  # recording: follow the batch from the inputs
            items = (*args, *kwargs.values())
            if not all(isinstance(t, _PLAIN) for t in items):
                items = tree_flatten((args, kwargs))[0]
            if any(self._from_batch(t) for t in items):
                self._mark([out] if isinstance(out, Tensor) else tree_flatten(out)[0])
        if self._quiet or func in _NO_USE or not self._may_use(args, kwargs) or not _has_tensor(out):
            return out  # (an output without tensors, e.g. ``.shape`` or ``.dim()``, carries no gradient)
        flat, spec = tree_flatten((args, kwargs))
        # One lineage per watched tensor in the arguments (a tensor derived from several parameters has one per
        # parameter, ``F.linear(table, weight, bias)`` gives two): each is followed on its own, the others held
        # at their values, so that the VJPs of the lineages are the partial derivatives, whose sum is the
        # operation's.
        lineages = [(i, lin) for i, t in enumerate(flat) if isinstance(t, Tensor) and id(t) in self.watch
                    for lin in self.watch[id(t)]]
        if not lineages:
            return out
        derived: list[tuple[nn.Module, str, Any, int]] = []
        for hit, (module, local, recipe, parent) in lineages:  # (of one module or several: each on its own)
            if module not in self.broken:
                out = self._use(func, flat, spec, out, module, local, recipe, parent, hit, before, derived)
        if derived and isinstance(out, Tensor):  # (after every lineage: an in-place output is its own input)
            self.watch[id(out)] = derived
            self.alive.append(out)
        return out

    def _use(self, func: Any, flat: list, spec: Any, out: Any, module: nn.Module, local: str, recipe: Any,
             parent: int, hit: int, before: Tensor | None, derived: list) -> Any:
        """One lineage's operation: recorded, derived (appended to ``derived``) or tapped where it meets the
        batch (returns the output with its tap)."""
        k = len(self.seen[module])
        self.seen[module].append((_name(func), [_shape(t) for t in flat], _shape(out), hit, parent))
        if self.plan_ops is None:  # recording: follow the chain while no batch is involved
            batch_free = not any(self._from_batch(t) or isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == self.B
                                 for i, t in enumerate(flat) if i != hit)
            # An output of leading size B made from the parameter alone is a batch only if the operation
            # created it (``cls.expand(B, -1, -1)``: more elements), not a coincidence of sizes (a permute
            # of a [heads, N, N] bias with heads = B keeps them).
            creates = (isinstance(out, Tensor) and out.dim() > 0 and out.shape[0] == self.B
                       and out.numel() > flat[hit].numel())
            if isinstance(out, Tensor) and batch_free and not creates:
                derived.append(self._derive(module, local, func, flat, spec, hit, recipe, k))
            return out
        planned = self.plan_ops.get(module)
        if planned is None or k >= len(planned) or planned[k][0] != _name(func):
            self.broken[module] = "its operations differ from those seen at planning"
            return out
        _, kind, batched, fold, axes = planned[k]
        out_axis = axes.get(-1, 0)
        if kind == "derived":
            if isinstance(out, Tensor):
                derived.append(self._derive(module, local, func, flat, spec, hit, recipe, k))
            return out
        if kind == "bad" or not isinstance(out, Tensor) or not out.is_floating_point() or out.dim() == 0 \
                or out.dim() <= out_axis or out.shape[out_axis] != self.B * fold:
            self.broken[module] = f"{_name(func)} has no batch axis 0 where planning saw one"
            return out
        frozen = [t.detach() if isinstance(t, Tensor) else t for t in flat]
        if before is not None and hit != 0:
            frozen[0], func = before, _out_of_place(func)  # replayed out of place: no captured tensor mutated
        use = OpUse(func, frozen, spec, hit, local, recipe, kind, batched, fold, axes)
        z = torch.zeros_like(out, requires_grad=True)
        use.call.leaves.append(z)
        use.call.out_batched = {0: out_axis}  # its signals come batch first
        self.ops[module].append(use)
        return out + z

    def _derive(self, module: nn.Module, local: str, func: Any, flat: list, spec: Any, hit: int, recipe: Any,
                k: int) -> tuple[nn.Module, str, Any, int]:
        """The lineage of an operation's output made from the watched tensor at ``hit`` (the k-th recorded)."""
        frozen = [t.detach() if isinstance(t, Tensor) else t for t in flat]

        def rebuilt(p: Tensor, func=func, frozen=frozen, spec=spec, hit=hit, recipe=recipe) -> Tensor:
            leaves = list(frozen)
            leaves[hit] = recipe(p)
            a, kw = tree_unflatten(leaves, spec)
            return func(*a, **kw)

        return (module, local, rebuilt, k)


def classify(small: list, large: list, n_small: int, n_large: int
             ) -> list[tuple[str, str, list[int], int, dict[int, int]]] | None:
    """Planned kinds of a module's operations on watched tensors, from two recordings (2 and 3 samples):
    (func name, kind, batched argument positions, fold k of the output's batch axis, {argument position or -1
    for the output: its batch axis, where not 0})."""
    out: list[tuple[str, str, list[int], int, dict[int, int]]] = []
    # A recording may follow an output that meets the batch further where the sizes do not tell it from the
    # parameter's own tensors (a folded batch [B*k, ...]): the operations on what such an operation made are
    # not the parameter's (the pass never sees them) and are skipped, in each recording on its own.
    i = j = 0
    gone: tuple[set[int], set[int]] = (set(), set())
    while True:
        while i < len(small) and small[i][4] in gone[0]:
            gone[0].add(i)
            i += 1
        while j < len(large) and large[j][4] in gone[1]:
            gone[1].add(j)
            j += 1
        if i == len(small) or j == len(large):
            return out if (i, j) == (len(small), len(large)) else None
        (fs, args_s, out_s, hit_s, _), (fl, args_l, out_l, hit_l, _) = small[i], large[j]
        if fs != fl or hit_s != hit_l or len(args_s) != len(args_l):
            return None
        folds = {i: r for i, (s, t) in enumerate(zip(args_s, args_l, strict=True))
                 if i != hit_s and (r := _rows(s, t, n_small, n_large))}
        res = _rows(out_s, out_l, n_small, n_large)
        if res and all(r[1] == res[1] for r in folds.values()) and (folds or res[0] == 0):
            # arguments sliced as the output: k rows a sample (an operation creating the batch: on axis 0)
            axes = {i: r[0] for i, r in folds.items() if r[0]} | ({-1: res[0]} if res[0] else {})
            out.append((fs, "vmap" if folds else "masked", list(folds), res[1], axes))
        elif out_s == out_l and not folds:
            out.append((fs, "derived", [], 1, {}))
        else:
            out.append((fs, "bad", [], 1, {}))
        if out[-1][1] != "derived":
            gone[0].add(i)
            gone[1].add(j)
        i, j = i + 1, j + 1


def free_params(module: nn.Module, layer: str, calls: list[Call], names: dict[str, str], ops: list[OpUse],
                broken: str | None, strict: bool, batch: int | None = None) -> list[Factor]:
    """Factors of ``module``'s direct parameters from their recorded operations (see the module docstring), for
    ``batch`` samples (default: the first call's signals').

    ``broken``: why the recording cannot be trusted for this batch; then the exact per-module fallback is
    used (or, ``strict``, at planning, an error is raised so that the planner steps down)."""
    # B samples, the pass's: not the signals' rows (a folded call has B*k, a module output shared by the batch,
    # T5's position buckets, has signals [T, d, ...])
    B, d = batch or calls[0].batch_size or calls[0].deltas[0].shape[0], calls[0].deltas[0].shape[1]
    if broken is not None:
        if strict:
            raise ValueError(f"free-parameter tracking: {broken}")
        # the fallback sees the rows of folded calls as its samples: each sample's rows summed
        return [f if f.batch_size == B else f.folded(B) for f in fallback(module, layer, calls, names)]
    params = {local: module.get_parameter(local).detach() for local in names}
    total: dict[str, Tensor] = {local: torch.zeros(B, d, *p.shape, dtype=p.dtype, device=p.device)
                                for local, p in params.items()}
    for use in ops:
        if use.local not in params:
            continue
        delta = use.call.deltas[0]  # [B*k, d, *out.shape[1:]]
        p = params[use.local]
        k = use.fold

        def f(pv: Tensor, leaves: list, use: OpUse = use) -> Tensor:
            leaves = list(leaves)
            leaves[use.hit] = use.recipe(pv)
            a, kw = tree_unflatten(leaves, use.spec)
            return use.func(*a, **kw)

        with torch.no_grad():
            if use.kind == "vmap":  # sample b: its k rows of the batched arguments and of the signals
                def per_sample(xs: tuple[Tensor, ...], ds: Tensor, use: OpUse = use, f=f, p=p) -> Tensor:
                    leaves = list(use.flat)
                    for i, x in zip(use.batched, xs, strict=True):
                        leaves[i] = x.movedim(0, use.axes.get(i, 0))
                    _, pull = vjp(lambda pv: f(pv, leaves), p)
                    out_axis = use.axes.get(-1, 0)
                    return vmap(lambda dd: pull(dd.movedim(0, out_axis))[0], in_dims=1)(ds)

                g = vmap(per_sample)(tuple(use.flat[i].movedim(use.axes.get(i, 0), 0).unflatten(0, (B, k))
                                           for i in use.batched), delta.unflatten(0, (B, k)))
            else:  # the operation creates the batch axis: cotangent delta at sample b's rows, zeros elsewhere
                if B * B * k * d * delta[0, 0].numel() > _MASKED_LIMIT:
                    raise ValueError("a batch-creating operation on a free parameter is too large to pull back")
                _, pull = vjp(lambda pv, use=use: f(pv, use.flat), p)
                rows = torch.eye(B, dtype=delta.dtype, device=delta.device).repeat_interleave(k, dim=1)  # [B, B*k]

                def at_rows(dd: Tensor, e: Tensor, pull=pull) -> Tensor:  # dd [B*k, ...] of one output
                    return pull(e.reshape(-1, *[1] * (dd.dim() - 1)) * dd)[0]

                g = vmap(vmap(at_rows, in_dims=(1, None)), in_dims=(None, 0))(delta, rows)
        total[use.local] = total[use.local] + g
    return _factors(module, names, total, B, d)


def _out_of_place(func: Any) -> Any:
    """The out-of-place twin of an in-place Tensor method (``add_``, ``__iadd__``), its result in the
    dtype of the tensor it would overwrite; None for any other function."""
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        twin = getattr(Tensor, "__" + name[3:], None)
    elif name.endswith("_") and not name.endswith("__"):
        twin = getattr(Tensor, name[:-1], None)
    else:
        return None
    if twin is None or getattr(Tensor, name, None) is None:
        return None

    def replay(self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return twin(self, *args, **kwargs).to(self.dtype)

    replay.__name__ = name  # the planned operation's name
    return replay


def _has_tensor(out: object) -> bool:
    return isinstance(out, Tensor) or any(isinstance(t, Tensor) for t in tree_flatten(out)[0])


def _identity(p: Tensor) -> Tensor:
    return p


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _shape(t: object) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, Tensor) else None


def _rows(s: tuple[int, ...] | None, t: tuple[int, ...] | None, n_small: int, n_large: int
          ) -> tuple[int, int] | None:
    """(axis, k) where one axis alone follows the batch as k rows a sample (k = 1: the batch itself), else None."""
    if not (isinstance(s, tuple) and isinstance(t, tuple) and len(s) == len(t) and len(s) > 0):
        return None
    differ = [a for a in range(len(s)) if s[a] != t[a]]
    if len(differ) != 1:
        return None
    a = differ[0]
    if s[a] % n_small or t[a] % n_large or s[a] // n_small != t[a] // n_large:
        return None
    return a, s[a] // n_small
