"""The Python API on exported programs and on bad inputs: exact on the first, an InputError that says what is
wrong and how to fix it on the second (never a raw torch error), and a DenoisingReport repr that stays short."""

import math

import pytest
import torch
from oracles import jacobian, kernel, rel_err
from torch import nn

import nnsim
from nnsim import InputError, ModelError

torch.set_num_threads(1)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def exported(model: nn.Module, example: torch.Tensor) -> nn.Module:
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(model, (example[:2],), dynamic_shapes=({0: batch},)).module()


def test_exported_program_module_matches_the_brute_force_kernel(tmp_path):
    """Similarity(torch.export.load(p).module()): its eval() raises NotImplementedError; nnsim must not need it."""
    model, x = mlp(), torch.randn(5, 4, dtype=torch.float64)
    torch.export.save(torch.export.export(model, (x[:2],), dynamic_shapes=({0: torch.export.Dim("b", min=1)},)),
                      tmp_path / "m.pt2")
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    with pytest.raises(NotImplementedError):
        program.eval()  # the premise: torch.export forbids it
    K = nnsim.Similarity(program, progress=False).kernel(x)
    G = jacobian(model, (x,))
    assert rel_err(K, kernel(G, G)) < 1e-10


def test_exported_in_training_mode_is_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).train()
    program = exported(model, torch.randn(2, 4))
    with pytest.raises(ModelError, match="exported in training mode"):
        nnsim.Similarity(program, progress=False).similarity(torch.randn(3, 4))


@pytest.mark.parametrize("case", ["int", "shape", "1d", "list"])
def test_bad_inputs_raise_input_error_with_the_fix(case):
    sim = nnsim.Similarity(mlp(), progress=False)
    x, fix = {
        "int": (torch.randint(0, 3, (5, 4)), "x.to(torch.float64)"),
        "shape": (torch.randn(5, 7, dtype=torch.float64), "the shape the model expects"),
        "1d": (torch.randn(4, dtype=torch.float64), "x[None]"),
        "list": ([torch.randn(4, dtype=torch.float64) for _ in range(3)], "torch.stack(samples)"),
    }[case]
    with pytest.raises(InputError, match="the model failed on inputs") as info:
        sim.similarity(x)
    assert fix in str(info.value)
    # Not a wrapper that sticks: once the model has run, the same object works.
    good = torch.randn(3, 4, dtype=torch.float64)
    assert sim.similarity(good).shape == (3, 3)


def test_integer_inputs_of_an_embedding_model_are_analysed():
    """Integer inputs are legitimate for an Embedding first layer: analysed, and exact against brute force."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(6, 2)).double().eval()
    tokens = torch.randint(0, 7, (5, 2))
    K = nnsim.Similarity(model, progress=False).kernel(tokens)
    G = jacobian(model, (tokens,))
    assert rel_err(K, kernel(G, G)) < 1e-10


def test_nonsense_options_are_refused():
    sim, x = nnsim.Similarity(mlp(), progress=False), torch.randn(6, 4, dtype=torch.float64)
    with pytest.raises(InputError, match="finite numeric threshold"):
        sim.density(x, method="hard", threshold=math.nan)
    with pytest.raises(InputError, match="dim must be a positive integer"):
        sim.denoising(x, approximate=True, dim=0)
    with pytest.raises(InputError, match="noise_std"):
        sim.denoising(x, noise_std=math.inf)


def test_denoising_report_repr_is_a_summary():
    sim, x = nnsim.Similarity(mlp(), progress=False), torch.randn(60, 4, dtype=torch.float64)
    report = sim.denoising(x, noise_std=0.1)
    text = repr(report)
    assert len(text) < 300 and "N=60" in text and "d=3" in text and "tensor(" not in text
    assert f"{float(report.effective_neighbors.median()):.4g}" in text


def test_backend_failure_is_not_blamed_on_good_inputs():
    # torch.func cannot vmap through nn.LSTM's fused kernel; the integer tokens are right for this model, so the
    # error must name the backend, not tell the user to convert the inputs.
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.rnn, self.head = nn.Embedding(20, 8), nn.LSTM(8, 8, batch_first=True), nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.rnn(self.emb(x))[0][:, -1])

    x = torch.randint(0, 20, (4, 5))
    with pytest.raises(ModelError, match="'functorch' backend failed") as info:
        nnsim.Similarity(Tagger(), backend="functorch").kernel(x)
    assert "convert" not in str(info.value)
    assert torch.isfinite(nnsim.Similarity(Tagger()).kernel(x)).all()  # the default backend handles it
