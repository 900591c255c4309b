"""nnsim.outputs: model-output unwrapping and helper metadata (mutation testing, docs/testing.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from nnsim import outputs

torch.set_num_threads(1)


class _Output(dict):
    """A Hugging Face ModelOutput stand-in: a mapping whose entries are also attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


Z = torch.arange(12, dtype=torch.float64).reshape(2, 6)


@pytest.mark.parametrize("wrap", [lambda z: z, lambda z: SimpleNamespace(logits=z, loss=None),
                                  lambda z: {"logits": z, "hidden": None}, lambda z: _Output(logits=z)])
def test_every_helper_reads_the_logits_of_a_model_output(wrap):
    out = wrap(Z)
    assert outputs.tensor(out) is Z
    assert torch.equal(outputs.flatten(out, ()), Z)
    assert torch.equal(outputs.logits(2)(out, ()), Z[:, 2:3])
    maps = wrap(Z.reshape(2, 2, 3))
    assert torch.equal(outputs.center_pixel(maps, ()), Z.reshape(2, 2, 3)[:, :, 1])
    assert torch.equal(outputs.pixel(2)(maps, ()), Z.reshape(2, 2, 3)[:, :, 2])
    assert torch.equal(outputs.spatial_sum(maps, ()), Z.reshape(2, 2, 3).sum(-1))


@pytest.mark.parametrize("bad", [SimpleNamespace(logits=[1.0]), {"logits": "z"}, {"scores": Z}, (Z,), 3.0])
def test_an_output_without_tensor_logits_is_refused_with_the_fix(bad):
    with pytest.raises(TypeError, match=rf"^the model returned {type(bad).__name__}, not a tensor nor an output with "
                                        r"\.logits; pass output=callable\(model_output, inputs\) that returns a "
                                        r"\[B, d\] tensor$"):
        outputs.tensor(bad)


def test_pixel_names_itself_and_checks_the_spatial_rank():
    sel = outputs.pixel(1, 2)
    assert sel.__name__ == "pixel(1, 2)"
    with pytest.raises(ValueError, match=r"^pixel\(1, 2\) needs an output \[B, C, 2 spatial dims\], got \(2, 6\)$"):
        sel(Z, ())


def test_posnegflat_mask_defaults_to_float32_and_sums_to_zero():
    m = outputs.posnegflat_mask(torch.tensor([1, 0, 3]), 4)
    assert m.dtype == torch.float32 and m.shape == (3, 4)
    torch.testing.assert_close(m[0], torch.tensor([-1 / 3, 1.0, -1 / 3, -1 / 3]))
    torch.testing.assert_close(m.sum(1), torch.zeros(3), atol=1e-6, rtol=0)


def test_target_errors_name_the_valid_range():
    with pytest.raises(ValueError, match=r"^target must be a class index in \[0, 6\) or 'predicted', got 6$"):
        outputs.logits(6)(Z, ())
    with pytest.raises(ValueError, match=r"^target must be a class index in \[0, 6\) or 'predicted', got 'first'$"):
        outputs.logits("first")(Z, ())
    with pytest.raises(ValueError, match=r"^unknown mask 'flat'; supported: 'posnegflat'$"):
        outputs.log_softmax_mask(mask="flat")
    with pytest.raises(ValueError, match="^log_softmax_mask needs at least two classes$"):
        outputs.log_softmax_mask()(Z[:, :1], ())
