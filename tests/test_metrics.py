"""Tests of anoseg.metrics against simple, independent reference implementations."""

from __future__ import annotations

import subprocess
import sys
from collections import deque
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anoseg.errors import AnoSegError, MetricsInputError
from anoseg.metrics import (
    NormalScoreQuantile,
    SegmentationMetrics,
    connected_components,
    label_free_threshold,
    signal_image_scores,
)

# ----------------------------------------------------------------------------------------------
# Reference implementations (deliberately naive and independent of the module)


def bfs_regions(mask: np.ndarray) -> List[np.ndarray]:
    """8-connected regions of one 2-D mask by breadth-first search; flat pixel indices each."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    regions = []
    for start_row in range(height):
        for start_col in range(width):
            if not mask[start_row, start_col] or seen[start_row, start_col]:
                continue
            queue = deque([(start_row, start_col)])
            seen[start_row, start_col] = True
            pixels = []
            while queue:
                row, col = queue.popleft()
                pixels.append(row * width + col)
                for d_row in (-1, 0, 1):
                    for d_col in (-1, 0, 1):
                        r, c = row + d_row, col + d_col
                        if 0 <= r < height and 0 <= c < width and mask[r, c] and not seen[r, c]:
                            seen[r, c] = True
                            queue.append((r, c))
            regions.append(np.array(sorted(pixels)))
    return regions


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """AUPRO by sweeping every distinct score as a threshold (score >= t predicted defective)."""
    thresholds = np.unique(maps)[::-1]
    normal_scores = np.sort(maps[~masks])
    fpr = (normal_scores.size - np.searchsorted(normal_scores, thresholds, side="left")) \
        / normal_scores.size
    overlaps = []
    for image_map, image_mask in zip(maps, masks):
        for region in bfs_regions(image_mask):
            region_scores = np.sort(image_map.reshape(-1)[region])
            covered = region_scores.size - np.searchsorted(region_scores, thresholds, side="left")
            overlaps.append(covered / region_scores.size)
    pro = np.mean(overlaps, axis=0)
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    area = 0.0
    for i in range(1, len(fpr)):
        if fpr[i] <= fpr_limit:
            area += (fpr[i] - fpr[i - 1]) * (pro[i] + pro[i - 1]) / 2
        else:
            if fpr[i - 1] < fpr_limit:
                pro_at_limit = pro[i - 1] + (pro[i] - pro[i - 1]) * (
                    (fpr_limit - fpr[i - 1]) / (fpr[i] - fpr[i - 1]))
                area += (fpr_limit - fpr[i - 1]) * (pro_at_limit + pro[i - 1]) / 2
            break
    return area / fpr_limit


def brute_force_curves(maps: np.ndarray, masks: np.ndarray, thresholds: np.ndarray
                       ) -> Dict[str, np.ndarray]:
    """Pooled IoU, mean per-image IoU and pixel F1 at each threshold, pixel by pixel."""
    iou_pooled, iou_mean, f1 = [], [], []
    defective = [i for i in range(len(masks)) if masks[i].any()]
    for threshold in thresholds:
        predicted = maps >= threshold
        tp = np.sum(predicted & masks)
        fp = np.sum(predicted & ~masks)
        fn = np.sum(~predicted & masks)
        iou_pooled.append(tp / np.sum(predicted | masks))
        f1.append(2 * tp / (2 * tp + fp + fn))
        iou_mean.append(np.mean([np.sum(predicted[i] & masks[i]) / np.sum(predicted[i] | masks[i])
                                 for i in defective]))
    return {"iou_pooled": np.array(iou_pooled), "iou_mean_per_image": np.array(iou_mean),
            "f1": np.array(f1)}


def make_dataset(seed: int, n_images: int = 8, size: int = 40, defective_fraction: float = 0.6,
                 dtype: type = np.float64) -> Tuple[np.ndarray, np.ndarray]:
    """Maps in [0, 1] with rectangular and diagonal defects that the maps partly find."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_images, size, size), dtype=bool)
    for i in range(n_images):
        if rng.random() > defective_fraction and i > 0:
            continue
        for _ in range(rng.integers(1, 4)):
            row, col = rng.integers(0, size - 8, size=2)
            masks[i, row:row + rng.integers(1, 8), col:col + rng.integers(1, 8)] = True
        diagonal = rng.integers(0, size - 6)
        masks[i, np.arange(diagonal, diagonal + 5), np.arange(diagonal, diagonal + 5)] = True
    maps = 0.6 * rng.random((n_images, size, size)) + 0.35 * masks * rng.random(
        (n_images, size, size))
    return maps.astype(dtype), masks


def scalar_keys() -> List[str]:
    return ["pixel_auroc", "image_auroc", "aupro", "iou_pooled_best", "iou_pooled_best_threshold",
            "iou_mean_per_image_best", "iou_mean_per_image_best_threshold", "pixel_f1_max",
            "pixel_f1_max_threshold", "n_images", "n_defective", "n_pixels", "n_defect_pixels",
            "n_regions"]


def assert_results_equal(a: Dict, b: Dict, rtol: float = 1e-12) -> None:
    for key in scalar_keys():
        if a[key] is None or b[key] is None:
            assert a[key] is None and b[key] is None, key
        else:
            assert a[key] == pytest.approx(b[key], rel=rtol, abs=1e-15), key
    for key in ("thresholds", "iou_pooled", "iou_mean_per_image"):
        np.testing.assert_allclose(a["iou_curve"][key], b["iou_curve"][key], rtol=rtol, atol=1e-15)


# ----------------------------------------------------------------------------------------------
# Agreement with references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_and_image_auroc_match_sklearn(seed: int) -> None:
    maps, masks = make_dataset(seed, n_images=10, dtype=np.float32)
    metrics = SegmentationMetrics(num_thresholds=1000)
    metrics.update(torch.from_numpy(maps[:4]), torch.from_numpy(masks[:4]))  # torch input
    metrics.update(maps[4:], masks[4:].astype(np.uint8))  # numpy input
    result = metrics.compute()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()),
                                                  abs=1e-3)
    labels = masks.any(axis=(1, 2))
    assert result["image_auroc"] == pytest.approx(
        roc_auc_score(labels, maps.max(axis=(1, 2))), abs=1e-12)
    assert result["warnings"] == []


def test_large_random_pixel_auroc_within_1e3_of_sklearn() -> None:
    rng = np.random.default_rng(5)
    masks = rng.random((16, 128, 128)) < 0.1
    maps = np.clip(rng.normal(0.45, 0.12, masks.shape) + 0.08 * masks, 0, 1).astype(np.float32)
    metrics = SegmentationMetrics()
    for start in range(0, 16, 5):
        metrics.update(maps[start:start + 5], masks[start:start + 5])
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.compute()["pixel_auroc"] == pytest.approx(expected, abs=1e-4)


def test_image_score_fn_and_explicit_image_scores() -> None:
    maps, masks = make_dataset(3, n_images=10)
    labels = masks.any(axis=(1, 2))
    mean_scores = maps.mean(axis=(1, 2))
    with_fn = SegmentationMetrics(image_score_fn=lambda m: m.mean(axis=(1, 2)))
    with_fn.update(maps, masks)
    explicit = SegmentationMetrics()
    explicit.update(maps, masks, image_scores=torch.from_numpy(mean_scores))
    expected = roc_auc_score(labels, mean_scores)
    assert with_fn.compute()["image_auroc"] == pytest.approx(expected, abs=1e-12)
    assert explicit.compute()["image_auroc"] == pytest.approx(expected, abs=1e-12)


def test_signal_image_scores_take_each_signals_peak() -> None:
    first = np.zeros((3, 4, 5))
    first[0, 1, 2], first[1, 3, 4], first[2] = 3.0, 1.0, -1.0  # peaks 3, 1 and -1
    second = torch.full((2, 2, 2), -2.0)  # another size, two signals, a tensor
    second[1, 0, 1] = 4.0
    got = signal_image_scores([first, second])
    assert got["signals_max"].tolist() == [3.0, 4.0]
    assert got["signals_mean"] == pytest.approx([1.0, 1.0])
    with pytest.raises(MetricsInputError, match="image 0"):
        signal_image_scores([np.zeros((4, 5))])


@pytest.mark.parametrize("seed, fpr_limit", [(0, 0.3), (1, 0.3), (2, 0.05), (3, 1.0)])
def test_aupro_matches_threshold_sweep_reference(seed: int, fpr_limit: float) -> None:
    maps, masks = make_dataset(seed, n_images=6)
    metrics = SegmentationMetrics(fpr_limit=fpr_limit, num_thresholds=100)
    metrics.update(maps[:3], masks[:3])
    metrics.update(maps[3:], masks[3:])
    result = metrics.compute()
    assert result["aupro"] == pytest.approx(reference_aupro(maps, masks, fpr_limit), abs=1e-3)
    assert result["n_regions"] == sum(len(bfs_regions(m)) for m in masks)


def test_aupro_counts_diagonal_touching_pixels_as_one_region() -> None:
    masks = np.zeros((1, 6, 6), dtype=bool)
    masks[0, [0, 1, 2], [0, 1, 2]] = True  # one diagonal region of 3 pixels
    masks[0, 4:, 4:] = True  # a second region of 4 pixels
    maps = np.zeros((1, 6, 6))
    maps[0, 0, 0] = maps[0, 1, 1] = maps[0, 2, 2] = 0.9  # the diagonal region is found fully
    metrics = SegmentationMetrics(num_thresholds=10)
    metrics.update(maps, masks)
    result = metrics.compute()
    assert result["n_regions"] == 2
    # At FPR 0 PRO is 1/2 (one of two regions found), and stays 1/2 until FPR = 1 where it
    # reaches 1: PRO(f) = 0.5 + 0.5 f, normalised area to 0.3 = 0.5 + 0.5 * 0.15.
    assert result["aupro"] == pytest.approx(0.575, abs=1e-12)
    assert result["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 4])
def test_iou_and_f1_curves_match_brute_force(seed: int) -> None:
    maps, masks = make_dataset(seed, n_images=7)
    metrics = SegmentationMetrics(num_thresholds=400)
    for start in range(0, 7, 3):
        metrics.update(maps[start:start + 3], masks[start:start + 3])
    result = metrics.compute()
    curve = result["iou_curve"]
    np.testing.assert_allclose(curve["thresholds"], np.arange(400) / 400, atol=1e-15)
    reference = brute_force_curves(maps, masks, curve["thresholds"])
    np.testing.assert_allclose(curve["iou_pooled"], reference["iou_pooled"], atol=1e-12)
    np.testing.assert_allclose(curve["iou_mean_per_image"], reference["iou_mean_per_image"],
                               atol=1e-12)
    best = int(np.argmax(reference["iou_pooled"]))
    assert result["iou_pooled_best"] == pytest.approx(reference["iou_pooled"][best], abs=1e-12)
    assert result["iou_pooled_best_threshold"] == pytest.approx(curve["thresholds"][best])
    best = int(np.argmax(reference["iou_mean_per_image"]))
    assert result["iou_mean_per_image_best"] == pytest.approx(
        reference["iou_mean_per_image"][best], abs=1e-12)
    assert result["iou_mean_per_image_best_threshold"] == pytest.approx(curve["thresholds"][best])
    best = int(np.argmax(reference["f1"]))
    assert result["pixel_f1_max"] == pytest.approx(reference["f1"][best], abs=1e-12)
    assert result["pixel_f1_max_threshold"] == pytest.approx(curve["thresholds"][best])
    # Pooled IoU and F1 are monotone in each other, so they peak at the same threshold.
    assert result["pixel_f1_max"] == pytest.approx(
        2 * result["iou_pooled_best"] / (1 + result["iou_pooled_best"]), abs=1e-12)


def test_counts() -> None:
    maps, masks = make_dataset(6, n_images=9)
    metrics = SegmentationMetrics(num_thresholds=10)
    metrics.update(maps, masks)
    result = metrics.compute()
    assert result["n_images"] == 9
    assert result["n_defective"] == int(masks.any(axis=(1, 2)).sum())
    assert result["n_pixels"] == masks.size
    assert result["n_defect_pixels"] == int(masks.sum())
    assert result["n_regions"] == sum(len(bfs_regions(m)) for m in masks)


# ----------------------------------------------------------------------------------------------
# Hand-made cases


def perfect_case() -> Tuple[np.ndarray, np.ndarray]:
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[1, 2:6, 3:9] = True
    masks[2, 10:12, 10:15] = True
    masks[2, 0, 0] = True
    maps = np.where(masks, 0.8, 0.1)
    return maps, masks


def test_perfect_map_scores_one() -> None:
    maps, masks = perfect_case()
    metrics = SegmentationMetrics(num_thresholds=100)
    metrics.update(maps, masks)
    result = metrics.compute()
    for key in ("pixel_auroc", "image_auroc", "aupro", "iou_pooled_best",
                "iou_mean_per_image_best", "pixel_f1_max"):
        assert result[key] == pytest.approx(1.0, abs=1e-12), key
    assert 0.1 < result["iou_pooled_best_threshold"] <= 0.8
    assert result["n_regions"] == 3


def test_inverted_map_scores_zero_auroc() -> None:
    maps, masks = perfect_case()
    metrics = SegmentationMetrics(num_thresholds=100)
    metrics.update(1.0 - maps, masks)
    result = metrics.compute()
    assert result["pixel_auroc"] == pytest.approx(0.0, abs=1e-12)
    assert result["aupro"] == pytest.approx(0.0, abs=1e-12)
    # Image score = max of the map: normal images (0.9 everywhere) beat defective ones (0.9 too)
    # only by a tie, so use the mean for a strictly inverted image ranking.
    by_mean = SegmentationMetrics(image_score_fn=lambda m: m.mean(axis=(1, 2)))
    by_mean.update(1.0 - maps, masks)
    assert by_mean.compute()["image_auroc"] == pytest.approx(0.0, abs=1e-12)


def test_all_scores_equal_gives_half() -> None:
    _, masks = perfect_case()
    metrics = SegmentationMetrics(num_thresholds=100)
    metrics.update(np.full(masks.shape, 0.37), masks)
    result = metrics.compute()
    assert result["pixel_auroc"] == 0.5
    assert result["image_auroc"] == 0.5
    # One threshold step predicts everything: PRO = 1 from FPR 0 to 1 along a straight line from
    # (0, 0) to (1, 1) -> normalised area to 0.3 = 0.15.
    assert result["aupro"] == pytest.approx(0.15, abs=1e-12)
    reference = brute_force_curves(np.full(masks.shape, 0.37), masks, np.array([0.0]))
    assert result["iou_pooled_best"] == pytest.approx(reference["iou_pooled"][0])


def test_ties_match_sklearn() -> None:
    rng = np.random.default_rng(11)
    masks = rng.random((6, 20, 20)) < 0.2
    maps = np.round(np.clip(rng.random(masks.shape) * 0.7 + 0.3 * masks, 0, 1) * 10) / 10 + 0.013
    metrics = SegmentationMetrics(num_thresholds=200)
    metrics.update(maps, masks)
    result = metrics.compute()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()),
                                                  abs=1e-9)
    assert result["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-9)
    reference = brute_force_curves(maps, masks, result["iou_curve"]["thresholds"])
    np.testing.assert_allclose(result["iou_curve"]["iou_pooled"], reference["iou_pooled"],
                               atol=1e-12)


def test_streaming_in_batches_equals_one_batch() -> None:
    maps, masks = make_dataset(8, n_images=11, dtype=np.float32)
    whole = SegmentationMetrics(num_thresholds=500)
    whole.update(maps, masks)
    streamed = SegmentationMetrics(num_thresholds=500)
    for start in (0, 1, 5, 9):
        stop = {0: 1, 1: 5, 5: 9, 9: 11}[start]
        streamed.update(maps[start:stop], masks[start:stop])
    assert_results_equal(whole.compute(), streamed.compute())


def test_big_batch_equals_small_batches() -> None:
    """One update with more images than the internal per-image chunk equals many small ones."""
    maps, masks = make_dataset(10, n_images=45, size=12)
    whole = SegmentationMetrics(num_thresholds=100)
    whole.update(maps, masks)
    streamed = SegmentationMetrics(num_thresholds=100)
    for start in range(0, 45, 4):
        streamed.update(maps[start:start + 4], masks[start:start + 4])
    assert_results_equal(whole.compute(), streamed.compute())


def direct_state(batches: List[Tuple[np.ndarray, np.ndarray]], lo: float, hi: float,
                 num_bins: int, num_thresholds: int, fixed: float) -> Dict[str, np.ndarray]:
    """The accumulator's state counted pixel by pixel: bins of the float64 positions, a BFS
    region per defect pixel, per-image curves one image at a time."""
    per_threshold = num_bins // num_thresholds
    state = {"defect": np.zeros(num_bins, np.int64), "normal": np.zeros(num_bins, np.int64),
             "region": np.zeros(num_bins), "iou": np.zeros(num_thresholds),
             "fixed_tp": 0, "fixed_fp": 0}
    for maps, masks in batches:
        bins = np.clip(np.floor((maps.astype(np.float64) - lo) * (num_bins / (hi - lo))),
                       0, num_bins - 1).astype(np.int64)
        for image_bins, mask, image_map in zip(bins, masks, maps):
            state["defect"] += np.bincount(image_bins[mask], minlength=num_bins)
            state["normal"] += np.bincount(image_bins[~mask], minlength=num_bins)
            for region in bfs_regions(mask):
                np.add.at(state["region"], image_bins.reshape(-1)[region], 1.0 / region.size)
            predicted = image_map >= fixed
            state["fixed_tp"] += int(np.sum(predicted & mask))
            state["fixed_fp"] += int(np.sum(predicted & ~mask))
            if mask.any():
                slots = image_bins // per_threshold
                true_pos = np.array([np.sum(mask & (slots >= i)) for i in range(num_thresholds)])
                false_pos = np.array([np.sum(~mask & (slots >= i))
                                      for i in range(num_thresholds)])
                state["iou"] += true_pos / (mask.sum() + false_pos)
    return state


def test_accumulated_state_equals_pixel_by_pixel_counts() -> None:
    """The batched update (one count of all bins and one of the defect bins per batch, per-image
    curves in chunks, runs for the regions) keeps exactly the counts a pixel-by-pixel pass
    gives: bitwise for the integer histograms and the fixed-threshold counts, to rounding for
    the float sums (their summation order differs). Batches with more images than the
    per-image chunk, with and without defect-free images, and a range that doubles."""
    from anoseg.metrics import PER_IMAGE_CHUNK

    rng = np.random.default_rng(42)
    batches = []
    for n_images in (PER_IMAGE_CHUNK + 7, 3, 1, 5):
        maps = rng.random((n_images, 9, 13)).astype(np.float32)
        masks = rng.random((n_images, 9, 13)) < rng.choice([0.1, 0.4, 0.7])
        masks[rng.random(n_images) < 0.3] = False
        maps = maps + 0.5 * masks * rng.random(masks.shape).astype(np.float32)  # up to 1.5
        batches.append((maps, masks))
    metrics = SegmentationMetrics(num_thresholds=40, num_bins=160, fixed_thresholds=[0.61])
    for maps, masks in batches:
        metrics.update(maps, masks)
    assert metrics._grid.doublings == 1  # (0, 1) became (0, 2)
    state = direct_state(batches, 0.0, 2.0, 160, 40, 0.61)
    assert np.array_equal(metrics._defect_hist, state["defect"])
    assert np.array_equal(metrics._normal_hist, state["normal"])
    assert metrics._fixed_tp[0] == state["fixed_tp"] and metrics._fixed_fp[0] == state["fixed_fp"]
    np.testing.assert_allclose(metrics._region_weight_hist, state["region"], rtol=1e-13, atol=0)
    np.testing.assert_allclose(metrics._iou_sum_per_image, state["iou"], rtol=1e-13, atol=0)
    assert metrics._n_regions == sum(len(bfs_regions(m)) for _, ms in batches for m in ms)


# ----------------------------------------------------------------------------------------------
# Edge cases


def test_no_defective_images_gives_none_and_warnings() -> None:
    maps = np.random.default_rng(0).random((5, 8, 8))
    metrics = SegmentationMetrics(num_thresholds=50)
    metrics.update(maps, np.zeros((5, 8, 8), dtype=np.uint8))
    result = metrics.compute(threshold=0.5)
    for key in ("image_auroc", "pixel_auroc", "aupro", "iou_pooled_best",
                "iou_mean_per_image_best", "pixel_f1_max", "pixel_f1_max_threshold"):
        assert result[key] is None, key
    text = " ".join(result["warnings"])
    assert "image_auroc is undefined" in text and "no defective images" in text
    assert "pixel_auroc and aupro are undefined" in text
    assert result["n_defective"] == 0 and result["n_defect_pixels"] == 0
    assert result["n_regions"] == 0
    assert np.isnan(result["iou_curve"]["iou_pooled"]).all()
    assert np.isnan(result["iou_curve"]["iou_mean_per_image"]).all()
    at = result["at_threshold"]
    assert at["iou_pooled"] is None and at["recall"] is None and at["f1"] is None
    assert at["fpr"] == pytest.approx(np.mean(maps >= 0.5))
    assert at["iou_mean_per_image"] is None


def test_only_defective_images_gives_none_image_auroc() -> None:
    maps, masks = perfect_case()
    metrics = SegmentationMetrics(num_thresholds=50)
    metrics.update(maps[1:3], masks[1:3])
    result = metrics.compute()
    assert result["image_auroc"] is None
    assert any("no normal images" in w for w in result["warnings"])
    assert result["pixel_auroc"] == pytest.approx(1.0)


def test_all_masks_zero_but_labelled_defective() -> None:
    rng = np.random.default_rng(2)
    maps = rng.random((4, 8, 8))
    maps[2:] += 0.5
    metrics = SegmentationMetrics(score_range=(0, 2), num_thresholds=50)
    metrics.update(maps, np.zeros((4, 8, 8)), labels=[0, 0, 1, 1])
    result = metrics.compute()
    assert result["image_auroc"] == pytest.approx(1.0)
    assert result["n_defective"] == 2
    assert result["pixel_auroc"] is None and result["iou_mean_per_image_best"] is None
    assert any("empty mask" in w for w in result["warnings"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_maps_raise_and_leave_state_unchanged(bad: float) -> None:
    maps, masks = make_dataset(1, n_images=4)
    metrics = SegmentationMetrics(num_thresholds=50)
    metrics.update(maps[:2], masks[:2])
    before = metrics.compute()
    broken = maps[2:].copy()
    broken[0, 3, 3] = bad
    with pytest.raises(MetricsInputError, match="NaN"):
        metrics.update(broken, masks[2:])
    with pytest.raises(MetricsInputError, match="finite"):
        metrics.update(torch.from_numpy(broken), masks[2:])
    assert_results_equal(before, metrics.compute())


def test_nan_error_is_an_anoseg_value_error() -> None:
    with pytest.raises(AnoSegError):
        SegmentationMetrics().update(np.full((2, 2), np.nan), np.zeros((2, 2)))
    with pytest.raises(ValueError):
        SegmentationMetrics().update(np.full((2, 2), np.nan), np.zeros((2, 2)))


def test_size_mismatch_raises_unless_resize_masks() -> None:
    maps, masks = make_dataset(2, n_images=4, size=32)
    big_masks = masks.repeat(2, axis=1).repeat(2, axis=2)  # 64x64, each pixel doubled
    with pytest.raises(MetricsInputError, match="resize_masks=True"):
        SegmentationMetrics().update(maps, big_masks)
    with pytest.raises(MetricsInputError, match="numbers of images"):
        SegmentationMetrics().update(maps, masks[:3])
    resized = SegmentationMetrics(num_thresholds=100, resize_masks=True)
    resized.update(maps, big_masks)
    direct = SegmentationMetrics(num_thresholds=100)
    direct.update(maps, masks)
    assert_results_equal(resized.compute(), direct.compute())
    # Downsampling masks to smaller maps works too and keeps the image labels of the originals.
    small = SegmentationMetrics(num_thresholds=100, resize_masks=True)
    small.update(maps[:, ::2, ::2], masks)
    assert small.compute()["n_defective"] == int(masks.any(axis=(1, 2)).sum())


def test_mask_value_conventions() -> None:
    maps, masks = make_dataset(4, n_images=5)
    reference = SegmentationMetrics(num_thresholds=100)
    reference.update(maps, masks)
    for encoded in (masks.astype(np.uint8) * 255, masks.astype(np.float32),
                    torch.from_numpy(masks)):
        other = SegmentationMetrics(num_thresholds=100)
        other.update(maps, encoded)
        assert_results_equal(reference.compute(), other.compute())
    for bad, message in ((masks * 2, "found 2"), (masks * 0.5, "found 0.5"),
                         (np.where(masks, 255, 1), "both 1 and 255")):
        with pytest.raises(MetricsInputError, match=message):
            SegmentationMetrics().update(maps, bad)


def test_label_checks() -> None:
    maps, masks = perfect_case()
    with pytest.raises(MetricsInputError, match="label 0"):
        SegmentationMetrics().update(maps, masks, labels=[0, 0, 0, 0])
    with pytest.raises(MetricsInputError, match="one value per image"):
        SegmentationMetrics().update(maps, masks, labels=[0, 1])
    with pytest.raises(MetricsInputError, match="0 or 1"):
        SegmentationMetrics().update(maps, masks, labels=[0, 2, 1, 0])
    with pytest.raises(MetricsInputError, match="image_scores"):
        SegmentationMetrics().update(maps, masks, image_scores=[0.1, np.nan, 0.2, 0.3])


def test_bad_shapes_and_no_data() -> None:
    with pytest.raises(MetricsInputError, match="shape"):
        SegmentationMetrics().update(np.zeros((2, 3, 4, 4)), np.zeros((2, 3, 4, 4)))
    with pytest.raises(MetricsInputError, match="no data"):
        SegmentationMetrics().compute()
    with pytest.raises(MetricsInputError, match="image_score_fn failed"):
        SegmentationMetrics(image_score_fn=lambda m: 1 / 0).update(np.zeros((2, 2)),
                                                                    np.zeros((2, 2)))


def test_accepted_shapes_and_dtypes_agree() -> None:
    maps, masks = make_dataset(9, n_images=3, dtype=np.float32)
    reference = SegmentationMetrics(num_thresholds=100)
    reference.update(maps, masks)
    one_by_one = SegmentationMetrics(num_thresholds=100)
    for image_map, image_mask in zip(maps, masks):
        one_by_one.update(image_map, image_mask)  # (H, W)
    channel = SegmentationMetrics(num_thresholds=100)
    channel.update(torch.from_numpy(maps)[:, None], torch.from_numpy(masks)[:, None])
    for other in (one_by_one, channel):
        assert_results_equal(reference.compute(), other.compute())
    half = SegmentationMetrics(num_thresholds=100)
    half.update(torch.from_numpy(maps).half(), masks)
    assert half.compute()["pixel_auroc"] == pytest.approx(reference.compute()["pixel_auroc"],
                                                          abs=1e-3)


def test_constructor_validation() -> None:
    with pytest.raises(MetricsInputError, match="multiple"):
        SegmentationMetrics(num_thresholds=100, num_bins=250)
    with pytest.raises(MetricsInputError, match="fpr_limit"):
        SegmentationMetrics(fpr_limit=0.0)
    with pytest.raises(MetricsInputError, match="score_range"):
        SegmentationMetrics(score_range=(1.0, 1.0))
    with pytest.raises(MetricsInputError, match="num_thresholds"):
        SegmentationMetrics(num_thresholds=1)
    assert SegmentationMetrics().num_bins == 140_000  # multiple of 10,000 and >= 2**17


# ----------------------------------------------------------------------------------------------
# Scores outside the score range


@pytest.mark.parametrize("direction", ["up", "down"])
def test_range_doubling_keeps_bins_aligned(direction: str) -> None:
    """Doubling mid-stream gives the same state as starting with the final range."""
    maps, masks = make_dataset(12, n_images=8, dtype=np.float32)
    shifted = maps.copy()
    if direction == "up":
        shifted[4:] *= 1.7
        final_range = (0.0, 2.0)
    else:
        shifted[4:] -= 0.6
        final_range = (-1.0, 1.0)
    for num_thresholds, num_bins in ((500, None), (7, 21)):  # even and odd grids
        doubled = SegmentationMetrics(num_thresholds=num_thresholds, num_bins=num_bins)
        doubled.update(shifted[:4], masks[:4])
        doubled.update(shifted[4:], masks[4:])
        direct = SegmentationMetrics(score_range=final_range, num_thresholds=num_thresholds,
                                     num_bins=num_bins)
        direct.update(shifted, masks)
        result = doubled.compute()
        assert result["score_range"] == final_range
        assert_results_equal(result, direct.compute())
        assert any("doubled 1 time" in w for w in result["warnings"])
    expected = roc_auc_score(masks.ravel(), shifted.ravel())
    big = SegmentationMetrics()
    big.update(shifted[:4], masks[:4])
    big.update(shifted[4:], masks[4:])
    assert big.compute()["pixel_auroc"] == pytest.approx(expected, abs=1e-3)
    reference = brute_force_curves(shifted, masks, big.thresholds())
    np.testing.assert_allclose(big.compute()["iou_curve"]["iou_mean_per_image"],
                               reference["iou_mean_per_image"], atol=1e-12)


def test_scores_far_outside_range_and_auto_range() -> None:
    rng = np.random.default_rng(3)
    masks = rng.random((6, 16, 16)) < 0.2
    maps = rng.normal(0, 20, masks.shape) + 15 * masks  # roughly [-60, 75]
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    default = SegmentationMetrics(num_thresholds=100)
    default.update(maps, masks)
    result = default.compute()
    assert result["score_range"][0] <= maps.min() and result["score_range"][1] >= maps.max()
    assert result["pixel_auroc"] == pytest.approx(expected, abs=1e-3)
    assert result["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-3)
    auto = SegmentationMetrics(score_range=None, num_thresholds=100)
    auto.update(maps[:3], masks[:3])
    auto.update(maps[3:], masks[3:])
    assert auto.compute()["pixel_auroc"] == pytest.approx(expected, abs=1e-3)
    explicit = SegmentationMetrics(score_range=(-100, 100), num_thresholds=100)
    explicit.update(maps, masks)
    assert not any("doubled" in w for w in explicit.compute()["warnings"])
    assert explicit.compute()["pixel_auroc"] == pytest.approx(expected, abs=1e-3)
    with pytest.raises(MetricsInputError, match="score_range"):
        SegmentationMetrics().update(np.array([[0.0, 1e30]]), np.array([[0, 1]]))


# ----------------------------------------------------------------------------------------------
# Thresholds chosen without labels


def test_label_free_threshold_matches_numpy_quantile() -> None:
    rng = np.random.default_rng(4)
    normal_maps = rng.beta(2, 5, size=(10, 32, 32))
    batches = [normal_maps[i:i + 3] for i in range(0, 10, 3)]
    bin_width = 1.0 / 2**17
    for quantile in (0.5, 0.99, 0.999, 1.0):
        # The inverse empirical CDF: the ceil(q N)-th smallest score, to within one bin.
        expected = np.quantile(normal_maps, quantile, method="inverted_cdf")
        threshold = label_free_threshold(batches, quantile)
        assert threshold == pytest.approx(expected, abs=bin_width)
        assert np.mean(normal_maps >= threshold) <= 1 - quantile + 2 / normal_maps.size
    estimator = NormalScoreQuantile(quantile=0.9, score_range=None)
    for batch in batches:
        estimator.update(torch.from_numpy(batch))
    assert estimator.n_pixels == normal_maps.size
    width = (normal_maps.max() - normal_maps.min()) / 2**17
    assert estimator.threshold() == pytest.approx(
        np.quantile(normal_maps, 0.9, method="inverted_cdf"), abs=width)
    wide = NormalScoreQuantile(quantile=0.9)
    wide.update(normal_maps * 3 - 1)  # outside [0, 1]: range doubles
    assert wide.threshold() == pytest.approx(
        np.quantile(normal_maps * 3 - 1, 0.9, method="inverted_cdf"), abs=4 / 2**17)
    with pytest.raises(MetricsInputError, match="NaN"):
        estimator.update(np.full((2, 2), np.nan))
    with pytest.raises(MetricsInputError, match="no normal maps"):
        NormalScoreQuantile().threshold()


def test_at_threshold_exact_and_on_grid() -> None:
    maps, masks = make_dataset(7, n_images=8)
    chosen = label_free_threshold([maps[~masks.any(axis=(1, 2))]], quantile=0.95)
    metrics = SegmentationMetrics(num_thresholds=1000, fixed_thresholds=[chosen])
    metrics.update(maps[:5], masks[:5])
    metrics.update(maps[5:], masks[5:])
    result = metrics.compute(threshold=chosen)

    def brute(threshold: float) -> Dict[str, Optional[float]]:
        predicted = maps >= threshold
        tp, fp = np.sum(predicted & masks), np.sum(predicted & ~masks)
        curves = brute_force_curves(maps, masks, np.array([threshold]))
        return {"iou_pooled": curves["iou_pooled"][0], "f1": curves["f1"][0],
                "iou_mean_per_image": curves["iou_mean_per_image"][0],
                "precision": tp / (tp + fp), "recall": tp / masks.sum(),
                "fpr": fp / (~masks).sum()}

    at = result["at_threshold"]
    assert at["exact"] and at["threshold_used"] == chosen
    for key, value in brute(chosen).items():
        assert at[key] == pytest.approx(value, abs=1e-12), key
    off_grid = metrics.at_threshold(0.61234)
    assert not off_grid["exact"] and off_grid["threshold_used"] == pytest.approx(0.612)
    for key, value in brute(0.612).items():
        assert off_grid[key] == pytest.approx(value, abs=1e-12), key
    on_grid = metrics.at_threshold(0.5)
    assert on_grid["exact"] and on_grid["iou_pooled"] == pytest.approx(brute(0.5)["iou_pooled"])
    above = metrics.at_threshold(5.0)
    assert above["exact"] and above["recall"] == 0.0 and above["precision"] is None
    below = metrics.at_threshold(-1.0)
    assert below["recall"] == 1.0 and below["fpr"] == 1.0


# ----------------------------------------------------------------------------------------------
# Connected components


def assert_same_partition(labels: np.ndarray, masks: np.ndarray) -> None:
    pairs = set()
    n_reference = 0
    for image_labels, image_mask in zip(labels, masks):
        regions = bfs_regions(image_mask)
        n_reference += len(regions)
        for number, region in enumerate(regions):
            ids = np.unique(image_labels.reshape(-1)[region])
            assert ids.size == 1 and ids[0] > 0
            pairs.add((int(ids[0]), (number, id(image_mask))))
    assert len({ours for ours, _ in pairs}) == len(pairs) == n_reference
    assert np.all((labels > 0) == masks)


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6, 0.9])
def test_connected_components_match_bfs(density: float) -> None:
    rng = np.random.default_rng(int(density * 100))
    masks = rng.random((3, 23, 31)) < density
    labels, count = connected_components(masks)
    assert count == sum(len(bfs_regions(m)) for m in masks)
    assert_same_partition(labels, masks)


def spiral_mask(size: int) -> np.ndarray:
    """A one-pixel-wide square spiral (one component with a very long path)."""
    mask = np.zeros((size, size), dtype=bool)
    row, col, step = 0, 0, 0
    directions = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    length = size - 1
    mask[0, 0] = True
    while length > 0:
        for _ in range(2 if step else 1):
            d_row, d_col = directions[step % 4]
            for _ in range(length):
                row, col = row + d_row, col + d_col
                mask[row, col] = True
            step += 1
        length -= 2
    return mask


def test_connected_components_spiral_and_noise() -> None:
    spiral = spiral_mask(128)
    labels, count = connected_components(spiral)
    assert count == len(bfs_regions(spiral)) == 1
    rng = np.random.default_rng(0)
    noise = rng.random((16, 256, 256)) < 0.5
    _, count = connected_components(noise[:2])
    assert count == sum(len(bfs_regions(m)) for m in noise[:2])
    assert count > 100
    big_spiral = np.stack([spiral_mask(256)] * 4)
    _, count = connected_components(big_spiral)
    assert count == 4
    empty_labels, empty_count = connected_components(np.zeros((2, 5, 5)))
    assert empty_count == 0 and not empty_labels.any()


# ----------------------------------------------------------------------------------------------
# Packaging


def test_metrics_imports_no_model_training_or_data_code() -> None:
    code = (
        "import sys\n"
        "import anoseg.metrics\n"
        "new = {m for m in sys.modules if m.startswith('anoseg')}\n"
        "print(sorted(new))\n"
        "assert new <= {'anoseg', 'anoseg._version', 'anoseg.metrics', 'anoseg.errors'}, new\n"
        "assert 'scipy' not in sys.modules\n"
    )
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr


def test_image_auroc_of_per_image_scores_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    from anoseg.metrics import image_auroc

    rng = np.random.default_rng(3)
    labels = rng.random(200) < 0.4
    scores = np.round(rng.random(200) + labels * 0.3, 2)  # rounded: many ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert image_auroc([1, 1], [0.1, 0.2]) is None
    with pytest.raises(MetricsInputError, match="3 labels but 2 scores"):
        image_auroc([0, 1, 1], [0.1, 0.2])
