"""Evaluating trained runs on a test set, and predicting maps for new images.

Evaluation streams the test images of a category through the model batch by batch into
:class:`~anoseg.metrics.SegmentationMetrics` (memory does not grow with the test set), after
choosing a *label-free* threshold on the run's held-out normal training images. Prediction writes
maps, overlays, masks and image scores for any images.

Example:
    >>> report = evaluate_run("runs/bottle")                      # doctest: +SKIP
    >>> report.results["bottle"]["pixel_auroc"]                   # doctest: +SKIP
    >>> predict_run("runs/bottle", ["photos/"], "predictions")    # doctest: +SKIP

The command-line tools ``anoseg-eval`` and ``anoseg-predict`` are thin wrappers around
:func:`evaluate_run` and :func:`predict_run`. See ``docs/evaluation.md`` for the files written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anoseg.checkpoint import LAST_CHECKPOINT, atomic_write_text, resolve_checkpoint, write_json
from anoseg.errors import ConfigError, DataError
from anoseg.inference import LoadedModel, load_model, predict_anomaly_maps
from anoseg.metrics import NormalScoreQuantile, SegmentationMetrics, image_auroc
from anoseg.visualize import (PLOT_SKIPPED_MESSAGE, enlarged_overlay, save_iou_curve_plot,
                              save_map_png, save_mask_png, save_png, triptych)

PathLike = Union[str, Path]

DEFAULT_MAX_PICTURES = 8
"""Pictures written by :func:`evaluate_category` when ``pictures_dir`` is given."""

METRIC_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("pixel_auroc", "Pixel AUROC"),
    ("image_auroc", "Image AUROC"),
    ("iou_pooled_best", "IoU"),
    ("iou_mean_per_image_best", "IoU per image"),
    ("aupro", "AUPRO"),
    ("pixel_f1_max", "F1-max"),
    ("label_free_iou", "IoU @ label-free"),
    ("label_free_f1", "F1 @ label-free"),
)
"""(key, Markdown header) of the metrics in the table, in the table's order."""

MEAN_KEYS: Tuple[str, ...] = tuple(key for key, _ in METRIC_COLUMNS) + (
    "label_free_iou_mean_per_image", "label_free_precision", "label_free_recall",
    "label_free_fpr")
"""Metrics averaged over categories in the mean row (thresholds and counts are not)."""

CSV_KEYS: Tuple[str, ...] = MEAN_KEYS + (
    "iou_pooled_best_threshold", "iou_mean_per_image_best_threshold", "pixel_f1_max_threshold",
    "label_free_threshold", "threshold_quantile", "n_holdout_images", "n_images",
    "n_defective", "n_good", "n_pixels", "n_defect_pixels", "n_regions")
"""Columns of ``metrics.csv`` after ``category`` (fractions, not percentages)."""

DETECTOR_KEY = "image_auroc_detector"
DETECTOR_COLUMN = (DETECTOR_KEY, "Image AUROC (detector)")
"""Image AUROC of the downstream detector's score (paper eq. 5); in the tables only when a run
has a detector (``RUN_DIR/detector/last.pt``)."""

MAPS_README = ("Anomaly maps as 16-bit grayscale PNG at the model's resolution: "
               "score = pixel value / 65535 (1 = anomalous).\n"
               "Python: numpy.asarray(PIL.Image.open(path), dtype=float) / 65535, "
               "or anoseg.visualize.read_map_png(path).\n")


# ------------------------------------------------------------------------------ run folders


def run_folder_of(checkpoint_path: PathLike) -> Optional[Path]:
    """The run folder of ``<run>/checkpoints/<file>.pt``, or ``None`` for a loose file."""
    path = Path(checkpoint_path)
    if path.parent.name == LAST_CHECKPOINT.parent.name:
        return path.parent.parent
    return None


def _read_split_json(run_dir: Optional[Path]) -> Dict[str, Any]:
    if run_dir is None or not (run_dir / "split.json").is_file():
        return {}
    try:
        return json.loads((run_dir / "split.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read {run_dir / 'split.json'}: {exc}") from None


def recorded_split(model: LoadedModel, run_dir: Optional[Path] = None) -> Dict[str, Any]:
    """The run's data root and held-out images: from the checkpoint, else ``split.json``.

    Returns:
        ``{"data_root": str or None, "holdout": [str, ...]}``.
    """
    split = model.checkpoint.get("split")
    data_root = model.checkpoint.get("data_root")
    if not isinstance(split, dict):
        split = _read_split_json(run_dir)
        data_root = data_root or split.get("data_root")
    return {"data_root": data_root, "holdout": list(split.get("holdout") or [])}


def resolve_eval_data_root(model: LoadedModel, data_root: Optional[PathLike] = None,
                           run_dir: Optional[Path] = None) -> Path:
    """The dataset to evaluate on.

    ``data_root`` if given; else the root the run was trained on; else (a demo run whose cache
    was deleted) the regenerated demo dataset.

    Raises:
        DataError: ``data_root`` or the recorded root does not exist.
    """
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a folder; expected a "
                            "folder in MVTec AD layout (<root>/<category>/test/...)")
        return root
    recorded = recorded_split(model, run_dir)["data_root"] or model.config.data.root
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    if model.config.data.root is None:  # trained on the built-in demo dataset
        from anoseg.data.demo import ensure_demo_dataset

        return ensure_demo_dataset()
    raise DataError(f"the run's data root {recorded} does not exist any more; pass "
                    "--data-root with the dataset's current location")


def holdout_image_paths(model: LoadedModel, data_root: Optional[PathLike] = None,
                        run_dir: Optional[Path] = None) -> List[Path]:
    """The run's held-out normal images (never trained on), moved under ``data_root`` if the
    dataset was moved since training.

    Raises:
        DataError: A held-out image exists neither under ``data_root`` nor where it was.
    """
    split = recorded_split(model, run_dir)
    recorded_root = Path(split["data_root"]) if split["data_root"] else None
    paths: List[Path] = []
    for text in split["holdout"]:
        original = Path(text)
        candidates = []
        if data_root is not None and recorded_root is not None:
            try:
                candidates.append(Path(data_root) / original.relative_to(recorded_root))
            except ValueError:
                pass
        candidates.append(original)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"held-out normal image {original} (from the run's split) does not "
                            "exist; pass --data-root with the dataset the run was trained on")
        paths.append(found)
    return paths


def run_detector(checkpoint_path: PathLike, model: LoadedModel,
                 device: Union[None, str, torch.device] = None
                 ) -> Tuple[Optional[Any], Optional[str]]:
    """The detector of the run holding ``checkpoint_path``, if it has one.

    Returns:
        ``(LoadedDetector or None, warning or None)``; a detector trained on another segmenter
        checkpoint step is not used, and the warning says so.
    """
    run_dir = run_folder_of(checkpoint_path)
    if run_dir is None or not (run_dir / "detector" / "last.pt").is_file():
        return None, None
    from anoseg.detector import load_detector

    detector = load_detector(run_dir, device=device)
    mismatch = detector_step_mismatch(model, detector, run_dir / "detector" / "last.pt")
    if mismatch is not None:
        return None, (f"{mismatch}: detector scores skipped (retrain it with anoseg-train "
                      "--stage detector)")
    return detector, None


def detector_step_mismatch(model: LoadedModel, detector: Any, detector_path: PathLike
                           ) -> Optional[str]:
    """Why ``detector`` does not belong to ``model`` (trained on another segmenter step), or
    ``None`` when it does."""
    step = int(model.checkpoint.get("step", -1))
    if detector.anoseg_step == step:
        return None
    return (f"detector {detector_path} was trained on the segmenter at step "
            f"{detector.anoseg_step}, the checkpoint is at step {step}")


def detector_image_auroc(model: LoadedModel, detector: Any, data_root: PathLike, *,
                         batch_size: int, progress: bool = False) -> Optional[float]:
    """Image AUROC of a detector's eq. 5 score on the model's category test set (``None``
    when the set lacks good or defective images)."""
    from anoseg.data.mvtec import MVTecTestDataset
    from anoseg.detector import detector_scores

    dataset = MVTecTestDataset(data_root, model.config.data.category,
                               model.config.data.image_size)
    scores: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False),
                      desc="detector", disable=not progress):
        scores.append(detector_scores(detector, model.generator, batch["image"],
                                      batch_size=batch_size).numpy())
        labels.append(np.asarray(batch["label"]))
    return image_auroc(np.concatenate(labels), np.concatenate(scores)) if scores else None


def _metric_columns(results: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    columns = list(METRIC_COLUMNS)
    if any(r.get(DETECTOR_KEY) is not None for r in results):
        columns.insert(2, DETECTOR_COLUMN)
    return columns


# ------------------------------------------------------------------------- label-free threshold


def _batched(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _load_images(paths: Sequence[Path], image_size: int) -> torch.Tensor:
    from anoseg.data.mvtec import load_image

    return torch.stack([load_image(p, image_size) for p in paths]).float().div_(255.0)


def compute_label_free_threshold(model: LoadedModel, normal_image_paths: Sequence[PathLike], *,
                                 quantile: Optional[float] = None, batch_size: int = 16,
                                 progress: bool = False) -> float:
    """The ``quantile`` of the anomaly scores of all pixels of ``normal_image_paths``.

    Args:
        model: The loaded model.
        normal_image_paths: Defect-free images the model never trained on (the run's holdout).
        quantile: Default ``model.config.eval.threshold_quantile``.
        batch_size: Images per forward pass.
        progress: Show a progress bar.

    Raises:
        DataError: No images, or one is unreadable.
    """
    paths = [Path(p) for p in normal_image_paths]
    if not paths:
        raise DataError("no held-out normal images to choose a label-free threshold on")
    quantile = model.config.eval.threshold_quantile if quantile is None else quantile
    estimator = NormalScoreQuantile(quantile)
    size = model.config.data.image_size
    with tqdm(total=len(paths), desc="label-free threshold", unit="img", disable=not progress,
              leave=False) as bar:
        for chunk in _batched(paths, batch_size):
            maps = predict_anomaly_maps(model.generator, _load_images(chunk, size),
                                        batch_size=batch_size)
            estimator.update(maps)
            bar.update(len(chunk))
    return estimator.threshold()


def threshold_cache_path(checkpoint_path: PathLike) -> Path:
    """Where a checkpoint's label-free threshold is cached: ``<stem>.threshold.json`` beside it."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.threshold.json")


def _cache_key(model: LoadedModel, checkpoint_path: Path, paths: Sequence[Path],
               quantile: float) -> Dict[str, Any]:
    stat = checkpoint_path.stat()
    holdout_digest = hashlib.sha256("\n".join(str(p) for p in paths).encode()).hexdigest()
    return {"checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
            "checkpoint_step": int(model.checkpoint.get("step", -1)),
            "weights": model.weights,
            "image_size": model.config.data.image_size, "quantile": quantile,
            "holdout_sha256": holdout_digest, "n_holdout_images": len(paths)}


def cached_label_free_threshold(model: LoadedModel, checkpoint_path: PathLike,
                                normal_image_paths: Sequence[PathLike], *,
                                quantile: Optional[float] = None, batch_size: int = 16,
                                progress: bool = False) -> Tuple[float, bool]:
    """:func:`compute_label_free_threshold`, cached in :func:`threshold_cache_path`.

    The cache is used only if the checkpoint file (size, modification time, step), the weights
    (EMA or raw), the image size, the quantile and the list of held-out images are unchanged;
    otherwise the threshold is recomputed and the cache rewritten (silently skipped if the
    folder is read-only).

    Returns:
        ``(threshold, came_from_cache)``.
    """
    checkpoint_path = Path(checkpoint_path)
    paths = [Path(p) for p in normal_image_paths]
    quantile = model.config.eval.threshold_quantile if quantile is None else float(quantile)
    key = _cache_key(model, checkpoint_path, paths, quantile)
    cache = threshold_cache_path(checkpoint_path)
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key and math.isfinite(cached["threshold"]):
            return float(cached["threshold"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    threshold = compute_label_free_threshold(model, paths, quantile=quantile,
                                             batch_size=batch_size, progress=progress)
    try:
        write_json(cache, {"threshold": threshold, **key})
    except OSError:
        pass
    return threshold, False


# ------------------------------------------------------------------------------- evaluation


def _choose_picture_indices(defect_types: Sequence[str], max_pictures: int) -> List[int]:
    """Up to ``max_pictures`` test indices, taken in turn from each defect type (good last)."""
    by_type: Dict[str, List[int]] = {}
    for index, defect in enumerate(defect_types):
        by_type.setdefault(defect, []).append(index)
    order = sorted(by_type, key=lambda d: (d == "good", d))
    chosen: List[int] = []
    position = 0
    while len(chosen) < max_pictures and any(position < len(by_type[d]) for d in order):
        for defect in order:
            if position < len(by_type[defect]) and len(chosen) < max_pictures:
                chosen.append(by_type[defect][position])
        position += 1
    return sorted(chosen)


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def evaluate_category(model: LoadedModel, data_root: PathLike, category: str, *,
                      batch_size: int, progress: bool = True,
                      save_maps_dir: Optional[PathLike] = None,
                      pictures_dir: Optional[PathLike] = None,
                      max_pictures: int = DEFAULT_MAX_PICTURES, num_workers: int = 0,
                      holdout_paths: Optional[Sequence[PathLike]] = None,
                      threshold_cache_for: Optional[PathLike] = None,
                      detector: Optional[Any] = None) -> Dict[str, Any]:
    """Evaluate one model on the test set of one category.

    The label-free threshold is chosen first on the held-out normal images; then the test images
    stream through the model and the metrics batch by batch (no map is kept).

    Args:
        model: The loaded model (:func:`anoseg.load_model`).
        data_root: Dataset root in MVTec AD layout.
        category: Category folder under ``data_root``.
        batch_size: Test images per forward pass.
        progress: Show a progress bar over the test images.
        save_maps_dir: If given, write every map there as ``<defect>/<stem>.png`` (16-bit).
        pictures_dir: If given, write ``max_pictures`` triptychs and overlays there.
        max_pictures: How many test images get pictures (spread over the defect types).
        num_workers: Data-loader worker processes for reading test images.
        holdout_paths: Normal images for the threshold; default: the run's holdout, from
            ``model.checkpoint["split"]`` (moved under ``data_root`` if the dataset moved).
        threshold_cache_for: A checkpoint path: reuse/write its cached threshold
            (:func:`cached_label_free_threshold`).
        detector: A :class:`anoseg.detector.LoadedDetector` trained on ``model``: adds
            ``image_auroc_detector``, the image AUROC of its scores (eq. 5).

    Returns:
        A dict with ``category``, ``pixel_auroc``, ``image_auroc``, ``iou_pooled_best`` (the
        paper's Table 2 IoU), ``iou_mean_per_image_best``, ``aupro``, ``pixel_f1_max``, their
        thresholds, ``label_free_threshold`` with ``label_free_iou`` / ``label_free_f1`` /
        ``..._precision`` / ``..._recall`` / ``..._fpr`` / ``..._iou_mean_per_image`` there,
        ``threshold_quantile``, ``n_holdout_images``, counts (``n_images``, ``n_defective``,
        ``n_good``, ``n_pixels``, ``n_defect_pixels``, ``n_regions``), ``score_min``,
        ``score_max``, ``warnings`` and ``iou_curve`` (numpy arrays ``thresholds``,
        ``iou_pooled``, ``iou_mean_per_image``). Undefined metrics are ``None``.

    Raises:
        DataError: Missing or broken test data, or missing held-out images.
    """
    from anoseg.data.mvtec import MVTecTestDataset

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    cfg = model.config
    image_size = cfg.data.image_size
    dataset = MVTecTestDataset(data_root, category, image_size)
    warnings: List[str] = []

    if holdout_paths is None:
        holdout_paths = holdout_image_paths(model, data_root)
    holdout_paths = [Path(p) for p in holdout_paths]
    quantile = cfg.eval.threshold_quantile
    threshold: Optional[float] = None
    if holdout_paths:
        if threshold_cache_for is not None:
            threshold, _ = cached_label_free_threshold(
                model, threshold_cache_for, holdout_paths, quantile=quantile,
                batch_size=batch_size, progress=progress)
        else:
            threshold = compute_label_free_threshold(model, holdout_paths, quantile=quantile,
                                                     batch_size=batch_size, progress=progress)
    elif "ensemble" in model.checkpoint:
        warnings.append("the ensemble's members share no held-out image that none of them "
                        "trained on (train them with the same data.split_seed): label-free "
                        "columns skipped")
    else:
        warnings.append("the run has no held-out normal images (data.holdout_fraction = 0): "
                        "label-free threshold metrics skipped")

    metrics = SegmentationMetrics(num_thresholds=cfg.eval.num_thresholds,
                                  fpr_limit=cfg.eval.fpr_limit,
                                  fixed_thresholds=[threshold] if threshold is not None else ())
    picture_indices = set()
    if pictures_dir is not None and max_pictures > 0:
        picture_indices = set(_choose_picture_indices(
            [s.defect_type for s in dataset.samples], max_pictures))
    maps_dir = Path(save_maps_dir) if save_maps_dir is not None else None
    if maps_dir is not None:
        maps_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(maps_dir / "README.txt", MAPS_README)

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    seen = 0
    detector_parts: List[np.ndarray] = []
    label_parts: List[np.ndarray] = []
    with tqdm(total=len(dataset), desc=f"eval {category}", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for batch in loader:
            maps = predict_anomaly_maps(model.generator, batch["image"], batch_size=batch_size)
            masks = batch["mask"][:, 0]
            metrics.update(maps, masks, labels=batch["label"])
            if detector is not None:
                from anoseg.detector import detector_scores

                detector_parts.append(detector_scores(detector, model.generator, batch["image"],
                                                      batch_size=batch_size).numpy())
                label_parts.append(np.asarray(batch["label"]).astype(bool))
            for offset, (path_text, defect) in enumerate(zip(batch["path"],
                                                             batch["defect_type"])):
                stem = _safe_name(Path(path_text).stem)
                if maps_dir is not None:
                    save_map_png(maps_dir / _safe_name(defect) / f"{stem}.png", maps[offset])
                if seen + offset in picture_indices:
                    name = f"{_safe_name(defect)}_{stem}"
                    save_png(Path(pictures_dir) / f"{name}_triptych.png",
                             triptych(batch["image"][offset], maps[offset], masks[offset]))
                    save_png(Path(pictures_dir) / f"{name}_overlay.png",
                             enlarged_overlay(batch["image"][offset], maps[offset]))
            seen += len(maps)
            bar.update(len(maps))

    result = metrics.compute(threshold=threshold)
    at_threshold = result.pop("at_threshold", None) or {}
    warnings.extend(result.pop("warnings"))
    score_range = result.pop("score_range")
    summary: Dict[str, Any] = {"category": category, "data_root": str(data_root),
                               "image_size": image_size}
    summary.update({k: v for k, v in result.items() if k != "iou_curve"})
    summary.update({
        "score_range": [float(score_range[0]), float(score_range[1])],
        "n_good": result["n_images"] - result["n_defective"],
        "label_free_threshold": threshold,
        "threshold_quantile": quantile,
        "n_holdout_images": len(holdout_paths),
        "label_free_iou": at_threshold.get("iou_pooled"),
        "label_free_iou_mean_per_image": at_threshold.get("iou_mean_per_image"),
        "label_free_f1": at_threshold.get("f1"),
        "label_free_precision": at_threshold.get("precision"),
        "label_free_recall": at_threshold.get("recall"),
        "label_free_fpr": at_threshold.get("fpr"),
        "warnings": warnings,
        "iou_curve": result["iou_curve"],
    })
    if detector is not None:
        summary[DETECTOR_KEY] = image_auroc(np.concatenate(label_parts),
                                             np.concatenate(detector_parts))
    return summary


def mean_over_categories(results: Sequence[Dict[str, Any]]
                         ) -> Tuple[Dict[str, Optional[float]], List[str]]:
    """Mean of each metric in :data:`MEAN_KEYS` over categories, ignoring ``None``.

    Returns:
        ``(mean, notes)``; a note names the categories left out of a metric's mean.
    """
    mean: Dict[str, Optional[float]] = {}
    notes: List[str] = []
    keys = MEAN_KEYS + ((DETECTOR_KEY,) if any(DETECTOR_KEY in r for r in results) else ())
    for key in keys:
        values = [r.get(key) for r in results]
        defined = [float(v) for v in values if v is not None]
        mean[key] = float(np.mean(defined)) if defined else None
        missing = [r["category"] for r, v in zip(results, values) if v is None]
        if missing and defined:
            notes.append(f"mean {key} over {len(defined)} of {len(results)} categories "
                         f"(undefined for {', '.join(missing)})")
        elif missing:
            notes.append(f"mean {key} undefined: undefined for every category")
    return mean, notes


# ---------------------------------------------------------------------------- table and files


def _percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}"


def format_markdown_table(results: Sequence[Dict[str, Any]],
                          mean: Optional[Dict[str, Optional[float]]] = None) -> str:
    """A Markdown table like the paper's: a row per category (and ``mean``), metrics in %."""
    columns = _metric_columns(results)
    headers = ["Category", *(title for _, title in columns), "Label-free thr."]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for result in results:
        threshold = result.get("label_free_threshold")
        cells = [result["category"], *(_percent(result.get(k)) for k, _ in columns),
                 "—" if threshold is None else f"{threshold:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if mean is not None:
        cells = ["**mean**", *(_percent(mean.get(k)) for k, _ in columns), ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def write_iou_curve_csv(path: PathLike, iou_curve: Dict[str, np.ndarray]) -> Path:
    """Write ``threshold,iou_pooled,iou_mean_per_image`` rows (empty cell = undefined)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["threshold", "iou_pooled", "iou_mean_per_image"])
    for row in zip(iou_curve["thresholds"], iou_curve["iou_pooled"],
                   iou_curve["iou_mean_per_image"]):
        writer.writerow([_csv_value(float(v)) for v in row])
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def write_metrics_files(output_dir: PathLike, results: Sequence[Dict[str, Any]],
                        mean: Optional[Dict[str, Optional[float]]], notes: Sequence[str],
                        extra: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Write ``metrics.json``, ``metrics.csv`` and ``metrics.md``; returns their paths."""
    output_dir = Path(output_dir)
    per_category = {r["category"]: {k: v for k, v in r.items() if k != "iou_curve"}
                    for r in results}
    document = {**(extra or {}), "categories": per_category, "mean": mean,
                "mean_notes": list(notes)}
    json_path, csv_path, md_path = (output_dir / f"metrics.{ext}" for ext in ("json", "csv", "md"))
    write_json(json_path, document)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    csv_keys = CSV_KEYS + ((DETECTOR_KEY,) if any(DETECTOR_KEY in r for r in results) else ())
    writer.writerow(["category", *csv_keys])
    for result in results:
        writer.writerow([result["category"], *(_csv_value(result.get(k)) for k in csv_keys)])
    if mean is not None:
        writer.writerow(["mean", *(_csv_value(mean.get(k)) for k in csv_keys)])
    atomic_write_text(csv_path, buffer.getvalue())

    quantile = results[0].get("threshold_quantile") if results else None
    text = format_markdown_table(results, mean)
    text += ("\nValues in %. IoU = pooled IoU at the best threshold (the paper's Table 2); IoU per "
             "image = mean per-image IoU at the best common threshold; AUPRO up to FPR "
             f"{results[0].get('fpr_limit', 0.3) if results else 0.3}; \"@ label-free\" = at the "
             f"{quantile} quantile of held-out normal pixel scores. — = undefined.\n")
    for note in notes:
        text += f"\n- {note}"
    for result in results:
        for warning in result.get("warnings", []):
            text += f"\n- {result['category']}: {warning}"
    atomic_write_text(md_path, text.rstrip("\n") + "\n")
    return [json_path, csv_path, md_path]


# ------------------------------------------------------------------------------ evaluate runs


@dataclass
class EvaluationReport:
    """What :func:`evaluate_run` computed and wrote.

    Attributes:
        output_dir: Where the files are.
        results: Category -> :func:`evaluate_category` result.
        mean: Mean of each metric over categories (``None`` for a single category).
        mean_notes: Which categories a mean left out.
        table: The Markdown table.
        files: Every file or folder written.
        messages: Notes for the user (e.g. a skipped plot).
    """

    output_dir: Path
    results: Dict[str, Dict[str, Any]]
    mean: Optional[Dict[str, Optional[float]]]
    mean_notes: List[str]
    table: str
    files: List[Path] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)


def _as_list(value: Union[None, PathLike, Sequence[Any]]) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def default_output_dir(checkpoint_path: PathLike) -> Path:
    """``<run>/eval`` for a run's checkpoint, else ``<folder>/<checkpoint stem>_eval``."""
    checkpoint_path = Path(checkpoint_path)
    run_dir = run_folder_of(checkpoint_path)
    return run_dir / "eval" if run_dir is not None else \
        checkpoint_path.with_name(f"{checkpoint_path.stem}_eval")


def resolve_device_name(device: Union[None, str, torch.device]) -> torch.device:
    """``None``/``"auto"`` = CUDA, then MPS, then CPU; an unavailable device is a ConfigError."""
    from anoseg.training import resolve_device

    return resolve_device("auto" if device is None else str(device))


def evaluate_run(run_or_checkpoint: Union[PathLike, Sequence[PathLike]],
                 categories: Union[None, str, Sequence[Optional[str]]] = None,
                 data_root: Optional[PathLike] = None,
                 output_dir: Optional[PathLike] = None, *,
                 batch_size: Optional[int] = None,
                 device: Union[None, str, torch.device] = None,
                 save_maps: bool = False, pictures: int = 0, plot: bool = False,
                 progress: bool = True, num_workers: int = 0,
                 weights: str = "auto", ensemble: bool = False) -> EvaluationReport:
    """Evaluate one or several runs (one category each) and write the tables.

    Writes into ``output_dir``: ``metrics.json`` / ``.csv`` / ``.md`` (a row per category and,
    for several, a mean row) and per category ``<category>/iou_curve.csv``, plus optionally
    ``<category>/maps/``, ``<category>/pictures/`` and ``<category>/iou_curve.png``.

    Args:
        run_or_checkpoint: A run folder or checkpoint file, or a list of them.
        categories: Category per run (default: each run's ``data.category``).
        data_root: Dataset root (default: the one each run was trained on).
        output_dir: Default ``<run>/eval`` for one run; required for several.
        batch_size: Default: the run's ``eval.batch_size``.
        device: ``auto``/``None``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        save_maps: Write every test map as a 16-bit PNG.
        pictures: Triptychs and overlays of this many test images per category.
        plot: Plot IoU against the threshold (needs matplotlib; otherwise a message).
        progress: Show progress bars.
        num_workers: Data-loader workers for the test images.
        weights: ``auto``, ``ema`` or ``raw``: which generator weights of an EMA run to use
            (see :func:`anoseg.load_model`).
        ensemble: The runs are members of one model of one category (their maps averaged,
            :func:`anoseg.inference.load_ensemble`), evaluated as one row. The label-free
            threshold uses the held-out images no member trained on (none when the members
            used different splits: the label-free columns are then skipped).

    Raises:
        AnoSegError: Bad paths, missing data, several runs of one category, ...
    """
    runs = _as_list(run_or_checkpoint)
    if not runs:
        raise ConfigError("no run folder or checkpoint given")
    wanted = [categories] * len(runs) if categories is None or isinstance(categories, str) \
        else list(categories)
    if len(wanted) != len(runs):
        raise ConfigError(f"{len(runs)} runs but {len(wanted)} categories; give one category "
                          "per run (or none to use each run's own)")
    if isinstance(categories, str) and len(runs) > 1:
        raise ConfigError("a category override applies to one run only; each run is evaluated "
                          "on the category it was trained on")
    checkpoint_paths = [resolve_checkpoint(run) for run in runs]
    if ensemble:
        if isinstance(categories, str) or categories is None:
            wanted = [categories]
        else:
            raise ConfigError("an ensemble is one model of one category: give one category "
                              "or none")
    if output_dir is None:
        if len(runs) > 1:  # an ensemble too: its table must not overwrite a member's eval
            raise ConfigError("several runs: pass an output folder (--output-dir) for the "
                              "combined table")
        output_dir = default_output_dir(checkpoint_paths[0])
    output_dir = Path(output_dir)
    torch_device = resolve_device_name(device)

    results: List[Dict[str, Any]] = []
    files: List[Path] = []
    messages: List[str] = []
    sources: Dict[str, str] = {}
    jobs = ([(checkpoint_paths, wanted[0])] if ensemble
            else list(zip(checkpoint_paths, wanted)))
    for checkpoint_path, category in jobs:
        if ensemble:
            from anoseg.inference import load_ensemble

            model = load_ensemble(checkpoint_path, torch_device, weights=weights)
            checkpoint_path = checkpoint_path[0]  # counters, split and detector: the first's
        else:
            model = load_model(checkpoint_path, torch_device, weights=weights)
        category = category or model.config.data.category
        if category in sources:
            raise ConfigError(f"runs {sources[category]} and {checkpoint_path} both evaluate "
                              f"category {category!r}; evaluate them into separate output "
                              "folders")
        sources[category] = str(checkpoint_path)
        run_dir = run_folder_of(checkpoint_path)
        root = resolve_eval_data_root(model, data_root, run_dir)
        holdout = holdout_image_paths(model, root, None if ensemble else run_dir)
        category_dir = output_dir / _safe_name(category)
        maps_dir = category_dir / "maps" if save_maps else None
        pictures_dir = category_dir / "pictures" if pictures > 0 else None
        detector, detector_warning = (None, None) if ensemble else run_detector(
            checkpoint_path, model, torch_device)
        result = evaluate_category(
            model, root, category, batch_size=batch_size or model.config.eval.batch_size,
            progress=progress, save_maps_dir=maps_dir, pictures_dir=pictures_dir,
            max_pictures=pictures, num_workers=num_workers, holdout_paths=holdout,
            threshold_cache_for=None if ensemble else checkpoint_path, detector=detector)
        if detector_warning is not None:
            result["warnings"].append(detector_warning)
        result["checkpoint"] = str(checkpoint_path)
        if ensemble:
            result["ensemble"] = list(model.checkpoint["ensemble"])
        result["checkpoint_step"] = int(model.checkpoint.get("step", 0))
        files.append(write_iou_curve_csv(category_dir / "iou_curve.csv", result["iou_curve"]))
        files.extend(p for p in (maps_dir, pictures_dir) if p is not None)
        if plot:
            curve = result["iou_curve"]
            plot_path = save_iou_curve_plot(
                category_dir / "iou_curve.png", curve["thresholds"],
                {"pooled IoU": curve["iou_pooled"], "mean per-image IoU":
                 curve["iou_mean_per_image"]},
                title=f"{category}: IoU vs threshold",
                marked_threshold=result["label_free_threshold"])
            if plot_path is None:
                if PLOT_SKIPPED_MESSAGE not in messages:
                    messages.append(PLOT_SKIPPED_MESSAGE)
            else:
                files.append(plot_path)
        results.append(result)
        del model

    mean, notes = mean_over_categories(results) if len(results) > 1 else (None, [])
    from anoseg._version import __version__

    files[:0] = write_metrics_files(output_dir, results, mean, notes,
                                    extra={"anoseg_version": __version__})
    return EvaluationReport(output_dir, {r["category"]: r for r in results}, mean, notes,
                            format_markdown_table(results, mean), files, messages)


# ---------------------------------------------------------------------------------- predict


def collect_image_paths(inputs: Sequence[PathLike]) -> List[Path]:
    """Image files from files and folders (a folder's images directly inside it, hidden files
    and other file types ignored), in the given order, without duplicates.

    Raises:
        DataError: A path does not exist, or a folder holds no images.
    """
    from anoseg.data.mvtec import IMAGE_EXTENSIONS, _image_files

    paths: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = _image_files(path)
            if not found:
                raise DataError(f"folder {path} contains no images; expected files ending in "
                                f"{', '.join(IMAGE_EXTENSIONS)}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"input {path} does not exist; expected an image file or a folder "
                            "of images")
    unique: Dict[Path, None] = {}
    for path in paths:
        unique.setdefault(path, None)
    return list(unique)


def output_names(paths: Sequence[Path]) -> List[str]:
    """A distinct file-name stem per input: the stem, or ``<folder>_<stem>`` (then a number)
    where stems collide."""
    stems = [_safe_name(p.stem) for p in paths]
    names = [s if stems.count(s) == 1 else f"{_safe_name(p.parent.name)}_{s}"
             for p, s in zip(paths, stems)]
    taken: Dict[str, int] = {}
    unique: List[str] = []
    for name in names:
        count = taken.get(name, 0)
        taken[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique


@dataclass
class PredictionReport:
    """What :func:`predict_images` wrote.

    Attributes:
        output_dir: Folder with ``maps/``, ``overlays/``, ``masks/``, ``scores.csv``,
            ``prediction.json``.
        threshold: The pixel threshold of the masks and of ``is_anomalous``.
        threshold_source: ``"given"``, ``"holdout"`` or ``"holdout (cached)"``.
        rows: One dict per image (the ``scores.csv`` rows).
    """

    output_dir: Path
    threshold: float
    threshold_source: str
    rows: List[Dict[str, Any]]


def predict_images(model: LoadedModel, image_paths: Sequence[PathLike], output_dir: PathLike, *,
                   threshold: float, batch_size: int = 16, progress: bool = True,
                   threshold_source: str = "given",
                   detector: Optional[Any] = None) -> PredictionReport:
    """Write anomaly maps, overlays, masks and scores for images.

    Every image is checked (header) before anything is written. Per image ``<name>``:
    ``maps/<name>.png`` (16-bit map at the model's resolution, score = value / 65535),
    ``overlays/<name>.png`` (the map blended over the resized input, enlarged to >= 256 px) and
    ``masks/<name>.png`` (0/255, pixels with score >= ``threshold``). ``scores.csv`` has one row
    per image: ``path``, ``image_score`` (max of the map), ``is_anomalous``
    (``image_score >= threshold``), ``anomalous_pixel_fraction`` and the three file names; with
    a ``detector`` (:class:`anoseg.detector.LoadedDetector`), also ``detector_score`` (eq. 5,
    higher = more anomalous; not thresholded).

    Raises:
        DataError: An image is missing or unreadable (the message names it).
    """
    from anoseg.data.mvtec import image_size_of

    paths = [Path(p) for p in image_paths]
    if not paths:
        raise DataError("no images to predict")
    for path in paths:
        image_size_of(path)  # fails early, naming the file, before anything is written
    output_dir = Path(output_dir)
    names = output_names(paths)
    size = model.config.data.image_size
    rows: List[Dict[str, Any]] = []
    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            images = _load_images(chunk, size)
            maps = predict_anomaly_maps(model.generator, images, batch_size=batch_size)
            scores = None
            if detector is not None:
                from anoseg.detector import detector_scores

                scores = detector_scores(detector, model.generator, images,
                                         batch_size=batch_size)
            for offset, path in enumerate(chunk):
                name = names[start + offset]
                anomaly_map = maps[offset]
                mask = anomaly_map >= threshold
                files = {"map": f"maps/{name}.png", "overlay": f"overlays/{name}.png",
                         "mask": f"masks/{name}.png"}
                save_map_png(output_dir / files["map"], anomaly_map)
                save_png(output_dir / files["overlay"], enlarged_overlay(images[offset],
                                                                         anomaly_map))
                save_mask_png(output_dir / files["mask"], mask)
                image_score = float(anomaly_map.max())
                row = {"path": str(path), "image_score": image_score}
                if scores is not None:
                    row["detector_score"] = float(scores[offset])
                rows.append({**row, "is_anomalous": int(image_score >= threshold),
                             "anomalous_pixel_fraction": float(mask.float().mean()), **files})
            bar.update(len(chunk))

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output_dir / "scores.csv", buffer.getvalue())
    atomic_write_text(output_dir / "maps" / "README.txt", MAPS_README)
    write_json(output_dir / "prediction.json", {
        "threshold": threshold, "threshold_source": threshold_source,
        "image_size": size, "n_images": len(rows),
        "n_anomalous": sum(r["is_anomalous"] for r in rows)})
    return PredictionReport(output_dir, threshold, threshold_source, rows)


def predict_run(checkpoint: PathLike, inputs: Sequence[PathLike], output_dir: PathLike, *,
                threshold: Optional[float] = None, batch_size: Optional[int] = None,
                device: Union[None, str, torch.device] = None, data_root: Optional[PathLike] = None,
                progress: bool = True) -> PredictionReport:
    """Load a run or checkpoint and :func:`predict_images` on files and folders of images.

    Args:
        checkpoint: Run folder or checkpoint file.
        inputs: Image files and folders (see :func:`collect_image_paths`).
        output_dir: Where to write.
        threshold: Pixel threshold; default: the label-free threshold from the run's held-out
            normal images (cached beside the checkpoint, see :func:`cached_label_free_threshold`).
        batch_size: Default: the run's ``eval.batch_size``.
        device: ``auto``/``None``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        data_root: Where the run's dataset is now, if it moved since training.
        progress: Show progress bars.

    Raises:
        AnoSegError: Bad inputs; no threshold given and the run has no held-out images.
    """
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"threshold {threshold!r} is invalid; expected a score in [0, 1]")
    checkpoint_path = resolve_checkpoint(checkpoint)
    image_paths = collect_image_paths(inputs)
    model = load_model(checkpoint_path, resolve_device_name(device))
    batch_size = batch_size or model.config.eval.batch_size
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    source = "given"
    if threshold is None:
        holdout = holdout_image_paths(model, data_root, run_folder_of(checkpoint_path))
        if not holdout:
            raise DataError(f"run {checkpoint_path} has no held-out normal images "
                            "(data.holdout_fraction = 0), so there is no label-free threshold; "
                            "pass --threshold")
        threshold, from_cache = cached_label_free_threshold(
            model, checkpoint_path, holdout, batch_size=batch_size, progress=progress)
        source = "holdout (cached)" if from_cache else "holdout"
    detector, warning = run_detector(checkpoint_path, model, model.device)
    if warning is not None:
        print(f"warning: {warning}")
    return predict_images(model, image_paths, output_dir, threshold=threshold,
                          batch_size=batch_size, progress=progress, threshold_source=source,
                          detector=detector)
