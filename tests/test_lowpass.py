"""model.lowpass_weight: the low-pass brightness / colour signal added to the combined anomaly
logit of feature_stats (large faint stains the texture hides)."""

import pytest
import torch

from anoseg.config import load_config
from anoseg.errors import ConfigError
from anoseg.models.generator import COMBINED_LOGIT_KNEE, AnoSegGenerator, soft_knee
from anoseg.models.lowpass import (LOWPASS_QUANTILE, LowPassStats, lowpass_features,
                                   median_and_spread)


def _weave(n, seed, size=64):
    """Textured normal images: a random-phase checker of threads, a random global tint and
    brightness (both normal: the signal is relative to each image's median)."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.arange(size, dtype=torch.float32)
    out = []
    for _ in range(n):
        dy, dx = torch.randint(0, 8, (2,), generator=g).tolist()
        checker = (((ys[:, None] + dy) // 4 + (ys[None, :] + dx) // 4) % 2).float()
        tint = 1.0 + 0.08 * (torch.rand(3, 1, 1, generator=g) - 0.5)
        bright = 0.8 + 0.3 * torch.rand(1, generator=g)
        grey = (0.35 + 0.3 * checker) * bright
        noise = 0.02 * torch.randn(3, size, size, generator=g)
        out.append((grey[None] * tint + noise).clamp(0, 1))
    return torch.stack(out)


def _stain(images, box=(slice(16, 48), slice(8, 40)), shift=(1.0, 0.93, 0.85)):
    """The images with a faint colour change (7-15 % per channel) over a quarter of each."""
    stained = images.clone()
    factor = torch.tensor(shift).view(3, 1, 1)
    stained[:, :, box[0], box[1]] *= factor
    return stained


def _fitted_stats(size=64):
    stats = LowPassStats((size, size))
    for batch in _weave(48, 0, size).split(16):
        stats.accumulate(batch)
    stats.finish_training_images()
    stats.fit_scale(stats.signal(_weave(8, 1, size)), unit=3.0)
    return stats


def test_the_features_ignore_a_uniform_tint_and_brightness():
    images = _weave(2, 5)
    changed = (images * torch.tensor([1.05, 0.97, 0.9]).view(1, 3, 1, 1) * 1.1).clamp(0, 1)
    a, b = lowpass_features(images), lowpass_features(changed)
    # relative to the image's own median: only the brightness floor (0.02) leaves a trace
    assert (a - b).abs().max().item() < 0.02
    assert a.shape == (2, 4, 64, 64)


def test_grey_images_have_no_colour_signal_and_autocast_changes_nothing():
    grey = _weave(2, 6).mean(1, keepdim=True).expand(-1, 3, -1, -1)
    feats = lowpass_features(grey)
    assert feats[:, 1:].abs().max().item() < 1e-6  # chromaticity exactly 1, minus its median
    assert feats[:, 0].abs().max().item() > 0.05  # the brightness still varies
    images = _weave(2, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = lowpass_features(images)
    assert under.dtype == torch.float32 and torch.equal(under, lowpass_features(images))


def test_the_signal_outlines_a_faint_stain_that_the_texture_hides():
    stats = _fitted_stats()
    normal = _weave(4, 7)
    stained = _stain(normal)
    # the change is fainter than the texture's own contrast (threads differ by ~0.3)
    assert (stained - normal).abs().max().item() < 0.12
    with torch.no_grad():
        on_normal = stats.scaled(normal)
        on_stained = stats.scaled(stained)
    inside = on_stained[:, :, 20:44, 12:36]  # the stain, away from its edges
    outside = on_stained[:, :, :, 44:]
    # above the normal pixels' 0.999 quantile (1 on this scale); the rest near their median (0)
    assert inside.mean().item() > 1.5
    assert outside.mean().item() < 0.3 and on_normal.mean().item() < 0.3
    # on the held-out scale: median 0, quantile LOWPASS_QUANTILE at 1
    held = stats.scaled(_weave(8, 1)).flatten()
    assert held.median().item() == pytest.approx(0.0, abs=1e-5)
    assert torch.quantile(held, LOWPASS_QUANTILE).item() == pytest.approx(1.0, abs=1e-3)
    assert stats.lowpass_scale[2].item() == 3.0


def _generator(weight, **kwargs):
    torch.manual_seed(0)
    g = AnoSegGenerator(image_size=64, width=0.125, map_skips=2, feature_stats=True,
                        lowpass_weight=weight, **kwargs)
    g.fit_feature_stats(iter(_weave(48, 0).split(16)), iter(_weave(8, 1).split(4)))
    return g.eval()


def test_the_generator_adds_the_weighted_signal_to_the_combined_logit():
    with_it, without = _generator(0.5), _generator(0.0)
    # the same weights and feature statistics: only the low-pass term differs
    assert torch.equal(with_it.fstats_mean, without.fstats_mean)
    images = _stain(_weave(2, 9))
    with torch.no_grad():
        a, b = with_it(images), without(images)
        term = with_it.lowpass_term(images)
    # added to the combined anomaly logit, and the sum bent by the knee again
    assert torch.allclose(-a.map_logit, soft_knee(-b.map_logit + term), atol=1e-4)
    unit = with_it.lowpass.lowpass_scale[2].item()
    assert unit > 0
    # the stain rises against the rest of the image
    rise = term / unit
    assert rise[:, :, 20:44, 12:36].mean() > rise[:, :, :, 44:].mean() + 0.5
    assert (-a.map_logit)[:, :, 20:44, 12:36].mean() > (-b.map_logit)[:, :, 20:44, 12:36].mean()


def test_the_unit_is_the_held_out_spread_of_the_combined_logit_residual_included():
    g = _generator(0.5, reconstruction=True, residual_weight=1.0)
    holdout = _weave(8, 1)
    with torch.no_grad():
        combined = g.combined_anomaly_logit(g._signals(holdout))
    assert len(g._signals(holdout)) == 3  # the residual is one of them
    assert g.lowpass.lowpass_scale[2].item() == pytest.approx(median_and_spread(combined)[1],
                                                              rel=1e-4)


def test_a_strong_stain_does_not_saturate_the_map():
    g = _generator(2.0)
    images = _stain(_weave(1, 4), shift=(1.0, 0.4, 0.1))  # far beyond any normal colour
    with torch.no_grad():
        out = g(images)
    anomaly = -out.map_logit
    assert g.lowpass_term(images).max() > 30  # the unbent sum would pass float32's sigmoid 1
    assert anomaly.max() < COMBINED_LOGIT_KNEE + 10
    assert (out.normality_map > 0).all() and (out.normality_map < 1).all()


def test_the_statistics_are_saved_with_the_weights():
    g = _generator(0.5)
    state = g.state_dict()
    assert {"lowpass.lowpass_mean", "lowpass.lowpass_std", "lowpass.lowpass_scale"} <= set(state)
    torch.manual_seed(1)
    h = AnoSegGenerator(image_size=64, width=0.125, map_skips=2, feature_stats=True,
                        lowpass_weight=0.5)
    h.load_state_dict(state)
    images = _stain(_weave(1, 3))
    with torch.no_grad():
        assert torch.allclose(h.eval()(images).map_logit, g(images).map_logit, atol=1e-5)


def test_a_run_without_it_has_no_low_pass_buffers():
    g = AnoSegGenerator(image_size=64, width=0.125, feature_stats=True)
    assert g.lowpass is None
    assert not any(k.startswith("lowpass") for k in g.state_dict())


@pytest.mark.parametrize("overrides,match", [
    (["model.lowpass_weight=-1"], "model.lowpass_weight"),
    (["model.lowpass_weight=0.5", "model.feature_stats=false"], "model.lowpass_weight"),
])
def test_bad_lowpass_weights_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_a_trained_run_fits_and_keeps_the_low_pass_statistics(tmp_path, make_mvtec):
    from anoseg.checkpoint import load_checkpoint
    from anoseg.inference import load_model, predict_anomaly_scores
    from anoseg.training import train

    root = make_mvtec(n_train=10, image_hw=(64, 64))
    overrides = ["data.image_size=64", "model.width=0.125", "model.map_skips=2",
                 "model.feature_stats=true", "model.lowpass_weight=0.5", "train.steps=2",
                 "train.batch_size=4", "train.ema_decay=0.9", "data.num_workers=0",
                 f"data.root={root}", "data.category=widget"]
    train(load_config(None, overrides), tmp_path / "run", progress=False)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    for key in ("generator", "generator_ema"):
        scale = ckpt[key]["lowpass.lowpass_scale"]
        assert scale[1] > 0 and scale[2] > 0  # fitted: a spread and a unit
        assert (ckpt[key]["lowpass.lowpass_std"] > 0).all()
    model = load_model(tmp_path / "run", "cpu")
    assert model.generator.lowpass_weight == 0.5
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        term = model.generator.lowpass_term(images)
    maps, logits = predict_anomaly_scores(model.generator, images)
    assert torch.isfinite(logits).all() and term.abs().sum() > 0


def _smoothed(images, box=(slice(0, 24), slice(None))):
    """The images with their texture smoothed (a 5 x 5 box mean) over a band along the top,
    its mean brightness unchanged: a change of finish, not of brightness."""
    out = images.clone()
    blurred = torch.nn.functional.avg_pool2d(
        torch.nn.functional.pad(images, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    out[:, :, box[0], box[1]] = blurred[:, :, box[0], box[1]]
    return out


def test_the_roughness_channel_sees_a_smoothed_band_that_brightness_misses():
    train, held = _weave(48, 0), _weave(8, 1)
    four, five = LowPassStats((64, 64)), LowPassStats((64, 64), roughness=True)
    for stats in (four, five):
        for batch in train.split(16):
            stats.accumulate(batch)
        stats.finish_training_images()
        stats.fit_scale(stats.signal(held))
    assert five.lowpass_mean.shape == (1, 5, 64, 64)
    assert lowpass_features(held, roughness=True).shape == (8, 5, 64, 64)
    # the first four channels are the same as without roughness
    assert torch.equal(lowpass_features(held, roughness=True)[:, :4], lowpass_features(held))
    band = _smoothed(_weave(4, 7))
    with torch.no_grad():
        rise = {n: s.scaled(band)[:, :, 4:20].mean() - s.scaled(band)[:, :, 36:].mean()
                for n, s in (("four", four), ("five", five))}
    assert rise["five"] > 1.0  # above the normal pixels' 0.999 quantile against the rest
    assert rise["five"] > rise["four"] + 0.5


def test_roughness_needs_the_low_pass_signal():
    with pytest.raises(ConfigError, match="model.lowpass_roughness"):
        load_config(None, ["model.lowpass_roughness=true"])
    cfg = load_config(None, ["model.feature_stats=true", "model.lowpass_weight=0.5",
                             "model.lowpass_roughness=true"])
    assert cfg.model.lowpass_roughness


def _tiny_run(tmp_path, make_mvtec, *extra):
    from anoseg.training import train

    root = make_mvtec(n_train=10, image_hw=(64, 64))
    overrides = ["data.image_size=64", "model.width=0.125", "model.map_skips=2",
                 "model.feature_stats=true", "model.lowpass_weight=0.5", "train.steps=2",
                 "train.batch_size=4", "train.ema_decay=0.9", "data.num_workers=0",
                 f"data.root={root}", "data.category=widget", *extra]
    train(load_config(None, overrides), tmp_path / "run", progress=False)
    return tmp_path / "run"


def test_a_refit_adds_the_roughness_channel_and_keeps_the_weights(tmp_path, make_mvtec):
    from anoseg.checkpoint import load_checkpoint
    from anoseg.inference import load_model
    from anoseg.refit import refit_run
    from anoseg.run_dir import RunDir

    run = _tiny_run(tmp_path, make_mvtec)
    out = refit_run(run, tmp_path / "rough", ["model.lowpass_roughness=true"], device="cpu",
                    progress=False)
    old, new = load_checkpoint(RunDir(run).checkpoint), load_checkpoint(RunDir(out).checkpoint)
    assert new["config"]["model"]["lowpass_roughness"] is True
    assert new["step"] == old["step"] and new["split"] == old["split"]
    for key in ("generator", "generator_ema"):
        assert new[key]["lowpass.lowpass_mean"].shape[1] == 5
        assert old[key]["lowpass.lowpass_mean"].shape[1] == 4
        # the weights and the fitted feature statistics are unchanged (a deterministic fit);
        # the low-pass ones are refitted: the first four channels as before
        for name, value in old[key].items():
            if not name.startswith("lowpass."):
                assert torch.allclose(new[key][name].float(), value.float(), atol=1e-5), name
        assert torch.allclose(new[key]["lowpass.lowpass_mean"][:, :4],
                              old[key]["lowpass.lowpass_mean"], atol=1e-6)
        assert new[key]["lowpass.lowpass_scale"][1] > 0
    assert RunDir(out).read_summary()["refit"]["set"] == ["model.lowpass_roughness=true"]
    model = load_model(out, "cpu")  # the old run still loads with its four channels
    assert model.generator.lowpass.roughness
    assert not load_model(run, "cpu").generator.lowpass.roughness


def test_a_refit_refuses_keys_that_change_the_weights_and_its_own_folder(tmp_path, make_mvtec):
    from anoseg.errors import CheckpointError, OutputError
    from anoseg.refit import refit_run

    run = _tiny_run(tmp_path, make_mvtec)
    with pytest.raises(ConfigError, match="model.width"):
        refit_run(run, tmp_path / "x", ["model.width=0.25"], device="cpu", progress=False)
    with pytest.raises(OutputError, match="another folder"):
        refit_run(run, run, ["model.lowpass_roughness=true"], device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="holds no run"):
        refit_run(tmp_path / "nothing", tmp_path / "y", [], device="cpu", progress=False)
    refit_run(run, tmp_path / "z", [], device="cpu", progress=False)
    with pytest.raises(CheckpointError, match="already holds"):
        refit_run(run, tmp_path / "z", [], device="cpu", progress=False)


def test_the_refit_script_writes_a_run_or_names_the_bad_key(tmp_path, make_mvtec, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "refit_stats.py"
    spec = importlib.util.spec_from_file_location("refit_stats", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = _tiny_run(tmp_path, make_mvtec)
    assert module.main([str(run), str(tmp_path / "bad"), "--set", "train.steps=9",
                        "--device", "cpu", "--no-progress"]) == 2
    assert "train.steps" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "checkpoints").exists()
    assert module.main([str(run), str(tmp_path / "ok"), "--set", "model.lowpass_weight=0.25",
                        "--device", "cpu", "--no-progress"]) == 0
    assert str(tmp_path / "ok") in capsys.readouterr().out
    assert (tmp_path / "ok" / "checkpoints" / "last.pt").is_file()
