"""nnsim.outputs against the reductions written out by hand (no nnsim helper inside the expected values)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nnsim import outputs

torch.set_num_threads(1)
F64 = torch.float64


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_spatial_outputs_are_the_written_out_reductions(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(3, 2, h, w, dtype=F64, generator=g)
    x = (torch.zeros(3, 1),)
    ch, cw = h // 2, w // 2  # the centre: floor of size / 2 on each axis (for even sizes, the lower-right one)
    expected = torch.stack([torch.stack([out[b, c, ch, cw] for c in range(2)]) for b in range(3)])
    assert torch.equal(outputs.center_pixel(out, x), expected)
    assert torch.equal(outputs.pixel(h - 1, 0)(out, x), out[:, :, h - 1, 0])
    sums = torch.tensor([[sum(float(out[b, c, i, j]) for i in range(h) for j in range(w)) for c in range(2)]
                         for b in range(3)], dtype=F64)
    torch.testing.assert_close(outputs.spatial_sum(out, x), sums, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outputs.spatial_mean(out, x), sums / (h * w), rtol=1e-12, atol=1e-12)
    assert torch.equal(outputs.flatten(out, x), out.reshape(3, -1))


def test_centre_of_even_and_odd_maps():
    out = torch.arange(2 * 4 * 5, dtype=F64).reshape(1, 2, 4, 5)
    assert outputs.center_pixel(out, ()).tolist() == [[12.0, 32.0]]  # row 2, column 2 (of 0..3 and 0..4)
    out3 = torch.arange(6, dtype=F64).reshape(1, 1, 6)
    assert outputs.center_pixel(out3, ()).tolist() == [[3.0]]


@settings(max_examples=30, deadline=None)
@given(C=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_logits_and_posnegflat_score_written_out(C, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, C, dtype=F64, generator=g)
    x = (z,)
    assert torch.equal(outputs.logits()(z, x), z)
    t = C - 1
    assert torch.equal(outputs.logits(t)(z, x), z[:, t : t + 1])
    pred = [max(range(C), key=lambda c, b=b: float(z[b, c])) for b in range(4)]
    assert outputs.logits("predicted")(z, x)[:, 0].tolist() == [float(z[b, pred[b]]) for b in range(4)]
    for target, cls in [(t, [t] * 4), ("predicted", pred)]:
        got = outputs.log_softmax_mask(target)(z, x)[:, 0]
        for b in range(4):
            lse = math.log(sum(math.exp(float(v)) for v in z[b]))
            logp = [float(z[b, c]) - lse for c in range(C)]
            score = logp[cls[b]] - sum(logp[c] for c in range(C) if c != cls[b]) / (C - 1)
            margin = float(z[b, cls[b]]) - sum(float(z[b, c]) for c in range(C) if c != cls[b]) / (C - 1)
            assert abs(float(got[b]) - score) < 1e-12 and abs(score - margin) < 1e-12
    m = outputs.posnegflat_mask(torch.tensor([0, C - 1]), C, F64)
    assert m[0].tolist() == [1.0] + [-1.0 / (C - 1)] * (C - 1)
    assert m[1].tolist() == [-1.0 / (C - 1)] * (C - 1) + [1.0]
    assert m.dtype == F64


def test_class_zero_is_a_valid_target_and_masks_follow_the_labels_device():
    z = torch.tensor([[2.0, 1.0, 0.0]], dtype=F64)
    assert outputs.logits(0)(z, (z,)).tolist() == [[2.0]]
    score = float(outputs.log_softmax_mask(0)(z, (z,)))
    assert abs(score - (2.0 - 0.5)) < 1e-12  # margin z_0 - mean(z_1, z_2)
    t = torch.tensor([0, 2], device="meta")
    assert outputs.posnegflat_mask(t, 3).device.type == "meta"  # built where the labels live (GPU-safe)


def test_target_indices_follow_the_logits_device():
    z = torch.zeros(2, 3, device="meta")
    assert outputs.logits(1)(z, (z,)).device.type == "meta"
    assert outputs.log_softmax_mask(2)(z, (z,)).shape == (2, 1)


def test_log_softmax_mask_defaults_to_the_predicted_class():
    z = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(outputs.log_softmax_mask()(z, (z,)), torch.tensor([[2.5], [1.5]], dtype=F64))
