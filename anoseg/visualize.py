"""Pictures of anomaly maps with Pillow and NumPy only, plus an optional matplotlib plot.

* :func:`save_map_png` / :func:`read_map_png`: lossless 16-bit PNG maps
  (pixel value = ``round(score * 65535)``, so ``score = value / 65535``).
* :func:`colorize`: a jet-like colour map (dark blue = 0, red = 1) from a small look-up table.
* :func:`heatmap_overlay`, :func:`triptych`: input | anomaly map | ground truth strips like the
  paper's qualitative figures, and the map blended over the input; :func:`map_grid`: a column
  per image (input, map, ground truth), for TensorBoard.
* :func:`save_iou_curve_plot`: the IoU-vs-threshold plot (paper Fig. 6b); needs matplotlib
  (``pip install 'anoseg-torch[plot]'``) and returns ``None`` without it.

Maps are drawn on the absolute scale [0, 1] (not stretched per image), so pictures of different
images and runs are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from anoseg.atomic import atomic_write_bytes

PathLike = Union[str, Path]
ArrayLike = Union[np.ndarray, torch.Tensor]

MAP_PNG_SCALE = 65535
"""Full scale of the 16-bit map PNGs: ``score = pixel / MAP_PNG_SCALE``."""

MAPS_README = ("Anomaly maps as 16-bit grayscale PNG (anoseg-eval: at eval.resolution, the "
               "model's without its padding or each image's own size; anoseg-predict: at "
               "each input's own size unless --map-resolution model): "
               "score = pixel value / 65535 (1 = anomalous).\n"
               "Python: numpy.asarray(PIL.Image.open(path), dtype=float) / 65535, "
               "or anoseg.visualize.read_map_png(path).\n")
FLOAT_MAPS_README = (
    "\nExact float32 maps beside each PNG (numpy.load(path)):\n"
    "  <stem>.npy        the anomaly map in [0, 1] that the pixel metrics were computed on;\n"
    "  <stem>.logit.npy  the anomaly logit map (unbounded, does not saturate) that the image "
    "scores were computed on.\n"
    "Re-scoring them gives anoseg-eval's numbers exactly (docs/evaluation.md).\n")
"""The ``README.txt`` written beside saved maps."""

PLOT_SKIPPED_MESSAGE = ("IoU plot skipped: matplotlib is not installed "
                        "(pip install 'anoseg-torch[plot]')")

MIN_PANEL_SIDE = 256
"""Pictures are enlarged by a whole factor until each panel is at least this many pixels."""

PANEL_GAP = 4
"""White pixels between the panels of a triptych."""

# Jet-like colour map: positions in [0, 1] and their RGB colours; linear in between.
_COLORMAP_POSITIONS = (0.0, 0.125, 0.375, 0.625, 0.875, 1.0)
_COLORMAP_COLORS = (
    (0.0, 0.0, 0.5),   # dark blue
    (0.0, 0.0, 1.0),   # blue
    (0.0, 1.0, 1.0),   # cyan
    (1.0, 1.0, 0.0),   # yellow
    (1.0, 0.0, 0.0),   # red
    (0.5, 0.0, 0.0),   # dark red
)


def _build_colormap_lut(levels: int = 256) -> np.ndarray:
    positions = np.linspace(0.0, 1.0, levels)
    colors = np.asarray(_COLORMAP_COLORS)
    channels = [np.interp(positions, _COLORMAP_POSITIONS, colors[:, c]) for c in range(3)]
    return np.rint(np.stack(channels, axis=1) * 255.0).astype(np.uint8)


COLORMAP_LUT: np.ndarray = _build_colormap_lut()
"""(256, 3) uint8 colours; entry ``i`` is the colour of score ``i / 255``."""


# ------------------------------------------------------------------------------ conversions


def _to_numpy(array: ArrayLike) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu().numpy()
    return np.asarray(array)


def _map_2d(anomaly_map: ArrayLike) -> np.ndarray:
    """A (H, W) float map from (H, W) or (1, H, W)."""
    values = _to_numpy(anomaly_map).astype(np.float64)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if values.ndim != 2:
        raise ValueError(f"expected one anomaly map (H, W), got shape {values.shape}")
    return values


def image_to_uint8(image: ArrayLike) -> np.ndarray:
    """(H, W, 3) uint8 from an image (3, H, W) float in [0, 1] or uint8, or (H, W, 3) uint8."""
    values = _to_numpy(image)
    if values.ndim == 3 and values.shape[0] == 3 and values.shape[2] != 3:
        values = values.transpose(1, 2, 0)
    if values.ndim != 3 or values.shape[2] != 3:
        raise ValueError(f"expected an RGB image (3, H, W) or (H, W, 3), got {values.shape}")
    if values.dtype == np.uint8:
        return np.ascontiguousarray(values)
    return np.clip(np.rint(values.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)


def colorize(anomaly_map: ArrayLike) -> np.ndarray:
    """Colour an anomaly map (scores in [0, 1], clipped) with the jet-like map: (H, W, 3) uint8."""
    values = np.clip(_map_2d(anomaly_map), 0.0, 1.0)
    return COLORMAP_LUT[np.rint(values * 255.0).astype(np.int64)]


OVERLAY_ROWS = 256
"""Rows blended at once by :func:`heatmap_overlay` (bounds its float64 temporaries for
multi-megapixel images)."""


def heatmap_overlay(image: ArrayLike, anomaly_map: ArrayLike, alpha: float = 0.5) -> np.ndarray:
    """Blend the coloured map over the image: ``(1 - alpha) * image + alpha * colour``."""
    rgb = image_to_uint8(image)
    values = _to_numpy(anomaly_map)
    values = values[0] if values.ndim == 3 and values.shape[0] == 1 else values
    if values.shape[:2] != rgb.shape[:2]:
        raise ValueError(f"image {rgb.shape[:2]} and map {values.shape[:2]} differ in size")
    out = np.empty_like(rgb)
    for top in range(0, rgb.shape[0], OVERLAY_ROWS):
        rows = slice(top, top + OVERLAY_ROWS)
        heat = colorize(values[rows]).astype(np.float64)
        out[rows] = np.rint((1.0 - alpha) * rgb[rows].astype(np.float64)
                            + alpha * heat).astype(np.uint8)
    return out


def mask_to_uint8(mask: ArrayLike) -> np.ndarray:
    """A binary mask (H, W) or (1, H, W) as a 0/255 grayscale picture (H, W) uint8."""
    return np.where(_map_2d(mask) > 0, 255, 0).astype(np.uint8)


def _enlarge(picture: np.ndarray, factor: int, smooth: bool) -> np.ndarray:
    if factor == 1:
        return picture
    img = Image.fromarray(picture)
    size = (img.width * factor, img.height * factor)
    return np.asarray(img.resize(size, Image.BILINEAR if smooth else Image.NEAREST))


def enlargement_factor(side: int, min_side: int = MIN_PANEL_SIDE) -> int:
    """The smallest whole factor that makes ``side`` at least ``min_side`` pixels."""
    return max(1, -(-min_side // max(side, 1)))


def triptych(image: ArrayLike, anomaly_map: ArrayLike, mask: Optional[ArrayLike] = None,
             min_panel_side: int = MIN_PANEL_SIDE) -> np.ndarray:
    """Input | coloured anomaly map | ground truth, side by side (H, 3W + gaps, 3) uint8.

    Panels are enlarged by a whole factor (bilinear for the input, nearest for the map and the
    mask) until they are at least ``min_panel_side`` pixels. A missing mask is drawn black.
    """
    return _three_panels(image_to_uint8(image), colorize, anomaly_map, mask, min_panel_side)


def enlarged_overlay(image: ArrayLike, anomaly_map: ArrayLike, alpha: float = 0.5,
                     min_side: int = MIN_PANEL_SIDE) -> np.ndarray:
    """:func:`heatmap_overlay` enlarged like a triptych panel (bilinear)."""
    overlay = heatmap_overlay(image, anomaly_map, alpha)
    return _enlarge(overlay, enlargement_factor(min(overlay.shape[:2]), min_side), smooth=True)


def map_grid(images: ArrayLike, anomaly_maps: ArrayLike, masks: Optional[ArrayLike] = None,
             min_panel_side: int = 128) -> np.ndarray:
    """A grid (H, W, 3) uint8 with a column per image: the input, its coloured anomaly map
    and (with ``masks``) the ground truth below it; panels enlarged like :func:`triptych`'s.

    Args:
        images: ``(N, 3, S, S)`` floats in [0, 1].
        anomaly_maps: ``(N, S, S)`` in [0, 1].
        masks: ``(N, S, S)`` or ``(N, 1, S, S)`` binary, or ``None``.
    """
    columns = []
    for index in range(len(images)):
        rgb = image_to_uint8(images[index])
        factor = enlargement_factor(min(rgb.shape[:2]), min_panel_side)
        panels = [_enlarge(rgb, factor, smooth=True),
                  _enlarge(colorize(anomaly_maps[index]), factor, smooth=False)]
        if masks is not None:
            mask = np.repeat(mask_to_uint8(masks[index])[:, :, None], 3, axis=2)
            panels.append(_enlarge(mask, factor, smooth=False))
        gap = np.full((PANEL_GAP, panels[0].shape[1], 3), 255, dtype=np.uint8)
        column = [panels[0]]
        for panel in panels[1:]:
            column += [gap, panel]
        columns.append(np.concatenate(column, axis=0))
    if not columns:
        raise ValueError("map_grid needs at least one image")
    gap = np.full((columns[0].shape[0], PANEL_GAP, 3), 255, dtype=np.uint8)
    row = [columns[0]]
    for column in columns[1:]:
        row += [gap, column]
    return np.concatenate(row, axis=1)


# ---------------------------------------------------------------------------------- files


def save_png(path: PathLike, picture: np.ndarray) -> Path:
    """Write a uint8 (H, W) or (H, W, 3) array as PNG atomically; returns the path."""
    path = Path(path)
    img = Image.fromarray(np.ascontiguousarray(picture))
    atomic_write_bytes(path, lambda handle: img.save(handle, format="PNG"))
    return path


def png_bytes(picture: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, 3) array as the bytes of a PNG file."""
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(picture)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def report_strip(image: ArrayLike, anomaly_map: ArrayLike, mask: Optional[ArrayLike],
                 min_panel_side: int = 128) -> np.ndarray:
    """Input | the map blended over the input | ground truth (black without a mask), side by
    side, enlarged like :func:`triptych`: a gallery picture of ``report.html``."""
    rgb = image_to_uint8(image)
    return _three_panels(rgb, lambda m: heatmap_overlay(rgb, m), anomaly_map, mask,
                         min_panel_side)


def _three_panels(rgb: np.ndarray, draw_map, anomaly_map: ArrayLike,
                  mask: Optional[ArrayLike], min_panel_side: int) -> np.ndarray:
    """Input | ``draw_map(anomaly_map)`` | mask (black without one), enlarged by one whole
    factor to at least ``min_panel_side``, white gaps between (:func:`triptych`,
    :func:`report_strip`)."""
    height, width = rgb.shape[:2]
    mask_picture = (np.zeros((height, width), np.uint8) if mask is None
                    else mask_to_uint8(mask))
    factor = enlargement_factor(min(height, width), min_panel_side)
    panels = [_enlarge(rgb, factor, smooth=True),
              _enlarge(draw_map(anomaly_map), factor, smooth=False),
              _enlarge(np.repeat(mask_picture[:, :, None], 3, axis=2), factor, smooth=False)]
    gap = np.full((panels[0].shape[0], PANEL_GAP, 3), 255, dtype=np.uint8)
    return np.concatenate([panels[0], gap, panels[1], gap, panels[2]], axis=1)


def map_to_uint16(anomaly_map: ArrayLike) -> np.ndarray:
    """Scores in [0, 1] (clipped) as ``round(score * 65535)`` (H, W) uint16."""
    values = np.clip(_map_2d(anomaly_map), 0.0, 1.0)
    return np.rint(values * MAP_PNG_SCALE).astype(np.uint16)


def save_map_png(path: PathLike, anomaly_map: ArrayLike) -> Path:
    """Write an anomaly map losslessly as a 16-bit grayscale PNG (value = round(score * 65535)).

    Read it back with :func:`read_map_png`, or
    ``numpy.asarray(PIL.Image.open(path), dtype=float) / 65535``.
    """
    values = map_to_uint16(anomaly_map)
    img = Image.fromarray(values)  # mode I;16 (16-bit grayscale PNG)
    path = Path(path)
    atomic_write_bytes(path, lambda handle: img.save(handle, format="PNG"))
    return path


def save_float_map(path: PathLike, values: ArrayLike) -> Path:
    """Write a map exactly, as a float32 ``.npy`` (``numpy.load(path)`` reads it back)."""
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) \
        else np.asarray(values)
    array = np.ascontiguousarray(array, dtype=np.float32)
    path = Path(path)
    atomic_write_bytes(path, lambda handle: np.save(handle, array, allow_pickle=False))
    return path


def read_map_png(path: PathLike) -> np.ndarray:
    """Read a map written by :func:`save_map_png`: (H, W) float64 scores in [0, 1]."""
    with Image.open(path) as img:
        values = np.asarray(img)
    return values.astype(np.float64) / MAP_PNG_SCALE


def save_mask_png(path: PathLike, mask: ArrayLike) -> Path:
    """Write a binary mask as a 0/255 8-bit grayscale PNG."""
    return save_png(path, mask_to_uint8(mask))


def save_iou_curve_plot(path: PathLike, thresholds: Sequence[float],
                        curves: Mapping[str, Sequence[float]], title: str = "",
                        marked_threshold: Optional[float] = None) -> Optional[Path]:
    """Plot IoU against the threshold (paper Fig. 6b) to a PNG with matplotlib.

    Args:
        path: Output PNG.
        thresholds: The x values.
        curves: Legend label -> y values (same length as ``thresholds``); NaN gaps are skipped.
        title: Plot title.
        marked_threshold: Draws a vertical dashed line there (e.g. the label-free threshold).

    Returns:
        The path, or ``None`` when matplotlib is not installed (see
        :data:`PLOT_SKIPPED_MESSAGE`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(5.0, 3.6), dpi=120)
    for label, values in curves.items():
        axes.plot(thresholds, values, label=label)
    if marked_threshold is not None:
        axes.axvline(marked_threshold, color="gray", linestyle="--", linewidth=1,
                     label=f"label-free threshold {marked_threshold:.3f}")
    axes.set_xlabel("threshold")
    axes.set_ylabel("IoU")
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path = Path(path)
    atomic_write_bytes(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)
    return path
