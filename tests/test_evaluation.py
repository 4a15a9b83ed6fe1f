"""Evaluation and prediction: anoseg-eval / anoseg-predict on tiny runs of the demo data."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import sys
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
from PIL import Image

from anoseg.cli import evaluate as eval_cli
from anoseg.cli import predict as predict_cli
from anoseg.cli.common import run_cli
from anoseg.config import load_config
from anoseg.data.mvtec import load_image
from anoseg.evaluation import evaluate_category
from anoseg.predict import collect_image_paths, output_names
from anoseg.reporting import CSV_KEYS, METRIC_COLUMNS
from anoseg.threshold import holdout_image_paths
from anoseg.inference import load_model, predict_anomaly_maps
from anoseg.metrics import NormalScoreQuantile
from anoseg.training import train
from anoseg.visualize import COLORMAP_LUT, colorize, read_map_png, save_map_png, triptych

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=3", "train.device=cpu", "eval.num_thresholds=1000"]
N_PICTURES = 3


@pytest.fixture(scope="module")
def runs(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Path]:
    """One tiny trained run per demo category."""
    folder = tmp_path_factory.mktemp("eval_runs")
    out = {}
    for category in ("demo_texture", "demo_object"):
        cfg = load_config(None, TINY + [f"data.root={demo_root}", f"data.category={category}"])
        train(cfg, folder / category, progress=False)
        out[category] = folder / category
    return out


@pytest.fixture(scope="module")
def evaluated(runs: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """``anoseg-eval`` on the texture run with every optional output, matplotlib hidden."""
    out = tmp_path_factory.mktemp("eval_out")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = eval_cli.main(["--run", str(runs["demo_texture"]), "--output-dir", str(out),
                                  "--save-maps", "--pictures", str(N_PICTURES), "--plot",
                                  "--no-progress", "--device", "cpu"])
    assert code == 0
    return out, stdout.getvalue()


def _read_csv(path: Path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_eval_writes_metrics_json_csv_md(evaluated):
    out, stdout = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    result = metrics["categories"]["demo_texture"]
    for key in ("pixel_auroc", "image_auroc", "iou_pooled_best", "iou_mean_per_image_best",
                "aupro", "pixel_f1_max", "label_free_iou", "label_free_f1"):
        assert 0.0 <= result[key] <= 1.0, key
    assert 0.0 < result["label_free_threshold"] < 1.0
    assert result["n_images"] == 44 and result["n_defective"] == 32 and result["n_good"] == 12
    assert result["n_holdout_images"] == 6 and result["threshold_quantile"] == 0.999
    assert metrics["mean"] is None  # a single category has no mean row

    rows = _read_csv(out / "metrics.csv")
    assert [r["category"] for r in rows] == ["demo_texture"]
    assert list(rows[0]) == ["category", *CSV_KEYS]
    assert float(rows[0]["pixel_auroc"]) == pytest.approx(result["pixel_auroc"])

    table = (out / "metrics.md").read_text()
    assert table.startswith("| Category | Pixel AUROC |")
    assert "| demo_texture | " in table
    assert "| demo_texture | " in stdout and str(out / "metrics.json") in stdout

    curve = _read_csv(out / "demo_texture" / "iou_curve.csv")
    assert len(curve) == 1000 and list(curve[0]) == ["threshold", "iou_pooled",
                                                     "iou_mean_per_image"]
    best = max(float(r["iou_pooled"]) for r in curve)
    assert best == pytest.approx(result["iou_pooled_best"])


def test_eval_plot_skipped_without_matplotlib(evaluated):
    out, stdout = evaluated
    assert ("IoU plot skipped: matplotlib is not installed (pip install 'anoseg-torch[plot]')"
            in stdout)
    assert not (out / "demo_texture" / "iou_curve.png").exists()
    assert (out / "demo_texture" / "iou_curve.csv").is_file()


def test_eval_saved_maps_are_lossless_16_bit(evaluated, runs, demo_root):
    out, _ = evaluated
    maps_dir = out / "demo_texture" / "maps"
    saved = sorted(maps_dir.glob("*/*.png"))
    assert len(saved) == 44 and (maps_dir / "README.txt").is_file()
    with Image.open(saved[0]) as img:
        assert img.mode.startswith("I;16")
    model = load_model(runs["demo_texture"], "cpu")
    image_path = demo_root / "demo_texture" / "test" / saved[0].parent.name / saved[0].name
    image = load_image(image_path, 64).float().div(255.0)[None]
    expected = predict_anomaly_maps(model.generator, image)[0].numpy()
    assert np.abs(read_map_png(saved[0]) - expected).max() <= 1.0 / 65535


def test_eval_pictures(evaluated):
    out, _ = evaluated
    pictures = sorted((out / "demo_texture" / "pictures").iterdir())
    assert len(pictures) == 2 * N_PICTURES
    triptychs = [p for p in pictures if p.name.endswith("_triptych.png")]
    # Three defect types get one picture each before any type gets a second one.
    assert len({p.name.split("_")[0] for p in triptychs}) == N_PICTURES
    with Image.open(triptychs[0]) as img:
        assert img.mode == "RGB" and img.height == 256 and img.width == 3 * 256 + 2 * 4


def test_label_free_threshold_is_the_holdout_quantile(evaluated, runs, demo_root):
    out, _ = evaluated
    result = json.loads((out / "metrics.json").read_text())["categories"]["demo_texture"]
    split = json.loads((runs["demo_texture"] / "split.json").read_text())
    holdout = [Path(p) for p in split["holdout"]]
    assert holdout and not set(split["holdout"]) & set(split["train"])
    assert all(p.parent == demo_root / "demo_texture" / "train" / "good" for p in holdout)
    model = load_model(runs["demo_texture"], "cpu")
    assert holdout_image_paths(model) == holdout
    images = torch.stack([load_image(p, 64) for p in holdout]).float().div(255.0)
    maps = predict_anomaly_maps(model.generator, images).numpy()
    direct = float(np.quantile(maps, 0.999, method="inverted_cdf"))
    assert result["label_free_threshold"] == pytest.approx(direct, abs=2.0 / 2**17)
    estimator = NormalScoreQuantile(0.999)
    estimator.update(maps)
    assert result["label_free_threshold"] == pytest.approx(estimator.threshold(), abs=1e-7)


def test_two_runs_give_a_mean_row(runs, tmp_path, capsys):
    code = eval_cli.main(["--run", str(runs["demo_texture"]), str(runs["demo_object"]),
                          "--output-dir", str(tmp_path), "--no-progress", "--device", "cpu"])
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["categories"]) == {"demo_texture", "demo_object"}
    for key, _ in METRIC_COLUMNS:
        values = [metrics["categories"][c][key] for c in metrics["categories"]]
        assert metrics["mean"][key] == pytest.approx(np.mean(values))
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [r["category"] for r in rows] == ["demo_texture", "demo_object", "mean"]
    assert "| **mean** |" in (tmp_path / "metrics.md").read_text()
    assert (tmp_path / "demo_object" / "iou_curve.csv").is_file()
    assert "| **mean** |" in capsys.readouterr().out


def test_no_holdout_images_skips_label_free_metrics(runs, demo_root):
    model = load_model(runs["demo_object"], "cpu")
    result = evaluate_category(model, demo_root, "demo_object", batch_size=44, progress=False,
                               holdout_paths=[])
    assert result["label_free_threshold"] is None and result["label_free_iou"] is None
    assert any("no held-out normal images" in w for w in result["warnings"])
    assert result["pixel_auroc"] is not None


def test_predict_on_a_folder(runs, demo_root, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((demo_root / "demo_texture" / "test" / "spot").glob("*.png"))[:3]
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    (folder / ".hidden.png").write_bytes(b"not an image")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "pred"
    code = predict_cli.main(["--checkpoint", str(runs["demo_texture"]), str(folder),
                             "--output-dir", str(out), "--no-progress", "--device", "cpu"])
    assert code == 0
    rows = _read_csv(out / "scores.csv")
    assert [Path(r["path"]).name for r in rows] == [s.name for s in sources]
    prediction = json.loads((out / "prediction.json").read_text())
    image_threshold = prediction["image_threshold"]
    for row in rows:
        anomaly_map = read_map_png(out / row["map"])
        mask = np.asarray(Image.open(out / row["mask"]))
        # issue 14: maps at each input's own size (the demo's 128x128; the model's is 64)
        assert anomaly_map.shape == mask.shape == (128, 128)
        assert float(row["map_max"]) == pytest.approx(anomaly_map.max(), abs=1.0 / 65535)
        # issue 12: the image score is compared with the image threshold (not the pixel one)
        assert row["is_anomalous"] == str(int(float(row["image_score"]) > image_threshold))
        assert set(np.unique(mask)) <= {0, 255}
        assert (out / row["overlay"]).is_file()
    assert "3 images" in capsys.readouterr().out
    # --map-resolution model: the maps of before, at the model's 64x64
    out_model = tmp_path / "pred_model"
    assert predict_cli.main(["--checkpoint", str(runs["demo_texture"]), str(folder),
                             "--output-dir", str(out_model), "--map-resolution", "model",
                             "--no-progress", "--device", "cpu"]) == 0
    rows_model = _read_csv(out_model / "scores.csv")
    assert read_map_png(out_model / rows_model[0]["map"]).shape == (64, 64)
    assert [r["image_score"] for r in rows_model] == [r["image_score"] for r in rows]


def test_predict_with_given_threshold_and_duplicate_names(runs, demo_root, tmp_path):
    test_dir = demo_root / "demo_texture" / "test"
    images = [test_dir / "spot" / "000.png", test_dir / "cut" / "000.png"]
    assert output_names(images) == ["spot_000", "cut_000"]
    assert collect_image_paths([images[0], images[0]]) == [images[0]]
    out = tmp_path / "pred"
    code = predict_cli.main(["--checkpoint", str(runs["demo_texture"] / "checkpoints" /
                                                   "last.pt"),
                             *map(str, images), "--output-dir", str(out), "--threshold", "0",
                             "--image-threshold=-1e9", "--no-progress", "--device", "cpu"])
    assert code == 0
    rows = _read_csv(out / "scores.csv")
    assert [r["is_anomalous"] for r in rows] == ["1", "1"]
    assert np.asarray(Image.open(out / "masks" / "cut_000.png")).min() == 255


def _bad_category_root(tmp_path: Path) -> Path:
    good = tmp_path / "data" / "widget" / "train" / "good"
    good.mkdir(parents=True)
    return tmp_path / "data"


@pytest.mark.parametrize("case", ["no_checkpoint", "missing_data_root", "no_test_images",
                                  "several_runs_no_output", "unreadable_image", "missing_image",
                                  "empty_folder"])
def test_bad_input_gives_one_line_error(case, runs, tmp_path, capsys):
    run = str(runs["demo_texture"])
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_image = tmp_path / "broken.png"
    bad_image.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    cases = {
        "no_checkpoint": (eval_cli.main, ["--run", str(empty)], str(empty)),
        "missing_data_root": (eval_cli.main, ["--run", run, "--data-root",
                                              str(tmp_path / "nowhere")],
                              str(tmp_path / "nowhere")),
        "no_test_images": (eval_cli.main, ["--run", run, "--data-root",
                                           str(_bad_category_root(tmp_path)), "--category",
                                           "widget"],
                           str(tmp_path / "data" / "widget" / "test")),
        "several_runs_no_output": (eval_cli.main, ["--run", run, str(runs["demo_object"])],
                                   "--output-dir"),
        "unreadable_image": (predict_cli.main, ["--checkpoint", run, str(bad_image),
                                                "--output-dir", str(tmp_path / "o")],
                             str(bad_image)),
        "missing_image": (predict_cli.main, ["--checkpoint", run, str(tmp_path / "gone.png"),
                                             "--output-dir", str(tmp_path / "o")],
                          str(tmp_path / "gone.png")),
        "empty_folder": (predict_cli.main, ["--checkpoint", run, str(empty), "--output-dir",
                                            str(tmp_path / "o")], str(empty)),
    }
    main, argv, named = cases[case]
    assert run_cli(main, argv + ["--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    assert named in err
    assert not (tmp_path / "o").exists()


def test_colormap_and_triptych_shapes(tmp_path):
    assert COLORMAP_LUT.shape == (256, 3) and COLORMAP_LUT.dtype == np.uint8
    colours = colorize(np.array([[0.0, 1.0]]))
    assert colours[0, 0, 2] > colours[0, 0, 0] and colours[0, 1, 0] > colours[0, 1, 2]
    picture = triptych(torch.rand(3, 32, 32), torch.rand(32, 32), torch.zeros(1, 32, 32))
    assert picture.shape == (256, 3 * 256 + 8, 3)
    values = np.random.default_rng(0).random((16, 16))
    save_map_png(tmp_path / "map.png", values)
    assert np.abs(read_map_png(tmp_path / "map.png") - values).max() <= 0.5 / 65535 + 1e-12
