"""Procedural stand-in for the paper's map-alignment data: aerial-like scenes and misaligned building maps.

The paper aligns OpenStreetMap building polygons with aerial images (Inria Aerial Image Labeling); neither
can be shipped, so this module draws both modalities from the same random building layout, fully
vectorised and seeded:

* **image** [N, 3, S, S] in [-1, 1]: ground texture, vegetation, roads, buildings as rotated rectangles with
  two-sided (gable) roofs in per-building colours, their cast shadows, blur and sensor noise;
* **map** [N, 3, S, S] in [0, 1]: the annotation polygons (the buildings' corners) *moved by the true
  misalignment*, one translation t per patch (pixels, x = column, y = row), rasterised as filled area, edges
  and vertices (anti-aliased by distance, so that sub-pixel positions survive rasterisation).

(The first version of the experiment drew a smooth deformation field per patch and a smooth label-noise
field; that generator is in the git history.)

Coordinates: pixel (row r, column c) has its centre at (x, y) = (c, r).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SceneConfig:
    """Generator settings (lengths in pixels)."""

    size: int = 64
    buildings: tuple[int, int] = (4, 10)
    building_size: tuple[float, float] = (6.0, 15.0)
    sensor_noise: float = 0.04


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def pixel_grid(size: int) -> Tensor:
    """[S*S, 2] (x, y) pixel centres in row-major order."""
    r, c = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    return torch.stack([c.flatten(), r.flatten()], -1)


# ---------------------------------------------------------------------- buildings
def random_buildings(n: int, cfg: SceneConfig, gen: torch.Generator) -> dict[str, Tensor]:
    """Rotated-rectangle buildings on a jittered street grid.

    Returns centres [N, B, 2], half sizes [N, B, 2], angles [N, B], valid [N, B] (B = max count; invalid
    slots are padding), corners [N, B, 4, 2] (counter-clockwise in (x, y)).
    """
    S, B = cfg.size, cfg.buildings[1]
    count = torch.randint(cfg.buildings[0], cfg.buildings[1] + 1, (n,), generator=gen)
    valid = torch.arange(B)[None] < count[:, None]
    scene_angle = _uniform(gen, (n, 1), 0, math.pi / 2)
    angles = scene_angle + 0.12 * torch.randn((n, B), generator=gen)
    # Cells of a 4 x 4 grid, distinct per scene, so that buildings rarely overlap.
    cells = torch.argsort(torch.rand((n, 16), generator=gen), dim=1)[:, :B]
    cell_xy = torch.stack([cells % 4, cells // 4], -1).float()
    centres = (cell_xy + 0.5) * (S / 4) + _uniform(gen, (n, B, 2), -0.12 * S, 0.12 * S)
    half = 0.5 * _uniform(gen, (n, B, 2), *cfg.building_size)
    signs = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    local = signs[None, None] * half[:, :, None, :]  # [N, B, 4, 2]
    cos, sin = torch.cos(angles)[..., None], torch.sin(angles)[..., None]
    corners = torch.stack([cos * local[..., 0] - sin * local[..., 1],
                           sin * local[..., 0] + cos * local[..., 1]], -1) + centres[:, :, None]
    return {"centers": centres, "half": half, "angles": angles, "valid": valid, "corners": corners}


# ---------------------------------------------------------------------- rasterisation of polygons
def _segment_distance(p: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Distance from points p [..., P, 2] to segments a, b [..., E, 2]: [..., P, E]."""
    ab = (b - a)[..., None, :, :]
    ap = p[..., :, None, :] - a[..., None, :, :]
    t = ((ap * ab).sum(-1) / ab.pow(2).sum(-1).clamp_min(1e-12)).clamp(0, 1)
    return (ap - t[..., None] * ab).norm(dim=-1)


def rasterize_polygons(vertices: Tensor, valid: Tensor, size: int, chunk: int = 128) -> Tensor:
    """Anti-aliased polygon map [N, 3, S, S] (fill, edges, vertices) of polygons [N, B, V, 2] (x, y).

    fill = clamp(1/2 + signed distance inside), edge = clamp(1.5 - distance to the boundary),
    vertex = clamp(2 - distance to the nearest vertex), all in [0, 1]; the union over polygons is the max.
    Inside/outside is the even-odd crossing rule, so any simple polygon works. Each polygon is evaluated
    only on a square window around its bounding box (sized for the largest polygon), then max-scattered.
    """
    n, B, V, _ = vertices.shape
    if n == 0:
        return torch.zeros(0, 3, size, size)
    lo = vertices.amin(2).floor() - 2  # [N, B, 2] window origin (margin: the 2 px vertex discs)
    win = int((vertices.amax(2) - lo).max().ceil()) + 3
    win = min(win, size + 4)
    local = pixel_grid(win)  # [W*W, 2]
    pad = win  # canvas margin so that every window lands inside it
    side = size + 2 * pad
    out = []
    for s in range(0, n, chunk):
        v, ok, o = vertices[s:s + chunk], valid[s:s + chunk], lo[s:s + chunk]
        m = v.shape[0]
        p = o[:, :, None, :] + local  # [m, B, W*W, 2] pixel centres of each window
        a, b = v, v.roll(-1, dims=2)  # edges a -> b, [m, B, V, 2]
        dist = _segment_distance(p, a, b).amin(-1)  # [m, B, P]
        px, py = p[..., 0:1], p[..., 1:2]
        ax, ay, bx, by = a[..., 0][:, :, None], a[..., 1][:, :, None], b[..., 0][:, :, None], b[..., 1][:, :, None]
        straddle = (ay > py) != (by > py)
        xcross = ax + (py - ay) * (bx - ax) / torch.where(by == ay, torch.ones_like(by), by - ay)
        inside = ((straddle & (px < xcross)).sum(-1) % 2 == 1)  # [m, B, P]
        signed = torch.where(inside, dist, -dist)
        fill = (0.5 + signed).clamp(0, 1)
        edge = (1.5 - dist).clamp(0, 1)
        vdist = (p[..., :, None, :] - v[:, :, None]).norm(dim=-1).amin(-1)
        vert = (2.0 - vdist).clamp(0, 1)
        maps = torch.stack([fill, edge, vert], 2) * ok[:, :, None, None]  # [m, B, 3, P]
        pix = (p + pad).round().long()  # canvas coordinates (exact: integer origins)
        flat = (pix[..., 1] * side + pix[..., 0])[:, :, None, :].expand(-1, -1, 3, -1)  # [m, B, 3, P]
        canvas = torch.zeros(m, 3, side * side)
        canvas.scatter_reduce_(2, flat.permute(0, 2, 1, 3).reshape(m, 3, -1),
                               maps.permute(0, 2, 1, 3).reshape(m, 3, -1), reduce="amax")
        out.append(canvas.view(m, 3, side, side)[:, :, pad:pad + size, pad:pad + size])
    return torch.cat(out)


# ---------------------------------------------------------------------- image rendering
def _smooth(x: Tensor, length: float) -> Tensor:
    """Gaussian blur [N, C, S, S] -> same, reflect padding."""
    r = max(1, int(3 * length))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype) ** 2 / (2 * length**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def render_images(bld: dict[str, Tensor], cfg: SceneConfig, gen: torch.Generator) -> Tensor:
    """Aerial-like RGB images [N, 3, S, S] in [-1, 1] of the buildings at their true positions."""
    n, B = bld["valid"].shape
    S = cfg.size
    grid = pixel_grid(S)  # [P, 2]

    def noise(c: int, length: float) -> Tensor:
        z = _smooth(torch.randn((n, c, S, S), generator=gen), length)
        return z / z.flatten(1).std(1).clamp_min(1e-6)[:, None, None, None]

    # Ground: a per-scene earthy colour with a low-frequency texture.
    ground = torch.tensor([0.45, 0.42, 0.33])[None, :, None, None] + 0.06 * torch.randn((n, 3, 1, 1), generator=gen)
    img = ground + 0.05 * noise(1, 3.0) + 0.03 * noise(3, 1.0)
    # Vegetation: thresholded smooth noise, dark green with fine texture.
    veg_level = _uniform(gen, (n, 1, 1, 1), 0.4, 1.6)
    veg = torch.sigmoid(4 * (noise(1, 4.0) - veg_level))
    tree = torch.tensor([0.18, 0.32, 0.15])[None, :, None, None] + 0.05 * noise(1, 0.8)
    img = img * (1 - veg) + tree * veg
    # Roads: one or two bands along the scene's street directions (parallel/perpendicular to the buildings).
    theta = bld["angles"][:, :1]  # [N, 1]
    road = torch.zeros((n, S * S))
    for k in range(2):
        ang = theta + k * math.pi / 2
        normal = torch.stack([-torch.sin(ang), torch.cos(ang)], -1)  # [N, 1, 2]
        offset = _uniform(gen, (n, 1), 0.1 * S, 0.9 * S)
        centre = torch.full((n, 1, 2), S / 2)
        dist = ((grid[None] - centre) * normal).sum(-1) - (offset - S / 2)  # [N, P]
        width = _uniform(gen, (n, 1), 1.5, 3.0)
        present = (torch.rand((n, 1), generator=gen) < (0.8 if k == 0 else 0.4)).float()
        road = torch.maximum(road, present * (width + 0.5 - dist.abs()).clamp(0, 1))
    road = road.view(n, 1, S, S)
    img = img * (1 - road) + (0.55 + 0.03 * noise(1, 1.0)) * road
    # Buildings: local frame coordinates of every pixel for every building.
    rel = grid[None, None] - bld["centers"][:, :, None]  # [N, B, P, 2]
    cos, sin = torch.cos(bld["angles"])[..., None], torch.sin(bld["angles"])[..., None]
    lx = cos * rel[..., 0] + sin * rel[..., 1]
    ly = -sin * rel[..., 0] + cos * rel[..., 1]
    hx, hy = bld["half"][..., 0:1], bld["half"][..., 1:2]
    inside = ((hx + 0.5 - lx.abs()).clamp(0, 1) * (hy + 0.5 - ly.abs()).clamp(0, 1)) * bld["valid"][..., None]
    # Shadow: the footprint shifted along the sun direction (one per scene).
    sun = _uniform(gen, (n, 1), 0, 2 * math.pi)
    shift = _uniform(gen, (n, 1), 1.5, 3.5)
    sx, sy = (shift * torch.cos(sun))[..., None], (shift * torch.sin(sun))[..., None]
    rel_s = rel - torch.stack([sx, sy], -1)
    lxs = cos * rel_s[..., 0] + sin * rel_s[..., 1]
    lys = -sin * rel_s[..., 0] + cos * rel_s[..., 1]
    shadow = ((hx + 0.5 - lxs.abs()).clamp(0, 1) * (hy + 0.5 - lys.abs()).clamp(0, 1)) * bld["valid"][..., None]
    shadow = shadow.amax(1).view(n, 1, S, S)
    img = img * (1 - 0.55 * shadow)
    # Roofs: a colour per building from a palette, the two sides of the ridge lit differently.
    palette = torch.tensor([[0.62, 0.60, 0.58], [0.55, 0.30, 0.25], [0.40, 0.38, 0.40], [0.72, 0.68, 0.60],
                            [0.35, 0.28, 0.22]])
    colour = palette[torch.randint(0, len(palette), (n, B), generator=gen)]  # [N, B, 3]
    colour = colour + 0.04 * torch.randn((n, B, 3), generator=gen)
    ridge_along_x = (hx >= hy)  # the ridge follows the long side
    side = torch.where(ridge_along_x, ly, lx) > 0
    light = torch.where(side, 1.12, 0.85)  # [N, B, P]
    roof = colour[:, :, :, None] * light[:, :, None, :]  # [N, B, 3, P]
    cover = inside.amax(1)  # [N, P]
    owner = inside.argmax(1)  # [N, P] the building drawn at each pixel
    roof_px = torch.gather(roof, 1, owner[:, None, None, :].expand(-1, 1, 3, -1))[:, 0]  # [N, 3, P]
    cover = cover.view(n, 1, S, S)
    img = img * (1 - cover) + roof_px.view(n, 3, S, S) * cover
    img = _smooth(img, 0.6) + cfg.sensor_noise * torch.randn((n, 3, S, S), generator=gen)
    return (2 * img - 1).clamp(-1, 1)


# ---------------------------------------------------------------------- the dataset
def make_shift_scenes(n: int, cfg: SceneConfig, max_shift: float, seed: int = 0) -> dict[str, Tensor]:
    """Draw ``n`` scenes (see the module docstring): the annotation polygons are the buildings' true corners
    moved by one shift t [N, 2] (pixels, x then y) drawn uniformly in [-max_shift, max_shift]^2.

    Returns image, polygons (the map), shift, corners [N, B, 4, 2] (true), moved (the corners drawn in the
    map) and valid [N, B]. Deterministic in (n, cfg, max_shift, seed). No label noise: the experiment draws it.
    """
    if n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not max_shift > 0:
        raise ValueError(f"max_shift must be > 0, got {max_shift!r}")
    gen = torch.Generator().manual_seed(seed)
    bld = random_buildings(n, cfg, gen)
    image = render_images(bld, cfg, gen)
    shift = (2 * torch.rand((n, 2), generator=gen) - 1) * max_shift
    moved = bld["corners"] + shift[:, None, None, :]
    polygons = rasterize_polygons(moved, bld["valid"], cfg.size)
    return {"image": image, "polygons": polygons, "shift": shift, "corners": bld["corners"], "moved": moved,
            "valid": bld["valid"]}
