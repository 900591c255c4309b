"""The chunk budget on the call that finds a kept plan stale: the sizing kept with the plan (factor bytes per
sample, ``plan_cache.SIZES``) no longer applies when the new plan's factors are larger; the first chunk measures
them again and the call starts over at the size the budget allows (engine/chunks.py ``Chunker._recheck``,
``Resized``; engine/sweep.py ``sweep``). Exactness against the per-sample loop in float64."""

from __future__ import annotations

import pytest
import torch
from oracles import rel_err
from test_speed_paths import Switchable
from torch import nn

import nnsim
from nnsim.backends import plan_cache
from nnsim.engine import chunks as chunks_mod

torch.set_num_threads(1)

BUDGET = 200_000  # bytes of one chunk's factors: many samples under the Linear rule, about 19 under the fallback


def _recorded(monkeypatch) -> list[tuple[int, int, int | None]]:
    """(start, size, factor bytes) of every chunk prepared from now on (bytes None: it raised Resized)."""
    seen: list[tuple[int, int, int | None]] = []
    prepare = chunks_mod.Chunker.prepare

    def recording(self, batch, start, *args, **kwargs):
        try:
            c = prepare(self, batch, start, *args, **kwargs)
        except chunks_mod.Resized:
            seen.append((start, batch[0].shape[0], None))
            raise
        seen.append((c.start, c.size, c.nbytes()))
        return c

    monkeypatch.setattr(chunks_mod.Chunker, "prepare", recording)
    return seen


def _stale_model(monkeypatch, n: int) -> tuple[nn.Module, torch.Tensor]:
    """A model whose plan (Linear rule on module 0, small Outer factors) is kept with its sizing, then made stale
    through an attribute the plan key cannot see: module 0 goes to the fallback, whose Dense factors are larger."""
    monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", BUDGET)
    torch.manual_seed(2)
    model = nn.Sequential(Switchable(20, 30), nn.Tanh(), nn.Linear(30, 2)).double()
    x = torch.randn(n, 20, dtype=torch.float64)
    nnsim.Similarity(model, progress=False).kernel(x)
    assert model in plan_cache.SIZES
    model[0].mode["squared"] = True
    return model, x


def _check_budget(seen: list[tuple[int, int, int | None]], n: int) -> None:
    first, rest = seen[0], seen[1:]
    assert first == (0, n, None)  # the chunk that found the stale plan, at the kept size (all n samples)
    assert rest, "the call went on at the kept size"
    assert all(nbytes <= BUDGET for _, _, nbytes in rest)
    assert [s for s, _, _ in rest] == [sum(z for _, z, _ in rest[:k]) for k in range(len(rest))]  # contiguous
    assert sum(z for _, z, _ in rest) == n


def test_the_call_that_finds_a_stale_plan_keeps_the_chunk_budget(monkeypatch):
    n = 64
    model, x = _stale_model(monkeypatch, n)
    ref = nnsim.Similarity(model, backend="loop", progress=False).kernel(x)
    seen = _recorded(monkeypatch)
    sim = nnsim.Similarity(model, progress=False)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        K = sim.kernel(x)
    assert rel_err(K, ref) <= 1e-10
    assert sim.describe()["0"] == "fallback"
    _check_budget(seen, n)
    # the same Similarity again: the new plan and the size measured on that chunk, no restart
    seen.clear()
    assert rel_err(sim.similarity(x), nnsim.Similarity(model, backend="loop", progress=False).similarity(x)) <= 1e-10
    assert seen and all(nbytes <= BUDGET for _, _, nbytes in seen)
    # a new Similarity measures again (the sizing kept for the stale plan was dropped with it)
    seen.clear()
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        assert rel_err(nnsim.Similarity(model, progress=False).kernel(x), ref) <= 1e-10
    assert seen[0][1] == chunks_mod.PROBE_SAMPLES and all(nbytes <= BUDGET for _, _, nbytes in seen)


def test_chunks_sized_by_the_chunker_start_over_at_the_budget(monkeypatch):
    n = 50
    model, x = _stale_model(monkeypatch, n)
    ref = nnsim.Similarity(model, backend="loop", progress=False).self_kernel(x)
    seen = _recorded(monkeypatch)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        K = nnsim.Similarity(model, progress=False).self_kernel(x)
    assert rel_err(K, ref) <= 1e-10
    _check_budget(seen, n)
