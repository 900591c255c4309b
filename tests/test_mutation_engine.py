"""nnsim.engine (chunks, the tile sweep, the rank report) and the density / neighbour sweeps, written against the
survivors of a mutmut run (docs/testing.md).

Oracles: the brute-force kernels of tests/test_estimators_asymmetric.py (per-sample autograd in float64, the
normalisation by the SVD of each G(x); no nnsim inside), on a two-hidden-layer MLP (d = 3) with chunks of 3
samples (ragged last chunk, off-diagonal tiles) and samples whose gradient is exactly zero (an output gate).
"""

from __future__ import annotations

import math
import os
import re
import warnings

import pytest
import torch
from oracles import jacobian, overflowing
from test_estimators_asymmetric import Brute, mlp2
from torch import nn

import nnsim
import nnsim.engine.chunks as chunks_mod
from nnsim.backends import plan_cache
from nnsim.distributed import Ranks
from nnsim.engine import ALL, Form, Quantity, RankReport, Request, sweep
from nnsim.errors import InputError, ModelError, RankDeficiencyWarning, ResultTooLargeError
from nnsim.inputs import as_source

torch.set_num_threads(1)
F64 = torch.float64


def close(a, b, tol=1e-9):
    torch.testing.assert_close(a, b.to(a.dtype), atol=tol, rtol=tol, equal_nan=True)


def alive(out, inputs):
    """The outputs, switched off entirely (a zero gradient) where x_0 == 0."""
    return out * (inputs[0][:, :1] != 0).to(out.dtype)


@pytest.fixture(scope="module")
def data():
    model, x = mlp2(3)
    x = x[:8].clone()
    x[4, 0] = 0.0  # sample 4 (second chunk of 3) has a zero gradient
    xb = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    xb[3, 0] = 0.0  # and sample 3 of the second argument
    return model, x, xb, Brute(model, x, alive), Brute(model, xb, alive)


def sim_of(model, **kw):
    return nnsim.Similarity(model, alive, chunk_size=3, progress=False, **kw)


def _nan_sim(bf, other=None):
    with torch.no_grad():
        S = bf.sim(other)  # SVD-based: a zero G gives a zero row; the library's answer there is NaN
    return S


# ------------------------------------------------------------------------------------------ pairwise results

def test_zero_gradient_samples_are_nan_rows_and_columns_and_named(data):
    model, x, xb, bf, bb = data
    sim = sim_of(model)
    with pytest.warns(RankDeficiencyWarning) as rec:
        S = sim.similarity(x)
    assert len(rec) == 1
    assert str(rec[0].message) == ("1 sample(s) of xa have a zero gradient (no direction): their similarity "
                                   "values are NaN. Samples: [4]")
    expected = _nan_sim(bf)
    expected[4, :] = float("nan")
    expected[:, 4] = float("nan")
    close(S, expected)
    with pytest.warns(RankDeficiencyWarning) as rec:
        S = sim.similarity(x, xb, reduce=None)
    assert sorted(str(r.message).split(" have")[0] for r in rec) == ["1 sample(s) of xa", "1 sample(s) of xb"]
    assert any(str(r.message).endswith("Samples: [3]") for r in rec)
    expected = bf.ktilde(bb)
    expected[4] = float("nan")
    expected[:, 3] = float("nan")
    close(S, expected)
    # The kernel itself is defined (zero); the influence is NaN on the rows of a zero-gradient xa only.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K = sim.kernel(x, xb)
    close(K, torch.einsum("icp,jep->ijce", bf.G, bb.G))
    # Only xa's zero gradient is reported: the columns of a zero-gradient xb are zeros, not NaN (the report
    # used to name them too, as "xb" even for influence(x); fixed in engine/sweep.py).
    message = "1 sample(s) of xa have a zero gradient (no direction): their influence values are NaN. Samples: [4]"
    for args in [(x, xb), (x,)]:
        with pytest.warns(RankDeficiencyWarning) as rec:
            inf = sim.influence(*args)
        assert [str(r.message) for r in rec] == [message]
    with pytest.warns(RankDeficiencyWarning) as rec:
        inf = sim.influence(x, xb)
    Kaa = bf.K.diagonal(dim1=0, dim2=1).permute(2, 0, 1)
    expected = torch.einsum("icp,jep->ijce", bf.G, bb.G).transpose(-1, -2) @ torch.linalg.pinv(Kaa)[:, None]
    expected[4] = float("nan")
    close(inf, expected)
    assert not inf[[0, 1, 2, 3, 5, 6, 7], 3].isnan().any()  # a zero-gradient xb is moved by nothing: zeros


def test_by_layer_results_are_the_layer_kernels(data):
    model, x, xb, _, _ = data
    sim = sim_of(model)
    K = sim.kernel(x, xb, by="layer")
    assert sorted(K) == ["0", "2", "4"]
    total = 0
    for name, layer in [("0", model[0]), ("2", model[2]), ("4", model[4])]:
        Ga = jacobian(model, (x,), alive, params=list(layer.parameters()))
        Gb = jacobian(model, (xb,), alive, params=list(layer.parameters()))
        close(K[name], torch.einsum("icp,jep->ijce", Ga, Gb))
        total = total + K[name]
    close(total, sim.kernel(x, xb))


def test_trace_similarity_is_divided_by_d_minus_one_with_the_fisher_metric():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(7, 3, dtype=F64)
    sim = nnsim.Similarity(model, metric="fisher", chunk_size=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank d - 1 is full rank for the Fisher metric: no warning
        S = sim.similarity(x)
        Kf = sim.similarity(x, reduce=None)
    assert sim.d_eff == 3
    close(S, Kf.diagonal(dim1=-2, dim2=-1).sum(-1) / 3)
    close(S.diagonal(), torch.ones(7, dtype=F64))
    one = nn.Linear(3, 1).double()
    with pytest.raises(InputError, match="at least 2 classes"):
        nnsim.Similarity(one, metric="fisher", progress=False).similarity(x)


def test_results_above_max_result_bytes_are_refused_with_the_sizes(data):
    model, x, xb, _, _ = data
    need = 8 * 5 * 9 * 8  # N M d d float64 bytes
    sim = sim_of(model, max_result_bytes=need)
    sim.kernel(x, xb)  # exactly at the limit: allowed
    sim = sim_of(model, max_result_bytes=need - 1)
    with pytest.raises(ResultTooLargeError) as e:
        sim.kernel(x, xb)
    assert (f"the result would take {need / 2**30:.2f} GiB (N=8, M=5, d=3, 1 group(s)) > max_result_bytes = "
            f"{(need - 1) / 2**30:.2f} GiB; use reduce='trace'") in str(e.value)
    with pytest.raises(ResultTooLargeError, match=r"N=8, M=5, d=3, 3 group\(s\)"):
        sim_of(model, max_result_bytes=3 * 8 * 5 * 8 - 1).similarity(x, xb, by="layer")
    with pytest.warns(RankDeficiencyWarning):  # trace results: [N, M] per group, exactly at the limit
        sim_of(model, max_result_bytes=3 * 8 * 5 * 8).similarity(x, xb, by="layer")


# ------------------------------------------------------------------------------------------ density, neighbours

def test_density_of_zero_gradient_samples_is_nan_and_they_count_for_nobody(data):
    model, x, xb, bf, bb = data
    sim = sim_of(model)
    S = _nan_sim(bf)  # zero rows and columns for sample 4: it adds nothing to the others
    Sab = _nan_sim(bf, bb)
    off = S - torch.diag(S.diagonal())
    cases = [
        (dict(), S.sum(1)),
        (dict(algorithm="tiles"), S.sum(1)),
        (dict(include_self=False), off.sum(1)),
        (dict(include_self=False, algorithm="tiles"), off.sum(1)),
        (dict(reference=xb), Sab.sum(1)),
        (dict(reference=xb, algorithm="tiles"), Sab.sum(1)),
        (dict(method="hard", threshold=0.2), (S > 0.2).sum(1).double()),
        (dict(method="hard", threshold=0.2, reference=xb), (Sab > 0.2).sum(1).double()),
        (dict(method="less_soft", power=2, include_self=False), (off.clamp_min(0) ** 2).sum(1)),
    ]
    for kw, expected in cases:
        expected = expected.clone()
        expected[4] = float("nan")
        with pytest.warns(RankDeficiencyWarning) as rec:
            got = sim.density(x, **kw)
        assert "their density values are NaN" in str(rec[0].message)
        close(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # unnormalised: no rank guard, nothing to report
        got = sim.density(x, normalized=False, include_self=False)
    trK = bf.K.diagonal(dim1=-2, dim2=-1).sum(-1) / 3
    close(got, trK.sum(1) - trK.diagonal())  # unnormalised: a zero gradient is a defined zero


def test_neighbors_of_zero_gradient_queries_are_missing_and_zero_gradient_data_never_chosen(data):
    model, x, xb, bf, bb = data
    sim = sim_of(model)
    for k, exclude in [(3, False), (7, True)]:
        with pytest.warns(RankDeficiencyWarning) as rec:
            vals, idx = sim.neighbors(x, k=k, exclude_self=exclude)
        assert "their neighbors values are NaN" in str(rec[0].message)
        S = _nan_sim(bf)
        S[4, :] = -9.0
        S[:, 4] = -9.0
        if exclude:
            S.fill_diagonal_(-9.0)
        for q in range(8):
            order = sorted(range(8), key=lambda j: (-float(S[q, j]), j))
            keep = [j for j in order if S[q, j] > -9][:k]
            if q == 4:
                assert idx[q].tolist() == [-1] * k and vals[q].isnan().all()
                continue
            assert idx[q, : len(keep)].tolist() == keep
            close(vals[q, : len(keep)], S[q, keep])
            assert idx[q, len(keep):].tolist() == [-1] * (k - len(keep))
            assert vals[q, len(keep):].isnan().all()
    with pytest.warns(RankDeficiencyWarning):
        vals, idx = sim.neighbors(x, xb, k=5)
    # 4 of the 5 data have a direction: the 5th neighbour is missing for every query; sample 3 is never chosen.
    assert (idx[:, -1] == -1).all() and (idx[4] == -1).all() and (idx[:, :4] >= 0).sum() == 28
    assert (idx == 3).sum() == 0


# ------------------------------------------------------------------------------------------ the sweep itself

def test_sweep_follows_a_partial_plan(data):
    model, x, xb, bf, _ = data
    sim = sim_of(model)
    src = as_source(x[:7].clone(), "xa")
    sim.similarity(x[:1])  # measures d
    ch = sim._chunker
    S = _nan_sim(bf)
    S[4, :] = float("nan")
    S[:, 4] = float("nan")
    plans = [(True, [(1, 1, 3), (2, 2, 3)]), (True, [(2, 2, 3)]), (True, [(1, 2, 3)]), (True, [(0, 1, 2), (1, 2, 3)]),
             (False, [(0, 1, 2), (1, 0, 1)]), (False, [(1, 0, 3), (2, 1, 2)]), (True, [])]
    for (symmetric, segments), cache in [(p, 2**30) for p in plans] + [(p, 0) for p in plans]:
        ch.cache_bytes = cache  # columns kept in memory, or recomputed for every row chunk
        report = RankReport("similarity")
        seen = []
        for ca, cb, tiles in sweep(ch, src, src, Request(Quantity.SIMILARITY, Form.TRACE), report,
                                   symmetric=symmetric, plan=lambda na, nb, sym, s=segments: s, progress=False):
            seen.append((ca.start, cb.start))
            close(tiles[ALL], S[ca.rows, cb.rows])
            assert torch.equal(tiles[ALL].isnan(), S[ca.rows, cb.rows].isnan())
        assert seen == [(3 * i, 3 * j) for i, j0, j1 in segments for j in range(j0, j1)]
    # a plan of (rows, columns, symmetric) -> segments receives the chunk counts
    got = []
    list(sweep(ch, src, as_source(xb, "xb"), Request(Quantity.KERNEL, Form.TRACE), RankReport("k"), symmetric=False,
               plan=lambda na, nb, sym: got.append((na, nb, sym)) or [], progress=False))
    assert got == [(3, 2, False)]


def test_rank_report_notes_merges_and_emits():
    r = RankReport("kernel", nullity=1, stacklevel=2)
    r.note("xa", ALL, 10, torch.tensor([0, 2, 1, 2, 0]), 2)
    r.note("xa", "layer1", 3, torch.tensor([1, 2]), 2)
    assert r.notes() == ({("xa", ""): [10, 14]}, {("xa", ""): [12], ("xa", "layer1"): [3]})
    other = RankReport("kernel")
    other.note("xa", ALL, 0, torch.tensor([0, 1]), 3)
    r.merge([r.notes(), other.notes()])
    assert r.zero == {("xa", ""): [0, 10, 14]}
    assert r.deficient == {("xa", ""): [1, 12], ("xa", "layer1"): [3]}
    shown = []
    r.emit(lambda msg, cls, stacklevel: shown.append((msg, cls, stacklevel)))
    assert shown == [
        ("3 sample(s) of xa have a zero gradient (no direction): their kernel values are NaN. Samples: [0, 10, 14]",
         RankDeficiencyWarning, 2),
        ("2 sample(s) of xa have a rank-deficient K(x, x): normalised on its range (self-similarity rank/d < 1). "
         "Samples: [1, 12]", RankDeficiencyWarning, 2),
        ("1 sample(s) of xa have a rank-deficient K(x, x) in layer 'layer1': normalised on its range "
         "(self-similarity rank/d < 1). Samples: [3]", RankDeficiencyWarning, 2),
    ]
    many = RankReport("x", effect="ignored")
    many.note("q", "L", 0, torch.zeros(25, dtype=torch.long), 3)
    many.emit(lambda msg, cls, stacklevel: shown.append(msg))
    assert shown[-1] == (f"25 sample(s) of q have a zero gradient in layer 'L' (no direction): ignored. "
                         f"Samples: {list(range(20))}")
    assert RankReport("y").stacklevel == 4 and RankReport("y").nullity == 0


def test_rank_report_add_counts_full_rank_as_d_minus_the_nullity():
    class C:
        start, rank, K = 5, {ALL: torch.tensor([3, 2, 0])}, {ALL: torch.zeros(3, 3, 3)}

    r = RankReport("s")
    r.add("xa", C)
    assert r.notes() == ({("xa", ""): [7]}, {("xa", ""): [6]})
    r = RankReport("s", nullity=1)
    r.add("xa", C)
    assert r.notes() == ({("xa", ""): [7]}, {})


# ------------------------------------------------------------------------------------------ chunks

def _factor_bytes(sim, x):
    fs, _ = sim.corrected_factors((x,))
    return sum(t.numel() * t.element_size() for f in fs for t in vars(f).values() if isinstance(t, torch.Tensor))


def test_measured_chunk_size_is_the_bounded_budget(data, monkeypatch):
    model, x, _, _, _ = data
    per = _factor_bytes(nnsim.Similarity(model, progress=False), x[:2]) // 2
    cases = [  # (chunk bytes, tile bytes, form, expected samples per chunk)
        (per * 20, 2**28, Form.RAW, 20), (per * 20 + per - 1, 2**28, Form.RAW, 20), (1, 2**28, Form.RAW, 8),
        (2**40, 2**28, Form.RAW, 256),
        # the tile cap: a full d x d result counts d^2 = 9 float32 entries per pair, a trace result one
        (2**40, 4 * 9 * 100, Form.FULL, 10), (2**40, 4 * 9 * 100 - 1, Form.FULL, 9),
        (2**40, 4 * 9 * 100, Form.TRACE, 30), (2**40, 4 * 30 * 30 - 1, Form.TRACE, 29),
    ]
    src = as_source(x, "x")
    for chunk_bytes, tile_bytes, form, expected in cases:
        monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(chunks_mod, "TILE_BYTES", tile_bytes)
        sim = nnsim.Similarity(model, progress=False)
        sim.similarity(x[:1])  # d measured
        got = sim._chunker.chunk_size_for(src, "x", Request(Quantity.SIMILARITY, form))
        assert got == expected, (chunk_bytes, tile_bytes, form)
        if form is Form.RAW:
            assert sim.chunk_size_for(x) == expected
    assert nnsim.Similarity(model, chunk_size=5, progress=False).chunk_size_for(x) == 5


def test_cached_chunks_fit_the_budget_judged_from_the_first(data):
    model, x, _, _, _ = data
    sim = sim_of(model)
    ch = sim._chunker
    src = as_source(x[:7].clone(), "x")  # chunks of 3, 3, 1 samples
    req = Request(Quantity.KERNEL, Form.RAW)
    per = _factor_bytes(sim, x[:3]) // 3  # KERNEL factors: as the rules made them
    first_times_n = 3 * per * 3  # the first chunk's bytes times the number of chunks
    for budget, kept in [(7 * per, False), (math.ceil(first_times_n / 1.1), True), (first_times_n // 1.1 - 1, False)]:
        ch.cache_bytes = budget
        got = ch.cached(src, "x", req, 3)
        assert (got is not None) == kept, budget
        if kept:
            assert [c.start for c in got] == [0, 3, 6] and [c.size for c in got] == [3, 3, 1]
            assert [c.rows for c in got] == [slice(0, 3), slice(3, 6), slice(6, 7)]
            assert sum(c.nbytes() for c in got) == 7 * per
    ch.cache_bytes = 10 * per  # the rows [3, 7): two chunks, 3 + 1 samples
    got = ch.cached(src, "x", req, 3, 3, 7)
    assert [c.start for c in got] == [3, 6]
    ch.cache_bytes = 4 * per - 1  # judged from the first: 2 chunks of 3 = 6 per > 1.1 budget
    assert ch.cached(src, "x", req, 3, 3, 7) is None
    for budget in (10 * per, 0):
        ch.cache_bytes = budget
        read = ch.reader(src, "x", req, 3, 3)
        assert [c.start for c in read()] == [3, 6] and [c.start for c in read()] == [3, 6]  # re-iterable
    assert list(ch.chunks(src, "x", req, 3, 7)) == [] and list(ch.chunks(src, "x", req, 3, 9, 4)) == []


def test_forward_is_the_analysed_output_of_every_sample(data, monkeypatch):
    model, x, _, bf, _ = data
    for chunk in (3, None):
        sim = sim_of(model) if chunk else nnsim.Similarity(model, alive, progress=False)
        monkeypatch.setattr(chunks_mod, "FORWARD_CHUNK", 2)
        close(sim._chunker.forward(as_source(x, "x")), bf.y)


def test_chunk_errors_name_the_samples_and_the_fix(data):
    model, x, _, _, _ = data
    sim = sim_of(model)
    with pytest.raises(InputError, match=r"xa: input 0 has dtype torch.float32 but the model's parameters are "
                                         r"torch.float64; convert the inputs \(e.g. x.to\(torch.float64\)\)"):
        sim.similarity(x.float())

    xs = x.clone()
    xs[4, 0] = 10.0  # second chunk: the message names the sample's index in the data, not in its chunk
    with pytest.raises(ModelError, match=r"xa: the output gradients are not finite \(overflow or NaN\) at samples "
                                         r"\[4\]; rescale the output or check the model in float64"):
        nnsim.Similarity(model, overflowing, chunk_size=3, progress=False).similarity(xs)

    def shrinking(out, inputs):  # two outputs where x_1 > 100
        return out[:, :2] if bool((inputs[0][:, 1] > 100).any()) else out

    xs = x[:7].clone()
    xs[6, 1] = 1000.0  # the third chunk
    with pytest.raises(InputError, match="the output dimension changed from 3 to 2 between chunks"):
        nnsim.Similarity(model, shrinking, chunk_size=3, progress=False).similarity(xs)


def test_a_metric_tensor_is_checked_and_mixed_into_the_factors(data):
    model, x, xb, bf, bb = data
    M = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.25]], dtype=F64)
    L, V = torch.linalg.eigh(M)
    half = V @ torch.diag(L.sqrt()) @ V.T
    sim = sim_of(model, metric=M)
    close(sim.kernel(x, xb), half @ torch.einsum("icp,jep->ijce", bf.G, bb.G) @ half)
    with pytest.raises(InputError, match="metric"):
        sim_of(model, metric=torch.eye(2, dtype=F64)).kernel(x)


def test_failures_before_the_first_chunk_name_the_inputs_or_the_backend(data):
    model, x, _, _, _ = data
    with pytest.raises(InputError, match=r"xa: the model failed on inputs of shape \[3, 5\] \(torch.float64\)"):
        sim_of(model).similarity(torch.randn(8, 5, dtype=F64))
    sim = sim_of(model)

    def broken(batch, start):
        raise RuntimeError("boom\nsecond line")

    sim._chunker.factor_fn = broken
    with pytest.raises(ModelError, match=r"^the 'auto' backend failed on this model, whose forward pass runs on these "
                                         r"inputs: RuntimeError: boom; try backend='loop' \(per-sample autograd\) or "
                                         r"backend='functorch'$"):
        sim.similarity(x)

    def refuses(batch, start):
        raise InputError("as raised")

    sim._chunker.factor_fn = refuses
    with pytest.raises(InputError, match="^as raised$"):
        sim.similarity(x)
    sim = sim_of(model)
    sim.similarity(x[:2])  # d measured: later failures are the model's, raised as they are
    sim._chunker.factor_fn = broken
    with pytest.raises(RuntimeError, match="^boom"):
        sim.similarity(x)


def test_integer_inputs_and_keyword_inputs_reach_the_model():
    torch.manual_seed(5)
    emb = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).double()
    ids = torch.randint(0, 7, (5, 2))
    sim = nnsim.Similarity(emb, chunk_size=2, progress=False)
    G = jacobian(emb, (ids,))
    close(sim.kernel(ids), torch.einsum("icp,jep->ijce", G, G))

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, scale):
            return self.lin(x) * scale

    kw = Keyword().double()
    x, s = torch.randn(5, 3, dtype=F64), torch.rand(5, 1, dtype=F64) + 0.5
    G = torch.stack([jacobian(kw.lin, (x[i : i + 1],))[0] * s[i] for i in range(5)])
    sim = nnsim.Similarity(kw, progress=False)  # chunk size measured on a probe called with the keywords
    close(sim.kernel({"x": x, "scale": s}), torch.einsum("icp,jep->ijce", G, G))


def test_measured_bytes_per_sample_are_kept_per_sample_shape(monkeypatch):
    class Tokens(nn.Module):  # an Embedding over T tokens: its factors (indices, signals) grow with T
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(1000, 4), nn.Linear(4, 1)

        def forward(self, x):
            return self.head(self.emb(x).mean(1))

    torch.manual_seed(6)
    model = Tokens().double()
    small, big = torch.randint(0, 1000, (4, 2)), torch.randint(0, 1000, (4, 6))
    req = Request(Quantity.SIMILARITY, Form.RAW)
    fresh = {}
    for name, x in [("small", small), ("big", big)]:
        sim = nnsim.Similarity(model, progress=False)
        sim.similarity(x[:1])
        per = _factor_bytes(sim, x[:2]) // 2
        monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", per * 30)
        fresh[name] = sim._chunker.chunk_size_for(as_source(x, "x"), "x", req)
        assert fresh[name] == 30
    # One Chunker measuring both shapes (CHUNK_BYTES as for the big samples): each shape keeps its own bytes.
    sim = nnsim.Similarity(model, progress=False)
    sim.similarity(small[:1])
    ch = sim._chunker
    small_size = ch.chunk_size_for(as_source(small, "x"), "x", req)
    assert ch.chunk_size_for(as_source(big, "x"), "x", req) == 30
    assert small_size > 30 and ch.chunk_size_for(as_source(small, "x"), "x", req) == small_size


def test_fisher_metric_kernel_against_the_written_out_metric():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(5, 3, dtype=F64)
    G = jacobian(model, (x,))
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    half = []
    for i in range(5):
        Fm = torch.diag(p[i]) - torch.outer(p[i], p[i])
        L, V = torch.linalg.eigh(Fm)
        half.append(V @ torch.diag(L.clamp_min(0).sqrt()) @ V.T)
    Gm = torch.stack(half) @ G
    sim = nnsim.Similarity(model, metric="fisher", chunk_size=2, progress=False)
    close(sim.kernel(x), torch.einsum("icp,jep->ijce", Gm, Gm), 1e-8)


def test_progress_bars_only_for_more_than_one_tile(data, capsys):
    model, x, _, _, _ = data
    nnsim.Similarity(model, chunk_size=3, progress=True).similarity(x[:7])  # 3 x 3 chunks: 6 tiles of a triangle
    assert "nnsim similarity" in capsys.readouterr().err
    nnsim.Similarity(model, chunk_size=3, progress=True).similarity(x[:3])  # one tile
    assert "nnsim" not in capsys.readouterr().err
    nnsim.Similarity(model, chunk_size=3, progress=False).similarity(x[:7])
    assert "nnsim" not in capsys.readouterr().err


def _bars(err, desc):
    """The states of the progress bar named ``desc`` in captured stderr."""
    return [seg for seg in err.replace("\r", "\n").split("\n") if seg.startswith(desc + ":")]


def test_progress_bars_of_neighbours_and_tiled_counts(data, capsys):
    model, x, _, _, _ = data
    xs = x[:7].clone()
    xs[4, 0] = 1.0  # every gradient nonzero: no warning
    for progress in (True, False):
        sim = nnsim.Similarity(model, chunk_size=3, progress=progress)
        sim.neighbors(xs, k=2)
        assert bool(_bars(capsys.readouterr().err, "nnsim similarity")) == progress
        sim.density(xs, algorithm="tiles")
        assert bool(_bars(capsys.readouterr().err, "nnsim similarity")) == progress


def test_rank_warnings_point_at_the_callers_line(data):
    model, x, _, _, _ = data
    sim = sim_of(model)
    for call in (lambda: sim.similarity(x), lambda: sim.density(x), lambda: sim.density(x, algorithm="tiles"),
                 lambda: sim.neighbors(x, k=2)):
        with pytest.warns(RankDeficiencyWarning) as rec:
            call()
        # Under mutmut every library function gains a trampoline frame, which moves the stacklevel's target.
        if "MUTANT_UNDER_TEST" not in os.environ:
            assert [r.filename for r in rec] == [__file__]


def test_forward_names_the_argument_and_the_samples_of_bad_inputs_and_outputs(data):
    model, x, _, _, _ = data
    ch = sim_of(model)._chunker
    bad = x.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(InputError, match=r"^data: input 0 contains NaN or Inf at samples \[4\]"):
        ch.forward(as_source(bad, "data"))
    with pytest.raises(InputError, match="^data: input 0 has dtype torch.float32"):
        ch.forward(as_source(x.float(), "data"))

    def overflowing(out, inputs):
        return out + torch.where(inputs[0][:, :1] > 5, float("inf"), 0.0)

    xs = x.clone()
    xs[4, 0] = 10.0
    with pytest.raises(ModelError, match=r"the model output contains NaN or Inf at samples \[4\]"):
        nnsim.Similarity(model, overflowing, chunk_size=3, progress=False)._chunker.forward(as_source(xs, "data"))


def test_fisher_metric_counts_and_neighbours_report_no_rank_deficiency():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(7, 3, dtype=F64)
    sim = nnsim.Similarity(model, metric="fisher", chunk_size=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank d - 1 is full rank with the Fisher metric
        S = sim.similarity(x)
        close(sim.density(x), S.sum(1))
        close(sim.density(x, algorithm="tiles"), S.sum(1))
        vals, idx = sim.neighbors(x, k=2)
    assert vals.dtype == F64  # kept in the model's dtype
    assert torch.equal(idx[:, 0], torch.arange(7))


def test_side_names_in_the_warnings_of_counts_and_neighbours(data):
    model, x, xb, _, _ = data
    sim = sim_of(model)
    for call, side in [(lambda: sim.neighbors(x, k=2), "queries"), (lambda: sim.neighbors(xb, x, k=2), "queries"),
                       (lambda: sim.neighbors(xb, x, k=2), "data"),
                       (lambda: sim.density(x, algorithm="tiles"), "data"), (lambda: sim.density(x), "data"),
                       (lambda: sim.density(xb, x, algorithm="tiles"), "reference")]:
        with pytest.warns(RankDeficiencyWarning) as rec:
            call()
        assert any(str(r.message).startswith(f"1 sample(s) of {side} have") for r in rec), [str(r.message) for r in rec]


class _FirstChunkOnly(Ranks):
    """One process that owns only the tiles of the first row chunk and the first chunk of samples."""

    def tiles(self, n_a, n_b, symmetric):
        return [s for s in super().tiles(n_a, n_b, symmetric) if s[0] == 0]

    def samples(self, n, size):
        return 0, min(n, size)

    def topk(self, values, indices, k):  # the lists of several processes would be merged to k here
        self.merged_k = k
        return super().topk(values, indices, k)

    def merge(self, report):  # and the processes' rank reports united here
        self.merged_report = report
        return super().merge(report)


def test_estimators_sweep_only_their_share_of_the_work(data):
    from nnsim.estimators import density, neighbors

    model, x, _, bf, _ = data
    sim = sim_of(model)
    sim.similarity(x[:1])
    src = as_source(x[:6].clone(), "data")  # chunks [0, 3), [3, 6)
    S = _nan_sim(bf)[:6, :6]
    mine = _FirstChunkOnly(None, torch.device("cpu"))
    vals, idx = neighbors.top_k(sim._chunker, src, src, 2, same=True, exclude_self=False, ranks=mine)
    assert mine.merged_k == 2 and isinstance(mine.merged_report, RankReport)
    # Row chunk 0's tiles (0, 0) and (0, 1) also update the rows of chunk 1 (the symmetric sweep's transpose).
    top = S.topk(2, dim=1)
    assert torch.equal(idx[:3], top.indices[:3])
    cols = S[3:, :3].topk(2, dim=1)  # chunk 1's rows only see the columns of chunk 0 (row 4: no gradient)
    assert torch.equal(idx[[3, 5]], cols.indices[[0, 2]]) and idx[4].tolist() == [-1, -1]
    got = density.by_tiles(sim._chunker, src, src, same=True, method="soft", threshold=None, power=None,
                           include_self=True, normalized=True, ranks=mine)
    close(got, torch.cat([S[:3].sum(1), S[3:, :3].sum(1)]))
    assert isinstance(mine.merged_report, RankReport)
    mine.merged_report = None
    got = density.soft_linear(sim._chunker, src, src, normalized=True, include_self=True, ranks=mine)
    close(got, S[:3, :3].sum(1))  # the sums of the first chunk, scored on the first chunk
    assert isinstance(mine.merged_report, RankReport)


def test_counts_are_returned_in_the_model_dtype():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # float32 (tiles are summed in float64)
    x = torch.randn(6, 3)
    sim = nnsim.Similarity(model, chunk_size=4, progress=False)
    for kw in (dict(), dict(algorithm="tiles"), dict(method="hard", threshold=0.5)):
        assert sim.density(x, **kw).dtype == torch.float32


def test_linear_density_names_its_arguments_and_shows_its_passes(data, capsys):
    model, x, xb, _, _ = data
    with pytest.raises(InputError, match="^data: input 0 has dtype"):  # measured chunk size: probed on data
        nnsim.Similarity(model, alive, progress=False).density(x.float())
    bad_ref = xb.clone()
    bad_ref[2, 0] = float("inf")
    with pytest.raises(InputError, match=r"^reference: input 0 contains NaN or Inf at samples \[2\]"):
        sim_of(model).density(x, bad_ref)
    bad = x.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(InputError, match=r"^data: input 0 contains NaN or Inf at samples \[4\]"):
        sim_of(model).density(bad, xb)
    xs = x[:7].clone()
    xs[4, 0] = 1.0
    nnsim.Similarity(model, alive, chunk_size=3, progress=True).density(xs)
    err = capsys.readouterr().err
    for desc in ("nnsim density: sum", "nnsim density: score"):
        assert any("3/3" in b and "chunk/s" in b for b in _bars(err, desc)), err
    nnsim.Similarity(model, alive, chunk_size=3, progress=False).density(xs)
    assert "nnsim" not in capsys.readouterr().err


class _SecondChunkOnly(Ranks):
    def samples(self, n, size):
        return size, min(n, 2 * size)


def test_linear_density_of_a_later_share_counts_its_chunks(data, capsys):
    from nnsim.estimators import density

    model, x, _, bf, _ = data
    sim = sim_of(model)
    xs = x[:7].clone()
    xs[4, 0] = 1.0
    sim.similarity(xs[:1])
    src = as_source(xs, "data")
    got = density.soft_linear(sim._chunker, src, src, normalized=True, include_self=True,
                              ranks=_SecondChunkOnly(None, torch.device("cpu"), progress=True))
    S = Brute(model, xs, alive).sim()
    close(got, S[3:6, 3:6].sum(1))
    err = capsys.readouterr().err
    for desc in ("nnsim density: sum", "nnsim density: score"):
        assert any("1/1" in b for b in _bars(err, desc)), err


# ------------------------------------------------------------------------------------------ second pass (issue 15)
# Written against the survivors of the complete run of the engine group; the oracles are written out here (brute
# force, torch.linalg) or are counts of what the engine computes (chunks prepared, samples read, chunk sizes).


def _counting(ch):
    """Count the chunks ``ch`` prepares (a wrapper on the instance: every path goes through ``prepare``)."""
    calls = []
    inner = ch.prepare

    def prepare(batch, start, name, request, *rest):
        calls.append((start, batch[0].shape[0]))
        return inner(batch, start, name, request, *rest)

    ch.prepare = prepare
    return calls


def test_each_form_keeps_the_representation_the_cost_model_prefers_for_it():
    from nnsim._model import analysis_mode
    from nnsim.factors import Dense, compact

    torch.manual_seed(7)  # the second layer is cheaper as an explicit gradient for full tiles, not for traces
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(4, 2, dtype=F64)
    ch = nnsim.Similarity(model, chunk_size=4, progress=False)._chunker
    with analysis_mode(ch.model, ch.params):
        computed = compact(ch.factor_fn((x,), 0)[0])  # the factors as the rules made them
    as_made = [type(f) for f in computed]
    expected = {Form.RAW: as_made}
    for form in (Form.FULL, Form.TRACE):
        expected[form] = [Dense if f.prefers_dense(form.value) else type(f) for f in computed]
    assert expected[Form.RAW] != expected[Form.FULL] != expected[Form.TRACE]  # the three choices differ here
    for quantity in (Quantity.KERNEL, Quantity.SIMILARITY):
        for form in Form:
            c = next(ch.chunks(as_source(x, "x"), "x", Request(quantity, form)))
            assert [type(f) for f in c.groups[ALL]] == expected[form], (quantity, form)


def test_rank_guard_arguments_reach_the_normalisation_and_the_influence(data):
    model, x, xb, bf, bb = data
    Kaa = bf.K.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # [N, d, d]
    lam = torch.linalg.eigvalsh(Kaa)
    ratios = sorted(float(r) for i, r in enumerate(lam[:, 0] / lam[:, -1]) if i != 4)
    rtol = math.sqrt(ratios[3] * ratios[4])  # between two samples' ratios: some are rank 3, some not
    low = [i for i in range(8) if i != 4 and int((lam[i] > rtol * lam[i, -1]).sum()) < 3]
    assert 0 < len(low) < 7
    sim = sim_of(model, rtol=rtol)
    deficient = (f"{len(low)} sample(s) of xa have a rank-deficient K(x, x): normalised on its range "
                 f"(self-similarity rank/d < 1). Samples: {low}")
    for call in (lambda: sim.similarity(x), lambda: sim.influence(x, xb)):
        with pytest.warns(RankDeficiencyWarning) as rec:
            call()
        assert deficient in [str(r.message) for r in rec]
    with pytest.warns(RankDeficiencyWarning):
        inf = sim.influence(x, xb)
    Kab = torch.einsum("icp,jep->ijce", bf.G, bb.G)
    expected = Kab.transpose(-1, -2) @ torch.linalg.pinv(Kaa, rtol=rtol, hermitian=True)[:, None]
    expected[4] = float("nan")
    close(inf, expected, 1e-8)
    # singular="ridge": (K + 1e-6 I)^-1, every sample full rank (the zero gradient too: its rows are zeros)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inf = sim_of(model, singular="ridge").influence(x, xb)
    close(inf, Kab.transpose(-1, -2) @ torch.linalg.inv(Kaa + 1e-6 * torch.eye(3, dtype=F64))[:, None], 1e-8)
    with pytest.raises(ValueError, match=r"rank-deficient for batch entries \[1\]"):  # sample 4: 2nd of its chunk
        sim_of(model, singular="raise").influence(x)


def test_non_finite_gradients_name_at_most_20_samples_and_the_probe_names_its_own(data):
    model, x, _, _, _ = data

    xs = torch.randn(25, 4, dtype=F64)
    xs[:, 0] = 10.0
    with pytest.raises(ModelError, match=re.escape(f"at samples {list(range(20))}; rescale")):
        nnsim.Similarity(model, overflowing, chunk_size=25, progress=False).similarity(xs)
    xs = x.clone()
    xs[0, 0] = 10.0  # in the probe that measures the chunk size (samples 0 and 1)
    with pytest.raises(ModelError, match=r"^xa: the output gradients are not finite \(overflow or NaN\) at samples "
                                         r"\[0\];"):
        nnsim.Similarity(model, overflowing, progress=False).similarity(xs)


class _Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x, scale):
        return self.lin(x) * scale


def test_keyword_inputs_are_passed_by_name_whatever_their_order():
    torch.manual_seed(5)
    kw = _Keyword().double()
    x, s = torch.randn(5, 3, dtype=F64), torch.rand(5, 1, dtype=F64) + 0.5
    G = torch.stack([jacobian(kw.lin, (x[i : i + 1],))[0] * s[i] for i in range(5)])
    inputs = {"scale": s, "x": x}  # not the order of forward(x, scale)
    for chunk in (None, 2):  # the probe of a measured chunk size, and the chunks themselves
        K = nnsim.Similarity(kw, chunk_size=chunk, progress=False).kernel(inputs)
        close(K, torch.einsum("icp,jep->ijce", G, G))
    with torch.no_grad():
        y = kw(x, s)
    # forward on a fresh Chunker (the linearized denoising's predictions): it used to call model(*batch) (a bug)
    close(nnsim.Similarity(kw, chunk_size=2, progress=False)._chunker.forward(as_source(inputs, "data")), y)
    rep = nnsim.Similarity(kw, progress=False).denoising(inputs, method="linearized", targets=y + 0.1)
    assert rep.fit_error is not None


def test_measured_chunk_size_floors_the_bytes_per_sample(data, monkeypatch):
    model, x, _, _, _ = data
    src, req = as_source(x, "x"), Request(Quantity.SIMILARITY, Form.RAW)
    monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", 200)
    for probe_bytes, expected in [(0, 200), (21, 20)]:
        # probe of 2 samples: 0 bytes -> at least 1 byte per sample (no division by zero); 21 -> 10 whole bytes
        monkeypatch.setattr(chunks_mod.Chunk, "nbytes", lambda self, b=probe_bytes: b)
        plan_cache.SIZES.clear()  # measured, not the sizing a Similarity before kept for the model
        ch = sim_of(model)._chunker
        ch.chunk_size = None
        assert ch.chunk_size_for(src, "x", req) == expected, probe_bytes


def test_chunks_of_a_measured_size_name_their_argument(data):
    model, x, _, _, _ = data
    ch = nnsim.Similarity(model, alive, progress=False)._chunker
    with pytest.raises(InputError, match="^data: input 0 has dtype"):
        list(ch.chunks(as_source(x.float(), "data"), "data", Request(Quantity.KERNEL, Form.FULL)))


class _Counted(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x, self.reads = x, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i]


def test_an_empty_range_of_chunks_reads_no_sample(data):
    model, x, _, _, _ = data
    ch = sim_of(model)._chunker
    ds = _Counted(x)
    src = as_source(torch.utils.data.DataLoader(ds, batch_size=3), "x")
    req = Request(Quantity.KERNEL, Form.RAW)
    assert [c.start for c in ch.chunks(src, "x", req, 3, 3, 6)] == [3]
    ds.reads = 0
    assert list(ch.chunks(src, "x", req, 3, 6, 6)) == [] and ds.reads == 0


def test_cached_chunks_budget_is_inclusive_and_counts_every_chunk(data, monkeypatch):
    model, x, _, _, _ = data
    sim = sim_of(model)
    ch = sim._chunker
    req = Request(Quantity.KERNEL, Form.RAW)
    per = _factor_bytes(sim, x[:3]) // 3
    six, four, seven = (as_source(x[:n].clone(), "x") for n in (6, 4, 7))
    for src, budget, kept in [
        (six, 6 * per, True),  # exactly the bytes of the two chunks of 3
        (six, 6 * per - 1, False),  # the sum of both chunks is over (each chunk alone fits)
        (four, 4 * per, False),  # chunks of 3 + 1: judged from the first, 2 x 3 > 1.1 x 4
    ]:
        ch.cache_bytes = budget
        assert (ch.cached(src, "x", req, 3) is not None) == kept, (len(src), budget)
    ch.cache_bytes = 3 * per  # the first chunk only: one chunk of the range [0, 3), not of the whole source
    assert [c.start for c in ch.cached(seven, "x", req, 3, 0, 3)] == [0]
    ch.cache_bytes = 2**30
    assert [c.size for c in ch.cached(seven, "x", req, 2)] == [2, 2, 2, 1]  # the size asked, not chunk_size
    # The first chunk's bytes times the chunks exactly equal to 1.1 x the budget: kept (33 bytes per sample).
    monkeypatch.setattr(chunks_mod.Chunk, "nbytes", lambda self: 33 * self.size)
    assert 3 * 99 == 1.1 * 270
    ch.cache_bytes = 270
    assert [c.start for c in ch.cached(seven, "x", req, 3)] == [0, 3, 6]


def test_reader_recomputes_only_without_a_cache_and_keeps_its_range(data):
    model, x, _, _, _ = data
    ch = sim_of(model)._chunker  # chunk_size 3
    req = Request(Quantity.KERNEL, Form.RAW)
    src = as_source(x[:7].clone(), "x")
    calls = _counting(ch)
    ch.cache_bytes = 2**30
    read = ch.reader(src, "x", req, 3)  # from sample 0 by default
    assert [c.start for c in read()] == [0, 3, 6] and [c.start for c in read()] == [0, 3, 6]
    assert len(calls) == 3  # prepared once, read twice from memory
    ch.cache_bytes = 0  # recomputed at each read: the size and the range asked, the argument named
    assert [c.size for c in ch.reader(src, "x", req, 2)()] == [2, 2, 2, 1]
    assert [c.start for c in ch.reader(src, "x", req, 3, 0, 6)()] == [0, 3]
    calls.clear()
    read = ch.reader(src, "x", req, 3)
    assert [c.start for c in read()] == [0, 3, 6] and [c.start for c in read()] == [0, 3, 6]
    assert len(calls) == 1 + 6  # the cache's first try, then every chunk at every read
    bad = x[:7].clone()
    bad[4, 1] = float("nan")
    read = ch.reader(as_source(bad, "x"), "data", req, 3)  # the cache gives up after the first chunk
    with pytest.raises(InputError, match=r"^data: input 0 contains NaN or Inf at samples \[4\]"):
        list(read())


def _tile_bar(err, desc):
    bars = _bars(err, desc)
    return bars[-1] if bars else None


def test_sweep_progress_bar_counts_the_tiles_of_the_plan(data, capsys):
    model, x, _, _, _ = data
    ch = sim_of(model)._chunker
    req = Request(Quantity.SIMILARITY, Form.TRACE)
    rows, cols = as_source(x[:3].clone(), "xa"), as_source(x.clone(), "xb")  # 1 row chunk, 3 column chunks
    tiles = list(sweep(ch, rows, cols, req, RankReport("similarity"), symmetric=False,
                       plan=lambda na, nb, sym: [(0, 1, 3)]))  # progress shown by default
    assert [(ca.start, cb.start) for ca, cb, _ in tiles] == [(0, 3), (0, 6)]
    bar = _tile_bar(capsys.readouterr().err, "nnsim similarity")
    assert bar is not None and re.search(r"\| 2/2 \[.*([\d?]tile/s|s/tile)\]$", bar), bar
    list(sweep(ch, rows, cols, req, RankReport("similarity"), symmetric=False, plan=lambda na, nb, sym: [(0, 1, 2)]))
    assert _tile_bar(capsys.readouterr().err, "nnsim similarity") is None  # one tile: no bar


def test_sweep_names_each_argument_in_its_errors(data):
    model, x, xb, _, _ = data
    req = Request(Quantity.SIMILARITY, Form.TRACE)
    good, bad = as_source(x.clone(), "q"), x.clone()
    bad[4, 1] = float("nan")  # the second chunk
    names = ("queries", "data")

    def run(ch, a, b, **kw):
        list(sweep(ch, a, b, req, RankReport("s"), names, symmetric=False, progress=False, **kw))

    measured = nnsim.Similarity(model, alive, progress=False)._chunker  # the size probed on the first argument
    with pytest.raises(InputError, match="^queries: input 0 has dtype"):
        run(measured, as_source(x.float(), "q"), good)
    for budget in (2**30, 0):  # the columns cached, or recomputed for every row chunk
        ch = sim_of(model)._chunker
        ch.cache_bytes = budget
        with pytest.raises(InputError, match=r"^data: input 0 contains NaN or Inf at samples \[4\]"):
            run(ch, good, as_source(bad, "d"))
        with pytest.raises(InputError, match=r"^queries: input 0 contains NaN or Inf at samples \[4\]"):
            run(ch, as_source(bad, "q"), good)


def test_sweep_prepares_each_chunk_once_when_the_columns_fit(data):
    model, x, xb, _, _ = data
    req = Request(Quantity.KERNEL, Form.TRACE)
    a, b = as_source(x[:6].clone(), "xa"), as_source(x.clone(), "xb")  # 2 row chunks, 3 column chunks
    ch = sim_of(model)._chunker
    calls = _counting(ch)

    def run(src_a, src_b, symmetric, plan=None):
        calls.clear()
        seen = [(ca.start, cb.start) for ca, cb, _ in sweep(ch, src_a, src_b, req, RankReport("k"), symmetric=symmetric,
                                                             plan=plan, progress=False)]
        return seen, sorted(calls)

    seen, prepared = run(a, b, False)
    assert seen == [(i, j) for i in (0, 3) for j in (0, 3, 6)]
    assert prepared == sorted([(0, 3), (3, 3), (0, 3), (3, 3), (6, 2)])  # 2 row chunks + 3 cached columns
    seen, prepared = run(b, b, True)  # the default symmetric plan: the upper triangle, rows read from the cache
    assert seen == [(0, 0), (0, 3), (0, 6), (3, 3), (3, 6), (6, 6)]
    assert prepared == [(0, 3), (3, 3), (6, 2)]
    seen, prepared = run(a, b, False, lambda na, nb, sym: [(0, 0, 1), (1, 0, 1)])  # only column chunk 0 cached
    assert seen == [(0, 0), (3, 0)] and prepared == [(0, 3), (0, 3), (3, 3)]
    with pytest.raises(ValueError):  # two segments of one row chunk: refused, not silently cut short
        run(a, b, False, lambda na, nb, sym: [(0, 0, 1), (0, 1, 2)])


def test_sweep_columns_are_chunks_of_the_rows_size(monkeypatch):
    class Tokens(nn.Module):  # factor bytes grow with the number of tokens
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(50, 4), nn.Linear(4, 2)

        def forward(self, t):
            return self.head(self.emb(t).mean(1))

    torch.manual_seed(8)
    model = Tokens().double()
    short, long = torch.randint(0, 50, (30, 2)), torch.randint(0, 50, (10, 8))
    ch = nnsim.Similarity(model, progress=False)._chunker
    req = Request(Quantity.KERNEL, Form.TRACE)
    monkeypatch.setattr(chunks_mod, "MIN_CHUNK", 1)
    monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", ch.prepare((long[:2],), 0, "xb", req).nbytes())  # 2 long ones
    size = ch.chunk_size_for(as_source(short, "xa"), "xa", req)
    assert ch.chunk_size_for(as_source(long, "xb"), "xb", req) == 2 < size < 30
    ch.cache_bytes = 0  # columns recomputed
    seen = [(ca.start, cb.start, cb.size) for ca, cb, _ in sweep(ch, as_source(short, "xa"), as_source(long, "xb"),
                                                                 req, RankReport("k"), symmetric=False, progress=False)]
    cols = [(s, min(size, 10 - s)) for s in range(0, 10, size)]
    assert seen == [(r, s, n) for r in range(0, 30, size) for s, n in cols]


def test_refused_results_give_the_sizes_in_gib_and_the_fixes(data):
    model, _, _, _, _ = data
    x = torch.randn(3000, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    sim = sim_of(model, max_result_bytes=2**29)
    sim._chunker.cache_bytes = 0  # refused at the first tile: nothing else prepared
    with pytest.raises(ResultTooLargeError) as e:
        sim.kernel(x)
    need = 3000 * 3000 * 9 * 8
    assert str(e.value) == (f"the result would take {need / 2**30:.2f} GiB (N=3000, M=3000, d=3, 1 group(s)) > "
                            "max_result_bytes = 0.50 GiB; use reduce='trace' for an [N, M] summary, split the "
                            "inputs, or raise max_result_bytes")
    assert f"{need / 2**30:.2f}" == "0.60"


def test_dense_results_are_on_the_models_device_whatever_the_default(data):
    model, x, xb, bf, bb = data
    sim = sim_of(model)
    sim.kernel(x[:2])  # the backend's plan is made on the first call (it reads a weight's values)
    with torch.device("meta"):  # a default device other than the model's: results stay with the model
        K = sim.kernel(x, xb)
    assert K.device == torch.device("cpu")
    close(K, torch.einsum("icp,jep->ijce", bf.G, bb.G))


def test_the_fisher_metric_of_two_classes_against_the_written_out_metric():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=F64)
    G = jacobian(model, (x,))
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)
    # two classes: F = p0 p1 [[1, -1], [-1, 1]], of rank 1; its square root is F / sqrt(tr F)
    F = torch.stack([torch.outer(torch.tensor([1.0, -1.0], dtype=F64), torch.tensor([1.0, -1.0], dtype=F64))
                     * p[i, 0] * p[i, 1] for i in range(5)])
    Gm = F / F.diagonal(dim1=-2, dim2=-1).sum(-1).sqrt()[:, None, None] @ G
    sim = nnsim.Similarity(model, metric="fisher", chunk_size=2, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rank 1 = d - 1: full rank for the Fisher metric
        close(sim.kernel(x), torch.einsum("icp,jep->ijce", Gm, Gm), 1e-8)
        close(sim.similarity(x).diagonal(), torch.ones(5, dtype=F64))
    with pytest.raises(InputError, match="^metric='fisher' needs logits with at least 2 classes as the output$"):
        nnsim.Similarity(nn.Linear(3, 1).double(), metric="fisher", progress=False).similarity(x)


def test_a_metric_tensor_of_another_dtype_is_cast_to_the_models(data):
    model, x, xb, bf, bb = data
    M = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 0.25]])  # float32, exact values
    L, V = torch.linalg.eigh(M.double())
    half = V @ torch.diag(L.sqrt()) @ V.T
    K = sim_of(model, metric=M).kernel(x, xb)
    assert K.dtype == F64
    close(K, half @ torch.einsum("icp,jep->ijce", bf.G, bb.G) @ half)


def test_non_finite_outputs_of_a_later_chunk_name_the_sample(data):
    model, x, _, _, _ = data

    def inf_out(out, inputs):
        return out + torch.where(inputs[0][:, :1] > 5, float("inf"), 0.0)

    xs = x.clone()
    xs[4, 0] = 10.0  # the second chunk: its index in the data, not in its chunk
    with pytest.raises(ModelError, match=r"^the model output contains NaN or Inf at samples \[4\]$"):
        nnsim.Similarity(model, inf_out, chunk_size=3, progress=False).similarity(xs)


def test_first_failures_say_what_failed_in_full(data):
    model, x, _, _, _ = data
    with pytest.raises(InputError, match=r"^xa: the model failed on inputs of shape \[3, 5\] \(torch.float64\): "
                                         r"RuntimeError: mat1 and mat2 shapes cannot be multiplied"):
        sim_of(model).similarity(torch.randn(8, 5, dtype=F64))
    with pytest.raises(InputError, match=r"the inputs are integers but the model's parameters are torch.float64: "
                                         r"convert them, e.g. x.to\(torch.float64\)"):
        sim_of(model).similarity(torch.randint(0, 5, (8, 4)))
    sim = sim_of(model)

    def broken(batch, start):
        raise RuntimeError("y" * 400)

    sim._chunker.factor_fn = broken
    with pytest.raises(ModelError, match=f"inputs: RuntimeError: {'y' * 300}; try backend="):
        sim.similarity(x)


# ------------------------------------------------------------------------- chunk sizing kept per model

class _MeanEmbedding(nn.Module):
    """Token sequences of any length: the embedding's factor bytes per sample grow with the length."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(50, 6), nn.Linear(6, 3)

    def forward(self, t):
        return self.head(torch.tanh(self.emb(t)).mean(1))


class _FirstOutput:  # output specs that are objects, not functions: the plan cache cannot key them
    def __call__(self, y, inputs):
        return y[:, :1]


class _AllOutputs:
    def __call__(self, y, inputs):
        return y


def _fresh_size(model, x, **kw):
    plan_cache.SIZES.clear()
    return nnsim.Similarity(model, progress=False, **kw).chunk_size_for(x)


def _restarting_size(sim, x):
    """The chunk size a caller that starts over on ``Resized`` gets (the sweep, self-sized chunks)."""
    return sim._chunker.chunk_size_for(as_source(x, "x"), "x", Request(Quantity.SIMILARITY, Form.RAW), restarts=True)


def test_a_new_similarity_on_a_known_model_runs_no_probe_and_keeps_its_chunk_size(monkeypatch):
    monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", 20_000)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x = torch.randn(20, 4, dtype=F64)
    size = _fresh_size(model, x)
    sim = nnsim.Similarity(model, progress=False)
    calls = _counting(sim._chunker)
    assert _restarting_size(sim, x) == size and calls == []  # sized from the first Similarity's measure
    # a caller that fixes its size (the public hook) has the kept sizing checked on the probe, once
    assert sim.chunk_size_for(x) == size and calls == [(0, chunks_mod.PROBE_SAMPLES)]
    assert sim.chunk_size_for(x) == size and _restarting_size(sim, x) == size and len(calls) == 1
    metric = torch.eye(3, dtype=F64)  # a metric tensor is keyed by its shape: a new one of that shape shares it
    first = nnsim.Similarity(model, metric=metric, progress=False)
    assert first.chunk_size_for(x) == size
    sim = nnsim.Similarity(model, metric=metric.clone(), progress=False)
    calls = _counting(sim._chunker)
    assert _restarting_size(sim, x) == size and calls == []


def test_the_kept_chunk_sizing_is_per_sample_shape_and_per_output_spec(monkeypatch):
    monkeypatch.setattr(chunks_mod, "CHUNK_BYTES", 20_000)
    torch.manual_seed(5)
    emb = _MeanEmbedding().double()
    short, long = torch.randint(0, 50, (20, 4)), torch.randint(0, 50, (20, 40))
    sizes = _fresh_size(emb, short), _fresh_size(emb, long)
    assert sizes[0] > sizes[1]  # the premise: the lengths need different chunk sizes
    plan_cache.SIZES.clear()
    assert [nnsim.Similarity(emb, progress=False).chunk_size_for(t) for t in (short, long)] == list(sizes)
    # Output objects: no plan key, so nothing is kept across Similarity objects (each measures its own).
    model = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 9)).double()
    x = torch.randn(20, 4, dtype=F64)
    one, every = _fresh_size(model, x, output=_FirstOutput()), _fresh_size(model, x, output=_AllOutputs())
    assert one != every  # the premise
    plan_cache.SIZES.clear()
    assert nnsim.Similarity(model, _FirstOutput(), progress=False).chunk_size_for(x) == one
    sim = nnsim.Similarity(model, _AllOutputs(), progress=False)
    calls = _counting(sim._chunker)
    assert sim.chunk_size_for(x) == every and len(calls) == 1


def test_a_full_result_of_a_new_similarity_is_tile_capped_by_the_kept_output_dimension(monkeypatch):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(20, 4, dtype=F64)
    monkeypatch.setattr(chunks_mod, "TILE_BYTES", 4 * 9 * 100)  # d = 3: 9 float32 entries per pair: 10 samples
    plan_cache.SIZES.clear()
    src, full = as_source(x, "x"), Request(Quantity.SIMILARITY, Form.FULL)
    assert nnsim.Similarity(model, progress=False)._chunker.chunk_size_for(src, "x", full) == 10
    ch = nnsim.Similarity(model, progress=False)._chunker  # d not measured by this Chunker: the kept d
    assert ch.d is None and ch.chunk_size_for(src, "x", full, restarts=True) == 10 and ch.d is None
    assert ch.chunk_size_for(src, "x", full) == 10 and ch.d == 3  # measured by the probe that checks the sizing


def test_the_kept_sizings_of_a_model_drop_the_oldest_beyond_the_limit(monkeypatch):
    monkeypatch.setattr(chunks_mod, "_MAX_KEPT", 2)
    torch.manual_seed(8)
    emb = _MeanEmbedding().double()
    plan_cache.SIZES.clear()
    sim = nnsim.Similarity(emb, progress=False)
    for t in (3, 4):
        sim.chunk_size_for(torch.randint(0, 50, (10, t)))
    assert len(plan_cache.SIZES[emb]) == 2  # at the limit: both kept
    first = next(iter(plan_cache.SIZES[emb]))
    sim.chunk_size_for(torch.randint(0, 50, (10, 5)))
    assert len(plan_cache.SIZES[emb]) == 2 and first not in plan_cache.SIZES[emb]
