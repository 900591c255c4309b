"""A negative test for every error path the README and the docstrings promise (nnsim.InputError / ModelError).

Each case names the exception class and a piece of its message, so that a test passes only when the intended
check fired (not some later torch error on the same bad input).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import nnsim
from nnsim import outputs
from nnsim.algebra import check_metric
from nnsim.errors import InputError, ModelError

torch.set_num_threads(1)
F64 = torch.float64


def _model(d: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, d)).double()


X = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(0))


def _sim(d: int = 2, **kwargs) -> nnsim.Similarity:
    return nnsim.Similarity(_model(d), progress=False, **kwargs)


def test_input_error_is_a_value_error_and_model_error_a_type_error():
    # Callers catching ValueError (the metric checks raised it before) keep working.
    assert issubclass(InputError, ValueError) and issubclass(ModelError, TypeError)


# ---------------------------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("kwargs, match", [
    (dict(method="knn"), "method must be"),
    (dict(algorithm="fast"), "algorithm must be"),
    (dict(method="soft", power=2.0), "power applies to method='less_soft' only"),
    (dict(method="hard", threshold=0.5, power=2.0), "power applies"),
    (dict(method="less_soft", power=0), "positive power"),
    (dict(method="less_soft", power=-1.0), "positive power"),
    (dict(method="less_soft", power="2"), "positive power"),
    (dict(method="hard"), "numeric threshold"),
    (dict(method="hard", threshold="0.5"), "numeric threshold"),
    (dict(method="less_soft", power=2.0, threshold=0.1), "threshold applies"),
    (dict(method="less_soft", power=2.0, normalized=False), "normalised"),
    (dict(method="less_soft", power=2.0, algorithm="linear"), "no linear-time"),
])
def test_density_argument_errors(kwargs, match):
    with pytest.raises(InputError, match=match):
        _sim().density(X, **kwargs)


def test_density_include_self_false_needs_the_data_as_reference():
    with pytest.raises(InputError, match="include_self=False needs reference=None"):
        _sim().density(X, X[:3], include_self=False)


@pytest.mark.parametrize("k", [0, 7, 2.0, "3"])
def test_neighbors_k_out_of_range(k):
    with pytest.raises(InputError, match=r"k must be an integer in \[1, 6\]"):
        _sim().neighbors(X, k=k)


def test_neighbors_exclude_self_lowers_the_largest_k():
    with pytest.raises(InputError, match=r"\[1, 5\]"):
        _sim().neighbors(X, k=6, exclude_self=True)


@pytest.mark.parametrize("noise_std", [-0.1, "0.3", float("nan")])
def test_denoising_noise_std_must_be_non_negative(noise_std):
    with pytest.raises(InputError, match="noise_std must be a non-negative number"):
        _sim().denoising(X, noise_std=noise_std)


@pytest.mark.parametrize("approximate", [False, True])
def test_denoising_predictions_with_wrong_columns_raise_input_error(approximate):
    # d' = 3 columns for an output of d = 2: the InputError, not a raw torch RuntimeError from the sums.
    with pytest.raises(InputError, match=r"predictions have 3 columns but the analysed output has d = 2"):
        _sim().denoising(X, predictions=torch.zeros(6, 3, dtype=F64), approximate=approximate)
    sim = _sim()
    sim.similarity(X[:2])  # d already known: the same check
    with pytest.raises(InputError, match="predictions have 1 columns"):
        sim.denoising(X, predictions=torch.zeros(6, 1, dtype=F64), approximate=approximate)


@pytest.mark.parametrize("preds, match", [
    (torch.zeros(5, 2, dtype=F64), "N = 6 rows"),
    (torch.zeros(6, dtype=F64), r"\[N, d\] tensor"),
    ([[0.0, 0.0]] * 6, r"\[N, d\] tensor"),
    (torch.tensor([[0.0, float("nan")]] * 6, dtype=F64), "NaN or Inf"),
    (torch.tensor([[float("inf"), 0.0]] * 6, dtype=F64), "NaN or Inf"),
])
def test_denoising_bad_predictions(preds, match):
    with pytest.raises(InputError, match=match):
        _sim().denoising(X, predictions=preds)


@pytest.mark.parametrize("metric", ["fisher", torch.eye(2, dtype=F64)])
def test_denoising_needs_the_euclidean_metric(metric):
    with pytest.raises(InputError, match="metric='euclidean'"):
        _sim(metric=metric).denoising(X)


@pytest.mark.parametrize("dim", [0, -3, 2.5])
def test_features_dim_must_be_positive(dim):
    with pytest.raises(InputError, match="dim must be a positive integer"):
        _sim().features(X, dim=dim)


# ---------------------------------------------------------------------------------------------- pairwise
@pytest.mark.parametrize("reduce", ["mean", "sum", 0])
def test_similarity_reduce_must_be_trace_or_none(reduce):
    with pytest.raises(InputError, match="reduce must be 'trace' or None"):
        _sim().similarity(X, reduce=reduce)


@pytest.mark.parametrize("by", ["module", "param", True])
def test_by_must_be_none_or_layer(by):
    with pytest.raises(InputError, match="by must be None or 'layer'"):
        _sim().similarity(X, by=by)
    with pytest.raises(InputError, match="by must be None or 'layer'"):
        _sim().kernel(X, by=by)


def test_mismatched_inputs_and_dtypes():
    with pytest.raises(InputError, match="samples differ"):
        _sim().similarity(X, torch.randn(2, 4, dtype=F64))
    with pytest.raises(InputError, match="dtype"):
        _sim().similarity(X.float())
    with pytest.raises(InputError, match="NaN or Inf"):
        _sim().density(torch.full((3, 3), float("nan"), dtype=F64))
    with pytest.raises(InputError, match="empty"):
        _sim().density(X[:0])


# ---------------------------------------------------------------------------------------------- metric
@pytest.mark.parametrize("metric, match", [
    (torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=F64), r"symmetric \(M == M\.T\)"),
    (torch.diag(torch.tensor([1.0, -1.0], dtype=F64)), "positive semi-definite"),
    (torch.eye(3, dtype=F64), r"\(2, 2\) tensor"),
    (torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=F64), "NaN or Inf"),
])
def test_bad_metric_tensor_raises_input_error(metric, match):
    with pytest.raises(InputError, match=match):
        _sim(metric=metric).similarity(X)
    with pytest.raises(ValueError, match=match):  # InputError is a ValueError: old callers keep working
        check_metric(metric, 2)


def test_metric_checks_accept_a_singular_psd_metric_and_reject_a_list():
    v = torch.tensor([1.0, 2.0], dtype=F64)
    M = torch.outer(v, v)
    assert check_metric(M, 2) is M
    with pytest.raises(InputError, match=r"got list"):
        check_metric([[1.0, 0.0], [0.0, 1.0]], 2)
    with pytest.raises(InputError, match="at least 2 classes"):
        _sim(1, metric="fisher").similarity(X)


def test_singular_raise_refuses_rank_deficient_samples():
    def dup(out, inputs):  # two equal outputs: K(x, x) has rank 1 < d = 2
        return torch.cat([out[:, :1], out[:, :1]], dim=1)

    with pytest.raises(ValueError, match="rank-deficient"):
        nnsim.Similarity(_model(), dup, singular="raise", progress=False).similarity(X)


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("model", [lambda x: x, "mlp", None])
def test_non_module_model(model):
    with pytest.raises(ModelError, match="model must be a torch.nn.Module"):
        nnsim.Similarity(model)
    with pytest.raises(ModelError, match="model must be a torch.nn.Module"):
        nnsim.SimilarityLoss(model)


def test_embedding_with_max_norm_is_refused_and_left_untouched():
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 1))
    before = model[0].weight.detach().clone()
    with pytest.raises(ModelError, match="Embedding with max_norm"):
        nnsim.Similarity(model)
    with pytest.raises(ModelError, match="Embedding with max_norm"):
        nnsim.SimilarityLoss(model)
    assert torch.equal(model[0].weight, before)


@pytest.mark.parametrize("eps", [-1e-8, "1e-8", None, float("nan")])
def test_similarity_loss_eps(eps):
    with pytest.raises(InputError, match="eps must be a number >= 0"):
        nnsim.SimilarityLoss(_model(), eps=eps)


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="cosine"), "variant must be one of"),
    (dict(batch_mode="sum"), "batch_mode must be"),
    (dict(weight=float("nan")), "weight must be a finite number"),
    (dict(weight=True), "weight must be a finite number"),
    (dict(backend="loop"), "backend must be"),
    (dict(output="softmax"), "output must be None"),
    (dict(output=3), "output must be None"),
])
def test_similarity_loss_arguments(kwargs, match):
    with pytest.raises(InputError, match=match):
        nnsim.SimilarityLoss(_model(), **kwargs)


def test_similarity_loss_eps_zero_is_allowed():
    assert nnsim.SimilarityLoss(_model(), eps=0.0) is not None


# ---------------------------------------------------------------------------------------------- outputs
def test_output_helpers_name_the_problem():
    z = torch.randn(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="unknown mask"):
        outputs.log_softmax_mask(0, mask="random")
    with pytest.raises(ValueError, match="at least two classes"):
        outputs.log_softmax_mask(0)(z[:, :1], (z,))
    with pytest.raises(ValueError, match=r"class index in \[0, 3\)"):
        outputs.logits(3)(z, (z,))
    with pytest.raises(ValueError, match=r"class index in \[0, 3\)"):
        outputs.logits(-1)(z, (z,))
    with pytest.raises(ValueError, match=r"2 spatial dims"):
        outputs.pixel(0, 0)(z, (z,))
    with pytest.raises(TypeError, match="not a tensor"):
        outputs.center_pixel((z, z), (z,))
    with pytest.raises(TypeError, match="not a tensor"):
        outputs.spatial_sum([z], (z,))


def test_denoising_csv_without_noise_level_has_no_predicted_error_column(tmp_path):
    rep = _sim().denoising(X)
    assert rep.predicted_error is None
    rep.to_csv(tmp_path / "d.csv")
    rows = (tmp_path / "d.csv").read_text().splitlines()
    assert rows[0] == "index,factor,effective_neighbors,consistency,ill_conditioned,cancellation,D_00,D_01,D_10,D_11"
    assert len(rows) == 7 and float(rows[1].split(",")[1]) == float(rep.factor[0])
    cells = rows[2].split(",")
    assert cells[4] == "False"  # booleans as words
    assert float(cells[5]) == float(rep.cancellation[1])
    assert [float(c) for c in cells[6:]] == rep.factor_matrix[1].flatten().tolist()


# ---------------------------------------------------------------- density arguments in full (mutation testing)
# Every refusal of Similarity.density with its full message, and the accepted numeric types next to each refused
# one, so that a loosened or tightened check fails (docs/testing.md, mutation testing).

@pytest.fixture(scope="module")
def density_sim_x():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    return nnsim.Similarity(model, progress=False), torch.randn(5, 3, dtype=torch.float64)


DENSITY_REFUSED = [
    (dict(method="bogus"), "method must be 'soft', 'hard' or 'less_soft', got 'bogus'"),
    (dict(algorithm="fast"), "algorithm must be 'auto', 'linear' or 'tiles', got 'fast'"),
    (dict(method="hard"), "method='hard' needs a finite numeric threshold (count of similarities strictly above it), "
                          "got None"),
    (dict(method="hard", threshold=float("inf")), "method='hard' needs a finite numeric threshold (count of "
                                                  "similarities strictly above it), got inf"),
    (dict(method="hard", threshold="0.5"), "method='hard' needs a finite numeric threshold (count of similarities "
                                           "strictly above it), got '0.5'"),
    (dict(method="less_soft"), "method='less_soft' needs a positive power n (sum of max(sim, 0)^n)"),
    (dict(method="less_soft", power=0), "method='less_soft' needs a positive power n (sum of max(sim, 0)^n)"),
    (dict(method="less_soft", power=float("nan")), "method='less_soft' needs a positive power n (sum of max(sim, "
                                                   "0)^n)"),
    (dict(method="less_soft", power="2"), "method='less_soft' needs a positive power n (sum of max(sim, 0)^n)"),
    (dict(method="soft", threshold=0.5), "threshold applies to method='hard' only, not 'soft'"),
    (dict(method="less_soft", power=2, threshold=0.5), "threshold applies to method='hard' only, not 'less_soft'"),
    (dict(method="soft", power=2), "power applies to method='less_soft' only, not 'soft'"),
    (dict(method="hard", threshold=0.5, power=2), "power applies to method='less_soft' only, not 'hard'"),
    (dict(method="hard", threshold=0.5, normalized=False), "method='hard' is defined on the normalised similarity: "
                                                           "use normalized=True"),
    (dict(method="less_soft", power=2, normalized=False), "method='less_soft' is defined on the normalised "
                                                          "similarity: use normalized=True"),
    (dict(method="hard", threshold=0.5, algorithm="linear"), "method='hard' has no linear-time algorithm; it is "
                                                             "exact by tiles"),
    (dict(method="less_soft", power=1, algorithm="linear"), "method='less_soft' has no linear-time algorithm; it is "
                                                            "exact by tiles"),
]


@pytest.mark.parametrize("kwargs,message", DENSITY_REFUSED)
def test_density_refuses_with_the_full_message(density_sim_x, kwargs, message):
    sim, x = density_sim_x
    with pytest.raises(InputError, match="^" + re.escape(message) + "$"):
        sim.density(x, **kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(method="hard", threshold=0), dict(method="hard", threshold=0.25), dict(method="hard", threshold=-1),
    dict(method="less_soft", power=2), dict(method="less_soft", power=0.5), dict(method="soft", normalized=False),
    dict(method="soft", algorithm="linear"), dict(method="soft", algorithm="tiles"),
    dict(method="hard", threshold=0.5, algorithm="tiles"), dict(method="hard", threshold=0.5, algorithm="auto"),
])
def test_density_accepts_every_valid_combination(density_sim_x, kwargs):
    sim, x = density_sim_x
    out = sim.density(x, **kwargs)
    assert out.shape == (5,) and torch.isfinite(out).all()
