"""Evaluating trained runs on a test set.

Evaluation streams the test images of a category through the model batch by batch into
:class:`~anoseg.metrics.SegmentationMetrics` (memory does not grow with the test set), after
choosing a *label-free* threshold on the run's held-out normal training images
(:mod:`anoseg.threshold`). The tables are :mod:`anoseg.reporting`'s; prediction for new
images is :mod:`anoseg.predict`.

Example:
    >>> report = evaluate_run("runs/bottle")                      # doctest: +SKIP
    >>> report.results["bottle"].pixel_auroc                      # doctest: +SKIP

The command-line tool ``anoseg-eval`` is a thin wrapper around :func:`evaluate_run`. See
``docs/evaluation.md`` for the files written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from anoseg._version import __version__
from anoseg.atomic import atomic_write_text
from anoseg.checkpoint import resolve_checkpoint
from anoseg.errors import ConfigError
from anoseg.data.geometry import Geometry, crop, group_by_shape
from anoseg.galleries import DEFAULT_GALLERY_SIZE, GalleryCollector
from anoseg.html_report import REPORT_FILE, CategoryReport, write_report
from anoseg.inference import (LoadedDetector, LoadedModel, ScoredMap, detector_scores,
                              calibrate_ensemble, load_ensemble, load_model, override_eval,
                              predict_placed, run_detector)
from anoseg.metrics import IMAGE_SCORES, SegmentationMetrics, image_auroc
from anoseg.reporting import (DETECTOR_KEY, MEAN_KEYS, format_image_score_table,
                              format_markdown_table,
                              write_iou_curve_csv, write_metrics_files)
from anoseg.results import CategoryResult
from anoseg.run_dir import RunDir, safe_name
from anoseg.runtime import resolve_device
from anoseg.threshold import (cached_label_free_threshold, compute_label_free_threshold,
                              headline_image_score, holdout_image_paths, image_threshold_for,
                              resolve_eval_data_root, scored_image_scores)
from anoseg.visualize import (FLOAT_MAPS_README, MAPS_README, PLOT_SKIPPED_MESSAGE,
                              enlarged_overlay,
                              save_float_map, save_iou_curve_plot, save_map_png, save_png,
                              triptych)

PathLike = Union[str, Path]

DEFAULT_MAX_PICTURES = 8
"""Pictures written by :func:`evaluate_category` when ``pictures_dir`` is given."""


def detector_image_auroc(model: LoadedModel, detector: LoadedDetector, data_root: PathLike, *,
                         batch_size: int, progress: bool = False) -> Optional[float]:
    """Image AUROC of a detector's eq. 5 score on the model's category test set (``None``
    when the set lacks good or defective images)."""
    from anoseg.data.mvtec import MVTecTestDataset

    dataset = MVTecTestDataset(data_root, model.config.data.category,
                               Geometry.from_config(model.config.data))
    scores: List[np.ndarray] = []
    labels: List[np.ndarray] = []
    for batch in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False),
                      desc="detector", disable=not progress):
        scores.append(detector_scores(detector, model.generator, batch["image"],
                                      batch_size=batch_size).numpy())
        labels.append(np.asarray(batch["label"]))
    return image_auroc(np.concatenate(labels), np.concatenate(scores)) if scores else None


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


def _threshold_for(model: LoadedModel, holdout_paths: Sequence[Path],
                   cache_for: Optional[PathLike], warnings: List[str], *, batch_size: int,
                   progress: bool) -> Optional[float]:
    """The label-free threshold on ``holdout_paths`` (cached in ``cache_for``'s checkpoint
    folder if given), or ``None`` with a warning appended when there are no held-out images."""
    quantile = model.config.eval.threshold_quantile
    if holdout_paths:
        if cache_for is not None:
            threshold, _ = cached_label_free_threshold(
                model, cache_for, holdout_paths, quantile=quantile, batch_size=batch_size,
                progress=progress)
            return threshold
        return compute_label_free_threshold(model, holdout_paths, quantile=quantile,
                                            batch_size=batch_size, progress=progress)
    if model.is_ensemble:
        warnings.append("the ensemble's members share no held-out image that none of them "
                        "trained on (train them with the same data.split_seed): label-free "
                        "columns skipped")
    else:
        warnings.append("the run has no held-out normal images (data.holdout_fraction = 0): "
                        "label-free threshold metrics skipped")
    return None


class _PictureWriter:
    """Writes a test batch's maps (16-bit PNGs under ``maps_dir``, if given) and the triptychs
    and overlays of the test images at ``picture_indices`` (under ``pictures_dir``)."""

    def __init__(self, maps_dir: Optional[PathLike], pictures_dir: Optional[PathLike],
                 picture_indices: Set[int]) -> None:
        self.maps_dir = Path(maps_dir) if maps_dir is not None else None
        self.pictures_dir = Path(pictures_dir) if pictures_dir is not None else None
        self.picture_indices = picture_indices
        self.seen = 0
        if self.maps_dir is not None:
            self.maps_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.maps_dir / "README.txt", MAPS_README + FLOAT_MAPS_README)

    def write(self, batch: Dict[str, Any], maps: Sequence[torch.Tensor],
              logits: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
              images: Sequence[Any]) -> None:
        """``maps``, ``logits``, ``masks`` and ``images`` (callables returning the image at the
        maps' size) per image of ``batch``."""
        for offset, (path_text, defect) in enumerate(zip(batch["path"], batch["defect_type"])):
            stem = safe_name(Path(path_text).stem)
            if self.maps_dir is not None:
                folder = self.maps_dir / safe_name(defect)
                save_map_png(folder / f"{stem}.png", maps[offset])
                save_float_map(folder / f"{stem}.npy", maps[offset])
                save_float_map(folder / f"{stem}.logit.npy", logits[offset])
            if self.seen + offset in self.picture_indices:
                name = f"{safe_name(defect)}_{stem}"
                image = images[offset]()
                save_png(self.pictures_dir / f"{name}_triptych.png",
                         triptych(image, maps[offset], masks[offset]))
                save_png(self.pictures_dir / f"{name}_overlay.png",
                         enlarged_overlay(image, maps[offset]))
        self.seen += len(maps)


def evaluate_category(model: LoadedModel, data_root: PathLike, category: str, *,
                      batch_size: int, progress: bool = True,
                      save_maps_dir: Optional[PathLike] = None,
                      pictures_dir: Optional[PathLike] = None,
                      max_pictures: int = DEFAULT_MAX_PICTURES, num_workers: int = 0,
                      holdout_paths: Optional[Sequence[PathLike]] = None,
                      threshold_cache_for: Optional[PathLike] = None,
                      detector: Optional[LoadedDetector] = None,
                      gallery: Optional[GalleryCollector] = None) -> CategoryResult:
    """Evaluate one model on the test set of one category.

    The label-free threshold is chosen first on the held-out normal images; then the test images
    stream through the model and the metrics batch by batch (no map is kept).

    Args:
        model: The loaded model (:func:`anoseg.load_model`).
        data_root: Dataset root in MVTec AD layout.
        category: Category folder under ``data_root``.
        batch_size: Test images per forward pass.
        progress: Show a progress bar over the test images.
        save_maps_dir: If given, write every map there as ``<defect>/<stem>.png`` (16-bit,
            for viewing), ``<stem>.npy`` (the float32 map) and ``<stem>.logit.npy`` (the
            float32 anomaly logit): the two ``.npy`` re-score to the returned numbers exactly.
        pictures_dir: If given, write ``max_pictures`` triptychs and overlays there.
        max_pictures: How many test images get pictures (spread over the defect types).
        num_workers: Data-loader worker processes for reading test images.
        holdout_paths: Normal images for the threshold; default: the run's holdout, from
            ``model.checkpoint["split"]`` (moved under ``data_root`` if the dataset moved).
        threshold_cache_for: A checkpoint path: reuse/write its cached threshold
            (:func:`cached_label_free_threshold`; an ensemble's is computed, never cached).
        detector: A :class:`anoseg.inference.LoadedDetector` trained on ``model``: adds
            ``image_auroc_detector``, the image AUROC of its scores (eq. 5).
        gallery: A :class:`anoseg.galleries.GalleryCollector`: fed each batch, then it picks
            and draws ``report.html``'s gallery pictures.

    Returns:
        A :class:`~anoseg.results.CategoryResult`: the label-based metrics (``pixel_auroc``,
        ``image_auroc``, ``iou_pooled_best`` = the paper's Table 2 IoU, ...), the label-free
        threshold and the metrics there, counts, ``warnings`` and ``iou_curve``; the image
        scores' AUROCs (``image_auroc_scores``; ``image_auroc`` is ``eval.image_score``'s), the
        label-free image threshold and its FPR / recall; ``defect_types``. Undefined metrics
        are ``None``.

    Raises:
        DataError: Missing or broken test data, or missing held-out images.
    """
    from anoseg.data.mvtec import MVTecTestDataset

    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    cfg = model.config
    image_size = cfg.data.image_size
    image_size = list(image_size) if isinstance(image_size, (tuple, list)) else image_size
    dataset = MVTecTestDataset(data_root, category, Geometry.from_config(cfg.data),
                               native_masks=cfg.eval.resolution == "native")
    warnings: List[str] = []

    if holdout_paths is None:
        holdout_paths = holdout_image_paths(model, data_root)
    holdout_paths = [Path(p) for p in holdout_paths]
    quantile = cfg.eval.threshold_quantile
    threshold = _threshold_for(model, holdout_paths, threshold_cache_for, warnings,
                               batch_size=batch_size, progress=progress)
    score = headline_image_score(model, detector, warnings)
    test_pass = _TestPass(cfg, threshold, [s.defect_type for s in dataset.samples], score,
                          image_threshold_for(model, holdout_paths, score, threshold_cache_for,
                                              detector, batch_size=batch_size,
                                              progress=progress, notes=warnings))
    picture_indices = set()
    if pictures_dir is not None and max_pictures > 0:
        picture_indices = set(_choose_picture_indices(
            [s.defect_type for s in dataset.samples], max_pictures))
    writer = _PictureWriter(save_maps_dir, pictures_dir, picture_indices)

    _stream_test_set(model, dataset, test_pass, writer, batch_size=batch_size,
                     num_workers=num_workers, progress=progress, detector=detector,
                     gallery=gallery, threshold=threshold)
    if gallery is not None:
        gallery.finish(test_pass.image_threshold,
                       _gallery_scorer(model, dataset, batch_size=batch_size))

    def result_of(part: SegmentationMetrics, name: str,
                  own_warnings: List[str]) -> CategoryResult:
        return CategoryResult.from_metrics(
            part.compute(threshold=threshold), category=name, data_root=data_root,
            image_size=image_size, threshold=threshold, threshold_quantile=quantile,
            n_holdout_images=len(holdout_paths), warnings=own_warnings)

    return test_pass.result(result_of, category, warnings)


def scored_batch(model: LoadedModel, batch: Dict[str, Any], *, batch_size: int
                 ) -> Tuple[List[ScoredMap], List[torch.Tensor]]:
    """``(scored maps, masks)`` of a test batch (:class:`~anoseg.data.mvtec.MVTecTestDataset`
    items, :func:`~anoseg.data.mvtec.collate_samples`): per image, at ``eval.resolution``,
    padding cut off (``docs/evaluation.md``)."""
    from anoseg.data.mvtec import placement_of

    geometry = Geometry.from_config(model.config.data)
    resolution = model.config.eval.resolution
    placements = [placement_of(row) for row in batch["placement"]]
    scored = predict_placed(model.generator, batch["image"], placements, geometry,
                            batch_size=batch_size, resolution=resolution)
    masks = [batch["mask"][i][0] if resolution == "native" else crop(batch["mask"][i][0], p)
             for i, p in enumerate(placements)]
    return scored, masks


def _picture_sources(batch: Dict[str, Any], resolution: str) -> List[Any]:
    """Per image of ``batch``, a callable giving the image at the size of its scored map (the
    canvas's box, or the file read at its own size)."""
    from anoseg.data.mvtec import load_image, placement_of

    def source(index: int):
        if resolution == "native":
            return lambda: load_image(batch["path"][index], None)
        return lambda: crop(batch["image"][index], placement_of(batch["placement"][index]))

    return [source(i) for i in range(len(batch["path"]))]


def _gallery_scorer(model: LoadedModel, dataset: Any, *, batch_size: int):
    """For :meth:`GalleryCollector.finish`: test-set indices -> their maps, masks and images,
    as the test pass scored them."""
    from anoseg.data.mvtec import collate_samples

    def score(indices: Sequence[int]):
        batch = collate_samples([dataset[i] for i in indices])
        scored, masks = scored_batch(model, batch, batch_size=batch_size)
        maps = [item.anomaly for item in scored]
        sources = _picture_sources(batch, model.config.eval.resolution)
        return maps, masks, [source() for source in sources]

    return score


def _stream_test_set(model: LoadedModel, dataset: Any, test_pass: "_TestPass",
                     writer: _PictureWriter, *, batch_size: int, num_workers: int,
                     progress: bool, detector: Optional[LoadedDetector],
                     gallery: Optional[GalleryCollector] = None,
                     threshold: Optional[float] = None) -> None:
    """The test images through the model, the metrics and the writer, a batch at a time."""
    from anoseg.data.mvtec import collate_samples

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_samples)
    with tqdm(total=len(dataset), desc=f"eval {dataset.category}", unit="img",
              disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            scored, masks = scored_batch(model, batch, batch_size=batch_size)
            maps, logits = [s.anomaly for s in scored], [s.logit for s in scored]
            detector_part = None if detector is None else detector_scores(
                detector, model.generator, batch["image"], batch_size=batch_size).numpy()
            scores = test_pass.update(batch, maps, masks,
                                      scored_image_scores(scored),
                                      detector_part)
            writer.write(batch, maps, logits, masks,
                         _picture_sources(batch, model.config.eval.resolution))
            if gallery is not None:
                gallery.update(batch, maps, masks, scores, threshold)
            bar.update(len(maps))


class _TestPass:
    """The metrics of one streaming pass over a test set: the category's
    :class:`SegmentationMetrics`, one per defect type (:class:`_DefectTypeMetrics`), and the
    image scores of every test image (each cheap score, the detector's) for their AUROCs and
    the image threshold."""

    def __init__(self, cfg: Any, threshold: Optional[float], defect_types: Sequence[str],
                 image_score: str, image_threshold: Optional[float]) -> None:
        def new_metrics() -> SegmentationMetrics:
            return SegmentationMetrics(
                num_thresholds=cfg.eval.num_thresholds, fpr_limit=cfg.eval.fpr_limit,
                fixed_thresholds=[threshold] if threshold is not None else ())

        self.metrics = new_metrics()
        self.by_type = _DefectTypeMetrics(defect_types, new_metrics)
        self.image_score = image_score
        self.image_threshold = image_threshold
        self.image_threshold_quantile = cfg.eval.image_threshold_quantile
        self.labels: List[np.ndarray] = []
        self.scores: Dict[str, List[np.ndarray]] = {name: [] for name in IMAGE_SCORES}

    def update(self, batch: Dict[str, Any], maps: Sequence[torch.Tensor],
               masks: Sequence[torch.Tensor], scores: Dict[str, np.ndarray],
               detector_part: Optional[np.ndarray]) -> np.ndarray:
        """One batch: per image its map and mask (of one size; sizes may differ between
        images: each size is one metrics update) and its image scores; returns the batch's
        headline image scores."""
        labels = np.asarray(batch["label"])
        defects = np.asarray(batch["defect_type"])
        if detector_part is not None:
            scores = {**scores, "detector": detector_part}
        headline = scores[self.image_score]
        for group in group_by_shape(maps):
            part_maps = torch.stack([maps[i] for i in group])
            part_masks = torch.stack([masks[i] for i in group])
            self.metrics.update(part_maps, part_masks, labels=labels[group],
                                image_scores=headline[group])
            self.by_type.update(list(defects[group]), part_maps, part_masks, labels[group],
                                image_scores=headline[group])
        self.labels.append(labels.astype(bool))
        for name, values in scores.items():
            self.scores.setdefault(name, []).append(np.asarray(values, dtype=np.float64))
        return np.asarray(headline, dtype=np.float64)

    def result(self, result_of: Any, category: str, warnings: List[str]) -> CategoryResult:
        """The category's result (``result_of(metrics, name, warnings)`` builds one) with its
        defect types, every image score's AUROC and the image-threshold rates."""
        result = result_of(self.metrics, category, warnings)
        result.defect_types = {defect: result_of(part, f"{category}/{defect}", [])
                               for defect, part in self.by_type.metrics.items()}
        labels = np.concatenate(self.labels)
        scores = {name: np.concatenate(parts) for name, parts in self.scores.items()}
        headline = scores[self.image_score]
        flagged = None if self.image_threshold is None else headline > self.image_threshold
        for part, rows in [(result, np.ones(len(labels), dtype=bool))] + [
                (r, self.by_type.rows_of(d)) for d, r in result.defect_types.items()]:
            part.image_score = self.image_score
            part.image_auroc_scores = {name: image_auroc(labels[rows], values[rows])
                                       for name, values in scores.items() if name != "detector"}
            if "detector" in scores:
                part.detector_scored = True
                part.image_auroc_detector = image_auroc(labels[rows], scores["detector"][rows])
            part.image_threshold = self.image_threshold
            part.image_threshold_quantile = self.image_threshold_quantile
            if flagged is not None:
                part.set_image_rates(flagged[rows & ~labels], flagged[rows & labels])
        return result


class _DefectTypeMetrics:
    """One :class:`SegmentationMetrics` per defect type of a test set, each fed the batch rows
    of its type and every good row (so its image AUROC is that type against the good images),
    in the evaluation's single pass."""

    def __init__(self, defect_types: Sequence[str], new_metrics: Any) -> None:
        self.defect_types = list(defect_types)
        self.metrics: Dict[str, SegmentationMetrics] = {
            defect: new_metrics() for defect in sorted(set(self.defect_types) - {"good"})}

    def update(self, defects: Sequence[str], maps: torch.Tensor, masks: torch.Tensor,
               labels: Any, image_scores: Optional[np.ndarray] = None) -> None:
        good = np.array([d == "good" for d in defects])
        for defect, part in self.metrics.items():
            rows = good | np.array([d == defect for d in defects])
            if rows.any():
                index = torch.from_numpy(np.flatnonzero(rows))
                part.update(maps[index], masks[index], labels=np.asarray(labels)[rows],
                            image_scores=None if image_scores is None else image_scores[rows])

    def rows_of(self, defect: str) -> np.ndarray:
        """Test-set positions of the images of ``defect`` and of every good image."""
        return np.array([d in ("good", defect) for d in self.defect_types])


def mean_over_categories(results: Sequence[CategoryResult]
                         ) -> Tuple[Dict[str, Optional[float]], List[str]]:
    """Mean of each metric in :data:`MEAN_KEYS` over categories, ignoring ``None``.

    Returns:
        ``(mean, notes)``; a note names the categories left out of a metric's mean.
    """
    mean: Dict[str, Optional[float]] = {}
    notes: List[str] = []
    keys = MEAN_KEYS + ((DETECTOR_KEY,) if any(r.detector_scored for r in results) else ())
    for key in keys:
        values = [getattr(r, key) for r in results]
        defined = [float(v) for v in values if v is not None]
        mean[key] = float(np.mean(defined)) if defined else None
        missing = [r.category for r, v in zip(results, values) if v is None]
        if missing and defined:
            notes.append(f"mean {key} over {len(defined)} of {len(results)} categories "
                         f"(undefined for {', '.join(missing)})")
        elif missing:
            notes.append(f"mean {key} undefined: undefined for every category")
    return mean, notes


@dataclass
class EvaluationReport:
    """What :func:`evaluate_run` computed and wrote.

    Attributes:
        output_dir: Where the files are.
        results: Category -> its :class:`~anoseg.results.CategoryResult`.
        mean: Mean of each metric over categories (``None`` for a single category).
        mean_notes: Which categories a mean left out.
        table: The Markdown table.
        files: Every file or folder written.
        messages: Notes for the user (e.g. a skipped plot).
    """

    output_dir: Path
    results: Dict[str, CategoryResult]
    mean: Optional[Dict[str, Optional[float]]]
    mean_notes: List[str]
    table: str
    files: List[Path] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)
    image_table: str = ""
    """The image-level table (:func:`anoseg.reporting.format_image_score_table`)."""


def _as_list(value: Union[None, PathLike, Sequence[Any]]) -> List[Any]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [value]
    return list(value)


def default_output_dir(checkpoint_path: PathLike) -> Path:
    """``<run>/eval`` for a run's checkpoint, else ``<folder>/<checkpoint stem>_eval``."""
    checkpoint_path = Path(checkpoint_path)
    run = RunDir.of_checkpoint(checkpoint_path)
    return run.eval_dir if run is not None else \
        checkpoint_path.with_name(f"{checkpoint_path.stem}_eval")


def evaluate_run(run_or_checkpoint: Union[PathLike, Sequence[PathLike]],
                 categories: Union[None, str, Sequence[Optional[str]]] = None,
                 data_root: Optional[PathLike] = None,
                 output_dir: Optional[PathLike] = None, *,
                 batch_size: Optional[int] = None,
                 device: Union[None, str, torch.device] = None,
                 save_maps: bool = False, pictures: int = 0, plot: bool = False,
                 progress: bool = True, num_workers: int = 0,
                 weights: str = "auto", ensemble: bool = False,
                 image_score: Optional[str] = None,
                 image_threshold_quantile: Optional[float] = None,
                 resolution: Optional[str] = None,
                 ensemble_combine: Optional[str] = None,
                 report: bool = False,
                 report_gallery: int = DEFAULT_GALLERY_SIZE) -> EvaluationReport:
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
        save_maps: Write every test map as a 16-bit PNG and as exact float32 ``.npy`` files
            (the map and the anomaly logit).
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
        image_score, image_threshold_quantile, resolution, ensemble_combine: Override the
            runs' ``eval.image_score``, ``eval.image_threshold_quantile``, ``eval.resolution``
            (``model`` or ``native``: maps scored at each image's own size) and
            ``eval.ensemble_combine`` (``auto``, ``mean`` or ``calibrated``, with
            ``ensemble``).
        report: Also write ``report.html`` (:mod:`anoseg.html_report`): one self-contained
            page with every table, the thresholds, the IoU curves and galleries of
            ``report_gallery`` pictures each.

    Raises:
        AnoSegError: Bad paths, missing data, several runs of one category, ...
    """
    jobs, output_dir = _plan_jobs(run_or_checkpoint, categories, output_dir, ensemble)
    overrides = dict(image_score=image_score, image_threshold_quantile=image_threshold_quantile,
                     resolution=resolution, ensemble_combine=ensemble_combine)
    torch_device = resolve_device(device)
    results: List[CategoryResult] = []
    files: List[Path] = []
    messages: List[str] = []
    sources: Dict[str, str] = {}
    pages: List[CategoryReport] = []
    for checkpoint_path, category in jobs:
        model, checkpoint_path = _load_for_eval(checkpoint_path, ensemble, torch_device,
                                                weights, **overrides)
        category = category or model.config.data.category
        if category in sources:
            raise ConfigError(f"runs {sources[category]} and {checkpoint_path} both evaluate "
                              f"category {category!r}; evaluate them into separate output "
                              "folders")
        sources[category] = str(checkpoint_path)
        category_dir = output_dir / safe_name(category)
        maps_dir = category_dir / "maps" if save_maps else None
        pictures_dir = category_dir / "pictures" if pictures > 0 else None
        gallery = GalleryCollector(report_gallery) if report else None
        result = _evaluate_checkpoint(
            model, checkpoint_path, category, data_root, torch_device, ensemble=ensemble,
            batch_size=batch_size, progress=progress, save_maps_dir=maps_dir,
            pictures_dir=pictures_dir, max_pictures=pictures, num_workers=num_workers,
            gallery=gallery)
        if gallery is not None:
            pages.append(CategoryReport(result, gallery.galleries, gallery.notes))
        files.append(write_iou_curve_csv(category_dir / "iou_curve.csv", result.iou_curve))
        files.extend(p for p in (maps_dir, pictures_dir) if p is not None)
        if plot:
            _plot_iou_curve(result, category_dir / "iou_curve.png", files, messages)
        results.append(result)
        del model

    mean, notes = mean_over_categories(results) if len(results) > 1 else (None, [])
    files[:0] = write_metrics_files(output_dir, results, mean, notes,
                                    extra={"anoseg_version": __version__})
    if report:
        files.insert(0, _write_report(output_dir, pages, mean, notes))
    return EvaluationReport(output_dir, {r.category: r for r in results}, mean, notes,
                            format_markdown_table(results, mean), files, messages,
                            format_image_score_table(results))


def _write_report(output_dir: Path, pages: Sequence[CategoryReport],
                  mean: Optional[Dict[str, Optional[float]]], notes: Sequence[str]) -> Path:
    """``report.html`` of an evaluation (:func:`anoseg.html_report.write_report`)."""
    categories = ", ".join(page.result.category for page in pages)
    return write_report(output_dir / REPORT_FILE, pages, mean=mean, notes=notes,
                        title=f"anoseg evaluation: {categories}",
                        subtitle=f"anoseg {__version__}, written to {output_dir}")


def _load_for_eval(checkpoint_path: Any, ensemble: bool, device: torch.device, weights: str,
                   **overrides: Any) -> Tuple[LoadedModel, Path]:
    """The model of one row of :func:`evaluate_run` with its ``eval`` overrides, and the
    checkpoint whose counters, split and detector it uses (an ensemble's first member's)."""
    if ensemble:
        model = load_ensemble(checkpoint_path, device, weights=weights)
        checkpoint_path = checkpoint_path[0]
    else:
        model = load_model(checkpoint_path, device, weights=weights)
    override_eval(model, **overrides)
    return model, checkpoint_path


def _plan_jobs(run_or_checkpoint: Union[PathLike, Sequence[PathLike]],
               categories: Union[None, str, Sequence[Optional[str]]],
               output_dir: Optional[PathLike], ensemble: bool
               ) -> Tuple[List[Tuple[Any, Optional[str]]], Path]:
    """:func:`evaluate_run`'s arguments checked: ``(checkpoint or list of member checkpoints,
    category or None)`` per row of the table, and the output folder."""
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
    jobs = ([(checkpoint_paths, wanted[0])] if ensemble
            else list(zip(checkpoint_paths, wanted)))
    return jobs, Path(output_dir)


def _evaluate_checkpoint(model: LoadedModel, checkpoint_path: Path, category: str,
                         data_root: Optional[PathLike], device: torch.device, *, ensemble: bool,
                         batch_size: Optional[int], **options: Any) -> CategoryResult:
    """:func:`evaluate_category` for one row of :func:`evaluate_run`: the run's data root,
    held-out images, cached threshold and detector (not for an ensemble), and the checkpoint
    fields of the result."""
    run = RunDir.of_checkpoint(checkpoint_path)
    run_dir = run.path if run is not None else None
    root = resolve_eval_data_root(model, data_root, run_dir)
    holdout = holdout_image_paths(model, root, None if ensemble else run_dir)
    batch_size = batch_size or model.config.eval.batch_size
    calibrate_ensemble(model, holdout, batch_size=batch_size,
                       progress=options.get("progress", False))
    detector, detector_warning = run_detector(checkpoint_path, model, device)
    result = evaluate_category(
        model, root, category, batch_size=batch_size,
        holdout_paths=holdout, threshold_cache_for=checkpoint_path,
        detector=detector, **options)
    if detector_warning is not None:
        result.warnings.append(detector_warning)
    result.checkpoint = str(checkpoint_path)
    if ensemble:
        result.ensemble = list(model.members)
    result.checkpoint_step = model.step or 0
    return result


def _plot_iou_curve(result: CategoryResult, path: Path, files: List[Path],
                    messages: List[str]) -> None:
    """Plot IoU against the threshold into ``path`` (added to ``files``), or add the message
    that plotting was skipped (once)."""
    curve = result.iou_curve
    plot_path = save_iou_curve_plot(
        path, curve["thresholds"],
        {"pooled IoU": curve["iou_pooled"], "mean per-image IoU": curve["iou_mean_per_image"]},
        title=f"{result.category}: IoU vs threshold",
        marked_threshold=result.label_free_threshold)
    if plot_path is None:
        if PLOT_SKIPPED_MESSAGE not in messages:
            messages.append(PLOT_SKIPPED_MESSAGE)
    else:
        files.append(plot_path)
