"""The `nnsim` command under torchrun (2 processes, gloo on the CPU): the same files as a single process, written
and printed once, and a failure on one rank fails every rank with one message instead of hanging.

The torchrun jobs are started together (they are mostly Python start-up) while the single-process references
are computed in this process by `nnsim.cli.main`, the same code the `nnsim` entry point runs.
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nnsim.distributed as nd
from nnsim.cli import main

torch.set_num_threads(1)
N = 90  # samples (--limit); --chunk-size 16 gives 6 chunks, so that both ranks compute a share
TIMEOUT = 240  # s: a hang fails the test instead of blocking the suite

DATA_FACTORY = '''
import os
import numpy as np
import torch

def digits():
    """The demo's first 60 digits, except on rank 1, which cannot read them."""
    if os.environ.get("RANK") == "1":
        raise OSError("cannot read the data on this node")
    return torch.utils.data.TensorDataset(torch.from_numpy(np.load(os.environ["DEMO_DATA"])["x"][:60]))
'''


def model_args(demo_dir: Path) -> list[str]:
    # The factory route (nn.Module layers) starts faster than the .pt2 program; test_cli.py covers .pt2.
    return ["--model", "nnsim.cli.demo:digits_cnn", "--weights", str(demo_dir / "weights.pt"), "--chunk-size", "16"]


def commands(demo_dir: Path, out: Path) -> dict[str, list[str]]:
    data = ["--data", str(demo_dir / "data.npz"), "--limit", str(N)]
    m = model_args(demo_dir)
    return {
        "analyze": ["analyze", *m, *data, "-k", "5", "--out", str(out / "analyze")],
        "density": ["density", *m, *data, "--method", "hard", "--threshold", "0.9", "--out", str(out / "density.csv")],
        "neighbors": ["neighbors", *m, *data, "--query", "0:7,40", "-k", "4", "--exclude-self",
                      "--out", str(out / "neighbors.csv")],
        # rank 1 fails while loading the data, rank 0 loads them and would go on to the first collective
        "failure": ["density", *m, "--data", "rankdata:digits", "--out", str(out / "failed.csv")],
    }


def torchrun(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nnsim", *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(demo_dir, tmp_path_factory):
    """{name: (returncode, stdout, stderr)} of the torchrun jobs, and the single-process outputs' folder."""
    root = tmp_path_factory.mktemp("torchrun")
    (root / "rankdata.py").write_text(DATA_FACTORY)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DEMO_DATA": str(demo_dir / "data.npz")}
    jobs = {name: torchrun(args, root, env) for name, args in commands(demo_dir, root / "two").items()}
    try:
        single = root / "one"
        for name, args in commands(demo_dir, single).items():
            if name != "failure":
                assert main([*args, "--quiet"]) == 0, name
        results = {}
        for name, job in jobs.items():
            out, err = job.communicate(timeout=TIMEOUT)
            results[name] = (job.returncode, out, err)
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
    return results, root / "two", single


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_table(two: Path, one: Path, exact: set[str]) -> None:
    """Same header and rows; the columns in ``exact`` identical, the others equal to float32 rounding."""
    a, b = read_csv(two), read_csv(one)
    assert len(a) == len(b) > 0 and list(a[0]) == list(b[0])
    for col in a[0]:
        if col in exact:
            assert [r[col] for r in a] == [r[col] for r in b], col
        else:
            np.testing.assert_allclose([float(r[col]) for r in a], [float(r[col]) for r in b], rtol=2e-5,
                                       atol=1e-6, err_msg=col)


def succeeded(results, name):
    code, out, err = results[name]
    assert code == 0, err[-3000:]
    assert "Traceback" not in err and "nnsim: error" not in err
    return out, err


def test_analyze_under_torchrun_equals_one_process_and_writes_once(runs):
    results, two, one = runs
    out, err = succeeded(results, "analyze")
    # One copy of every message: rank 1 prints nothing.
    assert out.count(f"loaded {N} samples") == 1 and out.count("analysis done in") == 1, out
    assert out.count("[density] done") == out.count("[neighbors] done") == out.count("[denoising] done") == 1
    # Progress bars (stderr) from rank 0 only, over its share: 3 of the 6 chunks. Each bar is counted by its
    # opening "0%" state, printed once per bar: on a slow machine tqdm prints the final "100%" state twice
    # (once by the last update, once more on close), so counting "100%" would count the machine's load.
    for bar in ("nnsim density: sum", "nnsim similarity"):
        assert err.count(f"{bar}:   0%") == 1 and f"{bar}: 100%" in err, err[-2000:]
    assert "3/3" in err, err[-2000:]
    a, b = two / "analyze", one / "analyze"
    assert sorted(p.name for p in a.rglob("*")) == sorted(p.name for p in b.rglob("*"))
    ints = {"index", "prediction", "label", "prediction_matches_label"} | {f"neighbor_{r}" for r in range(1, 6)}
    assert_same_table(a / "samples.csv", b / "samples.csv", exact=ints)
    assert_same_table(a / "neighbors.csv", b / "neighbors.csv", exact={"index", "rank", "neighbor"})
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    sa.pop("timings_s"), sb.pop("timings_s")
    assert json.dumps(sa, sort_keys=True) != "" and sa.keys() == sb.keys()
    for key in ("density", "effective_neighbors", "label_consistency"):
        for stat in sa[key]:
            assert sa[key][stat] == pytest.approx(sb[key][stat], rel=2e-5), (key, stat)
    assert sa["accuracy"] == sb["accuracy"] and sa["samples"] == N
    assert (a / "report.html").stat().st_size > 10_000


def test_density_and_neighbors_under_torchrun_equal_one_process(runs):
    results, two, one = runs
    out, _ = succeeded(results, "density")
    assert out.count("density: min") == 1 and out.count("wrote") == 1, out
    # hard counts are integers: identical, not merely close
    assert_same_table(two / "density.csv", one / "density.csv", exact={"index", "density"})
    out, _ = succeeded(results, "neighbors")
    assert out.count("query 0:") == 1 and out.count("query 40:") == 1 and out.count("wrote") == 1, out
    assert_same_table(two / "neighbors.csv", one / "neighbors.csv", exact={"query", "rank", "neighbor"})
    rows = read_csv(two / "neighbors.csv")
    assert len(rows) == 8 * 4 and all(r["query"] != r["neighbor"] for r in rows)  # --exclude-self


def test_a_failure_on_one_rank_fails_every_rank_with_one_message(runs):
    results, two, _ = runs
    code, out, err = results["failure"]
    assert code != 0  # torchrun: a rank failed (and it did not hang: communicate() has a timeout)
    lines = [line for line in err.splitlines() if line.startswith("nnsim: error")]
    # printed once, by rank 0, naming the rank that failed; no Python traceback from the workers
    assert lines == ["nnsim: error: rank 1: the dataset factory 'rankdata:digits' failed: OSError: cannot read the "
                     "data on this node"], err[-3000:]
    assert "nnsim/cli" not in err
    # the exit code of the failing rank (3, bad input) is the one torchrun reports as the first failure
    root_cause = err[err.index("Root Cause"):]
    assert "exitcode  : 3" in root_cause, root_cause
    assert not (two / "failed.csv").exists()


@pytest.mark.parametrize("command", ["analyze", "density"])
def test_a_rank_other_than_0_prints_and_writes_nothing(demo_dir, tmp_path, monkeypatch, capsys, command):
    """The command as rank 1 sees it (here alone, so the nnsim calls run locally): the same work, no output."""
    monkeypatch.setattr(nd, "rank", lambda: 1)
    out = tmp_path / "out"
    args = [command, *model_args(demo_dir), "--data", str(demo_dir / "data.npz"), "--limit", "30", "--out", str(out)]
    assert main(args) == 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    # ... and rank 0 (the same call) writes the files and prints
    monkeypatch.setattr(nd, "rank", lambda: 0)
    assert main(args) == 0 and out.exists()
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("outcomes, code, lines", [
    ([(0, "", True)] * 3, 0, []),
    # every rank failed alike (a missing file): said once, without ranks
    ([(3, "data file not found: x.npz", True)] * 3, 3, ["data file not found: x.npz"]),
    # rank 1 failed; ranks 0 and 2 only learnt it from nnsim.distributed.together: rank 1's code and message
    ([(3, "rank 1 failed: ModelError: bad", False), (4, "bad", True), (3, "rank 1 failed: ModelError: bad", False)],
     4, ["rank 1: bad"]),
    # two ranks failed differently: both said, the first one's code
    ([(3, "rank 1 failed: ...", False), (2, "usage", True), (3, "data", True)], 2, ["rank 1: usage", "rank 2: data"]),
])
def test_the_ranks_agree_on_one_exit_code_and_message(monkeypatch, capsys, outcomes, code, lines):
    import importlib

    cli = importlib.import_module("nnsim.cli.main")
    me = outcomes[0]

    def all_gather_object(comm, obj):
        assert obj == me  # this rank sends its own outcome
        return outcomes

    monkeypatch.setattr(nd, "all_gather_object", all_gather_object)
    assert cli._agree_on_exit(nd.Comm(None, 0, len(outcomes)), *me) == code
    assert capsys.readouterr().err.splitlines() == [f"nnsim: error: {line}" for line in lines]
