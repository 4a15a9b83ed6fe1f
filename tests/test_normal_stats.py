"""model.normal_stats: the per-pixel z-score of the input against the normal training images."""
import pytest
import torch

import anoseg
from anoseg.checkpoint import load_checkpoint
from anoseg.config import load_config
from anoseg.data.mvtec import load_image
from anoseg.data.training_data import SyntheticAnomalyDataset, normal_pixel_statistics
from anoseg.models.generator import STATS_CLIP, STATS_MIN_STD, AnoSegGenerator
from anoseg.run_dir import RunDir


def test_stats_channels_are_the_clipped_z_score():
    g = AnoSegGenerator(image_size=64, width=0.125, normal_stats=True)
    assert g.encoder.conv1.in_channels == 3 + 2 + 3
    mean = torch.rand(3, 64, 64) * 0.5 + 0.25
    std = torch.full((3, 64, 64), 0.1)
    std[0, 0, 0] = 0.0  # a constant pixel: floored, not divided by zero
    g.set_normal_stats(mean, std)
    assert g.stats_std.min().item() == pytest.approx(STATS_MIN_STD)
    at_mean = g.stats_channels(mean.unsqueeze(0))
    assert at_mean.abs().max().item() < 1e-6
    shifted = g.stats_channels((mean + 0.1).unsqueeze(0))  # one std above the mean
    assert torch.allclose(shifted[0, :, 1:, 1:], torch.full_like(shifted[0, :, 1:, 1:],
                                                                 1.0 / STATS_CLIP), atol=1e-5)
    far = g.stats_channels(torch.ones(1, 3, 64, 64) * 10)
    assert far.max().item() == pytest.approx(1.0)  # clipped
    out = g(torch.rand(2, 3, 64, 64))
    assert out.normality_map.shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="statistics are"):
        g.stats_channels(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="without normal_stats"):
        AnoSegGenerator(image_size=64, width=0.125).set_normal_stats(mean, std)


def test_normal_pixel_statistics_match_torch():
    images = (torch.rand(5, 3, 32, 32) * 255).to(torch.uint8)
    dataset = SyntheticAnomalyDataset(images, 32, load_config(None, []).synthesis)
    mean, std = normal_pixel_statistics(dataset)
    floats = images.float() / 255
    assert torch.allclose(mean, floats.mean(0), atol=1e-6)
    assert torch.allclose(std, floats.std(0), atol=1e-5)


def test_training_stores_the_training_images_statistics(demo_root, tmp_path):
    cfg = load_config(None, [
        "data.image_size=64", "model.width=0.125", "train.batch_size=4", "data.num_workers=0",
        f"data.root={demo_root}", "data.category=demo_texture", "train.steps=2",
        "model.normal_stats=true", "train.ema_decay=0.9"])
    anoseg.train(cfg, tmp_path / "run", progress=False)
    split = RunDir(tmp_path / "run").read_split().split
    images = torch.stack([load_image(p, 64) for p in split.train]).float() / 255
    ckpt = load_checkpoint(tmp_path / "run")
    for part in ("generator", "generator_ema"):
        assert torch.allclose(ckpt[part]["stats_mean"][0], images.mean(0), atol=1e-5)
        assert torch.allclose(ckpt[part]["stats_std"][0],
                              images.std(0).clamp_min(STATS_MIN_STD), atol=1e-5)
    model = anoseg.load_model(tmp_path / "run")
    assert torch.equal(model.generator.stats_mean, ckpt["generator_ema"]["stats_mean"])
    maps = anoseg.predict_anomaly_maps(model.generator, torch.rand(2, 3, 64, 64))
    assert maps.shape == (2, 64, 64)


def test_normal_stats_refuses_tiling():
    from anoseg.errors import ConfigError

    with pytest.raises(ConfigError, match="model.normal_stats"):
        load_config(None, ["model.normal_stats=true", "data.tiling.enabled=true"])


def test_normal_stats_with_keep_aspect_non_square(tmp_path):
    """The statistics live on the model's canvas ([h, w]); padding has std 0, floored."""
    g = AnoSegGenerator(image_size=(64, 128), width=0.125, normal_stats=True)
    assert tuple(g.stats_mean.shape) == (1, 3, 64, 128)
    g.set_normal_stats(torch.rand(3, 64, 128), torch.zeros(3, 64, 128))
    assert g(torch.rand(1, 3, 64, 128)).normality_map.shape == (1, 1, 64, 128)
