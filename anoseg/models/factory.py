"""The networks a config describes: the AnoSeg generator and discriminator, and the detector.

Reads only the config (and ``model.init_weights``, a file of torchvision ResNet-18 weights).

Example:
    >>> from anoseg.config import load_config
    >>> generator = build_generator(load_config(None, ["data.image_size=64"]))
"""

from __future__ import annotations

from pathlib import Path

import torch

from anoseg.config import AnoSegConfig
from anoseg.errors import ConfigError
from anoseg.models.detector import AnoSegDetector
from anoseg.models.discriminator import AnoSegDiscriminator
from anoseg.models.generator import AnoSegGenerator


def build_generator(cfg: AnoSegConfig, *, map_decoder: bool = True) -> AnoSegGenerator:
    """The AnoSeg generator described by ``cfg`` (loads ``model.init_weights`` if set)."""
    generator = AnoSegGenerator(image_size=cfg.data.image_size, width=cfg.model.width,
                                coord_channels=cfg.model.coord_channels,
                                map_decoder=map_decoder,
                                reconstruction=cfg.model.reconstruction or not map_decoder,
                                map_skips=cfg.model.map_skips,
                                rec_skips=cfg.model.rec_skips,
                                normal_stats=cfg.model.normal_stats and map_decoder,
                                upsample=cfg.model.upsample,
                                feature_stats=cfg.model.feature_stats and map_decoder,
                                compare_head=cfg.model.compare_head and map_decoder,
                                residual_weight=(cfg.model.residual_weight if map_decoder
                                                 else 0.0),
                                lowpass_weight=(cfg.model.lowpass_weight if map_decoder
                                                else 0.0),
                                lowpass_roughness=cfg.model.lowpass_roughness and map_decoder)
    if cfg.model.init_weights:
        path = Path(cfg.model.init_weights)
        if not path.is_file():
            raise ConfigError(f"model.init_weights: file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            generator.encoder.load_torchvision_weights(state.get("state_dict", state))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ConfigError(f"model.init_weights: cannot load {path} as torchvision "
                              f"ResNet-18 weights: {exc}") from None
    return generator


def build_discriminator(cfg: AnoSegConfig) -> AnoSegDiscriminator:
    """AnoSeg's discriminator on ``concat(image, normality map)`` (4 channels)."""
    return AnoSegDiscriminator(image_size=cfg.data.image_size, in_channels=4,
                               width=cfg.model.width)


def build_detector(cfg: AnoSegConfig) -> AnoSegDetector:
    """The detector networks for ``cfg`` (same image size, width and coordinates as AnoSeg)."""
    return AnoSegDetector(image_size=cfg.data.image_size, width=cfg.model.width,
                          coord_channels=cfg.model.coord_channels,
                          use_anomaly_map=cfg.detector.use_anomaly_map)
