"""Issue 16 item 6: test sets anoseg-eval can only partly score. The defined metrics are
reported, the others are n/a with the reason, nothing crashes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anoseg.cli import evaluate as eval_cli
from anoseg.cli.common import run_cli
from anoseg.config import load_config
from anoseg.training import train

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=1", "train.device=cpu", "eval.num_thresholds=100",
        "data.holdout_fraction=0.25"]


@pytest.fixture
def widget_run(make_mvtec, tmp_path):
    root = make_mvtec(category="widget", n_train=8, n_test_good=3, defects={"crack": 2},
                      image_hw=(256, 256))
    cfg = load_config(None, TINY + [f"data.root={root}", "data.category=widget"])
    train(cfg, tmp_path / "run", progress=False)
    return root, tmp_path / "run"


def _evaluate(run: Path, root: Path, out: Path, capsys):
    code = run_cli(eval_cli.main, ["--run", str(run), "--data-root", str(root), "--output-dir",
                                   str(out), "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err
    document = json.loads((out / "metrics.json").read_text())
    return document["categories"]["widget"], (out / "metrics.md").read_text(), captured.out


def test_no_defective_test_images(widget_run, tmp_path, capsys):
    root, run = widget_run
    shutil.rmtree(root / "widget" / "test" / "crack")
    shutil.rmtree(root / "widget" / "ground_truth")
    result, table, stdout = _evaluate(run, root, tmp_path / "out", capsys)
    assert result["n_defective"] == 0 and result["n_good"] == 3
    for key in ("pixel_auroc", "image_auroc", "aupro", "iou_pooled_best", "pixel_f1_max",
                "image_threshold_recall"):
        assert result[key] is None, key
    assert result["label_free_fpr"] is not None       # defined: normal pixels exist
    assert result["image_threshold_fpr"] is not None  # defined: good images exist
    assert all(v is None for v in result["image_auroc_scores"].values())
    assert "defect_types" not in result
    assert any("no defective images" in w for w in result["warnings"])
    assert "n/a" in table and "no defective images" in table
    assert "| widget | n/a |" in stdout


def test_no_normal_test_images(widget_run, tmp_path, capsys):
    root, run = widget_run
    shutil.rmtree(root / "widget" / "test" / "good")
    result, table, _ = _evaluate(run, root, tmp_path / "out", capsys)
    assert result["n_good"] == 0 and result["n_defective"] == 2
    assert result["image_auroc"] is None and result["image_threshold_fpr"] is None
    assert result["pixel_auroc"] is not None          # normal pixels of defective images
    assert result["image_threshold_recall"] is not None
    assert result["defect_types"]["crack"]["image_auroc"] is None
    assert any("no normal images" in w for w in result["warnings"])
    assert "n/a" in table


def test_masks_that_vanish_at_the_model_resolution(widget_run, tmp_path, capsys):
    root, run = widget_run
    for mask in (root / "widget" / "ground_truth" / "crack").iterdir():
        values = np.zeros((256, 256), dtype=np.uint8)
        values[0, 1] = 255  # one pixel at 256 px: gone after the nearest resize to 64
        Image.fromarray(values).save(mask)
    result, table, _ = _evaluate(run, root, tmp_path / "out", capsys)
    assert result["n_defective"] == 2 and result["n_defect_pixels"] == 0
    assert result["image_auroc"] is not None          # labels come from the folders
    assert result["pixel_auroc"] is None and result["aupro"] is None
    assert any("empty mask" in w for w in result["warnings"])
    assert any("no defect pixels" in w for w in result["warnings"])
    assert "n/a" in table
