"""Streaming metrics for anomaly segmentation (pixel/image AUROC, AUPRO, IoU, F1).

This module stands alone: it imports only numpy, torch and :mod:`anoseg.errors`, so it can score
anomaly maps from any model.

Conventions:
    * ``anomaly_maps``: float, higher = more anomalous, shape ``(N, H, W)``, ``(N, 1, H, W)`` or
      ``(H, W)``; numpy arrays or torch tensors (any device).
    * ``masks``: binary ground truth, 1 = defect pixel, same shape. Values must all be in {0, 1}
      (any dtype, or bool) or all in {0, 255} (thresholded at > 0).
    * ``labels``: optional image labels, 1 = defective image; derived as ``mask.any()`` if omitted.
    * A pixel is predicted defective at threshold ``t`` when ``score >= t``.

Computation runs single-threaded on the CPU: numpy, and torch's CPU ``bincount`` for the
histograms (tensors on a GPU are copied over batch by batch). Nothing here holds all pixels: pixel
scores are counted in fixed-size histograms (one for defect, one for normal pixels, one weighted by
``1 / region size`` for AUPRO) over ``score_range``, and per-image IoU curves are summed over
images on the threshold grid; a batch's bins are counted in one pass, not image by image. Memory is constant in the
number of pixels (plus two numbers per image for image scores and labels).

Example:
    >>> metrics = SegmentationMetrics()
    >>> for maps, masks in batches:            # doctest: +SKIP
    ...     metrics.update(maps, masks)
    >>> result = metrics.compute()             # doctest: +SKIP
    >>> result["pixel_auroc"], result["aupro"]  # doctest: +SKIP

See ``docs/metrics.md`` for the definition of every metric and the edge-case behaviour.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from anoseg.errors import MetricsInputError

ArrayLike = Union[np.ndarray, torch.Tensor]
ImageScoreFn = Callable[[np.ndarray], ArrayLike]

__all__ = [
    "SegmentationMetrics",
    "NormalScoreQuantile",
    "label_free_threshold",
    "connected_components",
    "max_image_score",
    "smoothed_max_image_score",
    "top_k_mean_image_score",
    "top_fraction_mean_image_score",
    "IMAGE_SCORES",
    "SIGNAL_IMAGE_SCORE",
    "SIGNAL_MEAN_SCORE",
    "SIGNAL_IMAGE_SCORES",
    "signal_image_scores",
    "image_scores",
    "image_score_threshold",
    "image_auroc",
    "MetricsInputError",
]

MIN_DEFAULT_BINS = 2**17
"""``num_bins`` defaults to the smallest multiple of ``num_thresholds`` that is at least this."""

MAX_RANGE_DOUBLINGS = 64
"""Scores needing more doublings of the score range than this are rejected."""

BOX_MEAN_PIXELS = 2**20
"""Output pixels per block of :func:`smoothed_max_image_score`'s box mean (bounds its
temporaries for large maps)."""

PER_IMAGE_CHUNK = 32
"""Images whose per-image IoU curves are computed at once (bounds temporaries for big batches)."""


# ----------------------------------------------------------------------------------------------
# Input checking (everything is converted to numpy: single-threaded numpy is faster and steadier
# than multi-threaded torch for these memory-bound passes on small CPUs)


def _to_array(value: Any, name: str) -> np.ndarray:
    """Returns ``value`` as a numpy array (torch tensors are moved to the CPU)."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return tensor.cpu().numpy()
    try:
        array = np.asarray(value)
    except Exception as error:  # noqa: BLE001 - anything unconvertible is the caller's input
        raise MetricsInputError(f"{name} must be a numpy array or torch tensor: {error}") from error
    if array.dtype == object:
        raise MetricsInputError(f"{name} must be a numeric array, got dtype=object")
    return array


def _as_batch(array: np.ndarray, name: str) -> np.ndarray:
    """Brings ``(H, W)``, ``(N, H, W)`` or ``(N, 1, H, W)`` to ``(N, H, W)``."""
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        return array
    if array.ndim == 4 and array.shape[1] == 1:
        return array[:, 0]
    raise MetricsInputError(
        f"{name} must have shape (N, H, W), (N, 1, H, W) or (H, W); got {tuple(array.shape)}")


def _check_maps(maps: Any) -> np.ndarray:
    """Validated anomaly maps as a float32/float64 array of shape (N, H, W)."""
    return _check_maps_and_range(maps)[0]


def _check_maps_and_range(maps: Any) -> Tuple[np.ndarray, float, float]:
    """:func:`_check_maps` and the maps' smallest and largest score. Both are finite exactly
    when every score is (a NaN anywhere makes them NaN), so no separate pass checks that."""
    array = _as_batch(_to_array(maps, "anomaly_maps"), "anomaly_maps")
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.floating)
                                       or np.issubdtype(array.dtype, np.integer)):
        raise MetricsInputError(f"anomaly_maps must be real numbers, got dtype {array.dtype}")
    if array.dtype not in (np.float32, np.float64):
        array = array.astype(np.float64 if np.issubdtype(array.dtype, np.integer) else np.float32)
    if array.size == 0:
        raise MetricsInputError(f"anomaly_maps is empty (shape {tuple(array.shape)})")
    smallest, largest = float(array.min()), float(array.max())
    if not (math.isfinite(smallest) and math.isfinite(largest)):
        n_nan = int(np.isnan(array).sum())
        n_inf = int(np.isinf(array).sum())
        raise MetricsInputError(
            f"anomaly_maps contain {n_nan} NaN and {n_inf} infinite values; every score must be "
            "finite (check the model output / normalisation before computing metrics)")
    return array, smallest, largest


def _binarise_masks(masks: np.ndarray) -> np.ndarray:
    """Bool masks from {0, 1} or {0, 255} values; anything else raises."""
    if masks.dtype == np.bool_:
        return masks
    if not (np.issubdtype(masks.dtype, np.integer) or np.issubdtype(masks.dtype, np.floating)):
        raise MetricsInputError(f"masks must be bool or numeric, got dtype {masks.dtype}")
    is_zero = masks == 0
    is_one = masks == 1
    if (is_zero | is_one).all():
        return is_one
    is_255 = masks == 255
    if (is_zero | is_255).all():
        return is_255
    bad = masks[~(is_zero | is_one | is_255)]
    found = "both 1 and 255" if bad.size == 0 else ", ".join(
        f"{v:g}" for v in np.unique(bad.astype(np.float64))[:5])
    raise MetricsInputError(
        "masks must be binary: all values in {0, 1} (or bool), or all in {0, 255}; "
        f"found {found}")


def _resize_nearest(masks: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of (N, h, w) masks (pixel centres, like 'nearest-exact')."""
    rows = np.minimum(((np.arange(height) + 0.5) * masks.shape[1] / height).astype(np.int64),
                      masks.shape[1] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * masks.shape[2] / width).astype(np.int64),
                      masks.shape[2] - 1)
    return masks[:, rows[:, None], cols[None, :]]


def _check_masks(masks: Any, map_shape: Tuple[int, ...], resize: bool
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Validated bool masks of the maps' shape, and per-image 'any defect' before resizing."""
    array = _binarise_masks(_as_batch(_to_array(masks, "masks"), "masks"))
    if array.shape[0] != map_shape[0]:
        raise MetricsInputError(
            f"anomaly_maps and masks hold different numbers of images: {map_shape[0]} maps, "
            f"{array.shape[0]} masks")
    has_defect = array.reshape(array.shape[0], -1).any(axis=1)
    if array.shape[1:] != tuple(map_shape[1:]):
        if not resize:
            raise MetricsInputError(
                f"anomaly maps are {tuple(map_shape[1:])} but masks are {tuple(array.shape[1:])} "
                "(H, W); resize one of them, or pass resize_masks=True to resize masks to the "
                "map size (nearest neighbour)")
        array = _resize_nearest(array, map_shape[1], map_shape[2])
    return array, has_defect


def _check_per_image(values: Any, n_images: int, name: str) -> np.ndarray:
    """A finite float64 vector of one value per image."""
    array = _to_array(values, name).reshape(-1)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == np.bool_):
        raise MetricsInputError(f"{name} must be numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.size != n_images:
        raise MetricsInputError(f"{name} must hold one value per image: expected {n_images}, "
                                f"got {array.size}")
    if not np.isfinite(array).all():
        raise MetricsInputError(f"{name} contain NaN or infinite values")
    return array


def _check_labels(labels: Any, n_images: int, has_defect: np.ndarray) -> np.ndarray:
    """Bool image labels; a label 0 on an image whose mask has defect pixels raises."""
    values = _check_per_image(labels, n_images, "labels")
    if not ((values == 0) | (values == 1)).all():
        raise MetricsInputError(f"labels must be 0 or 1, got {sorted(set(values.tolist()))[:5]}")
    label_bool = values == 1
    contradicting = np.flatnonzero(~label_bool & has_defect).tolist()
    if contradicting:
        raise MetricsInputError(
            f"images {contradicting[:10]} of this batch have label 0 (normal) but defect pixels "
            "in their mask")
    return label_bool


def max_image_score(anomaly_maps: np.ndarray) -> np.ndarray:
    """Default image score: the maximum of each map.

    Args:
        anomaly_maps: Float array (N, H, W).

    Returns:
        Array (N,) of image scores.
    """
    return anomaly_maps.reshape(anomaly_maps.shape[0], -1).max(axis=1)


def _box_mean(maps: np.ndarray, size: int) -> np.ndarray:
    """Mean over the ``size`` x ``size`` window centred on each pixel (float64); at the border
    only the window's pixels inside the image count (no padding values)."""
    n, height, width = maps.shape
    half = size // 2
    top = np.clip(np.arange(height) - half, 0, height)
    bottom = np.clip(np.arange(height) + half + 1, 0, height)
    left = np.clip(np.arange(width) - half, 0, width)
    right = np.clip(np.arange(width) + half + 1, 0, width)

    # the summed-area table, accumulated in place (the same sums as cumsum, no temporaries)
    integral = np.zeros((n, height + 1, width + 1), dtype=np.float64)
    integral[:, 1:, 1:] = maps
    np.cumsum(integral[:, 1:, 1:], axis=1, out=integral[:, 1:, 1:])
    np.cumsum(integral[:, 1:, 1:], axis=2, out=integral[:, 1:, 1:])
    # pixels of each window inside the map: whole numbers, exact in float64
    counts = ((bottom - top)[:, None] * (right - left)[None, :]).astype(np.float64)
    out = np.empty((n, height, width), dtype=np.float64)
    # a block of rows at a time: the same arithmetic per pixel, temporaries bounded for
    # multi-megapixel maps
    block = max(1, BOX_MEAN_PIXELS // max(n * width, 1))
    for start in range(0, height, block):
        t, b = top[start:start + block, None], bottom[start:start + block, None]
        sums = (integral[:, b, right[None, :]] - integral[:, t, right[None, :]]
                - integral[:, b, left[None, :]] + integral[:, t, left[None, :]])
        out[:, start:start + block] = sums / counts[start:start + block]
    return out


def smoothed_max_image_score(anomaly_maps: np.ndarray, size: int = 3) -> np.ndarray:
    """Image score: the maximum of each map after a ``size`` x ``size`` box blur (a lone hot
    pixel counts less than a hot blob).

    Args:
        anomaly_maps: Float array (N, H, W).
        size: Odd window side, >= 1 (1 = :func:`max_image_score`).

    Returns:
        Array (N,) of float64 image scores.
    """
    if size < 1 or size % 2 == 0:
        raise MetricsInputError(f"the box size must be odd and >= 1, got {size}")
    blurred = _box_mean(np.asarray(anomaly_maps), size)
    return blurred.reshape(blurred.shape[0], -1).max(axis=1)


def top_k_mean_image_score(anomaly_maps: np.ndarray, k: int = 10) -> np.ndarray:
    """Image score: the mean of each map's ``k`` highest pixels (all of them if fewer).

    Returns:
        Array (N,) of float64 image scores.
    """
    if k < 1:
        raise MetricsInputError(f"k must be >= 1, got {k}")
    flat = np.asarray(anomaly_maps).reshape(len(anomaly_maps), -1)
    k = min(int(k), flat.shape[1])
    top = np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k:]
    return top.astype(np.float64).mean(axis=1)


def top_fraction_mean_image_score(anomaly_maps: np.ndarray, fraction: float = 0.01
                                  ) -> np.ndarray:
    """Image score: the mean of each map's highest ``fraction`` of pixels (at least one).

    Returns:
        Array (N,) of float64 image scores.
    """
    if not 0.0 < fraction <= 1.0:
        raise MetricsInputError(f"fraction must be in (0, 1], got {fraction}")
    n_pixels = int(np.prod(np.asarray(anomaly_maps).shape[1:]))
    return top_k_mean_image_score(anomaly_maps, max(1, math.ceil(fraction * n_pixels)))


IMAGE_SCORES: Dict[str, ImageScoreFn] = {
    "max": max_image_score,
    "blur3_max": lambda maps: smoothed_max_image_score(maps, 3),
    "blur5_max": lambda maps: smoothed_max_image_score(maps, 5),
    "top10_mean": lambda maps: top_k_mean_image_score(maps, 10),
    "top1pct_mean": lambda maps: top_fraction_mean_image_score(maps, 0.01),
}
"""The cheap image scores, by name (``eval.image_score``): each maps (N, H, W) maps to (N,)."""

SIGNAL_IMAGE_SCORE = "signals_max"
"""The name (``eval.image_score``) of the maximum of a generator's signal image map (its
``feature_stats`` signals z-scored against the held-out images' per-image maxima): the same
max as ``max``, of a different map, which the model computes."""

SIGNAL_MEAN_SCORE = "signals_mean"
"""The name (``eval.image_score``) of the mean over a generator's ``feature_stats`` signals of
each one's image maximum (z-scored as for :data:`SIGNAL_IMAGE_SCORE`): a signal that is
unusual on its own moves the score by a third (of three signals), not all the way."""

SIGNAL_IMAGE_SCORES = (SIGNAL_IMAGE_SCORE, SIGNAL_MEAN_SCORE)
"""The image scores read from a generator's signal maps, not from its anomaly map."""


def signal_image_scores(signal_maps: Sequence[ArrayLike]) -> Dict[str, np.ndarray]:
    """:data:`SIGNAL_IMAGE_SCORES` of each image's signal maps ``(S, H, W)`` (one z-scored map
    per signal; sizes may differ between images): ``signals_max`` the largest value over every
    signal and pixel, ``signals_mean`` the mean over the signals of each one's maximum; float64
    arrays (N,)."""
    peaks = []
    for i, maps in enumerate(signal_maps):
        array = np.asarray(maps.detach().cpu() if isinstance(maps, torch.Tensor) else maps,
                           dtype=np.float64)
        if array.ndim != 3 or array.shape[0] < 1 or array[0].size == 0:
            raise MetricsInputError(f"signal maps of image {i} must be (S, H, W) with S >= 1 and "
                                    f"a non-empty map, got shape {array.shape}")
        peaks.append(array.reshape(array.shape[0], -1).max(axis=1))
    return {SIGNAL_IMAGE_SCORE: np.asarray([p.max() for p in peaks], dtype=np.float64),
            SIGNAL_MEAN_SCORE: np.asarray([p.mean() for p in peaks], dtype=np.float64)}


def image_scores(anomaly_maps: ArrayLike, names: Optional[Sequence[str]] = None
                 ) -> Dict[str, np.ndarray]:
    """Every image score of :data:`IMAGE_SCORES` (or those in ``names``) of a batch of maps, as
    float64 arrays (N,)."""
    maps = _check_maps(anomaly_maps)
    chosen = list(IMAGE_SCORES) if names is None else list(names)
    unknown = [name for name in chosen if name not in IMAGE_SCORES]
    if unknown:
        raise MetricsInputError(f"unknown image score(s) {unknown}; choose from "
                                f"{', '.join(IMAGE_SCORES)}")
    return {name: np.asarray(IMAGE_SCORES[name](maps), dtype=np.float64) for name in chosen}


def image_score_threshold(normal_scores: ArrayLike, quantile: float = 0.99) -> float:
    """Label-free image threshold: the ``quantile`` of the image scores of normal images (the
    inverse empirical CDF, ``numpy.quantile(..., method="inverted_cdf")``).

    An image is flagged anomalous when its score is strictly *above* the threshold, so at most
    a fraction ``1 - quantile`` of these normal images is flagged (exactly
    ``floor((1 - quantile) * n) / n`` when their scores are distinct).
    """
    if not 0.0 < quantile <= 1.0:
        raise MetricsInputError(f"quantile must be in (0, 1], got {quantile}")
    scores = _to_array(normal_scores, "normal_scores").astype(np.float64).reshape(-1)
    if scores.size == 0:
        raise MetricsInputError("no normal image scores to choose an image threshold on")
    if not np.isfinite(scores).all():
        raise MetricsInputError("normal image scores contain NaN or infinite values")
    return float(np.quantile(scores, quantile, method="inverted_cdf"))


# ----------------------------------------------------------------------------------------------
# Connected components


def _hook_to_smallest(n_nodes: int, ends_a: np.ndarray, ends_b: np.ndarray) -> np.ndarray:
    """Union-find over ``n_nodes`` nodes joined by the edges ``(ends_a[i], ends_b[i])``:
    ``root[v]`` is the smallest node of ``v``'s component.

    Each round hooks, for every edge whose ends have different roots, the larger root under the
    smaller one (minimum over all such edges), then jumps pointers until every node points at its
    root, and drops edges whose ends now share a root. Blobs, spirals and noise all finish in a
    handful of rounds.
    """
    parent = np.arange(n_nodes)
    while ends_a.size:
        root_a, root_b = parent[ends_a], parent[ends_b]
        open_edges = root_a != root_b
        if not open_edges.any():
            break
        ends_a, ends_b = ends_a[open_edges], ends_b[open_edges]
        root_a, root_b = root_a[open_edges], root_b[open_edges]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:  # pointer jumping until every node points at its root
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent
    return parent


def _component_roots(masks: np.ndarray) -> Tuple[np.ndarray, int]:
    """8-connected components of the foreground of a bool batch (N, H, W).

    Foreground pixels are numbered 0..F-1 in raster order over the batch. The masks are padded
    with background (images never touch each other, no run wraps a row) and cut into runs: the
    maximal horizontal segments of foreground. A run touches a run of the row above when their
    column spans, widened by one pixel for the corners, overlap; the runs so joined are merged
    by :func:`_hook_to_smallest`. Work is one pass over the pixels to find the runs, then per
    run, not per pixel.

    Returns:
        (roots, number of components): ``roots[f]`` is the number of the smallest foreground pixel
        of pixel ``f``'s component.
    """
    n, height, width = masks.shape
    padded = np.zeros((n, height + 2, width + 2), dtype=bool)
    padded[:, 1:-1, 1:-1] = masks
    flat = padded.reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts, stops = changes[0::2], changes[1::2]  # run r covers flat[starts[r]:stops[r]]
    if starts.size == 0:
        return np.zeros(0, dtype=np.int64), 0
    row_stride = width + 2
    above_starts, above_stops = starts + row_stride, stops + row_stride  # moved one row down
    # run q touches run p of the row above when p's columns reach q's, one pixel either side
    first = np.searchsorted(above_stops, starts, side="left")
    last = np.searchsorted(above_starts, stops, side="right")
    n_touching = np.maximum(last - first, 0)
    runs_below = np.repeat(np.arange(starts.size), n_touching)
    offsets = np.arange(runs_below.size) - np.repeat(np.cumsum(n_touching) - n_touching,
                                                     n_touching)
    runs_above = np.repeat(first, n_touching) + offsets
    run_root = _hook_to_smallest(starts.size, runs_below, runs_above)
    lengths = stops - starts
    first_pixel = np.cumsum(lengths) - lengths  # the number of each run's first pixel
    n_components = int(np.count_nonzero(run_root == np.arange(starts.size)))
    return np.repeat(first_pixel[run_root], lengths), n_components


def connected_components(masks: ArrayLike) -> Tuple[np.ndarray, int]:
    """Labels the 8-connected components of binary masks (no scipy needed).

    Two defect pixels belong to the same region when they touch by an edge or a corner. Images of
    a batch are labelled independently but numbered consecutively.

    Args:
        masks: Binary masks (N, H, W), (N, 1, H, W) or (H, W).

    Returns:
        (labels, number of components): int64 labels of shape (N, H, W), 0 = background and
        1..K the components in raster order of their first pixel.
    """
    array = _binarise_masks(_as_batch(_to_array(masks, "masks"), "masks"))
    roots, n_components = _component_roots(array)
    labels = np.zeros(array.size, dtype=np.int64)
    if n_components:
        _, component_id = np.unique(roots, return_inverse=True)
        labels[np.flatnonzero(array)] = component_id.reshape(-1) + 1
    return labels.reshape(array.shape), n_components


# ----------------------------------------------------------------------------------------------
# Score grid with range doubling


class _ScoreGrid:
    """``num_bins`` equal bins over ``[lo, hi]`` that can double their range.

    Bin ``b`` holds scores in ``[lo + b*w, lo + (b+1)*w)`` (the last bin also holds ``hi``). When a
    score falls outside, the range doubles upwards (``hi' = lo + 2*(hi - lo)``) or downwards
    (``lo' = hi - 2*(hi - lo)``) as often as needed; each old bin pair becomes one new bin, so new
    bin edges are a subset of old ones and counts stay exact (only the resolution halves).
    """

    def __init__(self, score_range: Optional[Tuple[float, float]], num_bins: int) -> None:
        self.num_bins = num_bins
        self.initial_range: Optional[Tuple[float, float]] = None
        self.lo = math.nan
        self.hi = math.nan
        self.doublings = 0
        if score_range is not None:
            self.initialise(*score_range)

    @property
    def ready(self) -> bool:
        return not math.isnan(self.lo)

    def initialise(self, lo: float, hi: float) -> None:
        self.lo, self.hi = float(lo), float(hi)
        self.initial_range = (self.lo, self.hi)

    def plan(self, smallest: float, largest: float) -> List[str]:
        """Directions ("up"/"down") of the doublings needed to cover ``[smallest, largest]``."""
        lo, hi = self.lo, self.hi
        directions: List[str] = []
        while largest > hi or smallest < lo:
            if len(directions) + self.doublings >= MAX_RANGE_DOUBLINGS:
                raise MetricsInputError(
                    f"scores from {smallest:g} to {largest:g} are far outside the score range "
                    f"{self.initial_range}; pass score_range=(lo, hi) covering all scores")
            width = hi - lo
            if largest > hi:
                hi = lo + 2.0 * width
                directions.append("up")
            else:
                lo = hi - 2.0 * width
                directions.append("down")
        return directions

    def double(self, direction: str) -> None:
        width = self.hi - self.lo
        if direction == "up":
            self.hi = self.lo + 2.0 * width
        else:
            self.lo = self.hi - 2.0 * width
        self.doublings += 1

    def bin_index(self, scores: np.ndarray) -> np.ndarray:
        """Bin of each score (same shape; int32, int64 past 2**31 bins); scores must lie in
        [lo, hi] (every caller doubles the range first).

        ``floor((score - lo) * num_bins / (hi - lo))`` in float64, at most ``num_bins - 1``; a
        score ``>= lo`` gives a difference ``>= 0``, so no lower clip is needed."""
        position = scores.astype(np.float64)
        if self.lo != 0.0:
            position -= self.lo
        position *= self.num_bins / (self.hi - self.lo)
        bins = position.astype(np.int32 if self.num_bins < 2**31 else np.int64)
        np.minimum(bins, self.num_bins - 1, out=bins)
        return bins


def _count(values: np.ndarray, length: int) -> np.ndarray:
    """``np.bincount(values.ravel(), minlength=length)`` (int64) of integers in ``[0, length)``.

    Counted by torch's CPU ``bincount``, about 2.5x faster than numpy's on int32 input
    (numpy's converts it to int64 first): the pixel histograms are most of the metric pass.
    """
    return torch.bincount(torch.from_numpy(np.ascontiguousarray(values).reshape(-1)),
                          minlength=length).numpy()


def _merge_bin_pairs(hist: np.ndarray, direction: str) -> np.ndarray:
    """1-D additive histogram after one doubling of its range (bin pairs summed)."""
    n_bins = hist.size
    if n_bins % 2:
        padding = np.zeros(1, dtype=hist.dtype)
        hist = np.concatenate([hist, padding] if direction == "up" else [padding, hist])
    pairs = hist.reshape(-1, 2).sum(axis=1)
    empty = np.zeros(n_bins - pairs.size, dtype=hist.dtype)
    return np.concatenate([pairs, empty] if direction == "up" else [empty, pairs])


def _resample_threshold_curve(curve: np.ndarray, direction: str,
                              value_above_range: float = 0.0) -> np.ndarray:
    """A curve sampled at thresholds ``lo + i*W`` after one doubling of the range.

    Going up, every other old threshold survives and thresholds above the old ``hi`` predict
    nothing (``value_above_range``). Going down, new thresholds below the old ``lo`` predict
    everything, exactly like the old threshold ``lo`` (``curve[0]``).
    """
    n_thresholds = curve.size
    if direction == "up":
        kept = curve[0::2]
        rest = np.full(n_thresholds - kept.size, value_above_range, dtype=curve.dtype)
        return np.concatenate([kept, rest])
    kept = curve[(n_thresholds % 2)::2]
    rest = np.full(n_thresholds - kept.size, curve[0], dtype=curve.dtype)
    return np.concatenate([rest, kept])


# ----------------------------------------------------------------------------------------------
# Curve helpers


def _reverse_cumsum(values: np.ndarray) -> np.ndarray:
    """``out[i] = values[i:].sum()`` along the last axis."""
    return np.flip(np.cumsum(np.flip(values, axis=-1), axis=-1), axis=-1)


def _auroc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUROC = P(score_pos > score_neg) + 0.5 P(equal bin), from two aligned histograms."""
    n_pos, n_neg = positive.sum(), negative.sum()
    positive_above = n_pos - np.cumsum(positive)
    return float((negative * (positive_above + 0.5 * positive)).sum() / (n_pos * n_neg))


def _auroc_from_samples(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUROC (Mann-Whitney U with average ranks for ties)."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = average_rank[inverse.reshape(-1)]
    n_pos = float(labels.sum())
    n_neg = float(labels.size) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def image_auroc(labels: Any, scores: Any) -> Optional[float]:
    """Exact AUROC of per-image scores (ties count half); ``None`` with only one class.

    For the few numbers of an image-level score (e.g. a detector's), where no histogram is
    needed.
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.size != scores.size:
        raise MetricsInputError(f"{labels.size} labels but {scores.size} scores")
    if labels.size == 0 or labels.all() or not labels.any():
        return None
    return _auroc_from_samples(scores, labels)


def _area_up_to(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoid area under (x, y) from x[0] to ``x_limit`` (x ascending, linear at the limit)."""
    end = int(np.searchsorted(x, x_limit, side="right"))
    area = float(np.sum((x[1:end] - x[:end - 1]) * (y[1:end] + y[:end - 1]) / 2.0))
    if end < len(x) and x[end - 1] < x_limit:
        fraction = (x_limit - x[end - 1]) / (x[end] - x[end - 1])
        y_limit = y[end - 1] + fraction * (y[end] - y[end - 1])
        area += (x_limit - x[end - 1]) * (y[end - 1] + y_limit) / 2.0
    return area


# ----------------------------------------------------------------------------------------------
# The accumulator


class SegmentationMetrics:
    """Streaming anomaly-segmentation metrics over a whole test set, in constant memory.

    Call :meth:`update` batch by batch, then :meth:`compute`. See ``docs/metrics.md``.

    Args:
        score_range: ``(lo, hi)`` of the anomaly scores; ``None`` takes the first batch's min and
            max. Scores outside the range double it (see ``docs/metrics.md``); a warning in the
            result reports the lost resolution, so pass a range that covers your scores.
        num_thresholds: Thresholds of the IoU/F1 curves: ``lo + i*(hi-lo)/num_thresholds`` for
            ``i = 0..num_thresholds-1``.
        num_bins: Histogram bins for AUROC and AUPRO; a multiple of ``num_thresholds``.
            Defaults to the smallest multiple >= 2**17.
        fpr_limit: Upper FPR limit of AUPRO, in (0, 1].
        image_score_fn: Maps a float numpy array (N, H, W) of anomaly maps to N image scores
            (array or tensor); default :func:`max_image_score`, the max of each map.
        resize_masks: Resize masks whose size differs from the maps' (nearest neighbour) instead
            of raising.
        fixed_thresholds: Thresholds evaluated exactly per pixel (e.g. a label-free threshold
            known before the test pass); :meth:`at_threshold` on any other value uses the grid.
    """

    def __init__(
        self,
        score_range: Optional[Tuple[float, float]] = (0.0, 1.0),
        num_thresholds: int = 10_000,
        num_bins: Optional[int] = None,
        fpr_limit: float = 0.3,
        image_score_fn: Optional[ImageScoreFn] = None,
        resize_masks: bool = False,
        fixed_thresholds: Sequence[float] = (),
    ) -> None:
        if score_range is not None:
            lo, hi = (float(v) for v in score_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise MetricsInputError(
                    f"score_range must be two finite numbers lo < hi, got {score_range}")
            score_range = (lo, hi)
        if int(num_thresholds) != num_thresholds or num_thresholds < 2:
            raise MetricsInputError(f"num_thresholds must be an integer >= 2, got {num_thresholds}")
        num_thresholds = int(num_thresholds)
        if num_bins is None:
            num_bins = num_thresholds * math.ceil(MIN_DEFAULT_BINS / num_thresholds)
        if int(num_bins) != num_bins or num_bins < num_thresholds or num_bins % num_thresholds:
            raise MetricsInputError(
                f"num_bins must be a multiple of num_thresholds={num_thresholds}, got {num_bins}")
        if not 0.0 < fpr_limit <= 1.0:
            raise MetricsInputError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        fixed = [float(t) for t in fixed_thresholds]
        if not all(math.isfinite(t) for t in fixed):
            raise MetricsInputError(f"fixed_thresholds must be finite, got {fixed}")
        self.score_range = score_range
        self.num_thresholds = num_thresholds
        self.num_bins = int(num_bins)
        self.fpr_limit = float(fpr_limit)
        self.image_score_fn: ImageScoreFn = image_score_fn or max_image_score
        self.resize_masks = bool(resize_masks)
        self.fixed_thresholds: Tuple[float, ...] = tuple(fixed)
        self.reset()

    def reset(self) -> None:
        """Forgets everything accumulated so far."""
        self._grid = _ScoreGrid(self.score_range, self.num_bins)
        self._bins_per_threshold = self.num_bins // self.num_thresholds
        self._defect_hist = np.zeros(self.num_bins, dtype=np.int64)
        self._normal_hist = np.zeros(self.num_bins, dtype=np.int64)
        self._region_weight_hist = np.zeros(self.num_bins, dtype=np.float64)
        self._iou_sum_per_image = np.zeros(self.num_thresholds, dtype=np.float64)
        self._n_iou_images = 0
        n_fixed = len(self.fixed_thresholds)
        self._fixed_tp = np.zeros(n_fixed, dtype=np.int64)
        self._fixed_fp = np.zeros(n_fixed, dtype=np.int64)
        self._fixed_iou_sum = np.zeros(n_fixed, dtype=np.float64)
        self._image_scores: List[np.ndarray] = []
        self._image_labels: List[np.ndarray] = []
        self._n_regions = 0
        self._n_empty_mask_defective = 0
        self._min_score = math.inf
        self._max_score = -math.inf

    # -- accumulation -------------------------------------------------------------------------

    def update(self, anomaly_maps: ArrayLike, masks: ArrayLike, labels: Optional[ArrayLike] = None,
               image_scores: Optional[ArrayLike] = None) -> None:
        """Adds a batch.

        Args:
            anomaly_maps: (N, H, W), (N, 1, H, W) or (H, W) floats, higher = more anomalous.
            masks: Binary ground truth of the same shape ({0,1}, bool or {0,255}).
            labels: Optional (N,) image labels, 1 = defective; default ``mask.any()``.
            image_scores: Optional (N,) image scores; default ``image_score_fn(anomaly_maps)``.

        Raises:
            MetricsInputError: NaN/inf scores, non-binary masks, mismatched shapes or counts, or
                a label 0 on an image with defect pixels. The state is unchanged then.
        """
        maps, smallest, largest = _check_maps_and_range(anomaly_maps)
        n_images = maps.shape[0]
        defect, has_defect = _check_masks(masks, maps.shape, self.resize_masks)
        if labels is None:
            image_labels = has_defect
        else:
            image_labels = _check_labels(labels, n_images, has_defect)
        if image_scores is None:
            try:
                scores = self.image_score_fn(maps)
            except MetricsInputError:
                raise
            except Exception as error:  # noqa: BLE001 - report which callable failed
                raise MetricsInputError(f"image_score_fn failed on maps of shape "
                                        f"{tuple(maps.shape)}: {error}") from error
            image_score_values = _check_per_image(scores, n_images, "image scores")
        else:
            image_score_values = _check_per_image(image_scores, n_images, "image_scores")

        if not self._grid.ready:
            self._grid.initialise(smallest, largest if largest > smallest else smallest + 1.0)
        for direction in self._grid.plan(smallest, largest):
            self._double_range(direction)
        self._min_score = min(self._min_score, smallest)
        self._max_score = max(self._max_score, largest)

        bins = self._grid.bin_index(maps)
        defective_images = defect.reshape(n_images, -1).any(axis=1)
        self._accumulate_pixels(bins, defect, defective_images)
        if self.fixed_thresholds:
            self._accumulate_fixed_thresholds(maps, defect, defective_images)
        self._n_empty_mask_defective += int(np.count_nonzero(image_labels & ~defective_images))
        self._image_scores.append(image_score_values)
        self._image_labels.append(image_labels.astype(bool))

    def _double_range(self, direction: str) -> None:
        self._grid.double(direction)
        self._defect_hist = _merge_bin_pairs(self._defect_hist, direction)
        self._normal_hist = _merge_bin_pairs(self._normal_hist, direction)
        self._region_weight_hist = _merge_bin_pairs(self._region_weight_hist, direction)
        self._iou_sum_per_image = _resample_threshold_curve(self._iou_sum_per_image, direction)

    def _accumulate_pixels(self, bins: np.ndarray, defect: np.ndarray,
                           defective_images: np.ndarray) -> None:
        """Every histogram and per-image curve of a batch: one count of all pixels' bins and
        one of the defect pixels' bins (normal = all - defect), then the regions and the
        per-image IoU curves of the images with defect pixels."""
        pixel_hist = _count(bins, self.num_bins)
        if defective_images.any():
            defect_bins = bins[defect]  # raster order: image by image
            defect_hist = _count(defect_bins, self.num_bins)
            self._defect_hist += defect_hist
            pixel_hist -= defect_hist
            self._accumulate_regions(defect_bins, defect if defective_images.all()
                                     else defect[defective_images])
            n_defect = np.count_nonzero(defect.reshape(defect.shape[0], -1), axis=1)
            self._accumulate_per_image_iou(bins, defect_bins, n_defect)
        self._normal_hist += pixel_hist

    def _accumulate_regions(self, defect_bins: np.ndarray, defect: np.ndarray) -> None:
        """The AUPRO histogram: each defect pixel (``defect_bins``, in raster order) weighs one
        over the size of its region."""
        roots, n_regions = _component_roots(defect)
        region_size = np.bincount(roots, minlength=roots.size)
        weights = 1.0 / region_size[roots]
        self._region_weight_hist += np.bincount(defect_bins, weights=weights,
                                                minlength=self.num_bins)
        self._n_regions += n_regions

    def _accumulate_per_image_iou(self, bins: np.ndarray, defect_bins: np.ndarray,
                                  n_defect: np.ndarray) -> None:
        """Adds the IoU curves of the images with defect pixels (``n_defect > 0``; their bins
        ``defect_bins`` image by image) to the per-image sum, ``PER_IMAGE_CHUNK`` images at a
        time: per image, one count of all its pixels and one of its defect pixels on the
        threshold grid."""
        per_threshold, n_thresholds = self._bins_per_threshold, self.num_thresholds
        pixel_ends = np.cumsum(n_defect)
        defective = np.flatnonzero(n_defect)
        for start in range(0, defective.size, PER_IMAGE_CHUNK):
            images = defective[start:start + PER_IMAGE_CHUNK]
            n_images = images.size
            first_slot = np.arange(n_images, dtype=bins.dtype) * n_thresholds
            slots = bins[images]
            slots //= per_threshold
            slots += first_slot[:, None, None]
            every_pixel = _count(slots, n_images * n_thresholds).reshape(n_images, -1)
            pixels = slice(pixel_ends[images[0]] - n_defect[images[0]], pixel_ends[images[-1]])
            defect_slots = defect_bins[pixels] // per_threshold
            defect_slots += np.repeat(first_slot, n_defect[images])
            defect_pixel = _count(defect_slots, n_images * n_thresholds).reshape(n_images, -1)
            # "score >= threshold i" = bins i and above: reverse cumulative sums per image.
            true_pos = _reverse_cumsum(defect_pixel)
            false_pos = (_reverse_cumsum(every_pixel) - true_pos).astype(np.float64)
            image_defect = n_defect[images].astype(np.float64)[:, None]
            self._iou_sum_per_image += (true_pos.astype(np.float64) / (image_defect + false_pos)
                                        ).sum(axis=0)
            self._n_iou_images += n_images

    def _accumulate_fixed_thresholds(self, maps: np.ndarray, defect: np.ndarray,
                                     defective_images: np.ndarray) -> None:
        """Exact per-pixel counts at each fixed threshold: the pixels at or above it per image,
        and among them the defect pixels (from the defect pixels' scores only)."""
        n_images = maps.shape[0]
        n_defect = np.count_nonzero(defect.reshape(n_images, -1), axis=1)
        defect_scores = maps[defect]  # raster order: image by image
        image_of_defect = np.repeat(np.arange(n_images), n_defect)
        flat_maps = maps.reshape(n_images, -1)
        for k, threshold in enumerate(self.fixed_thresholds):
            predicted = np.count_nonzero(flat_maps >= threshold, axis=1)
            true_pos = np.bincount(image_of_defect[defect_scores >= threshold],
                                   minlength=n_images)
            false_pos = predicted - true_pos
            self._fixed_tp[k] += int(true_pos.sum())
            self._fixed_fp[k] += int(false_pos.sum())
            iou = true_pos[defective_images] / (n_defect + false_pos)[defective_images]
            self._fixed_iou_sum[k] += float(iou.sum())

    # -- results ------------------------------------------------------------------------------

    def thresholds(self) -> np.ndarray:
        """The threshold grid of the IoU/F1 curves (changes if the score range doubles)."""
        self._require_data()
        grid = self._grid
        return grid.lo + (grid.hi - grid.lo) * np.arange(self.num_thresholds) / self.num_thresholds

    def _require_data(self) -> None:
        if not self._image_scores:
            raise MetricsInputError("no data: call update() with at least one batch before "
                                    "compute()/at_threshold()")

    def _threshold_counts(self) -> Tuple[np.ndarray, np.ndarray]:
        """(TP, FP) pixel counts at each grid threshold."""
        k = self._bins_per_threshold
        defect = self._defect_hist.reshape(self.num_thresholds, k).sum(axis=1)
        normal = self._normal_hist.reshape(self.num_thresholds, k).sum(axis=1)
        return (_reverse_cumsum(defect.astype(np.float64)),
                _reverse_cumsum(normal.astype(np.float64)))

    def compute(self, threshold: Optional[float] = None) -> Dict[str, Any]:
        """All metrics over the data seen so far.

        Args:
            threshold: If given, ``result["at_threshold"] = self.at_threshold(threshold)``.

        Returns:
            A dict; undefined metrics are ``None`` (undefined curves all-NaN) with the reason in
            ``result["warnings"]``.
            Keys: ``pixel_auroc``, ``image_auroc``, ``aupro``, ``fpr_limit``,
            ``iou_pooled_best``, ``iou_pooled_best_threshold``, ``iou_mean_per_image_best``,
            ``iou_mean_per_image_best_threshold``, ``pixel_f1_max``, ``pixel_f1_max_threshold``,
            ``iou_curve`` (dict of numpy arrays ``thresholds``, ``iou_pooled``,
            ``iou_mean_per_image``), ``n_images``, ``n_defective``, ``n_pixels``,
            ``n_defect_pixels``, ``n_regions``, ``score_range``, ``score_min``, ``score_max``,
            ``warnings``, and ``at_threshold`` if requested.
        """
        self._require_data()
        warnings: List[str] = []
        image_labels = np.concatenate(self._image_labels)
        defect_hist = self._defect_hist.astype(np.float64)
        normal_hist = self._normal_hist.astype(np.float64)
        n_defect, n_normal = float(defect_hist.sum()), float(normal_hist.sum())
        n_defective = int(image_labels.sum())
        thresholds = self.thresholds()
        if self._grid.doublings:
            warnings.append(self._range_doubled_warning())
        image_auroc = self._image_auroc(image_labels, warnings)
        pixel_auroc, aupro = self._pixel_auroc_and_aupro(defect_hist, normal_hist, warnings)
        iou_pooled, iou_pooled_best, iou_pooled_best_t, f1_max, f1_max_t = \
            self._pooled_iou_and_f1(thresholds, n_defect, warnings)
        iou_mean, iou_mean_best, iou_mean_best_t = self._mean_iou_per_image(thresholds, warnings)

        result: Dict[str, Any] = {
            "pixel_auroc": pixel_auroc,
            "image_auroc": image_auroc,
            "aupro": aupro,
            "fpr_limit": self.fpr_limit,
            "iou_pooled_best": iou_pooled_best,
            "iou_pooled_best_threshold": iou_pooled_best_t,
            "iou_mean_per_image_best": iou_mean_best,
            "iou_mean_per_image_best_threshold": iou_mean_best_t,
            "pixel_f1_max": f1_max,
            "pixel_f1_max_threshold": f1_max_t,
            "iou_curve": {"thresholds": thresholds, "iou_pooled": iou_pooled,
                          "iou_mean_per_image": iou_mean},
            "n_images": int(len(image_labels)),
            "n_defective": n_defective,
            "n_pixels": int(n_defect + n_normal),
            "n_defect_pixels": int(n_defect),
            "n_regions": self._n_regions,
            "score_range": (self._grid.lo, self._grid.hi),
            "score_min": self._min_score,
            "score_max": self._max_score,
            "warnings": warnings,
        }
        if threshold is not None:
            result["at_threshold"] = self.at_threshold(threshold)
        return result

    def _range_doubled_warning(self) -> str:
        grid = self._grid
        old_width = (grid.initial_range[1] - grid.initial_range[0]) / self.num_bins
        return (f"scores in [{self._min_score:g}, {self._max_score:g}] fell outside the score "
                f"range {grid.initial_range}; the range was doubled {grid.doublings} time(s) to "
                f"({grid.lo:g}, {grid.hi:g}), so the bin width grew from {old_width:.3g} to "
                f"{(grid.hi - grid.lo) / self.num_bins:.3g}. Pass score_range=(lo, hi) covering "
                "all scores for full resolution.")

    def _image_auroc(self, image_labels: np.ndarray, warnings: List[str]) -> Optional[float]:
        """AUROC of the image scores, or ``None`` (and a warning) without both kinds."""
        n_defective = int(image_labels.sum())
        if 0 < n_defective < len(image_labels):
            return _auroc_from_samples(np.concatenate(self._image_scores), image_labels)
        kind = "defective" if n_defective == 0 else "normal"
        warnings.append(f"image_auroc is undefined: there are no {kind} images "
                        f"({len(image_labels)} images, {n_defective} defective)")
        return None

    def _pixel_auroc_and_aupro(self, defect_hist: np.ndarray, normal_hist: np.ndarray,
                               warnings: List[str]
                               ) -> Tuple[Optional[float], Optional[float]]:
        n_defect, n_normal = float(defect_hist.sum()), float(normal_hist.sum())
        if n_defect > 0 and n_normal > 0:
            aupro = self._aupro(normal_hist, n_normal)
            return (_auroc_from_histograms(defect_hist, normal_hist),
                    None if aupro is None else float(aupro))
        kind = "defect" if n_defect == 0 else "normal"
        warnings.append(f"pixel_auroc and aupro are undefined: there are no {kind} pixels")
        return None, None

    def _pooled_iou_and_f1(self, thresholds: np.ndarray, n_defect: float, warnings: List[str]
                           ) -> Tuple[np.ndarray, Optional[float], Optional[float],
                                      Optional[float], Optional[float]]:
        """``(pooled IoU curve, best IoU, its threshold, F1-max, its threshold)``."""
        if n_defect == 0:
            warnings.append("iou_pooled and pixel_f1 are undefined: there are no defect pixels")
            return np.full(self.num_thresholds, np.nan), None, None, None, None
        true_pos, false_pos = self._threshold_counts()
        iou_pooled = true_pos / (n_defect + false_pos)
        f1 = 2.0 * true_pos / (true_pos + false_pos + n_defect)
        best = int(np.argmax(iou_pooled))  # the first (lowest) threshold among ties
        best_f1 = int(np.argmax(f1))
        return (iou_pooled, float(iou_pooled[best]), float(thresholds[best]),
                float(f1[best_f1]), float(thresholds[best_f1]))

    def _mean_iou_per_image(self, thresholds: np.ndarray, warnings: List[str]
                            ) -> Tuple[np.ndarray, Optional[float], Optional[float]]:
        """``(mean per-image IoU curve, its best value, that threshold)``."""
        iou_mean = np.full(self.num_thresholds, np.nan)
        best_value = best_threshold = None
        if self._n_iou_images:
            iou_mean = self._iou_sum_per_image / self._n_iou_images
            best = int(np.argmax(iou_mean))
            best_value, best_threshold = float(iou_mean[best]), float(thresholds[best])
        else:
            warnings.append("iou_mean_per_image is undefined: no image has defect pixels")
        if self._n_empty_mask_defective:
            warnings.append(
                f"{self._n_empty_mask_defective} image(s) labelled defective have an empty mask: "
                "they count for image_auroc but not for the per-image IoU")
        return iou_mean, best_value, best_threshold

    def _aupro(self, normal_hist: np.ndarray, n_normal: float) -> Optional[float]:
        """Area under PRO(FPR) from 0 to ``fpr_limit``, divided by ``fpr_limit``."""
        if self._n_regions == 0:
            return None
        region_weight = self._region_weight_hist
        # Thresholds from above the top bin (FPR 0, PRO 0) down to the lowest bin edge.
        fpr = np.concatenate([[0.0], np.cumsum(normal_hist[::-1])]) / n_normal
        pro = np.concatenate([[0.0], np.cumsum(region_weight[::-1])]) / self._n_regions
        return _area_up_to(fpr, pro, self.fpr_limit) / self.fpr_limit

    def at_threshold(self, threshold: float) -> Dict[str, Any]:
        """Pixel metrics with one threshold chosen without test labels.

        Exact if ``threshold`` is one of ``fixed_thresholds`` or lies outside the score range;
        otherwise the nearest grid threshold is used (``threshold_used``, off by at most half a
        grid step).

        Returns:
            Dict with ``threshold``, ``threshold_used``, ``exact``, ``iou_pooled``,
            ``iou_mean_per_image``, ``f1``, ``precision``, ``recall``, ``fpr``; a value whose
            denominator is zero is ``None``.
        """
        self._require_data()
        threshold = float(threshold)
        n_defect = float(self._defect_hist.sum())
        n_normal = float(self._normal_hist.sum())
        grid = self._grid
        if threshold in self.fixed_thresholds:
            k = self.fixed_thresholds.index(threshold)
            true_pos, false_pos = float(self._fixed_tp[k]), float(self._fixed_fp[k])
            iou_sum, used, exact = float(self._fixed_iou_sum[k]), threshold, True
        elif threshold > self._max_score:  # nothing predicted
            true_pos = false_pos = iou_sum = 0.0
            used, exact = threshold, True
        else:
            step = (grid.hi - grid.lo) / self.num_thresholds
            index = 0 if threshold <= self._min_score else int(
                np.clip(round((threshold - grid.lo) / step), 0, self.num_thresholds - 1))
            exact = threshold <= self._min_score
            tp_curve, fp_curve = self._threshold_counts()
            true_pos, false_pos = float(tp_curve[index]), float(fp_curve[index])
            iou_sum = float(self._iou_sum_per_image[index])
            used = threshold if exact else float(self.thresholds()[index])
            exact = exact or used == threshold

        def ratio(numerator: float, denominator: float) -> Optional[float]:
            return numerator / denominator if denominator > 0 else None

        return {
            "threshold": threshold,
            "threshold_used": used,
            "exact": exact,
            "iou_pooled": ratio(true_pos, n_defect + false_pos) if n_defect > 0 else None,
            "iou_mean_per_image": ratio(iou_sum, self._n_iou_images),
            "f1": ratio(2.0 * true_pos, true_pos + false_pos + n_defect) if n_defect else None,
            "precision": ratio(true_pos, true_pos + false_pos),
            "recall": ratio(true_pos, n_defect),
            "fpr": ratio(false_pos, n_normal),
        }


# ----------------------------------------------------------------------------------------------
# Label-free threshold


class NormalScoreQuantile:
    """Streaming quantile of the pixel scores of normal (defect-free) images.

    Used to choose a segmentation threshold without test labels: feed the anomaly maps of held-out
    normal images, then ``threshold()`` returns the inverse empirical CDF at ``quantile`` (the
    ``ceil(quantile * n)``-th smallest score, ``numpy.quantile(..., method="inverted_cdf")``) to
    within one bin width (linear interpolation inside the bin). About a fraction ``1 - quantile``
    of normal pixels then score ``>= threshold``.

    Args:
        quantile: Default quantile in (0, 1].
        score_range: ``(lo, hi)``; ``None`` = first batch's min/max. Doubles like
            :class:`SegmentationMetrics` when scores fall outside.
        num_bins: Histogram bins.
    """

    def __init__(self, quantile: float = 0.999,
                 score_range: Optional[Tuple[float, float]] = (0.0, 1.0),
                 num_bins: int = 2**17) -> None:
        if not 0.0 < quantile <= 1.0:
            raise MetricsInputError(f"quantile must be in (0, 1], got {quantile}")
        if score_range is not None and not float(score_range[0]) < float(score_range[1]):
            raise MetricsInputError(f"score_range must be (lo, hi) with lo < hi, got {score_range}")
        if int(num_bins) != num_bins or num_bins < 2:
            raise MetricsInputError(f"num_bins must be an integer >= 2, got {num_bins}")
        self.quantile = float(quantile)
        self._grid = _ScoreGrid(score_range, int(num_bins))
        self._hist = np.zeros(int(num_bins), dtype=np.int64)

    @property
    def n_pixels(self) -> int:
        """Normal pixels seen so far."""
        return int(self._hist.sum())

    def update(self, normal_maps: ArrayLike) -> None:
        """Adds anomaly maps (N, H, W) / (H, W) of normal images; NaN or inf raises."""
        maps, smallest, largest = _check_maps_and_range(normal_maps)
        if not self._grid.ready:
            self._grid.initialise(smallest, largest if largest > smallest else smallest + 1.0)
        for direction in self._grid.plan(smallest, largest):
            self._grid.double(direction)
            self._hist = _merge_bin_pairs(self._hist, direction)
        self._hist += _count(self._grid.bin_index(maps), self._grid.num_bins)

    def threshold(self, quantile: Optional[float] = None) -> float:
        """The ``quantile`` (default: the constructor's) of the normal pixel scores."""
        quantile = self.quantile if quantile is None else float(quantile)
        if not 0.0 < quantile <= 1.0:
            raise MetricsInputError(f"quantile must be in (0, 1], got {quantile}")
        total = self.n_pixels
        if total == 0:
            raise MetricsInputError("no normal maps seen: call update() before threshold()")
        cumulative = np.cumsum(self._hist)
        target = quantile * total
        bin_index = min(int(np.searchsorted(cumulative, target, side="left")),
                        self._grid.num_bins - 1)
        before = float(cumulative[bin_index - 1]) if bin_index else 0.0
        in_bin = float(cumulative[bin_index]) - before
        fraction = (target - before) / in_bin if in_bin > 0 else 1.0
        width = (self._grid.hi - self._grid.lo) / self._grid.num_bins
        return float(self._grid.lo + (bin_index + fraction) * width)


def label_free_threshold(normal_maps: Iterable[ArrayLike], quantile: float = 0.999,
                         score_range: Optional[Tuple[float, float]] = (0.0, 1.0),
                         num_bins: int = 2**17) -> float:
    """Threshold chosen from held-out normal images only (no test labels).

    Args:
        normal_maps: Iterable of anomaly-map batches of normal images.
        quantile: Fraction of normal pixels that should score below the threshold.
        score_range: See :class:`NormalScoreQuantile`.
        num_bins: See :class:`NormalScoreQuantile`.

    Returns:
        The threshold; pixels with ``score >= threshold`` are predicted defective.
    """
    estimator = NormalScoreQuantile(quantile, score_range, num_bins)
    for batch in normal_maps:
        estimator.update(batch)
    return estimator.threshold()
