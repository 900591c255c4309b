"""nnsim.estimators.reducers against written-out oracles (mutation testing, docs/testing.md).

The oracles are plain Python loops: a neighbour count entry by entry, and a top-k by sorting (value desc, index
asc) with NaN scores left out; for the sweeps on a model, sums of the brute-force similarity of
tests/test_estimators_asymmetric.py written out.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import nnsim
from nnsim.distributed import Ranks
from nnsim.estimators import TopK, density, row_statistic
from nnsim.inputs import as_source

torch.set_num_threads(1)


def _count_oracle(tile: list[list[float]], method: str, threshold=None, power=None) -> list[list[float]]:
    out = []
    for row in tile:
        r = []
        for s in row:
            if math.isnan(s):
                r.append(0.0)
            elif method == "soft":
                r.append(s)
            elif method == "hard":
                r.append(1.0 if s > threshold else 0.0)
            else:
                r.append(max(s, 0.0) ** power)
        out.append(r)
    return out


TILE = [[0.5, -0.25, float("nan"), 0.75], [1.0, 0.5, -1.0, 0.0], [float("nan"), 0.25, 0.5, 2.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method,threshold,power", [
    ("soft", None, None), ("hard", 0.5, None), ("hard", -0.25, None), ("less_soft", None, 3.0),
    ("less_soft", None, 0.5)])
def test_row_statistic_is_the_entrywise_count(dtype, method, threshold, power):
    tile = torch.tensor(TILE, dtype=dtype)
    got = row_statistic(tile, method, threshold=threshold, power=power)
    assert got.dtype == dtype and got.shape == tile.shape
    want = torch.tensor(_count_oracle(TILE, method, threshold, power), dtype=dtype)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_row_statistic_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="unknown method 'cosine'"):
        row_statistic(torch.zeros(2, 2), "cosine")


def _topk_oracle(scores: list[list[float]], k: int) -> tuple[list[list[float]], list[list[int]]]:
    values, indices = [], []
    for row in scores:
        ranked = sorted(((-s, j) for j, s in enumerate(row) if not math.isnan(s)))[:k]
        v = [-a for a, _ in ranked] + [float("nan")] * (k - len(ranked))
        i = [j for _, j in ranked] + [-1] * (k - len(ranked))
        values.append(v)
        indices.append(i)
    return values, indices


def _feed(scores: torch.Tensor, k: int, row_blocks: list[int], col_blocks: list[int]) -> TopK:
    Q, M = scores.shape
    top = TopK(Q, k, scores.dtype, scores.device)
    r0 = 0
    for nr in row_blocks:
        c0 = 0
        for nc in col_blocks:
            top.update(slice(r0, r0 + nr), scores[r0:r0 + nr, c0:c0 + nc], c0)
            c0 += nc
        assert c0 == M
        r0 += nr
    assert r0 == Q
    return top


def _split(n: int, rng: random.Random) -> list[int]:
    parts = []
    while n:
        p = rng.randint(1, n)
        parts.append(p)
        n -= p
    return parts


@pytest.mark.parametrize("seed", range(12))
def test_topk_over_tiles_is_the_sorted_rows_with_lowest_index_ties(seed):
    rng = random.Random(seed)
    Q, M = rng.randint(1, 6), rng.randint(1, 9)
    k = rng.randint(1, M + 3)  # also more neighbours than columns: NaN / -1 padding
    # few distinct values: many ties, inside a tile and across tiles; NaN = excluded pair
    scores = [[rng.choice([-1.5, -0.5, 0.0, 0.5, 0.5, 1.0, float("nan")]) for _ in range(M)] for _ in range(Q)]
    t = torch.tensor(scores, dtype=torch.float64)
    top = _feed(t, k, _split(Q, rng), _split(M, rng))
    values, indices = top.result()
    want_v, want_i = _topk_oracle(scores, k)
    assert values.shape == (Q, k) and indices.shape == (Q, k) and indices.dtype == torch.long
    torch.testing.assert_close(values, torch.tensor(want_v, dtype=torch.float64), equal_nan=True)
    assert indices.tolist() == want_i


def test_topk_ties_within_one_wide_tile_and_rectangular_tiles():
    # one row block, columns fed as [3] then [5]: the second tile's columns start at 3; ties 0.5 at 1, 4, 6
    scores = [[0.1, 0.5, 0.2, 0.9, 0.5, 0.3, 0.5, 0.0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]]
    t = torch.tensor(scores, dtype=torch.float32)
    for k in (1, 2, 3, 4, 8):
        top = _feed(t, k, [2], [3, 5])
        values, indices = top.result()
        want_v, want_i = _topk_oracle(scores, k)
        assert indices.tolist() == want_i, k
        torch.testing.assert_close(values, torch.tensor(want_v, dtype=torch.float32))
        assert values.dtype == torch.float32


def test_topk_untouched_rows_report_no_neighbours():
    top = TopK(3, 2, torch.float64, torch.device("cpu"))
    top.update(slice(1, 2), torch.tensor([[0.5, 0.75]], dtype=torch.float64), 0)
    values, indices = top.result()
    assert indices.tolist() == [[-1, -1], [1, 0], [-1, -1]]
    assert values[1].tolist() == [0.75, 0.5]
    assert torch.isnan(values[0]).all() and torch.isnan(values[2]).all()
    assert top.k == 2


def test_topk_state_lives_on_the_requested_device():
    top = TopK(2, 3, torch.float32, torch.device("meta"))  # meta: any device that is not the CPU
    assert top.values.device.type == "meta" and top.indices.device.type == "meta"
    assert top.values.dtype == torch.float32 and top.indices.dtype == torch.long


def test_topk_ties_resolved_by_a_stable_sort_on_long_rows():
    # torch's unstable CPU sort reorders equal keys from ~64 entries on: the lowest-index rule needs the stable one
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (3, 100), generator=g).double() / 2
    top = _feed(scores, 70, [3], [40, 60])
    values, indices = top.result()
    want_v, want_i = _topk_oracle(scores.tolist(), 70)
    assert indices.tolist() == want_i
    torch.testing.assert_close(values, torch.tensor(want_v, dtype=torch.float64))


# ------------------------------------------------------- the density and neighbour sweeps on a model (nnsim.estimators)
# Oracle: the brute-force similarity of tests/test_estimators_asymmetric.py (per-sample autograd in float64, no
# nnsim inside) on its two-hidden-layer MLP (d = 3), chunks of 3.

def _gate(out, inputs):
    """The outputs, switched off entirely (a zero gradient) where x_0 == 0."""
    return out * (inputs[0][:, :1] != 0).to(out.dtype)


@pytest.fixture(scope="module")
def mlp_data():
    from test_estimators_asymmetric import Brute, mlp2

    model, x = mlp2(3)  # 11 samples: a share [3, 9) leaves a last chunk of 2 samples to the other processes
    xr = torch.randn(11, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bx, br = Brute(model, x), Brute(model, xr)
    with torch.no_grad():
        S = bx.sim(br)  # [11, 11]
        S_self = bx.sim()
    return model, x, xr, S, S_self


class _MiddleShare(Ranks):
    """One process that owns the samples [3, 9) (two chunks of 3) of every source; ``rows`` gathers them as the
    other processes would, into an [n] tensor with NaN where the others' rows would go."""

    def samples(self, n, size):
        return size, min(n, 3 * size)

    def rows(self, parts, start, n):
        local = torch.cat(parts)
        out = torch.full((n, *local.shape[1:]), float("nan"), dtype=local.dtype, device=local.device)
        out[start : start + local.shape[0]] = local
        return out


def test_linear_density_against_a_reference_scores_only_its_share_and_places_it(mlp_data):
    model, x, xr, S, _ = mlp_data
    sim = nnsim.Similarity(model, chunk_size=3, progress=False)
    sim.similarity(x[:1])
    got = density.soft_linear(sim._chunker, as_source(x, "data"), as_source(xr, "reference"), normalized=True,
                              include_self=True, ranks=_MiddleShare(None, torch.device("cpu")))
    want = [float("nan")] * 3 + [sum(float(S[i, j]) for j in range(3, 9)) for i in range(3, 9)] + [float("nan")] * 2
    assert got.shape == (11,) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10, equal_nan=True)


def test_counts_and_neighbours_keep_the_model_dtype_and_ignore_the_default_device(mlp_data):
    """float64 results to 1e-10 (not rounded through float32), and every tensor made on the data's device: with
    torch's default device set to ``meta`` around the call the answers are the same CPU tensors (on a GPU, a
    tensor made on the default device fails a torch.cat or an index across devices)."""
    model, x, xr, S, S_self = mlp_data
    x = x.clone()
    x[4, 0] = 0.0  # a zero gradient: NaN row, indexed by the tiled counts
    sim = nnsim.Similarity(model, _gate, chunk_size=3, progress=False)
    calls = {"linear": lambda: sim.density(x, algorithm="linear"),
             "linear, reference": lambda: sim.density(x, xr, algorithm="linear"),
             "tiles": lambda: sim.density(x, algorithm="tiles"),
             "tiles, reference": lambda: sim.density(x, xr, algorithm="tiles"),
             "neighbours": lambda: sim.neighbors(x, k=2), "neighbours, data": lambda: sim.neighbors(xr, x, k=10)}
    with pytest.warns(nnsim.RankDeficiencyWarning):
        on_cpu = {name: call() for name, call in calls.items()}
    S_self = S_self.clone()
    S_self[4, :] = S_self[:, 4] = float("nan")
    alive = [j for j in range(11) if j != 4]
    dens = [float("nan") if i == 4 else sum(float(S_self[i, j]) for j in alive) for i in range(11)]
    dens_ref = [float("nan") if i == 4 else sum(float(S[i, j]) for j in range(11)) for i in range(11)]
    for name, want in (("linear", dens), ("tiles", dens), ("linear, reference", dens_ref),
                       ("tiles, reference", dens_ref)):
        assert on_cpu[name].dtype == torch.float64, name
        torch.testing.assert_close(on_cpu[name], torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10,
                                   equal_nan=True)
    order = sorted((-float(S_self[0, j]), j) for j in alive)[:2]
    assert on_cpu["neighbours"][1][0].tolist() == [j for _, j in order]
    order = sorted((-float(S[j, 0]), j) for j in alive)  # sim(xr_0, x_j) = sim(x_j, xr_0): trace of a transpose
    assert on_cpu["neighbours, data"][1][0].tolist() == [j for _, j in order]
    for name, call in calls.items():
        with torch.device("meta"), pytest.warns(nnsim.RankDeficiencyWarning):
            got = call()
        for g, want in zip(got if isinstance(got, tuple) else (got,),
                           on_cpu[name] if isinstance(got, tuple) else (on_cpu[name],), strict=True):
            assert g.device.type == "cpu", name
            torch.testing.assert_close(g, want, rtol=0, atol=0, equal_nan=True)


def test_topk_makes_its_column_indices_on_the_tiles_device():
    scores = [[0.1, 0.5, 0.2, 0.9, 0.5], [0.5, 0.3, 0.5, 0.5, 0.0]]
    with torch.device("meta"):
        top = _feed(torch.tensor(scores, dtype=torch.float64, device="cpu"), 3, [1, 1], [2, 3])
        values, indices = top.result()
    want_v, want_i = _topk_oracle(scores, 3)
    assert indices.device.type == "cpu" and indices.tolist() == want_i
    torch.testing.assert_close(values, torch.tensor(want_v, dtype=torch.float64))
