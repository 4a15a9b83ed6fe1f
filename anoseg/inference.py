"""Loading a trained model and turning images into anomaly maps.

This is the one place where the network's *normality* map (1 = normal, what the paper's
losses are written for) becomes the *anomaly* map users get (1 = anomalous).

Example:
    >>> model = load_model("runs/demo")                        # doctest: +SKIP
    >>> maps = predict_anomaly_maps(model.generator, images)   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from anoseg.checkpoint import load_checkpoint
from anoseg.config import AnoSegConfig, config_from_dict
from anoseg.errors import CheckpointError, ConfigError
from anoseg.models.generator import GeneratorOutput


def normality_to_anomaly(normality_map: torch.Tensor) -> torch.Tensor:
    """The single flip between the training target and what users see."""
    return 1.0 - normality_map


@dataclass
class LoadedModel:
    generator: nn.Module
    config: AnoSegConfig
    checkpoint: Dict[str, Any]
    device: torch.device
    weights: str = "raw"
    """Which generator weights were loaded: ``ema`` (averaged) or ``raw``."""


WEIGHTS_CHOICES = ("auto", "ema", "raw")


def load_model(checkpoint: Union[str, Path], device: Union[str, torch.device, None] = None,
               *, weights: str = "auto") -> LoadedModel:
    """Rebuild the generator from a checkpoint file or run folder, in eval mode.

    A run trained with ``train.ema_decay > 0`` is loaded with its averaged weights
    (``generator_ema``), the ones meant for inference.

    Args:
        checkpoint: ``.pt`` file or run folder (uses ``checkpoints/last.pt``).
        device: where to put the model; ``None`` = the best available (CUDA, MPS, CPU).
        weights: ``auto`` (the averaged weights when the run has them, else the raw ones),
            ``ema`` (the averaged weights; an error without them) or ``raw`` (the last
            optimiser iterate, e.g. to measure what the averaging brings).
    """
    from anoseg.training import build_generator, resolve_device

    if weights not in WEIGHTS_CHOICES:
        raise ConfigError(f"weights={weights!r} is not one of {', '.join(WEIGHTS_CHOICES)}")
    state = load_checkpoint(checkpoint)
    if weights == "ema" and state.get("generator_ema") is None:
        raise CheckpointError(f"{checkpoint} has no averaged weights (it was trained with "
                              "train.ema_decay=0); use weights 'raw' or 'auto'")
    if state.get("kind", "anoseg") != "anoseg":
        raise CheckpointError(f"{checkpoint} is a {state['kind']!r} checkpoint, not an AnoSeg "
                              "segmenter; pass the run folder or its checkpoints/last.pt")
    cfg = config_from_dict(state["config"]).validate()
    cfg.model.init_weights = None  # the checkpoint already holds the weights
    generator = build_generator(cfg)
    try:
        used = "ema" if weights != "raw" and state.get("generator_ema") is not None else "raw"
        generator.load_state_dict(state["generator_ema" if used == "ema" else "generator"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {checkpoint} does not match its own config: {exc}") \
            from None
    dev = resolve_device("auto") if device is None else torch.device(device)
    generator.to(dev).eval()
    return LoadedModel(generator, cfg, state, dev, used)


@torch.no_grad()
def predict_anomaly_maps(generator: nn.Module, images: torch.Tensor, *,
                         batch_size: int = 16, amp_dtype: Optional[torch.dtype] = None
                         ) -> torch.Tensor:
    """Anomaly maps ``(B, H, W)`` in ``[0, 1]`` (higher = more anomalous) for float images
    ``(B, 3, H, W)`` in ``[0, 1]`` at the model's image size."""
    from anoseg.training import autocast

    generator.eval()
    device = next(generator.parameters()).device
    maps = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].to(device)
        with autocast(device, amp_dtype):
            normality = generator(chunk).normality_map
        maps.append(normality_to_anomaly(normality.float())[:, 0].cpu())
    return torch.cat(maps) if maps else torch.empty(0)


class AnoSegEnsemble(nn.Module):
    """Several generators of one category used as one: their normality maps (and
    reconstructions) are averaged. Independently seeded short runs disagree most where they
    are wrong, so the mean map is steadier than any one run (``docs/experiments.md``)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.image_size = getattr(members[0], "image_size", None)

    def forward(self, images: torch.Tensor) -> GeneratorOutput:
        outs = [member(images) for member in self.members]

        def mean(parts):
            return None if any(p is None for p in parts) else torch.stack(parts).mean(0)

        return GeneratorOutput(mean([o.normality_map for o in outs]),
                               mean([o.reconstruction for o in outs]))


def load_ensemble(checkpoints: Sequence[Union[str, Path]],
                  device: Union[str, torch.device, None] = None, *,
                  weights: str = "auto") -> LoadedModel:
    """Load several runs of one category as one model (:class:`AnoSegEnsemble`).

    The members must share the image size and the category. The returned model's config,
    checkpoint (counters, split) and weights kind are the first member's, with
    ``checkpoint["ensemble"]`` listing every member and ``checkpoint["split"]["holdout"]``
    reduced to the held-out images that *no* member trained on (empty when the members used
    different splits: give them the same ``data.split_seed``).
    """
    if not checkpoints:
        raise ConfigError("an ensemble needs at least one run")
    loaded = [load_model(c, device, weights=weights) for c in checkpoints]
    first = loaded[0]
    for path, model in zip(checkpoints[1:], loaded[1:]):
        for key in ("image_size", "category"):
            mine, theirs = getattr(first.config.data, key), getattr(model.config.data, key)
            if mine != theirs:
                raise ConfigError(f"ensemble member {path} has data.{key}={theirs!r}, the "
                                  f"first member {checkpoints[0]} has {mine!r}; members must "
                                  "share it")
    # A member never trains on its own held-out images, so the images every member held out
    # are exactly those no member trained on.
    held_by_all = set.intersection(*(set(m.checkpoint.get("split", {}).get("holdout", []))
                                     for m in loaded))
    holdout = [p for p in first.checkpoint.get("split", {}).get("holdout", [])
               if p in held_by_all]
    state = dict(first.checkpoint)
    state["split"] = {**state.get("split", {}), "holdout": holdout}
    state["ensemble"] = [str(c) for c in checkpoints]
    state["step"] = sum(int(m.checkpoint.get("step", 0)) for m in loaded)
    state["train_seconds"] = sum(float(m.checkpoint.get("train_seconds", 0.0)) for m in loaded)
    ensemble = AnoSegEnsemble([m.generator for m in loaded]).to(first.device).eval()
    return LoadedModel(ensemble, first.config, state, first.device, first.weights)
