"""Every table: the evaluation's ``metrics.json`` / ``.csv`` / ``.md``, the paper's summary
tables over categories (Tables 1, 2, AUPRO / F1-max), the ablation tables (3 and 5) and the
real-data benchmark table. Values in, text out: nothing here runs a model.

Example:
    >>> print(markdown_table(["Category", "AUROC"], [["bottle", fmt(0.5)]]), end="")
    | Category | AUROC |
    |:---|---:|
    | bottle | 0.500 |
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from anoseg import paper_results as paper
from anoseg.atomic import atomic_write_text, write_json
from anoseg.config import MVTEC_CATEGORIES
from anoseg.results import CategoryResult
from anoseg.run_dir import METRICS_STEM

PathLike = Union[str, Path]

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
    "n_defective", "n_good", "n_pixels", "n_defect_pixels", "n_regions", "image_score",
    "image_threshold", "image_threshold_quantile", "image_threshold_fpr",
    "image_threshold_recall")
"""Columns of ``metrics.csv`` after ``category`` (fractions, not percentages)."""

DETECTOR_KEY = "image_auroc_detector"
DETECTOR_COLUMN = (DETECTOR_KEY, "Image AUROC (detector)")
"""Image AUROC of the downstream detector's score (paper eq. 5); in the tables only when a run
has a detector (``RUN_DIR/detector/last.pt``)."""

def metric_columns(results: Sequence[CategoryResult]) -> List[Tuple[str, str]]:
    """:data:`METRIC_COLUMNS`, with the detector's column where a result has its value."""
    columns = list(METRIC_COLUMNS)
    if any(r.image_auroc_detector is not None for r in results):
        columns.insert(2, DETECTOR_COLUMN)
    return columns


UNDEFINED = "n/a"
"""Cell of an undefined metric in the evaluation tables (the reason is listed under them)."""


def _percent(value: Optional[float]) -> str:
    return UNDEFINED if value is None else f"{100.0 * value:.1f}"


def format_markdown_table(results: Sequence[CategoryResult],
                          mean: Optional[Dict[str, Optional[float]]] = None) -> str:
    """A Markdown table like the paper's: a row per category (and ``mean``), metrics in %."""
    columns = metric_columns(results)
    headers = ["Category", *(title for _, title in columns), "Label-free thr."]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for result in results:
        threshold = result.label_free_threshold
        cells = [result.category, *(_percent(getattr(result, k)) for k, _ in columns),
                 UNDEFINED if threshold is None else f"{threshold:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
        for defect, part in result.defect_types.items():
            cells = [defect_type_label(result.category, defect),
                     *(_percent(getattr(part, k)) for k, _ in columns), ""]
            lines.append("| " + " | ".join(cells) + " |")
    if mean is not None:
        cells = ["**mean**", *(_percent(mean.get(k)) for k, _ in columns), ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_image_score_table(results: Sequence[CategoryResult]) -> str:
    """The image-level table: image AUROC of every cheap image score (and the detector's), the
    headline score's name, the label-free image threshold and, at it, the false-positive rate
    on the good test images and the recall on the defective ones (in %); a row per category
    and per defect type (whose FPR is the category's: the same good images)."""
    names: List[str] = []
    for result in results:
        names += [n for n in result.image_auroc_scores if n not in names]
    detector = any(r.image_auroc_detector is not None for r in results)
    headers = ["Category", *(f"AUROC {n}" for n in names), *(["AUROC detector"] * detector),
               "Image score", "Image thr.", "FPR good @ thr.", "Recall @ thr."]
    rows = []
    for result in results:
        parts = [(result.category, result)] + [
            (defect_type_label(result.category, d), r) for d, r in result.defect_types.items()]
        for label, part in parts:
            threshold = part.image_threshold
            rows.append([label, *(_percent(part.image_auroc_scores.get(n)) for n in names),
                         *([_percent(part.image_auroc_detector)] * detector),
                         part.image_score if part is result else "",
                         (UNDEFINED if threshold is None else f"{threshold:.4g}")
                         if part is result else "",
                         _percent(part.image_threshold_fpr) if part is result else "",
                         _percent(part.image_threshold_recall)])
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def defect_type_label(category: str, defect: str) -> str:
    """A defect type's row name in the tables: ``"<category> / <type>"``."""
    return f"{category} / {defect}"


DEFECT_TYPES_CSV = "metrics_defect_types.csv"
"""Per-defect-type rows (``category``, ``defect_type``, then :data:`CSV_KEYS`), beside
``metrics.csv`` (whose rows stay one per category plus the mean)."""


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


def write_metrics_files(output_dir: PathLike, results: Sequence[CategoryResult],
                        mean: Optional[Dict[str, Optional[float]]], notes: Sequence[str],
                        extra: Optional[Dict[str, Any]] = None) -> List[Path]:
    """Write ``metrics.json``, ``metrics.csv`` and ``metrics.md``; returns their paths."""
    output_dir = Path(output_dir)
    per_category = {r.category: r.to_dict() for r in results}
    document = {**(extra or {}), "categories": per_category, "mean": mean,
                "mean_notes": list(notes)}
    json_path, csv_path, md_path = (output_dir / f"{METRICS_STEM}.{ext}"
                                    for ext in ("json", "csv", "md"))
    write_json(json_path, document)

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    csv_keys = CSV_KEYS + ((DETECTOR_KEY,) if any(r.detector_scored for r in results) else ())
    writer.writerow(["category", *csv_keys])
    for result in results:
        writer.writerow([result.category, *(_csv_value(getattr(result, k)) for k in csv_keys)])
    if mean is not None:
        writer.writerow(["mean", *(_csv_value(mean.get(k)) for k in csv_keys)])
    atomic_write_text(csv_path, buffer.getvalue())
    written = [json_path, csv_path, md_path]
    if any(r.defect_types for r in results):
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["category", "defect_type", *csv_keys])
        for result in results:
            for defect, part in result.defect_types.items():
                writer.writerow([result.category, defect,
                                 *(_csv_value(getattr(part, k)) for k in csv_keys)])
        atomic_write_text(output_dir / DEFECT_TYPES_CSV, buffer.getvalue())
        written.append(output_dir / DEFECT_TYPES_CSV)

    quantile = results[0].threshold_quantile if results else None
    text = format_markdown_table(results, mean)
    text += ("\nValues in %. IoU = pooled IoU at the best threshold (the paper's Table 2); IoU per "
             "image = mean per-image IoU at the best common threshold; AUPRO up to FPR "
             f"{results[0].fpr_limit if results else 0.3}; \"@ label-free\" = at the "
             f"{quantile} quantile of held-out normal pixel scores. n/a = undefined (the "
             "reasons are listed below). A row \"category / type\" = that defect type's test "
             "images plus every good test image (the mean row averages categories only).\n")
    text += ("\nImage-level decisions (image scores on the anomaly logit map; \"Image AUROC\" "
             "above is the one named in \"Image score\"; the image threshold is the "
             f"{results[0].image_threshold_quantile if results else None} quantile of the "
             "held-out normal images' scores, an image above it is anomalous):\n\n")
    text += format_image_score_table(results)
    for note in notes:
        text += f"\n- {note}"
    for result in results:
        for warning in result.warnings:
            text += f"\n- {result.category}: {warning}"
        for defect, part in result.defect_types.items():
            for warning in part.warnings:
                if warning not in result.warnings:
                    text += f"\n- {defect_type_label(result.category, defect)}: {warning}"
    atomic_write_text(md_path, text.rstrip("\n") + "\n")
    return written


# ------------------------------------------------------------------------- summary tables

MISSING = "-"
"""Table cell for a value that does not exist (paper has none, run not done, undefined)."""


def mean_of(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the defined (not ``None``, finite) values, or ``None`` if there are none."""
    defined = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(defined) / len(defined) if defined else None


def fmt(value: Optional[float], digits: int = 3) -> str:
    """A fraction with ``digits`` decimals, or :data:`MISSING`."""
    return MISSING if value is None else f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV with a header line; ``None`` cells are written as :data:`MISSING`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow([MISSING if cell is None else cell for cell in row])
    return buffer.getvalue()


def paper_mean(table: Dict[str, float], published: float,
               categories: Sequence[str]) -> Tuple[Optional[float], str]:
    """The paper's number for a mean row over ``categories``.

    Returns:
        ``(value, kind)``: the published mean for exactly the 15 MVTec AD categories
        (``published``); the mean of the paper's per-category values when every category has
        one (``subset``); else ``(None, "none")``.
    """
    if set(categories) == set(MVTEC_CATEGORIES):
        return published, "published"
    values = [table.get(c) for c in categories]
    if categories and all(v is not None for v in values):
        return mean_of(values), "subset"
    return None, "none"


@dataclass
class Table:
    """One summary table: Markdown cells plus the same values as numbers for the CSV."""

    title: str
    headers: List[str]
    rows: List[List[str]]
    csv_headers: List[str]
    csv_rows: List[List[Any]]
    notes: List[str] = field(default_factory=list)

    def markdown(self) -> str:
        text = f"## {self.title}\n\n" + markdown_table(self.headers, self.rows)
        if self.notes:
            text += "\n" + "\n".join(f"- {note}" for note in self.notes) + "\n"
        return text


def _metric_rows(categories: Sequence[str], results: Dict[str, Dict[str, Any]],
                 columns: Sequence[Tuple[str, Optional[Dict[str, float]], int]],
                 paper_means: Sequence[Tuple[Optional[float], str]]
                 ) -> Tuple[List[List[str]], List[List[Any]]]:
    """Rows (Markdown, CSV) for ``columns`` = (result key or ``paper:<name>``, paper table,
    digits); a paper column takes its numbers from the table and its mean from ``paper_means``
    (in the order of the paper columns)."""
    md_rows: List[List[str]] = []
    csv_rows: List[List[Any]] = []
    for category in categories:
        md, raw = [category], [category]
        for key, table, digits in columns:
            value = table.get(category) if table is not None else results[category].get(key)
            md.append(fmt(value, digits))
            raw.append(value)
        md_rows.append(md)
        csv_rows.append(raw)
    md, raw = ["**Mean**"], ["mean"]
    paper_iter = iter(paper_means)
    for key, table, digits in columns:
        if table is not None:
            value, _ = next(paper_iter)
        else:
            value = mean_of(results[c].get(key) for c in categories)
        md.append(fmt(value, digits))
        raw.append(value)
    md_rows.append(md)
    csv_rows.append(raw)
    return md_rows, csv_rows


def _mean_notes(categories: Sequence[str], results: Dict[str, Dict[str, Any]],
                keys: Sequence[str], paper_kinds: Sequence[str]) -> List[str]:
    notes = []
    missing = [c for c in categories if results[c].get(keys[0]) is None]
    if missing:
        notes.append(f"Not evaluated or undefined ({MISSING}): {', '.join(missing)}; our means "
                     "average the categories that have a value.")
    if "published" in paper_kinds:
        notes.append("Paper means are the published mean rows (over all 15 MVTec AD "
                     "categories).")
    if "subset" in paper_kinds:
        notes.append("Paper means are the means of the paper's per-category numbers over the "
                     "categories listed here.")
    return notes


def build_tables(categories: Sequence[str], results: Dict[str, Dict[str, Any]]) -> List[Table]:
    """Table 1 (AUROC), Table 2 (IoU) and AUPRO / F1-max, with the paper's numbers beside ours.

    Our image AUROC is the maximum of the anomaly map; the paper's (Table 4) is that of its
    image-level detector, which is in our ``Image AUROC (detector)`` column when the runs have
    one.
    """
    has_detector = any("image_auroc_detector" in results[c] for c in categories)
    pixel_mean = paper_mean(paper.PIXEL_AUROC, paper.PIXEL_AUROC_MEAN, categories)
    image_mean = paper_mean(paper.IMAGE_AUROC, paper.IMAGE_AUROC_MEAN, categories)
    columns: List[Tuple[str, Optional[Dict[str, float]], int]] = [
        ("pixel_auroc", None, 3), ("paper_pixel_auroc", paper.PIXEL_AUROC, 2),
        ("image_auroc", None, 3)]
    headers = ["Category", "Pixel AUROC", "Paper pixel AUROC (Table 1)",
               "Image AUROC (map max)"]
    csv_headers = ["category", "pixel_auroc", "paper_pixel_auroc", "image_auroc"]
    if has_detector:
        columns.append(("image_auroc_detector", None, 3))
        headers.append("Image AUROC (detector)")
        csv_headers.append("image_auroc_detector")
    columns.append(("paper_image_auroc", paper.IMAGE_AUROC, 2))
    headers.append("Paper image AUROC (Table 4)")
    csv_headers.append("paper_image_auroc")
    md_rows, csv_rows = _metric_rows(categories, results, columns, [pixel_mean, image_mean])
    notes = _mean_notes(categories, results, ["pixel_auroc"], [pixel_mean[1], image_mean[1]])
    notes.append("Our image AUROC (map max) scores an image by the maximum of its anomaly map; "
                 "the paper's image AUROC is that of its anomaly detector (section 3.4)"
                 + (", our `Image AUROC (detector)` column." if has_detector
                    else "; run with --detector to train and score ours."))
    table1 = Table("Table 1: pixel-level and image-level AUROC", headers, md_rows,
                   csv_headers, csv_rows, notes)

    iou_mean = ((paper.IOU_MEAN, "published") if set(categories) == set(MVTEC_CATEGORIES)
                else (None, "none"))
    columns = [("iou_pooled_best", None, 3), ("paper_iou", {}, 3),
               ("label_free_iou", None, 3), ("iou_mean_per_image_best", None, 3)]
    md_rows, csv_rows = _metric_rows(categories, results, columns, [iou_mean])
    notes = _mean_notes(categories, results, ["iou_pooled_best"], [iou_mean[1]])
    notes.append("IoU: all test pixels pooled, at the threshold that maximises it (the paper's "
                 "definition); the paper gives only the mean (0.542, Table 2). IoU @ label-free: "
                 "at the threshold chosen on held-out normal images. IoU per image: mean over "
                 "defective images at the best common threshold.")
    table2 = Table("Table 2: IoU", ["Category", "IoU", "Paper IoU (Table 2)",
                                    "IoU @ label-free", "IoU per image"], md_rows,
                   ["category", "iou", "paper_iou", "label_free_iou", "iou_per_image"],
                   csv_rows, notes)

    columns = [("aupro", None, 3), ("pixel_f1_max", None, 3)]
    md_rows, csv_rows = _metric_rows(categories, results, columns, [])
    notes = _mean_notes(categories, results, ["aupro"], [])
    notes.append("The paper reports neither AUPRO (FPR <= 0.3) nor pixel F1-max.")
    table3 = Table("AUPRO and F1-max", ["Category", "AUPRO", "F1-max"], md_rows,
                   ["category", "aupro", "pixel_f1_max"], csv_rows, notes)
    return [table1, table2, table3]


# ------------------------------------------------------------------------ ablation tables

def _pair(auroc: Optional[float], iou: Optional[float]) -> str:
    return f"{fmt(auroc)} / {fmt(iou)}"


def _ablation_missing_notes(values: Dict[str, Dict[str, Mapping[str, Any]]],
                            key: str) -> List[str]:
    missing = [f"{name}/{category}" for name, by_category in values.items()
               for category, result in by_category.items() if result.get(key) is None]
    if not missing:
        return []
    return [f"Not done or undefined ({MISSING}): {', '.join(missing)}; means average the "
            "categories that have a value."]


def table3(categories: Sequence[str], values: Dict[str, Dict[str, Mapping[str, Any]]],
           titles: Dict[str, str]) -> Table:
    """Table 3: a column per configuration, cells ``pixel AUROC / IoU``, mean and paper rows.

    Args:
        categories: The rows.
        values: Configuration name -> category -> its metrics (empty where not evaluated).
        titles: Configuration name -> column header, in the paper's column order.
    """
    md_rows: List[List[str]] = []
    csv_rows: List[List[Any]] = []
    for category in categories:
        md, raw = [category], [category]
        for name in titles:
            result = values[name][category]
            auroc, iou = result.get("pixel_auroc"), result.get("iou_pooled_best")
            md.append(_pair(auroc, iou))
            raw += [auroc, iou]
        md_rows.append(md)
        csv_rows.append(raw)
    md, raw = ["**Mean**"], ["mean"]
    paper_md, paper_raw = ["Paper (mean)"], ["paper_mean"]
    for name in titles:
        auroc = mean_of(values[name][c].get("pixel_auroc") for c in categories)
        iou = mean_of(values[name][c].get("iou_pooled_best") for c in categories)
        md.append(_pair(auroc, iou))
        raw += [auroc, iou]
        paper_auroc, paper_iou = paper.TABLE3_MEANS[name]
        paper_md.append(_pair(paper_auroc, paper_iou))
        paper_raw += [paper_auroc, paper_iou]
    md_rows += [md, paper_md]
    csv_rows += [raw, paper_raw]
    notes = _ablation_missing_notes({name: values[name] for name in titles}, "pixel_auroc")
    notes.append("Cells: pixel AUROC / IoU (all test pixels pooled, best threshold). The paper "
                 "row is its Table 3 mean over the 15 MVTec AD categories.")
    csv_headers = ["category"] + [f"{name}_{m}" for name in titles for m in ("pixel_auroc", "iou")]
    return Table("Table 3: segmentation ablation (pixel AUROC / IoU)",
                 ["Category", *titles.values()], md_rows, csv_headers, csv_rows, notes)


def table5(categories: Sequence[str], values: Dict[str, Dict[str, Optional[float]]],
           titles: Dict[str, str], segmenter: str) -> Table:
    """Table 5: a column per detector configuration, cells image AUROC, mean and paper rows.

    Args:
        categories: The rows.
        values: Detector name -> category -> its image AUROC (``None`` where not scored).
        titles: Detector name -> column header, in the paper's column order.
        segmenter: The configuration the detectors were trained on (named in a note).
    """
    md_rows: List[List[str]] = []
    csv_rows: List[List[Any]] = []
    for category in categories:
        cells = [values[name][category] for name in titles]
        md_rows.append([category, *(fmt(v) for v in cells)])
        csv_rows.append([category, *cells])
    means = [mean_of(values[name][c] for c in categories) for name in titles]
    papers = [paper.TABLE5_MEANS[name] for name in titles]
    md_rows += [["**Mean**", *(fmt(v) for v in means)],
                ["Paper (mean)", *(fmt(v) for v in papers)]]
    csv_rows += [["mean", *means], ["paper_mean", *papers]]
    notes = _ablation_missing_notes(
        {name: {c: {"image_auroc": v} for c, v in by_category.items()}
         for name, by_category in values.items()}, "image_auroc")
    notes.append(f"Image AUROC of each detector's score (eq. 5), all trained on the full "
                 f"segmenter ({segmenter}). The paper row is its Table 5 mean over "
                 "the 15 MVTec AD categories.")
    return Table("Table 5: detection ablation (image AUROC)", ["Category", *titles.values()],
                 md_rows, ["category", *titles], csv_rows, notes)


def ablation_markdown(output_dir: PathLike, categories: Sequence[str],
                      tables: Sequence[Table]) -> str:
    """``ablations.md``: a title line and the tables."""
    return (f"# AnoSeg ablations on {len(categories)} categories\n\nRuns in "
            f"`{output_dir}/<configuration>/<category>`; values are fractions.\n\n"
            + "\n".join(table.markdown() for table in tables))


# ------------------------------------------------------------------ real-data benchmark table

BENCHMARK_COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("pixel_auroc", "pixel AUROC"), ("image_auroc", "image AUROC"), ("aupro", "AUPRO@0.3"),
    ("iou_pooled_best", "best IoU"), ("pixel_f1_max", "F1-max"))
"""(key, header) of the metrics in ``scripts/real_data_benchmark.py``'s table."""

BENCHMARK_GOAL_METRICS = ("pixel_auroc", "aupro", "iou_pooled_best")
"""The metrics whose margin over the better peer the benchmark table gives."""


def _benchmark_cells(values: Mapping[str, Any]) -> str:
    return " | ".join(fmt(values.get(k)) for k, _ in BENCHMARK_COLUMNS)


def _benchmark_rows(category: str, seeds: Sequence[int], runs: Sequence[Mapping[str, Any]],
                    ensemble: Optional[Mapping[str, Any]],
                    peers: Dict[str, Dict[str, Dict[str, float]]]) -> List[str]:
    """The rows of one data set: a row per seed, their mean, the ensemble, the peers, and the
    margin of the mean (or the ensemble) over the better peer."""
    lines = [f"| {category} | anoseg seed {seed} | " + _benchmark_cells(r)
             + f" | {r['steps']} | {r['train_seconds']:.0f} |" for seed, r in zip(seeds, runs)]
    mean = {k: (sum(r[k] for r in runs) / len(runs)
                if all(r.get(k) is not None for r in runs) else None)
            for k, _ in BENCHMARK_COLUMNS}
    bold = "" if ensemble is not None else "**"
    if len(runs) > 1:
        lines.append(f"| {category} | {bold}anoseg mean of {len(runs)}{bold} | "
                     + _benchmark_cells(mean) + " | | |")
    headline = mean  # what the margin row measures: the mean, or the ensemble
    if ensemble is not None:
        lines.append(f"| {category} | **anoseg ensemble of {len(runs)}** | "
                     + _benchmark_cells(ensemble)
                     + f" | {ensemble['steps']} | {ensemble['train_seconds']:.0f} |")
        headline = {k: ensemble.get(k) for k, _ in BENCHMARK_COLUMNS}
    found = [numbers[category] for numbers in peers.values() if category in numbers]
    lines += [f"| {category} | {peer} | " + _benchmark_cells(numbers[category]) + " | | |"
              for peer, numbers in peers.items() if category in numbers]
    if found:
        margins = [f"{headline[k] - max(p[k] for p in found):+.3f}"
                   if k in BENCHMARK_GOAL_METRICS and headline[k] is not None else ""
                   for k, _ in BENCHMARK_COLUMNS]
        which = (" ensemble" if ensemble is not None else " mean" if len(runs) > 1 else "")
        lines.append(f"| {category} | margin of anoseg{which} "
                     "over the better peer | " + " | ".join(margins) + " | | |")
    return lines


def benchmark_table(ours: Dict[str, Sequence[Mapping[str, Any]]],
                    ensembles: Dict[str, Mapping[str, Any]],
                    peers: Dict[str, Dict[str, Dict[str, float]]], *, seeds: Sequence[int],
                    budget: float, member_budget: float, config: str,
                    overrides: Sequence[str]) -> str:
    """``scripts/real_data_benchmark.py``'s Markdown table, next to the peers' numbers.

    Args:
        ours: Data set -> a result per seed (metrics plus ``steps`` and ``train_seconds``).
        ensembles: Data set -> the ensemble of its seeds' result (empty: no ensemble).
        peers: Method -> data set -> metrics.
        seeds, budget, member_budget, config, overrides: For the title line.
    """
    lines = [f"Training budget {budget:.0f} s per set, config `{config}`"
             + (f", overrides {list(overrides)}" if overrides else "")
             + f", seeds {list(seeds)}"
             + (f" as one ensemble ({member_budget:.0f} s each)" if ensembles else "")
             + ".", "",
             "| set | method | " + " | ".join(n for _, n in BENCHMARK_COLUMNS)
             + " | steps | train s |",
             "|---|---|" + "---|" * (len(BENCHMARK_COLUMNS) + 2)]
    for category, runs in ours.items():
        lines += _benchmark_rows(category, seeds, runs, ensembles.get(category), peers)
    return "\n".join(lines) + "\n"


def suite_table(results: Dict[str, Dict], keys: Sequence[str]) -> str:
    """The development suite's Markdown table: per set and defect type, the model and the
    per-pixel Gaussian floor (:mod:`anoseg.dev_suite`)."""
    lines = ["| set | type | method | pixel AUROC | AUPRO | best IoU | image AUROC |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, result in results.items():
        spread = result.get("model_std")
        seeds = len(result.get("per_seed", {}))
        for kind in result["model"]:
            for method in ("model", "floor"):
                row = result[method].get(kind, {})
                label = "anoseg" if method == "model" else "Gaussian"
                cells = [fmt(row.get(k)) for k in keys]
                if method == "model" and spread is not None:
                    label = f"anoseg, mean of {seeds} seeds"
                    cells = [c if spread[kind].get(k) is None else f"{c} ± {fmt(spread[kind][k])}"
                             for c, k in zip(cells, keys)]
                lines.append(f"| {name} | {kind} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
