"""Image geometry: how an image of any size becomes the network's input, and how maps go back.

Three ways, chosen by ``data.resize`` and ``data.tiling`` (:class:`Geometry`):

* ``stretch`` (the default, anoseg 0.x): the image is resized to ``data.image_size``; the
  aspect is lost.
* ``keep_aspect``: the image is resized so that it fits ``data.image_size`` and centred on a
  black canvas of that size; the rest is padding.
* ``match_aspect``: resolved before training (``anoseg.training.matched_canvas_config``)
  into a stretch
  onto a canvas of about ``data.image_size``'s pixel count, shaped like the training images
  (:func:`match_aspect_canvas`): a tall or wide part is not squeezed along one side only.
* tiling (``data.tiling.enabled``): the image is resized by ``data.tiling.scale`` keeping its
  aspect (padded at the bottom and right up to one tile where it is smaller), and the network
  sees tiles of ``data.image_size`` of it: random tiles in training, a sliding window with
  overlap at inference (:func:`window_starts`, :func:`blend_window`).

Each image gets a :class:`Placement`: its own size, the canvas size and the box of the canvas
that holds the image (the rest is padding). Maps are cut to the box (:func:`crop`) before
anything scores or shows them, so padding is never scored, and can be resized to the image's
own size (:func:`to_resolution`). Synthetic anomalies are drawn inside the box only.

Example:
    >>> g = Geometry((64, 192), "keep_aspect")
    >>> g.place((300, 1000))
    Placement(source_hw=(300, 1000), canvas_hw=(64, 192), box=(3, 0, 58, 192))
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from anoseg.config import DataConfig, image_hw

HW = Tuple[int, int]


class Placement(NamedTuple):
    """Where one image lies on the canvas the network (or the tiling) sees."""

    source_hw: HW
    """The image file's (height, width)."""
    canvas_hw: HW
    """The canvas: ``data.image_size``, or under tiling the resized image (at least a tile)."""
    box: Tuple[int, int, int, int]
    """``(top, left, height, width)`` of the image on the canvas; the rest is padding."""

    @property
    def box_hw(self) -> HW:
        return self.box[2], self.box[3]

    @property
    def is_full(self) -> bool:
        """The image fills the canvas (no padding)."""
        return self.box == (0, 0, *self.canvas_hw)


@dataclass(frozen=True)
class Geometry:
    """The geometry settings of a config (:meth:`from_config`).

    Attributes:
        image_hw: the network input (the tile under tiling).
        resize: ``stretch`` or ``keep_aspect`` (ignored under tiling).
        tile_scale: the resize factor of tiling; ``None`` = no tiling.
        overlap: the sliding window's overlap (tiling).
        coords: ``image`` or ``tile``: the coordinate channels of a tile (tiling).
    """

    image_hw: HW
    resize: str = "stretch"
    tile_scale: Optional[float] = None
    overlap: float = 0.25
    coords: str = "image"

    @classmethod
    def from_config(cls, data: DataConfig) -> "Geometry":
        tiling = data.tiling
        return cls(image_hw(data.image_size), data.resize,
                   float(tiling.scale) if tiling.enabled else None, float(tiling.overlap),
                   tiling.coords)

    @classmethod
    def of(cls, size_or_geometry) -> "Geometry":
        """A :class:`Geometry` as it is, or a stretch to a side / ``(height, width)``."""
        if isinstance(size_or_geometry, Geometry):
            return size_or_geometry
        return cls(image_hw(size_or_geometry))

    @property
    def tiled(self) -> bool:
        return self.tile_scale is not None

    def place(self, source_hw: HW) -> Placement:
        """The :class:`Placement` of an image of ``source_hw`` (height, width)."""
        source_hw = (int(source_hw[0]), int(source_hw[1]))
        height, width = self.image_hw
        if self.tiled:
            h = max(1, int(round(source_hw[0] * self.tile_scale)))
            w = max(1, int(round(source_hw[1] * self.tile_scale)))
            return Placement(source_hw, (max(h, height), max(w, width)), (0, 0, h, w))
        if self.resize == "match_aspect":
            raise ValueError("data.resize=match_aspect is resolved from the training images "
                             "before use (anoseg.training.matched_canvas_config); a run's "
                             "saved config holds the resolved image_size and 'stretch'")
        if self.resize == "stretch":
            return Placement(source_hw, (height, width), (0, 0, height, width))
        factor = min(height / source_hw[0], width / source_hw[1])
        h = min(height, max(1, int(round(source_hw[0] * factor))))
        w = min(width, max(1, int(round(source_hw[1] * factor))))
        return Placement(source_hw, (height, width),
                         ((height - h) // 2, (width - w) // 2, h, w))


CANVAS_STEP = 32
"""The canvas's sides are multiples of the encoder's stride."""
CANVAS_SIDES = (64, 512)
"""The smallest and largest side ``data.image_size`` allows."""
CANVAS_MAX_AREA = 1.15
"""A matched canvas holds at most this many times the pixels of ``data.image_size``."""


def match_aspect_canvas(target_hw: HW, sizes: Sequence[HW]) -> HW:
    """The canvas ``(height, width)`` for images of ``sizes`` with about the pixels of
    ``target_hw``: sides multiples of 32 from 64 to 512, at most 1.15x the pixels, the one
    that minimises ``|log(aspect / median aspect)| + |log(pixels / target pixels)|`` (ties:
    fewer pixels). A square set keeps ``target_hw`` (for a square ``target_hw``).

    >>> match_aspect_canvas((128, 128), [(1250, 500), (1280, 500)])
    (192, 96)
    >>> match_aspect_canvas((128, 128), [(640, 640)])
    (128, 128)
    """
    if not sizes:
        raise ValueError("match_aspect_canvas needs the size of at least one image")
    aspect = math.exp(statistics.median(math.log(h / w) for h, w in sizes))
    target = target_hw[0] * target_hw[1]
    sides = range(CANVAS_SIDES[0], CANVAS_SIDES[1] + 1, CANVAS_STEP)
    # target_hw is a valid image_size (each side >= 64), so 64x64 is always admissible
    candidates = [(h, w) for h in sides for w in sides if h * w <= CANVAS_MAX_AREA * target]
    return min(candidates, key=lambda hw: (
        round(abs(math.log(hw[0] / hw[1] / aspect)) + abs(math.log(hw[0] * hw[1] / target)), 9),
        hw[0] * hw[1]))


def crop(values: torch.Tensor, placement: Placement) -> torch.Tensor:
    """The image's part ``(..., h, w)`` of a canvas-sized ``(..., H, W)`` tensor (a view)."""
    top, left, h, w = placement.box
    return values[..., top:top + h, left:left + w]


def resize_map(values: torch.Tensor, hw: HW) -> torch.Tensor:
    """A float map ``(H, W)`` resized to ``hw`` (bilinear, antialiased when shrinking); the
    same tensor when it already has that size."""
    if tuple(values.shape[-2:]) == tuple(hw):
        return values
    out = F.interpolate(values[None, None].float(), size=tuple(hw), mode="bilinear",
                        align_corners=False, antialias=True)
    return out[0, 0]


def to_resolution(values: torch.Tensor, placement: Placement, resolution: str) -> torch.Tensor:
    """A canvas map cut to the image (``model``), and resized to the image's own size
    (``native``)."""
    part = crop(values, placement)
    if resolution == "native":
        return resize_map(part, placement.source_hw)
    return part


def resize_to_source(part: torch.Tensor, placement: Placement) -> torch.Tensor:
    """A map of the image's box (already cut from its canvas) at the image's own size."""
    return resize_map(part, placement.source_hw)


def valid_mask(placement: Placement) -> torch.Tensor:
    """``(H, W)`` bool on the canvas: True on the image, False on the padding."""
    mask = torch.zeros(placement.canvas_hw, dtype=torch.bool)
    crop(mask, placement)[...] = True
    return mask


def window_starts(length: int, tile: int, overlap: float) -> List[int]:
    """First pixels of the sliding windows along one side of ``length`` (>= ``tile``): from 0
    to ``length - tile``, evenly spaced, neighbours sharing at least ``overlap`` of a tile."""
    if length <= tile:
        return [0]
    stride = max(1, int(math.floor(tile * (1.0 - overlap))))
    count = int(math.ceil((length - tile) / stride)) + 1
    return [int(round(i * (length - tile) / (count - 1))) for i in range(count)]


def blend_window(length: int) -> torch.Tensor:
    """The 1-D Hann weight (float64) of a window of ``length`` pixels, sampled at the pixel
    centres, so it is positive everywhere (the image's border, covered by one window's edge
    only, keeps that window's values)."""
    positions = (torch.arange(length, dtype=torch.float64) + 0.5) / length
    return 0.5 - 0.5 * torch.cos(2.0 * math.pi * positions)


def tile_span(placement: Placement, top: int, left: int, tile_hw: HW
              ) -> Tuple[float, float, float, float]:
    """``(y0, x0, y1, x1)``: the image coordinates (the image spans ``[-1, 1]`` along each
    side) of a tile's first and last pixel centres, for ``coords=image``."""
    box_top, box_left, h, w = placement.box

    def coordinate(pixel: int, start: int, size: int) -> float:
        return -1.0 + 2.0 * (pixel - start) / max(size - 1, 1)

    return (coordinate(top, box_top, h), coordinate(left, box_left, w),
            coordinate(top + tile_hw[0] - 1, box_top, h),
            coordinate(left + tile_hw[1] - 1, box_left, w))


def box_within(placement: Placement, top: int, left: int, tile_hw: HW
               ) -> Tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the image's part of a tile (in the tile's pixels);
    height or width 0 when the tile holds only padding."""
    box_top, box_left, h, w = placement.box
    y0, x0 = max(top, box_top), max(left, box_left)
    y1 = min(top + tile_hw[0], box_top + h)
    x1 = min(left + tile_hw[1], box_left + w)
    return y0 - top, x0 - left, max(0, y1 - y0), max(0, x1 - x0)


def group_by_shape(values: Sequence[torch.Tensor]) -> List[List[int]]:
    """Indices of ``values`` grouped by tensor shape (first appearance order), so maps of one
    size can be stacked into one batch; one group when every shape is the same."""
    groups: Dict[Tuple[int, ...], List[int]] = {}
    for index, value in enumerate(values):
        groups.setdefault(tuple(value.shape), []).append(index)
    return list(groups.values())
