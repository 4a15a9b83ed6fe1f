"""Ensembles of runs (anoseg.inference.load_ensemble, anoseg-eval --ensemble) and
data.split_seed."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import anoseg
from anoseg.config import load_config
from anoseg.errors import ConfigError
from anoseg.evaluation import evaluate_run
from anoseg.inference import load_ensemble
from anoseg.training import train

TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        "train.steps=2", "train.checkpoint_every=1000", "eval.num_thresholds=200"]


@pytest.fixture(scope="module")
def members(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("ensemble")
    runs = []
    for seed in (0, 1):
        cfg = load_config(None, TINY + [f"data.root={demo_root}", "data.category=demo_texture",
                                        f"train.seed={seed}", "data.split_seed=0"])
        train(cfg, base / f"seed{seed}", progress=False)
        runs.append(base / f"seed{seed}")
    return runs


def test_ensemble_map_is_the_mean_of_the_members(members):
    images = torch.rand(3, 3, 64, 64)
    single = [anoseg.predict_anomaly_maps(anoseg.load_model(r, device="cpu").generator, images)
              for r in members]
    assert not torch.allclose(single[0], single[1])  # different seeds, different models
    model = load_ensemble(members, device="cpu")
    both = anoseg.predict_anomaly_maps(model.generator, images)
    assert torch.allclose(both, (single[0] + single[1]) / 2, atol=1e-6)
    assert list(model.members) == [str(r) for r in members]
    assert model.step == 4


def test_split_seed_gives_members_one_holdout(members, demo_root, tmp_path):
    splits = [json.loads((r / "split.json").read_text()) for r in members]
    assert splits[0]["holdout"] == splits[1]["holdout"] and splits[0]["holdout"]
    assert load_ensemble(members, device="cpu").data.split.holdout == \
        splits[0]["holdout"]
    # without a shared split seed the members hold out different images
    cfg = load_config(None, TINY + [f"data.root={demo_root}", "data.category=demo_texture",
                                    "train.seed=1"])
    train(cfg, tmp_path / "own_split", progress=False)
    other = json.loads((tmp_path / "own_split" / "split.json").read_text())["holdout"]
    assert other != splits[0]["holdout"]
    mixed = load_ensemble([members[0], tmp_path / "own_split"], device="cpu")
    shared = mixed.data.split.holdout
    assert set(shared) == set(splits[0]["holdout"]) & set(other)


def test_members_must_share_image_size(members, demo_root, tmp_path):
    cfg = load_config(None, TINY + [f"data.root={demo_root}", "data.category=demo_texture",
                                    "data.image_size=96"])
    train(cfg, tmp_path / "bigger", progress=False)
    with pytest.raises(ConfigError, match="data.image_size"):
        load_ensemble([members[0], tmp_path / "bigger"], device="cpu")


def test_evaluate_run_ensemble_writes_one_row(members, tmp_path):
    report = evaluate_run(members, output_dir=tmp_path / "eval", progress=False,
                          ensemble=True)
    assert list(report.results) == ["demo_texture"]
    result = report.results["demo_texture"]
    assert result["ensemble"] == [str(m / "checkpoints" / "last.pt") for m in members]
    assert 0.0 <= result["pixel_auroc"] <= 1.0
    assert result["label_free_threshold"] is not None  # the members share their holdout
    with pytest.raises(ConfigError, match="several runs"):  # would overwrite a member's eval
        evaluate_run(members, progress=False, ensemble=True)


def test_ensemble_of_different_splits_skips_label_free_columns(members, demo_root, tmp_path):
    cfg = load_config(None, TINY + [f"data.root={demo_root}", "data.category=demo_texture",
                                    "train.seed=3", "data.holdout_fraction=0"])
    train(cfg, tmp_path / "other", progress=False)  # trained on every image member 0 held out
    report = evaluate_run([members[0], tmp_path / "other"], output_dir=tmp_path / "eval",
                          progress=False, ensemble=True)
    result = report.results["demo_texture"]
    assert load_ensemble([members[0], tmp_path / "other"]).data.split.holdout == []
    assert result["label_free_threshold"] is None
    assert any("data.split_seed" in w for w in result["warnings"])
    assert not any("holdout_fraction = 0" in w for w in result["warnings"])


def test_predict_ensemble_uses_the_averaged_map_and_the_shared_holdout(members, demo_root,
                                                                      tmp_path):
    import csv

    import numpy as np

    from anoseg.cli.predict import main as predict_main
    from anoseg.inference import scored_images
    from anoseg.threshold import (compute_label_free_threshold, holdout_image_paths,
                                  image_threshold_for)

    images = sorted((demo_root / "demo_texture" / "test").rglob("*.png"))[:3]
    out = tmp_path / "pred"
    flags = [f"--checkpoint={m}" for m in members]
    assert predict_main(flags + ["--ensemble", *map(str, images), "--map-resolution", "model",
                                 "--output-dir", str(out), "--no-progress"]) == 0
    model = load_ensemble(members, device="cpu")
    holdout = holdout_image_paths(model)
    assert holdout  # the members share their split
    info = json.loads((out / "prediction.json").read_text())
    assert info["ensemble"] == [str(m / "checkpoints" / "last.pt") for m in members]
    assert info["threshold"] == pytest.approx(compute_label_free_threshold(model, holdout))
    score = model.config.eval.image_score
    assert info["image_threshold"] == pytest.approx(image_threshold_for(
        model, holdout, score, None, None, batch_size=16, progress=False))
    # the written logit maps are the ensemble's, not the first member's
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["path"]).name for r in rows] == [p.name for p in images]
    written = np.load(out / rows[0]["logit_map"])
    ensemble_map = next(scored_images(model, images[:1]))[0].logit.numpy()
    single_map = next(scored_images(anoseg.load_model(members[0], device="cpu"),
                                    images[:1]))[0].logit.numpy()
    assert not np.allclose(ensemble_map, single_map, atol=1e-4)
    np.testing.assert_allclose(written, ensemble_map, atol=1e-5)


def test_predict_several_runs_need_ensemble(members, demo_root, tmp_path):
    from anoseg.cli.predict import main as predict_main

    image = sorted((demo_root / "demo_texture" / "test").rglob("*.png"))[0]
    with pytest.raises(ConfigError, match="2 runs given: pass --ensemble"):
        predict_main(["--checkpoint", str(members[0]), str(image),
                      "--checkpoint", str(members[1]), "--output-dir", str(tmp_path / "pred"),
                      "--no-progress"])


def test_an_ensemble_never_reads_or_writes_a_members_threshold_cache(members):
    from anoseg.threshold import (cached_holdout_image_scores, cached_label_free_threshold,
                                  holdout_image_paths, image_threshold_cache_path,
                                  threshold_cache_path)

    ckpt = members[0] / "checkpoints" / "last.pt"
    single = anoseg.load_model(members[0], device="cpu")
    ensemble = load_ensemble(members, device="cpu")
    holdout = holdout_image_paths(ensemble)
    own, _ = cached_label_free_threshold(single, ckpt, holdout)  # member 0's own cache
    cached_holdout_image_scores(single, ckpt, holdout)
    files = [threshold_cache_path(ckpt), image_threshold_cache_path(ckpt)]
    before = [f.read_text() for f in files]
    value, from_cache = cached_label_free_threshold(ensemble, ckpt, holdout)
    scores, scores_from_cache = cached_holdout_image_scores(ensemble, ckpt, holdout)
    assert not from_cache and not scores_from_cache
    assert value != pytest.approx(own)  # the ensemble's, not member 0's
    assert [f.read_text() for f in files] == before  # member 0's caches untouched


# ------------------------------------------------------------------ calibrated ensembles


class _Brightness(torch.nn.Module):
    """A stand-in member whose anomaly logit is ``scale * brightness + shift``, plus (with
    ``noise``) a random amount per image on its brightest pixels: unsteady normal peaks."""

    def __init__(self, scale: float, shift: float, noise: float = 0.0) -> None:
        super().__init__()
        self.scale, self.shift, self.noise = scale, shift, noise
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, images, spans=None, *, reconstruct=True):
        from anoseg.models.generator import GeneratorOutput

        anomaly = self.scale * images.mean(1, keepdim=True) + self.shift
        if self.noise:
            seed = int(images.sum().item() * 1000) % 10_000
            gen = torch.Generator().manual_seed(seed)
            peak = torch.rand(images.shape[0], 1, 1, 1, generator=gen)
            anomaly = anomaly + self.noise * peak * (images.mean(1, keepdim=True) > 0.9)
        logit = -anomaly
        return GeneratorOutput(torch.sigmoid(logit), None, logit, None)


def _calibrated(members, normals):
    from anoseg.inference import AnoSegEnsemble, normality_logit_to_anomaly_logit

    ensemble = AnoSegEnsemble(members, "calibrated", groups=range(len(members)))
    ensemble.calibrate([[normality_logit_to_anomaly_logit(m(normals).map_logit)[i, 0]
                         for i in range(len(normals))] for m in members])
    return ensemble


def test_calibrated_ensemble_is_blind_to_each_members_scale():
    normals = torch.rand(8, 3, 16, 16) * 0.8
    normals[:, :, 4:6, 4:6] = 0.95  # a bright spot on every normal image: steady peaks
    tests = torch.rand(4, 3, 16, 16)
    loud = _Brightness(100.0, 50.0)
    one_scale = _calibrated([_Brightness(1.0, 0.0), _Brightness(1.0, 0.0)], normals)
    mixed = _calibrated([_Brightness(1.0, 0.0), loud], normals)
    assert torch.allclose(mixed(tests).map_logit, one_scale(tests).map_logit, atol=1e-4)
    # the plain mean is the loud member's map: 100x the quiet one's logit
    from anoseg.inference import AnoSegEnsemble

    plain = AnoSegEnsemble([_Brightness(1.0, 0.0), loud])(tests).map_logit
    quiet = _Brightness(1.0, 0.0)(tests).map_logit
    assert torch.allclose(plain, (loud(tests).map_logit + quiet) / 2)
    assert not torch.allclose(plain, mixed(tests).map_logit, atol=1.0)
    # a typical normal pixel is quiet, the 0.999 quantile of the normal pixels is at 0
    anomaly = -mixed(normals).map_logit
    assert abs(float(anomaly.median()) + 4.0) < 0.05
    assert abs(float(torch.quantile(anomaly.flatten(), 0.999))) < 0.05


def test_calibrated_ensemble_weights_the_member_with_steady_normal_peaks_more():
    normals = torch.rand(8, 3, 16, 16) * 0.8
    normals[:, :, 4:6, 4:6] = 0.95
    steady, unsteady = _Brightness(1.0, 0.0), _Brightness(1.0, 0.0, noise=5.0)
    ensemble = _calibrated([steady, unsteady], normals)
    weights = ensemble.calibration[:, 2]
    assert float(weights.sum()) == pytest.approx(1.0)
    assert weights[0] > 2 * weights[1]


def test_calibrated_ensemble_takes_fixed_recipe_weights():
    from anoseg.inference import AnoSegEnsemble, normality_logit_to_anomaly_logit

    normals = torch.rand(8, 3, 16, 16) * 0.8
    normals[:, :, 4:6, 4:6] = 0.95
    members = [_Brightness(1.0, 0.0), _Brightness(1.0, 0.0, noise=5.0)]
    # the unsteady member would get the smaller weight; fixed weights put it first
    ensemble = AnoSegEnsemble(members, "calibrated", groups=[0, 1], recipe_weights=[1.0, 3.0])
    ensemble.calibrate([[normality_logit_to_anomaly_logit(m(normals).map_logit)[i, 0]
                         for i in range(len(normals))] for m in members])
    assert ensemble.calibration[:, 2].tolist() == pytest.approx([0.25, 0.75])
    # a weight on one recipe only: a warning, and the steadiness weights
    half = AnoSegEnsemble(members, "calibrated", groups=[0, 1], recipe_weights=[1.0, None])
    with pytest.warns(UserWarning, match="not on recipe 1"):
        half.calibrate([[normality_logit_to_anomaly_logit(m(normals).map_logit)[i, 0]
                         for i in range(len(normals))] for m in members])
    assert half.calibration[0, 2] > 2 * half.calibration[1, 2]
    for bad in ([1.0], [1.0, 0.0], [1.0, float("inf")], [1.0, float("nan")]):
        with pytest.raises(ConfigError, match="recipe weights"):
            AnoSegEnsemble(members, "calibrated", groups=[0, 1], recipe_weights=bad)


def test_recipe_weights_come_from_each_recipes_config():
    from types import SimpleNamespace

    from anoseg.inference import recipe_weights

    general = load_config(None, ["eval.ensemble_weight=0.8"])
    spots = load_config(None, ["eval.ensemble_weight=0.2", "synthesis.blob_p=0.5"])
    unset = load_config(None, ["synthesis.blob_p=0.5"])
    runs = [SimpleNamespace(config=c) for c in (general, general, spots)]
    assert recipe_weights(["a", "b", "c"], runs, [0, 0, 1]) == pytest.approx([0.8, 0.2])
    plain = [SimpleNamespace(config=load_config(None, [])), SimpleNamespace(config=unset)]
    assert recipe_weights(["a", "c"], plain, [0, 1]) is None
    mixed = [SimpleNamespace(config=general), SimpleNamespace(config=unset)]
    assert recipe_weights(["a", "c"], mixed, [0, 1]) == [0.8, None]
    other = load_config(None, ["eval.ensemble_weight=0.5"])
    same_recipe = [SimpleNamespace(config=general), SimpleNamespace(config=other)]
    with pytest.warns(UserWarning, match="runs/b has eval.ensemble_weight=0.5"):
        assert recipe_weights(["runs/a", "runs/b"], same_recipe, [0, 0]) == [0.8]
    for bad in ("0", "-1", ".inf", "true"):
        with pytest.raises(ConfigError, match="eval.ensemble_weight"):
            load_config(None, [f"eval.ensemble_weight={bad}"])


def test_calibrated_ensemble_needs_its_fit_and_a_known_mode():
    from anoseg.inference import AnoSegEnsemble

    with pytest.raises(ConfigError, match="calibrate_ensemble"):
        AnoSegEnsemble([_Brightness(1.0, 0.0)], "calibrated")(torch.rand(1, 3, 8, 8))
    with pytest.raises(ConfigError, match="auto, mean, calibrated"):
        AnoSegEnsemble([_Brightness(1.0, 0.0)], "median")
    with pytest.raises(ConfigError, match="eval.ensemble_combine"):
        load_config(None, ["eval.ensemble_combine=max"])


def test_evaluate_and_predict_a_calibrated_ensemble(members, demo_root, tmp_path):
    from anoseg.predict import predict_run

    plain = evaluate_run(members, output_dir=tmp_path / "mean", progress=False,
                         ensemble=True).results["demo_texture"]
    report = evaluate_run(members, output_dir=tmp_path / "cal", progress=False, ensemble=True,
                          ensemble_combine="calibrated", save_maps=True)
    result = report.results["demo_texture"]
    assert 0.0 <= result["pixel_auroc"] <= 1.0
    assert result["label_free_threshold"] is not None
    # the label-free pixel threshold flags about 0.1 % of the held-out pixels (not the mean's)
    assert result["label_free_threshold"] != plain["label_free_threshold"]
    model = load_ensemble(members, device="cpu")
    model.config.eval.ensemble_combine = "calibrated"
    holdout = [Path(p) for p in model.data.split.holdout]
    anoseg.inference.calibrate_ensemble(model, holdout)
    assert model.generator.is_calibrated
    good = sorted((demo_root / "demo_texture" / "test" / "good").iterdir())[:2]
    out = predict_run(members, good, tmp_path / "pred", ensemble=True,
                      ensemble_combine="calibrated", progress=False)
    expected = anoseg.predict_anomaly_maps(
        model.generator, anoseg.inference.load_images(good, model.config.data.image_size))
    maps = tmp_path / "cal" / "demo_texture" / "maps" / "good"
    saved = [torch.from_numpy(np.load(maps / f"{p.stem}.npy")) for p in good]
    assert torch.allclose(torch.stack(saved), expected, atol=1e-5)
    assert len(out.rows) == 2


def test_recipe_groups_join_seeds_and_part_recipes():
    from anoseg.inference import recipe_groups

    configs = [load_config(None, ["train.seed=0", "data.split_seed=0"]),
               load_config(None, ["model.width=0.5"]),
               load_config(None, ["train.seed=3", "train.time_budget=60", "eval.batch_size=2"])]
    assert recipe_groups(configs) == [0, 1, 0]


def test_calibrated_ensemble_averages_one_recipes_members_first():
    from anoseg.inference import AnoSegEnsemble, normality_logit_to_anomaly_logit

    normals = torch.rand(8, 3, 16, 16) * 0.8
    normals[:, :, 4:6, 4:6] = 0.95
    tests = torch.rand(4, 3, 16, 16)
    members = [_Brightness(1.0, 0.0), _Brightness(3.0, 1.0, noise=5.0)]
    ensemble = AnoSegEnsemble(members, "calibrated", groups=[0, 0])
    ensemble.calibrate([[normality_logit_to_anomaly_logit(m(normals).map_logit)[i, 0]
                         for i in range(len(normals))] for m in members])
    assert ensemble.calibration.shape == (1, 3) and float(ensemble.calibration[0, 2]) == 1.0
    # one recipe: the joint logit is an increasing function of the members' mean logit
    mean = -AnoSegEnsemble(members)(tests).map_logit.flatten()
    joint = -ensemble(tests).map_logit.flatten()
    order = torch.argsort(mean)
    assert bool((joint[order][1:] >= joint[order][:-1] - 1e-5).all())
    with pytest.raises(ConfigError, match="groups"):
        AnoSegEnsemble(members, "calibrated", groups=[0, 2])


def test_auto_calibrates_members_of_several_recipes_only(members, demo_root, tmp_path):
    cfg = load_config(None, TINY + [f"data.root={demo_root}", "data.category=demo_texture",
                                    "data.split_seed=0", "synthesis.blob_p=0.5",
                                    "eval.ensemble_weight=0.25"])
    train(cfg, tmp_path / "other_recipe", progress=False)
    seeds = load_ensemble(members, device="cpu").generator
    assert seeds.groups == [0, 0] and seeds.mode == "mean"
    mixed = load_ensemble([*members, tmp_path / "other_recipe"], device="cpu")
    assert mixed.generator.groups == [0, 0, 1] and mixed.generator.mode == "calibrated"
    assert mixed.generator.recipe_weights == [None, 0.25]  # each recipe's own config
    result = evaluate_run([*members, tmp_path / "other_recipe"], output_dir=tmp_path / "eval",
                          progress=False, ensemble=True).results["demo_texture"]
    assert 0.0 <= result["pixel_auroc"] <= 1.0
    # thresholds given: predict still reads the held-out images, to calibrate (auto)
    from anoseg.predict import predict_run

    good = sorted((demo_root / "demo_texture" / "test" / "good").iterdir())[:1]
    out = predict_run([*members, tmp_path / "other_recipe"], good, tmp_path / "pred",
                      ensemble=True, threshold=0.5, image_threshold=0.0, progress=False)
    assert len(out.rows) == 1 and out.threshold_source == "given"
    mixed.config.eval.ensemble_combine = "mean"
    anoseg.inference.calibrate_ensemble(mixed, [])  # mean asked for: nothing to fit
    assert mixed.generator.mode == "mean"
    mixed.config.eval.ensemble_combine = "auto"
    with pytest.raises(anoseg.errors.DataError, match="same data.split_seed"):
        anoseg.inference.calibrate_ensemble(mixed, [])


def test_ensemble_signal_maps_are_averaged_signal_by_signal():
    from anoseg.inference import mean_signal_maps

    a, b = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    assert torch.allclose(mean_signal_maps([a, b]), (a + b) / 2)
    assert mean_signal_maps([a, None]) is None
    # members with different numbers of signals: each reduced to its largest signal first
    c = torch.rand(2, 2, 8, 8)
    mixed = mean_signal_maps([a, c])
    assert mixed.shape == (2, 1, 8, 8)
    assert torch.allclose(mixed, (a.amax(1, keepdim=True) + c.amax(1, keepdim=True)) / 2)
