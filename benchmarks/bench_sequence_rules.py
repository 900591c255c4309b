"""The LSTM / GRU / MultiheadAttention layer rules against their fallbacks, side by side in one process.

Models (random init, seeded, float32): tokens [N, T] from a vocabulary of 1000 -> Embedding(1000, H) ->
{LSTM(H, H) | GRU(H, H) | MultiheadAttention(H, 4 heads, need_weights=False)} -> Linear(H, 10) on the last
output (RNNs) or the token mean (attention). Defaults N = 256, T = 32, H = 64.

Outputs: d = 1 (the first logit) and d = 10 (all logits); ``sim.similarity(x)`` -> [N, N] (trace).
Parameters: ``rule`` = only the sequence module's own parameters (the rule against its fallback, nothing
else in the way), ``all`` = every parameter (the Embedding and the head have their own rules).

Methods:
  * rule: ``nnsim.Similarity(model, backend="structured")`` on this branch (the layer rule);
  * no-rule: the same with the rule unregistered, i.e. nnsim before the rule (the module goes to the
    generic per-module fallback; for LSTM / GRU that path fails, and the failure is reported);
  * functorch: ``backend="functorch"`` (torch.func vmap of per-sample Jacobians; fails on LSTM / GRU);
  * loop: ``backend="loop"`` (per-sample autograd), run on the first ``--loop-n`` samples and extrapolated
    linearly to N (its per-sample work is linear in N; the N x N Gram is negligible): marked "~".

Each method gets a warm-up call on 4 samples, then ``--repeats`` timed runs (a new Similarity each, planning
included); the best time is reported. Ratios are method time / rule time (> 1: the rule is faster).

Usage: python benchmarks/bench_sequence_rules.py [--n 256] [--t 32] [--hidden 64] [--repeats 1] [--loop-n 32]
       [--params rule all] [--modules LSTM GRU MultiheadAttention]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import Tensor, nn

import nnsim
from nnsim.backends.rules import RULES


class RNNClassifier(nn.Module):
    def __init__(self, cell: type, hidden: int, vocab: int = 1000, classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.seq = cell(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.seq(self.emb(tokens))
        return self.head(out[:, -1])


class AttentionClassifier(nn.Module):
    def __init__(self, hidden: int, vocab: int = 1000, classes: int = 10) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.seq = nn.MultiheadAttention(hidden, 4, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.emb(tokens)
        return self.head(self.seq(h, h, h, need_weights=False)[0].mean(1))


def first_logit(out: Tensor, _inputs: tuple) -> Tensor:
    return out[:, :1]


def run(model: nn.Module, x: Tensor, d: int, params: str, backend: str, rule_off: type | None) -> float:
    removed = RULES.pop(rule_off) if rule_off is not None else None
    try:
        sim = nnsim.Similarity(model, output=first_logit if d == 1 else None, backend=backend, progress=False,
                               params=None if params == "all" else [model.seq])
        t0 = time.perf_counter()
        sim.similarity(x)
        return time.perf_counter() - t0
    finally:
        if removed is not None:
            RULES[rule_off] = removed


def best(fn, repeats: int) -> float | str:
    try:
        fn()  # warm-up (imports, allocator, first plan)
    except Exception as err:  # noqa: BLE001  (a fallback that cannot run this model is a result here)
        return f"fails ({type(err).__name__})"
    return min(fn() for _ in range(repeats))


def row(name: str, model: nn.Module, cls: type, x: Tensor, d: int, params: str, args: argparse.Namespace) -> str:
    """One table row: the rule, nnsim without it, functorch and the (extrapolated) loop."""
    times: dict[str, float | str] = {
        "rule": best(lambda: run(model, x, d, params, "structured", None), args.repeats),
        "no-rule": best(lambda: run(model, x, d, params, "structured", cls), args.repeats),
        "functorch": best(lambda: run(model, x, d, params, "functorch", None), args.repeats),
    }
    loop = best(lambda: run(model, x[: args.loop_n], d, params, "loop", None), 1)
    times["loop"] = loop * len(x) / args.loop_n if isinstance(loop, float) else loop

    def show(k: str) -> str:
        v = times[k]
        return v if isinstance(v, str) else f"{'~' if k == 'loop' else ''}{v:.2f}"

    def ratio(k: str) -> str:
        v, r = times[k], times["rule"]
        return "-" if isinstance(v, str) or isinstance(r, str) else f"{v / r:.1f}x"

    return (f"| {name} | {params} | {d} | {show('rule')} | {show('no-rule')} | {show('functorch')} | {show('loop')} "
            f"| {ratio('no-rule')} | {ratio('functorch')} | {ratio('loop')} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--t", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--loop-n", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--params", nargs="+", default=["rule", "all"], choices=["rule", "all"])
    ap.add_argument("--modules", nargs="+", default=["LSTM", "GRU", "MultiheadAttention"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # torch.func's "performance drop" notices on the fallback paths
    torch.manual_seed(0)
    x = torch.randint(0, 1000, (args.n, args.t))
    models = {"LSTM": (RNNClassifier(nn.LSTM, args.hidden), nn.LSTM),
              "GRU": (RNNClassifier(nn.GRU, args.hidden), nn.GRU),
              "MultiheadAttention": (AttentionClassifier(args.hidden), nn.MultiheadAttention)}
    print(f"N = {args.n}, T = {args.t}, H = {args.hidden}, float32, {args.threads} thread(s); times in s, "
          "ratios = method / rule")
    print("| module | params | d | rule | no-rule | functorch | loop | no-rule/rule | functorch/rule | loop/rule |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (model, cls) in models.items():
        if name not in args.modules:
            continue
        for params in args.params:
            for d in (1, 10):
                print(row(name, model, cls, x, d, params, args), flush=True)

if __name__ == "__main__":
    main()
