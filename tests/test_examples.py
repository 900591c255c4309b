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
    check_quick_results(json.loads((tmp_path / "results.json").read_text()))


def check_quick_results(results: dict) -> None:
    """Effects the seeded quick run (1000 images, 2 epochs) shows, each false for a broken pipeline."""
    model, nb, dn, de = results["model"], results["neighbors"], results["denoising"], results["density"]
    # The CNN learnt something (0.65 measured; chance is 0.10).
    assert 0.5 < model["test_accuracy"] <= 1.0
    # The network's neighbours share its prediction: for misclassified queries far more often than the true
    # label (0.52 vs 0.21 measured); random or mis-indexed neighbours would give about 0.1 for both.
    assert nb["misclassified_queries"] > 0
    assert nb["misclassified_queries_neighbor_label_equals_prediction"] > \
        1.5 * nb["misclassified_queries_neighbor_label_equals_true_label"]
    assert nb["neighbor_label_equals_query_prediction"] > 0.5
    # Similarities are cosines (d = 1): at most 1, sorted, the best neighbour above the k-th.
    assert nb["topk_similarity_median"] <= nb["top1_similarity_median"] <= 1 + 1e-6
    # Denoising: the consistency |yhat - e| is the distance to the kernel-weighted mean prediction, which with
    # ~280 of 300 effective neighbours is close to the plain mean (Spearman 0.90 measured).
    assert 1 <= dn["effective_neighbors_p10"] <= dn["effective_neighbors_median"] <= dn["effective_neighbors_p90"]
    assert dn["effective_neighbors_p90"] <= dn["n"]
    assert dn["spearman_consistency_vs_distance_to_mean_prediction"] > 0.6
    # Soft density of d = 10 normalised similarities, self included: mean_over_n = mean / N.
    assert abs(de["mean_over_n"] - de["mean"] / de["n"]) < 1e-3
    assert de["min"] <= de["mean"] <= de["max"] <= de["n"]
