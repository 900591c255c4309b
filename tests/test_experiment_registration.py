"""The registration experiment: properties of the procedural data, the network, and a quick end-to-end run."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.path import Path as MplPath

from nnsim.experiments import registration
from nnsim.experiments._regnet import ShiftNet
from nnsim.experiments._scenes import SceneConfig, make_shift_scenes, rasterize_polygons

torch.set_num_threads(1)

CFG = SceneConfig()


@pytest.fixture(scope="module")
def scenes():
    return make_shift_scenes(24, CFG, max_shift=4.0, seed=3)


def test_shapes_ranges_and_determinism(scenes):
    S = CFG.size
    assert scenes["image"].shape == (24, 3, S, S) and scenes["polygons"].shape == (24, 3, S, S)
    assert scenes["shift"].shape == (24, 2)
    assert scenes["image"].min() >= -1 and scenes["image"].max() <= 1
    assert scenes["polygons"].min() >= 0 and scenes["polygons"].max() <= 1
    counts = scenes["valid"].sum(1)
    assert counts.min() >= CFG.buildings[0] and counts.max() <= CFG.buildings[1]
    again = make_shift_scenes(24, CFG, max_shift=4.0, seed=3)
    for k in ("image", "polygons", "shift"):
        assert torch.equal(again[k], scenes[k])
    other = make_shift_scenes(24, CFG, max_shift=4.0, seed=4)
    assert not torch.equal(other["image"], scenes["image"])
    with pytest.raises(ValueError, match="n must be"):
        make_shift_scenes(0, CFG, max_shift=1.0)


def test_annotations_are_the_polygons_moved_by_the_shift(scenes):
    """Oracle: corners plus the shift, matplotlib's point-in-polygon and brute-force distances."""
    S = CFG.size
    r, c = np.mgrid[0:S, 0:S]
    grid = np.stack([c.ravel(), r.ravel()], -1).astype(np.float64)
    for n in range(6):
        ok = scenes["valid"][n].numpy()
        corners = scenes["corners"][n].double().numpy()[ok]  # [B, 4, 2]
        moved = corners + scenes["shift"][n].double().numpy()
        np.testing.assert_allclose(scenes["moved"][n].double().numpy()[ok], moved, atol=1e-4)
        inside = np.zeros(len(grid), bool)
        dist = np.full(len(grid), np.inf)
        vdist = np.full(len(grid), np.inf)
        for poly in moved:
            inside |= MplPath(poly).contains_points(grid)
            for e in range(4):
                a, b = poly[e], poly[(e + 1) % 4]
                t = np.clip(((grid - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
                dist = np.minimum(dist, np.linalg.norm(grid - (a + t[:, None] * (b - a)), axis=1))
                vdist = np.minimum(vdist, np.linalg.norm(grid - a, axis=1))
        fill, edge, vert = (scenes["polygons"][n, ch].flatten().numpy() for ch in range(3))
        far = dist > 0.6
        assert np.all(fill[far & inside] == 1) and np.all(fill[far & ~inside] == 0)
        assert np.all(edge[dist < 0.5] == 1) and np.all(edge[dist > 1.5] == 0)
        assert np.all(vert[vdist < 1.0] == 1) and np.all(vert[vdist > 2.0] == 0)


def test_image_shows_the_true_buildings_not_the_moved_ones(scenes):
    S = CFG.size
    true_edges = rasterize_polygons(scenes["corners"], scenes["valid"], S)[:, 1] > 0.5
    moved_edges = scenes["polygons"][:, 1] > 0.5
    gx = (scenes["image"][..., :, 2:] - scenes["image"][..., :, :-2]).abs().mean(1)[..., 1:-1, :]
    gy = (scenes["image"][..., 2:, :] - scenes["image"][..., :-2, :]).abs().mean(1)[..., :, 1:-1]
    grad = F.pad(gx + gy, (1, 1, 1, 1))
    on_true = grad[true_edges].mean()
    elsewhere = grad[~true_edges & ~moved_edges].mean()
    only_moved = grad[moved_edges & ~true_edges].mean()
    assert on_true > 1.5 * elsewhere
    assert on_true > 1.3 * only_moved


def test_shift_scenes_move_the_map_by_the_shift():
    """Independent warp: sampling the map at p + t recovers the map of the true polygons; the shift is in range."""
    cfg = SceneConfig(size=32, buildings=(3, 8), building_size=(4.0, 9.0))
    d = make_shift_scenes(16, cfg, max_shift=3.0, seed=2)
    assert d["shift"].shape == (16, 2) and d["shift"].abs().max() <= 3.0 and d["shift"].abs().max() > 2.0
    assert torch.allclose(d["moved"] - d["corners"], d["shift"][:, None, None, :].expand_as(d["moved"]), atol=1e-5)
    S = cfg.size
    true_map = rasterize_polygons(d["corners"], d["valid"], S)[:, :1]
    r, c = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")

    def warp(sign: float) -> torch.Tensor:
        x = c + sign * d["shift"][:, 0, None, None]
        y = r + sign * d["shift"][:, 1, None, None]
        grid = torch.stack([2 * x / (S - 1) - 1, 2 * y / (S - 1) - 1], -1)
        return F.grid_sample(d["polygons"][:, :1], grid, mode="bilinear", padding_mode="border", align_corners=True)

    inner = (slice(None), slice(None), slice(4, S - 4), slice(4, S - 4))
    err = {sign: (warp(sign) - true_map)[inner].abs().mean() for sign in (1.0, 0.0, -1.0)}
    assert err[1.0] < 0.3 * err[0.0] and err[1.0] < 0.3 * err[-1.0]
    with pytest.raises(ValueError, match="max_shift"):
        make_shift_scenes(2, cfg, max_shift=0.0)


def test_shift_net_output_shape():
    torch.manual_seed(0)
    net = ShiftNet(image_width=4, map_width=2, common_width=8)
    x = torch.randn(3, 3, 24, 24)
    assert net(x, x).shape == (3, 2)


def test_quick_run_end_to_end(tmp_path):
    """The seeded quick run (96 patches, sigma = 3 px, 2 noise draws): the protocol's numbers and known effects."""
    assert registration.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    for key in ("settings", "cases", "knn", "figures", "n_parameters", "missing_cases"):
        assert key in res
    s = registration.Settings.quick()
    (c,) = res["cases"]
    assert (c["n_train"], c["sigma"], c["draws"]) == (*s.cases[0], s.draws) and res["missing_cases"] == []
    assert 0.8 * c["sigma"] < c["label_noise_rms"] < 1.2 * c["sigma"]
    # The clean twin learned something (below predicting the mean shift), and the noisy networks are much
    # closer to the true shift than their labels are (self-denoising): false if the map did not encode the
    # shift, if the errors were taken against the labels, or if the networks fitted their labels.
    assert c["clean_train_rms"] < 0.9 * c["predict_mean_rms"]
    assert c["train_rms"] < 0.75 * c["label_noise_rms"]
    assert c["train_rms_vs_labels"] > c["train_rms"]
    # sigma is recovered from the residuals without the truth, and the linearized prediction is of the right size.
    assert 0.8 < c["sigma_hat_over_sigma"] < 1.4
    assert 0.35 < c["methods"]["linearized_ridge"]["calibration"] < 2.0
    assert 0.35 < c["methods"]["ridge_realized"]["calibration"] < 2.0 and c["lam_check_max"] < 1e-6
    for m in registration.METHODS:
        v = c["methods"][m]
        assert v["predicted_rms"] > 0 and -1 <= v["spearman"] <= 1
        assert sum(d["n"] for d in v["deciles"]) == c["n_train"]
    # The ranking next to the reliability of the 2-draw actual error (experiments._reliability).
    r = c["reliability"]
    assert r["draws"] == s.draws and r["ceiling"] == pytest.approx(
        max(2 * r["split_half"] / (1 + r["split_half"]), 0) ** 0.5)
    for m in registration.METHODS:
        assert r["methods"][m]["spearman"] == pytest.approx(c["methods"][m]["spearman"])
        assert 0 < r["methods"][m]["rel_pred"] <= 1 or math.isnan(r["methods"][m]["disattenuated"])
    knn = res["knn"]
    for q, src in enumerate(knn["sources"]):
        assert knn["neighbors"][q][0] == src  # a sample is its own nearest neighbour (similarity 1)
        assert knn["similarities"][q][0] == pytest.approx(1.0, abs=1e-3)
        assert all(a >= b - 1e-6 for a, b in zip(knn["similarities"][q], knn["similarities"][q][1:]))
    assert knn["rows_topk_agree"]
    for name in res["figures"].values():
        assert name.startswith("registration_") and (tmp_path / name).stat().st_size > 5000
    assert len(res["figures"]) == 6
    # Resumable: a second run reuses every saved part (no training) and gives the same numbers.
    parts = sorted(p.name for p in (tmp_path / "parts").iterdir())
    assert len(parts) == 1 + 3 * s.draws + 1  # clean twin; model, analysis, realized per draw; maps
    assert registration.main(["--quick", "--out", str(tmp_path), "--assemble"]) == 0
    again = json.loads((tmp_path / "results.json").read_text())
    assert again["cases"] == res["cases"]
    # The same case named on the command line, with its draws, reuses the same parts (same seeds, same hash).
    assert registration.main(["--quick", "--out", str(tmp_path), "--assemble", "--cases", "96:3", "--draws", "2"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["cases"] == res["cases"]
    with pytest.raises(SystemExit):
        registration.main(["--quick", "--out", str(tmp_path), "--cases", "96"])
