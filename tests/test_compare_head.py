"""model.compare_head (a small head on the input and its reconstruction whose logit is added to
the map head's), train.rec_target=clean (L_Re on the image before synthesis, DRAEM's target)
and model.residual_weight (the residual |x - x_hat| as a third signal at inference)."""

import pytest
import torch
import torch.nn.functional as F

from anoseg.config import load_config
from anoseg.data.training_data import make_sample, synthetic_batch
from anoseg.errors import ConfigError
from anoseg.models.factory import build_generator
from anoseg.models.generator import AnoSegGenerator, soft_knee
from anoseg.training import create_train_state, train_step

CPU = torch.device("cpu")
TINY = ["data.image_size=64", "model.width=0.125", "train.batch_size=4",
        "train.precision=fp32", "model.map_skips=2", "train.seg_loss=focal",
        "model.compare_head=true", "train.rec_target=clean"]


def _pair():
    """A generator with the head and one without, with the same weights elsewhere."""
    torch.manual_seed(0)
    with_head = AnoSegGenerator(image_size=64, width=0.125, map_skips=2, compare_head=True)
    plain = AnoSegGenerator(image_size=64, width=0.125, map_skips=2)
    missing, unexpected = plain.load_state_dict(with_head.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("compare.") for k in unexpected)
    return with_head.eval(), plain.eval()


def test_a_new_head_leaves_the_map_head_alone():
    with_head, plain = _pair()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = with_head(images, reconstruct=False), plain(images, reconstruct=False)
    assert torch.equal(a.map_logit, b.map_logit)
    assert a.reconstruction is not None  # the head needs it, whatever ``reconstruct`` says
    assert b.reconstruction is None


def test_the_head_sees_the_difference_and_changes_the_map_there():
    with_head, _ = _pair()
    with torch.no_grad():  # a trained head: its output weights are not zero any more
        with_head.compare.out.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    changed = images.clone()
    changed[:, :, 40:48, 8:16] = 1.0 - changed[:, :, 40:48, 8:16]
    with torch.no_grad():
        recon = with_head.reconstruction_decoder(
            with_head.encoder.features(with_head._inputs(images))[-1])
        delta = (with_head.compare(changed, recon) - with_head.compare(images, recon))[0, 0]
    far = torch.ones_like(delta, dtype=torch.bool)
    far[40 - 8:48 + 8, 0:16 + 8] = False  # beyond the head's 15-pixel receptive field
    assert delta[far].abs().max() == 0
    assert delta[40:48, 8:16].abs().mean() > 0


def test_the_heads_loss_does_not_reach_the_reconstruction_decoder():
    with_head, _ = _pair()
    with_head.train()
    with torch.no_grad():
        with_head.compare.out.weight.fill_(0.5)
    out = with_head(torch.rand(2, 3, 64, 64))
    out.map_logit.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in with_head.compare.parameters())
    assert all(p.grad is None for p in with_head.reconstruction_decoder.parameters())


def test_samples_carry_the_image_before_synthesis():
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(4))
    cfg = load_config(None, TINY).synthesis
    sample = make_sample(image, cfg, torch.Generator().manual_seed(5), anomaly_ratio=1.0,
                         keep_clean=True)
    assert torch.equal(sample["clean"], image)
    assert not torch.equal(sample["image"], image)
    plain = make_sample(image, cfg, torch.Generator().manual_seed(5), anomaly_ratio=1.0)
    assert "clean" not in plain and torch.equal(plain["image"], sample["image"])
    batch = synthetic_batch(image[None].repeat(3, 1, 1, 1), cfg, seed=0, anomaly_ratio=1.0,
                            keep_clean=True)
    assert batch["clean"].shape == batch["image"].shape
    assert torch.equal(batch["clean"][1], image)


def test_training_reconstructs_the_clean_image_on_every_pixel():
    cfg = load_config(None, TINY + ["train.adversarial=false"])
    state = create_train_state(cfg, CPU)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    batch = synthetic_batch(images, cfg.synthesis, seed=7, anomaly_ratio=1.0, keep_clean=True)
    assert (batch["normality"] < 0.5).any()
    # a target far from the input, so the loss can only match if it reads ``clean``
    batch["clean"] = torch.zeros_like(batch["clean"])
    state.generator.train()
    with torch.no_grad():
        recon = state.generator(batch["image"]).reconstruction
    expected = F.l1_loss(recon, batch["clean"])
    masked_input = ((recon - batch["image"]).abs() * batch["normality"]).sum() / (
        3 * batch["normality"].sum())
    assert abs(expected - masked_input) > 0.05
    losses = train_step(state, batch, cfg.train, device=CPU)
    assert losses["rec"] == pytest.approx(float(expected), rel=1e-5)


def test_the_clean_target_without_clean_images_says_so():
    cfg = load_config(None, TINY + ["train.adversarial=false"])
    state = create_train_state(cfg, CPU)
    batch = synthetic_batch(torch.rand(2, 3, 64, 64), cfg.synthesis, seed=0)
    with pytest.raises(ValueError, match="train.rec_target=clean"):
        train_step(state, batch, cfg.train, device=CPU)


def test_a_run_with_the_clean_target_trains_and_fits(tmp_path, make_mvtec):
    from anoseg.inference import load_model
    from anoseg.training import train

    root = make_mvtec(n_train=10, image_hw=(64, 64))
    cfg = load_config(None, TINY + ["model.feature_stats=true", "model.residual_weight=1",
                                    "train.steps=2", "data.num_workers=0",
                                    f"data.root={root}", "data.category=widget"])
    train(cfg, tmp_path / "run", progress=False)
    generator = load_model(tmp_path / "run", "cpu").generator
    assert generator.fstats_ready and float(generator.fstats_res_scale[1]) > 0


def test_the_masked_target_ignores_the_clean_image():
    cfg = load_config(None, TINY[:-1] + ["train.adversarial=false"])
    assert cfg.train.rec_target == "masked"
    state = create_train_state(cfg, CPU)
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    batch = synthetic_batch(images, cfg.synthesis, seed=7, anomaly_ratio=1.0, keep_clean=True)
    batch["clean"] = torch.zeros_like(batch["clean"])
    state.generator.train()
    with torch.no_grad():
        recon = state.generator(batch["image"]).reconstruction
    weight = batch["normality"].expand_as(recon)
    expected = ((recon - batch["image"]).abs() * weight).sum() / weight.sum()
    losses = train_step(state, batch, cfg.train, device=CPU)
    assert losses["rec"] == pytest.approx(float(expected), rel=1e-5)


def _normal_images(n, seed, size=64):
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, size)
    base = (0.3 + 0.4 * ys[:, None] * ys[None, :]).expand(3, size, size)
    return (base + 0.02 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)


def test_the_residual_is_a_third_z_scored_signal():
    torch.manual_seed(0)
    kwargs = dict(image_size=64, width=0.125, map_skips=2, feature_stats=True)
    with_res = AnoSegGenerator(residual_weight=2.0, **kwargs)
    plain = AnoSegGenerator(**kwargs)
    plain.load_state_dict(with_res.state_dict(), strict=False)
    train, holdout = _normal_images(64, 0), _normal_images(8, 1)
    for g in (with_res, plain):
        g.fit_feature_stats(iter(train.split(32)), iter(holdout.split(4)))
    rm, rs = with_res.fstats_res_scale
    with torch.no_grad():
        recon = with_res.eval().reconstruction_decoder(
            with_res.encoder.features(with_res._inputs(holdout))[-1])
        residual = AnoSegGenerator.residual(holdout, recon)
        assert float(rm) == pytest.approx(float(residual.mean()), rel=1e-4)
        assert float(rs) == pytest.approx(float(residual.std()), rel=1e-3)
        images = _normal_images(2, 3)
        a, b = with_res(images, reconstruct=False), plain.eval()(images, reconstruct=False)
        recon = with_res(images).reconstruction
    # the plain model's combined logit, before its knee, plus the weighted z-scored residual
    lm, ls, dm, ds = plain.fstats_scale
    with torch.no_grad():
        levels = plain.encoder.features(plain._inputs(images))
        head = -plain._map_logit(images, levels, None)
        linear = (head - lm) / ls + (plain.feature_distance(levels, (64, 64)) - dm) / ds - 4.0
    expected = soft_knee(linear + 2.0 * (AnoSegGenerator.residual(images, recon) - rm) / rs)
    assert torch.allclose(-a.map_logit, expected, atol=1e-4)
    assert not torch.allclose(-a.map_logit, -b.map_logit, atol=1e-2)
    with_res.train()  # training never sees the statistics, so no residual either
    plain.train()
    with torch.no_grad():
        assert torch.allclose(with_res(images).map_logit, plain(images).map_logit)


def test_config_and_factory():
    assert load_config(None, []).model.compare_head is False
    generator = build_generator(load_config(None, TINY))
    assert generator.compare is not None
    assert build_generator(load_config(None, TINY[:-2])).compare is None
    with pytest.raises(ConfigError, match="model.compare_head"):
        load_config(None, TINY + ["model.reconstruction=false", "train.adversarial=false"])
    with pytest.raises(ConfigError, match="train.rec_target"):
        load_config(None, ["train.rec_target=input"])
    with pytest.raises(ConfigError, match="model.residual_weight"):
        load_config(None, ["model.residual_weight=1.0"])  # without model.feature_stats
    with pytest.raises(ConfigError, match="model.residual_weight"):
        load_config(None, ["model.feature_stats=true", "model.residual_weight=-1"])
    generator = build_generator(load_config(None, TINY + ["model.feature_stats=true",
                                                          "model.residual_weight=0.5"]))
    assert generator.residual_weight == 0.5


def test_rec_skips_feed_the_encoders_finer_maps_to_the_reconstruction():
    torch.manual_seed(0)
    skipped = AnoSegGenerator(image_size=64, width=0.125, map_skips=2, rec_skips=2).eval()
    assert skipped.reconstruction_decoder.skip_channels[:2] == \
        skipped.encoder.feature_channels[-2::-1][:2]
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    changed = images.clone()
    changed[:, :, 0:4, 0:4] = 1.0 - changed[:, :, 0:4, 0:4]
    with torch.no_grad():
        levels, moved = (skipped.encoder.features(skipped._inputs(x)) for x in (images, changed))
        a, b = skipped.reconstruct(levels), skipped.reconstruct(moved)
        held = [lv.clone() for lv in moved]
        held[-3] = levels[-3]  # all maps of the changed image but the stride-8 one
        c = skipped.reconstruct(held)
    assert a.shape == images.shape
    assert not torch.equal(b, c)  # the stride-8 skip reaches the output
    plain = AnoSegGenerator(image_size=64, width=0.125, map_skips=2)
    assert plain.reconstruction_decoder.skip_channels == [0] * 5


def test_rec_skips_config():
    assert load_config(None, []).model.rec_skips == 0
    generator = build_generator(load_config(None, TINY + ["model.rec_skips=1"]))
    assert generator.rec_skips == 1
    assert generator.reconstruction_decoder.skip_channels[0] > 0
    with pytest.raises(ConfigError, match="model.rec_skips"):
        load_config(None, TINY + ["model.rec_skips=3"])
    with pytest.raises(ConfigError, match="model.rec_skips"):
        load_config(None, TINY[:-1] + ["model.rec_skips=1"])  # the masked target
