"""The command line refuses nonsense with one line and the exit code of docs/cli.md (2 usage, 3 input, 4 model),
before any work; it writes every output atomically, with summary.json as the completion marker.

A small 3-class MLP on 8 features (exported, and as a factory + state dict) keeps these tests fast; most run
`nnsim.cli.main` in-process, one case per item through the installed entry point."""

import importlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_nnsim

from nnsim.cli import main

torch.set_num_threads(1)
FACTORY = """
import torch
from torch import nn


def make():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def dead():
    # ReLU after a huge negative bias: the output is 0 whatever the input, every gradient is zero.
    m = nn.Sequential(nn.Linear(8, 3), nn.ReLU())
    with torch.no_grad():
        m[0].bias.fill_(-1e3)
    return m
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("refusals")
    (d / "tiny_factory.py").write_text(FACTORY)
    sys.path.insert(0, str(d))
    try:
        import tiny_factory
    finally:
        sys.path.remove(str(d))
    torch.manual_seed(0)
    model = tiny_factory.make().eval()
    torch.save(model.state_dict(), d / "w.pt")
    batch = torch.export.Dim("batch", min=1)
    x = torch.randn(30, 8)
    torch.export.save(torch.export.export(model, (x[:2],), dynamic_shapes=({0: batch},)), d / "m.pt2")
    y = (torch.arange(30) % 3).numpy()
    np.savez(d / "d.npz", x=x.numpy(), y=y)
    np.savez(d / "one.npz", x=x[:1].numpy(), y=y[:1])
    bad = y.copy()
    bad[[4, 9]] = [5, 2]  # labels 2 and 5 for a 3-output model: 5 is outside
    np.savez(d / "badlab.npz", x=x.numpy(), y=bad)
    np.save(d / "x.npy", x.numpy())
    # An IDX label file misread (a big-endian count read as labels): huge class indices.
    np.save(d / "idxlab.npy", np.full(30, 889_257_984, np.int64))
    (d / "existing_file").write_text("not a folder")
    del sys.modules["tiny_factory"]
    return d


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nnsim: error: "), err
    assert "--debug" not in err[0]  # a user error, not an internal one
    return err[0]


CASES = [  # (argv after the command's model/data options, exit code, text of the one line)
    (["analyze", "-k", "0"], 2, "-k must be a positive integer"),
    (["density", "--output", "logits:7"], 2, "--output logits:7: the model has 3 outputs"),
    (["density", "--output", "posnegflat:3"], 2, "the model has 3 outputs"),
    (["analyze", "-k", "50"], 2, "-k 50 is more than the 29 other samples"),
    (["analyze", "--class-names", "a,b"], 2, "--class-names has 2 names but there are 3 classes"),
    (["analyze", "--metric", "fisher"], 2, "use --metric euclidean"),
    (["denoise", "--metric", "fisher"], 2, "use --metric euclidean"),
    (["density", "--method", "hard", "--threshold", "nan"], 2, "--threshold must be a finite number"),
    (["density", "--method", "less_soft", "--power", "inf"], 2, "--power must be a positive number"),
    (["denoise", "--approximate", "--dim", "0"], 2, "--dim must be a positive integer"),
    (["denoise", "--noise-std", "-1"], 2, "--noise-std must be a number >= 0"),
    (["analyze", "--data", "{d}/one.npz"], 3, "analyze needs at least 2 samples"),
    (["analyze", "--data", "{d}/badlab.npz"], 3, "labels go up to 5 but the model has 3 outputs"),
    (["denoise", "--targets", "labels", "--data", "{d}/badlab.npz"], 3, "labels go up to 5"),
    (["analyze", "--data", "{d}/x.npy", "--labels", "{d}/idxlab.npy"], 3, "labels go up to 889257984"),
    (["analyze", "--out", "{d}/existing_file"], 2, "is a file; this command writes a folder"),
    (["density", "--out", "{d}/existing_file/x.csv"], 2, "is a file, not a folder"),
    (["density", "--out", "{d}"], 2, "is a folder; name the file to write"),
    (["density", "--model", "tiny_factory:make"], 2, "pass its trained weights with --weights FILE"),
    (["density", "--random-init"], 2, "--random-init goes with a model factory"),
    # the library's advice, in the command line's terms
    (["density", "--method", "hard", "--threshold", "0.5", "--unnormalized"], 3, "drop --unnormalized"),
    (["density", "--exclude-self", "--reference", "{d}/d.npz"], 3, "--exclude-self needs no --reference"),
]


@pytest.mark.parametrize("argv,code,text", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_user_errors_are_one_line_with_their_exit_code(files, capsys, monkeypatch, argv, code, text):
    monkeypatch.chdir(files)
    monkeypatch.syspath_prepend(str(files))
    argv = [a.format(d=files) for a in argv]
    given = set(argv)
    base = [] if "--model" in given else ["--model", str(files / "m.pt2")]
    base += [] if "--data" in given else ["--data", str(files / "d.npz")]
    out = [] if "--out" in given else ["--out", str(files / ("o" if argv[0] == "analyze" else "o.csv"))]
    assert main([*argv, *base, *out, "--quiet"]) == code
    line = one_error_line(capsys)
    assert text in line, line
    assert not (files / "o").exists() and not (files / "o.csv").exists()


def test_unwritable_out_is_refused_before_the_work(files, tmp_path, capsys):
    """Checked before anything is read: the data file does not even exist, the error is about --out."""
    if os.geteuid() == 0:  # root writes through chmod; /sys refuses everyone
        target = Path("/sys/nnsim-test-out")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "out"
    assert main(["analyze", "--model", str(files / "m.pt2"), "--data", str(tmp_path / "missing.npz"),
                 "--out", str(target)]) == 2
    assert "cannot write in" in one_error_line(capsys)


def test_factory_random_init_and_state_dict_mismatch(files, tmp_path, capsys, monkeypatch):
    """A factory needs --weights or --random-init (through the installed command); a state dict that does not fit
    names the missing and unexpected keys, and the shapes that differ."""
    common = ["density", "--model", "tiny_factory:make", "--data", str(files / "d.npz"), "--quiet"]
    p = run_nnsim(*common, "--out", str(tmp_path / "a.csv"), cwd=files)
    assert p.returncode == 2 and "--random-init" in p.stderr and not (tmp_path / "a.csv").exists(), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    monkeypatch.syspath_prepend(str(files))
    assert main([*common, "--random-init", "--out", str(tmp_path / "b.csv")]) == 0
    assert len((tmp_path / "b.csv").read_text().splitlines()) == 31
    state = torch.load(files / "w.pt", weights_only=True)
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "wrapped.pt")
    assert main([*common, "--weights", str(tmp_path / "wrapped.pt"), "--out", str(tmp_path / "c.csv")]) == 4
    line = one_error_line(capsys)
    assert "4 missing key(s): 0.weight, 0.bias, 2.weight, 2.bias" in line
    assert "4 unexpected key(s): module.0.weight" in line and "prefix 'module.'" in line
    shape = dict(state)
    shape["2.weight"] = torch.zeros(4, 16)
    del shape["2.bias"]
    torch.save(shape, tmp_path / "shape.pt")
    assert main([*common, "--weights", str(tmp_path / "shape.pt"), "--out", str(tmp_path / "d.csv")]) == 4
    line = one_error_line(capsys)
    assert "1 missing key(s): 2.bias" in line and "2.weight [4, 16] vs [3, 16]" in line


def test_all_zero_gradients_are_a_model_error(files, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(files))
    for cmd, out, extra in (("analyze", files / "z", []), ("density", files / "z.csv", []),
                            ("neighbors", files / "n.csv", ["--query", "0,1"]), ("denoise", files / "dn.csv", [])):
        assert main([cmd, "--model", "tiny_factory:dead", "--random-init", "--data", str(files / "d.npz"), *extra,
                     "--out", str(out), "--quiet"]) == 4
        assert "gradients are zero for every sample" in one_error_line(capsys)
        assert not out.exists()


def test_outputs_are_atomic_and_summary_marks_completion(files, tmp_path, capsys, monkeypatch):
    """A complete run ends with summary.json {"complete": true}; a run interrupted while writing leaves no
    summary.json (the old one is removed first), no truncated file under a final name, no temporary file."""
    from nnsim import report

    out = tmp_path / "a"
    argv = ["analyze", "--model", str(files / "m.pt2"), "--data", str(files / "d.npz"), "--out", str(out), "-k", "3",
            "--quiet"]
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["complete"] is True
    before = (out / "samples.csv").read_bytes()
    rows = before.decode().splitlines()
    assert len(rows) == 31 and rows[0].startswith("index,")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_report", interrupted)
    assert main(argv) == 130
    capsys.readouterr()
    assert not (out / "summary.json").exists()
    assert (out / "samples.csv").read_bytes() == before  # rewritten whole (same data), never half
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]

    # Interrupted in the middle of a CSV: the final name keeps its old content, the temporary file is gone.
    cli_runtime = importlib.import_module("nnsim.cli.runtime")

    def rows_then_interrupt():
        yield [1, 2]
        raise KeyboardInterrupt

    target = tmp_path / "t.csv"
    target.write_text("old\n")
    with pytest.raises(KeyboardInterrupt):
        cli_runtime.write_csv(target, ["a", "b"], rows_then_interrupt())
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_index_messages_speak_cli(files, tmp_path, capsys):
    from nnsim.cli.main import _in_cli_terms

    text = _in_cli_terms("resume it with nnsim.FeatureIndex.build(sim, data, '/x', dim=8, seed=0), or "
                         "overwrite=True to rebuild")
    assert "FeatureIndex" not in text and "overwrite=True" not in text
    assert "nnsim index build" in text and "--overwrite" in text
    common = ["--model", str(files / "m.pt2"), "--data", str(files / "d.npz"), "--index", str(tmp_path / "i"),
              "--quiet"]
    assert main(["index", "build", *common, "--dim", "8"]) == 0
    code = main(["index", "build", *common, "--dim", "16"])
    line = one_error_line(capsys)
    assert code != 0 and "overwrite=True" not in line and "FeatureIndex" not in line, line

