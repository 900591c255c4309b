"""``nnsim denoise`` / ``nnsim analyze`` with --noisy-targets: the label-free sigma and predicted error.

The oracle is the in-process API call (itself tested against the formula in float64 in
tests/test_denoising_linearized.py); here the CLI must pass the right data and report the same numbers.
"""

from __future__ import annotations

import csv
import json
import sys

import numpy as np
import pytest
import torch

import nnsim
from nnsim.cli import main

N = 80


@pytest.fixture()
def regression(tmp_path, monkeypatch):
    (tmp_path / "reg_model.py").write_text(
        "from torch import nn\n\n\ndef make():\n"
        "    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import reg_model

    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, 1, generator=g) * 2 - 1
    y = torch.sin(3 * x) + 0.2 * torch.randn(N, 1, generator=g)
    torch.manual_seed(0)
    model = reg_model.make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "data.npz", x=x.numpy())
    np.save(tmp_path / "targets.npy", y.numpy()[:, 0])
    yield model.eval(), x, y, ["--model", "reg_model:make", "--weights", str(tmp_path / "w.pt"), "--data",
                               str(tmp_path / "data.npz"), "--noisy-targets", str(tmp_path / "targets.npy")]
    sys.modules.pop("reg_model", None)


def test_denoise_with_noisy_targets_reports_the_linearized_estimate(regression, tmp_path, capsys):
    model, x, y, common = regression
    expected = nnsim.Similarity(model, progress=False).denoising(x, targets=y, method="linearized")
    out = tmp_path / "d.csv"
    assert main(["denoise", *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"label noise sigma: {expected.noise_std:.4g} (estimated" in printed
    assert "flagged untrusted" in printed and "docs/experiments/denoising.md" in printed
    rows = list(csv.DictReader(open(out)))
    np.testing.assert_allclose([float(r["predicted_error"]) for r in rows], expected.predicted_error.numpy(),
                               rtol=1e-4)
    assert [r["ill_conditioned"] == "True" for r in rows] == expected.ill_conditioned.tolist()
    # A given sigma replaces the estimate; --method linearized without targets is a usage error.
    assert main(["denoise", *common, "--noise-std", "0.5", "--out", str(out)]) == 0
    assert "0.5 (given" in capsys.readouterr().out
    assert main(["denoise", *common[:-2], "--method", "linearized", "--out", str(out)]) == 2
    assert "--noisy-targets" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", np.zeros(5))
    assert main(["denoise", *common[:-1], str(tmp_path / "short.npy"), "--out", str(out)]) == 2
    assert "N = 80 rows" in capsys.readouterr().err


def test_analyze_with_noisy_targets_shows_sigma_hat_in_the_report(regression, tmp_path):
    model, x, y, common = regression
    expected = nnsim.Similarity(model, progress=False).denoising(x, targets=y, method="linearized")
    out = tmp_path / "an"
    assert main(["analyze", *common, "--out", str(out), "-k", "3", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_noise"]["sigma_hat"] == pytest.approx(expected.noise_std, rel=1e-4)
    assert summary["label_noise"]["untrusted_samples"] == int(expected.ill_conditioned.sum())
    html = (out / "report.html").read_text()
    assert "\u03c3\u0302 = " in html and "How well this was validated" in html
    rows = list(csv.DictReader(open(out / "samples.csv")))
    np.testing.assert_allclose([float(r["predicted_error"]) for r in rows], expected.predicted_error.numpy(),
                               rtol=1e-4)
