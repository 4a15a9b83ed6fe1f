"""Synthetic anomalies (paper 3.1): hard augmentation of a copy, then CutPaste into the original
(optionally also local edits of the image itself, :func:`local_edit`, noise regions,
:func:`noise_region`, and thin curved cracks, :func:`crack`).

All functions work on one float image ``(3, H, W)`` in ``[0, 1]`` and draw every random number
from the ``torch.Generator`` they are given, so a sample is a pure function of its seed: the
same seed gives the same anomaly in any data-loader worker, on any run, after any resume.

The mask returned to the training code is a *normality* mask (1 = normal, 0 = pasted and
changed: a pasted pixel equal to the one it covers stays 1, and with
``synthesis.label_local_z`` so does one changed by less than that many local stds of the
image, :func:`changed_pixels`), the target of the map decoder (see ``docs/design.md``).

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> image = torch.rand(3, 64, 64)
    >>> anomalous, normality = synthesize_anomaly(image, SynthesisConfig(), g)
    >>> bool(((anomalous != image).any(0) <= (normality[0] == 0)).all())
    True
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from anoseg.config import REGION_SOURCES, SynthesisConfig


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _randint(generator: torch.Generator, low: int, high: int) -> int:
    """Integer in ``[low, high]`` (inclusive)."""
    return int(torch.randint(low, high + 1, (), generator=generator).item())


def _chance(generator: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=generator).item() < p


def rotate(image: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate by ``angle`` degrees; multiples of 90 on square images are exact (no resampling)."""
    quarter = angle / 90.0
    if quarter.is_integer() and image.shape[-1] == image.shape[-2]:
        return torch.rot90(image, k=int(quarter) % 4, dims=(-2, -1))
    return TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR)


def permute_patches(image: torch.Tensor, grid: int, generator: torch.Generator) -> torch.Tensor:
    """Cut into ``grid x grid`` tiles and shuffle them; the identity order is never drawn.

    Pixels beyond the last whole tile (when the side is not a multiple of ``grid``) stay put.
    """
    _, height, width = image.shape
    th, tw = height // grid, width // grid
    n = grid * grid
    order = torch.randperm(n, generator=generator)
    if torch.equal(order, torch.arange(n)):
        order = torch.roll(order, 1)
    tiles = [image[:, r * th:(r + 1) * th, c * tw:(c + 1) * tw]
             for r in range(grid) for c in range(grid)]
    out = image.clone()
    for position, source in enumerate(order.tolist()):
        r, c = divmod(position, grid)
        out[:, r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[source]
    return out


def color_jitter(image: torch.Tensor, cfg: SynthesisConfig,
                 generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter with factors drawn from ``generator``."""
    out = image
    if cfg.jitter_brightness > 0:
        out = TF.adjust_brightness(out, _uniform(generator, 1 - cfg.jitter_brightness,
                                                 1 + cfg.jitter_brightness))
    if cfg.jitter_contrast > 0:
        out = TF.adjust_contrast(out, _uniform(generator, 1 - cfg.jitter_contrast,
                                               1 + cfg.jitter_contrast))
    if cfg.jitter_saturation > 0:
        out = TF.adjust_saturation(out, _uniform(generator, 1 - cfg.jitter_saturation,
                                                 1 + cfg.jitter_saturation))
    if cfg.jitter_hue > 0:
        out = TF.adjust_hue(out, _uniform(generator, -cfg.jitter_hue, cfg.jitter_hue))
    return out.clamp(0.0, 1.0)


def hard_augment(image: torch.Tensor, cfg: SynthesisConfig,
                 generator: torch.Generator) -> Tuple[torch.Tensor, dict]:
    """Rotation, patch permutation and colour jitter, each applied independently.

    Returns:
        The augmented copy and a dict saying which augmentations fired (for tests and logs).
    """
    fired = {"rotation": False, "permutation": False, "jitter": False}
    out = image
    if _chance(generator, cfg.rotation_p):
        index = _randint(generator, 0, len(cfg.rotation_angles) - 1)
        out = rotate(out, float(cfg.rotation_angles[index]))
        fired["rotation"] = True
    if _chance(generator, cfg.permutation_p):
        out = permute_patches(out, cfg.permutation_grid, generator)
        fired["permutation"] = True
    if _chance(generator, cfg.jitter_p):
        out = color_jitter(out, cfg, generator)
        fired["jitter"] = True
    return out, fired


def _rectangle_patch(height: int, width: int, cfg: SynthesisConfig,
                     generator: torch.Generator) -> Tuple[int, int]:
    low, high = cfg.patch_area
    if cfg.patch_area_scale == "log":
        fraction = math.exp(_uniform(generator, math.log(low), math.log(high)))
    else:
        fraction = _uniform(generator, low, high)
    area = fraction * height * width
    log_low, log_high = math.log(cfg.patch_aspect[0]), math.log(cfg.patch_aspect[1])
    aspect = math.exp(_uniform(generator, log_low, log_high))
    ph = int(round(math.sqrt(area * aspect)))
    pw = int(round(math.sqrt(area / aspect)))
    return min(max(ph, 1), height - 1), min(max(pw, 1), width - 1)


def blob_mask(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """An irregular round shape filling a ``height x width`` box, ``(1, H, W)`` float 0/1.

    An ellipse whose radius wobbles with the angle (harmonics 2-4, random phases and amplitudes
    up to 0.2 each), so spots and pits are not all perfect ellipses. Never empty.
    """
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * 2.0 - 1.0
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * 2.0 - 1.0
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    radius = torch.sqrt(grid_x ** 2 + grid_y ** 2)
    theta = torch.atan2(grid_y, grid_x)
    boundary = torch.ones_like(theta)
    for harmonic in (2, 3, 4):
        amplitude = _uniform(generator, 0.0, 0.2)
        phase = _uniform(generator, 0.0, 2.0 * math.pi)
        boundary = boundary + amplitude * torch.cos(harmonic * theta + phase)
    inside = radius <= boundary * 0.95
    inside[height // 2, width // 2] = True
    return inside.to(torch.float32).unsqueeze(0)


def cutpaste(target: torch.Tensor, source: torch.Tensor, cfg: SynthesisConfig,
             generator: torch.Generator, scar: bool = False,
             blob: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cut a patch of ``source`` and paste it at a random place of ``target``.

    Args:
        target: the normal image ``(3, H, W)``.
        source: the (hard-augmented) copy the patch is cut from, same shape.
        scar: a thin rotated strip (CutPaste-scar) instead of a rectangle.
        blob: an irregular round shape (:func:`blob_mask`) inside the rectangle (ignored for
            scars).

    Returns:
        The new image and the *anomaly* mask ``(H, W)`` (bool): exactly the pasted pixels.
    """
    _, height, width = target.shape
    if scar:
        side = min(height, width)
        pw = max(1, int(round(_uniform(generator, *cfg.scar_width) * side)))
        ph = max(1, int(round(_uniform(generator, *cfg.scar_length) * side)))
        ph, pw = min(ph, height - 1), min(pw, width - 1)
    else:
        ph, pw = _rectangle_patch(height, width, cfg, generator)
    sy, sx = _randint(generator, 0, height - ph), _randint(generator, 0, width - pw)
    patch = source[:, sy:sy + ph, sx:sx + pw]
    alpha = torch.ones(1, ph, pw, dtype=patch.dtype)
    if blob and not scar:
        alpha = blob_mask(ph, pw, generator).to(patch.dtype)
    if scar:
        angle = _uniform(generator, *cfg.scar_angle)
        # Colour and alpha are rotated together with nearest-neighbour so the mask stays exact.
        rotated = TF.rotate(torch.cat([patch, alpha]), angle,
                            interpolation=InterpolationMode.NEAREST, expand=True)
        patch, alpha = rotated[:3], rotated[3:]
        ph, pw = min(patch.shape[1], height), min(patch.shape[2], width)
        patch, alpha = patch[:, :ph, :pw], alpha[:, :ph, :pw]
    ty, tx = _randint(generator, 0, height - ph), _randint(generator, 0, width - pw)
    if source is target and (ty, tx) == (sy, sx) and (height - ph or width - pw):
        # pasting a patch of the unaugmented image onto itself would change nothing
        ty, tx = (ty + 1) % (height - ph + 1), (tx + 1) % (width - pw + 1)
    return _put(target, patch, ty, tx, alpha[0] > 0.5)


def _put(image: torch.Tensor, values: torch.Tensor, ty: int, tx: int,
         region: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``image`` with ``values`` written where ``region`` (``(h, w)`` bool) is set, in
    the window at ``(ty, tx)``; and the ``(H, W)`` mask of the written pixels."""
    h, w = region.shape
    out = image.clone()
    window = out[:, ty:ty + h, tx:tx + w]
    window[:, region] = values[:, region]
    mask = torch.zeros(image.shape[1:], dtype=torch.bool)
    mask[ty:ty + h, tx:tx + w] = region
    return out, mask


EDIT_OPERATIONS = ("dilate", "erode", "fill")
"""The local edits of :func:`local_edit`, drawn with equal probability."""

EDIT_PLACEMENT_TRIES = 8
"""Places tried for a local edit before giving up (a dilation of a flat region changes nothing)."""


def local_edit(image: torch.Tensor, cfg: SynthesisConfig, generator: torch.Generator,
               operation: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Change the image's own content inside an irregular blob: dilate, erode or fill it.

    Dilation and erosion take the per-channel maximum / minimum over a square window of radius
    ``cfg.edit_radius`` (thickening or thinning lines and spots: spurs, shorts, bites, breaks);
    a fill paints the blob in the colour of a random pixel of the same image (pin-holes, stray
    spots). Up to :data:`EDIT_PLACEMENT_TRIES` places are tried until the edit changes a pixel.

    Args:
        operation: one of :data:`EDIT_OPERATIONS`; default: drawn from ``generator``.

    Returns:
        The new image and the anomaly mask ``(H, W)`` (bool): exactly the changed pixels (empty
        only when no tried place changed anything, e.g. a uniform image).
    """
    _, height, width = image.shape
    ph, pw = _rectangle_patch(height, width, cfg, generator)
    region = blob_mask(ph, pw, generator)[0] > 0.5
    drawn = EDIT_OPERATIONS[_randint(generator, 0, len(EDIT_OPERATIONS) - 1)]
    operation = drawn if operation is None else operation
    if operation not in EDIT_OPERATIONS:
        raise ValueError(f"operation must be one of {EDIT_OPERATIONS}, got {operation!r}")
    side = min(height, width)
    radius = max(1, int(round(_uniform(generator, *cfg.edit_radius) * side)))
    colour = image[:, _randint(generator, 0, height - 1), _randint(generator, 0, width - 1)]
    for _ in range(EDIT_PLACEMENT_TRIES):
        ty, tx = _randint(generator, 0, height - ph), _randint(generator, 0, width - pw)
        window = image[:, ty:ty + ph, tx:tx + pw]
        if operation == "fill":
            edited = colour[:, None, None].expand_as(window)
        else:
            # pool over the window plus a margin of the radius, so the edit sees its neighbours
            y0, x0 = max(ty - radius, 0), max(tx - radius, 0)
            context = image[:, y0:ty + ph + radius, x0:tx + pw + radius].unsqueeze(0)
            sign = 1.0 if operation == "dilate" else -1.0
            pooled = sign * F.max_pool2d(sign * context, 2 * radius + 1, stride=1,
                                         padding=radius)[0]
            edited = pooled[:, ty - y0:ty - y0 + ph, tx - x0:tx - x0 + pw]
        changed = (edited != window).any(0) & region
        if changed.any():
            break
    return _put(image, edited, ty, tx, changed)


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(height: int, width: int, cells_y: int, cells_x: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Gradient (Perlin) noise ``(H, W)`` on a grid of ``cells_y x cells_x`` cells: smooth,
    about ``[-0.7, 0.7]``, one random unit gradient per grid corner."""
    angles = torch.rand(cells_y + 1, cells_x + 1, generator=generator) * (2.0 * math.pi)
    gy, gx = torch.sin(angles), torch.cos(angles)
    ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height * cells_y
    xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width * cells_x
    iy, ix = ys.floor().long(), xs.floor().long()
    fy, fx = (ys - iy)[:, None], (xs - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> torch.Tensor:
        return gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)

    wy, wx = _fade(fy), _fade(fx)
    top = corner(0, 0) + wx * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + wx * (corner(1, 1) - corner(1, 0))
    return top + wy * (bottom - top)


def _random_cells(cfg: SynthesisConfig, generator: torch.Generator) -> Tuple[int, int]:
    low, high = cfg.region_scale
    return 2 ** _randint(generator, low, high), 2 ** _randint(generator, low, high)


def region_mask(height: int, width: int, cfg: SynthesisConfig,
                generator: torch.Generator, *, log_area: bool = True,
                cells: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """A Perlin-noise region ``(H, W)`` bool covering a log-uniform (``log_area=False``:
    uniform) fraction of ``cfg.region_area`` of the image, on a grid of ``cells`` (default:
    drawn from ``cfg.region_scale``).

    The noise is thresholded at the quantile that leaves the drawn fraction above it, so the
    area is controlled whatever the grid: a coarse grid gives one large smooth region, a fine
    one several small spots. Never empty.
    """
    noise = perlin_noise(height, width, *(cells or _random_cells(cfg, generator)), generator)
    low, high = cfg.region_area
    if log_area:
        fraction = math.exp(_uniform(generator, math.log(low), math.log(high)))
    else:
        fraction = _uniform(generator, low, high)
    keep = max(1, int(round(fraction * height * width)))
    threshold = torch.topk(noise.flatten(), keep).values[-1]
    return noise >= threshold




def region_fill(image: torch.Tensor, augmented: torch.Tensor, source: str,
                cfg: SynthesisConfig, generator: torch.Generator) -> torch.Tensor:
    """A full-size ``(3, H, W)`` image to blend into a noise region.

    ``augmented``: the hard-augmented copy; ``texture``: two random colours mixed by a Perlin
    noise; ``intensity``: the image times a smooth gain plus a colour offset; ``blur``: the
    image under a box blur of radius 1-4 pixels.
    """
    _, height, width = image.shape
    if source == "augmented":
        return augmented
    if source == "texture":
        noise = perlin_noise(height, width, *_random_cells(cfg, generator), generator)
        mix = (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-6)
        first, second = torch.rand(3, 1, 1, generator=generator), torch.rand(
            3, 1, 1, generator=generator)
        return first + (second - first) * mix[None]
    if source == "intensity":
        noise = perlin_noise(height, width, 2, 2, generator)
        gain = 1.0 + _uniform(generator, 0.2, 0.6) * (1 if _chance(generator, 0.5) else -1)
        gain_map = 1.0 + (gain - 1.0) * (0.75 + 0.25 * noise / 0.7)
        offset = (torch.rand(3, 1, 1, generator=generator) - 0.5) * 0.8
        return (image * gain_map[None] + offset).clamp(0.0, 1.0)
    if source == "blur":
        radius = _randint(generator, 1, 4)
        padded = F.pad(image[None], (radius,) * 4, mode="replicate")
        return F.avg_pool2d(padded, 2 * radius + 1, stride=1)[0]
    fills = [s for s in REGION_SOURCES if s != "shade"]  # shade is no fill: see noise_region
    raise ValueError(f"unknown region fill {source!r}; expected one of {fills}")


def shade_region(image: torch.Tensor, region: torch.Tensor, min_change: float,
                 generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``image`` ``(3, H, W)`` made 4-20 % brighter or darker over ``region`` ``(H, W)``, the
    change fading out over a box of 2-8 % of the image's side around its edge (the ``shade``
    region source: a faint discolouration with no outline).

    Returns:
        The new image and its label: where the fade's weight is at least one half (the
        footprint, not the texture's bright pixels) and the change of the local mean
        brightness exceeds ``min_change``.
    """
    _, height, width = image.shape
    radius = max(1, int(round(_uniform(generator, 0.02, 0.08) * min(height, width))))

    def box(x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x[None], (radius,) * 4, mode="replicate")
        return F.avg_pool2d(padded, 2 * radius + 1, stride=1)[0]

    weight = box(region.to(image.dtype)[None])[0]
    change = _uniform(generator, 0.04, 0.2) * (1.0 if _chance(generator, 0.5) else -1.0)
    out = (image * (1.0 + change * weight)[None]).clamp(0.0, 1.0)
    local_change = (box(out) - box(image)).abs().amax(0)
    return out, (weight >= 0.5) & (local_change > min_change)


def noise_region(image: torch.Tensor, augmented: torch.Tensor, cfg: SynthesisConfig,
                 generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Blend a fill (:func:`region_fill`) into a Perlin region (:func:`region_mask`), or, for
    the ``shade`` source, a faint soft-edged brightness change (:func:`shade_region`).

    Returns:
        The new image and the anomaly mask ``(H, W)`` (bool): the region's pixels that visibly
        changed (a shade: its footprint where the local mean brightness visibly changed).
    """
    _, height, width = image.shape
    region = region_mask(height, width, cfg, generator)
    sources = cfg.region_sources
    source = sources[_randint(generator, 0, len(sources) - 1)]
    if source == "shade":
        # one or two smooth blobs (a coarse grid), of any size in region_area
        cells = (2 ** _randint(generator, 1, 2), 2 ** _randint(generator, 1, 2))
        region = region_mask(height, width, cfg, generator, log_area=False, cells=cells)
        return shade_region(image, region, cfg.region_min_change, generator)
    fill = region_fill(image, augmented, source, cfg, generator)
    opacity = _uniform(generator, *cfg.region_opacity)
    weight = region.to(image.dtype)[None] * opacity
    out = image * (1.0 - weight) + fill.to(image.dtype) * weight
    visible = (out - image).abs().amax(0) > cfg.region_min_change
    return out, region & visible


CRACK_STEP = 0.5
"""Spacing in pixels of the points along a crack's path (half a pixel: no gaps)."""


def crack_mask(height: int, width: int, cfg: SynthesisConfig,
               generator: torch.Generator) -> torch.Tensor:
    """A thin curved stroke ``(H, W)`` bool: a crack of any orientation. Never empty.

    A random walk from a random point: the heading starts uniform in all directions and drifts
    like a Brownian motion (0.1 rad after one pixel, 0.7 rad after fifty), so short cracks are
    nearly straight and long ones wander; the walk stops at the drawn length (``crack_length``)
    or at the image's border. Every pixel whose centre lies within half the drawn width
    (``crack_width``, at least one pixel wide) of the path is in the mask.
    """
    side = min(height, width)
    length = _uniform(generator, *cfg.crack_length) * side
    # half the width; at least 0.71 so a one-pixel line stays 8-connected on a diagonal
    radius = max(_uniform(generator, *cfg.crack_width) * side / 2.0, 0.71)
    start = torch.tensor([_uniform(generator, 0, height - 1), _uniform(generator, 0, width - 1)])
    heading0 = _uniform(generator, 0.0, 2.0 * math.pi)
    steps = max(1, int(length / CRACK_STEP))
    drift = torch.randn(steps, generator=generator, dtype=torch.float64) * 0.1 * math.sqrt(
        CRACK_STEP)
    heading = heading0 + drift.cumsum(0)
    moves = CRACK_STEP * torch.stack([heading.sin(), heading.cos()], 1)
    path = torch.cat([start[None].double(), start[None] + moves.cumsum(0)])
    limit = torch.tensor([height - 1, width - 1], dtype=torch.float64)
    outside = ((path < 0) | (path > limit)).any(1)
    if outside.any():  # the walk stops at the image's border
        path = path[:int(outside.to(torch.int8).argmax())]
    path = path.float()
    reach = int(math.ceil(radius))
    y0 = max(0, int(path[:, 0].min()) - reach)
    y1 = min(height, int(path[:, 0].max()) + reach + 2)
    x0 = max(0, int(path[:, 1].min()) - reach)
    x1 = min(width, int(path[:, 1].max()) + reach + 2)
    ys = torch.arange(y0, y1, dtype=torch.float32)
    xs = torch.arange(x0, x1, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2)
    near = torch.zeros(grid.shape[0], dtype=torch.bool)
    for chunk in path.split(256):
        near |= (torch.cdist(grid, chunk) <= radius).any(1)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[y0:y1, x0:x1] = near.reshape(y1 - y0, x1 - x0)
    return mask


def crack(image: torch.Tensor, augmented: torch.Tensor, cfg: SynthesisConfig,
          generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw a crack (:func:`crack_mask`) into the image: darker, brighter, or the augmented copy.

    Returns:
        The new image and the anomaly mask ``(H, W)`` (bool): the stroke's pixels that changed.
    """
    _, height, width = image.shape
    mask = crack_mask(height, width, cfg, generator)
    kind = _uniform(generator, 0.0, 1.0)
    contrast = _uniform(generator, *cfg.crack_contrast)
    if kind < 0.5:
        fill = image * (1.0 - contrast)
    elif kind < 0.75:
        fill = image + contrast * (1.0 - image)
    else:
        fill = augmented
    out = torch.where(mask[None], fill.to(image.dtype), image)
    return out, mask & (out != image).any(0)


LABEL_WINDOW = 5
"""Side in pixels of the square over which ``synthesis.label_local_z`` takes the local std."""
LABEL_MIN_STD = 0.01
"""Floor of the local standard deviation that ``synthesis.label_local_z`` scales."""


def local_std(image: torch.Tensor, window: int = LABEL_WINDOW) -> torch.Tensor:
    """``(H, W)`` the standard deviation of ``image`` (``(C, H, W)``) over the ``window``
    square around each pixel (edges replicated), the largest over the channels."""
    r = window // 2
    x = F.pad(image[None].float(), (r, r, r, r), mode="replicate")
    mean = F.avg_pool2d(x, window, stride=1)
    square = F.avg_pool2d(x * x, window, stride=1)
    return (square - mean * mean).clamp_min(0.0).sqrt()[0].amax(0)


def changed_pixels(before: torch.Tensor, after: torch.Tensor, min_z: float = 0.0) -> torch.Tensor:
    """``(H, W)`` bool: where ``after`` differs from ``before`` (``(C, H, W)``) in at least one
    channel; with ``min_z > 0`` by more than ``min_z`` times ``before``'s :func:`local_std`
    (floored at :data:`LABEL_MIN_STD`), the rule of ``synthesis.label_local_z``."""
    if min_z <= 0:
        return (after != before).any(0)
    threshold = min_z * local_std(before).clamp_min(LABEL_MIN_STD)
    return ((after - before).abs() > threshold).any(0)


def synthesize_anomaly(image: torch.Tensor, cfg: SynthesisConfig,
                       generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Make a synthetic anomaly from a normal image (paper Fig. 3).

    Args:
        image: normal image ``(3, H, W)``, float in ``[0, 1]``.
        cfg: ranges and probabilities.
        generator: the only source of randomness.

    Returns:
        ``(anomalous_image, normality_mask)`` where the mask is ``(1, H, W)`` float, 0 on the
        pasted pixels that changed (by more than ``cfg.label_local_z`` local stds when that is
        set) and 1 elsewhere.
    """
    source = image
    if cfg.hard_augmentation:
        source, _ = hard_augment(image, cfg, generator)
    low, high = cfg.anomalies_per_image
    count = low if low == high else _randint(generator, low, high)
    out = image
    anomaly_mask = torch.zeros(image.shape[1:], dtype=torch.bool)
    for _ in range(count):
        if cfg.region_p > 0 and _chance(generator, cfg.region_p):
            out, pasted = noise_region(out, source, cfg, generator)
        elif cfg.edit_p > 0 and _chance(generator, cfg.edit_p):
            out, pasted = local_edit(out, cfg, generator)
        elif cfg.crack_p > 0 and _chance(generator, cfg.crack_p):
            out, pasted = crack(out, source, cfg, generator)
        else:
            scar = _chance(generator, cfg.scar_p)
            blob = not scar and cfg.blob_p > 0 and _chance(generator, cfg.blob_p)
            out, pasted = cutpaste(out, source, cfg, generator, scar=scar, blob=blob)
        anomaly_mask |= pasted
    # A pasted pixel can equal what it covered (flat regions, a second paste over the first):
    # the mask keeps only pixels that really changed, so it stays the exact set of changes;
    # with ``label_local_z`` only changes above the image's local texture contrast.
    anomaly_mask &= changed_pixels(image, out, cfg.label_local_z)
    normality = (~anomaly_mask).to(image.dtype).unsqueeze(0)
    return out, normality
