"""The typed result of evaluating one category: :class:`CategoryResult`.

:func:`anoseg.evaluation.evaluate_category` builds it once from the metric pass
(:meth:`anoseg.metrics.SegmentationMetrics.compute`) and the label-free threshold;
:mod:`anoseg.reporting` reads it to write ``metrics.json`` / ``.csv`` / ``.md`` and the tables.
It imports nothing of the package.

For code written against the former plain dict, ``result["pixel_auroc"]``,
``result.get("image_auroc_detector")`` and ``"image_auroc_detector" in result`` still work: the
keys are those of :meth:`CategoryResult.to_dict` plus ``iou_curve``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import numpy as np

__all__ = ["CategoryResult"]


@dataclass(eq=False)
class CategoryResult:
    """The metrics of one model on the test set of one category (undefined metrics ``None``).

    Attributes:
        category, data_root, image_size: What was evaluated.
        pixel_auroc, image_auroc, aupro, fpr_limit, iou_pooled_best, ..._threshold,
        iou_mean_per_image_best, pixel_f1_max: The label-based metrics
            (``docs/metrics.md``); ``iou_pooled_best`` is the paper's Table 2 IoU.
        n_images, n_defective, n_pixels, n_defect_pixels, n_regions: Counts (``n_good`` is a
            property).
        score_min, score_max, score_range: The anomaly scores seen and the histogram range.
        label_free_threshold, threshold_quantile, n_holdout_images: The threshold chosen on
            held-out normal images (``None`` without any).
        label_free_iou, label_free_iou_mean_per_image, label_free_f1, label_free_precision,
        label_free_recall, label_free_fpr: Pixel metrics at that threshold.
        warnings: Why a metric is undefined, and other notes.
        iou_curve: numpy arrays ``thresholds``, ``iou_pooled``, ``iou_mean_per_image``.
        image_auroc_detector: Image AUROC of the downstream detector's score (eq. 5); only
            reported when ``detector_scored``.
        checkpoint, ensemble, checkpoint_step: Set by :func:`anoseg.evaluation.evaluate_run`.
        image_score: The name of the score behind ``image_auroc`` and the image threshold
            (``eval.image_score``).
        image_auroc_scores: Image AUROC of every cheap image score, by name.
        image_threshold, image_threshold_quantile: The label-free image threshold (that
            quantile of the held-out normal images' image scores; ``None`` without them).
        image_threshold_fpr, image_threshold_recall, n_good_flagged, n_defective_flagged: The
            good test images flagged (score above the image threshold) as a fraction and a
            count, and the same for the defective ones (``None`` when undefined).
        defect_types: Defect type -> the metrics on that type's test images plus every good
            test image (a :class:`CategoryResult` whose ``category`` is
            ``"<category>/<type>"``), from the same streaming pass; empty when not computed.
    """

    category: str
    data_root: str
    image_size: int
    pixel_auroc: Optional[float]
    image_auroc: Optional[float]
    aupro: Optional[float]
    fpr_limit: float
    iou_pooled_best: Optional[float]
    iou_pooled_best_threshold: Optional[float]
    iou_mean_per_image_best: Optional[float]
    iou_mean_per_image_best_threshold: Optional[float]
    pixel_f1_max: Optional[float]
    pixel_f1_max_threshold: Optional[float]
    n_images: int
    n_defective: int
    n_pixels: int
    n_defect_pixels: int
    n_regions: int
    score_min: float
    score_max: float
    score_range: List[float]
    label_free_threshold: Optional[float]
    threshold_quantile: float
    n_holdout_images: int
    label_free_iou: Optional[float] = None
    label_free_iou_mean_per_image: Optional[float] = None
    label_free_f1: Optional[float] = None
    label_free_precision: Optional[float] = None
    label_free_recall: Optional[float] = None
    label_free_fpr: Optional[float] = None
    warnings: List[str] = field(default_factory=list)
    iou_curve: Dict[str, np.ndarray] = field(default_factory=dict)
    detector_scored: bool = False
    image_auroc_detector: Optional[float] = None
    checkpoint: Optional[str] = None
    ensemble: Optional[List[str]] = None
    checkpoint_step: Optional[int] = None
    defect_types: Dict[str, "CategoryResult"] = field(default_factory=dict)
    image_score: str = "max"
    image_auroc_scores: Dict[str, Optional[float]] = field(default_factory=dict)
    image_threshold: Optional[float] = None
    image_threshold_quantile: Optional[float] = None
    image_threshold_fpr: Optional[float] = None
    image_threshold_recall: Optional[float] = None
    n_good_flagged: Optional[int] = None
    n_defective_flagged: Optional[int] = None

    @classmethod
    def from_metrics(cls, computed: Dict[str, Any], *, category: str, data_root: Any,
                     image_size: int, threshold: Optional[float], threshold_quantile: float,
                     n_holdout_images: int, warnings: List[str]) -> "CategoryResult":
        """From :meth:`SegmentationMetrics.compute(threshold=...)
        <anoseg.metrics.SegmentationMetrics.compute>`'s dict; ``warnings`` (the evaluation's
        own) come before the metric pass's."""
        at_threshold = computed.get("at_threshold") or {}
        score_range = computed["score_range"]
        return cls(
            category=category, data_root=str(data_root), image_size=image_size,
            **{name: computed[name] for name in _METRIC_PASS_FIELDS},
            score_range=[float(score_range[0]), float(score_range[1])],
            label_free_threshold=threshold, threshold_quantile=threshold_quantile,
            n_holdout_images=n_holdout_images,
            label_free_iou=at_threshold.get("iou_pooled"),
            label_free_iou_mean_per_image=at_threshold.get("iou_mean_per_image"),
            label_free_f1=at_threshold.get("f1"),
            label_free_precision=at_threshold.get("precision"),
            label_free_recall=at_threshold.get("recall"),
            label_free_fpr=at_threshold.get("fpr"),
            warnings=[*warnings, *computed["warnings"]],
            iou_curve=computed["iou_curve"])

    def set_image_rates(self, good_flagged: np.ndarray, defective_flagged: np.ndarray) -> None:
        """The image-threshold rates from the flags (score > image threshold) of the good and
        of the defective test images."""
        self.n_good_flagged = int(np.count_nonzero(good_flagged))
        self.n_defective_flagged = int(np.count_nonzero(defective_flagged))
        self.image_threshold_fpr = (self.n_good_flagged / good_flagged.size
                                    if good_flagged.size else None)
        self.image_threshold_recall = (self.n_defective_flagged / defective_flagged.size
                                       if defective_flagged.size else None)

    @property
    def n_good(self) -> int:
        """Test images without a defect."""
        return self.n_images - self.n_defective

    def to_dict(self) -> Dict[str, Any]:
        """The category's entry of ``metrics.json`` (no ``iou_curve``), keys in file order."""
        document: Dict[str, Any] = {name: getattr(self, name) for name in _JSON_FIELDS}
        if self.detector_scored:
            document["image_auroc_detector"] = self.image_auroc_detector
        for name in ("checkpoint", "ensemble", "checkpoint_step"):
            if getattr(self, name) is not None:
                document[name] = getattr(self, name)
        if self.defect_types:
            document["defect_types"] = {name: result.defect_type_dict()
                                        for name, result in self.defect_types.items()}
        return document

    def defect_type_dict(self) -> Dict[str, Any]:
        """A defect type's entry under ``defect_types`` in ``metrics.json``: its metrics and
        counts (what it shares with its category, such as the threshold, is left out)."""
        document: Dict[str, Any] = {name: getattr(self, name) for name in _TYPE_JSON_FIELDS}
        if self.detector_scored:
            document["image_auroc_detector"] = self.image_auroc_detector
        return document

    # -- read-only mapping access, as the former dict ------------------------------------------

    def keys(self) -> List[str]:
        """The keys of :meth:`to_dict` and ``iou_curve``."""
        names = list(self.to_dict())
        names.insert(names.index("warnings") + 1, "iou_curve")
        return names

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """``self[key]``, or ``default`` for a key the result does not have."""
        return self[key] if key in self.keys() else default


_METRIC_PASS_FIELDS = (
    "pixel_auroc", "image_auroc", "aupro", "fpr_limit", "iou_pooled_best",
    "iou_pooled_best_threshold", "iou_mean_per_image_best", "iou_mean_per_image_best_threshold",
    "pixel_f1_max", "pixel_f1_max_threshold", "n_images", "n_defective", "n_pixels",
    "n_defect_pixels", "n_regions", "score_min", "score_max")
"""Fields copied from the metric pass as they are, in ``metrics.json`` order."""

_IMAGE_FIELDS = (
    "image_score", "image_auroc_scores", "image_threshold", "image_threshold_quantile",
    "image_threshold_fpr", "image_threshold_recall", "n_good_flagged", "n_defective_flagged")
"""The image-level decision fields (``docs/evaluation.md``)."""

_JSON_FIELDS = (
    "category", "data_root", "image_size", *_METRIC_PASS_FIELDS, "score_range", "n_good",
    "label_free_threshold", "threshold_quantile", "n_holdout_images", "label_free_iou",
    "label_free_iou_mean_per_image", "label_free_f1", "label_free_precision",
    "label_free_recall", "label_free_fpr", *_IMAGE_FIELDS, "warnings")
"""Fields of every ``metrics.json`` entry, in file order (optional ones follow)."""

_TYPE_JSON_FIELDS = (
    "pixel_auroc", "image_auroc", "aupro", "iou_pooled_best", "iou_pooled_best_threshold",
    "iou_mean_per_image_best", "iou_mean_per_image_best_threshold", "pixel_f1_max",
    "pixel_f1_max_threshold", "label_free_iou", "label_free_iou_mean_per_image",
    "label_free_f1", "label_free_precision", "label_free_recall", "label_free_fpr", "n_images",
    "n_defective", "n_good", "n_pixels", "n_defect_pixels", "n_regions", *_IMAGE_FIELDS,
    "warnings")
"""Fields of a defect type's entry (``metrics.json`` ``defect_types``), in file order."""
