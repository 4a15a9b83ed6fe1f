"""Images as they come (issue 14): non-square sizes, keep_aspect padding, tiling with a sliding
window, maps at each image's own size. Tiny models on a generated category of 300 x 1000
images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anoseg.config import load_config
from anoseg.data.geometry import (Geometry, blend_window, crop, tile_span, valid_mask,
                                  window_starts)
from anoseg.data.mvtec import MVTecTestDataset, load_placed_image
from anoseg.data.training_data import SyntheticAnomalyDataset, make_sample
from anoseg.evaluation import evaluate_category
from anoseg.inference import (load_model, predict_anomaly_scores, predict_placed,
                              sliding_window_scores)
from anoseg.models.generator import (AnoSegGenerator, GeneratorOutput, coordinate_channels,
                                     spanned_coordinate_channels)
from anoseg.predict import predict_run
from anoseg.training import train

HW = (300, 1000)
TINY = ["model.width=0.125", "train.batch_size=4", "data.num_workers=0", "train.steps=2",
        "train.device=cpu", "eval.num_thresholds=200", "train.checkpoint_every=2",
        "train.precision=fp32"]
KEEP_ASPECT = ["data.image_size=[64, 192]", "data.resize=keep_aspect"]
TILING = ["data.image_size=64", "data.tiling.enabled=true", "data.tiling.scale=0.2"]


def _strip(rng: np.random.Generator, defect: bool):
    """A 300 x 1000 strip: a horizontal gradient, stripes and noise; a defect is a dark
    rectangle somewhere on it (its mask returned, else None)."""
    yy, xx = np.mgrid[0:HW[0], 0:HW[1]].astype(np.float32)
    base = 0.4 + 0.3 * xx / HW[1] + 0.1 * np.sin(yy / 9.0 + rng.uniform(0, 6))
    image = np.clip(base[..., None] + rng.normal(0, 0.02, (*HW, 3)), 0, 1)
    mask = None
    if defect:
        top, left = int(rng.integers(20, 240)), int(rng.integers(50, 900))
        mask = np.zeros(HW, np.uint8)
        mask[top:top + 40, left:left + 60] = 255
        image[mask > 0] *= 0.2
    return (image * 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def strips(tmp_path_factory) -> Path:
    """A generated category ``strip`` of 300 x 1000 images in MVTec AD layout."""
    root = tmp_path_factory.mktemp("strips")
    rng = np.random.default_rng(14)
    folders = {"train/good": 10, "test/good": 2, "test/dent": 3}
    for folder, count in folders.items():
        (root / "strip" / folder).mkdir(parents=True)
        for i in range(count):
            image, mask = _strip(rng, folder == "test/dent")
            Image.fromarray(image).save(root / "strip" / folder / f"{i:03d}.png")
            if mask is not None:
                (root / "strip" / "ground_truth" / "dent").mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask).save(root / "strip" / "ground_truth" / "dent" /
                                           f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="module")
def runs(strips: Path, tmp_path_factory) -> dict:
    """One tiny run with keep_aspect and one with tiling on the strips."""
    folder = tmp_path_factory.mktemp("geometry_runs")
    out = {}
    for name, extra in (("keep_aspect", KEEP_ASPECT), ("tiling", TILING)):
        cfg = load_config(None, TINY + extra + [f"data.root={strips}", "data.category=strip"])
        train(cfg, folder / name, progress=False)
        out[name] = folder / name
    return out


def test_int_image_size_configs_are_unchanged(tmp_path):
    cfg = load_config(None, ["data.image_size=128"])
    assert cfg.data.image_size == 128 and cfg.data.resize == "stretch"
    assert not cfg.data.tiling.enabled and cfg.eval.resolution == "model"
    assert cfg.to_dict()["data"]["image_size"] == 128  # still an int in config.yaml
    geometry = Geometry.from_config(cfg.data)
    assert geometry.place((300, 1000)).is_full
    # a config written before issue 14 (no resize, no tiling) loads with the defaults
    old = cfg.to_dict()
    del old["data"]["resize"], old["data"]["tiling"], old["eval"]["resolution"]
    assert load_config(None, base=old).to_dict() == cfg.to_dict()
    pair = load_config(None, ["data.image_size=[320, 128]"])
    assert pair.data.image_size == (320, 128) and pair.to_dict()["data"]["image_size"] == [320, 128]


@pytest.mark.parametrize("override, words", [
    (["data.image_size=[100, 64]"], ["data.image_size", "[height, width]", "multiple of 32"]),
    (["data.image_size=[64, 64, 64]"], ["data.image_size", "[height, width]"]),
    (["data.resize=crop"], ["data.resize", "'keep_aspect'"]),
    (["data.tiling.scale=0"], ["data.tiling.scale"]),
    (["data.tiling.overlap=0.9"], ["data.tiling.overlap"]),
    (["data.tiling.coord=image"], ["unknown config key 'data.tiling.coord'",
                                   "data.tiling.coords"]),
    (["eval.resolution=full"], ["eval.resolution", "'native'"]),
])
def test_bad_geometry_values_name_the_key(override, words):
    from anoseg.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    for word in words:
        assert word in str(info.value)


def test_keep_aspect_places_the_image_and_pads_the_rest(strips):
    path = strips / "strip" / "train" / "good" / "000.png"
    canvas, placement = load_placed_image(path, Geometry((64, 192), "keep_aspect"))
    assert canvas.shape == (3, 64, 192) and placement.box == (3, 0, 58, 192)
    assert placement.source_hw == HW
    valid = valid_mask(placement)
    assert canvas[:, ~valid].max() == 0 and canvas[:, valid].float().mean() > 50
    # tiling: resized by the scale, padded at the bottom up to one tile
    canvas, placement = load_placed_image(path, Geometry((64, 64), tile_scale=0.2))
    assert canvas.shape == (3, 64, 200) and placement.box == (0, 0, 60, 200)


def test_synthetic_anomalies_never_touch_the_padding(strips):
    paths = sorted((strips / "strip" / "train" / "good").glob("*.png"))
    cfg = load_config(None, KEEP_ASPECT + ["synthesis.anomaly_ratio=1.0",
                                           "synthesis.patch_area=[0.2, 0.4]"])
    dataset = SyntheticAnomalyDataset(paths, cfg.data.image_size, cfg.synthesis,
                                      geometry=Geometry.from_config(cfg.data))
    padding = ~valid_mask(dataset.canvas(0)[1])
    made = 0
    for seed in range(12):
        sample = dataset[(seed % len(paths), seed)]
        assert sample["image"].shape == (3, 64, 192)
        assert (sample["image"][:, padding] == 0).all()
        assert (sample["normality"][0, padding] == 1).all()
        made += int((sample["normality"] < 1).any())
    assert made >= 10
    # tiles: inside each tile, never on its padding rows (60 image rows of 64)
    tiled = SyntheticAnomalyDataset(paths, 64, cfg.synthesis,
                                    geometry=Geometry((64, 64), tile_scale=0.2))
    for seed in range(12):
        sample = tiled[(seed % len(paths), seed)]
        assert sample["image"].shape == (3, 64, 64) and sample["span"].shape == (4,)
        assert (sample["normality"][0, 60:] == 1).all() and (sample["image"][:, 60:] == 0).all()


def test_default_geometry_gives_the_samples_of_before(strips):
    """A stretch (int image_size) draws exactly what anoseg did before issue 14."""
    from anoseg.data.mvtec import load_image

    paths = sorted((strips / "strip" / "train" / "good").glob("*.png"))[:2]
    cfg = load_config(None, ["data.image_size=64"])
    dataset = SyntheticAnomalyDataset(paths, 64, cfg.synthesis,
                                      geometry=Geometry.from_config(cfg.data))
    for seed in range(4):
        old = make_sample(load_image(paths[seed % 2], 64).float().div_(255.0), cfg.synthesis,
                          torch.Generator().manual_seed(seed), cfg.synthesis.anomaly_ratio)
        new = dataset[(seed % 2, seed)]
        assert set(new) == set(old)
        assert all(torch.equal(new[k], old[k]) for k in old)


def test_tile_coordinates_are_the_whole_images_cut_out():
    geometry = Geometry((64, 64), tile_scale=1.0)
    placement = geometry.place((96, 160))
    whole = coordinate_channels(1, 96, 160)[0]
    for top, left in ((0, 0), (32, 96), (16, 40)):
        span = torch.tensor([tile_span(placement, top, left, (64, 64))])
        tile = spanned_coordinate_channels(span, 64, 64)[0]
        assert torch.allclose(tile, whole[:, top:top + 64, left:left + 64], atol=1e-6)


def test_sliding_window_blends_and_matches_one_window():
    torch.manual_seed(0)
    generator = AnoSegGenerator(image_size=64, width=0.125, map_skips=2).eval()
    canvas = torch.rand(3, 64, 64)
    geometry = Geometry((64, 64), tile_scale=1.0, coords="tile")
    placement = geometry.place((64, 64))
    stitched, stitched_logit = sliding_window_scores(generator, canvas, placement, geometry)
    direct, direct_logit = predict_anomaly_scores(generator, canvas[None])
    assert torch.equal(stitched, direct[0]) and torch.equal(stitched_logit, direct_logit[0])
    # overlapping windows over a larger canvas: every pixel covered, weights sum to one
    starts = window_starts(200, 64, 0.25)
    assert starts[0] == 0 and starts[-1] == 136
    assert all(b - a <= 48 for a, b in zip(starts, starts[1:]))
    assert (blend_window(64) > 0).all()

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, images):
            shape = (images.shape[0], 1, *images.shape[2:])
            return GeneratorOutput(torch.full(shape, 0.25), None, torch.full(shape, 1.5))

    big = Geometry((64, 64), tile_scale=1.0, coords="tile")
    maps, logits = sliding_window_scores(Constant(), torch.rand(3, 100, 200),
                                         big.place((100, 200)), big, batch_size=3)
    assert maps.shape == (100, 200)
    assert torch.allclose(maps, torch.tensor(0.75)) and torch.allclose(logits, torch.tensor(-1.5))


def test_keep_aspect_run_predicts_at_the_inputs_size(runs, strips, tmp_path):
    model = load_model(runs["keep_aspect"], "cpu")
    assert model.config.data.image_size == (64, 192)
    images = sorted((strips / "strip" / "test" / "dent").glob("*.png"))[:2]
    report = predict_run(runs["keep_aspect"], images, tmp_path / "pred", device="cpu",
                         progress=False)
    for row in report.rows:
        saved = np.load(tmp_path / "pred" / row["logit_map"])
        mask = np.asarray(Image.open(tmp_path / "pred" / row["mask"]))
        overlay = Image.open(tmp_path / "pred" / row["overlay"])
        assert saved.shape == mask.shape == HW and overlay.size == (1000, 300)
    info = json.loads((tmp_path / "pred" / "prediction.json").read_text())
    assert info["image_size"] == [64, 192] and info["map_resolution"] == "native"


def test_padding_is_never_scored(runs, strips):
    """A huge anomaly score on the padding changes no metric and no threshold."""
    model = load_model(runs["keep_aspect"], "cpu")
    plain = evaluate_category(model, strips, "strip", batch_size=4, progress=False)

    class LoudPadding(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, spans=None, *, reconstruct=True):
            out = self.inner(images, spans, reconstruct=reconstruct)
            normality, logit = out.normality_map.clone(), out.map_logit.clone()
            for rows in (slice(0, 3), slice(61, 64)):  # the padding of a 300x1000 strip
                normality[..., rows, :] = 0.0
                logit[..., rows, :] = -1e4
            return GeneratorOutput(normality, out.reconstruction, logit)

    model.generator = LoudPadding(model.generator).eval()
    loud = evaluate_category(model, strips, "strip", batch_size=4, progress=False)
    assert plain.n_pixels == 5 * 58 * 192
    for key in ("pixel_auroc", "image_auroc", "aupro", "iou_pooled_best", "score_max",
                "label_free_threshold", "label_free_iou", "image_threshold"):
        assert getattr(loud, key) == getattr(plain, key), key


def test_native_resolution_scores_every_pixel_of_every_image(runs, strips, tmp_path):
    model = load_model(runs["keep_aspect"], "cpu")
    model.config.eval.resolution = "native"
    result = evaluate_category(model, strips, "strip", batch_size=4, progress=False,
                               save_maps_dir=tmp_path / "maps", pictures_dir=tmp_path / "pics",
                               max_pictures=2)
    assert result.n_pixels == 5 * HW[0] * HW[1]
    assert result.n_defect_pixels == 3 * 40 * 60
    assert result.pixel_auroc is not None and result.label_free_threshold is not None
    assert np.load(tmp_path / "maps" / "dent" / "000.npy").shape == HW
    with Image.open(next((tmp_path / "pics").glob("*_triptych.png"))) as picture:
        assert picture.height == HW[0]  # input | map | mask at the image's own size
    # at the model's resolution: the image's 58 x 192 part of the canvas
    model.config.eval.resolution = "model"
    evaluate_category(model, strips, "strip", batch_size=4, progress=False,
                      save_maps_dir=tmp_path / "maps_model", pictures_dir=tmp_path / "pm",
                      max_pictures=1)
    assert np.load(tmp_path / "maps_model" / "dent" / "000.npy").shape == (58, 192)
    with Image.open(next((tmp_path / "pm").glob("*_triptych.png"))) as picture:
        assert picture.height == 58 * 5  # enlarged by a whole factor to >= 256 px


def test_tiling_run_trains_evaluates_and_predicts(runs, strips, tmp_path):
    model = load_model(runs["tiling"], "cpu")
    summary = json.loads((runs["tiling"] / "summary.json").read_text())
    assert summary["steps"] == 2
    result = evaluate_category(model, strips, "strip", batch_size=4, progress=False)
    assert result.n_pixels == 5 * 60 * 200  # the working scale, the tile padding cut off
    model.config.eval.resolution = "native"
    native = evaluate_category(model, strips, "strip", batch_size=4, progress=False)
    assert native.n_pixels == 5 * HW[0] * HW[1]
    images = sorted((strips / "strip" / "test" / "dent").glob("*.png"))[:1]
    report = predict_run(runs["tiling"], images, tmp_path / "pred", device="cpu",
                         progress=False, batch_size=2)
    saved = np.load(tmp_path / "pred" / report.rows[0]["logit_map"])
    assert saved.shape == HW
    model_res = predict_run(runs["tiling"], images, tmp_path / "pred_model", device="cpu",
                            progress=False, map_resolution="model")
    assert np.load(tmp_path / "pred_model" / model_res.rows[0]["logit_map"]).shape == (60, 200)
    with open(tmp_path / "pred" / "scores.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["image_score"] == str(report.rows[0]["image_score"])


def test_tiled_maps_of_the_test_set_match_the_sliding_window(runs, strips):
    model = load_model(runs["tiling"], "cpu")
    geometry = Geometry.from_config(model.config.data)
    dataset = MVTecTestDataset(strips, "strip", geometry)
    item = dataset[0]
    placement = geometry.place(HW)
    (anomaly, logit, signal), = predict_placed(model.generator, [item["image"]], [placement],
                                               geometry)
    assert signal is None  # no signal image map under tiling
    full, full_logit = sliding_window_scores(model.generator, item["image"], placement,
                                             geometry)
    assert torch.equal(anomaly, crop(full, placement)) and anomaly.shape == (60, 200)
    assert torch.equal(logit, crop(full_logit, placement))


def test_detector_works_with_non_square_inputs_and_refuses_tiling(runs, strips, tmp_path):
    from anoseg.detector_training import train_detector
    from anoseg.errors import ConfigError
    from anoseg.models.detector import AnoSegDetector

    detector = AnoSegDetector(image_size=(64, 192), width=0.125).eval()
    scores = detector.score(torch.rand(2, 3, 64, 192), torch.ones(2, 1, 64, 192))
    assert scores.shape == (2,)
    train_detector(runs["keep_aspect"], ["detector.steps=2", "detector.batch_size=4"],
                   output_dir=tmp_path / "det", progress=False)
    from anoseg.inference import load_detector

    bundle = load_detector(tmp_path / "det")
    model = load_model(runs["keep_aspect"], "cpu")
    result = evaluate_category(model, strips, "strip", batch_size=4, progress=False,
                               detector=bundle)
    assert result.image_auroc_detector is not None
    with pytest.raises(ConfigError, match="data.tiling"):
        train_detector(runs["tiling"], ["detector.steps=1"], output_dir=tmp_path / "d2",
                       progress=False)


def test_dev_suite_scores_tiling_and_a_keep_aspect_floor_at_native_size(strips, tmp_path):
    from anoseg.dev_suite import floor_file, run_suite

    sets = {"strip": (strips, "strip")}
    results = run_suite(sets, "configs/cpu_unseen.yaml",
                        TINY + TILING + ["model.width=0.125", "train.channels_last=false",
                                         "train.precision=fp32", "model.normal_stats=false",
                                         "model.feature_stats=false",
                                         "model.residual_weight=0", "model.lowpass_weight=0",
                                         "model.lowpass_roughness=false",
                                         "eval.image_score=max"],
                        budget=600, seeds=[0], output_dir=tmp_path / "suite",
                        image_size=(64, 192), floor_resize="keep_aspect", resolution="native")
    for method in ("model", "floor"):
        assert set(results["strip"][method]) == {"all", "dent"}
        assert 0.0 <= results["strip"][method]["all"]["pixel_auroc"] <= 1.0
    # the dark dents are far from the strips' per-pixel normal values
    assert results["strip"]["floor"]["all"]["pixel_auroc"] > 0.9
    name = floor_file((64, 192), "keep_aspect", "native")
    assert name == "floor_64x192_keep_aspect_native.json"
    assert (tmp_path / "suite" / "strip" / name).is_file()
    assert floor_file(128, "stretch", "model") == "floor.json"


def test_threshold_cache_is_reused_for_a_height_width_run(runs):
    from anoseg.threshold import cached_label_free_threshold, holdout_image_paths

    model = load_model(runs["keep_aspect"], "cpu")
    holdout = holdout_image_paths(model)
    checkpoint = runs["keep_aspect"] / "checkpoints" / "last.pt"
    first, _ = cached_label_free_threshold(model, checkpoint, holdout)
    again, cached = cached_label_free_threshold(model, checkpoint, holdout)
    assert cached and again == first
    model.config.eval.resolution = "native"  # another resolution: its own threshold
    _, cached = cached_label_free_threshold(model, checkpoint, holdout)
    assert not cached


@pytest.mark.parametrize("aspect", [0.2, 0.3, 0.41, 0.75, 1.0, 1.33, 2.5, 4.0])
def test_match_aspect_canvas_keeps_the_pixels_and_follows_the_shape(aspect):
    from anoseg.data.geometry import match_aspect_canvas

    sizes = [(int(round(1000 * aspect)), 1000), (int(round(1100 * aspect)), 1100)]
    h, w = match_aspect_canvas((128, 128), sizes)
    assert h % 32 == 0 and w % 32 == 0 and 64 <= min(h, w) and max(h, w) <= 512
    assert 0.5 * 128 * 128 <= h * w <= 1.15 * 128 * 128
    # the canvas leans the way the images do, and squeezes no side much more than the other
    if not 0.7 < aspect < 1.4:  # near a square, 128x128 is as close as any multiple of 32
        assert (h > w) == (aspect > 1)
    assert abs(np.log(h / w / aspect)) < 0.35
    assert match_aspect_canvas((128, 128), [(640, 640)]) == (128, 128)


def test_match_aspect_canvas_uses_the_median_shape():
    from anoseg.data.geometry import match_aspect_canvas

    tall, wide = (1250, 500), (208, 512)
    assert match_aspect_canvas((128, 128), [tall, tall, wide]) == (192, 96)
    assert match_aspect_canvas((128, 128), [wide, wide, tall]) == (96, 192)
    with pytest.raises(ValueError):
        match_aspect_canvas((128, 128), [])


def test_match_aspect_run_saves_its_resolved_canvas_and_resumes(strips, tmp_path):
    overrides = TINY + ["data.image_size=128", "data.resize=match_aspect",
                        f"data.root={strips}", "data.category=strip", "train.steps=3"]
    cfg = load_config(None, overrides)
    assert cfg.data.resize == "match_aspect"
    with pytest.raises(ValueError, match="match_aspect"):  # unresolved, it places nothing
        Geometry.from_config(cfg.data).place((300, 1000))
    from anoseg.data.geometry import match_aspect_canvas

    canvas_hw = match_aspect_canvas((128, 128), [HW])
    assert canvas_hw[1] >= 3 * canvas_hw[0]  # the strips are 300 x 1000
    run = tmp_path / "run"
    train(cfg, run, progress=False, stop_at=2)  # as if interrupted
    saved = load_config(run / "config.yaml")
    assert tuple(saved.data.image_size) == canvas_hw and saved.data.resize == "stretch"
    result = train(cfg, run, progress=False, resume=True)
    assert result.steps == 3
    model = load_model(run, "cpu")
    assert tuple(model.config.data.image_size) == canvas_hw
    assert model.config.data.resize == "stretch"
    canvas, placement = load_placed_image(
        sorted((strips / "strip" / "test" / "dent").glob("*.png"))[0],
        Geometry.from_config(model.config.data))
    assert tuple(canvas.shape[-2:]) == canvas_hw and placement.is_full
    maps, _ = predict_anomaly_scores(model.generator, canvas[None].float() / 255.0)
    assert tuple(maps.shape[-2:]) == canvas_hw


def test_dev_suite_floor_on_the_matched_canvas(strips):
    from anoseg.dev_suite import gaussian_floor

    floor = gaussian_floor(strips, "strip", 128, "match_aspect")
    assert floor["all"]["pixel_auroc"] > 0.9  # the dark dents, on the matched canvas
