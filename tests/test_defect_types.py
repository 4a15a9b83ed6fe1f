"""anoseg-eval's per-defect-type rows: one extra metric pass per type in the same stream."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anoseg.config import load_config
from anoseg.data.mvtec import MVTecTestDataset
from anoseg.evaluation import evaluate_run
from anoseg.inference import load_model, predict_anomaly_scores
from anoseg.metrics import SegmentationMetrics, image_scores
from anoseg.reporting import CSV_KEYS, DEFECT_TYPES_CSV
from anoseg.training import train

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=2", "train.device=cpu", "eval.num_thresholds=1000",
        "data.holdout_fraction=0.3"]


@pytest.fixture
def two_categories(make_mvtec, tmp_path):
    """A category with two defect types and one with a single type, a tiny run of each."""
    root = make_mvtec(category="widget", n_train=8, n_test_good=3,
                      defects={"crack": 3, "hole": 2})
    make_mvtec(category="gadget", n_train=8, n_test_good=2, defects={"dent": 2}, root=root)
    runs = {}
    for category in ("widget", "gadget"):
        cfg = load_config(None, TINY + [f"data.root={root}", f"data.category={category}"])
        train(cfg, tmp_path / "runs" / category, progress=False)
        runs[category] = tmp_path / "runs" / category
    return root, runs


def test_defect_type_rows_match_a_direct_metric_pass(two_categories, tmp_path):
    root, runs = two_categories
    out = tmp_path / "eval"
    report = evaluate_run([runs["widget"], runs["gadget"]], output_dir=out, batch_size=3,
                          device="cpu", progress=False)
    widget = report.results["widget"]
    assert list(widget.defect_types) == ["crack", "hole"]
    assert list(report.results["gadget"].defect_types) == ["dent"]  # one type: still a row

    # The type's metrics = a metric pass over that type's images plus the good ones.
    model = load_model(runs["widget"], "cpu")
    dataset = MVTecTestDataset(root, "widget", 64)
    items = [dataset[i] for i in range(len(dataset))]
    # The maps in the evaluation's own batches of 3 (a convolution's result may differ in the
    # last bits with the batch it is computed in, on several threads), then the type's rows.
    parts = [predict_anomaly_scores(model.generator,
                                    torch.stack([it["image"] for it in items[i:i + 3]]))
             for i in range(0, len(items), 3)]
    all_maps = torch.cat([m for m, _ in parts])
    all_logits = torch.cat([lg for _, lg in parts])
    chosen = [i for i, it in enumerate(items) if it["defect_type"] in ("good", "crack")]
    keep = [items[i] for i in chosen]
    maps, logits = all_maps[chosen], all_logits[chosen]
    direct = SegmentationMetrics(num_thresholds=1000,
                                 fixed_thresholds=[widget.label_free_threshold])
    direct.update(maps, torch.stack([it["mask"][0] for it in keep]),
                  labels=[it["label"] for it in keep],
                  image_scores=image_scores(logits)["max"])  # the default eval.image_score
    expected = direct.compute(threshold=widget.label_free_threshold)
    crack = widget.defect_types["crack"]
    assert crack.n_images == 6 and crack.n_defective == 3 and crack.n_good == 3
    for key in ("pixel_auroc", "aupro", "iou_pooled_best", "image_auroc", "pixel_f1_max"):
        assert getattr(crack, key) == pytest.approx(expected[key], abs=1e-12), key
    assert crack.label_free_iou == pytest.approx(expected["at_threshold"]["iou_pooled"])

    # The category rows and the mean row are as without the breakdown.
    document = json.loads((out / "metrics.json").read_text())
    entry = document["categories"]["widget"]
    assert set(entry["defect_types"]) == {"crack", "hole"}
    assert entry["defect_types"]["hole"]["n_images"] == 5
    assert entry["defect_types"]["crack"]["pixel_auroc"] == crack.pixel_auroc
    assert entry["n_images"] == 8
    assert document["mean"]["pixel_auroc"] == pytest.approx(
        np.mean([report.results[c].pixel_auroc for c in ("widget", "gadget")]))

    with open(out / "metrics.csv", newline="") as handle:
        assert [r["category"] for r in csv.DictReader(handle)] == ["widget", "gadget", "mean"]
    with open(out / DEFECT_TYPES_CSV, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["category", "defect_type", *CSV_KEYS]
    assert [(r["category"], r["defect_type"]) for r in rows] == [
        ("widget", "crack"), ("widget", "hole"), ("gadget", "dent")]
    assert float(rows[0]["pixel_auroc"]) == crack.pixel_auroc

    table = (out / "metrics.md").read_text().split("\n\n")[0].splitlines()
    names = [line.split(" | ")[0].lstrip("| ") for line in table if line.startswith("| ")]
    assert names[1:] == ["widget", "widget / crack", "widget / hole", "gadget",
                         "gadget / dent", "**mean**"]
