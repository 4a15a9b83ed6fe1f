"""``report.html``: one self-contained page per evaluation (``anoseg-eval --report``).

Values in, HTML out: nothing here runs a model. The page needs no network: pictures are
embedded as base64 PNG, the IoU-vs-threshold curve is inline SVG drawn here, the style sheet is
inline, and it holds no script. Per category: the metric table with a row per defect type, the
image-level table, the label-free thresholds (pixel and image) and the metrics at them, the
IoU-vs-threshold curve, and galleries (worst-missed defects, strongest false alarms on normal
images, a random sample) built by :mod:`anoseg.galleries`.

Example:
    >>> html = render_report([CategoryReport(result)], title="bottle")   # doctest: +SKIP
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from anoseg.atomic import atomic_write_text
from anoseg.reporting import (UNDEFINED, defect_type_label, format_image_score_table,
                              metric_columns)
from anoseg.results import CategoryResult
from anoseg.visualize import png_bytes

PathLike = Union[str, Path]

REPORT_FILE = "report.html"
GALLERIES: Tuple[Tuple[str, str, str], ...] = (
    ("missed", "Worst-missed defects",
     "Defective test images whose defect the map covers least: lowest mean anomaly score "
     "inside the ground-truth mask."),
    ("false-alarms", "Strongest false alarms on normal images",
     "Good test images with the highest image score."),
    ("random", "Random sample", "Test images drawn at random (seed 0)."),
)
"""(key, title, what it shows) of each gallery, in page order."""

CURVE_POINTS = 400
"""Points per curve in the SVG (the 10,000 thresholds are thinned, the best one kept)."""

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
h3{margin-top:1.4em}table{border-collapse:collapse;font-size:.9em;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
tr.defect td{color:#555;font-size:.95em}tr.defect td:first-child{padding-left:20px}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #ddd;padding:6px;background:#fafafa;width:min-content}
figure img{display:block;max-width:none}
figcaption{font-size:.8em;margin-top:4px}
.note{color:#666;font-size:.9em}.warn{color:#a40}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:.9em}
dt{font-weight:600}dd{margin:0}
"""


@dataclass
class GalleryItem:
    """One picture of a gallery: ``picture`` (H, W, 3) uint8, a title and a detail line."""

    picture: np.ndarray
    title: str
    details: str = ""


@dataclass
class CategoryReport:
    """A category's result and its galleries (gallery key of :data:`GALLERIES` -> items)."""

    result: CategoryResult
    galleries: Dict[str, List[GalleryItem]] = field(default_factory=dict)
    gallery_notes: Dict[str, str] = field(default_factory=dict)
    """Why a gallery is empty (e.g. no good test images)."""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _pct(value: Optional[float]) -> str:
    return UNDEFINED if value is None else f"{100.0 * value:.1f}"


def _num(value: Optional[float], digits: int = 4) -> str:
    return UNDEFINED if value is None else f"{value:.{digits}g}"


def data_uri(picture: np.ndarray) -> str:
    """A ``data:image/png;base64,...`` URI of a uint8 picture."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode("ascii")


def _table(headers: Sequence[str], rows: Sequence[Tuple[str, Sequence[str]]]) -> str:
    """An HTML table; each row is ``(css class, cells)``."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(f"<tr class=\"{cls}\">" + "".join(f"<td>{_e(c)}</td>" for c in cells)
                   + "</tr>" for cls, cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def metric_table(results: Sequence[CategoryResult],
                 mean: Optional[Dict[str, Optional[float]]] = None) -> str:
    """The evaluation's metric table (values in %): a row per category, under it a row per
    defect type, and the mean row."""
    columns = metric_columns(results)
    headers = ["Category", *(title for _, title in columns), "Label-free thr."]
    rows: List[Tuple[str, Sequence[str]]] = []
    for result in results:
        rows.append(("category", [result.category,
                                  *(_pct(getattr(result, k)) for k, _ in columns),
                                  _num(result.label_free_threshold)]))
        for defect, part in result.defect_types.items():
            rows.append(("defect", [defect_type_label(result.category, defect),
                                    *(_pct(getattr(part, k)) for k, _ in columns), ""]))
    if mean is not None:
        rows.append(("mean", ["mean", *(_pct(mean.get(k)) for k, _ in columns), ""]))
    return _table(headers, rows)


def image_table(result: CategoryResult) -> str:
    """:func:`anoseg.reporting.format_image_score_table` as HTML."""
    lines = format_image_score_table([result]).strip().splitlines()
    split = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    rows = [("category" if i == 0 else "defect", cells) for i, cells in enumerate(split[2:])]
    return _table(split[0], rows)


def thresholds_section(result: CategoryResult) -> str:
    """The label-free thresholds, how they were chosen, and the metrics at them."""
    if result.label_free_threshold is None:
        pixel = "<p class=\"warn\">No held-out normal images: no label-free pixel threshold.</p>"
    else:
        pixel = (f"<dl><dt>pixel threshold</dt><dd>{_num(result.label_free_threshold)} (the "
                 f"{result.threshold_quantile} quantile of the anomaly map on "
                 f"{result.n_holdout_images} held-out normal images; a pixel at or above it "
                 "is a defect)</dd>"
                 f"<dt>IoU / per image</dt><dd>{_pct(result.label_free_iou)} / "
                 f"{_pct(result.label_free_iou_mean_per_image)} %</dd>"
                 f"<dt>F1, precision, recall</dt><dd>{_pct(result.label_free_f1)}, "
                 f"{_pct(result.label_free_precision)}, {_pct(result.label_free_recall)} %</dd>"
                 f"<dt>false-positive rate</dt><dd>{_pct(result.label_free_fpr)} % of normal "
                 "pixels</dd></dl>")
    if result.image_threshold is None:
        image = "<p class=\"warn\">No label-free image threshold.</p>"
    else:
        image = (f"<dl><dt>image threshold</dt><dd>{_num(result.image_threshold)} ("
                 f"{_e(result.image_score)} score; the {result.image_threshold_quantile} "
                 "quantile of the held-out normal images' scores; an image above it "
                 "fails)</dd>"
                 f"<dt>good images flagged</dt><dd>{result.n_good_flagged} of {result.n_good} "
                 f"({_pct(result.image_threshold_fpr)} %)</dd>"
                 f"<dt>defective images flagged</dt><dd>{result.n_defective_flagged} of "
                 f"{result.n_defective} ({_pct(result.image_threshold_recall)} %)</dd></dl>")
    return f"<h4>Pixel</h4>{pixel}<h4>Image</h4>{image}"


def _polylines(xs: np.ndarray, ys: np.ndarray, to_svg, colour: str) -> str:
    """``<polyline>`` pieces of a curve, split at undefined (NaN) values."""
    pieces, current = [], []
    for x, y in zip(xs, ys):
        if math.isfinite(y):
            current.append("%.1f,%.1f" % to_svg(x, y))
        elif current:
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    return "".join(f"<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.6\" "
                   f"points=\"{' '.join(p)}\"/>" for p in pieces)


def iou_curve_svg(result: CategoryResult, width: int = 640, height: int = 320) -> str:
    """Inline SVG of IoU (pooled and mean per image) against the threshold (paper Fig. 6b),
    dashed lines at the best and the label-free thresholds."""
    curve = result.iou_curve
    if not curve or len(curve.get("thresholds", ())) == 0:
        return "<p class=\"note\">No IoU curve (no defective test images).</p>"
    xs = np.asarray(curve["thresholds"], dtype=float)
    pooled = np.asarray(curve["iou_pooled"], dtype=float)
    per_image = np.asarray(curve["iou_mean_per_image"], dtype=float)
    keep = np.unique(np.concatenate([np.linspace(0, len(xs) - 1, CURVE_POINTS).astype(int),
                                     np.flatnonzero(pooled == np.nanmax(pooled))
                                     if np.isfinite(pooled).any() else []]).astype(int))
    left, right, top, bottom = 48, 16, 12, 36
    plot_w, plot_h = width - left - right, height - top - bottom

    def to_svg(x: float, y: float) -> Tuple[float, float]:
        return left + plot_w * min(max(x, 0.0), 1.0), top + plot_h * (1.0 - min(max(y, 0), 1))

    parts = [f"<svg width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" "
             "role=\"img\" aria-label=\"IoU against the threshold\" "
             "style=\"font:11px sans-serif;background:#fff\">",
             f"<rect x=\"{left}\" y=\"{top}\" width=\"{plot_w}\" height=\"{plot_h}\" "
             "fill=\"none\" stroke=\"#999\"/>"]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        x, y = to_svg(tick, tick)
        parts.append(f"<line x1=\"{left}\" x2=\"{left + plot_w}\" y1=\"{y:.1f}\" y2=\"{y:.1f}\" "
                     "stroke=\"#eee\"/>"
                     f"<text x=\"{left - 6}\" y=\"{y + 4:.1f}\" text-anchor=\"end\">{tick:g}</text>"
                     f"<text x=\"{x:.1f}\" y=\"{top + plot_h + 14}\" text-anchor=\"middle\">"
                     f"{tick:g}</text>")
    parts.append(f"<text x=\"{left + plot_w / 2}\" y=\"{height - 4}\" text-anchor=\"middle\">"
                 "threshold on the anomaly map</text>"
                 f"<text x=\"12\" y=\"{top + plot_h / 2}\" text-anchor=\"middle\" "
                 f"transform=\"rotate(-90 12 {top + plot_h / 2})\">IoU</text>")
    parts.append(_polylines(xs[keep], pooled[keep], to_svg, "#1f5fbf"))
    parts.append(_polylines(xs[keep], per_image[keep], to_svg, "#e07b00"))
    legend = [("#1f5fbf", "pooled IoU", None), ("#e07b00", "mean per-image IoU", None)]
    for value, colour, label in ((result.iou_pooled_best_threshold, "#1f5fbf", "best"),
                                 (result.label_free_threshold, "#2a8a2a", "label-free")):
        if value is not None:
            x, _ = to_svg(value, 0)
            parts.append(f"<line x1=\"{x:.1f}\" x2=\"{x:.1f}\" y1=\"{top}\" "
                         f"y2=\"{top + plot_h}\" stroke=\"{colour}\" stroke-dasharray=\"4 3\"/>")
            legend.append((colour, f"{label} threshold {value:.4g}", "dash"))
    for row, (colour, text, dash) in enumerate(legend):
        y = top + 14 + 14 * row
        style = " stroke-dasharray=\"4 3\"" if dash else ""
        parts.append(f"<line x1=\"{left + 10}\" x2=\"{left + 30}\" y1=\"{y - 4}\" "
                     f"y2=\"{y - 4}\" stroke=\"{colour}\" stroke-width=\"2\"{style}/>"
                     f"<text x=\"{left + 36}\" y=\"{y}\">{_e(text)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def gallery_html(items: Sequence[GalleryItem], note: Optional[str]) -> str:
    if not items:
        return f"<p class=\"note\">{_e(note or 'No images.')}</p>"
    figures = "".join(
        f"<figure><img src=\"{data_uri(item.picture)}\" alt=\"{_e(item.title)}\" "
        f"width=\"{item.picture.shape[1]}\" height=\"{item.picture.shape[0]}\">"
        f"<figcaption><b>{_e(item.title)}</b><br>{_e(item.details)}</figcaption></figure>"
        for item in items)
    return f"<div class=\"gallery\">{figures}</div>"


def category_section(report: CategoryReport) -> str:
    """One category's part of the page."""
    result = report.result
    anchor = _e(result.category)
    source = (f"ensemble of {len(result.ensemble)}: " + ", ".join(result.ensemble)
              if result.ensemble else str(result.checkpoint or ""))
    parts = [f"<h2 id=\"{anchor}\">{_e(result.category)}</h2>",
             f"<p class=\"note\">{_e(source)} (step {result.checkpoint_step}); "
             f"{result.n_images} test images ({result.n_defective} defective), "
             f"{result.image_size}x{result.image_size}</p>",
             "<section data-section=\"metrics\"><h3>Metrics (%)</h3>",
             metric_table([result]), "<h4>Image-level decisions</h4>", image_table(result),
             "</section>",
             "<section data-section=\"thresholds\"><h3>Label-free thresholds</h3>",
             thresholds_section(result), "</section>",
             "<section data-section=\"iou-curve\"><h3>IoU against the threshold</h3>",
             iou_curve_svg(result), "</section>"]
    for key, title, what in GALLERIES:
        parts.append(f"<section data-section=\"{key}\"><h3>{_e(title)}</h3>"
                     f"<p class=\"note\">{_e(what)} Each: input | anomaly map over the input "
                     "| ground truth.</p>"
                     + gallery_html(report.galleries.get(key, []), report.gallery_notes.get(key))
                     + "</section>")
    if result.warnings:
        parts.append("<section data-section=\"warnings\"><h3>Warnings</h3><ul>"
                     + "".join(f"<li class=\"warn\">{_e(w)}</li>" for w in result.warnings)
                     + "</ul></section>")
    return "".join(parts)


def render_report(reports: Sequence[CategoryReport], *, title: str,
                  mean: Optional[Dict[str, Optional[float]]] = None,
                  notes: Sequence[str] = (), subtitle: str = "") -> str:
    """The whole page: a summary table (every category, the mean row), then each category."""
    results = [r.result for r in reports]
    toc = " | ".join(f"<a href=\"#{_e(r.category)}\">{_e(r.category)}</a>" for r in results)
    body = [f"<h1>{_e(title)}</h1>", f"<p class=\"note\">{_e(subtitle)}</p>",
            f"<section data-section=\"summary\"><h2>Summary (%)</h2>{metric_table(results, mean)}"
            f"<p class=\"note\">{toc}</p>"
            + "".join(f"<p class=\"note\">{_e(n)}</p>" for n in notes) + "</section>"]
    body += [category_section(r) for r in reports]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>"
            + "".join(body) + "</body></html>\n")


def write_report(path: PathLike, reports: Sequence[CategoryReport], **options) -> Path:
    """Write :func:`render_report` atomically; returns the path."""
    path = Path(path)
    atomic_write_text(path, render_report(reports, **options))
    return path
