"""nnsim on torch.distributed: 2 and 3 CPU processes on gloo, spawned here, against the single-process results.

Each spawn runs a whole group of checks (process start-up dominates the time). The oracle is the same call
with ``group=False`` (this process alone) in the test process: the single-process path, itself tested
against brute-force per-sample autograd elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import nnsim
from nnsim import distributed as nd
from nnsim.index import FeatureIndex
from nnsim.index import features as fi

torch.set_num_threads(1)

N = 37  # 8 chunks of 5 (the last one of 2): no world size divides the data
CHUNK = 5
SHARD = 6  # 7 index shards for N = 37 (the last one of 1)
DIM = 16  # projected: the 8x8 layer has 72 parameters per output


def _mlp(seed: int = 0, d: int = 3, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, d)).to(dtype)


def _data(n: int = N, seed: int = 1, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    if n > 30:
        x[20], x[30] = x[3], x[3]  # exact duplicates: ties that the top-k must break by the lowest index
    return x.to(dtype)


def _masked(out: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Output of the samples whose first feature is not exactly 0 (the others have a zero gradient)."""
    return out * (inputs[0][:, :1] != 0).to(out.dtype)


def _sim(model: nn.Module | None = None, **kw) -> nnsim.Similarity:
    return nnsim.Similarity(_mlp() if model is None else model, progress=False, chunk_size=kw.pop("chunk_size", CHUNK),
                            **kw)


def _cases(group) -> dict:
    """Every distributed operation, called identically on each rank (group=None) and alone (group=False)."""
    out: dict = {}
    sim, x = _sim(), _data()
    out["soft"] = sim.density(x, group=group)
    out["soft_kernel_noself"] = sim.density(x, normalized=False, include_self=False, group=group)
    out["soft_tiles"] = sim.density(x, algorithm="tiles", group=group)
    out["hard"] = sim.density(x, method="hard", threshold=0.3, group=group)
    out["less_soft"] = sim.density(x, method="less_soft", power=2, include_self=False, group=group)
    ref = _data(23, seed=2)
    out["soft_ref"] = sim.density(x, ref, group=group)
    out["hard_ref"] = sim.density(x, ref, method="hard", threshold=0.1, group=group)
    out["nn_self"] = sim.neighbors(x, k=4, exclude_self=True, group=group)  # triangle of tiles
    out["nn_queries"] = sim.neighbors(x[:6], x, k=5, group=group)  # 2 x 8 tiles: the data are split
    out["nn_rows"] = sim.neighbors(x, x[:7], k=3, group=group)  # 8 x 2 tiles: the queries are split
    out["denoise"] = sim.denoising(x, noise_std=0.1, group=group).to_dict()
    out["denoise_pred"] = sim.denoising(x, predictions=torch.sin(x[:, :3]), group=group).to_dict()
    out["denoise_approx"] = sim.denoising(x, approximate=True, dim=DIM, group=group).to_dict()
    noisy = _mlp()(x).detach() + 0.01 * torch.cos(7 * x[:, :3])  # targets the network fits (fit error < 0.5)
    out["denoise_lin"] = sim.denoising(x, targets=noisy, method="linearized", group=group).to_dict()
    out["denoise_lin_nystroem"] = sim.denoising(x, targets=noisy, method="linearized", approximate=True, landmarks=11,
                                                group=group).to_dict()
    # More ranks than chunks or tiles: 4 samples in one chunk (one tile), and the automatic chunk size.
    tiny = x[:4]
    out["tiny_soft"] = sim.density(tiny, group=group)
    out["tiny_hard"] = sim.density(tiny, method="hard", threshold=0.0, group=group)
    out["tiny_nn"] = sim.neighbors(tiny, k=2, group=group)
    out["tiny_denoise"] = sim.denoising(tiny, group=group).to_dict()
    out["tiny_approx"] = sim.denoising(tiny, approximate=True, dim=DIM, group=group).to_dict()
    auto = _sim(chunk_size=None)
    out["auto_soft"] = auto.density(x, group=group)
    out["auto_nn"] = auto.neighbors(x[:5], x, k=3, group=group)
    # Datasets and loaders: each rank reads its rows through a Subset, or streams the loader.
    ds = TensorDataset(x, torch.arange(N))
    out["ds_soft"] = sim.density(ds, group=group)
    out["ds_hard"] = sim.density(ds, method="hard", threshold=0.2, group=group)
    out["loader_nn"] = sim.neighbors(x[:6], DataLoader(ds, batch_size=7), k=5, group=group)
    out["loader_soft"] = sim.density(DataLoader(ds, batch_size=4), group=group)
    # float32
    sim32, x32 = _sim(_mlp(dtype=torch.float32)), _data(dtype=torch.float32)
    out["soft32"] = sim32.density(x32, group=group)
    out["nn32"] = sim32.neighbors(x32, k=3, group=group)
    # Zero gradients: NaN results and one warning naming the same samples on every rank.
    xz = x.clone()
    xz[[2, 33], 0] = 0.0
    simz = _sim(output=_masked)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["zero_soft"] = simz.density(xz, group=group)
        out["zero_hard"] = simz.density(xz, method="hard", threshold=0.0, group=group)
        out["zero_nn"] = simz.neighbors(xz, k=3, group=group)
    out["zero_warnings"] = sorted(str(w.message) for w in caught)
    return out


def _index_case(group, path: Path) -> dict:
    sim, x = _sim(), _data()
    index = FeatureIndex.build(sim, x, path, dim=DIM, shard_size=SHARD, group=group)
    return {"search": index.search(x[:5], k=4, backend="torch"),
            "rerank": index.search(x[:5], k=4, candidates=12, data=x, backend="torch")}


def _worker(rank: int, world: int, init: str, out: str, resume: str | None, kill: str | None) -> None:
    """One spawn runs every check (process start-up dominates): resume a killed build (``resume``), run the
    checks, save the results, then build a store during which rank 1 dies (``kill``)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        result = {"computed": _build(resume, None) if resume else None}
        result.update(_checks(rank, world, str(Path(out) / "store")))
        torch.save(result, f"{out}/{rank}.pt")
        if kill:
            _build(kill, die_at=30)
    finally:
        dist.destroy_process_group()


def _checks(rank: int, world: int, path: str) -> dict:
    result = {"cases": _cases(None), "index": _index_case(None, Path(path)),
              "resolved": (nd.resolve(None).rank, nd.resolve(None).world), "main": nd.is_main_process(),
              "alone": nd.resolve(False)}
    x = _data()
    if world == 3:  # an explicit group: ranks 0 and 2 only (rank 1 is busy elsewhere)
        sub = dist.new_group([0, 2])
        if rank != 1:
            result["sub"] = {"soft": _sim().density(x, group=sub), "nn": _sim().neighbors(x, k=4, group=sub),
                             "index": _index_case(sub, Path(path + "-sub"))}
    other = _mlp(seed=10 + rank)  # trained or loaded on each rank differently: rank 0's weights win
    result["broadcast"] = [t.clone() for t in nd.broadcast_module(other).state_dict().values()]
    try:  # a rank with other data is caught before anything is computed, on every rank
        _sim().density(x + rank, group=None)
        result["disagree"] = None
    except nd.DistributedError as err:
        result["disagree"] = str(err)
    bad = x.clone()
    bad[30, 1] = float("nan")  # every rank has it; only the rank that reads row 30 (chunk 6) can see it
    try:
        _sim().neighbors(bad[:3], bad, k=2)  # 1 x 8 tiles: the data's chunks are split over the ranks
        result["failure"] = None
    except nnsim.InputError as err:
        result["failure"] = (type(err).__name__, str(err))
    return result


class _Dying(Dataset):
    """The data, except that rank 1 of a build dies (os._exit) when it starts computing the row ``die_at``
    (its second read: every rank first reads the centre's reference rows)."""

    def __init__(self, x: torch.Tensor, die_at: int | None) -> None:
        self.x, self.die_at, self.reads = x, die_at, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.die_at and dist.is_initialized() and dist.get_rank() == 1:
            self.reads += 1
            if self.reads == 2:
                os._exit(17)
        return self.x[i]


def _build(path: str, die_at: int | None) -> list[tuple[int, int]]:
    """Build the store at ``path`` (rank 1 dies on row ``die_at``); (start, rows) of every computed chunk."""
    with _counting_chunks() as computed:
        FeatureIndex.build(_sim(), _Dying(_data(), die_at), path, dim=DIM, shard_size=SHARD)
    return computed


@contextlib.contextmanager
def _counting_chunks() -> Iterator[list[tuple[int, int]]]:
    """Records (start, rows) of every feature chunk the index computes while the block runs."""
    computed: list[tuple[int, int]] = []
    real = fi.chunk_features

    def counting(sim, batch, start, *a, **kw):
        computed.append((start, batch[0].shape[0]))
        return real(sim, batch, start, *a, **kw)

    fi.chunk_features = counting
    try:
        yield computed
    finally:
        fi.chunk_features = real


def _spawn(root: Path, world: int, resume: Path | None = None, kill: Path | None = None
           ) -> tuple[Path, Exception | None]:
    out = root / f"world{world}"
    out.mkdir()
    error = None
    try:
        mp.spawn(_worker, args=(world, str(root / f"init{world}"), str(out), resume and str(resume),
                                kill and str(kill)), nprocs=world, join=True)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
        if kill is None:
            raise
        error = err
    return out, error


def _results(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"{r}.pt", weights_only=False) for r in range(world)]


def _compare(got, want, path: str = "") -> None:
    """Equal structure; tensors equal to float tolerance (float64 1e-10, float32 1e-5), NaN at the same places."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), path
        for k in want:
            _compare(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, (tuple, list)):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, f"{path}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, path
        if want.is_floating_point():
            tol = 1e-10 if want.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=path)
        else:
            assert torch.equal(got, want), path
    else:
        assert got == want, path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("single") / "store"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"cases": _cases(False), "index": _index_case(False, path), "store": path}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two spawns: 2 ranks (checks, then a build where rank 1 dies), then 3 ranks (resume it, checks)."""
    root = tmp_path_factory.mktemp("dist")
    killed = root / "killed"
    out2, error = _spawn(root, 2, kill=killed)
    assert error is not None  # rank 1 died (exit 17), or rank 0 saw its peer vanish
    manifest = json.loads((killed / "manifest.json").read_text())
    published = sorted(int(p.stem.split("-")[1]) for p in killed.glob("shard-*.json"))
    stats = {i: (killed / f"shard-{i:05d}.npy").stat() for i in published}
    out3, _ = _spawn(root, 3, resume=killed)
    return {2: (out2, _results(out2, 2)), 3: (out3, _results(out3, 3)), "killed": killed,
            "after_kill": (manifest, published, stats)}


def _stored(path: Path) -> np.ndarray:
    m = json.loads((path / "manifest.json").read_text())
    assert m["complete"] and [e["start"] for e in m["shards"]] == list(range(0, N, SHARD))
    return np.concatenate([np.load(path / e["file"]) for e in m["shards"]])


@pytest.mark.parametrize("world", [2, 3])
def test_same_results_as_one_process(reference, runs, world):
    out, results = runs[world]
    want = reference["cases"]
    # The oracle's warnings name the zero-gradient samples 2 and 33 (of data; rows or columns of the sweeps).
    assert any("[2, 33]" in w for w in want["zero_warnings"])
    assert torch.isnan(want["zero_soft"][[2, 33]]).all() and torch.isnan(want["zero_hard"][[2, 33]]).all()
    for r, res in enumerate(results):
        _compare(res["cases"], want, f"rank {r}")
        # Exact where no sum is reordered: tiles are computed from the same chunks in every layout.
        for key in ("hard", "hard_ref", "tiny_hard", "ds_hard", "zero_hard"):
            assert torch.equal(res["cases"][key].isnan(), want[key].isnan())
            assert torch.equal(torch.nan_to_num(res["cases"][key]), torch.nan_to_num(want[key])), key
        for key in ("nn_self", "nn_queries", "nn_rows", "tiny_nn", "auto_nn", "loader_nn", "nn32", "zero_nn"):
            assert torch.equal(res["cases"][key][1], want[key][1]), key
        _compare(res["index"]["search"], reference["index"]["search"])
        _compare(res["index"]["rerank"], reference["index"]["rerank"])
        assert all(torch.equal(a, b) for a, b in zip(res["broadcast"], _mlp(seed=10).state_dict().values()))
        assert res["resolved"] == (r, world) and res["main"] == (r == 0) and res["alone"] is None
        assert res["disagree"] is not None and "disagree on the density call" in res["disagree"]
        name, message = res["failure"]
        owner = [q for q in range(world) if nd.split(8, q, world)[0] <= 6 < nd.split(8, q, world)[1]]
        assert "samples [30]" in message and name == ("InputError" if [r] == owner else "DistributedError")
    if world == 3:
        nn4 = _sim().neighbors(_data(), k=4, group=False)
        for r in (0, 2):
            _compare(results[r]["sub"], {"soft": want["soft"], "nn": nn4, "index": reference["index"]})
        np.testing.assert_array_equal(_stored(out / "store-sub"), _stored(reference["store"]))
    # Ties: the duplicates 3, 20, 30 are each other's best neighbours, lowest index first.
    assert want["nn_self"][1][3, :2].tolist() == [20, 30] and want["nn_self"][1][30, :2].tolist() == [3, 20]
    # One store, byte for byte the single-process one, with no leftover published entries.
    np.testing.assert_array_equal(_stored(out / "store"), _stored(reference["store"]))
    # The data digest (per shard, combined in order) does not depend on the number of processes.
    digests = [json.loads((p / "manifest.json").read_text())["data"] for p in (out / "store", reference["store"])]
    assert digests[0] == digests[1] and len(digests[0]["sha256"]) == 64
    assert [p.name for p in (out / "store").iterdir() if not p.name.endswith(".npy")] == ["manifest.json"]


def test_killed_rank_resumes_without_recomputing(reference, runs):
    # 7 shards of 6 rows on two ranks: rank 0 computes shards 0-3, rank 1 shards 4-6 and dies on row 30
    # (shard 5) after finishing shard 4; rank 0 is torn down wherever it was.
    manifest, published, before = runs["after_kill"]
    assert manifest["complete"] is False
    assert 4 in published and 5 not in published and 6 not in published
    # The restart used 3 ranks (torchrun --max-restarts restarts the whole group the same way).
    computed = sorted(c for res in runs[3][1] for c in res["computed"])
    rows = [r for start, n in computed for r in range(start, start + n)]
    missing = [i for i in range(7) if i not in published]
    assert rows == [r for i in missing for r in range(i * SHARD, min(N, (i + 1) * SHARD))]  # once each, only these
    store = runs["killed"]
    for i, st in before.items():  # finished shards untouched
        now = (store / f"shard-{i:05d}.npy").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    np.testing.assert_array_equal(_stored(store), _stored(reference["store"]))
    assert [p.name for p in store.iterdir() if not p.name.endswith(".npy")] == ["manifest.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        FeatureIndex.open(store, _sim())  # verifies every checksum


def test_partitions():
    for n in range(0, 30):
        for world in (1, 2, 3, 7):
            spans = [nd.split(n, r, world) for r in range(world)]
            assert spans[0][0] == 0 and spans[-1][1] == n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
            assert max(b - a for a, b in spans) - min(b - a for a, b in spans) <= 1
            for symmetric in (True, False):
                for n_b in ((n,) if symmetric else (1, 5, 12)):
                    tiles = [(i, j) for r in range(world)
                             for i, j0, j1 in nd.tile_segments(n, n_b, symmetric, r, world) for j in range(j0, j1)]
                    want = [(i, j) for i in range(n) for j in range(i if symmetric else 0, n_b)]
                    assert sorted(tiles) == want  # every tile once
                    if symmetric and n:
                        counts = [sum(j1 - j0 for _, j0, j1 in nd.tile_segments(n, n, True, r, world))
                                  for r in range(world)]
                        assert max(counts) - min(counts) <= 1  # balanced in tiles, not in rows


def test_topk_merge_breaks_ties_by_lowest_index():
    v = torch.tensor([[1.0, 2.0, 2.0, -float("inf"), 2.0, 0.5]])
    i = torch.tensor([[7, 9, 4, -1, 6, 1]])
    values, idx = nd.topk_lowest_index(v, i, 4)
    assert idx.tolist() == [[4, 6, 9, 7]] and values.tolist() == [[2.0, 2.0, 2.0, 1.0]]


def test_single_process_helpers():
    assert not dist.is_initialized()
    assert nd.resolve(None) is None and nd.resolve(False) is None
    assert nd.is_main_process() and nd.rank() == 0 and nd.world_size() == 1
    calls = []
    assert nd.main_only(lambda v: calls.append(v) or v)(3) == 3 and calls == [3]
    with pytest.raises(nnsim.InputError, match="not initialised"):
        nd.resolve(object())


def test_setup_from_env_single_rank(monkeypatch, tmp_path):
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(key, value)
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(s.getsockname()[1]))
    try:
        assert nd.setup_from_env("gloo") is None  # a world of one process: the single-process path
        assert dist.is_initialized() and nd.world_size() == 1 and nd.is_main_process()
        x = _data()
        torch.testing.assert_close(_sim().density(x), _sim().density(x, group=False), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_single_process_build_adopts_published_shards(tmp_path):
    """A store left by a crashed multi-process build (entries published next to the shards, not yet in the
    manifest) is completed by a single process without recomputing those shards; a bad entry is ignored."""
    x, store = _data(), tmp_path / "store"
    FeatureIndex.build(_sim(), x, store, dim=DIM, shard_size=SHARD)
    want = _stored(store)
    manifest = json.loads((store / "manifest.json").read_text())
    entries, manifest["shards"], manifest["complete"] = manifest["shards"], manifest["shards"][:2], False
    for e in entries[2:5]:  # shards 2-4 published by their ranks; 5 and 6 never finished
        (store / e["file"].replace(".npy", ".json")).write_text(json.dumps(e))
    (store / "shard-00005.json").write_text("{truncated")
    for e in entries[5:]:
        (store / e["file"]).unlink()
    (store / "manifest.json").write_text(json.dumps(manifest))
    with _counting_chunks() as computed:
        FeatureIndex.build(_sim(), x, store, dim=DIM, shard_size=SHARD)
    assert sum(n for _, n in computed) == N - 5 * SHARD and min(s for s, _ in computed) == 5 * SHARD
    np.testing.assert_array_equal(_stored(store), want)
    assert sorted(p.name for p in store.glob("*.json")) == ["manifest.json"]
