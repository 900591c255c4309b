"""The `nnsim` command through its installed entry point, on real files: the demo's exported model and data,
Fashion-MNIST IDX files, and bad inputs (exit code + one-line message)."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_nnsim
from torch import nn

import nnsim
from nnsim.cli import main
from nnsim.cli.demo import digits_cnn

torch.set_num_threads(1)
FM = nnsim.datasets.FASHION_MNIST_ROOT
FM_IMAGES, FM_LABELS = FM / "t10k-images-idx3-ubyte.gz", FM / "t10k-labels-idx1-ubyte.gz"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def demo_model(demo_dir: Path) -> nn.Module:
    """The demo's model rebuilt in memory through the factory + state-dict route (nn.Conv2d/nn.Linear layers)."""
    model = digits_cnn()
    model.load_state_dict(torch.load(demo_dir / "weights.pt", weights_only=True))
    return model.eval()


def test_demo_writes_everything_and_finds_the_flipped_labels(demo_dir):
    for name in ("report.html", "samples.csv", "neighbors.csv", "summary.json", "model.pt2", "data.npz",
                 "weights.pt", "figures/density.png", "figures/denoising.png"):
        assert (demo_dir / name).stat().st_size > 1000, name
    summary = json.loads((demo_dir / "summary.json").read_text())
    rows = read_csv(demo_dir / "samples.csv")
    data = np.load(demo_dir / "data.npz")
    assert len(rows) == summary["samples"] == len(data["x"]) == 1797
    # Ground truth the analysis never saw: which labels were flipped. The mislabel score must find them.
    flipped = data["flipped"]
    assert flipped.sum() == 180 and (data["y"][flipped] != data["y_true"][flipped]).all()
    score = np.array([float(r["mislabel_score"]) for r in rows])
    top = np.argsort(-score)[:180]
    assert flipped[top].mean() > 0.65  # 0.72 measured (docs/cli.md)
    auroc = summary["demo"]["auroc_for_flipped"]
    assert auroc["mislabel_score"] == summary["demo"]["mislabel_score_auroc_for_flipped"] > 0.95
    # The demo's point: with shifts, contrast and noise, input-space neighbours miss flips the network's find.
    assert auroc["mislabel_score"] > auroc["input_knn_disagreement"] + 0.05
    assert [r["known_mislabelled"] == "True" for r in rows] == flipped.tolist()
    # The demo's labels are the noisy ones, and the CSV carries them.
    assert [int(r["label"]) for r in rows[:50]] == data["y"][:50].tolist()


def test_pt2_model_through_the_cli_matches_the_in_memory_model(demo_dir, tmp_path):
    """analyze on the exported .pt2 (generic per-module path) vs the factory-built nn.Module (layer rules),
    checked against the pairwise similarity matrix and the label-consistency formula written out."""
    n = 120
    proc = run_nnsim("analyze", "--model", str(demo_dir / "model.pt2"), "--data", str(demo_dir / "data.npz"),
                     "--limit", str(n), "--out", str(tmp_path / "a"), "-k", "5", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""  # --quiet
    rows = read_csv(tmp_path / "a" / "samples.csv")
    data = np.load(demo_dir / "data.npz")
    x, y = torch.from_numpy(data["x"][:n]), torch.from_numpy(data["y"][:n])
    sim = nnsim.Similarity(demo_model(demo_dir), progress=False)
    S = sim.similarity(x).double()  # [n, n]
    density = np.array([float(r["density"]) for r in rows])
    np.testing.assert_allclose(density, S.sum(1).numpy(), rtol=1e-4)
    S.fill_diagonal_(-float("inf"))
    top = S.topk(5, dim=1)
    nb = read_csv(tmp_path / "a" / "neighbors.csv")
    got = np.array([float(r["similarity"]) for r in nb]).reshape(n, 5)
    np.testing.assert_allclose(got, top.values.numpy(), atol=1e-4)
    # label consistency |onehot(y_i) - R_i^-1 sum_j K_ij onehot(y_j)| with R_i = sum_j K_ij, from the kernel.
    K = sim.kernel(x).double()  # [n, n, 10, 10]
    onehot = nn.functional.one_hot(y, 10).double()
    e = torch.linalg.solve(K.sum(1), torch.einsum("ijce,je->ic", K, onehot))
    np.testing.assert_allclose([float(r["label_consistency"]) for r in rows], (onehot - e).norm(dim=1).numpy(),
                               rtol=1e-3, atol=1e-4)
    html = (tmp_path / "a" / "report.html").read_text()
    assert "data:image/png;base64," in html and 'id="nnsim-data"' in html


def fashion_model(tmp_path: Path) -> None:
    """A factory module and a briefly trained state dict for 28x28 Fashion-MNIST images, in tmp_path."""
    (tmp_path / "fm_model.py").write_text(
        "from torch import nn\n\n\ndef make():\n"
        "    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10))\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import fm_model
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    model = fm_model.make()
    x, y = nnsim.datasets.load_fashion_mnist("train", limit=600)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(3):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.save(model.state_dict(), tmp_path / "fm.pt")
    del sys.modules["fm_model"]
    return model.eval()


def test_fashion_mnist_idx_density_and_neighbors(tmp_path):
    model = fashion_model(tmp_path)
    common = ["--model", "fm_model:make", "--weights", "fm.pt", "--data", str(FM_IMAGES), "--labels", str(FM_LABELS),
              "--limit", "150", "--quiet"]
    p1 = run_nnsim("density", *common, "--out", "d.csv", cwd=tmp_path)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = run_nnsim("neighbors", *common, "--query", "0,7,20:22", "-k", "4", "--out", "n.csv", cwd=tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    x, _ = nnsim.datasets.load_fashion_mnist("test", limit=150)
    S = nnsim.Similarity(model, progress=False).similarity(x).double()
    np.testing.assert_allclose([float(r["density"]) for r in read_csv(tmp_path / "d.csv")], S.sum(1).numpy(),
                               rtol=1e-4)
    rows = read_csv(tmp_path / "n.csv")
    assert [int(r["query"]) for r in rows] == [q for q in (0, 7, 20, 21) for _ in range(4)]
    top = S[[0, 7, 20, 21]].topk(4, dim=1)
    np.testing.assert_allclose(np.array([float(r["similarity"]) for r in rows]).reshape(4, 4), top.values.numpy(),
                               atol=1e-4)
    assert [int(r["neighbor"]) for r in rows][::4] == [0, 7, 20, 21]  # each query is its own best match


@pytest.mark.parametrize("case", ["missing", "corrupt_model", "rejects", "label_count"])
def test_bad_inputs_exit_code_and_one_line(demo_dir, tmp_path, case):
    model, data = str(demo_dir / "model.pt2"), str(demo_dir / "data.npz")
    extra: list[str] = []
    if case == "missing":
        data, code, text = str(tmp_path / "nope.npz"), 3, "data file not found"
    elif case == "corrupt_model":
        raw = (demo_dir / "model.pt2").read_bytes()
        (tmp_path / "m.pt2").write_bytes(raw[: len(raw) // 2])
        model, code, text = str(tmp_path / "m.pt2"), 3, "not a readable torch.export program"
    elif case == "rejects":  # the 8x8 digits model on 28x28 Fashion-MNIST images
        np.save(tmp_path / "fm.npy", nnsim.datasets.load_fashion_mnist("test", limit=20)[0].numpy())
        data, code, text = str(tmp_path / "fm.npy"), 4, "the model does not accept the data"
    else:
        np.save(tmp_path / "x.npy", np.load(data)["x"][:30])
        np.save(tmp_path / "y.npy", np.load(data)["y"][:20])
        data, extra, code, text = str(tmp_path / "x.npy"), ["--labels", str(tmp_path / "y.npy")], 3, \
            "30 inputs but 20 labels"
    proc = run_nnsim("density", "--model", model, "--data", data, *extra, "--out", str(tmp_path / "d.csv"))
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nnsim: error: ") and text in lines[0], proc.stderr
    assert not (tmp_path / "d.csv").exists()


def test_more_bad_inputs_in_process(demo_dir, tmp_path, capsys):
    """The same handler, called in-process for speed: each case one line on stderr and its exit code."""
    good = ["--model", str(demo_dir / "model.pt2"), "--data", str(demo_dir / "data.npz")]
    (tmp_path / "bad.npz").write_bytes(b"this is not a zip file")
    np.savez(tmp_path / "nokey.npz", pixels=np.zeros((4, 1, 8, 8), np.float32))
    np.savez(tmp_path / "nan.npz", x=np.full((4, 1, 8, 8), np.nan, np.float32))
    shutil.copy(demo_dir / "data.npz", tmp_path / "copy.npz")
    cases = [
        (["density", "--model", str(demo_dir / "model.pt2"), "--data", str(tmp_path / "bad.npz")], 3,
         "not a readable .npz file"),
        (["density", "--model", str(demo_dir / "model.pt2"), "--data", str(tmp_path / "nokey.npz")], 3,
         "no inputs array"),
        (["density", "--model", str(demo_dir / "model.pt2"), "--data", str(tmp_path / "nan.npz")], 3, "NaN or Inf"),
        (["density", "--model", str(demo_dir / "data.npz"), "--data", str(demo_dir / "data.npz")], 3,
         "not a readable torch.export program"),
        (["density", "--model", "nnsim.cli.demo:digits_cnn", "--weights", str(tmp_path / "bad.npz"), "--data",
          str(demo_dir / "data.npz")], 3, "not a readable state-dict file"),
        (["density", "--model", "no_such_module_xyz:make", "--data", str(demo_dir / "data.npz")], 3, "cannot import"),
        (["density", *good, "--output", "logits:x"], 2, "the class must be an integer"),
        (["density", *good, "--threads", "0"], 2, "--threads must be a positive integer"),
        (["neighbors", *good, "--query", "5000"], 3, "outside the data"),
        (["neighbors", *good, "--query", str(FM_IMAGES)], 3, "query samples have shape"),
        (["reproduce", "no_such_experiment"], 2, "unknown experiment 'no_such_experiment'; available:"),
    ]
    for argv, code, text in cases:
        assert main(argv + ["--out", str(tmp_path / "o.csv")] if argv[0] != "reproduce" else argv) == code, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and text in err[0], (argv, err)


def test_model_exported_in_training_mode_or_with_a_fixed_batch_is_refused(tmp_path, capsys):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Dropout(0.5), nn.Linear(16, 10)).train()
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: batch},)),
                      tmp_path / "m.pt2")
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).random((10, 1, 8, 8), np.float32))
    assert main(["density", "--model", str(tmp_path / "m.pt2"), "--data", str(tmp_path / "d.npz"), "--out",
                 str(tmp_path / "o.csv")]) == 4
    assert "exported in training mode" in capsys.readouterr().err
    # Exported without a dynamic batch axis: accepts only its own batch size, refused before any work.
    torch.export.save(torch.export.export(model.eval(), (torch.zeros(1, 1, 8, 8),)), tmp_path / "b1.pt2")
    assert main(["density", "--model", str(tmp_path / "b1.pt2"), "--data", str(tmp_path / "d.npz"), "--out",
                 str(tmp_path / "o.csv")]) == 4
    assert "must be exported with a dynamic batch axis" in capsys.readouterr().err


def test_reproduce_dispatches_to_an_experiment_module(tmp_path, monkeypatch, capsys):
    """`nnsim reproduce NAME args` runs nnsim.experiments.NAME as __main__ with the arguments."""
    pkg = tmp_path / "experiments"
    pkg.mkdir()
    (pkg / "echo_args.py").write_text(
        "import sys\nfrom pathlib import Path\n"
        "if __name__ == '__main__':\n    Path(sys.argv[-1]).write_text(' '.join(sys.argv[1:]))\n    sys.exit(7)\n")
    fake = type(sys)("nnsim.experiments")
    fake.__path__ = [str(pkg)]
    monkeypatch.setitem(sys.modules, "nnsim.experiments", fake)
    out = tmp_path / "args.txt"
    assert main(["reproduce", "echo_args", "--quick", str(out)]) == 7
    assert out.read_text() == f"--quick {out}"
    assert main(["reproduce", "nope"]) == 2
    assert "available: echo_args" in capsys.readouterr().err


def test_python_dash_m_and_debug_traceback(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "nnsim", "density", "--model", "x.pt2", "--data", "y.npz",
                           "--debug"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 3 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "nnsim: error: data file not found: y.npz"


def test_denoise_and_index_commands(demo_dir, tmp_path, capsys):
    """denoise against the formulas written out from the kernel; index build + query against exact top-k."""
    n = 60
    common = ["--model", str(demo_dir / "model.pt2"), "--data", str(demo_dir / "data.npz"), "--limit", str(n),
              "--quiet"]
    out = str(tmp_path / "d.csv")
    assert main(["denoise", *common, "--targets", "labels", "--noise-std", "0.5", "--out", out]) == 0
    rows = read_csv(tmp_path / "d.csv")
    data = np.load(demo_dir / "data.npz")
    x, y = torch.from_numpy(data["x"][:n]), torch.from_numpy(data["y"][:n])
    sim = nnsim.Similarity(demo_model(demo_dir), progress=False)
    K = sim.kernel(x).double()  # [n, n, 10, 10]
    Rinv = torch.linalg.inv(K.sum(1))
    D = Rinv @ torch.einsum("ijce,ijfe->icf", K, K) @ Rinv.transpose(1, 2)
    factor = D.diagonal(dim1=1, dim2=2).sum(1) / 10
    onehot = nn.functional.one_hot(y, 10).double()
    cons = (onehot - (Rinv @ torch.einsum("ijce,je->ic", K, onehot)[..., None])[..., 0]).norm(dim=1)
    np.testing.assert_allclose([float(r["factor"]) for r in rows], factor.numpy(), rtol=1e-3)
    np.testing.assert_allclose([float(r["consistency"]) for r in rows], cons.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose([float(r["predicted_error"]) for r in rows], 0.5 * factor.sqrt().numpy(), rtol=1e-3)

    assert main(["index", "build", *common, "--index", str(tmp_path / "idx"), "--dim", "64"]) == 0
    assert main(["index", "query", *common, "--index", str(tmp_path / "idx"), "--query", "3,9", "-k", "4",
                 "--out", str(tmp_path / "q.csv")]) == 0
    got = read_csv(tmp_path / "q.csv")
    top = sim.similarity(x[[3, 9]], x).topk(4, dim=1)
    assert [int(r["neighbor"]) for r in got] == top.indices.flatten().tolist()
    np.testing.assert_allclose([float(r["similarity"]) for r in got], top.values.flatten().numpy(), atol=1e-4)
    assert main(["index", "query", *common[:-3], "--limit", "50", "--index", str(tmp_path / "idx"), "--query", "1",
                 "--out", str(tmp_path / "q2.csv")]) == 3
    assert "indexes 60 samples but --data has 50" in capsys.readouterr().err


def test_reproduce_lists_the_papers_experiments(capsys):
    """The experiment modules shipped with the package are what `nnsim reproduce` offers."""
    assert main(["reproduce", "nope"]) == 2
    err = capsys.readouterr().err
    assert "available: denoising, label_noise, mnist_criterion, registration, registration_linear, toy1d" in err
