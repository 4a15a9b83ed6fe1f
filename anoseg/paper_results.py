"""Numbers published in the AnoSeg paper (Song et al.), for comparison with our reproductions.

Every value is a fraction in [0, 1], typed from the paper's tables for the "Proposed" method:

* Table 1 (anomaly segmentation, pixel-level AUROC) per MVTec AD category and its mean row;
* Table 4 (appendix A.3, anomaly detection, image-level AUROC of the anomaly detector of
  section 3.4) per category and its mean row (the same 0.96 as Table 1's detection row);
* Table 2 (mean IoU over the categories; the paper gives no per-category IoU);
* Table 3 (segmentation ablation, mean pixel AUROC / mean IoU) and Table 5 (detection
  ablation, mean image AUROC).

The paper rounds per-category values to two decimals, so the mean of the per-category numbers
differs from the printed mean in the third decimal (0.969 vs 0.97 for Table 1).

Example:
    >>> from anoseg.paper_results import PIXEL_AUROC, IOU_MEAN
    >>> PIXEL_AUROC["bottle"], IOU_MEAN
    (0.99, 0.542)
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

PIXEL_AUROC: Dict[str, float] = {
    "bottle": 0.99,
    "cable": 0.99,
    "capsule": 0.90,
    "carpet": 0.99,
    "grid": 0.99,
    "hazelnut": 0.99,
    "leather": 0.98,
    "metal_nut": 0.99,
    "pill": 0.94,
    "screw": 0.91,
    "tile": 0.98,
    "toothbrush": 0.96,
    "transistor": 0.96,
    "wood": 0.98,
    "zipper": 0.98,
}
"""Table 1, "Proposed" column: pixel-level AUROC of the anomaly map per category."""

PIXEL_AUROC_MEAN: float = 0.97
"""Table 1, mean row of the segmentation part."""

IMAGE_AUROC: Dict[str, float] = {
    "bottle": 0.98,
    "cable": 0.98,
    "capsule": 0.84,
    "carpet": 0.96,
    "grid": 0.99,
    "hazelnut": 0.98,
    "leather": 0.99,
    "metal_nut": 0.95,
    "pill": 0.87,
    "screw": 0.97,
    "tile": 0.98,
    "toothbrush": 0.99,
    "transistor": 0.96,
    "wood": 0.99,
    "zipper": 0.99,
}
"""Table 4, "Proposed" column: image-level AUROC of the anomaly detector per category."""

IMAGE_AUROC_MEAN: float = 0.96
"""Table 4 mean row (also Table 1's "Anomaly Detection" mean)."""

IOU_MEAN: float = 0.542
"""Table 2: mean IoU over the 15 categories, at the threshold that maximises IoU."""

TABLE3_MEANS: Dict[str, Tuple[float, float]] = {
    "cutpaste_only": (0.923, 0.492),
    "hard_aug": (0.942, 0.503),
    "adversarial": (0.951, 0.527),
    "coord": (0.970, 0.542),
}
"""Table 3 mean row, ``(pixel AUROC, IoU)`` per configuration: base model (CutPaste only),
+ hard augmentation, + adversarial learning (with masked reconstruction), + coordinate channels
(the full AnoSeg)."""

TABLE5_MEANS: Dict[str, float] = {
    "base": 0.812,
    "feature_matching": 0.842,
    "anomaly_map": 0.943,
    "full": 0.961,
}
"""Table 5 mean row, image AUROC per detector configuration: base model, + feature matching
loss, + input anomaly map, + anomaly classification loss (the full detector)."""


def paper_value(table: Dict[str, float], category: str) -> Optional[float]:
    """The paper's number for ``category`` in ``table``, or ``None`` if the paper has none."""
    return table.get(category)
