"""A small built-in dataset in MVTec AD layout, drawn procedurally, for trying the library.

Two categories are generated with NumPy and Pillow only, from fixed seeds, so the same library
versions always give the same pixels:

* ``demo_texture``: a woven fabric (two thread colours, random phase, tilt and tint per image).
* ``demo_object``: a hexagonal nut with a round hole on a plain background (random position,
  size, rotation and colour per image).

Test images carry one defect each, drawn in a contrasting colour so that a model trained for a
few minutes can find it: ``scratch`` (thin lines), ``spot`` (dark blobs), ``stain`` (a coloured
tint) and ``cut`` (a missing piece). The masks are exactly the drawn pixels, saved as 0/255 PNG.

The dataset (about 100 images of 128x128 per category, 8 MB in all) is written once to a cache
folder and reused. See :func:`default_demo_root` for where.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
from PIL import Image

from anoseg.errors import DataError

DEMO_VERSION = 1
"""Bumped whenever the generated pixels or layout change, so old caches are not reused."""

DEMO_CATEGORIES: Tuple[str, ...] = ("demo_texture", "demo_object")
DEMO_DEFECT_TYPES: Tuple[str, ...] = ("scratch", "spot", "stain", "cut")
DEMO_IMAGE_SIZE = 128
DEMO_NUM_TRAIN = 60
DEMO_NUM_TEST_GOOD = 12
DEMO_NUM_PER_DEFECT = 8

MARKER_NAME = ".anoseg_demo_complete"
"""Written last into a finished dataset; a folder without it is never used."""

_SEED = 20220
_PARTIAL_TAG = ".partial-"
_STALE_PARTIAL_SECONDS = 3600.0

_Array = np.ndarray
_RGB = Tuple[float, float, float]


def default_demo_root() -> Path:
    """Return the folder where the demo dataset lives.

    ``$ANOSEG_DEMO_DIR/v<version>`` if that variable is set, else
    ``$XDG_CACHE_HOME/anoseg/demo/v<version>``, else ``~/.cache/anoseg/demo/v<version>``. The
    version in the path makes a new format regenerate instead of reading an old cache.
    """
    version = f"v{DEMO_VERSION}"
    base = os.environ.get("ANOSEG_DEMO_DIR")
    if base:
        return Path(base).expanduser() / version
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "anoseg" / "demo" / version


# ---------------------------------------------------------------------------- drawing scenes


@dataclass
class _Scene:
    """A defect-free image being drawn, with what defects need to know about it."""

    image: _Array
    """(H, W, 3) float32 in [0, 1]."""
    surface: _Array
    """(H, W) bool: where defects may appear (the whole fabric, or the nut's body)."""
    backing: _RGB
    """Colour that shows through a missing piece."""
    noise_std: float
    pick_point: Callable[[np.random.Generator], Tuple[float, float]]
    """Draws a (y, x) defect centre on the surface."""
    outline: Optional[Tuple[float, float, float]] = None
    """(centre y, centre x, radius) of an object, for defects that bite into its rim."""


def _grid(size: int) -> Tuple[_Array, _Array]:
    # Pixel centres, so that geometry is symmetric about the image centre.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _texture_scene(rng: np.random.Generator, size: int) -> _Scene:
    """A plain weave: horizontal and vertical threads alternating over and under."""
    yy, xx = _grid(size)
    period = 10.0
    tilt = np.deg2rad(rng.uniform(-3.0, 3.0))
    u = xx * np.cos(tilt) + yy * np.sin(tilt) + rng.uniform(0.0, period)
    v = -xx * np.sin(tilt) + yy * np.cos(tilt) + rng.uniform(0.0, period)
    across_u = np.sin(np.pi * np.mod(u, period) / period)  # 0 at thread edges, 1 in the middle
    across_v = np.sin(np.pi * np.mod(v, period) / period)
    horizontal_on_top = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    # The thread on top is lit across its width and dips where it goes under the next one.
    shade = np.where(horizontal_on_top, across_v ** 0.7 * (0.85 + 0.15 * across_u),
                     across_u ** 0.7 * (0.85 + 0.15 * across_v))
    intensity = 0.5 + 0.45 * shade
    tint = rng.uniform(0.95, 1.05, size=3)
    warp = np.array([0.82, 0.68, 0.50]) * tint
    weft = np.array([0.74, 0.60, 0.44]) * tint
    colour = np.where(horizontal_on_top[..., None], warp, weft)
    image = (colour * intensity[..., None]).astype(np.float32)

    def pick_point(r: np.random.Generator) -> Tuple[float, float]:
        margin = size * 0.15
        return float(r.uniform(margin, size - margin)), float(r.uniform(margin, size - margin))

    return _Scene(image, np.ones((size, size), dtype=bool), (0.05, 0.04, 0.04), 0.025,
                  pick_point)


def _object_scene(rng: np.random.Generator, size: int) -> _Scene:
    """A shaded hexagonal nut with a round hole, roughly centred on a plain background."""
    yy, xx = _grid(size)
    scale = size / 128.0
    cy = size / 2 + rng.uniform(-4.0, 4.0) * scale
    cx = size / 2 + rng.uniform(-4.0, 4.0) * scale
    outer = rng.uniform(38.0, 42.0) * scale  # circumradius of the hexagon
    hole = 0.42 * outer
    rotation = rng.uniform(0.0, np.pi / 3)
    dy, dx = yy - cy, xx - cx
    radius = np.hypot(dy, dx)
    inside_hexagon = np.ones((size, size), dtype=bool)
    for k in range(6):
        angle = rotation + k * np.pi / 3
        inside_hexagon &= dx * np.cos(angle) + dy * np.sin(angle) <= outer * np.cos(np.pi / 6)
    body = inside_hexagon & (radius > hole)

    background = np.array([0.84, 0.84, 0.82]) * rng.uniform(0.97, 1.03)
    metal = np.array([0.30, 0.42, 0.64]) * rng.uniform(0.93, 1.07, size=3)
    # Light from the top left, and a darker chamfer around the hole.
    light = 0.8 + 0.2 * (-(dx + dy) / (np.sqrt(2.0) * outer))
    chamfer = np.where(radius < hole + 3.0 * scale, 0.7, 1.0)
    image = np.where(body[..., None], metal * (light * chamfer)[..., None], background)

    def pick_point(r: np.random.Generator) -> Tuple[float, float]:
        # On the nut's body, between the hole and the flats of the hexagon.
        angle = r.uniform(0.0, 2 * np.pi)
        dist = r.uniform(0.58, 0.75) * outer
        return float(cy + dist * np.sin(angle)), float(cx + dist * np.cos(angle))

    return _Scene(image.astype(np.float32), body, tuple(background), 0.015, pick_point,
                  outline=(cy, cx, outer))


_SCENES: Dict[str, Callable[[np.random.Generator, int], _Scene]] = {
    "demo_texture": _texture_scene,
    "demo_object": _object_scene,
}


# ----------------------------------------------------------------------------------- defects


def _segment_distance(yy: _Array, xx: _Array, a: Tuple[float, float],
                      b: Tuple[float, float]) -> _Array:
    """Distance of every pixel centre to the segment a-b (points as (y, x))."""
    ay, ax = a
    by, bx = b
    vy, vx = by - ay, bx - ax
    t = ((yy - ay) * vy + (xx - ax) * vx) / max(vy * vy + vx * vx, 1e-6)
    t = np.clip(t, 0.0, 1.0)
    return np.hypot(yy - (ay + t * vy), xx - (ax + t * vx))


def _paint(scene: _Scene, region: _Array, colour: _RGB, alpha: float = 1.0) -> _Array:
    """Blend ``colour`` into the scene on ``region`` ∩ surface and return the painted pixels."""
    region = region & scene.surface
    target = np.asarray(colour, dtype=np.float32)
    scene.image[region] = (1.0 - alpha) * scene.image[region] + alpha * target
    return region


def _scratch(scene: _Scene, rng: np.random.Generator) -> _Array:
    size = scene.image.shape[0]
    yy, xx = _grid(size)
    region = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 3))):
        cy, cx = scene.pick_point(rng)
        angle = rng.uniform(0.0, np.pi)
        half = rng.uniform(0.12, 0.2) * size
        a = (cy - half * np.sin(angle), cx - half * np.cos(angle))
        b = (cy + half * np.sin(angle), cx + half * np.cos(angle))
        region |= _segment_distance(yy, xx, a, b) <= rng.uniform(1.0, 1.6) * size / 128.0
    return _paint(scene, region, (0.97, 0.97, 0.93))


def _spot(scene: _Scene, rng: np.random.Generator) -> _Array:
    size = scene.image.shape[0]
    yy, xx = _grid(size)
    cy, cx = scene.pick_point(rng)
    region = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(1, 4))):
        oy, ox = rng.uniform(-0.06, 0.06, size=2) * size
        ry, rx = rng.uniform(0.025, 0.055, size=2) * size
        region |= ((yy - cy - oy) / ry) ** 2 + ((xx - cx - ox) / rx) ** 2 <= 1.0
    return _paint(scene, region, (0.16, 0.09, 0.05))


def _stain(scene: _Scene, rng: np.random.Generator) -> _Array:
    size = scene.image.shape[0]
    yy, xx = _grid(size)
    cy, cx = scene.pick_point(rng)
    region = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(3, 6))):
        oy, ox = rng.uniform(-0.08, 0.08, size=2) * size
        r = rng.uniform(0.04, 0.08) * size
        region |= (yy - cy - oy) ** 2 + (xx - cx - ox) ** 2 <= r * r
    colours = ((0.85, 0.10, 0.10), (0.10, 0.65, 0.15), (0.95, 0.55, 0.0))
    colour = colours[int(rng.integers(len(colours)))]
    return _paint(scene, region, colour, alpha=0.65)


def _cut(scene: _Scene, rng: np.random.Generator) -> _Array:
    size = scene.image.shape[0]
    yy, xx = _grid(size)
    if scene.outline is not None:
        # A chunk bitten out of the object's rim, showing the background.
        cy, cx, outer = scene.outline
        angle = rng.uniform(0.0, 2 * np.pi)
        by = cy + 0.9 * outer * np.sin(angle)
        bx = cx + 0.9 * outer * np.cos(angle)
        r = rng.uniform(0.07, 0.10) * size
        region = (yy - by) ** 2 + (xx - bx) ** 2 <= r * r
    else:
        # A rectangular hole in the fabric.
        cy, cx = scene.pick_point(rng)
        angle = rng.uniform(0.0, np.pi)
        along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
        across = -(yy - cy) * np.cos(angle) + (xx - cx) * np.sin(angle)
        half_len = rng.uniform(0.07, 0.11) * size
        half_wid = rng.uniform(0.025, 0.045) * size
        region = (np.abs(along) <= half_len) & (np.abs(across) <= half_wid)
    return _paint(scene, region, scene.backing)


_DEFECTS: Dict[str, Callable[[_Scene, np.random.Generator], _Array]] = {
    "scratch": _scratch, "spot": _spot, "stain": _stain, "cut": _cut,
}


def _render(category: str, defect: Optional[str], seed_path: Tuple[int, ...],
            size: int = DEMO_IMAGE_SIZE) -> Tuple[_Array, Optional[_Array]]:
    """Draw one image (and its mask when ``defect`` is given) from its own seed.

    Returns:
        The (H, W, 3) uint8 image and the (H, W) uint8 0/255 mask, or ``None`` for a good image.
    """
    rng = np.random.default_rng((_SEED,) + seed_path)
    scene = _SCENES[category](rng, size)
    region = _DEFECTS[defect](scene, rng) if defect is not None else None
    # Sensor noise last, so defect pixels look as noisy as the rest.
    noisy = scene.image + rng.normal(0.0, scene.noise_std, size=scene.image.shape)
    image = np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)
    mask = None if region is None else region.astype(np.uint8) * 255
    return image, mask


def _save_png(array: _Array, path: Path) -> None:
    # Low compression: the noise barely compresses anyway and level 1 is several times faster.
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _write_category(folder: Path, category: str) -> None:
    cat_index = DEMO_CATEGORIES.index(category)
    good_train = folder / "train" / "good"
    good_test = folder / "test" / "good"
    good_train.mkdir(parents=True)
    good_test.mkdir(parents=True)
    for i in range(DEMO_NUM_TRAIN):
        _save_png(_render(category, None, (cat_index, 0, 0, i))[0], good_train / f"{i:03d}.png")
    for i in range(DEMO_NUM_TEST_GOOD):
        _save_png(_render(category, None, (cat_index, 1, 0, i))[0], good_test / f"{i:03d}.png")
    for d, defect in enumerate(DEMO_DEFECT_TYPES, start=1):
        image_dir = folder / "test" / defect
        mask_dir = folder / "ground_truth" / defect
        image_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for i in range(DEMO_NUM_PER_DEFECT):
            image, mask = _render(category, defect, (cat_index, 1, d, i))
            if mask is None or not mask.any():  # the drawing code guarantees this; keep it so
                raise RuntimeError(f"demo defect {category}/{defect}/{i} drew nothing")
            _save_png(image, image_dir / f"{i:03d}.png")
            _save_png(mask, mask_dir / f"{i:03d}_mask.png")


def _write_dataset(folder: Path) -> None:
    """Write both categories into ``folder`` and, last, the completion marker."""
    for category in DEMO_CATEGORIES:
        _write_category(folder / category, category)
    marker = {"version": DEMO_VERSION, "categories": list(DEMO_CATEGORIES),
              "image_size": DEMO_IMAGE_SIZE}
    (folder / MARKER_NAME).write_text(json.dumps(marker) + "\n")


# ------------------------------------------------------------------------- caching on disk


def _is_complete(root: Path) -> bool:
    return (root / MARKER_NAME).is_file()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _remove_stale_partials(root: Path) -> None:
    """Delete leftovers of generations that were killed long ago (best effort)."""
    now = time.time()
    for partial in root.parent.glob(f".{root.name}{_PARTIAL_TAG}*"):
        try:
            if now - partial.stat().st_mtime > _STALE_PARTIAL_SECONDS:
                shutil.rmtree(partial, ignore_errors=True)
        except OSError:
            pass  # another process removed it first


def _not_a_demo_folder(root: Path) -> DataError:
    return DataError(f"demo dataset folder {root} exists but is not a complete demo dataset "
                     f"(no {MARKER_NAME} file); expected an empty or missing folder. Delete it, "
                     f"or set ANOSEG_DEMO_DIR to another folder")


def _publish(partial: Path, root: Path) -> None:
    """Move a finished dataset to ``root`` in one rename, or accept a racing winner's."""
    for _ in range(3):
        try:
            # One rename: readers see no dataset or a whole one. POSIX also replaces an empty
            # folder here; a non-empty one (another process won) makes it fail.
            os.replace(partial, root)
            return
        except OSError:
            if _is_complete(root):
                return
            if _is_empty_dir(root):
                try:
                    root.rmdir()  # Windows cannot rename onto an existing folder
                except OSError:
                    pass
                continue
            if root.exists():
                raise _not_a_demo_folder(root) from None
            raise


def ensure_demo_dataset(root: Optional[Union[str, Path]] = None) -> Path:
    """Generate the demo dataset unless it is already there, and return its root.

    Generation (about a second) goes into a hidden sibling folder that is renamed to ``root``
    only when complete, so an interrupted run never leaves half a dataset, and two processes
    racing both end up using the one that was renamed first.

    Args:
        root: Folder to hold the categories; :func:`default_demo_root` if ``None``. It may exist
            if it is empty.

    Returns:
        The root folder, holding one MVTec-layout folder per name in :data:`DEMO_CATEGORIES`.

    Raises:
        DataError: ``root`` exists, is not empty and is not a complete demo dataset, or its
            folder cannot be written (the message names ``ANOSEG_DEMO_DIR``, which moves it).
    """
    root = Path(root).expanduser() if root is not None else default_demo_root()
    if _is_complete(root):
        return root
    if root.exists() and not _is_empty_dir(root):
        raise _not_a_demo_folder(root)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(root)
        partial = Path(tempfile.mkdtemp(prefix=f".{root.name}{_PARTIAL_TAG}", dir=root.parent))
    except OSError as exc:  # a read-only home, a path through a file, a full disk
        raise DataError(f"cannot write the demo dataset to {root.parent}: "
                        f"{exc.strerror or exc}; set the environment variable ANOSEG_DEMO_DIR "
                        "to a writable folder (or pass data.root / --data-root)") from None
    try:
        os.chmod(partial, 0o755)  # mkdtemp makes it private; the cache should read like any folder
        _write_dataset(partial)
        _publish(partial, root)
    except OSError as exc:
        raise DataError(f"cannot write the demo dataset to {root.parent}: "
                        f"{exc.strerror or exc}; set the environment variable ANOSEG_DEMO_DIR "
                        "to a writable folder with some free space") from None
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    return root
