"""nnsim against neural-tangents itself: the d = 10 eNTK [N, N, 10, 10] of MLP 784-256-256-10 at N = 100.

Issue 14's target: "at N = 100 no slower than neural-tangents on the MLP above (a planned model reused across
calls pays planning once)". neural-tangents needs jax (and pulls tensorflow through tf2jax), which nnsim's
environment does not carry, so it runs in its own environment as a worker process (`_nt_worker.py`) and the
timings are interleaved call by call with nnsim's: each round times every method once, so load from other
processes hits them alike. Both sides run on one thread (torch.set_num_threads(1); XLA without its Eigen
thread pool); the table gives wall and CPU seconds (median and best over the rounds) and the ratio of
neural-tangents' time to nnsim's (> 1: nnsim faster). Compilation (jax.jit) and nnsim's planning are outside
the timed calls of the reused methods; "new Similarity per call" pays planning every time.

Set-up of the neural-tangents environment (once; ~2.6 GB):

    python3 -m venv /tmp/ntvenv && /tmp/ntvenv/bin/pip install neural-tangents==0.6.5 "jax[cpu]==0.4.30"
    PYTHONPATH=src python benchmarks/bench_neural_tangents.py --nt-python /tmp/ntvenv/bin/python
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import nnsim

sys.path.insert(0, str(Path(__file__).parent))
from bench_models import machine, mlp_ntk_by_hand, nnsim_revision, rel_err  # noqa: E402
from zoo_models import ZOO  # noqa: E402


def _timed(f: Callable[[], object]) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    f()
    return time.perf_counter() - t0, time.process_time() - c0


class Worker:
    """The neural-tangents process: one request per line, one answer per line."""

    def __init__(self, python: str, data: Path) -> None:
        self.proc = subprocess.Popen([python, str(Path(__file__).parent / "_nt_worker.py"), str(data)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.banner = self._answer()

    def _answer(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the neural-tangents worker ended; run it by hand to see its error")
        return line.strip()

    def ask(self, request: str) -> str:
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def timed(self, implementation: str) -> tuple[float, float]:
        wall, cpu = self.ask(implementation).split()
        return float(wall), float(cpu)

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nt-python", required=True, help="python of an environment with neural-tangents + jax")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--nt-methods", default="structured,structured_stax,vector_products",
                        help="also: contraction (the Jacobian contraction, ~25 s a call here)")
    args = parser.parse_args()
    args.threads, args.device, args.revision = 1, "cpu", nnsim_revision()
    torch.set_num_threads(1)
    model, (x,) = ZOO["mlp"](args.n)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mlp.npz"
        arrays = {f"w{k}": m.weight.detach().numpy() for k, m in enumerate(linears)}
        arrays |= {f"b{k}": m.bias.detach().numpy() for k, m in enumerate(linears)}
        np.savez(data, x=x.numpy(), layers=len(linears), **arrays)
        worker = Worker(args.nt_python, data)
        reused = nnsim.Similarity(model, progress=False)
        reused.kernel(x[:4])  # plans once
        nt_methods = tuple(args.nt_methods.split(","))
        runs: dict[str, Callable[[], tuple[float, float]]] = {
            "nnsim, reused Similarity (planned once)": lambda: _timed(lambda: reused.kernel(x)),
            "nnsim, new Similarity per call (planning + verification)":
                lambda: _timed(lambda: nnsim.Similarity(model, progress=False).kernel(x)),
            "hand-written structured NTK in torch": lambda: _timed(lambda: mlp_ntk_by_hand(model, x)),
        }
        runs |= {f"neural-tangents, {m}": (lambda m=m: worker.timed(m)) for m in nt_methods}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for k, f in runs.items():
                times[k].append(f())
        mine = reused.kernel(x).detach().double()
        worker.ask(f"save {Path(tmp) / 'nt.npz'}")
        kept = np.load(Path(tmp) / "nt.npz")
        errs = {m: rel_err(mine, torch.from_numpy(kept[m]).double()) for m in nt_methods}
        banner = worker.banner
        worker.close()
    hand_err = rel_err(mine, mlp_ntk_by_hand(model, x).detach().double())
    base = times["nnsim, reused Similarity (planned once)"]
    base_wall = statistics.median(t[0] for t in base)
    base_cpu = statistics.median(t[1] for t in base)
    lines = [f"bench_neural_tangents.py: N = {args.n}, d = 10, {args.rounds} interleaved rounds, 1 thread, "
             f"{machine(args)}; worker: {banner}", "",
             "| method | wall median [s] | wall best [s] | CPU median [s] | its time / nnsim reused (wall, CPU) "
             "| max rel diff vs nnsim |", "|---|---:|---:|---:|---:|---:|"]
    for k, t in times.items():
        w, c = [a[0] for a in t], [a[1] for a in t]
        m = k.removeprefix("neural-tangents, ")
        diff = errs.get(m, hand_err if k.startswith("hand") else float("nan"))
        lines.append(f"| {k} | {statistics.median(w):.4f} | {min(w):.4f} | {statistics.median(c):.4f} "
                     f"| {statistics.median(w) / base_wall:.2f}x, {statistics.median(c) / base_cpu:.2f}x "
                     f"| {diff:.1e} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
