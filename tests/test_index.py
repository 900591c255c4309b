"""nnsim.FeatureIndex: on-disk projected features, resumable builds, refusals, search and recall."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import nnsim
from nnsim.index import DEFAULT_DIM, FeatureIndex, StoreError, model_fingerprint, sketch
from nnsim.index import features as fi

torch.set_num_threads(1)

EXACT_DIM = 512  # d P = 3 x 155 = 465 <= 512: the rows are the kernel-corrected gradients themselves
PROJ_DIM = 32  # the 8x8 layer (72 parameters) and the 6->8 layer (56) are projected


def _mlp(seed: int = 0, d: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, d)).double()


def _data(n: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _sim(model: nn.Module | None = None, **kw) -> nnsim.Similarity:
    return nnsim.Similarity(_mlp() if model is None else model, progress=False, **kw)


def _stored(path) -> np.ndarray:
    m = json.loads((path / "manifest.json").read_text())
    return np.concatenate([np.load(path / e["file"]) for e in m["shards"]])


def _count_rows(monkeypatch) -> list[tuple[int, int]]:
    """Record (start, rows) of every chunk whose features are computed."""
    calls: list[tuple[int, int]] = []
    real = fi.chunk_features

    def counting(sim, batch, start, *args, **kw):
        calls.append((start, batch[0].shape[0]))
        return real(sim, batch, start, *args, **kw)

    monkeypatch.setattr(fi, "chunk_features", counting)
    return calls


def _flip_byte(path, offset: int = -5) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


class Flaky(Dataset):
    """A dataset that fails when reading sample ``fail_at`` while armed (an interrupted build), after letting
    ``passes`` reads of it through (the build reads its centre's reference rows first)."""

    def __init__(self, x: torch.Tensor, fail_at: int | None, passes: int = 1) -> None:
        self.x, self.fail_at, self.passes = x, fail_at, passes

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.fail_at is not None and i == self.fail_at:
            self.passes -= 1
        if self.fail_at is not None and i == self.fail_at and self.passes < 0:
            raise RuntimeError("interrupted")
        return self.x[i]


class Stream(IterableDataset):
    """A sized iterable dataset: no random access, so re-ranking streams it."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self):
        return iter(self.x)


# ---------------------------------------------------------------------------------------------- the store
def test_manifest_shards_and_checksums(tmp_path):
    sim, x = _sim(), _data()
    index = FeatureIndex.build(sim, x, tmp_path / "s", dim=PROJ_DIM, seed=3, shard_size=16, dtype="float32")
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format"] == "nnsim.FeatureIndex" and m["version"] == 2 and m["complete"] is True
    cfg = m["config"]
    assert cfg["model_fingerprint"] == model_fingerprint(sim)
    assert cfg["params"] == list(sim.params) and cfg["output"] == "nnsim.outputs.flatten"
    assert (cfg["metric"], cfg["seed"], cfg["dim"], cfg["dtype"], cfg["n"], cfg["shard_size"]) == (
        "euclidean", 3, PROJ_DIM, "float32", 40, 16)
    assert {k: m["layout"][k] for k in ("width", "d", "d_eff", "sketch", "exact", "centre_rows")} == {
        "width": PROJ_DIM + 1, "d": 3, "d_eff": 3, "sketch": PROJ_DIM, "exact": False, "centre_rows": 40}
    for e in m["shards"]:
        path = tmp_path / "s" / e["file"]
        assert e["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert np.load(path).shape == (e["stop"] - e["start"], m["layout"]["width"])
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "manifest.json", "shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]  # no temporary files left
    # The last column is <u(x), c>, c the mean of the reference rows (here all 40): the mean similarity.
    stored = _stored(tmp_path / "s")
    np.testing.assert_allclose(stored[:, -1], sim.similarity(x).mean(1).numpy(), rtol=1e-6, atol=1e-7)
    # The stored centre is the mean sketch row.
    np.testing.assert_allclose(m["layout"]["centre"], stored[:, :-1].mean(0), rtol=1e-5, atol=1e-6)
    # With d P <= dim the rows are the kernel-corrected gradients: their Gram is the exact similarity.
    exact = FeatureIndex.build(sim, x, tmp_path / "e", dim=EXACT_DIM, shard_size=16, dtype="float32")
    assert exact.manifest["layout"]["exact"] and exact.width == 3 * 155 + 1
    u = _stored(tmp_path / "e")[:, :-1].astype(np.float64)
    np.testing.assert_allclose(u @ u.T, sim.similarity(x).numpy(), rtol=0, atol=1e-6)
    assert len(index) == 40 and index.width == m["layout"]["width"]


def test_fingerprint_covers_parameters_and_buffers():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).double()
    sim = _sim(model)
    before = model_fingerprint(sim)
    assert model_fingerprint(_sim(model)) == before
    model[1].running_mean += 0.1  # eval-mode BatchNorm statistics shape the gradients too
    assert model_fingerprint(sim) != before
    with torch.no_grad():
        model[1].running_mean -= 0.1
        assert model_fingerprint(sim) == before
        model[0].weight[0, 0] += 1e-6
    assert model_fingerprint(sim) != before


def test_float16_store_halves_the_size(tmp_path):
    sim, x = _sim(), _data()
    full = FeatureIndex.build(sim, x, tmp_path / "f32", dim=EXACT_DIM, dtype="float32")
    half = FeatureIndex.build(sim, x, tmp_path / "f16", dim=EXACT_DIM)  # the default
    assert half.dtype == "float16"
    size = {p: sum(f.stat().st_size for f in (tmp_path / p).glob("shard-*.npy")) for p in ("f32", "f16")}
    assert size["f16"] < 0.55 * size["f32"]
    a, b = _stored(tmp_path / "f32"), _stored(tmp_path / "f16")
    assert b.dtype == np.float16
    np.testing.assert_allclose(b.astype(np.float32), a, atol=2e-3)
    q = x[:6]
    v32, _ = full.search(q, k=5)
    v16, _ = half.search(q, k=5)
    torch.testing.assert_close(v16, v32, atol=5e-3, rtol=0)
    ev, ei = sim.neighbors(q, x, 5)  # re-ranking makes the answer exact whatever the storage precision
    v, i = FeatureIndex.open(tmp_path / "f16", sim).search(q, k=5, data=x)
    assert torch.equal(i, ei)
    torch.testing.assert_close(v, ev)


# ---------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_resume_after_interruption_recomputes_nothing_finished(tmp_path, monkeypatch, kind):
    sim, x = _sim(chunk_size=4), _data()
    ds = Flaky(x, fail_at=21)
    data = ds if kind == "dataset" else DataLoader(ds, batch_size=5)
    path = tmp_path / "s"
    with pytest.raises(RuntimeError, match="interrupted"):
        FeatureIndex.build(sim, data, path, dim=PROJ_DIM, shard_size=8)
    m = json.loads((path / "manifest.json").read_text())
    assert m["complete"] is False
    assert [(e["start"], e["stop"]) for e in m["shards"]] == [(0, 8), (8, 16)]  # the shard [16, 24) was lost
    with pytest.raises(nnsim.InputError, match=r"incomplete \(2 of 5 shards finished\).*resume"):
        FeatureIndex.open(path, sim)
    stamps = {e["file"]: (path / e["file"]).stat().st_mtime_ns for e in m["shards"]}

    ds.fail_at = None
    calls = _count_rows(monkeypatch)
    index = FeatureIndex.build(sim, data, path, dim=PROJ_DIM, shard_size=8)
    assert sum(r for _, r in calls) == 40 - 16 and min(s for s, _ in calls) == 16  # finished shards not recomputed
    assert all((path / f).stat().st_mtime_ns == t for f, t in stamps.items())  # nor rewritten
    assert index.manifest["complete"] and len(index.manifest["shards"]) == 5
    assert not list(path.glob(".*.tmp"))  # the interrupted shard's temporary file was reused and published

    FeatureIndex.build(sim, x, tmp_path / "ref", dim=PROJ_DIM, shard_size=8)  # uninterrupted
    np.testing.assert_array_equal(_stored(path), _stored(tmp_path / "ref"))
    calls.clear()
    again = FeatureIndex.build(sim, data, path, dim=PROJ_DIM)  # complete: verified, nothing computed
    assert calls == [] and again.manifest["shards"] == index.manifest["shards"]


def test_corrupted_shard_is_refused_then_recomputed_alone(tmp_path, monkeypatch):
    sim, x = _sim(), _data()
    path = tmp_path / "s"
    FeatureIndex.build(sim, x, path, dim=PROJ_DIM, shard_size=16)
    reference = _stored(path)
    _flip_byte(path / "shard-00001.npy")
    with pytest.raises(nnsim.InputError, match="shard-00001.npy fails its checksum"):
        FeatureIndex.open(path, sim)
    FeatureIndex.open(path, sim, verify=False)  # shapes are still checked, contents not
    calls = _count_rows(monkeypatch)
    with pytest.warns(UserWarning, match="shard-00001.npy fails its checksum.*recomputing"):
        FeatureIndex.build(sim, x, path, dim=PROJ_DIM, shard_size=16)
    assert sum(r for _, r in calls) == 16 and {s for s, _ in calls} <= set(range(16, 32))
    FeatureIndex.open(path, sim)
    np.testing.assert_array_equal(_stored(path), reference)


def test_missing_or_truncated_shard_is_refused(tmp_path):
    sim, x = _sim(), _data()
    path = tmp_path / "s"
    FeatureIndex.build(sim, x, path, dim=PROJ_DIM, shard_size=16)
    shard = path / "shard-00002.npy"
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(nnsim.InputError, match="shard-00002.npy fails its checksum"):
        FeatureIndex.open(path, sim)
    with pytest.raises(nnsim.InputError, match=r"shard-00002.npy (holds|is not a readable)"):
        FeatureIndex.open(path, sim, verify=False)
    shard.unlink()
    with pytest.raises(nnsim.InputError, match="shard-00002.npy is missing"):
        FeatureIndex.open(path, sim)


# ---------------------------------------------------------------------------------------------- refusals
def _other_model_sim():
    model = _mlp()
    with torch.no_grad():
        model[0].bias[0] += 1e-3
    return _sim(model)


@pytest.mark.parametrize("change, expected", [
    ({"sim": _other_model_sim}, "model_fingerprint: stored"),
    ({"sim": lambda: _sim(params="4.*")}, "params: stored"),
    ({"sim": lambda: _sim(output=nnsim.outputs.logits(1))}, "output: stored"),
    ({"sim": lambda: _sim(metric="fisher")}, "metric: stored"),
    ({"seed": 1}, "seed: stored 0, now 1"),
    ({"dim": 16}, "dim: stored 32, now 16"),
    ({"dtype": "float16"}, "dtype: stored 'float32', now 'float16'"),
    ({"n": 39}, "n: stored 40, now 39"),
    ({"shard_size": 8}, "shard_size: stored 16, now 8"),
    ({"first": True}, "first_sample_sha256"),
])
def test_build_refuses_a_store_built_differently(tmp_path, change, expected):
    x = _data()
    path = tmp_path / "s"
    FeatureIndex.build(_sim(), x, path, dim=PROJ_DIM, shard_size=16, dtype="float32")
    sim = change["sim"]() if "sim" in change else _sim()
    data = x[: change.get("n", 40)].clone()
    if change.get("first"):
        data[0] += 1
    kw = {"dim": change.get("dim", PROJ_DIM), "seed": change.get("seed", 0), "dtype": change.get("dtype", "float32"),
          "shard_size": change.get("shard_size")}
    with pytest.raises(nnsim.InputError, match=expected) as err:
        FeatureIndex.build(sim, data, path, **kw)
    assert "overwrite=True" in str(err.value) and "new path" in str(err.value)
    rebuilt = FeatureIndex.build(sim, data, path, overwrite=True, **kw)
    assert rebuilt.manifest["complete"] and FeatureIndex.open(path, sim).n == len(data)


def test_open_refuses_another_model_or_settings(tmp_path):
    x = _data()
    FeatureIndex.build(_sim(), x, tmp_path / "s", dim=PROJ_DIM)
    with pytest.raises(nnsim.InputError, match=r"(?s)another model.*model_fingerprint: stored.*retrained"):
        FeatureIndex.open(tmp_path / "s", _other_model_sim())
    with pytest.raises(nnsim.InputError, match="params: stored"):
        FeatureIndex.open(tmp_path / "s", _sim(params=["0.weight"]))
    with pytest.raises(nnsim.InputError, match="singular: stored 'pinv', now 'ridge'"):
        FeatureIndex.open(tmp_path / "s", _sim(singular="ridge"))


def test_refuses_foreign_truncated_or_unrelated_folders(tmp_path):
    sim, x = _sim(), _data()
    assert issubclass(StoreError, nnsim.InputError)
    with pytest.raises(nnsim.InputError, match="not an nnsim feature store"):
        FeatureIndex.open(tmp_path / "nothing", sim)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "manifest.json").write_text(json.dumps({"format": "someone-else", "files": []}))
    with pytest.raises(nnsim.InputError, match="not an nnsim feature-store manifest.*'someone-else'"):
        FeatureIndex.open(foreign, sim)
    with pytest.raises(nnsim.InputError, match="cannot resume.*not an nnsim feature-store manifest"):
        FeatureIndex.build(sim, x, foreign, dim=PROJ_DIM)
    path = tmp_path / "s"
    FeatureIndex.build(sim, x, path, dim=PROJ_DIM)
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(nnsim.InputError, match="corrupted or truncated"):
        FeatureIndex.open(path, sim)
    m = json.loads(text)
    del m["layout"]
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(nnsim.InputError, match="corrupted: field 'layout'"):
        FeatureIndex.open(path, sim)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(nnsim.InputError, match="not empty and holds no nnsim feature store"):
        FeatureIndex.build(sim, x, other, dim=PROJ_DIM)
    FeatureIndex.build(sim, x, foreign, dim=PROJ_DIM, overwrite=True)  # replaces only the store's own files
    assert FeatureIndex.open(foreign, sim).n == 40
    FeatureIndex.build(sim, x, other, dim=PROJ_DIM, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    crashed = tmp_path / "crashed"  # a crash while writing the very first manifest leaves only its temporary file
    crashed.mkdir()
    (crashed / "manifest.json.tmp").write_text('{"format": "nnsim.Fea')
    assert FeatureIndex.build(sim, x, crashed, dim=PROJ_DIM).manifest["complete"]


def test_projection_change_is_detected(tmp_path):
    sim, x = _sim(), _data()
    path = tmp_path / "s"
    FeatureIndex.build(sim, x, path, dim=PROJ_DIM)
    m = json.loads((path / "manifest.json").read_text())
    m["projection_probe"][2] += 0.5  # as if built by a version whose random projection differs
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(nnsim.InputError, match="random projection .* differs"):
        FeatureIndex.open(path, sim)
    with pytest.raises(nnsim.InputError, match="projection_probe: stored"):
        FeatureIndex.build(sim, x, path, dim=PROJ_DIM)


# ---------------------------------------------------------------------------------------------- search
@pytest.mark.parametrize("metric", ["euclidean", "fisher"])
def test_search_equals_exact_neighbours_when_the_projection_is_exact(tmp_path, metric):
    sim, x = _sim(metric=metric), _data()
    q = _data(7, seed=5)
    index = FeatureIndex.build(sim, x, tmp_path / "s", dim=EXACT_DIM, shard_size=16, dtype="float32")
    ev, ei = sim.neighbors(q, x, 6)
    v, i = index.search(q, k=6, backend="torch")  # projected estimates = exact here (float32 store)
    assert torch.equal(i, ei) and v.dtype == torch.float64
    torch.testing.assert_close(v, ev, atol=1e-6, rtol=0)
    v, i = index.search(q, k=6, data=x, candidates=6)  # re-ranked: exact values
    assert torch.equal(i, ei)
    torch.testing.assert_close(v, ev, atol=1e-12, rtol=0)


def test_search_with_loaders_for_queries_and_data(tmp_path):
    sim, x = _sim(), _data()
    q = _data(9, seed=6)
    labels = torch.zeros(len(x), dtype=torch.long)
    built_from_loader = FeatureIndex.build(sim, DataLoader(TensorDataset(x, labels), batch_size=5), tmp_path / "l",
                                           dim=PROJ_DIM, shard_size=8)
    index = FeatureIndex.build(sim, x, tmp_path / "t", dim=PROJ_DIM, shard_size=8)
    np.testing.assert_array_equal(_stored(tmp_path / "l"), _stored(tmp_path / "t"))
    expected = index.search(q, k=4, data=x)
    queries = DataLoader(TensorDataset(q, torch.zeros(len(q))), batch_size=4)
    for data in (x, TensorDataset(x), DataLoader(TensorDataset(x, labels), batch_size=6),
                 DataLoader(Stream(x), batch_size=6)):
        v, i = built_from_loader.search(queries, k=4, data=data)
        assert torch.equal(i, expected[1])
        torch.testing.assert_close(v, expected[0])
    ev, ei = sim.neighbors(q, x, 4)
    assert torch.equal(expected[1], ei)  # 4 of 40 with 50 candidates: all of them are re-ranked
    torch.testing.assert_close(expected[0], ev)


def test_projected_search_returns_estimates_and_reranking_returns_exact_values(tmp_path):
    sim, x = _sim(), _data(60)
    q = _data(10, seed=7)
    index = FeatureIndex.build(sim, x, tmp_path / "s", dim=PROJ_DIM, shard_size=16)
    exact = sim.similarity(q, x)
    v, i = index.search(q, k=5, candidates=12, data=x)
    torch.testing.assert_close(v, exact.gather(1, i), atol=1e-12, rtol=0)
    assert (v[:, :-1] >= v[:, 1:]).all()
    # Estimates: [S u(q) - S c, 1] . [S u(x), <u(x), c>], with the store's sketch S and centre S c.
    factors, _ = sim.corrected_factors((q,))
    centre = torch.tensor(index.manifest["layout"]["centre"], dtype=torch.float64)
    fq = torch.cat([sketch.sketch(factors, PROJ_DIM, 0) / 3**0.5 - centre, torch.ones(10, 1)], 1)
    fx = torch.from_numpy(_stored(tmp_path / "s")).double()
    pv, pi = index.search(q, k=5)
    scores = fq.float().double() @ fx.T
    torch.testing.assert_close(pv, scores.gather(1, pi), atol=1e-5, rtol=0)
    assert torch.equal(pi, scores.topk(5, dim=1).indices)
    with_rerank = index.recall(q, x, k=5, candidates=12)
    without = index.recall(q, x, k=5, rerank=False)
    assert 0 <= without <= with_rerank <= 1


def test_zero_gradient_samples(tmp_path):
    model = nn.Sequential(nn.Linear(3, 1), nn.ReLU()).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    x = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).abs()
    x[[3, 17]] *= -1  # negative pre-activation: zero gradient
    sim = _sim(model)
    with pytest.warns(nnsim.RankDeficiencyWarning, match="2 sample.*never returned"):
        index = FeatureIndex.build(sim, x, tmp_path / "s", dim=EXACT_DIM, shard_size=8)
    assert index.zero_rows == [3, 17]
    with pytest.warns(nnsim.RankDeficiencyWarning, match=r"queries.*Samples: \[1\]"):
        v, i = index.search(x[[0, 3, 5]], k=28, data=x)
    assert torch.isnan(v[1]).all() and (i[1] == -1).all()
    assert not {3, 17} & set(i.flatten().tolist()) and (i[[0, 2]] >= 0).all()
    with pytest.warns(nnsim.RankDeficiencyWarning):
        ev, ei = sim.neighbors(x[[0, 5]], x, 28)
    torch.testing.assert_close(v[[0, 2]], ev)


def test_faiss_backend_matches_torch(tmp_path):
    sim, x = _sim(), _data()
    index = FeatureIndex.build(sim, x, tmp_path / "s", dim=PROJ_DIM, shard_size=16)
    if nnsim.index.search.faiss_module() is None:
        with pytest.raises(nnsim.InputError, match="pip install faiss-cpu"):
            index.search(x[:3], k=3, backend="faiss")
        pytest.skip("faiss is not installed")
    q = _data(8, seed=9)
    v, i = index.search(q, k=5, backend="faiss")
    tv, ti = index.search(q, k=5, backend="torch")
    assert torch.equal(i, ti)
    torch.testing.assert_close(v, tv, atol=1e-5, rtol=0)


def test_search_argument_errors(tmp_path):
    sim, x = _sim(), _data()
    index = FeatureIndex.build(sim, x, tmp_path / "s", dim=PROJ_DIM)
    for kw, msg in [({"k": 0}, "k must be"), ({"k": 41}, "k must be"), ({"candidates": 3, "k": 5}, "candidates"),
                    ({"backend": "annoy"}, "backend"), ({"data": x[:30]}, "30 samples"),
                    ({"data": x + 1}, r"data differ .* rows \[0, 40\)")]:
        with pytest.raises(nnsim.InputError, match=msg):
            index.search(x[:2], **kw)
    with pytest.raises(nnsim.InputError, match="queries samples have"):
        index.search(torch.randn(2, 5, dtype=torch.float64))
    for kw, msg in [({"dim": 0}, "dim"), ({"dtype": "int8"}, "dtype"), ({"shard_size": 0}, "shard_size")]:
        with pytest.raises(nnsim.InputError, match=msg):
            FeatureIndex.build(sim, x, tmp_path / "t", **kw)


# ---------------------------------------------------------------------------------------------- quality
class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.fc(F.adaptive_avg_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_default_dim_reaches_recall_095_on_trained_digits_models(tmp_path, arch):
    pytest.importorskip("sklearn")
    x, y = nnsim.datasets.load_digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm][:700], y[perm][:700]
    torch.manual_seed(0)
    if arch == "mlp":
        x = x.flatten(1)
        model: nn.Module = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    else:
        model = _CNN()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(8):
        for s in range(0, len(x), 64):
            opt.zero_grad()
            F.cross_entropy(model(x[s : s + 64]), y[s : s + 64]).backward()
            opt.step()
    sim = nnsim.Similarity(model, progress=False)
    data, queries = x[50:], x[:50]
    index = FeatureIndex.build(sim, data, tmp_path / arch)  # dim=None: DEFAULT_DIM
    assert index.dim == DEFAULT_DIM
    assert index.recall(queries, data, k=10) >= 0.95
