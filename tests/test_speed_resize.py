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
from nnsim.engine import ALL, Form, Quantity, Request
from nnsim.engine import chunks as chunks_mod
from nnsim.factors import gram
from nnsim.index import FeatureIndex
from nnsim.inputs import as_source

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


def _stale_model(monkeypatch, n: int, warm=lambda sim, x: sim.kernel(x)) -> tuple[nn.Module, torch.Tensor]:
    """A model whose plan (Linear rule on module 0, small Outer factors) is kept with its sizing (for the request
    of ``warm``'s computation), then made stale through an attribute the plan key cannot see: module 0 goes to
    the fallback, whose Dense factors are larger."""
    monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", BUDGET)
    torch.manual_seed(2)
    model = nn.Sequential(Switchable(20, 30), nn.Tanh(), nn.Linear(30, 2)).double()
    x = torch.randn(n, 20, dtype=torch.float64)
    warm(nnsim.Similarity(model, progress=False), x)
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


# Callers that fix the chunk size for a whole pass (density and approximate denoising in two linear passes, the
# public ``Similarity.chunk_size_for`` behind the index) cannot start over: ``Chunker.chunk_size_for`` checks a
# kept sizing on its 2-sample probe first (which also checks the kept plan), so every chunk keeps the budget.
def _probed_then_within_budget(seen: list[tuple[int, int, int | None]], n: int) -> None:
    assert seen[0][:2] == (0, chunks_mod.PROBE_SAMPLES)  # the probe found the plan stale, before any chunk
    assert all(nbytes is not None and nbytes <= BUDGET for _, _, nbytes in seen)  # no chunk at the kept size
    assert max(z for _, z, _ in seen) < n and sum(z for _, z, _ in seen[1:]) >= n  # all n samples, in chunks


def _loop(model: nn.Module) -> nnsim.Similarity:
    return nnsim.Similarity(model, backend="loop", progress=False)


def test_density_in_two_linear_passes_keeps_the_budget(monkeypatch):
    n = 48
    model, x = _stale_model(monkeypatch, n, lambda sim, x: sim.density(x, algorithm="linear"))
    ref = _loop(model).density(x, algorithm="linear")
    seen = _recorded(monkeypatch)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        got = nnsim.Similarity(model, progress=False).density(x, algorithm="linear")
    assert rel_err(got, ref) <= 1e-10
    _probed_then_within_budget(seen, n)


def test_approximate_denoising_keeps_the_budget(monkeypatch):
    n = 40
    model, x = _stale_model(monkeypatch, n, lambda sim, x: sim.denoising(x, approximate=True, dim=4096))
    # dim above every layer's size: the sketches keep the layers exact, the same numbers for any backend
    ref = _loop(model).denoising(x, approximate=True, dim=4096)
    seen = _recorded(monkeypatch)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        got = nnsim.Similarity(model, progress=False).denoising(x, approximate=True, dim=4096)
    assert rel_err(got.factor_matrix, ref.factor_matrix) <= 1e-10
    assert rel_err(got.consistency, ref.consistency) <= 1e-10
    _probed_then_within_budget(seen, n)


def test_the_public_chunk_size_keeps_the_budget_for_code_that_streams_its_own_chunks(monkeypatch):
    n = 40
    model, x = _stale_model(monkeypatch, n, lambda sim, x: sim.chunk_size_for(x))
    ref = _loop(model).similarity(x)
    seen = _recorded(monkeypatch)
    sim = nnsim.Similarity(model, progress=False)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        size = sim.chunk_size_for(x)
    factors = [sim.corrected_factors((x[s : s + size],), s)[0] for s in range(0, n, size)]
    _probed_then_within_budget(seen, n)
    got = torch.cat([torch.cat([gram(fa, fb, "trace") for fb in factors], 1) for fa in factors]) / sim.d_eff
    assert rel_err(got, ref) <= 1e-10
    assert size == sim.chunk_size_for(x)  # no second probe: the sizing is the one measured on the first


def test_the_index_build_and_search_keep_the_budget(monkeypatch, tmp_path):
    n, q = 36, 30
    model, x = _stale_model(monkeypatch, n, lambda sim, x: sim.chunk_size_for(x))
    queries = x[:q] + 0.1
    seen = _recorded(monkeypatch)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        FeatureIndex.build(nnsim.Similarity(model, progress=False), x, tmp_path / "a", dim=4096, dtype="float32")
    assert seen and all(nbytes is not None and nbytes <= BUDGET for _, _, nbytes in seen)
    # searched by a new Similarity of an equal model whose kept plan is stale (the index's model fingerprint)
    monkeypatch.undo()
    model, x = _stale_model(monkeypatch, n, lambda sim, x: sim.chunk_size_for(x))
    ref_v, ref_i = _loop(model).neighbors(queries, x, k=3)
    seen = _recorded(monkeypatch)
    sim = nnsim.Similarity(model, progress=False)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        v, i = FeatureIndex.open(tmp_path / "a", sim).search(queries, k=3, candidates=n, data=x, backend="torch")
    assert torch.equal(i, ref_i) and rel_err(v, ref_v) <= 1e-10  # every sample re-ranked exactly
    _probed_then_within_budget(seen, q)


def test_ranks_check_a_kept_sizing_on_the_probe_before_the_sweep(monkeypatch):
    """Under torch.distributed every rank must cut the samples alike, so a sweep cannot restart on one rank's
    first chunk: the kept sizing is checked on the probe (the same samples on every rank) instead."""
    n = 40
    model, x = _stale_model(monkeypatch, n)
    ref = _loop(model).kernel(x)
    monkeypatch.setattr(chunks_mod.distributed, "world_size", lambda: 2)
    seen = _recorded(monkeypatch)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        K = nnsim.Similarity(model, progress=False).kernel(x)
    assert rel_err(K, ref) <= 1e-10
    _probed_then_within_budget(seen, n)


# What the resize code does at its boundaries (written against its surviving mutants, docs/testing.md).
def test_a_stale_plan_whose_new_size_still_holds_the_chunk_goes_on(monkeypatch):
    model, x = _stale_model(monkeypatch, 64)
    seen = _recorded(monkeypatch)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        nnsim.Similarity(model, progress=False).kernel(x)
    new = seen[1][1]  # the size the budget allows under the new plan
    monkeypatch.undo()
    model, x = _stale_model(monkeypatch, new)  # a chunk of exactly that many samples: nothing to start over
    ref = _loop(model).kernel(x)
    seen = _recorded(monkeypatch)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        K = nnsim.Similarity(model, progress=False).kernel(x)
    assert rel_err(K, ref) <= 1e-10
    assert [(s, z) for s, z, _ in seen] == [(0, new)] and seen[0][2] <= BUDGET


@pytest.mark.parametrize(("probe_bytes", "expected"), [(0, 200), (2, 200), (21, 20)])
def test_a_stale_sizing_is_measured_again_in_whole_bytes_per_sample(monkeypatch, probe_bytes, expected):
    """As the probe's measure: at least 1 byte per sample, floored to whole bytes (2 probe samples)."""
    model, x = _stale_model(monkeypatch, 40, lambda sim, x: sim.chunk_size_for(x))
    monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", 200)
    monkeypatch.setattr(chunks_mod.Chunk, "nbytes", lambda self: probe_bytes)
    with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
        assert nnsim.Similarity(model, progress=False).chunk_size_for(x) == expected


def test_similarity_columns_recomputed_per_row_chunk_are_exact(monkeypatch):
    """Columns too large for the cache are prepared again for every row chunk (paired with one chunk each)."""
    model, x = _stale_model(monkeypatch, 30)
    y = x[:25] * 0.5
    for reduce in ("trace", None):  # (the d x d blocks: where K(x, x)^-1/2 may go on the tiles at d = 2)
        ref = _loop(model).similarity(x, y, reduce=reduce)
        with pytest.warns(nnsim.FallbackWarning, match=r"module '0' \(Switchable\)"):
            got = nnsim.Similarity(model, cache_bytes=0, progress=False).similarity(x, y, reduce=reduce)
        assert rel_err(got, ref) <= 1e-10


def test_the_probe_that_checks_a_kept_sizing_names_the_argument_and_its_samples(monkeypatch):
    model, x = _stale_model(monkeypatch, 10, lambda sim, x: sim.chunk_size_for(x))
    bad = x.clone()
    bad[1, 3] = float("nan")
    for kept in (True, False):  # the same message as the probe of a model measured afresh
        if not kept:
            plan_cache.SIZES.clear()
        with pytest.raises(nnsim.InputError, match=r"^x: input 0 contains NaN or Inf at samples \[1\]; clean"):
            nnsim.Similarity(model, progress=False).chunk_size_for(bad)


def test_self_sized_chunks_cover_every_sample_beyond_one_chunk():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(chunks_mod.MAX_CHUNK + 44, 3, dtype=torch.float64)  # two chunks at most MAX_CHUNK samples
    got = nnsim.Similarity(model, progress=False).self_kernel(x)
    assert got.shape == (len(x), 2, 2) and rel_err(got, _loop(model).self_kernel(x)) <= 1e-10


def test_self_sized_chunks_name_their_argument_and_read_only_the_range_asked():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    bad = x.clone()
    bad[5, 1] = float("inf")  # after the 2 probe samples: found by the chunk, not the probe
    with pytest.raises(nnsim.InputError, match=r"^x: input 0 contains NaN or Inf at samples \[5\]; clean"):
        nnsim.Similarity(model, progress=False).self_kernel(bad)
    ch = nnsim.Similarity(model, progress=False)._chunker
    got = list(ch.chunks(as_source(x, "x"), "x", Request(Quantity.KERNEL, Form.FULL), stop=7))
    assert [(c.start, c.size) for c in got] == [(0, 7)]
    assert rel_err(torch.cat([c.K[ALL] for c in got]), _loop(model).self_kernel(x[:7])) <= 1e-10


def test_a_kept_sizing_whose_plan_passes_its_check_is_not_measured_again(monkeypatch):
    monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", BUDGET)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 2)).double()
    x = torch.randn(64, 20, dtype=torch.float64)
    nnsim.Similarity(model, progress=False).kernel(x)  # the plan and its sizing kept: one chunk of 64
    ref = _loop(model).kernel(x)
    seen = _recorded(monkeypatch)
    # measured now, the chunk would allow BUDGET // 10_000 = 20 samples: the kept sizing is the plan's own
    monkeypatch.setattr(chunks_mod.Chunk, "nbytes", lambda self: self.size * 10_000)
    K = nnsim.Similarity(model, progress=False).kernel(x)
    assert rel_err(K, ref) <= 1e-10
    assert [(s, z) for s, z, _ in seen] == [(0, 64)]
