"""N x N similarity: nnsim's backends against the plain recipe of the PyTorch NTK tutorial.

Models (random init, seeded, float32, 28x28 single-channel random inputs):
  * MLP 784-256-256-10 (P = 269,322 parameters);
  * CNN conv 1->16 3x3, relu, maxpool 2, conv 16->32 3x3, relu, maxpool 2, linear 800->10 (P = 12,810).

Outputs:
  * scalar: the first logit (d = 1), ``sim.similarity(x)`` -> [N, N];
  * d=10 full: all ten logits, ``sim.similarity(x, reduce=None)`` -> [N, N, 10, 10];
  * d=10 trace: all ten logits, ``sim.similarity(x)`` -> [N, N] = tr(K~)/10.

Methods:
  * loop, functorch, structured: ``nnsim.Similarity(model, output, backend=...)`` with default settings;
  * tutorial: the recipe of the PyTorch "Neural Tangent Kernels" tutorial, per-sample Jacobians with
    ``vmap(jacrev(functional_call))`` and a per-parameter ``einsum('Naf,Mbf->NMab')`` contraction, run in
    blocks so that the Jacobians held at once stay under ``--jac-budget-gb``; normalised by hand with the
    diagonal blocks (K_ii^-1/2 K_ij K_jj^-1/2, pseudo-inverse square root on the range of K_ii).

Timing: all methods of a case run side by side in this process, interleaved, after a warm-up call on a
few samples; each run builds a new ``Similarity`` (planning included). Each method runs ``--repeats`` times;
the table gives the best (minimum) time, which the ratios use, and the median: on a shared machine other
processes only ever add time, so the minimum is the least disturbed estimate. A method whose first run
takes longer than ``--max-repeat-s`` is not repeated (``runs`` column). Before each timed run the script
waits (up to ``--quiet-wait`` s) until other processes use < 15% of the CPUs, and it reports the share of
the machine's CPU time other processes took during the reported run (from /proc/stat).
The loop backend (the per-sample autograd oracle) runs on the first ``--loop-n`` samples only; its N x N
time is extrapolated linearly in N, a lower bound (its per-sample work is linear in N, the pairwise
part grows as N^2), and its rows are marked.

Peak memory (CPU): every (model, output, method) runs once more in a fresh ``multiprocessing`` spawn
worker, which imports, builds the model and inputs and makes the warm-up call, then resets the kernel's
peak-RSS mark (``/proc/self/clear_refs``), records its RSS and runs the method; the reported figure is the
peak RSS during the call (VmHWM) minus that RSS. (``ru_maxrss`` is not used: a spawned child inherits the
parent's high-water mark across fork+exec.) CUDA: ``torch.cuda.max_memory_allocated()`` during the timed
runs minus the allocation before them.

Usage: python benchmarks/bench_kernel.py [--n 1000] [--repeats 3] [--quick] [--threads 2] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

import nnsim

MODELS = ("MLP", "CNN")
CASES = ("scalar", "d=10 full", "d=10 trace")
METHODS = ("loop", "functorch", "structured", "tutorial")
WARMUP_N = 8
TARGETS = {("MLP", "scalar"): 20.0, ("MLP", "d=10 full"): 5.0, ("MLP", "d=10 trace"): 5.0}

# nnsim's structured planner converts a grad-tracking tensor to a float; harmless, keep the output readable.
warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True to a scalar")


# ---------------------------------------------------------------------------------------------- problems
def build_model(name: str, device: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "MLP":
        model = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    elif name == "CNN":
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 5 * 5, 10),
        )
    else:
        raise ValueError(name)
    return model.to(device).eval()


def build_inputs(n: int, device: str) -> Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 28, 28, generator=gen).to(device)


def first_logit(out: Tensor, inputs: object) -> Tensor:
    return out[:, :1]


def case_output(case: str) -> Callable[[Tensor, object], Tensor] | None:
    return first_logit if case == "scalar" else None  # None: the ten logits


def case_reduce(case: str) -> str | None:
    return None if case == "d=10 full" else "trace"


# ---------------------------------------------------------------------------------------------- methods
def run_nnsim(backend: str, model: nn.Module, x: Tensor, case: str) -> Tensor:
    sim = nnsim.Similarity(model, output=case_output(case), backend=backend, progress=False)
    return sim.similarity(x, reduce=case_reduce(case))


def tutorial_kernel(model: nn.Module, x: Tensor, output: Callable | None, budget_bytes: float = 2**31) -> Tensor:
    """The NTK tutorial's recipe, K [N, N, d, d] in the parameters' dtype (any input dtype, e.g. token ids):
    per-sample Jacobians by vmap(jacrev(functional_call)) + a per-parameter einsum, in blocks of at most
    ``budget_bytes`` of Jacobians (beyond it the column blocks' Jacobians are recomputed, upper triangle only)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    dtype = next(iter(params.values())).dtype
    select = output or (lambda out, inputs: out)

    def fnet_single(params: dict[str, Tensor], x1: Tensor) -> Tensor:
        return select(functional_call(model, params, (x1.unsqueeze(0),)), None).squeeze(0)

    jac_fn = vmap(jacrev(fnet_single), (None, 0))

    def jacobians(xs: Tensor) -> list[Tensor]:
        return [j.flatten(2) for j in jac_fn(params, xs).values()]  # per parameter [B, d, P_k]

    def contract(j1: list[Tensor], j2: list[Tensor]) -> Tensor:
        return torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(j1, j2, strict=True)]).sum(0)

    N = x.shape[0]
    d = select(model(x[:1]), None).shape[-1]
    per_sample = d * sum(p.numel() for p in params.values()) * dtype.itemsize
    K = torch.empty(N, N, d, d, dtype=dtype, device=x.device)
    if N * per_sample <= budget_bytes:  # all Jacobians fit: compute them once, then contract in row blocks
        block = max(1, min(N, int(2**28 // per_sample)))
        jac = [torch.empty(N, d, p.numel(), dtype=dtype, device=x.device) for p in params.values()]
        for s in range(0, N, block):
            for j, part in zip(jac, jacobians(x[s : s + block]), strict=True):
                j[s : s + block] = part
        rows = max(1, int(2**27 // (len(jac) * N * d * d)))  # bound the [params, rows, N, d, d] stack
        for s in range(0, N, rows):
            K[s : s + rows] = contract([j[s : s + rows] for j in jac], jac)
        return K
    # Otherwise: blocks of rows, Jacobians of the column blocks recomputed (upper triangle only).
    block = max(1, int(budget_bytes // (2 * per_sample)))
    for s in range(0, N, block):
        ja = jacobians(x[s : s + block])
        for t in range(s, N, block):
            jb = ja if t == s else jacobians(x[t : t + block])
            k = contract(ja, jb)
            K[s : s + block, t : t + block] = k
            if t != s:
                K[t : t + block, s : s + block] = k.transpose(0, 1).transpose(-1, -2)
            del jb, k
    return K


def normalise(K: Tensor, reduce: str | None, rtol: float = 1e-5) -> Tensor:
    """K [N, N, d, d] -> K_ii^-1/2 K_ij K_jj^-1/2 (reduce=None) or its trace / d (reduce='trace')."""
    N, _, d, _ = K.shape
    diag = K[torch.arange(N), torch.arange(N)]  # [N, d, d]
    lam, V = torch.linalg.eigh(diag)
    keep = lam > rtol * lam.amax(-1, keepdim=True).clamp_min(0)
    inv = torch.where(keep, lam.clamp_min(1e-30).rsqrt(), torch.zeros_like(lam))
    S = (V * inv[:, None, :]) @ V.transpose(1, 2)
    Kn = torch.einsum("iab,ijbc,jcd->ijad", S, K, S)
    if reduce is None:
        return Kn
    return Kn.diagonal(dim1=-2, dim2=-1).sum(-1) / d


def run_tutorial(model: nn.Module, x: Tensor, case: str, budget_bytes: float) -> Tensor:
    return normalise(tutorial_kernel(model, x, case_output(case), budget_bytes), case_reduce(case))


def run_method(method: str, model: nn.Module, x: Tensor, case: str, budget_bytes: float) -> Tensor:
    if method == "tutorial":
        return run_tutorial(model, x, case, budget_bytes)
    return run_nnsim(method, model, x, case)


# ---------------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def cpu_ticks() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (NaN elsewhere)."""
    try:
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
    except OSError:
        return float("nan"), float("nan")
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(v) - v[3] - v[4]) / hz, sum(v) / hz


class OthersMeter:
    """Share of the machine's CPU time used by other processes while a block runs (0 = undisturbed)."""

    def __enter__(self) -> OthersMeter:
        self.t0, self.cpu0 = cpu_ticks(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        (b0, a0), (b1, a1) = self.t0, cpu_ticks()
        own = time.process_time() - self.cpu0
        self.share = max(0.0, (b1 - b0 - own) / (a1 - a0)) if a1 > a0 else float("nan")


def wait_quiet(max_wait: float, threshold: float = 0.15) -> None:
    """Before a timed run, wait (up to ``max_wait`` s) until other processes use < ``threshold`` of the CPUs."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        with OthersMeter() as meter:
            time.sleep(1.0)
        if not meter.share >= threshold:  # also stops on NaN (no /proc/stat)
            return
        time.sleep(4.0)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset the peak-RSS mark to the current RSS (Linux >= 4.0) and return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS") * 1024
    except OSError:  # not Linux: fall back to ru_maxrss (may overstate: it includes earlier peaks)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_rss() -> int:
    try:
        return _status_kib("VmHWM") * 1024
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def memory_worker(conn, model_name: str, case: str, method: str, n: int, threads: int, budget: float) -> None:
    """Fresh process: peak RSS increase of one call (bytes) and its time."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    model = build_model(model_name, "cpu")
    x = build_inputs(n, "cpu")
    run_method(method, model, x[:WARMUP_N], case, budget)
    gc.collect()
    base = reset_peak_rss()
    t0 = time.perf_counter()
    out = run_method(method, model, x, case, budget)
    elapsed = time.perf_counter() - t0
    del out
    conn.send((peak_rss() - base, elapsed))
    conn.close()


def measure_memory(model_name: str, case: str, method: str, n: int, threads: int, budget: float) -> float:
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=memory_worker, args=(send, model_name, case, method, n, threads, budget))
    proc.start()
    send.close()
    try:
        peak, _ = recv.recv()
    except EOFError:
        peak = float("nan")
    proc.join()
    return peak


@dataclass
class Row:
    method: str
    n: int
    times: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)  # CPU share used by other processes during each run
    peak: float = float("nan")  # bytes
    diff: float = float("nan")  # max abs difference to functorch (on the common samples)
    nan_mismatch: int = 0
    result: Tensor | None = None

    def time_at(self, n: int, stat: Callable[[list[float]], float] = min) -> float:
        # linear extrapolation (a lower bound) when run on fewer samples
        return (stat(self.times) if self.times else float("nan")) * n / self.n


def compare(a: Tensor, b: Tensor) -> tuple[float, int]:
    """Max abs difference where both are finite, and the number of entries finite in only one."""
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    both = fa & fb
    diff = float((a[both] - b[both]).abs().max()) if bool(both.any()) else float("nan")
    return diff, int((fa != fb).sum())


def bench_case(model_name: str, case: str, args: argparse.Namespace) -> dict[str, Row]:
    model = build_model(model_name, args.device)
    x = build_inputs(args.n, args.device)
    budget = args.jac_budget_gb * 2**30
    rows = {m: Row(m, min(args.n, args.loop_n) if m == "loop" else args.n) for m in METHODS}
    for m in METHODS:  # warm-up
        run_method(m, model, x[:WARMUP_N], case, budget)
    for rep in range(args.repeats):
        for m, row in rows.items():
            if rep > 0 and row.times[0] > args.max_repeat_s:
                continue
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            wait_quiet(args.quiet_wait)
            with OthersMeter() as meter:
                sync(args.device)
                t0 = time.perf_counter()
                out = run_method(m, model, x[: row.n], case, budget)
                sync(args.device)
                row.times.append(time.perf_counter() - t0)
            row.others.append(meter.share)
            if args.device == "cuda":
                row.peak = max(0 if math.isnan(row.peak) else row.peak, torch.cuda.max_memory_allocated() - base)
            row.result = out.cpu()
            del out
            print(f"  {model_name:3s} {case:10s} {m:10s} N={row.n:5d} run {rep + 1}: {row.times[-1]:9.3f} s "
                  f"(other processes: {meter.share:.0%} of the CPUs)", file=sys.stderr, flush=True)
    ref = rows["functorch"].result
    for row in rows.values():
        row.diff, row.nan_mismatch = compare(row.result, ref[: row.n, : row.n])
        row.result = None
    if args.memory and args.device == "cpu":
        for m, row in rows.items():
            row.peak = measure_memory(model_name, case, m, row.n, args.threads, budget)
            print(f"  {model_name:3s} {case:10s} {m:10s} peak RSS increase {row.peak / 2**20:9.1f} MiB",
                  file=sys.stderr, flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- report
def n_params(model_name: str) -> int:
    return sum(p.numel() for p in build_model(model_name, "cpu").parameters())


def fmt_mib(b: float) -> str:
    return "n/a" if math.isnan(b) else f"{b / 2**20:,.0f}"


def table(results: dict[tuple[str, str], dict[str, Row]], args: argparse.Namespace) -> str:
    mem_head = "peak GPU alloc [MiB]" if args.device == "cuda" else "peak RSS Δ [MiB]"
    lines = [
        f"| model | output | method | N run | time [s] at N={args.n}, best (median) | speed-up vs functorch "
        f"| speed-up vs tutorial "
        f"| {mem_head} | max abs diff vs functorch | runs | others' CPU share (best run) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model_name, case), rows in results.items():
        t_f, t_t = rows["functorch"].time_at(args.n), rows["tutorial"].time_at(args.n)
        for m, row in rows.items():
            t = row.time_at(args.n)
            lower = row.n < args.n
            ge, le = ("≥", "≤") if lower else ("", "")
            note = f" (extrapolated from N={row.n})" if lower else ""
            diff = f"{row.diff:.1e}" + (f" ({row.nan_mismatch} NaN mismatches)" if row.nan_mismatch else "")
            mem = fmt_mib(row.peak) + (f" (N={row.n})" if lower and not math.isnan(row.peak) else "")
            name = f"**{m}**" if m == "structured" else m
            busy = f"{row.others[row.times.index(min(row.times))]:.0%}" if row.times else "n/a"
            med = f" ({row.time_at(args.n, statistics.median):.3f})" if len(row.times) > 1 else ""
            lines.append(
                f"| {model_name} | {case} | {name} | {row.n} | {ge}{t:.3f}{med}{note} | {le}{t_f / t:.1f}× "
                f"| {le}{t_t / t:.1f}× | {mem} | {diff} | {len(row.times)} | {busy} |"
            )
    return "\n".join(lines)


def sizes(results: dict[tuple[str, str], dict[str, Row]], n: int) -> str:
    lines = ["| model | output | P | d | all per-sample Jacobians N·d·P·4 B [MiB] | result [MiB] |",
             "|---|---|---:|---:|---:|---:|"]
    for model_name, case in results:
        P = n_params(model_name)
        d = 1 if case == "scalar" else 10
        res = n * n * (d * d if case == "d=10 full" else 1) * 4
        lines.append(f"| {model_name} | {case} | {P:,} | {d} | {fmt_mib(n * d * P * 4)} | {fmt_mib(res)} |")
    return "\n".join(lines)


def targets(results: dict[tuple[str, str], dict[str, Row]], n: int) -> str:
    lines = []
    for (model_name, case), goal in TARGETS.items():
        if (model_name, case) not in results:
            continue
        rows = results[model_name, case]
        s = rows["functorch"].time_at(n) / rows["structured"].time_at(n)
        ok = "met" if s >= goal else "NOT met"
        lines.append(f"- {model_name} {case}: structured is {s:.1f}× faster than functorch (target ≥ {goal:g}×): {ok}")
    return "\n".join(lines)


def nnsim_revision() -> str:
    """The git commit nnsim was imported from, with '+dirty' when src/ has uncommitted changes."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(nnsim.__file__)))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"git {rev}" + ("+dirty" if dirty else "")


def machine(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"{cpu}, {args.threads} threads"
    return (f"torch {torch.__version__}, nnsim {nnsim.__version__} ({args.revision}), "
            f"Python {platform.python_version()}, {dev} ({os.cpu_count()} CPUs visible), float32")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="number of inputs (default 1000; 64 with --quick)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per method, median (default 3; 1 quick)")
    p.add_argument("--quick", action="store_true", help="fast smoke run: small N, one repeat, no memory workers")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--loop-n", type=int, default=None, help="samples for the loop backend (default 100; 32 quick)")
    p.add_argument("--max-repeat-s", type=float, default=60.0,
                   help="do not repeat a method whose first run took longer than this (default 60)")
    p.add_argument("--jac-budget-gb", type=float, default=3.0,
                   help="GiB of Jacobians the tutorial recipe may hold at once (default 3)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure peak memory in fresh worker processes (default: on, off with --quick)")
    p.add_argument("--quiet-wait", type=float, default=None,
                   help="before each timed run, wait up to this many seconds for other processes to use < 15%% "
                        "of the CPUs (default 120; 0 with --quick)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of MLP,CNN")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of: " + ", ".join(CASES))
    args = p.parse_args(argv)
    args.n = args.n or (64 if args.quick else 1000)
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.loop_n = args.loop_n or (32 if args.quick else 100)
    args.quiet_wait = (0.0 if args.quick else 120.0) if args.quiet_wait is None else args.quiet_wait
    args.memory = (not args.quick) if args.memory is None else args.memory
    args.models = [m.strip() for m in args.models.split(",")]
    args.cases = [c.strip() for c in args.cases.split(",")]
    if not set(args.models) <= set(MODELS) or not set(args.cases) <= set(CASES):
        p.error(f"models must be among {MODELS}, cases among {CASES}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device available")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.revision = nnsim_revision()  # at the start: the code imported here
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    results = {}
    for model_name in args.models:
        for case in args.cases:
            results[model_name, case] = bench_case(model_name, case, args)
    cmd = "python benchmarks/bench_kernel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"## nnsim kernel benchmark: N x N similarity, N = {args.n}\n")
    print(f"`{cmd.strip()}` on {machine(args)}; best and median of up to {args.repeats} runs, "
          f"total wall time {time.perf_counter() - start:.0f} s; 1-min load average {load0:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end.\n")
    print(table(results, args))
    print("\nSizes at this N (what methods that materialise per-sample Jacobians must hold or stream):\n")
    print(sizes(results, args.n))
    print("\nTargets (structured vs functorch):\n")
    print(targets(results, args.n) or "- (no target case selected)")


if __name__ == "__main__":
    main()
