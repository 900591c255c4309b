"""The reliability ceiling of a ranking against a k-draw measurement, on constructed cases of known reliability."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nnsim.experiments import _reliability as rel


def _measured(n: int, draws: int, reliability: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """True values t ~ N(0, 1) and per-draw scores t + e, e ~ N(0, v), v chosen so that the mean over ``draws``
    has the given (Pearson) reliability var t / (var t + v / draws)."""
    rng = np.random.default_rng(seed)
    t = rng.standard_normal(n)
    v = draws * (1 / reliability - 1)
    return t, t + math.sqrt(v) * rng.standard_normal((draws, n))


def _spearman_of_normal(pearson: float) -> float:
    """Spearman of a bivariate normal with Pearson correlation ``pearson`` (the written-out formula)."""
    return 6 / math.pi * math.asin(pearson / 2)


@pytest.mark.parametrize("draws,reliability", [(6, 0.3), (6, 0.6), (24, 0.5)])
def test_ceiling_is_the_perfect_predictors_spearman(draws, reliability):
    t, scores = _measured(4000, draws, reliability, seed=draws)
    sh = rel.split_half(scores)
    # each half has reliability r2 = R / (2 - R) (Spearman-Brown backwards): the split-half correlation
    half = reliability / (2 - reliability)
    assert sh["mean"] == pytest.approx(_spearman_of_normal(half), abs=0.03)
    assert sh["reliability"] == pytest.approx(reliability, abs=0.05)
    # a predictor that knows t exactly reaches the ceiling, and its disattenuated Spearman is ~1
    rep = rel.ranking_reliability(scores, t)
    assert rep["spearman"] == pytest.approx(rep["ceiling"], abs=0.03)
    assert rep["spearman"] == pytest.approx(_spearman_of_normal(math.sqrt(reliability)), abs=0.03)
    assert rep["disattenuated"] == pytest.approx(1.0, abs=0.05)
    assert rep["rel_pred"] == 1.0


def test_noisy_prediction_is_disattenuated_by_its_own_reliability():
    """A prediction averaged over the same draws, with draw noise independent of the actual error's: its own
    split-half reliability corrects it back to ~1, and cross-fitted equals same-half."""
    t, scores = _measured(4000, 6, 0.5, seed=1)
    rng = np.random.default_rng(7)
    pred_scores = t + math.sqrt(6 * (1 / 0.7 - 1)) * rng.standard_normal((6, 4000))  # reliability 0.7
    rep = rel.ranking_reliability(scores, pred_scores.mean(0), pred_scores)
    assert rep["rel_pred"] == pytest.approx(0.7, abs=0.05)
    assert rep["disattenuated"] == pytest.approx(1.0, abs=0.06)
    assert rep["same_half"] == pytest.approx(rep["cross_fitted"], abs=0.03)
    assert rep["cross_fitted_disattenuated"] == pytest.approx(1.0, abs=0.08)


def test_cross_fitting_detects_noise_shared_by_prediction_and_measurement():
    """If the prediction of a draw sees that draw's measurement noise, same-half beats cross-fitted."""
    t, scores = _measured(3000, 6, 0.4, seed=2)
    rng = np.random.default_rng(3)
    pred_scores = 0.5 * scores + 0.5 * (t + rng.standard_normal((6, 3000)))
    rep = rel.ranking_reliability(scores, pred_scores.mean(0), pred_scores)
    assert rep["same_half"] > rep["cross_fitted"] + 0.1
    # the shared noise inflates the plain disattenuation, not the cross-fitted one (this predictor is half noise)
    assert rep["disattenuated"] > rep["cross_fitted_disattenuated"] + 0.1


def test_formulas_and_splits():
    assert rel.spearman_brown(1 / 3) == pytest.approx(0.5)
    assert rel.spearman_brown(0.5, factor=3) == pytest.approx(0.75)
    assert rel.ceiling(0.25) == 0.5 and rel.ceiling(-0.1) == 0.0
    assert rel.disattenuated(0.3, 0.36) == pytest.approx(0.5) and math.isnan(rel.disattenuated(0.3, 0.0))
    splits = rel.half_splits(6)
    assert len(splits) == 10 and all(0 in s for s in splits) and list(splits[0]) == [0, 1, 2]
    assert len({tuple(s) for s in splits}) == 10
    assert len(rel.half_splits(7)) == 35  # C(7, 3): unequal halves are all distinct
    big = rel.half_splits(24, splits=50)
    assert len(big) == 50 and list(big[0]) == list(range(12)) and all(len(s) == 12 for s in big)
    with pytest.raises(ValueError, match="at least 2 draws"):
        rel.half_splits(1)
    t, scores = _measured(100, 12, 0.5, seed=0)
    rep = rel.ranking_reliability(scores, t, scores)
    assert len(rep["blocks"]) == 2
    with pytest.raises(ValueError, match="one prediction per draw"):
        rel.ranking_reliability(scores, t, scores[:6])


def _noisy(t: np.ndarray, draws: int, reliability: float, seed: int) -> np.ndarray:
    """Per-draw scores t + e whose mean over ``draws`` has the given reliability (e independent of t)."""
    rng = np.random.default_rng(seed)
    return t + math.sqrt(draws * (1 / reliability - 1)) * rng.standard_normal((draws, len(t)))


def test_full_length_cross_fit_matches_the_written_out_spearman():
    """Prediction of draws 0-11 against the actual of draws 12-23 and back: the Spearman of a bivariate normal
    whose correlation is sqrt(half-length reliability of the actual x of the prediction)."""
    t, scores = _measured(4000, 24, 0.6, seed=4)
    pred_scores = _noisy(t, 24, 0.8, seed=5)
    rep = rel.cross_fitted_halves(scores, pred_scores)
    half_a, half_p = 0.6 / (2 - 0.6), 0.8 / (2 - 0.8)  # Spearman-Brown backwards to 12 draws
    assert rep["half"] == 12 and rep["draws"] == 24
    assert rep["mean"] == pytest.approx(_spearman_of_normal(math.sqrt(half_a * half_p)), abs=0.03)
    assert rep["a_to_b"] == pytest.approx(rep["b_to_a"], abs=0.05)
    assert rep["same"] == pytest.approx(rep["mean"], abs=0.03)  # no shared noise: same half = cross-fitted
    assert rep["split_half_actual"] == pytest.approx(_spearman_of_normal(half_a), abs=0.03)
    assert rep["ceiling"] == pytest.approx(_spearman_of_normal(math.sqrt(half_a)), abs=0.03)
    assert rep["disattenuated"] == pytest.approx(1.0, abs=0.06)
    # a prediction that shares each draw's measurement noise ranks better on its own half only
    shared = 0.5 * scores + 0.5 * _noisy(t, 24, 0.8, seed=6)
    rep = rel.cross_fitted_halves(scores, shared)
    assert rep["same"] > rep["mean"] + 0.1
    with pytest.raises(ValueError, match="one prediction per draw"):
        rel.cross_fitted_halves(scores, pred_scores[:12])


def test_leave_one_out_is_one_draws_prediction_against_the_others():
    t, scores = _measured(3000, 24, 0.6, seed=8)
    pred_scores = _noisy(t, 24, 0.9, seed=9)  # one draw alone: reliability 0.9 / (24 - 23 * 0.9) = 0.27
    rep = rel.leave_one_out(scores, pred_scores)
    rel_23 = rel.spearman_brown(0.6, 23 / 24)
    rel_1 = rel.spearman_brown(0.9, 1 / 24)
    assert rep["rel_actual"] == pytest.approx(rel_23, abs=0.05)
    assert rep["rel_single"] == pytest.approx(rel_1, abs=0.04)
    assert rep["mean"] == pytest.approx(_spearman_of_normal(math.sqrt(rel_23 * rel_1)), abs=0.03)
    assert rep["disattenuated"] == pytest.approx(1.0, abs=0.1)
    # per draw: exactly the Spearman against the mean of the other 23 draws
    k = 5
    assert rep["per_draw"][k] == pytest.approx(rel.spearman(pred_scores[k], np.delete(scores, k, 0).mean(0)))
    assert len(rep["per_draw"]) == 24 and rep["min"] <= rep["mean"] <= rep["max"]
    with pytest.raises(ValueError, match="draws >= 4"):
        rel.leave_one_out(scores[:3], pred_scores[:3])
