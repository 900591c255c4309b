"""Bad input gets a clear error; undefined results are NaN with a warning; the model comes back untouched."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from oracles import jacobian, kernel, rel_err
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zoo import CNN, Registration, dead_relu, mlp

import nnsim

torch.set_num_threads(1)


def _model():
    torch.manual_seed(0)
    return mlp(2).double()


def test_dataset_and_dataloader_inputs_match_tensors():
    model = _model()
    x = torch.randn(13, 6, dtype=torch.float64)
    y = torch.arange(13)
    sim = nnsim.Similarity(model, chunk_size=4, progress=False)
    ref = sim.similarity(x)
    assert torch.allclose(sim.similarity(TensorDataset(x, y)), ref, atol=1e-12)
    assert torch.allclose(sim.similarity(DataLoader(TensorDataset(x, y), batch_size=3)), ref, atol=1e-12)
    assert torch.allclose(sim.similarity(DataLoader(TensorDataset(x), batch_size=5), x[:4]), ref[:, :4], atol=1e-12)


def test_multi_input_dataset_items():
    torch.manual_seed(0)
    model = Registration().double()
    a, b = torch.randn(5, 3, 8, 8, dtype=torch.float64), torch.randn(5, 3, 8, 8, dtype=torch.float64)
    out = nnsim.outputs.spatial_sum
    ref = kernel(jacobian(model, (a, b), out), jacobian(model, (a, b), out))

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return (a[i], b[i]), torch.tensor(0)

    sim = nnsim.Similarity(model, output=out, chunk_size=2, progress=False)
    assert rel_err(sim.kernel(Pairs()), ref) <= 1e-10


def test_shuffled_loader_is_refused():
    x = torch.randn(6, 6, dtype=torch.float64)
    with pytest.raises(nnsim.InputError, match="shuffle"):
        nnsim.Similarity(_model(), progress=False).similarity(DataLoader(TensorDataset(x), shuffle=True))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(params="nope.weight"), "unknown parameter"),
        (dict(params="zzz*"), "unknown parameter"),
        (dict(params=[]), "no parameter selected"),
        (dict(metric="cosine"), "metric"),
        (dict(backend="jax"), "unknown backend"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(singular="inv"), "singular"),
        (dict(output="logits"), "output"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(nnsim.InputError, match=match):
        nnsim.Similarity(_model(), **kwargs)


def test_no_trainable_parameter():
    model = _model().requires_grad_(False)
    with pytest.raises(nnsim.InputError, match="requires grad"):
        nnsim.Similarity(model)
    # ... but an explicit selection of frozen parameters is analysed, and they stay frozen.
    sim = nnsim.Similarity(model, params="0.*", progress=False)
    sim.kernel(torch.randn(3, 6, dtype=torch.float64))
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("backend", ["loop", "functorch", "structured"])
def test_output_callable_wrong_shape(backend):
    sim = nnsim.Similarity(_model(), output=lambda out, x: out.sum(), backend=backend, progress=False)
    with pytest.raises(nnsim.ModelError, match=r"\[B, d\]"):
        sim.kernel(torch.randn(3, 6, dtype=torch.float64))


def test_model_returning_tuple_needs_output_spec():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 2)

        def forward(self, x):
            return self.l(x), x

    with pytest.raises(nnsim.ModelError, match="output=callable"):
        nnsim.Similarity(Two(), progress=False).kernel(torch.randn(2, 3))
    k = nnsim.Similarity(Two(), output=lambda o, x: o[0], progress=False).kernel(torch.randn(2, 3))
    assert k.shape == (2, 2, 2, 2)


@pytest.mark.parametrize("backend", ["loop", "functorch", "structured"])
def test_nan_inputs_and_outputs_are_named(backend):
    sim = nnsim.Similarity(_model(), backend=backend, progress=False)
    x = torch.randn(5, 6, dtype=torch.float64)
    x[3, 1] = float("nan")
    with pytest.raises(nnsim.InputError, match=r"NaN or Inf at samples \[3\]"):
        sim.similarity(x)
    x[3, 1] = 7.0
    pole = nnsim.Similarity(_model(), output=lambda o, x: o / (x[0][:, 1:2] - 7.0), backend=backend, progress=False)
    with pytest.raises(nnsim.ModelError, match=r"NaN or Inf at samples \[3\]"):
        pole.similarity(x)
    overflow = nnsim.Similarity(_model(), output=lambda o, x: o * 1e200, backend=backend, progress=False)
    with pytest.raises(nnsim.ModelError, match="gradients are not finite"):
        overflow.similarity(torch.randn(3, 6, dtype=torch.float64))


def test_shape_dtype_empty_mismatch():
    sim = nnsim.Similarity(_model(), progress=False)
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(nnsim.InputError, match="differ"):
        sim.similarity(x, torch.randn(4, 7, dtype=torch.float64))
    with pytest.raises(nnsim.InputError, match="dtype"):
        sim.similarity(x.float())
    with pytest.raises(nnsim.InputError, match="empty"):
        sim.similarity(x[:0])
    with pytest.raises(nnsim.InputError, match="sample counts"):
        sim.similarity((x, x[:2]))
    with pytest.raises(nnsim.InputError, match="tensors only"):
        sim.similarity([[1.0, 2.0]])
    with pytest.raises(nnsim.InputError, match="torch.from_numpy"):
        sim.similarity(x.numpy())


def test_dense_result_budget_suggests_trace():
    sim = nnsim.Similarity(_model(), max_result_bytes=1000, progress=False)
    x = torch.randn(20, 6, dtype=torch.float64)
    with pytest.raises(nnsim.ResultTooLargeError, match="reduce='trace'"):
        sim.similarity(x, reduce=None)
    assert sim.similarity(x[:10]).shape == (10, 10)  # 800 bytes fit


def test_zero_gradient_sample_is_nan_with_warning_and_others_unaffected():
    model, x = dead_relu(6, 2)
    sim = nnsim.Similarity(model, params="0.*", progress=False)  # ... but the first layer's gradient is zero
    with pytest.warns(nnsim.RankDeficiencyWarning, match=r"zero gradient.*Samples: \[2\]"):
        S = sim.similarity(x)
    assert torch.isnan(S[2]).all() and torch.isnan(S[:, 2]).all()
    keep = [0, 1, 3, 4, 5]
    G = jacobian(model, (x[keep],), params=list(model[0].parameters()))[:, 0]
    cos = (G @ G.T) / (G.norm(dim=1)[:, None] * G.norm(dim=1)[None])
    assert torch.allclose(S[keep][:, keep], cos, atol=1e-12)
    with pytest.warns(nnsim.RankDeficiencyWarning):
        infl = sim.influence(x)
    assert torch.isnan(infl[2]).all() and torch.isfinite(infl[keep]).all()


def test_rank_deficient_kernel_is_normalised_on_its_range():
    # Two outputs that are the same function: K(x, x) has rank 1 < d = 2.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    sim = nnsim.Similarity(model, output=lambda o, x: torch.cat([o, 2 * o], 1), progress=False)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.warns(nnsim.RankDeficiencyWarning, match="rank-deficient"):
        S = sim.similarity(x)
    assert torch.allclose(S.diagonal(), torch.full((4,), 0.5, dtype=torch.float64), atol=1e-10)  # r/d
    assert (sim.rank(x) == 1).all()
    with pytest.raises(ValueError, match="rank-deficient"):
        nnsim.Similarity(model, output=lambda o, x: torch.cat([o, 2 * o], 1), singular="raise",
                         progress=False).similarity(x)


def test_batchnorm_without_running_stats_is_refused():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 1))
    with pytest.raises(nnsim.ModelError, match="couples the samples"):
        nnsim.Similarity(model)


@pytest.mark.parametrize("backend", ["loop", "functorch", "structured"])
def test_model_comes_back_untouched(backend):
    torch.manual_seed(0)
    model = CNN().double()
    model.train()
    model.c1.requires_grad_(False)
    model.fc.weight.grad = torch.ones_like(model.fc.weight)
    before = copy.deepcopy(model.state_dict())
    sim = nnsim.Similarity(model, params=["c1.*", "fc.*", "bn.*"], backend=backend, progress=False)
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    S1 = sim.similarity(x)
    assert not S1.requires_grad and not sim.kernel(x).requires_grad
    assert model.training and all(m.training for m in model.modules())
    assert not model.c1.weight.requires_grad and model.fc.weight.requires_grad
    assert torch.equal(model.fc.weight.grad, torch.ones_like(model.fc.weight)) and model.c2.weight.grad is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # eval-mode semantics: dropout off, running statistics used -> deterministic and equal to eval results
    model.eval()
    assert torch.equal(S1, sim.similarity(x))


def test_progress_bar_can_be_silenced(capsys):
    sim = nnsim.Similarity(_model(), chunk_size=2, progress=False)
    sim.similarity(torch.randn(6, 6, dtype=torch.float64))
    assert capsys.readouterr().err == ""
    loud = nnsim.Similarity(_model(), chunk_size=2, progress=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loud.similarity(torch.randn(6, 6, dtype=torch.float64))
    assert "nnsim similarity" in capsys.readouterr().err
