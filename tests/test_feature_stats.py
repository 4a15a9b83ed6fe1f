"""model.feature_stats: the per-location Gaussian of the encoder's fine features, a second
signal summed with the map head's logit at inference (fitted when training stops)."""

import copy
import math

import numpy as np
import pytest
import torch

from anoseg.config import load_config
from anoseg.errors import ConfigError
from anoseg.models.generator import (COMBINED_LOGIT_KNEE, FEATURE_STATS_OFFSET,
                                     AnoSegGenerator, soft_knee)


def _normal_images(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, size)
    base = (0.3 + 0.4 * ys[:, None] * ys[None, :]).expand(3, size, size)
    return (base + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def _fitted(**kwargs):
    torch.manual_seed(0)
    g = AnoSegGenerator(image_size=64, width=0.125, map_skips=2, feature_stats=True, **kwargs)
    train, holdout = _normal_images(96, 0), _normal_images(8, 1)
    g.fit_feature_stats(iter(train.split(32)), iter(holdout.split(4)))
    return g, holdout


def test_fit_then_forward_is_consistent_on_the_held_out_images():
    g, holdout = _fitted()
    assert bool(g.fstats_fitted)
    with torch.no_grad():
        out = g.eval()(holdout)
    anomaly_logit = -out.map_logit
    # both signals are z-scored on exactly these images: their sum has mean 0 (the knee only
    # bends the few values above COMBINED_LOGIT_KNEE, so undo it before averaging)
    linear = torch.where(anomaly_logit > COMBINED_LOGIT_KNEE,
                         COMBINED_LOGIT_KNEE + torch.expm1(anomaly_logit - COMBINED_LOGIT_KNEE),
                         anomaly_logit)
    assert linear.mean().item() == pytest.approx(-FEATURE_STATS_OFFSET, abs=1e-3)
    assert torch.allclose(out.normality_map, torch.sigmoid(out.map_logit))


def test_the_knee_keeps_the_order_and_the_sigmoid_from_saturating():
    x = torch.tensor([-20.0, 0.0, COMBINED_LOGIT_KNEE, 5.0, 17.0, 100.0, 1000.0, 1e4])
    y = soft_knee(x)
    assert torch.equal(y[:3], x[:3])  # unchanged up to the knee
    assert (y.diff() > 0).all()  # strictly increasing
    assert y[-2].item() == pytest.approx(COMBINED_LOGIT_KNEE + math.log(1 + 1000 - 4), rel=1e-6)
    assert (torch.sigmoid(y) < 1.0).all() and len(set(torch.sigmoid(y).tolist())) == len(y)


def test_feature_distance_marks_a_changed_square():
    g, _ = _fitted()
    g.eval()
    image = _normal_images(1, 2)
    image[:, :, 20:32, 36:48] = 0.95
    with torch.no_grad():
        levels = g.encoder.features(g._inputs(image))
        dist = g.feature_distance(levels, (64, 64))[0, 0]
    inside = dist[22:30, 38:46]
    outside = torch.ones_like(dist, dtype=torch.bool)
    outside[14:38, 30:54] = False
    assert inside.min() > torch.quantile(dist[outside], 0.99)


def test_training_mode_and_unfitted_models_use_the_map_head_alone():
    g, holdout = _fitted()
    plain = copy.deepcopy(g)
    plain.fstats_fitted.fill_(0.0)
    plain.load_state_dict(plain.state_dict())  # the loaded flag says "not fitted"
    assert not plain.fstats_ready
    g.train(), plain.train()
    torch.manual_seed(1)
    a = g(holdout)
    torch.manual_seed(1)
    b = plain(holdout)
    assert torch.equal(a.map_logit, b.map_logit)
    g.eval(), plain.eval()
    assert not torch.equal(g(holdout).map_logit, plain(holdout).map_logit)


def _tiny_run_overrides(root):
    return ["data.image_size=64", "model.width=0.125", "model.map_skips=2",
            "model.normal_stats=true", "model.feature_stats=true", "train.steps=4",
            "train.checkpoint_every=2", "train.batch_size=4", "train.ema_decay=0.9",
            "data.num_workers=0", f"data.root={root}", "data.category=widget"]


def _count_fits(monkeypatch):
    calls = []
    original = AnoSegGenerator.fit_feature_stats

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AnoSegGenerator, "fit_feature_stats", counting)
    return calls


def test_a_trained_run_saves_fitted_statistics_for_raw_and_averaged_weights(tmp_path,
                                                                           make_mvtec,
                                                                           monkeypatch):
    from anoseg.checkpoint import load_checkpoint
    from anoseg.inference import load_model, predict_anomaly_scores
    from anoseg.training import train

    root = make_mvtec(n_train=10, image_hw=(64, 64))
    fits = _count_fits(monkeypatch)
    train(load_config(None, _tiny_run_overrides(root)), tmp_path / "run", progress=False)
    # fitted once, at the final checkpoint, for the raw and the averaged weights (not at the
    # periodic checkpoint of step 2)
    assert len(fits) == 2
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    for key in ("generator", "generator_ema"):
        assert float(ckpt[key]["fstats_fitted"]) == 1.0
        assert ckpt[key]["fstats_scale"][1] > 0 and ckpt[key]["fstats_scale"][3] > 0
    # the two sets of weights have their own statistics
    assert not torch.equal(ckpt["generator"]["fstats_mean"], ckpt["generator_ema"]["fstats_mean"])
    model = load_model(tmp_path / "run", "cpu")
    images = torch.rand(2, 3, 64, 64)
    maps, logits = predict_anomaly_scores(model.generator, images)
    assert maps.shape == (2, 64, 64) and torch.isfinite(logits).all()


def test_a_crash_leaves_an_unfitted_checkpoint_that_resume_completes(tmp_path, make_mvtec,
                                                                    monkeypatch):
    import anoseg.training as training
    from anoseg.checkpoint import load_checkpoint
    from anoseg.inference import load_model

    root = make_mvtec(n_train=10, image_hw=(64, 64))
    cfg = load_config(None, _tiny_run_overrides(root))
    original = training.train_step

    def crash_after_step_2(state, *args, **kwargs):
        if state.step == 2:
            raise RuntimeError("simulated crash")
        return original(state, *args, **kwargs)

    monkeypatch.setattr(training, "train_step", crash_after_step_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(cfg, tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 2
    for key in ("generator", "generator_ema"):
        assert float(ckpt[key]["fstats_fitted"]) == 0.0
    with pytest.warns(UserWarning, match="not fitted"):
        model = load_model(tmp_path / "run", "cpu")
    assert not model.generator.fstats_ready

    monkeypatch.setattr(training, "train_step", original)
    training.train(cfg, tmp_path / "run", progress=False, resume=True)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 4
    for key in ("generator", "generator_ema"):
        assert float(ckpt[key]["fstats_fitted"]) == 1.0
    assert load_model(tmp_path / "run", "cpu").generator.fstats_ready


def test_feature_stats_is_refused_with_tiling():
    with pytest.raises(ConfigError, match="model.feature_stats"):
        load_config(None, ["model.feature_stats=true", "data.tiling.enabled=true"]).validate()


def test_the_signal_image_map_z_scores_each_signals_image_maxima_on_the_held_out_images():
    from anoseg.models.generator import IMAGE_SCALE_STD_FLOOR

    g, holdout = _fitted(reconstruction=True, compare_head=True, residual_weight=1.0)
    g.eval()
    assert g.has_signal_image_map()
    with torch.no_grad():
        signals = g._signals(holdout)
        image_map = g.signal_image_map(holdout)
    assert len(signals) == 3 and image_map.shape == (len(holdout), 1, 64, 64)
    z = []
    for i, sig in enumerate(signals):
        peaks = sig.flatten(1).amax(1).double()
        z_i = (peaks - g.fstats_image_scale[i, 0]) / g.fstats_image_scale[i, 1]
        assert z_i.mean().item() == pytest.approx(0.0, abs=1e-3)  # float32 buffers
        # the std of the maxima, floored at a fraction of the signal's pixel std
        floor = IMAGE_SCALE_STD_FLOOR * sig.flatten().double().std().item()
        assert g.fstats_image_scale[i, 1].item() == pytest.approx(
            max(peaks.std().item(), floor), rel=1e-3)
        z.append(z_i)
    # the map's maximum is the largest of the signals' image-level z-scores
    expected = torch.stack(z).amax(0)
    assert torch.allclose(image_map.flatten(1).amax(1).double(), expected, atol=1e-4)
    changed = holdout[:1].clone()
    changed[:, :, 20:30, 20:30] = 1.0 - changed[:, :, 20:30, 20:30]
    with torch.no_grad():
        score = g.signal_image_map(changed).amax()
    assert score > expected.max()


def test_signals_mean_is_the_mean_of_each_signals_image_level_z_score():
    from anoseg.inference import predict_placed
    from anoseg.data.geometry import Geometry, Placement
    from anoseg.threshold import scored_image_scores

    g, holdout = _fitted(reconstruction=True, compare_head=True, residual_weight=1.0)
    g.eval()
    with torch.no_grad():
        signals = g._signals(holdout)
    z = torch.stack([(sig.flatten(1).amax(1) - g.fstats_image_scale[i, 0])
                     / g.fstats_image_scale[i, 1] for i, sig in enumerate(signals)])
    full = [Placement((64, 64), (64, 64), (0, 0, 64, 64))] * len(holdout)
    scored = predict_placed(g, holdout, full, Geometry((64, 64), "stretch"))
    assert all(s.signal.shape == (3, 64, 64) for s in scored)
    got = scored_image_scores(scored)
    assert got["signals_mean"] == pytest.approx(z.mean(0).tolist(), abs=1e-4)
    assert got["signals_max"] == pytest.approx(z.amax(0).tolist(), abs=1e-4)
    assert np.all(got["signals_mean"] <= got["signals_max"] + 1e-9)


def test_the_signal_image_map_without_the_residual_has_two_signals():
    g, holdout = _fitted()
    assert torch.all(g.fstats_image_scale[:2, 1] > 0) and torch.all(g.fstats_image_scale[2] == 0)
    with torch.no_grad():
        assert g.eval().signal_image_map(holdout).shape == (len(holdout), 1, 64, 64)


def test_the_forward_pass_returns_the_signal_image_map_of_the_same_pass():
    g, holdout = _fitted()
    g.eval()
    with torch.no_grad():
        out = g(holdout, reconstruct=False)
        assert out.signal_maps is not None and out.signal_maps.shape == (len(holdout), 2, 64, 64)
        assert torch.allclose(out.signal_maps, g.signal_maps(holdout), atol=1e-5)
        assert torch.allclose(out.signal_maps.amax(1, keepdim=True), g.signal_image_map(holdout),
                              atol=1e-5)
        # the combined map is the combination of the same signals
        signals = g._signals(holdout)
        assert torch.allclose(out.map_logit, -g.combined_anomaly_logit(signals), atol=1e-5)
        assert g.train()(holdout).signal_maps is None  # training mode: no inference signals


def test_a_checkpoint_from_before_the_signal_image_map_loads_without_it():
    from anoseg.data.geometry import Geometry, Placement
    from anoseg.inference import predict_placed

    g, holdout = _fitted()
    state = {k: v for k, v in g.state_dict().items() if k != "fstats_image_scale"}
    old = AnoSegGenerator(image_size=64, width=0.125, map_skips=2, feature_stats=True)
    old.load_state_dict(state)  # strict: the missing buffer is filled as "not fitted"
    assert old.fstats_ready and not old.has_signal_image_map()
    with pytest.raises(ValueError, match="signal image map"):
        old.signal_image_map(holdout)
    full = [Placement((64, 64), (64, 64), (0, 0, 64, 64))] * len(holdout)
    geometry = Geometry((64, 64), "stretch")
    assert all(s.signal is None for s in predict_placed(old, holdout, full, geometry))
    scored = predict_placed(g.eval(), holdout, full, geometry)
    with torch.no_grad():
        assert [float(s.signal.amax()) for s in scored] == pytest.approx(
            g.signal_image_map(holdout).flatten(1).amax(1).tolist(), abs=1e-5)


def test_the_signal_score_reads_only_the_images_box():
    from anoseg.data.geometry import Geometry, Placement
    from anoseg.inference import ScoredMap, predict_placed
    from anoseg.threshold import scored_image_scores

    g, holdout = _fitted()
    g.eval()
    changed = holdout[:1].clone()
    changed[:, :, 50:60, 50:60] = 1.0  # a bright square in what the placement calls padding
    geometry = Geometry((64, 64), "keep_aspect")
    inside = Placement((40, 64), (64, 64), (0, 0, 40, 64))
    with torch.no_grad():
        image_map = g.signal_image_map(changed)[0, 0]
    scored = predict_placed(g, changed, [inside], geometry)
    got = scored_image_scores(scored)["signals_max"]
    assert got[0] == pytest.approx(image_map[:40].max().item(), abs=1e-5)
    assert got[0] < image_map.max().item()
    # without a signal map on every image, there is no signals_max
    mixed = [scored[0], ScoredMap(scored[0].anomaly, scored[0].logit, None)]
    assert "signals_max" not in scored_image_scores(mixed)


@pytest.mark.parametrize("score", ["signals_max", "signals_mean"])
def test_a_signal_score_is_the_headline_score_of_eval_predict_and_the_threshold(
        score, tmp_path, make_mvtec):
    import csv

    import numpy as np

    from anoseg.data.geometry import Geometry
    from anoseg.data.mvtec import MVTecTestDataset, placement_of
    from anoseg.evaluation import evaluate_run
    from anoseg.inference import load_model, predict_placed
    from anoseg.metrics import image_auroc
    from anoseg.predict import predict_run
    from anoseg.threshold import holdout_image_paths, holdout_image_scores
    from anoseg.training import train

    root = make_mvtec(n_train=10, n_test_good=3, defects={"crack": 3}, image_hw=(64, 64))
    train(load_config(None, _tiny_run_overrides(root) + [
        "data.holdout_fraction=0.3", f"eval.image_score={score}"]),
        tmp_path / "run", progress=False)
    result = evaluate_run(tmp_path / "run", output_dir=tmp_path / "eval", device="cpu",
                          progress=False).results["widget"]
    model = load_model(tmp_path / "run", "cpu")
    dataset = MVTecTestDataset(root, "widget", 64)
    items = [dataset[i] for i in range(len(dataset))]
    scored = predict_placed(model.generator, torch.stack([it["image"] for it in items]),
                            [placement_of(it["placement"]) for it in items],
                            Geometry.from_config(model.config.data))
    peaks = [s.signal.flatten(1).amax(1) for s in scored]  # each signal's image maximum
    scores = np.array([float(p.amax() if score == "signals_max" else p.mean()) for p in peaks])
    labels = np.array([bool(it["label"]) for it in items])
    assert result.image_auroc_scores[score] == pytest.approx(image_auroc(labels, scores))
    # 3 held-out images cannot resolve the 0.99 quantile: the threshold is their maximum
    assert any("largest score of only 3 held-out" in w for w in result.warnings)
    assert result.image_auroc == pytest.approx(image_auroc(labels, scores))
    # the label-free image threshold is a quantile of the held-out images' score
    holdout = holdout_image_scores(model, holdout_image_paths(model, run_dir=tmp_path / "run"))
    assert len(holdout[score]) == 3
    test_dirs = sorted((root / "widget" / "test").iterdir())
    report = predict_run(tmp_path / "run", test_dirs, tmp_path / "pred",
                         device="cpu", progress=False)
    assert report.image_score == score
    assert report.image_threshold <= max(holdout[score]) + 1e-6
    assert report.image_threshold >= min(holdout[score]) - 1e-6
    rows = list(csv.DictReader((tmp_path / "pred" / "scores.csv").open()))
    by_path = {row["path"]: float(row["image_score"]) for row in rows}
    for item, value in zip(items, scores):
        assert by_path[str(item["path"])] == pytest.approx(value, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("score", ["signals_max", "signals_mean"])
def test_signal_scores_need_feature_stats(score):
    from anoseg.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.image_score"):
        load_config(None, [f"eval.image_score={score}", "model.feature_stats=false"])


@pytest.mark.parametrize("score", ["signals_max", "signals_mean"])
def test_a_signal_score_falls_back_to_max_without_fitted_signal_maps(score):
    from types import SimpleNamespace

    from anoseg.threshold import headline_image_score

    cfg = load_config(None, [f"eval.image_score={score}", "model.feature_stats=true"])
    for fitted, expected in ((True, score), (False, "max")):
        model = SimpleNamespace(config=cfg,
                                generator=SimpleNamespace(has_signal_image_map=lambda f=fitted: f))
        warnings = []
        assert headline_image_score(model, None, warnings) == expected
        assert bool(warnings) == (not fitted)
        assert all(score in w for w in warnings)
