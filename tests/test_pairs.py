"""nnsim.pairs: properties every pair builder must satisfy, and its errors."""

from __future__ import annotations

import pytest
import torch

import nnsim
from nnsim import pairs

torch.set_num_threads(1)


def test_same_label_all_pairs_properties():
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    p = pairs.same_label(labels)
    assert p.dtype == torch.long and p.shape[1] == 2
    assert (labels[p[:, 0]] == labels[p[:, 1]]).all()
    assert (p[:, 0] < p[:, 1]).all()  # no self pairs, each unordered pair once
    # Count: sum over labels of n_c choose 2 = 3 (label 0) + 1 (label 1).
    assert p.shape[0] == 4
    assert {tuple(r) for r in p.tolist()} == {(0, 2), (0, 5), (2, 5), (1, 4)}


def test_same_label_sampling():
    labels = torch.randint(0, 5, (40,), generator=torch.Generator().manual_seed(0))
    allp = {tuple(r) for r in pairs.same_label(labels).tolist()}
    g = torch.Generator().manual_seed(1)
    p = pairs.same_label(labels, 25, generator=g)
    assert p.shape == (25, 2)
    assert len({tuple(r) for r in p.tolist()}) == 25  # without replacement: distinct
    assert {tuple(r) for r in p.tolist()} <= allp
    q = pairs.same_label(labels, 25, generator=torch.Generator().manual_seed(1))
    assert torch.equal(p, q)  # seeded
    many = pairs.same_label(labels, 10 * len(allp), generator=g, replacement=True)
    assert many.shape[0] == 10 * len(allp) and {tuple(r) for r in many.tolist()} <= allp
    with pytest.raises(nnsim.InputError, match="replacement=True"):
        pairs.same_label(labels, len(allp) + 1)


def test_augmented_pairs_index_the_copies():
    x = torch.randn(5, 3)
    both, p = pairs.augmented(x, lambda t: 2 * t + 1)
    assert both.shape == (10, 3)
    assert torch.equal(p, torch.stack([torch.arange(5), torch.arange(5, 10)], 1))
    assert torch.equal(both[p[:, 1]], 2 * both[p[:, 0]] + 1)
    assert torch.equal(both[:5], x)
    # Multi-input models: a tuple in, a tuple out, the transform gets the tensors as arguments.
    y = torch.randn(5, 2)
    (bx, by), p2 = pairs.augmented((x, y), lambda a, b: (a.flip(1), -b))
    assert torch.equal(bx[p2[:, 1]], x.flip(1)) and torch.equal(by[p2[:, 1]], -y)
    with pytest.raises(nnsim.InputError, match="shapes"):
        pairs.augmented(x, lambda t: t[:, :2])
    with pytest.raises(nnsim.InputError, match="empty"):
        pairs.augmented(x[:0], lambda t: t)


def test_augmented_pairs_feed_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    both, p = pairs.augmented(torch.randn(6, 3), lambda t: t + 0.01 * torch.randn_like(t))
    loss = nnsim.SimilarityLoss(model)(both, p)
    assert 0 <= float(loss.detach()) < 0.05  # near-identical inputs are near-identical for the network


def test_sample_same_class_is_the_authors_sampler():
    labels = torch.tensor([0] * 5 + [1] * 50 + [2] * 20)[torch.randperm(75, generator=torch.Generator().manual_seed(3))]
    idx = pairs.sample_same_class(labels, 6000, generator=torch.Generator().manual_seed(0), num_classes=3)
    assert idx.shape == (6000, 2) and idx.dtype == torch.long
    assert (labels[idx[:, 0]] == labels[idx[:, 1]]).all()
    # The class is uniform (not proportional to its size): each about 1/3.
    freq = torch.bincount(labels[idx[:, 0]], minlength=3).float() / 6000
    assert (freq - 1 / 3).abs().max() < 0.03
    # Within a class the images are uniform, with replacement: every image of class 0 shows up, and
    # (1/5 of the time) both images of a class-0 pair are the same one.
    c0 = idx[labels[idx[:, 0]] == 0]
    assert set(c0.flatten().tolist()) == set(torch.nonzero(labels == 0).flatten().tolist())
    same = (c0[:, 0] == c0[:, 1]).float().mean()
    assert abs(float(same) - 0.2) < 0.05
    with pytest.raises(nnsim.InputError, match=r"lack classes \[3\]"):
        pairs.sample_same_class(labels, 2, num_classes=4)


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0.0, 1.0]), "integer"),
    (torch.tensor([[0, 1]]), "one-dimensional"),
    (torch.tensor([], dtype=torch.long), "empty"),
    (torch.tensor([0, 1, 2]), "no two rows share a label"),
])
def test_same_label_bad_labels(labels, match):
    with pytest.raises(nnsim.InputError, match=match):
        pairs.same_label(labels)


def test_bad_counts_and_check():
    with pytest.raises(nnsim.InputError, match="n_pairs"):
        pairs.same_label(torch.tensor([0, 0]), 0)
    with pytest.raises(nnsim.InputError, match="n_pairs"):
        pairs.sample_same_class(torch.tensor([0, 0]), -1)
    assert torch.equal(pairs.check(torch.tensor([[0, 1]], dtype=torch.int32), 2), torch.tensor([[0, 1]]))
    with pytest.raises(nnsim.InputError, match="valid: 0..1"):
        pairs.check(torch.tensor([[0, 2]]), 2)
