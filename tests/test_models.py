import pytest
import torch

from anoseg.config import load_config
from anoseg.models.discriminator import AnoSegDiscriminator
from anoseg.models.generator import AnoSegGenerator, coordinate_channels
from anoseg.models.factory import build_generator


@pytest.mark.parametrize("size", [64, 128, 256])
def test_shapes(size):
    g = AnoSegGenerator(image_size=size, width=0.125)
    d = AnoSegDiscriminator(image_size=size, width=0.125)
    out = g(torch.rand(2, 3, size, size))
    assert out.normality_map.shape == (2, 1, size, size)
    assert out.reconstruction.shape == (2, 3, size, size)
    assert 0 <= out.normality_map.min() and out.normality_map.max() <= 1
    logits, features = d(torch.cat([out.reconstruction, out.normality_map], 1))
    assert logits.shape == (2,)
    assert features.shape[0] == 2 and features.shape[1] > 0


def test_paper_width_matches_table6():
    g = AnoSegGenerator(image_size=256)
    d = AnoSegDiscriminator(image_size=256)
    assert g.encoder.conv1.in_channels == 5 and g.encoder.out_channels == 512
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 512, 512, 128, 1]
    x = torch.rand(1, 4, 256, 256)
    assert d.features(x).shape == (1, 128, 2, 2)


def test_coordinate_channels():
    c = coordinate_channels(2, 4, 8)
    assert c.shape == (2, 2, 4, 8)
    assert c[0, 0, 0, 0] == -1 and c[0, 0, 0, -1] == 1  # x varies along width
    assert c[0, 1, 0, 0] == -1 and c[0, 1, -1, 0] == 1  # y varies along height
    g = AnoSegGenerator(image_size=64, width=0.125, coord_channels=False)
    assert g.encoder.conv1.in_channels == 3


def test_ablation_switches_build_the_right_parts():
    base = load_config(None, ["model.reconstruction=false", "train.adversarial=false",
                              "model.coord_channels=false", "model.width=0.125",
                              "data.image_size=64"])
    g = build_generator(base)
    assert g.reconstruction_decoder is None and g.map_decoder is not None
    out = g(torch.rand(1, 3, 64, 64))
    assert out.reconstruction is None
    detector = build_generator(base, map_decoder=False)
    assert detector.map_decoder is None and detector.reconstruction_decoder is not None


def test_width_multiplier_shrinks_the_model():
    big = sum(p.numel() for p in AnoSegGenerator(image_size=64, width=0.5).parameters())
    small = sum(p.numel() for p in AnoSegGenerator(image_size=64, width=0.25).parameters())
    assert small < big / 3


def test_torchvision_weights_load_into_the_encoder():
    import torchvision

    reference = torchvision.models.resnet18()
    g = AnoSegGenerator(image_size=64)
    g.encoder.load_torchvision_weights(reference.state_dict())
    assert torch.equal(g.encoder.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert torch.equal(g.encoder.conv1.weight[:, :3], reference.conv1.weight)
    assert torch.all(g.encoder.conv1.weight[:, 3:] == 0)


@pytest.mark.parametrize("skips", [0, 1, 2, 3, 4])
def test_map_skip_connections_wire_encoder_levels_into_the_map(skips):
    g = AnoSegGenerator(image_size=64, width=0.125, map_skips=skips)
    x = torch.rand(2, 5, 64, 64)
    levels = [level.detach().requires_grad_() for level in g.encoder.features(x)]
    assert [level.shape[-1] for level in levels] == [32, 16, 8, 4, 2]
    out = g.map_decoder(levels[-1], levels[-2::-1][:skips])
    assert out.shape == (2, 1, 64, 64)
    out.sum().backward()
    # the map is a function of exactly the requested finer levels (strides 16, 8, 4, 2)
    reached = [level.grad is not None and bool(level.grad.abs().sum() > 0)
               for level in levels[-2::-1]]
    assert reached == [i < skips for i in range(4)]
    # the reconstruction decoder never gets skips: it would learn the identity
    plain = AnoSegGenerator(image_size=64, width=0.125)
    assert (sum(p.numel() for p in g.reconstruction_decoder.parameters())
            == sum(p.numel() for p in plain.reconstruction_decoder.parameters()))
    full = g(torch.rand(2, 3, 64, 64))
    assert full.normality_map.shape == (2, 1, 64, 64)


def test_map_skips_from_config_and_detector_has_none():
    cfg = load_config(None, ["model.map_skips=3", "model.width=0.125", "data.image_size=64"])
    g = build_generator(cfg)
    assert g.map_skips == 3 and g.map_decoder.skip_channels[:3] == g.encoder.feature_channels[3:0:-1]
    detector = build_generator(cfg, map_decoder=False)
    assert detector.map_decoder is None and detector.map_skips == 0


def _old_decoder_key(key):
    """The name a decoder parameter had in anoseg 0.1 (one Sequential ``layers``: 0 = stem,
    then (up, conv) pairs for the five blocks, 11 = the head's Conv)."""
    for decoder in ("map_decoder.", "reconstruction_decoder."):
        if key.startswith(decoder):
            part, index, rest = (key[len(decoder):].split(".", 2) + ["", ""])[:3]
            if part == "stem":
                return f"{decoder}layers.0.{index}.{rest}".rstrip(".")
            if part in ("ups", "convs"):
                return f"{decoder}layers.{1 + 2 * int(index) + (part == 'convs')}.{rest}"
            if part == "head":
                return f"{decoder}layers.{11 + int(index)}.{rest}"
    return key


def test_checkpoints_from_before_the_skip_connections_still_load():
    new = AnoSegGenerator(image_size=64, width=0.125).state_dict()
    old = {_old_decoder_key(k): v for k, v in new.items()}
    assert "map_decoder.layers.11.weight" in old and "map_decoder.layers.0.0.weight" in old
    assert not any(".stem." in k or ".ups." in k for k in old)
    fresh = AnoSegGenerator(image_size=64, width=0.125)
    fresh.load_state_dict(old)
    for key, value in new.items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_bilinear_upsampling_decoders_keep_shapes_and_have_no_transposed_convolutions():
    from anoseg.config import load_config
    from anoseg.errors import ConfigError
    from anoseg.models.factory import build_generator

    cfg = load_config(None, ["data.image_size=64", "model.width=0.125", "model.map_skips=2",
                             "model.upsample=bilinear"])
    g = build_generator(cfg).eval()
    out = g(torch.rand(2, 3, 64, 64))
    assert out.normality_map.shape == (2, 1, 64, 64)
    assert out.reconstruction.shape == (2, 3, 64, 64)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in g.modules())
    assert any(isinstance(m, torch.nn.Upsample) for m in g.modules())
    with pytest.raises(ConfigError, match="model.upsample"):
        load_config(None, ["model.upsample=nearest"]).validate()
