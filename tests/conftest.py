import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


# ------------------------------------------------- the `nnsim` command (tests/test_cli.py, tests/test_report.py)
NNSIM = Path(sys.executable).parent / "nnsim"  # the installed entry point, next to the venv's python


def run_nnsim(*args: str, cwd: str | os.PathLike | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the installed `nnsim` entry point with one torch thread; returns the completed process (text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([str(NNSIM), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """One `nnsim demo` run shared by the CLI and report tests."""
    out = tmp_path_factory.mktemp("demo") / "nnsim-demo"
    proc = run_nnsim("demo", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out
