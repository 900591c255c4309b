"""The documented example runs end to end (quick mode) and writes what the docs quote."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_fashion_mnist_analysis_quick(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples/fashion_mnist_analysis.py"), "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("density.png", "neighbors.png", "denoising.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0.0 < results["model"]["test_accuracy"] <= 1.0
