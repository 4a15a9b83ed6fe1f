"""The galleries of ``report.html``: which test images to show, chosen during the evaluation's
single pass, and their pictures.

:class:`GalleryCollector` keeps a few numbers per test image while the pass streams (no map is
kept), then picks the worst-missed defects (lowest mean anomaly score inside the ground-truth
mask), the strongest false alarms (good images with the highest image score) and a seeded
random sample, has the model score those few images once more (the evaluation hands it a
scorer, :meth:`GalleryCollector.finish`) and draws each as input | map
over the input | ground truth (:func:`anoseg.visualize.report_strip`).

Example:
    >>> collector = GalleryCollector(size=6)         # doctest: +SKIP
    >>> evaluate_category(model, root, "bottle", batch_size=16, gallery=collector)  # doctest: +SKIP
    >>> collector.galleries["missed"]                 # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from anoseg.html_report import GalleryItem
from anoseg.visualize import report_strip

DEFAULT_GALLERY_SIZE = 6
"""Pictures per gallery."""

Scorer = Callable[[Sequence[int]], Tuple[Sequence[torch.Tensor], Sequence[torch.Tensor],
                                         Sequence[torch.Tensor]]]
"""Test-set indices -> per image its map, its mask and the image at the map's size (padding
cut off), as the test pass scored them."""


class GalleryCollector:
    """Per-test-image numbers during the pass, then the galleries (:attr:`galleries`, keyed as
    :data:`anoseg.html_report.GALLERIES`, and :attr:`notes` for an empty one)."""

    def __init__(self, size: int = DEFAULT_GALLERY_SIZE, seed: int = 0) -> None:
        self.size, self.seed = size, seed
        self.records: List[Dict[str, Any]] = []
        self.galleries: Dict[str, List[GalleryItem]] = {}
        self.notes: Dict[str, str] = {}

    def update(self, batch: Dict[str, Any], maps: Sequence[torch.Tensor],
               masks: Sequence[torch.Tensor], scores: np.ndarray,
               threshold: Optional[float]) -> None:
        """Record one test batch: per image its map and mask ``(H, W)`` (sizes may differ) and
        its headline image score."""
        for offset in range(len(maps)):
            inside = maps[offset][masks[offset] > 0.5]
            self.records.append({
                "index": len(self.records), "path": batch["path"][offset],
                "defect": batch["defect_type"][offset], "label": int(batch["label"][offset]),
                "score": float(scores[offset]),
                "inside_mean": float(inside.mean()) if inside.numel() else None,
                "found": (float((inside >= threshold).float().mean())
                          if inside.numel() and threshold is not None else None)})

    def choose(self) -> Dict[str, List[Dict[str, Any]]]:
        """The records of each gallery (and :attr:`notes` for the empty ones)."""
        defective = [r for r in self.records if r["inside_mean"] is not None]
        good = [r for r in self.records if r["label"] == 0]
        order = np.random.default_rng(self.seed).permutation(len(self.records))
        chosen = {"missed": sorted(defective, key=lambda r: (r["inside_mean"], r["score"])),
                  "false-alarms": sorted(good, key=lambda r: -r["score"]),
                  "random": [self.records[i] for i in sorted(order[:self.size].tolist())]}
        if not defective:
            self.notes["missed"] = "No defective test image with a ground-truth mask."
        if not good:
            self.notes["false-alarms"] = "No good test images."
        return {key: records[:self.size] for key, records in chosen.items()}

    def finish(self, image_threshold: Optional[float], score: Scorer) -> None:
        """Pick the images and draw them (``score`` runs the model once more on those alone)."""
        chosen = self.choose()
        wanted = sorted({r["index"] for records in chosen.values() for r in records})
        if not wanted:
            return
        maps, masks, images = score(wanted)
        by_index = {i: (image, m, mask) for i, image, m, mask in zip(wanted, images, maps, masks)}
        for key, records in chosen.items():
            items = []
            for r in records:
                image, anomaly_map, mask = by_index[r["index"]]
                items.append(GalleryItem(
                    report_strip(image, anomaly_map, mask if r["label"] else None),
                    f"{r['defect']} / {Path(r['path']).name}", _details(r, image_threshold)))
            self.galleries[key] = items


def _details(record: Dict[str, Any], image_threshold: Optional[float]) -> str:
    """A gallery caption: the image score against the image threshold and, for a defect, how
    much of it the map finds."""
    text = f"image score {record['score']:.4g}"
    if image_threshold is not None:
        verdict = "fails" if record["score"] > image_threshold else "passes"
        text += f" ({verdict}: threshold {image_threshold:.4g})"
    if record["inside_mean"] is not None:
        text += f"; mean map in the defect {record['inside_mean']:.3f}"
    if record["found"] is not None:
        text += f"; {100 * record['found']:.0f} % of its pixels at or above the pixel threshold"
    return text

