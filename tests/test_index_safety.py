"""FeatureIndex refuses what it cannot answer right: changed data (full data digest), concurrent builds (a
lock naming the other build), stores of an older format; and the public Similarity hooks the index uses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn
from torch.utils.data import TensorDataset

import nnsim
from nnsim.index import FeatureIndex, StoreError
from nnsim.index.build import DataDigest
from nnsim.index.lock import LOCK, BuildLock, LockedError

torch.set_num_threads(1)
DIM = 32


def _mlp(seed: int = 0, d: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, d)).double()


def _data(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _sim(**kw) -> nnsim.Similarity:
    return nnsim.Similarity(_mlp(), progress=False, **kw)


# ---------------------------------------------------------------------------------------------- data digest
def test_changed_rows_with_the_same_first_row_are_refused(tmp_path):
    sim, x = _sim(), _data()
    path = tmp_path / "s"
    index = FeatureIndex.build(sim, x, path, dim=DIM, shard_size=16)
    changed = x.clone()
    changed[20] += 1e-9  # same length, same first sample, one row of the second shard differs
    q = _data(3, seed=7)
    with pytest.raises(nnsim.InputError, match=r"data differ .*rows \[16, 32\) \(16 samples in 1 shard"):
        index.search(q, k=5, data=changed)
    with pytest.raises(nnsim.InputError, match=r"rows \[16, 32\)"):
        FeatureIndex.open(path, sim, data=changed)
    with pytest.raises(nnsim.InputError, match=r"differ from those its finished shards .*rows \[16, 32\)"):
        FeatureIndex.build(sim, changed, path, dim=DIM, shard_size=16)  # not silently "resumed"
    as_dataset = TensorDataset(changed)  # any source: read, hashed, compared
    with pytest.raises(nnsim.InputError, match=r"rows \[16, 32\)"):
        index.search(q, k=5, data=as_dataset)
    # The same data pass, from any source and chunking; the result is the exact neighbours.
    v, i = FeatureIndex.open(path, sim, data=TensorDataset(x)).search(q, k=5, data=x)
    ev, ei = sim.neighbors(q, x, 5)
    assert torch.equal(i, ei)
    torch.testing.assert_close(v, ev)
    x[33, 2] = 5.0  # an in-place change after a successful check is seen too (tensor version counter)
    with pytest.raises(nnsim.InputError, match=r"rows \[32, 40\)"):
        index.search(q, k=5, data=x)


@settings(max_examples=25, deadline=None)
@given(hst.lists(hst.integers(1, 9), min_size=1, max_size=8), hst.integers(1, 12))
def test_data_digest_does_not_depend_on_chunking(cuts, size):
    x = torch.arange(float(sum(cuts) * 3)).reshape(-1, 3)
    labels = torch.arange(x.shape[0])
    whole, pieces, fixed = DataDigest(), DataDigest(), DataDigest()
    whole.update((x, labels))
    s = 0
    for c in cuts:
        pieces.update((x[s : s + c], labels[s : s + c]))
        s += c
    for a in range(0, x.shape[0], size):
        fixed.update((x[a : a + size], labels[a : a + size]))
    assert whole.hexdigest() == pieces.hexdigest() == fixed.hexdigest()
    other = DataDigest()
    y = x.clone()
    y[-1, -1] += 1
    other.update((y, labels))
    assert other.hexdigest() != whole.hexdigest()


def test_store_of_an_older_format_is_refused(tmp_path):
    sim, x = _sim(), _data()
    path = tmp_path / "s"
    FeatureIndex.build(sim, x, path, dim=DIM)
    m = json.loads((path / "manifest.json").read_text())
    m["version"] = 1
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="format version 1, written by an older nnsim.*rebuild"):
        FeatureIndex.open(path, sim)
    assert FeatureIndex.build(sim, x, path, dim=DIM, overwrite=True).manifest["version"] == 2


# ---------------------------------------------------------------------------------------------- the lock
_CHILD = textwrap.dedent("""
    import pathlib, sys, time
    import torch
    from torch import nn
    import nnsim

    folder, started, go = map(pathlib.Path, sys.argv[1:4])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    class Waiting(torch.utils.data.Dataset):  # holds the build (and its lock) until the parent says go
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            if i == 20:
                started.touch()
                t0 = time.time()
                while not go.exists() and time.time() - t0 < 120:
                    time.sleep(0.05)
            return x[i]

    nnsim.FeatureIndex.build(nnsim.Similarity(model, progress=False), Waiting(), folder, dim=32, shard_size=16)
""")


def test_a_second_build_is_refused_naming_the_first(tmp_path):
    folder, started, go = tmp_path / "s", tmp_path / "started", tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(started), str(go)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not started.exists():
            assert child.poll() is None, child.communicate()[1][-2000:]
            assert time.time() - t0 < 120, "the first build did not start"
            time.sleep(0.05)
        sim, x = _sim(), _data()
        with pytest.raises(LockedError, match=rf"another nnsim index build is writing to .*pid {child.pid} on host "
                                              rf"'{socket.gethostname()}', started .* s ago"):
            FeatureIndex.build(sim, x, folder, dim=DIM, shard_size=16)
        with pytest.raises(LockedError, match=f"pid {child.pid}"):
            FeatureIndex.build(sim, x, folder, dim=DIM, shard_size=16, overwrite=True)  # nor does it clear it
    finally:
        go.touch()
        _, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    assert not (folder / LOCK).exists()
    index = FeatureIndex.open(folder, sim, verify=True, data=x)  # checksums and data digests pass
    assert index.manifest["complete"] and len(index.manifest["shards"]) == 3
    v, i = index.search(x[:4], k=3, data=x)
    assert torch.equal(i, sim.neighbors(x[:4], x, 3)[1])


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "s"
    folder.mkdir()
    holder = {"pid": dead.pid, "host": socket.gethostname(), "started": time.time() - 60, "command": "killed"}
    (folder / LOCK).write_text(json.dumps(holder))
    sim, x = _sim(), _data()
    index = FeatureIndex.build(sim, x, folder, dim=DIM)
    assert index.manifest["complete"] and not (folder / LOCK).exists()
    with BuildLock(folder):  # a held lock refuses in this process too, and is released on exit
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            FeatureIndex.build(sim, x, folder, dim=DIM)
    assert FeatureIndex.build(sim, x, folder, dim=DIM).manifest["complete"]


# ---------------------------------------------------------------------------------------------- Similarity hooks
@pytest.mark.parametrize("metric", ["euclidean", "fisher"])
def test_public_hooks_of_similarity(metric):
    sim, x = _sim(metric=metric), _data(12)
    with pytest.raises(nnsim.InputError, match="d_eff is known after"):
        _ = sim.d_eff
    factors, rank = sim.corrected_factors((x,), 0, "x")
    assert sim.d_eff == (2 if metric == "fisher" else 3)
    assert torch.equal(rank, torch.full((12,), sim.d_eff))
    g = torch.cat([f.dense().g for f in factors], dim=-1)  # [B, d, P]: U(x)
    oracle = torch.einsum("acp,bcp->ab", g, g) / sim.d_eff  # tr(U_a U_b^T) / d_eff
    torch.testing.assert_close(oracle, sim.similarity(x), atol=1e-10, rtol=0)
    assert nnsim.Similarity(_mlp(), chunk_size=5).chunk_size_for(x) == 5
    assert 1 <= sim.chunk_size_for(TensorDataset(x)) <= 256


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_index_query_refuses_changed_data_even_without_reranking(tmp_path, capsys):
    from nnsim.cli.demo import CANVAS, digits_cnn
    from nnsim.cli.main import main

    torch.manual_seed(0)
    torch.save(digits_cnn().state_dict(), tmp_path / "w.pt")
    x = torch.rand(30, 1, CANVAS, CANVAS, generator=torch.Generator().manual_seed(0))
    np.savez(tmp_path / "data.npz", x=x.numpy())
    common = ["--model", "nnsim.cli.demo:digits_cnn", "--weights", str(tmp_path / "w.pt"), "--quiet"]
    idx = str(tmp_path / "idx")
    assert main(["index", "build", *common, "--data", str(tmp_path / "data.npz"), "--index", idx, "--dim", "64"]) == 0
    x[17] = 1.0 - x[17]  # the same first sample, the same length
    np.savez(tmp_path / "changed.npz", x=x.numpy())
    for extra in ([], ["--no-rerank"]):
        code = main(["index", "query", *common, "--data", str(tmp_path / "changed.npz"), "--index", idx, "--query",
                     "0", "-k", "3", "--out", str(tmp_path / "q.csv"), *extra])
        assert code != 0 and not (tmp_path / "q.csv").exists()
        assert "rows [0, 30) (30 samples in 1 shard(s)) changed" in capsys.readouterr().err


def test_a_freed_tensors_check_is_not_reused_by_new_data(tmp_path, monkeypatch):
    # CPython reuses ids and the allocator reuses addresses: new data can carry the (id, address, version, shape)
    # of checked data that were freed. Simulate that reuse: the new data must still be checked.
    import nnsim.index.feature_index as fi

    monkeypatch.setattr(fi, "_tensor_key", lambda src: ("same identity",) if src.kind == "tensors" else None)
    sim, x = _sim(), _data()
    index = FeatureIndex.build(sim, x, tmp_path / "s", dim=DIM, shard_size=16)
    q = _data(3, seed=7)
    index.search(q, k=5, data=x)  # checked, remembered
    changed = x.clone()
    changed[5] += 1.0
    index.search(q, k=5, data=x)  # still alive and unchanged: accepted
    del x
    with pytest.raises(nnsim.InputError, match=r"rows \[0, 16\)"):
        index.search(q, k=5, data=changed)
