"""Issue 12: image scores on the anomaly logit map, the label-free image threshold, and float
maps that re-score to anoseg-eval's numbers exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from anoseg.config import IMAGE_SCORE_CHOICES, load_config
from anoseg.data.mvtec import MVTecTestDataset
from anoseg.errors import ConfigError
from anoseg.evaluation import evaluate_run
from anoseg.inference import load_model, predict_anomaly_maps, predict_anomaly_scores
from anoseg.metrics import (IMAGE_SCORES, SIGNAL_IMAGE_SCORES, MetricsInputError,
                            SegmentationMetrics,
                            image_score_threshold, image_scores, max_image_score,
                            smoothed_max_image_score, top_fraction_mean_image_score,
                            top_k_mean_image_score)
from anoseg.models.generator import AnoSegGenerator, coordinate_channels
from anoseg.predict import predict_run
from anoseg.threshold import holdout_image_paths, holdout_image_scores
from anoseg.training import train

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=2", "train.device=cpu", "eval.num_thresholds=1000"]


# ----------------------------------------------------------------------- the score functions


def _maps(seed: int = 0, shape=(4, 9, 11)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_max_score():
    maps = _maps()
    assert np.array_equal(max_image_score(maps), maps.reshape(4, -1).max(axis=1))


@pytest.mark.parametrize("size", [1, 3, 5])
def test_smoothed_max_is_the_max_of_the_box_mean(size):
    maps = _maps(1)
    half = size // 2
    expected = []
    for image in maps.astype(np.float64):
        means = [image[max(0, i - half):i + half + 1, max(0, j - half):j + half + 1].mean()
                 for i in range(image.shape[0]) for j in range(image.shape[1])]
        expected.append(max(means))
    np.testing.assert_allclose(smoothed_max_image_score(maps, size), expected, rtol=0,
                               atol=1e-12)
    with pytest.raises(MetricsInputError):
        smoothed_max_image_score(maps, 2)


def test_smoothed_max_prefers_a_blob_to_a_lone_pixel():
    maps = np.zeros((2, 16, 16), dtype=np.float32)
    maps[0, 8, 8] = 5.0              # one hot pixel
    maps[1, 4:7, 4:7] = 3.0          # a hot 3x3 blob, lower peak
    assert max_image_score(maps)[0] > max_image_score(maps)[1]
    blurred = smoothed_max_image_score(maps, 3)
    assert blurred[1] > blurred[0]


def test_top_k_mean():
    maps = _maps(2)
    flat = np.sort(maps.reshape(4, -1).astype(np.float64), axis=1)
    np.testing.assert_allclose(top_k_mean_image_score(maps, 10), flat[:, -10:].mean(axis=1),
                               atol=1e-12)
    np.testing.assert_allclose(top_k_mean_image_score(maps, 10_000), flat.mean(axis=1),
                               atol=1e-12)  # k above the pixel count: every pixel
    with pytest.raises(MetricsInputError):
        top_k_mean_image_score(maps, 0)


def test_top_fraction_mean():
    maps = _maps(3, shape=(3, 20, 20))  # 400 pixels: 1 % = the top 4
    flat = np.sort(maps.reshape(3, -1).astype(np.float64), axis=1)
    np.testing.assert_allclose(top_fraction_mean_image_score(maps, 0.01),
                               flat[:, -4:].mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(top_fraction_mean_image_score(maps[:, :5, :5], 0.01),
                               np.sort(maps[:, :5, :5].reshape(3, -1), axis=1)[:, -1],
                               atol=1e-7)  # 25 pixels: at least one
    with pytest.raises(MetricsInputError):
        top_fraction_mean_image_score(maps, 0.0)


def test_image_scores_registry_matches_the_config_choices():
    assert set(IMAGE_SCORES) | set(SIGNAL_IMAGE_SCORES) | {"detector"} == set(IMAGE_SCORE_CHOICES)
    scores = image_scores(torch.from_numpy(_maps(4)))
    assert list(scores) == list(IMAGE_SCORES)
    assert all(v.shape == (4,) and v.dtype == np.float64 for v in scores.values())
    with pytest.raises(MetricsInputError, match="unknown image score"):
        image_scores(_maps(), ["nope"])
    with pytest.raises(ConfigError, match="eval.image_score"):
        load_config(None, ["eval.image_score=nope"])


def test_image_threshold_flags_the_configured_fraction_of_normal_images():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=1000)
    threshold = image_score_threshold(normal, 0.99)
    assert np.count_nonzero(normal > threshold) == 10        # exactly 1 % of these images
    assert np.count_nonzero(normal > image_score_threshold(normal, 0.9)) == 100
    fresh = rng.normal(size=200_000)                           # new normal images: about 1 %
    assert 0.005 < np.mean(fresh > threshold) < 0.02
    assert image_score_threshold([3.0], 0.99) == 3.0
    with pytest.raises(MetricsInputError):
        image_score_threshold([], 0.99)


# ----------------------------------------------------------------------------- the network


def test_map_logit_is_the_pre_sigmoid_output_and_changes_nothing_else():
    torch.manual_seed(0)
    generator = AnoSegGenerator(image_size=64, width=0.125, map_skips=2).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = generator(images)
        x = torch.cat([images * 2.0 - 1.0, coordinate_channels(2, 64, 64)], dim=1)
        levels = generator.encoder.features(x)
        plain = generator.map_decoder(levels[-1], levels[-2::-1][:2])  # Decoder.forward
    assert torch.equal(plain, out.normality_map)  # the training output, bit for bit
    assert torch.equal(torch.sigmoid(out.map_logit), out.normality_map)
    assert out.map_logit.shape == (2, 1, 64, 64)
    assert sorted(generator.state_dict()) == sorted(  # checkpoints: same keys
        AnoSegGenerator(image_size=64, width=0.125, map_skips=2).state_dict())
    maps, logits = predict_anomaly_scores(generator, images)
    assert torch.equal(maps, predict_anomaly_maps(generator, images))
    assert torch.equal(logits, -out.map_logit[:, 0])
    # where the sigmoid saturates the logit still orders the pixels
    assert torch.equal(torch.sigmoid(torch.tensor([20.0, 30.0])), torch.ones(2))


# ---------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def run_with_holdout(tmp_path_factory):
    """A tiny run on generated data with 20 held-out normal images."""
    from tests.conftest import _write_mask, _write_rgb  # noqa: F401 - the fixture's writers

    base = tmp_path_factory.mktemp("image_scores")
    rng = np.random.default_rng(5)
    folder = base / "data" / "widget"
    for sub, count in (("train/good", 40), ("test/good", 6), ("test/crack", 4),
                       ("test/hole", 3)):
        (folder / sub).mkdir(parents=True)
        for i in range(count):
            _write_rgb(folder / sub / f"{i:03d}.png", (32, 32), rng)
            if not sub.endswith("good"):
                mask_dir = folder / "ground_truth" / sub.split("/")[1]
                mask_dir.mkdir(parents=True, exist_ok=True)
                _write_mask(mask_dir / f"{i:03d}_mask.png", (32, 32))
    cfg = load_config(None, TINY + [f"data.root={base / 'data'}", "data.category=widget",
                                    "data.holdout_fraction=0.5",
                                    "eval.image_threshold_quantile=0.9"])
    train(cfg, base / "run", progress=False)
    return base / "data", base / "run"


BATCH = 5


def test_saved_float_maps_rescore_to_the_evaluation_exactly(run_with_holdout, tmp_path):
    root, run = run_with_holdout
    report = evaluate_run(run, output_dir=tmp_path, batch_size=BATCH, device="cpu",
                          progress=False, save_maps=True)
    result = report.results["widget"]
    maps_dir = tmp_path / "widget" / "maps"
    dataset = MVTecTestDataset(root, "widget", 64)
    metrics = SegmentationMetrics(num_thresholds=1000,
                                  fixed_thresholds=[result.label_free_threshold])
    all_scores = {name: [] for name in IMAGE_SCORES}
    labels = []
    samples = dataset.samples
    for start in range(0, len(samples), BATCH):  # the evaluation's batches
        chunk = [dataset[i] for i in range(start, min(start + BATCH, len(samples)))]
        stems = [(s.defect_type, Path(it["path"]).stem)
                 for s, it in zip(samples[start:start + BATCH], chunk)]
        maps = np.stack([np.load(maps_dir / d / f"{stem}.npy") for d, stem in stems])
        logits = np.stack([np.load(maps_dir / d / f"{stem}.logit.npy") for d, stem in stems])
        assert maps.dtype == logits.dtype == np.float32
        scores = image_scores(logits)
        metrics.update(maps, torch.stack([it["mask"][0] for it in chunk]),
                       labels=[it["label"] for it in chunk], image_scores=scores["max"])
        for name, values in scores.items():
            all_scores[name].append(values)
        labels += [bool(it["label"]) for it in chunk]
    rescored = metrics.compute(threshold=result.label_free_threshold)
    for key in ("pixel_auroc", "image_auroc", "aupro", "iou_pooled_best",
                "iou_mean_per_image_best", "pixel_f1_max", "score_min", "score_max"):
        assert rescored[key] == getattr(result, key), key  # exactly
    assert rescored["at_threshold"]["iou_pooled"] == result.label_free_iou
    from anoseg.metrics import image_auroc
    for name, parts in all_scores.items():
        assert image_auroc(labels, np.concatenate(parts)) == result.image_auroc_scores[name]
    saved = json.loads((tmp_path / "metrics.json").read_text())["categories"]["widget"]
    assert saved["pixel_auroc"] == result.pixel_auroc
    assert set(saved["image_auroc_scores"]) == set(IMAGE_SCORES)
    assert "Image score" in (tmp_path / "metrics.md").read_text()


def test_label_free_image_threshold_flags_the_quantile_of_held_out_images(run_with_holdout,
                                                                         tmp_path):
    root, run = run_with_holdout
    report = evaluate_run(run, output_dir=tmp_path / "eval", batch_size=8, device="cpu",
                          progress=False)
    result = report.results["widget"]
    assert result.image_score == "max" and result.image_threshold_quantile == 0.9
    model = load_model(run, "cpu")
    holdout = holdout_image_paths(model)
    assert len(holdout) == 20
    scores = np.asarray(holdout_image_scores(model, holdout)["max"])
    assert result.image_threshold == pytest.approx(
        float(np.quantile(scores, 0.9, method="inverted_cdf")), abs=0)
    flagged = int(np.count_nonzero(scores > result.image_threshold))
    top = np.sort(scores)[-3:]
    assert flagged <= 2  # at most 10 % of 20; exactly 2 unless the top scores tie
    assert flagged == 2 or len(set(top.tolist())) < 3
    assert (run / "checkpoints" / "last.image_threshold.json").is_file()
    # the rates at the threshold, on the test set
    assert result.n_good_flagged is not None and 0 <= result.image_threshold_fpr <= 1
    assert result.image_threshold_fpr == result.n_good_flagged / 6
    assert result.image_threshold_recall == result.n_defective_flagged / 7
    assert result.defect_types["hole"].image_threshold_recall is not None

    # anoseg-predict uses the same image threshold: on the held-out images, 2 of 20 fail
    # (maps written at the model's resolution, where the image scores are computed: the
    # saved logit map re-scores to the image score exactly; issue 14)
    prediction = predict_run(run, holdout, tmp_path / "pred", device="cpu", progress=False,
                             map_resolution="model")
    assert prediction.image_threshold == result.image_threshold
    assert prediction.n_anomalous == flagged
    assert f"{20 - flagged} pass, {flagged} fail" in prediction.summary()
    saved = json.loads((tmp_path / "pred" / "prediction.json").read_text())
    assert saved["image_threshold"] == result.image_threshold and saved["n_pass"] == 20 - flagged
    logit = np.load(tmp_path / "pred" / prediction.rows[0]["logit_map"])
    assert prediction.rows[0]["image_score"] == pytest.approx(float(logit.max()), abs=0)

    # another headline score: a one-line change (here the evaluation's override)
    other = evaluate_run(run, output_dir=tmp_path / "eval_top", batch_size=8, device="cpu",
                         progress=False, image_score="top1pct_mean")
    top = other.results["widget"]
    assert top.image_score == "top1pct_mean"
    assert top.image_auroc == top.image_auroc_scores["top1pct_mean"]
    assert top.image_auroc_scores == result.image_auroc_scores


def test_the_image_threshold_note_says_when_the_quantile_is_the_maximum():
    from anoseg.threshold import image_threshold_note

    note = image_threshold_note(28, 0.99)
    assert "only 28 held-out" in note and "needs 100" in note and "3.4%" in note
    assert image_threshold_note(100, 0.99) is None  # resolvable: the 99th of 100
    assert image_threshold_note(19, 0.95) is not None and image_threshold_note(20, 0.95) is None
    assert image_threshold_note(0, 0.99) is None
    # the maximum of n is exactly what the quantile rule returns then
    scores = np.arange(28.0)
    assert image_score_threshold(scores, 0.99) == scores.max()
