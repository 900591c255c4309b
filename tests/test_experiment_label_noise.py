"""The label-noise experiment: the flipping, the scores' plumbing against brute force, and the quick run."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch

from nnsim.experiments import label_noise

torch.set_num_threads(1)


def test_flip_labels_flips_exactly_the_fraction_to_other_classes():
    y = torch.arange(1000) % 10
    noisy, mask = label_noise.flip_labels(y, 0.2, 10, seed=3)
    assert int(mask.sum()) == 200
    assert torch.all(noisy[mask] != y[mask]) and torch.all(noisy[~mask] == y[~mask])
    assert set(noisy[mask].tolist()) == set(range(10))  # flips go to every class
    again, mask2 = label_noise.flip_labels(y, 0.2, 10, seed=3)
    assert torch.equal(again, noisy) and torch.equal(mask2, mask)


def test_knn_disagreement_written_out():
    ref = torch.tensor([0, 1, 1, 2])
    idx = torch.tensor([[1, 2, 3], [0, 0, 0]])
    got = label_noise.knn_disagreement(idx, ref, torch.tensor([1, 0]))
    np.testing.assert_allclose(got, [1 / 3, 0.0])


def test_auroc_direction_and_nan():
    flipped = np.array([True, False, False, True])
    assert label_noise.auroc(flipped, np.array([0.9, 0.1, 0.2, 0.8])) == 1.0
    assert label_noise.auroc(flipped, np.array([np.nan, 0.1, 0.2, 0.8])) == 0.5  # NaN = least suspicious


def test_neighbors_score_matches_brute_force_cosines():
    """The k nearest training images used by the kNN score are those of explicit gradient cosines."""
    from oracles import jacobian

    import nnsim

    torch.manual_seed(0)
    model = label_noise.make_model().double().eval()
    x = torch.rand(30, 1, 28, 28, dtype=torch.float64)
    out = nnsim.outputs.log_softmax_mask("predicted")
    sim = nnsim.Similarity(model, output=out, progress=False)
    vals, idx = sim.neighbors(x[:5], x[5:], k=4)
    G = jacobian(model, (x,), output=out)[:, 0, :]
    Gn = G / G.norm(dim=1, keepdim=True)
    cos = Gn[:5] @ Gn[5:].T
    want_vals, want_idx = cos.topk(4, dim=1)
    torch.testing.assert_close(vals, want_vals, atol=1e-10, rtol=1e-10)
    assert torch.equal(idx, want_idx)


def test_quick_run_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "nnsim.experiments.label_noise", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for name in ("roc.png", "scores.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    q = label_noise.QUICK
    assert res["data"]["flipped"] == round(q.n * q.flip_fraction)
    assert set(res["auroc"]) == set(label_noise.DIRECTION)
    assert all(0.0 <= v <= 1.0 for v in res["auroc"].values())
    cl = res["cleanlab_find_label_issues"]
    assert 0 <= cl["true_positives"] <= cl["flagged"] and 0 <= cl["precision"] <= 1 and 0 <= cl["recall"] <= 1
    # Even a 3-epoch CNN's out-of-sample confidence in the given label separates flipped labels well
    # (a flipped label is one the model, trained on the other 80 % clean labels, does not predict).
    assert res["auroc"]["cleanlab_self_confidence"] > 0.75
    assert res["auroc"]["knn_disagreement_oos"] > 0.7
