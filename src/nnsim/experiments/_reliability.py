"""How precisely does a noise-draw protocol measure the per-sample error it ranks against? (issue 12)

The actual noise-induced error of sample i is measured as the RMS over ``k`` noise draws of f_k,i - f_clean,i:
a noisy measurement of the expected error. Classical test theory bounds what any ranking can reach against
it. With ``r_half`` the correlation between the errors measured on two disjoint halves of the draws, the
reliability of the full k-draw measurement is the Spearman-Brown value ``rel = 2 r_half / (1 + r_half)``;
a predictor that knew the expected error exactly would correlate with the measurement at about
``ceiling = sqrt(rel)``, and a measured correlation rho corresponds to ``rho / sqrt(rel_actual rel_pred)``
against the expected error (Spearman's correction for attenuation; rel_pred = 1 for a deterministic
prediction, otherwise the prediction's own split-half reliability over the draws it is averaged over).

The formulas are Pearson's; applied to Spearman correlations they hold to about 0.02 for roughly normal
scores (tested on a constructed case of known reliability). They assume measurement errors independent
across samples and of the prediction's errors; ``cross_fitted`` (prediction from one half of the draws
against the actual error from the other half) checks the second assumption on the data.

Every function takes per-draw, per-sample **scores** [draws, N] whose mean over draws is the measured
quantity (squared deviations: their mean is the squared RMS, which ranks the same as the RMS).
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two [N] vectors (continuous data: ties are not averaged)."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman_brown(r: float, factor: float = 2.0) -> float:
    """Reliability of a measurement ``factor`` times as long as one of reliability ``r``: f r / (1 + (f - 1) r)."""
    return factor * r / (1 + (factor - 1) * r)


def ceiling(rel: float) -> float:
    """The correlation a perfect predictor reaches against a measurement of reliability ``rel``: sqrt(rel)
    (0 for a reliability <= 0, i.e. a measurement that is all noise)."""
    return math.sqrt(rel) if rel > 0 else 0.0


def disattenuated(rho: float, rel_actual: float, rel_pred: float = 1.0) -> float:
    """Spearman's correction for attenuation, rho / sqrt(rel_actual rel_pred); NaN if a reliability is <= 0.
    Values above 1 mean that a reliability was under-estimated (it is itself a noisy estimate)."""
    if rel_actual <= 0 or rel_pred <= 0:
        return float("nan")
    return rho / math.sqrt(rel_actual * rel_pred)


def half_splits(draws: int, splits: int = 200, seed: int = 0) -> list[np.ndarray]:
    """Index sets of the first half of balanced splits of ``draws`` draws (the second half is the rest): every
    distinct split when there are at most ``splits`` of them, otherwise ``splits`` seeded random ones. The
    first is always draws 0 ... draws//2 - 1 (the split the experiments reported before)."""
    if draws < 2:
        raise ValueError(f"a split-half reliability needs at least 2 draws, got {draws}")
    h = draws // 2
    first = np.arange(h)
    if math.comb(draws, h) // (2 if 2 * h == draws else 1) <= splits:
        # each split once: for even draws {A, B} and {B, A} are the same split, keep the one containing draw 0
        out = [np.array(c) for c in itertools.combinations(range(draws), h) if 2 * h != draws or 0 in c]
    else:
        rng = np.random.default_rng(seed)
        out = [np.sort(rng.permutation(draws)[:h]) for _ in range(splits - 1)]
        out.insert(0, first)
    return out


def _halves(scores: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(len(scores), bool)
    mask[idx] = True
    return scores[mask].mean(0), scores[~mask].mean(0)


def split_half(scores: np.ndarray, splits: int = 200, seed: int = 0) -> dict[str, float]:
    """Split-half reliability of ``scores.mean(0)`` (scores [draws, N]): the Spearman correlation between the
    means over the two halves, for the first-vs-second-half split (``first``) and averaged over many splits
    (``mean``, its spread over the splits ``sd``; the splits share draws, so ``sd`` understates the
    uncertainty), the Spearman-Brown reliability of the full measurement from the mean (``reliability``) and
    the ceiling sqrt(reliability)."""
    scores = np.asarray(scores, dtype=np.float64)
    rs = [spearman(*_halves(scores, idx)) for idx in half_splits(len(scores), splits, seed)]
    rel = spearman_brown(float(np.mean(rs)))
    return {"first": rs[0], "mean": float(np.mean(rs)), "sd": float(np.std(rs)), "splits": len(rs),
            "reliability": rel, "ceiling": ceiling(rel)}


def ranking_reliability(actual_scores: np.ndarray, predicted: np.ndarray, pred_scores: np.ndarray | None = None,
                        splits: int = 200, seed: int = 0, block: int = 6) -> dict:
    """The Spearman of a prediction against the k-draw actual error, next to what the measurement allows.

    actual_scores: [draws, N] per-draw squared deviations; predicted: [N] the prediction ranked (e.g. the RMS
    over draws of per-draw predictions); pred_scores: [draws, N] the per-draw squared predictions when the
    prediction is itself averaged over the same draws (None: a deterministic prediction, rel_pred = 1).

    Returns ``spearman`` (against the mean over all draws), ``rel_actual`` and ``ceiling`` (Spearman-Brown
    from the mean split-half), ``rel_pred``, ``disattenuated``; with pred_scores also ``same_half`` and
    ``cross_fitted`` (mean over splits of Spearman(prediction of half A, actual of half A / of half B): equal
    when the prediction's draw-to-draw noise is independent of the actual error's; when same_half is larger,
    the prediction sees part of the draws' own measurement noise and ``disattenuated`` overshoots) and
    ``cross_fitted_disattenuated`` (cross_fitted / sqrt(split-half of the actual x split-half of the
    prediction): the ranking against the expected error with no shared noise); with at least 2 * block
    draws, ``blocks``: the Spearman against each disjoint ``block``-draw subset, with the prediction of the same
    subset when pred_scores is given (what a ``block``-draw protocol would have measured).
    """
    actual_scores = np.asarray(actual_scores, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    sh = split_half(actual_scores, splits, seed)
    out: dict = {"draws": len(actual_scores), "split_half_first": sh["first"], "split_half": sh["mean"],
                 "split_half_sd": sh["sd"], "rel_actual": sh["reliability"], "ceiling": sh["ceiling"],
                 "spearman": spearman(predicted, actual_scores.mean(0))}
    rel_pred = 1.0
    if pred_scores is not None:
        pred_scores = np.asarray(pred_scores, dtype=np.float64)
        if pred_scores.shape != actual_scores.shape:
            raise ValueError(f"pred_scores {pred_scores.shape} must have the shape of actual_scores "
                             f"{actual_scores.shape}: one prediction per draw and sample")
        sh_pred = split_half(pred_scores, splits, seed)
        rel_pred = sh_pred["reliability"]
        same, cross = [], []
        for idx in half_splits(len(actual_scores), splits, seed):
            pa, pb = _halves(pred_scores, idx)
            aa, ab = _halves(actual_scores, idx)
            same += [spearman(pa, aa), spearman(pb, ab)]
            cross += [spearman(pa, ab), spearman(pb, aa)]
        out["same_half"], out["cross_fitted"] = float(np.mean(same)), float(np.mean(cross))
        # Against the expected error without shared draw noise: the cross-fitted Spearman corrected by the
        # half-length reliabilities (the split-half correlations themselves).
        out["cross_fitted_disattenuated"] = disattenuated(out["cross_fitted"], sh["mean"], sh_pred["mean"])
    out["rel_pred"] = rel_pred
    out["disattenuated"] = disattenuated(out["spearman"], sh["reliability"], rel_pred)
    if len(actual_scores) >= 2 * block:
        starts = range(0, len(actual_scores) - block + 1, block)
        out["blocks"] = [spearman(predicted if pred_scores is None else pred_scores[b:b + block].mean(0),
                                  actual_scores[b:b + block].mean(0)) for b in starts]
    return out


def cross_fitted_halves(actual_scores: np.ndarray, pred_scores: np.ndarray) -> dict[str, float]:
    """The ranking without shared draw noise at full half-length, on the fixed split draws 0 ... k/2 - 1 (A)
    against the rest (B): Spearman(prediction of A, actual of B) and the reverse (``a_to_b``, ``b_to_a``,
    their ``mean``), next to the same-half Spearmans (``same``: mean of A vs A and B vs B).

    Each half-length mean is a measurement of reliability r_half (the split-half correlation of this split:
    ``split_half_actual``, ``split_half_pred``), so a perfect predictor reaches ``ceiling`` = sqrt(r_half of
    the actual) against the half-length actual, and ``disattenuated`` = mean / sqrt(r_half actual x r_half
    pred) is the ranking of the expected prediction against the expected error (no shared noise in it).
    actual_scores, pred_scores: [draws, N] per-draw squared deviations / squared predictions."""
    actual_scores = np.asarray(actual_scores, dtype=np.float64)
    pred_scores = np.asarray(pred_scores, dtype=np.float64)
    if pred_scores.shape != actual_scores.shape or len(actual_scores) < 2:
        raise ValueError(f"pred_scores {pred_scores.shape} and actual_scores {actual_scores.shape} must have the same "
                         "shape [draws >= 2, N]: one prediction per draw and sample")
    first = np.arange(len(actual_scores) // 2)
    pa, pb = _halves(pred_scores, first)
    aa, ab = _halves(actual_scores, first)
    out = {"draws": len(actual_scores), "half": len(first), "a_to_b": spearman(pa, ab), "b_to_a": spearman(pb, aa),
           "same": (spearman(pa, aa) + spearman(pb, ab)) / 2, "split_half_actual": spearman(aa, ab),
           "split_half_pred": spearman(pa, pb)}
    out["mean"] = (out["a_to_b"] + out["b_to_a"]) / 2
    out["ceiling"] = ceiling(out["split_half_actual"])
    out["disattenuated"] = disattenuated(out["mean"], out["split_half_actual"], out["split_half_pred"])
    return out


def leave_one_out(actual_scores: np.ndarray, pred_scores: np.ndarray) -> dict:
    """What one network's prediction ranks: for every draw k, Spearman(prediction of draw k alone, actual error
    from the other draws), so that no draw noise is shared (``per_draw`` [draws], its ``mean``, ``sd``, ``min``,
    ``max``).

    ``ceiling``: what a perfect predictor reaches against a (draws - 1)-draw actual, sqrt of the Spearman-Brown
    extension of the mean split-half to draws - 1 draws; ``rel_single``: one draw's prediction's reliability
    (the mean split-half of the predictions shortened to 1 draw, Spearman-Brown backwards); ``disattenuated``:
    mean / sqrt(rel_actual(draws - 1) x rel_single), the single prediction's *expected* profile against the
    expected error; the gap between ``mean`` and what the expected profile reaches is a single prediction's own
    noise."""
    actual_scores = np.asarray(actual_scores, dtype=np.float64)
    pred_scores = np.asarray(pred_scores, dtype=np.float64)
    if pred_scores.shape != actual_scores.shape or len(actual_scores) < 4:
        raise ValueError(f"pred_scores {pred_scores.shape} and actual_scores {actual_scores.shape} must have the same "
                         "shape [draws >= 4, N]: one prediction per draw and sample")
    d = len(actual_scores)
    total = actual_scores.sum(0)
    rs = np.array([spearman(pred_scores[k], (total - actual_scores[k]) / (d - 1)) for k in range(d)])
    half = d // 2
    rel_actual = spearman_brown(split_half(actual_scores)["mean"], (d - 1) / half)
    rel_single = spearman_brown(split_half(pred_scores)["mean"], 1 / half)
    return {"draws": d, "per_draw": rs.tolist(), "mean": float(rs.mean()), "sd": float(rs.std()),
            "min": float(rs.min()), "max": float(rs.max()), "rel_actual": rel_actual, "ceiling": ceiling(rel_actual),
            "rel_single": rel_single, "disattenuated": disattenuated(float(rs.mean()), rel_actual, rel_single)}
