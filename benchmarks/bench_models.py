"""The model zoo (benchmarks/zoo_models.py): nnsim's default backend against torch.func, Opacus, BackPACK and the
per-sample loop.

For each model, at N samples (default 256) and each output case
  * ``d=1``: the first logit, ``sim.similarity(x)`` -> [N, N] (the cosine of the two parameter gradients);
  * ``d=10``: the ten logits, ``sim.similarity(x, reduce=None)`` -> [N, N, 10, 10] (what the recipe computes),
the methods
  * ``nnsim``: ``nnsim.Similarity(model, output)`` with default settings (structured backend);
  * ``nnsim-reused``: one ``Similarity`` built (and warmed up) before the timed runs and called again for every
    run: the plan it made is kept and not re-verified (a planned model reused across calls pays planning once);
  * ``nnsim-new-plan``: the same as a first ``Similarity`` on the model (the verified plans that the structured
    backend keeps per model object dropped first, so planning is paid again);
  * ``nnsim-functorch``: the same with ``backend="functorch"`` (nnsim's own torch.func backend);
  * ``torch.func``: the PyTorch NTK tutorial recipe, ``vmap(jacrev(functional_call))`` per-sample Jacobians and
    a per-parameter ``einsum('Naf,Mbf->NMab')``, normalised by hand (``bench_kernel.tutorial_kernel``);
  * ``opacus``: ``opacus.GradSampleModule`` (loss_reduction="sum"), one forward and backward pass per output,
    each parameter's per-sample gradients -> J_k [N, d, P_k], then sum_k J_k J_k^T and the same normalisation
    as the recipe's (``_explicit_baselines.py``; Opacus's ``ModuleValidator.fix`` replacements only where they
    keep the model's outputs);
  * ``backpack``: ``backpack.extend`` + ``with backpack(BatchGrad())``, one backward per output, the same Gram.
    Both libraries wrap their own copy of the model once, before the timed runs; what they cannot handle is
    "n/a" with their error, and every result they give is checked against the loop like the others';
  * ``loop``: ``backend="loop"``, per-sample autograd (the oracle), on the first ``--loop-n`` samples, its time
    extrapolated linearly to N, plus the part of its Gram that grows faster than N (the GEMM of its explicit
    gradients [N e, P] with themselves, e = 1 at d=1 and d at d=10, timed here; still a lower bound);
run side by side in this process, interleaved, after a warm-up call on 4 samples; each timed run builds a new
``Similarity`` (``nnsim-reused`` excepted: it calls the warm-up's again): ``nnsim`` finds the plan kept from the
warm-up and re-verifies it on its first batch, ``nnsim-new-plan`` plans afresh. Times are medians of
``--repeats`` runs, wall clock; the CPU-time ratios (``time.process_time`` of this single-threaded process) are
less sensitive to other processes' load.

Also reported: the peak RSS increase of the ``nnsim`` call (VmHWM after resetting it with /proc/self/clear_refs,
in this process: a lower bound when freed memory is reused), the max relative error of ``nnsim`` against the
loop on the common samples (max |a - b| / max |b|; every other method's too, in the second table), the FLOP
floor and the share of this CPU's GEMM peak that
nnsim's time corresponds to: floor = FLOPs of one forward and d backward passes of the batch (counted by
``torch.utils.flop_counter``, all parameters' gradients) + 2 P e N (N + 1) / 2 for the Gram (e = 1 for d = 1,
d^2 for the d x d blocks); ``floor %`` = floor / (nnsim time x measured GEMM flop/s). And which rule each layer
used (``sim.describe()``): layers on ``fallback`` / ``functorch`` are not yet covered by a layer rule.

Usage: python benchmarks/bench_models.py [--quick] [--models mlp,vit] [--n 256] [--cases d=1,d=10]
       [--repeats 3] [--threads 1] [--loop-n 32] [--methods nnsim,nnsim-reused,opacus,backpack,...]
Opacus and BackPACK: ``make bench-deps`` (pyproject.toml's ``bench`` extra, installed after the pinned torch with
--no-deps where a package requires torch or torchvision); without them their columns read n/a.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _explicit_baselines import backpack_jacobians, explicit_kernel, opacus_jacobians  # noqa: E402
from bench_kernel import OthersMeter, machine, nnsim_revision, normalise, peak_rss, reset_peak_rss, tutorial_kernel  # noqa: E402
from zoo_models import ZOO  # noqa: E402

import nnsim  # noqa: E402
from nnsim.backends import plan_cache  # noqa: E402

warnings.filterwarnings("ignore")  # planning notes and fallback warnings: the describe() column says it
METHODS = ("nnsim", "nnsim-reused", "nnsim-new-plan", "nnsim-functorch", "torch.func", "opacus", "backpack", "loop")
EXPLICIT = {"opacus": opacus_jacobians, "backpack": backpack_jacobians}  # per-sample gradient libraries
WRONG = 1e-3  # a max relative error above this (float32) marks a result as wrong in the tables
QUICK_MODELS = ("mlp", "resnet-small", "vit", "transformer-encoder", "hf-vit", "lstm")


def output_fn(case: str) -> Callable[[Tensor, object], Tensor] | None:
    return (lambda out, inputs: out[:, :1]) if case == "d=1" else None


def reduce_of(case: str) -> str | None:
    return "trace" if case == "d=1" else None


def columns_of(case: str) -> Callable[[Tensor], Tensor]:
    return (lambda y: y[:, :1]) if case == "d=1" else (lambda y: y)


def setup(method: str, model: nn.Module, x: tuple[Tensor, ...], case: str) -> tuple[object, str]:
    """What a method builds once, before the warm-up and the timed runs (None: nothing), and a note on it."""
    if method == "nnsim-reused":
        return nnsim.Similarity(model, output=output_fn(case), progress=False), ""
    if method == "opacus":
        return opacus_jacobians(model, columns_of(case), probe=tuple(t[:4] for t in x))
    if method == "backpack":
        return backpack_jacobians(model, columns_of(case))
    return None, ""


def run(method: str, model: nn.Module, x: tuple[Tensor, ...], case: str, built: object = None) -> Tensor:
    if method == "torch.func":
        return normalise(tutorial_kernel(model, x[0], output_fn(case)), reduce_of(case))
    if method == "nnsim-reused":
        return built.similarity(*x, reduce=reduce_of(case))
    if method in EXPLICIT:
        with torch.no_grad():
            d = columns_of(case)(model(*(t[:1] for t in x))).shape[1]
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return normalise(explicit_kernel(built, x, d, P), reduce_of(case))
    if method == "nnsim-new-plan":  # as a first Similarity on this model: no plan kept from an earlier one
        plan_cache._STORE.pop(model, None)
    backend = {"nnsim": "auto", "nnsim-new-plan": "auto", "nnsim-functorch": "functorch", "loop": "loop"}[method]
    sim = nnsim.Similarity(model, output=output_fn(case), backend=backend, progress=False)
    return sim.similarity(*x, reduce=reduce_of(case))


def error_text(err: Exception) -> str:
    """An exception's message; Opacus raises one carrying a list of errors (one per offending layer): the first."""
    if err.args and isinstance(err.args[0], list) and err.args[0]:
        return f"{len(err.args[0])} errors, the first: {err.args[0][0]}"
    return str(err)


def mlp_ntk_by_hand(model: nn.Sequential, x: Tensor) -> Tensor:
    """Exact eNTK K [N, N, d, d] of an MLP written out as neural-tangents' "structured derivatives" do it: per
    Linear layer (a_i . a_j + 1) (delta_i delta_j^T), inputs a and output signals delta from one forward and d
    backward passes (jax-free stand-in for ``nt.empirical_ntk_fn(..., implementation=STRUCTURED_DERIVATIVES)``)."""
    acts: list[Tensor] = []
    outs: list[Tensor] = []

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        acts.append(inp[0].detach())
        outs.append(out)

    handles = [m.register_forward_hook(hook) for m in model if isinstance(m, nn.Linear)]
    try:
        y = model(x)
    finally:
        for h in handles:
            h.remove()
    d = y.shape[1]
    deltas = [torch.autograd.grad(y[:, c].sum(), outs, retain_graph=c < d - 1) for c in range(d)]
    K = None
    for k, a in enumerate(acts):
        dl = torch.stack([g[k] for g in deltas], 1)  # [N, d, n]
        N, n = dl.shape[0], dl.shape[2]
        dd = (dl.reshape(N * d, n) @ dl.reshape(N * d, n).T).view(N, d, N, d)
        t = dd.mul_((a @ a.T).add_(1.0)[:, None, :, None])
        K = t if K is None else K.add_(t)
    return K.permute(0, 2, 1, 3)


def small_n(args: argparse.Namespace) -> str:
    """The d = 10 eNTK of MLP 784-256-256-10 at N = 100 (issue 14: neural-tangents 0.032 s, nnsim 0.066 s)."""
    model, (x,) = ZOO["mlp"](100)
    reused = nnsim.Similarity(model, progress=False)
    reused.kernel(x[:4])
    ref = mlp_ntk_by_hand(model, x).detach()
    runs = {"nnsim, reused Similarity (planned once)": lambda: reused.kernel(x),
            "nnsim, new Similarity per call (planning + verification)":
                lambda: nnsim.Similarity(model, progress=False).kernel(x),
            "hand-written structured NTK (jax-free neural-tangents equivalent)": lambda: mlp_ntk_by_hand(model, x)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(max(5, args.repeats)):
        for k, f in runs.items():
            times[k].append(_timed(f))
    err = rel_err(reused.kernel(x), ref)
    lines = ["| N = 100, d = 10, kernel [N, N, 10, 10] | median [s] | best [s] |", "|---|---:|---:|"]
    lines += [f"| {k} | {statistics.median(t):.4f} | {min(t):.4f} |" for k, t in times.items()]
    lines.append("| neural-tangents 0.6.5 (issue 14's figure, not run here) | 0.032 | |")
    return "\n".join(lines) + f"\n\nnnsim vs the hand-written NTK: max rel err {err:.1e}"


LAYERS = [  # (name, B, T, m, n, d, vocab, mode)
    ("ViT MLP Linear", 128, 17, 65, 128, 10, 0, "trace"),
    ("ViT MLP Linear, d = 1", 128, 17, 65, 128, 1, 0, "trace"),
    ("demo-CNN conv 16->32 on 4x4", 128, 16, 145, 32, 10, 0, "full"),
    ("BERT-base MLP Linear", 64, 16, 769, 3072, 1, 0, "trace"),
    ("Embedding vocab 1000", 128, 16, 0, 64, 10, 1000, "trace"),
    ("conv over 64 positions", 128, 64, 577, 64, 1, 0, "trace"),
]


def layers() -> str:
    """Single layers: both paths of the cost model's choice timed on one tile (B samples against themselves)."""
    from nnsim.factors import Outer

    lines = ["| layer | B, T, m, n, d, mode | explicit: build g + Gram [s] | pairwise [s] | chosen | max rel diff |",
             "|---|---|---:|---:|---|---:|"]
    for name, B, T, m, n, d, vocab, mode in LAYERS:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(0, vocab, (B, 1, T), generator=gen) if vocab else torch.randn(B, 1, T, m, generator=gen)
        f = Outer("l", a, torch.randn(B, d, 1, T, n, generator=gen), ("w", torch.Size([n, vocab or m])), vocab=vocab)
        dense = f.dense()
        build = min(_timed(f.dense) for _ in range(2))
        explicit = min(_timed(lambda dense=dense, mode=mode: dense.gram(dense, mode)) for _ in range(2))
        pairwise = min(_timed(lambda f=f, mode=mode: f.gram(f, mode)) for _ in range(2))
        diff = rel_err(f.gram(f, mode), dense.gram(dense, mode))
        chosen = "explicit" if f.prefers_dense(mode) else "pairwise"
        lines.append(f"| {name} | {B}, {T}, {vocab or m}, {n}, {d}, {mode} | {build:.3f} + {explicit:.3f} "
                     f"| {pairwise:.3f} | {chosen} | {diff:.1e} |")
    return "\n".join(lines)


def gemm_flops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(3))
    return 2 * 1024**3 / best


def _timed(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def floor_flops(model: nn.Module, x: tuple[Tensor, ...], case: str) -> float:
    """Forward + d backward passes of the batch (counted), plus the Gram's 2 P e N (N+1)/2."""
    N = x[0].shape[0]
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    with FlopCounterMode(display=False) as counter:
        y = model(*x)
        y = y[:, :1] if case == "d=1" else y
        for c in range(y.shape[1]):
            torch.autograd.grad(y[:, c].sum(), params, retain_graph=c < y.shape[1] - 1, allow_unused=True)
    d = y.shape[1]
    e = 1 if case == "d=1" else d * d
    return counter.get_total_flops() + 2 * P * e * N * (N + 1) / 2


def rel_err(a: Tensor, b: Tensor) -> float:
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    both = fa & fb
    if not bool(both.any()):
        return float("nan")
    return float((a[both] - b[both]).abs().max() / b[both].abs().max())


def rules_used(model: nn.Module, x: tuple[Tensor, ...], case: str) -> str:
    sim = nnsim.Similarity(model, output=output_fn(case), progress=False)
    sim.similarity(*(t[:2] for t in x))
    counts: dict[str, int] = {}
    for rule in sim.describe().values():
        counts[rule] = counts.get(rule, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def bench(name: str, case: str, args: argparse.Namespace, peak: float) -> dict[str, object]:
    model, x = ZOO[name](args.n)
    P = sum(p.numel() for p in model.parameters())
    row: dict[str, object] = {"model": name, "case": case, "P": P}
    sizes = {m: (min(args.n, args.loop_n) if m == "loop" else args.n) for m in METHODS}
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    cpu: dict[str, list[float]] = {m: [] for m in METHODS}  # process CPU time: less sensitive to others' load
    results: dict[str, Tensor] = {}
    errors: dict[str, str] = {}
    built: dict[str, object] = {}
    notes: dict[str, str] = {}
    for m in METHODS:  # set-up, warm-up (and the first failure, if any)
        if f"{name}:{case}:{m}" in args.skip or m not in args.methods:
            errors[m] = "skipped (--skip)" if m in args.methods else "not run (--methods)"
            continue
        try:
            built[m], notes[m] = setup(m, model, x, case)
            run(m, model, tuple(t[:4] for t in x), case, built[m])
        except Exception as err:  # noqa: BLE001  (a method that cannot run this model is reported, not fatal)
            width = 240 if m in EXPLICIT else 80
            errors[m] = f"{type(err).__name__}: {' '.join(error_text(err).split())[:width]}"
            traceback.print_exc(limit=2, file=sys.stderr)
    others = []
    for rep in range(args.repeats):
        for m in METHODS:
            if m in errors or (rep > 0 and times[m] and times[m][0] > args.max_repeat_s):
                continue
            gc.collect()
            xs = tuple(t[: sizes[m]] for t in x)
            base = reset_peak_rss() if m == "nnsim" else 0
            with OthersMeter() as meter:
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    out = run(m, model, xs, case, built.get(m))
                except Exception as err:  # noqa: BLE001  (it ran on the warm-up's 4 samples, not on N: reported)
                    errors[m] = f"{type(err).__name__} at N: {' '.join(error_text(err).split())[:240]}"
                    traceback.print_exc(limit=2, file=sys.stderr)
                    times[m], cpu[m] = [], []
                    results.pop(m, None)
                    continue
                times[m].append(time.perf_counter() - t0)
                cpu[m].append(time.process_time() - c0)
            if m == "nnsim":
                row["peak_mib"] = (peak_rss() - base) / 2**20
                others.append(meter.share)
            results[m] = out
            print(f"  {name} {case} {m} run {rep + 1}: {times[m][-1]:.3f} s (others {meter.share:.0%})",
                  file=sys.stderr, flush=True)
    med = {m: statistics.median(t) * args.n / sizes[m] for m, t in times.items() if t}
    if "loop" in med and sizes["loop"] < args.n:
        # The loop's Gram grows as N^2: add what its explicit gradients' Gram costs at N beyond the linear share.
        e = 1 if case == "d=1" else int(results["loop"].shape[-1])
        gram_n, gram_k = gram_seconds(args.n * e, P), gram_seconds(sizes["loop"] * e, P)
        med["loop"] += max(0.0, gram_n - gram_k * args.n / sizes["loop"])
    med_cpu = {m: statistics.median(t) for m, t in cpu.items() if t and m != "loop"}
    row.update(times=med, cpu=med_cpu, errors=errors, notes=notes,
               others=statistics.median(others) if others else float("nan"))
    if "loop" in results:
        k = sizes["loop"]
        row["err"] = {m: rel_err(r[:k, :k], results["loop"]) for m, r in results.items() if m != "loop"}
    if "nnsim" in med:
        row["floor_pct"] = 100 * floor_flops(model, x, case) / (med["nnsim"] * peak)
        row["rules"] = rules_used(model, x, case)
    return row


def gram_seconds(rows: int, P: int, budget: int = 2**28) -> float:
    """Seconds of the Gram GEMM [rows, P] x [P, rows] of explicit gradients (float32, this process), timed on
    an inner slab that fits ``budget`` bytes and scaled to P (GEMM time is linear in the inner size)."""
    inner = max(1, min(P, budget // (4 * rows)))
    A = torch.randn(rows, inner)
    A @ A.T
    t0 = time.perf_counter()
    A @ A.T
    return (time.perf_counter() - t0) * P / inner


def _fmt_t(t: float | None) -> str:
    return "failed" if t is None else f"{t:.3f}"


def table(rows: list[dict[str, object]], args: argparse.Namespace) -> str:
    head = (f"| model | P | output | nnsim [s] | vs torch.func | vs loop (≥) | vs nnsim functorch "
            f"| nnsim, new plan [s] | new plan vs torch.func "
            "| CPU time: vs torch.func / vs functorch / new plan vs torch.func "
            f"| torch.func [s] | loop [s] (≥, from N={args.loop_n} + Gram at N) | nnsim functorch [s] "
            "| nnsim peak RSS Δ [MiB] | nnsim max rel err vs loop | floor % | others' CPU | layer rules (describe) |")
    lines = [head, "|" + "---|" * 18]
    for r in rows:
        t, c = r["times"], r.get("cpu", {})

        def ratio(m: str, t: dict = t, of: str = "nnsim") -> str:
            return "n/a" if of not in t or m not in t else f"{t[m] / t[of]:.2f}×"

        err = r.get("err", {}).get("nnsim", float("nan"))

        def sec(m: str, t: dict = t, r: dict = r) -> str:  # a method left out by --methods reads "not run"
            left_out = m not in t and r["errors"].get(m, "").startswith(("not run", "skipped"))
            return "not run" if left_out else _fmt_t(t.get(m))

        lines.append(
            f"| {r['model']} | {r['P']:,} | {r['case']} | {sec('nnsim')} | {ratio('torch.func')} "
            f"| {ratio('loop')} | {ratio('nnsim-functorch')} | {sec('nnsim-new-plan')} "
            f"| {ratio('torch.func', of='nnsim-new-plan')} "
            f"| {ratio('torch.func', c)} / {ratio('nnsim-functorch', c)} / {ratio('torch.func', c, 'nnsim-new-plan')} "
            f"| {sec('torch.func')} | {sec('loop')} "
            f"| {sec('nnsim-functorch')} | {r.get('peak_mib', float('nan')):.0f} | {err:.1e} "
            f"| {r.get('floor_pct', float('nan')):.1f} | {r['others']:.0%} | {r.get('rules', '')} |")
        for m, e in r["errors"].items():
            if m not in EXPLICIT and m != "nnsim-reused" and not e.startswith("not run"):
                lines.append(f"| ↳ {m} failed: {e} |" + " |" * 17)
    return "\n".join(lines)


def baselines_table(rows: list[dict[str, object]]) -> str:
    """nnsim (new Similarity per run, kept plan re-verified) and a reused Similarity against Opacus and BackPACK:
    times, ratios (the other's time over nnsim's: > 1, nnsim faster; wall and CPU time) and every method's max
    relative error against the loop oracle on the common samples."""
    head = ("| model | output | nnsim [s] | nnsim reused [s] | reused: CPU vs nnsim / torch.func over reused "
            "| Opacus [s] | Opacus over nnsim: wall / CPU | Opacus over nnsim reused: CPU "
            "| BackPACK [s] | BackPACK over nnsim: wall / CPU | BackPACK over nnsim reused: CPU "
            "| max rel err vs loop: nnsim / reused / new plan / functorch / torch.func / Opacus / BackPACK |")
    lines = [head, "|" + "---|" * 12]
    notes = []
    for r in rows:
        t, c, errs = r["times"], r.get("cpu", {}), r.get("err", {})

        def ratio(m: str, d: dict, of: str) -> str:
            return "n/a" if of not in d or m not in d else f"{d[m] / d[of]:.2f}×"

        def cell(m: str, r: dict = r) -> str:
            if m in r["errors"]:
                return "not run" if r["errors"][m].startswith(("not run", "skipped")) else "n/a (below)"
            return _fmt_t(r["times"].get(m))

        def err(m: str, errs: dict = errs) -> str:
            e = errs.get(m)
            if e is None:
                return "–"
            return f"**{e:.1e} wrong**" if not e <= WRONG else f"{e:.1e}"

        all_errs = " / ".join(err(m) for m in ("nnsim", "nnsim-reused", "nnsim-new-plan", "nnsim-functorch",
                                               "torch.func", "opacus", "backpack"))
        lines.append(
            f"| {r['model']} | {r['case']} | {_fmt_t(t.get('nnsim'))} | {cell('nnsim-reused')} "
            f"| {ratio('nnsim', c, 'nnsim-reused')} / {ratio('torch.func', c, 'nnsim-reused')} "
            f"| {cell('opacus')} | {ratio('opacus', t, 'nnsim')} / {ratio('opacus', c, 'nnsim')} "
            f"| {ratio('opacus', c, 'nnsim-reused')} "
            f"| {cell('backpack')} | {ratio('backpack', t, 'nnsim')} / {ratio('backpack', c, 'nnsim')} "
            f"| {ratio('backpack', c, 'nnsim-reused')} "
            f"| {all_errs} |")
        for m in ("nnsim-reused", *EXPLICIT):
            e, note = r["errors"].get(m), r.get("notes", {}).get(m)
            if e and not e.startswith(("not run", "skipped")):
                notes.append(f"- {r['model']} {r['case']}, {m}: n/a: {e}" + (f" ({note})" if note else ""))
            elif note:
                notes.append(f"- {r['model']} {r['case']}, {m}: {note}")
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=64, 6 models, 1 repeat (~2 minutes)")
    parser.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(ZOO)}")
    parser.add_argument("--cases", default="d=1,d=10")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-n", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods "
                        "(nnsim always runs: every ratio is against it; the loop too: it is the oracle)")
    parser.add_argument("--skip", default="", help="model:case:method triples not to run, comma-separated")
    parser.add_argument("--layers", action="store_true", help="only the single-layer cost-model table")
    parser.add_argument("--small-n", action="store_true", help="only the N = 100 MLP eNTK (fixed cost per call)")
    parser.add_argument("--max-repeat-s", type=float, default=60.0, help="do not repeat a method slower than this")
    args = parser.parse_args()
    args.skip = set(filter(None, args.skip.split(",")))
    args.methods = set(args.methods.split(",")) | {"nnsim", "loop"}
    if args.methods - set(METHODS):
        parser.error(f"unknown methods {sorted(args.methods - set(METHODS))}; choose from {list(METHODS)}")
    if args.quick:
        args.n, args.repeats, args.loop_n = min(args.n, 64), 1, min(args.loop_n, 16)
    names = args.models.split(",") if args.models else list(QUICK_MODELS if args.quick else ZOO)
    unknown = [m for m in names if m not in ZOO]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(ZOO)}")
    args.device, args.revision = "cpu", nnsim_revision()  # at the start: the code this run imported
    torch.set_num_threads(args.threads)
    if args.layers:
        print(f"bench_models.py --layers, {args.threads} thread(s), {machine(args)}\n\n{layers()}")
        return
    if args.small_n:
        print(f"bench_models.py --small-n, {args.threads} thread(s), {machine(args)}\n\n{small_n(args)}")
        return
    peak = gemm_flops()
    rows = []
    t0 = time.perf_counter()
    for name in names:
        for case in args.cases.split(","):
            rows.append(bench(name, case, args, peak))
            for line in (*table(rows[-1:], args).splitlines()[2:], *baselines_table(rows[-1:]).splitlines()[2:]):
                print(line, file=sys.stderr, flush=True)  # partial results, should a later model fail
    print(f"\nbench_models.py: N={args.n}, repeats={args.repeats} (medians), {args.threads} thread(s), "
          f"{machine(args)}; GEMM peak measured {peak / 1e9:.1f} GFLOP/s; total {time.perf_counter() - t0:.0f} s\n")
    print(table(rows, args))
    print("\nnnsim against a reused Similarity, Opacus and BackPACK (the same runs):\n")
    print(baselines_table(rows))


if __name__ == "__main__":
    main()
