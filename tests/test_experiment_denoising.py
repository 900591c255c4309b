"""The denoising experiment's quick run: the validated effects, and resuming from finished cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnsim.experiments import denoising as exp


def test_quick_run_reproduces_the_validated_effects(tmp_path):
    logs: list[str] = []
    res = exp.run(tmp_path, quick=True, log=logs.append)
    c = res["cases"]["quick_1d"]
    ridge, paper = c["methods"]["linearized_ridge"], c["methods"]["paper_true_sigma"]
    # Measured on this seeded run (docs/experiments/denoising.md): the network denoises ~3.2x (error 0.32 sigma),
    # the linearized estimate is calibrated (0.84) with sigma_hat/sigma = 0.94 and Spearman 0.66, the paper's
    # factor is ~2.5x too optimistic (0.39).
    assert c["error_vs_truth_over_sigma"] < 0.5
    assert 0.7 <= ridge["calibration"] <= 1.4
    assert 0.85 <= c["sigma_hat_over_sigma"]["ridge"] <= 1.15
    assert paper["calibration"] < 0.6 < ridge["calibration"]
    assert ridge["spearman"] > 0.3
    assert all((tmp_path / f).exists() for f in ("results.json", "denoising_calibration.png", "denoising_effect.png",
                                                 "denoising_summary.png", "cases/quick_1d.json"))
    assert all(r["pred_rel_error_rms"] < 0.05 for r in res["scale"]["nystroem_vs_exact"])
    # The actual error is recomputed from the stored networks' outputs: RMS over draws of f_noisy - f_clean.
    case = json.loads((tmp_path / "cases" / "quick_1d.json").read_text())
    actual = np.sqrt(((np.array(case["f_draws"]) - np.array(case["f_clean"])) ** 2).mean(0))
    np.testing.assert_allclose(actual, case["per_sample_actual"])
    assert len(case["f_draws"]) >= 6
    # The ranking next to the reliability of the 6-draw actual error: the ceiling is sqrt(Spearman-Brown) of the
    # mean split-half, the disattenuated Spearman divides by sqrt(rel_actual rel_pred), rel_pred measured from
    # the stored per-draw predictions.
    r = c["reliability"]
    assert r["draws"] == 6 and r["ceiling"] == pytest.approx(max(2 * r["split_half"] / (1 + r["split_half"]), 0) ** .5)
    lin = r["methods"]["linearized_ridge"]
    assert lin["rel_pred_measured"] and lin["spearman"] == pytest.approx(ridge["spearman"])
    assert lin["disattenuated"] == pytest.approx(lin["spearman"] / (r["rel_actual"] * lin["rel_pred"]) ** 0.5)
    assert "| quick_1d | 6 |" in (tmp_path / "ranking_table.md").read_text()
    # Without shared noise: the prediction of draws 0-2 against the actual of draws 3-5 and back, and one draw's
    # prediction against the other five draws' actual (recomputed here from the stored per-draw data).
    scores = (np.array(case["f_draws"]) - np.array(case["f_clean"])) ** 2
    pred = np.array(case["per_draw_pred"]["linearized_ridge"]) ** 2
    halves = lin["cross_fitted_halves"]
    assert halves["a_to_b"] == pytest.approx(exp.spearman(pred[:3].mean(0), scores[3:].mean(0)))
    assert halves["b_to_a"] == pytest.approx(exp.spearman(pred[3:].mean(0), scores[:3].mean(0)))
    assert lin["leave_one_out"]["per_draw"][4] == pytest.approx(exp.spearman(pred[4], np.delete(scores, 4, 0).mean(0)))
    assert "cross-fitted halves" in (tmp_path / "ranking_table.md").read_text()
    # One network's label-free variants: the retrained draw is the stored network (bitwise) and its raw prediction
    # the stored one; every variant is a positive [N] profile, compared with the other draws' actual error.
    probe = exp.single_network_probe(exp.QUICK_GRID[0], [1], tmp_path / "cases" / "quick_1d.parts", neighbours=(5,))
    assert probe["f_bitwise"] == [True] and probe["raw_max_rel_diff"][0] < 1e-9
    assert set(probe["variants"]) == {"raw", "smooth_S2", "smooth_ntk5", "checkpoints"}
    assert all(np.all(np.array(v) > 0) and np.shape(v) == (1, exp.QUICK_GRID[0].n) for v in probe["variants"].values())
    single = exp.compare_single(probe, case)
    assert single["raw"]["per_draw"][0] == pytest.approx(lin["leave_one_out"]["per_draw"][1])
    assert single["raw"]["gain_over_raw_mean"] == 0 and "oracle_x_h0.1" in single
    # The per-draw offset check: the offset is the draw's mean deviation; for this nearly linear network it
    # follows the noise's own mean (eps regenerated from run_case's seeds), and centring removes it.
    off = exp.offset_check(case)
    dev = np.array(case["f_draws"]) - np.array(case["f_clean"])
    assert off["offset_rms"] == pytest.approx(np.sqrt((dev.mean(1) ** 2).mean()))
    assert off["offset_vs_noise_mean_corr"] > 0.8 and off["excess_offset_rms"] < off["noise_mean_rms"]
    assert off["raw"]["cross_fitted_halves"] == pytest.approx(halves["mean"])
    # The initial-kernel smoother (shared by all draws) against the trained one: same scoring as above.
    k0 = exp.init_kernel_check(case)
    assert k0["trained_kernel"]["one_network"] == pytest.approx(lin["leave_one_out"]["mean"])
    assert -1 <= k0["init_kernel"]["one_network"] <= 1 and k0["init_kernel"]["calibration"] > 0
    # The parametric bootstrap retrains the protocol's own draw (same seeds: the same network) and, for these
    # nearly linear networks, its RMS matches the linearized prediction of the same network.
    boot = exp.bootstrap_prediction(exp.QUICK_GRID[0], draw=1, replicates=3)
    np.testing.assert_allclose(boot["f"], case["f_draws"][1], rtol=0, atol=1e-12)
    ratio = np.sqrt(np.mean(np.square(boot["bootstrap"])) / np.mean(np.square(boot["linearized"])))
    assert 0.7 < ratio < 1.4 and np.array(boot["scores"]).shape == (3, exp.QUICK_GRID[0].n)
    cmp = exp.compare_bootstrap(boot, case)
    assert cmp["linearized_one_network"]["rel_pred"] == 1.0 and cmp["bootstrap"]["rel_pred"] < 1  # measured
    assert -1 <= cmp["bootstrap"]["spearman"] <= 1 and cmp["draws"] == 6
    with pytest.raises(ValueError, match="not draw 2"):
        exp.compare_bootstrap({**boot, "draw": 2}, case)
    # Resuming: a second run reuses the finished case instead of training again.
    logs.clear()
    again = exp.run(tmp_path, quick=True, log=logs.append)
    assert any("reused" in line for line in logs)
    assert again["cases"]["quick_1d"]["methods"] == res["cases"]["quick_1d"]["methods"]
    # An unfinished case is assembled from its finished draws (draw by draw parts), and says how many.
    (tmp_path / "cases" / "quick_1d.json").unlink()
    (tmp_path / "cases" / "quick_1d.parts" / "draw5.npz").unlink()
    partial = exp.run(tmp_path, quick=True, log=logs.append, assemble=True)
    assert partial["partial"] == {"quick_1d": 5} and partial["cases"]["quick_1d"]["draws_used"] == 5
    five = np.array(case["f_draws"][:5]) - np.array(case["f_clean"])
    np.testing.assert_allclose(partial["cases"]["quick_1d"]["actual_rms_over_sigma"],
                               np.sqrt((five**2).mean()) / exp.QUICK_GRID[0].sigma)


def test_clean_twin_shares_the_initialisation():
    case = exp.QUICK_GRID[0]
    a, b = exp.make_model(case), exp.make_model(case)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x, clean = exp.make_data(case)
    assert x.shape == (case.n, 1) and torch.allclose(clean[:, 0], torch.sin(torch.pi * x[:, 0]))


def test_alignment_diagnostic_finds_the_networks_noise_response_linear():
    """On the quick case the fitted smoother applied to the draw's actual noise reproduces f_noisy - f_clean."""
    (row,) = exp.diagnose_alignment(exp.QUICK_GRID[0], draws=1)
    assert 0.8 < row["S_eps_over_actual"] < 1.25 and 0.8 < row["coef"] < 1.25
    assert row["A"] > 0 and 0 < row["B"] and row["dof"] > 1
    assert 0.5 < row["realized_over_actual"] < 2 and 0.5 < row["linearized_over_actual"] < 2
    # the jitter probe at the case's own noise level, draw 0: the same linear response
    (jit,) = exp.jitter_probe(exp.QUICK_GRID[0], (exp.QUICK_GRID[0].sigma,), draws=1)["rows"]
    assert jit["slope"] == pytest.approx(row["coef"]) and jit["corr"] > 0.9 and jit["residual_over_rms"] < 0.5
    assert jit["rms_over_scale"] == pytest.approx(row["actual_rms"] / exp.QUICK_GRID[0].sigma)
