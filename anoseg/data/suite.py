"""Generated categories for the development suite: normal variation and defects of known kind.

The demo dataset (:mod:`anoseg.data.demo`) has clean images and loud defects; it shows the
library working. These categories are built to catch what the demo cannot: normal images that
vary the way real ones do (grain, uneven lighting, texture drift, position) and defects whose
kind and size are controlled, so a recipe that only finds one kind of defect shows it:

* ``suite_grain``: a grainy grey surface (like cast or sintered parts) under uneven light.
  Defects: ``spot`` (tiny dark pits, 0.05-0.3 % of the image), ``crack`` (thin dark polylines,
  1-2 px), ``region`` (a large faint patch, 10-30 % of the image, a few percent brighter or
  darker with soft edges: the low-contrast kind), ``band`` (a strip along one edge, 10-30 %
  of the image, behind a sharp, slightly wavy line, where the grain is smoothed and the
  surface a few percent brighter or darker: a change of finish, like the "uneven" regions
  of magnetic tiles).
* ``suite_weave``: a woven fabric whose tint, tilt and lighting drift from image to image.
  Defects: ``thread`` (one thread of a different shade across the image: thin, long, faint),
  ``hole`` (a round hole, 0.5-2 %), ``region`` (a large faint discolouration, 10-30 %).
* ``suite_object``: a shaded disc with a notch and a hole, anywhere in a small range of
  positions and under varying light. Defects: ``missing`` (a chunk of the rim missing: a
  structural change drawn in the background colour), ``hole`` (the inner hole moved off
  centre: structure, no foreign colour), ``spot`` (small dark marks).

The masks are the changed pixels where the change is visible (a faint region's mask is the
region where its weight exceeds half of its peak). Everything is drawn with NumPy and Pillow
from fixed seeds; :func:`write_suite` writes the categories in MVTec AD layout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, Tuple, Union

import numpy as np
from PIL import Image

SUITE_VERSION = 2
SUITE_IMAGE_SIZE = 128
SUITE_NUM_TRAIN = 80
SUITE_NUM_TEST_GOOD = 20
SUITE_NUM_PER_DEFECT = 10
_SEED = 31337

_Array = np.ndarray


def _grid(size: int) -> Tuple[_Array, _Array]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> _Array:
    """Smooth random field ``(size, size)`` in about ``[0, 1]``: a ``cells x cells`` grid of
    uniform values upsampled bicubically."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    field = Image.fromarray(coarse, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _lighting(rng: np.random.Generator, size: int, strength: float) -> _Array:
    """A linear light gradient in a random direction times a broad vignette."""
    yy, xx = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = ((xx / size - 0.5) * np.cos(angle) + (yy / size - 0.5) * np.sin(angle))
    vignette = 1.0 - 0.5 * strength * (((xx / size - 0.5) ** 2 + (yy / size - 0.5) ** 2) * 2)
    return (1.0 + strength * ramp * rng.uniform(0.5, 1.0)) * vignette


def _segment_distance(yy: _Array, xx: _Array, a: Tuple[float, float],
                      b: Tuple[float, float]) -> _Array:
    ay, ax = a
    vy, vx = b[0] - ay, b[1] - ax
    t = np.clip(((yy - ay) * vy + (xx - ax) * vx) / max(vy * vy + vx * vx, 1e-6), 0.0, 1.0)
    return np.hypot(yy - (ay + t * vy), xx - (ax + t * vx))


def _polyline(rng: np.random.Generator, size: int, length: float, width: float,
              start: Tuple[float, float]) -> _Array:
    """A wandering thin line of about ``length`` pixels from ``start``."""
    yy, xx = _grid(size)
    region = np.zeros((size, size), dtype=bool)
    y, x = start
    heading = rng.uniform(0, 2 * np.pi)
    steps = max(2, int(length / 6))
    for _ in range(steps):
        heading += rng.normal(0.0, 0.5)
        ny, nx = y + 6 * np.sin(heading), x + 6 * np.cos(heading)
        region |= _segment_distance(yy, xx, (y, x), (ny, nx)) <= width / 2
        y, x = float(np.clip(ny, 2, size - 2)), float(np.clip(nx, 2, size - 2))
    return region


def _soft_region(rng: np.random.Generator, size: int, area: Tuple[float, float]
                 ) -> Tuple[_Array, _Array]:
    """A large blob with soft edges: (weight in [0, 1], mask = weight >= 0.5)."""
    fraction = rng.uniform(*area)
    field = smooth_noise(rng, size, int(rng.integers(2, 4)))
    yy, xx = _grid(size)
    cy, cx = rng.uniform(0.3, 0.7, size=2) * size
    field = field - 1.5 * np.hypot(yy - cy, xx - cx) / size  # one blob, not scattered
    threshold = np.quantile(field, 1.0 - fraction)
    spread = 0.04
    weight = np.clip((field - threshold) / spread + 0.5, 0.0, 1.0)
    return weight, weight >= 0.5


# ----------------------------------------------------------------------------- categories

def _grain_good(rng: np.random.Generator, size: int) -> Tuple[_Array, Dict]:
    base = rng.uniform(0.45, 0.6)
    grain = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    grain = np.asarray(Image.fromarray(grain, mode="F").resize(
        (size // 2, size // 2), Image.BILINEAR).resize((size, size), Image.BILINEAR))
    mottling = smooth_noise(rng, size, 8) - 0.5
    fine = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    grey = base * _lighting(rng, size, 0.3) + 0.05 * mottling + 0.035 * grain + 0.03 * fine
    image = np.repeat(grey[..., None], 3, axis=2) * np.array([1.0, 0.99, 0.97])
    return image.astype(np.float32), {"base": base}


def _grain_defect(defect: str, image: _Array, info: Dict, rng: np.random.Generator
                  ) -> _Array:
    size = image.shape[0]
    yy, xx = _grid(size)
    if defect == "spot":
        region = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.1, 0.9, size=2) * size
            r = rng.uniform(1.0, 2.5)
            region |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[region] *= rng.uniform(0.35, 0.6)
        return region
    if defect == "crack":
        start = tuple(rng.uniform(0.2, 0.8, size=2) * size)
        region = _polyline(rng, size, rng.uniform(0.25, 0.5) * size, rng.uniform(1.0, 2.0),
                           start)
        image[region] *= rng.uniform(0.45, 0.65)
        return region
    if defect == "region":
        weight, region = _soft_region(rng, size, (0.10, 0.30))
        change = rng.choice([-1.0, 1.0]) * rng.uniform(0.08, 0.14)
        image *= (1.0 + change * weight)[..., None]
        return region
    if defect == "band":
        region = _edge_band(rng, size, (0.10, 0.30))
        change = rng.choice([-1.0, 1.0]) * rng.uniform(0.03, 0.08)
        image[region] = _box_blur(image, 2)[region] * (1.0 + change)
        return region
    raise KeyError(defect)


def _edge_band(rng: np.random.Generator, size: int, area: Tuple[float, float]) -> _Array:
    """A strip along a random edge covering about ``area`` of the image, bounded by a sharp
    line with a slight wave."""
    yy, xx = _grid(size)
    depth = rng.uniform(*area) * size
    side = int(rng.integers(4))
    inward = (yy, size - yy, xx, size - xx)[side]  # distance from the chosen edge
    along = xx if side < 2 else yy
    wave = rng.uniform(0.5, 2.0) * np.sin(2 * np.pi * rng.uniform(1.0, 3.0) * along / size
                                          + rng.uniform(0, 2 * np.pi))
    return inward < depth + wave


def _box_blur(image: _Array, radius: int) -> _Array:
    """``image`` ``(H, W, C)`` averaged over a ``(2 radius + 1)`` square, edges replicated."""
    k = 2 * radius + 1
    padded = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    rows = sum(padded[i:i + image.shape[0]] for i in range(k)) / k
    return sum(rows[:, j:j + image.shape[1]] for j in range(k)) / k


def _weave_good(rng: np.random.Generator, size: int) -> Tuple[_Array, Dict]:
    yy, xx = _grid(size)
    period = rng.uniform(9.0, 11.0)
    tilt = np.deg2rad(rng.uniform(-4.0, 4.0))
    u = xx * np.cos(tilt) + yy * np.sin(tilt) + rng.uniform(0.0, period)
    v = -xx * np.sin(tilt) + yy * np.cos(tilt) + rng.uniform(0.0, period)
    across_u = np.sin(np.pi * np.mod(u, period) / period)
    across_v = np.sin(np.pi * np.mod(v, period) / period)
    on_top = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    shade = np.where(on_top, across_v ** 0.7 * (0.85 + 0.15 * across_u),
                     across_u ** 0.7 * (0.85 + 0.15 * across_v))
    tint = rng.uniform(0.92, 1.08, size=3)
    warp = np.array([0.55, 0.62, 0.70]) * tint
    weft = np.array([0.50, 0.57, 0.64]) * tint
    colour = np.where(on_top[..., None], warp, weft)
    light = _lighting(rng, size, 0.25) * (1.0 + 0.04 * (smooth_noise(rng, size, 6) - 0.5))
    image = colour * ((0.5 + 0.45 * shade) * light)[..., None]
    image = image + rng.normal(0.0, 0.015, image.shape)
    return image.astype(np.float32), {"u": u, "v": v, "period": period, "on_top": on_top}


def _weave_defect(defect: str, image: _Array, info: Dict, rng: np.random.Generator
                  ) -> _Array:
    size = image.shape[0]
    yy, xx = _grid(size)
    if defect == "thread":
        period = info["period"]
        axis = info["u"] if rng.random() < 0.5 else info["v"]
        index = np.floor(axis / period)
        chosen = rng.choice(np.unique(index[size // 4:3 * size // 4, size // 4:3 * size // 4]))
        on_top = info["on_top"] if axis is info["v"] else ~info["on_top"]
        region = (index == chosen) & on_top
        image[region] *= rng.uniform(0.75, 0.85)
        return region
    if defect == "hole":
        cy, cx = rng.uniform(0.2, 0.8, size=2) * size
        r = np.sqrt(rng.uniform(0.005, 0.02) * size * size / np.pi)
        region = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        image[region] = np.array([0.12, 0.11, 0.10]) + rng.normal(0.0, 0.015, (region.sum(), 3))
        return region
    if defect == "region":
        weight, region = _soft_region(rng, size, (0.10, 0.30))
        shift = np.array([1.0, 0.93, 0.85]) if rng.random() < 0.5 else np.array(
            [0.9, 0.95, 1.0])
        strength = rng.uniform(0.5, 1.0)
        image *= 1.0 + (shift - 1.0)[None, None, :] * (strength * weight)[..., None]
        return region
    raise KeyError(defect)


def _object_good(rng: np.random.Generator, size: int) -> Tuple[_Array, Dict]:
    yy, xx = _grid(size)
    cy = size / 2 + rng.uniform(-6, 6)
    cx = size / 2 + rng.uniform(-6, 6)
    outer = rng.uniform(36, 40)
    hole_r = 0.35 * outer
    notch_angle = rng.uniform(0, 2 * np.pi)
    info = {"cy": cy, "cx": cx, "outer": outer, "hole_r": hole_r, "hole_y": cy, "hole_x": cx,
            "notch": notch_angle}
    background = np.array([0.20, 0.22, 0.25]) * rng.uniform(0.9, 1.1)
    info["background"] = background
    image = _draw_object(rng, size, info, background)
    return image, info


def _draw_object(rng: np.random.Generator, size: int, info: Dict, background: _Array) -> _Array:
    yy, xx = _grid(size)
    dy, dx = yy - info["cy"], xx - info["cx"]
    radius = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    notch = (np.abs(np.angle(np.exp(1j * (theta - info["notch"])))) < 0.12) & (
        radius > info["outer"] - 6)
    hole = np.hypot(yy - info["hole_y"], xx - info["hole_x"]) < info["hole_r"]
    body = (radius <= info["outer"]) & ~notch & ~hole
    metal = np.array([0.78, 0.74, 0.66]) * rng.uniform(0.92, 1.08)
    light = 0.75 + 0.25 * (-(dx * np.cos(0.8) + dy * np.sin(0.8)) / info["outer"])
    rings = 1.0 + 0.03 * np.sin(radius * 0.9)
    image = np.where(body[..., None], metal * (light * rings)[..., None], background)
    image = image * _lighting(rng, size, 0.15)[..., None]
    info["body"] = body
    return (image + rng.normal(0.0, 0.012, image.shape)).astype(np.float32)


def _object_defect(defect: str, image: _Array, info: Dict, rng: np.random.Generator
                   ) -> _Array:
    size = image.shape[0]
    yy, xx = _grid(size)
    body = info["body"]
    if defect == "missing":
        angle = info["notch"] + rng.uniform(0.8, 2 * np.pi - 0.8)
        by = info["cy"] + info["outer"] * np.sin(angle)
        bx = info["cx"] + info["outer"] * np.cos(angle)
        r = rng.uniform(6, 10)
        region = ((yy - by) ** 2 + (xx - bx) ** 2 <= r * r) & body
        image[region] = info["background"] + rng.normal(0.0, 0.012, (region.sum(), 3))
        return region
    if defect == "hole":
        # Redraw the part with the hole moved: the changed pixels are the defect.
        moved = dict(info)
        offset = rng.uniform(0.25, 0.45) * info["outer"]
        angle = rng.uniform(0, 2 * np.pi)
        moved["hole_y"] = info["cy"] + offset * np.sin(angle)
        moved["hole_x"] = info["cx"] + offset * np.cos(angle)
        old_hole = np.hypot(yy - info["hole_y"], xx - info["hole_x"]) < info["hole_r"]
        new_hole = np.hypot(yy - moved["hole_y"], xx - moved["hole_x"]) < info["hole_r"]
        region = old_hole ^ new_hole
        image[new_hole & ~old_hole] = info["background"]
        fill = image[body & ~new_hole].mean(axis=0) if (body & ~new_hole).any() else 0.7
        image[old_hole & ~new_hole] = fill
        return region
    if defect == "spot":
        region = np.zeros((size, size), dtype=bool)
        for _ in range(int(rng.integers(1, 4))):
            angle = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.5, 0.85) * info["outer"]
            cy = info["cy"] + dist * np.sin(angle)
            cx = info["cx"] + dist * np.cos(angle)
            r = rng.uniform(1.5, 3.0)
            region |= ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & body
        image[region] *= 0.45
        return region
    raise KeyError(defect)


SUITE_CATEGORIES: Dict[str, Tuple[Callable, Callable, Tuple[str, ...]]] = {
    "suite_grain": (_grain_good, _grain_defect, ("spot", "crack", "region", "band")),
    "suite_weave": (_weave_good, _weave_defect, ("thread", "hole", "region")),
    "suite_object": (_object_good, _object_defect, ("missing", "hole", "spot")),
}
"""Category -> (draw a normal image, draw a defect into it, defect types)."""


def render(category: str, defect: Union[str, None], seed_path: Tuple[int, ...],
           size: int = SUITE_IMAGE_SIZE) -> Tuple[_Array, Union[_Array, None]]:
    """One uint8 image ``(H, W, 3)`` and, for a defect, its 0/255 mask ``(H, W)``."""
    good, draw_defect, _ = SUITE_CATEGORIES[category]
    rng = np.random.default_rng((_SEED,) + seed_path)
    image, info = good(rng, size)
    mask = None
    if defect is not None:
        region = draw_defect(defect, image, info, rng)
        if not region.any():
            raise RuntimeError(f"suite defect {category}/{defect} {seed_path} drew nothing")
        mask = region.astype(np.uint8) * 255
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8), mask


def write_suite(root: Union[str, Path]) -> Path:
    """Write every suite category under ``root`` (MVTec AD layout); reuse a finished copy."""
    root = Path(root)
    marker = root / ".anoseg_suite_complete"
    if marker.is_file() and json.loads(marker.read_text()).get("version") == SUITE_VERSION:
        return root
    for c, (category, (_, _, defects)) in enumerate(SUITE_CATEGORIES.items()):
        folder = root / category
        for split, count, d_index in (("train", SUITE_NUM_TRAIN, 0),
                                      ("test", SUITE_NUM_TEST_GOOD, 1)):
            out = folder / split / "good"
            out.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image, _ = render(category, None, (c, d_index, 0, i))
                Image.fromarray(image).save(out / f"{i:03d}.png")
        for d, defect in enumerate(defects, start=1):
            (folder / "test" / defect).mkdir(parents=True, exist_ok=True)
            (folder / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
            for i in range(SUITE_NUM_PER_DEFECT):
                image, mask = render(category, defect, (c, 2, d, i))
                Image.fromarray(image).save(folder / "test" / defect / f"{i:03d}.png")
                Image.fromarray(mask).save(folder / "ground_truth" / defect / f"{i:03d}_mask.png")
    marker.write_text(json.dumps({"version": SUITE_VERSION,
                                  "categories": list(SUITE_CATEGORIES)}) + "\n")
    return root
