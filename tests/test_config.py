from pathlib import Path

import pytest

from anoseg.config import AnoSegConfig, load_config, save_config
from anoseg.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, AnoSegConfig)


def test_paper_config_is_paper_faithful():
    cfg = load_config(CONFIGS / "paper.yaml")
    assert cfg.data.image_size == 256 and cfg.train.batch_size == 16
    assert cfg.model.width == 1.0 and cfg.model.coord_channels and cfg.train.adversarial
    assert cfg.model.map_skips == 0 and cfg.synthesis.blob_p == 0.0
    assert cfg.synthesis.edit_p == 0.0
    assert tuple(cfg.synthesis.anomalies_per_image) == (1, 1) and cfg.train.seg_loss == "l1"


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr_generator=1e-4", "synthesis.patch_area=[0.01, 0.05]",
                             "data.root=/x"])
    assert cfg.train.lr_generator == 1e-4
    assert cfg.synthesis.patch_area == (0.01, 0.05)
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("override, words", [
    (["train.lr_generatr=1e-4"], ["unknown config key 'train.lr_generatr'",
                                  "Did you mean 'train.lr_generator'?"]),
    (["model.widht=0.5"], ["Did you mean 'model.width'?"]),
    (["trian.steps=3"], ["unknown config key 'trian'"]),
    (["train.steps=many"], ["train.steps", "integer"]),
    (["train.steps=2.5"], ["train.steps", "integer"]),
    (["model.coord_channels=maybe"], ["model.coord_channels", "true or false"]),
    (["data.image_size=100"], ["data.image_size", "multiple of 32"]),
    (["data.image_size=1024"], ["data.image_size", "multiple of 32 from 64 to 512"]),
    (["train.lr_generator=-1"], ["train.lr_generator"]),
    (["synthesis.rotation_p=1.5"], ["synthesis.rotation_p", "probability"]),
    (["synthesis.patch_area=[0.3, 0.1]"], ["synthesis.patch_area"]),
    (["train.schedule=linear"], ["train.schedule"]),
    (["model.reconstruction=false"], ["train.adversarial"]),
    (["steps=3"], ["section.key=value"]),
    (["train.ema_decay=1"], ["train.ema_decay", "[0, 1)"]),
    (["model.map_skips=5"], ["model.map_skips", "0 to 4"]),
    (["model.map_skips=-1"], ["model.map_skips", "0 to 4"]),
    (["synthesis.blob_p=2"], ["synthesis.blob_p", "probability"]),
    (["synthesis.edit_p=-0.1"], ["synthesis.edit_p", "probability"]),
    (["train.grad_clip=-1"], ["train.grad_clip", ">= 0"]),
    (["synthesis.patch_area_scale=loga"], ["synthesis.patch_area_scale", "'log'"]),
    (["synthesis.edit_radius=[0.05, 0.01]"], ["synthesis.edit_radius", "low <= high"]),
    (["synthesis.anomalies_per_image=[3, 1]"], ["synthesis.anomalies_per_image", "low"]),
    (["synthesis.anomalies_per_image=[0, 2]"], ["synthesis.anomalies_per_image", "1 <= low"]),
])
def test_bad_config_values_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    for word in words:
        assert word in str(info.value)


def test_bad_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml.*train.stepz"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_auto_precision_takes_bf16_only_on_cpus_that_have_it(monkeypatch):
    import warnings

    import torch

    from anoseg import runtime

    amx = "processor : 0\nflags : fpu sse avx2 amx_bf16 amx_tile\n"
    amd = "processor : 0\nflags : fpu sse avx2 fma\n"
    arm = "processor : 0\nFeatures : fp asimd bf16 i8mm\n"
    assert runtime.cpu_has_fast_bf16(amx) and runtime.cpu_has_fast_bf16(arm)
    assert not runtime.cpu_has_fast_bf16(amd) and not runtime.cpu_has_fast_bf16("")
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda cpuinfo=None: True)
    assert runtime.resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(runtime, "cpu_has_fast_bf16", lambda cpuinfo=None: False)
    assert runtime.resolve_precision("auto", cpu) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runtime.resolve_precision("bf16", cpu) is torch.bfloat16
    assert any("emulates" in str(w.message) for w in caught)
