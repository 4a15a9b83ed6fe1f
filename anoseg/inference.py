"""Loading trained networks and running them: anomaly maps, and the detector's image scores.

This is the one place where the network's *normality* map (1 = normal, what the paper's
losses are written for) becomes the *anomaly* map users get (1 = anomalous). Nothing here
trains: it imports no training code.

Example:
    >>> model = load_model("runs/demo")                        # doctest: +SKIP
    >>> maps = predict_anomaly_maps(model.generator, images)   # doctest: +SKIP
    >>> bundle = load_detector("runs/demo")                    # doctest: +SKIP
    >>> scores = detector_scores(bundle, model.generator, images)   # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from anoseg.checkpoint import load_checkpoint
from anoseg.config import (ENSEMBLE_COMBINES, AnoSegConfig, config_diff, config_from_dict,
                           runtime_keys)
from anoseg.errors import CheckpointError, ConfigError, DataError
from anoseg.data.geometry import (Geometry, Placement, blend_window, crop, tile_span,
                                  to_resolution, window_starts)
from anoseg.models.detector import AnoSegDetector
from anoseg.models.factory import build_detector, build_generator
from anoseg.models.lowpass import median_and_spread
from anoseg.models.generator import (FEATURE_STATS_OFFSET, AnoSegGenerator, GeneratorOutput,
                                     soft_knee)
from anoseg.run_dir import (CHECKPOINT_FILE, DETECTOR_DIR, DataRecord, RunDir,
                            TrainingSplit)
from anoseg.runtime import autocast, resolve_device

DETECTOR_KIND = "anoseg-detector"
"""``kind`` of a detector checkpoint."""


def normality_to_anomaly(normality_map: torch.Tensor) -> torch.Tensor:
    """The single flip between the training target and what users see."""
    return 1.0 - normality_map


def normality_logit_to_anomaly_logit(map_logit: torch.Tensor) -> torch.Tensor:
    """The same flip for the map head's pre-sigmoid output: the *anomaly logit*
    ``-map_logit`` = ``logit(anomaly probability)``, higher = more anomalous. Unlike the
    probability it does not saturate in float32 (image scores use it)."""
    return -map_logit


@dataclass
class LoadedModel:
    """A segmenter (or an ensemble of them) in eval mode, with what its checkpoint records."""

    generator: nn.Module
    config: AnoSegConfig
    checkpoint: Dict[str, Any]
    """The checkpoint dict as loaded (an ensemble's: its first member's)."""
    device: torch.device
    weights: str = "raw"
    """Which generator weights were loaded: ``ema`` (averaged) or ``raw``."""
    step: Optional[int] = None
    """The training step of the weights (an ensemble's: the sum over its members)."""
    data: Optional[DataRecord] = None
    """The data root and split the checkpoint records (``None`` when it has none); an
    ensemble's holdout is the images that no member trained on."""
    members: Tuple[str, ...] = ()
    """An ensemble's member checkpoints; empty for one model."""

    @property
    def is_ensemble(self) -> bool:
        return bool(self.members)


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
    if getattr(generator, "feature_stats", False) and not generator.fstats_ready:
        warnings.warn(f"{checkpoint}: model.feature_stats is on but its statistics are not "
                      "fitted (a periodic checkpoint of a run that has not finished: they are "
                      "fitted when training stops); its maps are the map head's alone. "
                      "Finish the run with anoseg-train --resume.", stacklevel=2)
    dev = resolve_device("auto") if device is None else torch.device(device)
    generator.to(dev).eval()
    step = state.get("step")
    return LoadedModel(generator, cfg, state, dev, used,
                       step=int(step) if step is not None else None,
                       data=DataRecord.from_checkpoint(state))


def _forward(generator: nn.Module, images: torch.Tensor,
             spans: Optional[torch.Tensor] = None) -> GeneratorOutput:
    """The generator's output for inference: ours skip the reconstruction decoder (and take
    tile coordinate ``spans``); any other module is called on the images alone."""
    if isinstance(generator, (AnoSegGenerator, AnoSegEnsemble)):
        return generator(images, spans, reconstruct=False)
    if spans is not None:
        raise ConfigError(f"{type(generator).__name__} takes no tile coordinates; use "
                          "data.tiling.coords=tile")
    return generator(images)


def _as_float_images(images: torch.Tensor) -> torch.Tensor:
    """Float images in ``[0, 1]`` (uint8 ones divided by 255)."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images


def _scores(generator: nn.Module, chunk: torch.Tensor, spans: Optional[torch.Tensor],
            amp_dtype: Optional[torch.dtype]
            ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(anomaly maps, anomaly logits, signal maps or None)`` float32 on the CPU of one
    forward pass over ``chunk`` (already on the generator's device): ``(B, H, W)``, the signal
    maps ``(B, S, H, W)``."""
    with autocast(chunk.device, amp_dtype):
        out = _forward(generator, chunk, spans)
    anomaly = normality_to_anomaly(out.normality_map.float())[:, 0].cpu()
    map_logit = getattr(out, "map_logit", None)
    if map_logit is None:
        logit = torch.logit(anomaly.double(), eps=1e-12).float()
    else:
        logit = normality_logit_to_anomaly_logit(map_logit.float())[:, 0].cpu()
    signal = getattr(out, "signal_maps", None)
    return anomaly, logit, None if signal is None else signal.float().cpu()


class ScoredMap(NamedTuple):
    """One image's scores from :func:`predict_placed`."""

    anomaly: torch.Tensor
    """float32 ``(h, w)`` anomaly map in ``[0, 1]`` (the pixel metrics and thresholds)."""
    logit: torch.Tensor
    """float32 ``(h, w)`` anomaly logit, unbounded (the cheap image scores)."""
    signal: Optional[torch.Tensor] = None
    """float32 ``(S, h, w)`` signal maps (one z-scored map per ``feature_stats`` signal) over
    the image's box at the model's resolution (whatever the resolution of the other two; the
    :data:`~anoseg.metrics.SIGNAL_IMAGE_SCORES` are read from them), or ``None`` where the
    generator has none fitted or the images are tiled."""


@torch.no_grad()
def predict_anomaly_maps(generator: nn.Module, images: torch.Tensor, *,
                         batch_size: int = 16, amp_dtype: Optional[torch.dtype] = None
                         ) -> torch.Tensor:
    """Anomaly maps ``(B, H, W)`` in ``[0, 1]`` (higher = more anomalous) for float images
    ``(B, 3, H, W)`` in ``[0, 1]`` at the model's image size."""
    return predict_anomaly_scores(generator, images, batch_size=batch_size,
                                  amp_dtype=amp_dtype)[0]


@torch.no_grad()
def predict_anomaly_scores(generator: nn.Module, images: torch.Tensor, *,
                           batch_size: int = 16, amp_dtype: Optional[torch.dtype] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(anomaly maps, anomaly logits)``, both float32 ``(B, H, W)``, from one forward pass.

    The maps are exactly :func:`predict_anomaly_maps`' (in ``[0, 1]``: the pixel metrics, the
    pixel threshold and the PNGs use them); the logits are
    :func:`normality_logit_to_anomaly_logit` of the map head's pre-sigmoid output (unbounded,
    never tied by saturation: the image scores use them). A generator that returns no logit
    gets ``logit(map)`` computed in float64 (saturated pixels stay tied there).
    """
    maps, logits, _ = _batched_scores(generator, images, batch_size, amp_dtype)
    return maps, logits


def _batched_scores(generator: nn.Module, images: torch.Tensor, batch_size: int,
                    amp_dtype: Optional[torch.dtype]
                    ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """:func:`_scores` over ``images`` in chunks of ``batch_size``, concatenated (signal
    maps: ``None`` unless every chunk has them)."""
    generator.eval()
    device = next(generator.parameters()).device
    maps, logits, signals = [], [], []
    for start in range(0, images.shape[0], batch_size):
        chunk = _as_float_images(images[start:start + batch_size].to(device))
        anomaly, logit, signal = _scores(generator, chunk, None, amp_dtype)
        maps.append(anomaly)
        logits.append(logit)
        signals.append(signal)
    if not maps:
        return torch.empty(0), torch.empty(0), None
    signal = None if any(s is None for s in signals) else torch.cat(signals)
    return torch.cat(maps), torch.cat(logits), signal


@torch.no_grad()
def sliding_window_scores(generator: nn.Module, canvas: torch.Tensor, placement: Placement,
                          geometry: Geometry, *, batch_size: int = 16,
                          amp_dtype: Optional[torch.dtype] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(anomaly map, anomaly logit)`` float32 ``(H, W)`` of a canvas larger than the
    network's input, by a sliding window (``data.tiling``).

    Windows of ``geometry.image_hw`` cover the canvas with at least ``geometry.overlap`` of a
    window shared by neighbours (:func:`anoseg.data.geometry.window_starts`); ``batch_size``
    windows run at once, so memory holds a few windows' activations and two float64
    accumulators of the canvas. Each window's map and logit are weighted by a separable Hann
    window (:func:`anoseg.data.geometry.blend_window`) and the sums divided by the summed
    weights: where one window covers a pixel, the pixel keeps that window's value exactly.
    With ``geometry.coords == "image"`` each window's coordinate channels say where it lies
    in the image.

    Args:
        canvas: the image on its canvas, uint8 or float ``(3, H, W)``.
        placement: its placement (the image's box, for the coordinates).
    """
    generator.eval()
    device = next(generator.parameters()).device
    (tile_h, tile_w), (height, width) = geometry.image_hw, tuple(canvas.shape[1:])
    tops, lefts = window_starts(height, tile_h, geometry.overlap), window_starts(
        width, tile_w, geometry.overlap)
    weight_y, weight_x = blend_window(tile_h), blend_window(tile_w)
    weight = weight_y[:, None] * weight_x[None, :]
    norm_y, norm_x = torch.zeros(height, dtype=torch.float64), torch.zeros(
        width, dtype=torch.float64)
    for top in tops:
        norm_y[top:top + tile_h] += weight_y
    for left in lefts:
        norm_x[left:left + tile_w] += weight_x
    sums = torch.zeros(2, height, width, dtype=torch.float64)
    windows = [(top, left) for top in tops for left in lefts]
    for start in range(0, len(windows), batch_size):
        part = windows[start:start + batch_size]
        tiles = torch.stack([canvas[:, t:t + tile_h, x:x + tile_w] for t, x in part])
        spans = None
        if geometry.coords == "image":
            spans = torch.tensor([tile_span(placement, t, x, (tile_h, tile_w))
                                  for t, x in part]).to(device)
        maps, logits, _ = _scores(generator, _as_float_images(tiles.to(device)), spans,
                                  amp_dtype)
        for (t, x), anomaly, logit in zip(part, maps, logits):
            sums[0, t:t + tile_h, x:x + tile_w] += weight * anomaly
            sums[1, t:t + tile_h, x:x + tile_w] += weight * logit
    sums /= norm_y[None, :, None]
    sums /= norm_x[None, None, :]
    return sums[0].float(), sums[1].float()


@torch.no_grad()
def predict_placed(generator: nn.Module, canvases: Union[torch.Tensor, Sequence[torch.Tensor]],
                   placements: Sequence[Placement], geometry: Geometry, *,
                   batch_size: int = 16, amp_dtype: Optional[torch.dtype] = None,
                   resolution: str = "model") -> List[ScoredMap]:
    """The :class:`ScoredMap` of each image: its anomaly map and logit, float32 ``(h, w)``, over
    its box of the canvas (padding cut off) at the model's resolution (the tiling's working
    scale), or with ``resolution="native"`` resized to the image's own size; and its signal
    maps ``(S, h, w)`` over the box at the model's resolution (not under tiling).

    Args:
        canvases: the images on their canvases (:func:`load_placed_images`; uint8 or float),
            a batch ``(B, 3, H, W)`` or a list (tiling: canvases of several sizes).
        placements: their placements.
        geometry: the run's (:meth:`anoseg.data.geometry.Geometry.from_config`).
        batch_size: images (tiling: windows) per forward pass.

        resolution: ``model`` or ``native`` (``eval.resolution``).
    """
    if geometry.tiled:
        triples = [(*sliding_window_scores(generator, canvas, placement, geometry,
                                           batch_size=batch_size, amp_dtype=amp_dtype), None)
                   for canvas, placement in zip(canvases, placements)]
    else:
        batch = canvases if isinstance(canvases, torch.Tensor) else torch.stack(list(canvases))
        maps, logits, signals = _batched_scores(generator, batch, batch_size, amp_dtype)
        triples = list(zip(maps, logits, [None] * len(maps) if signals is None else signals))
    return [ScoredMap(to_resolution(anomaly, placement, resolution),
                      to_resolution(logit, placement, resolution),
                      None if signal is None else crop(signal, placement))
            for (anomaly, logit, signal), placement in zip(triples, placements)]


def scored_images(model: LoadedModel, paths: Sequence[Path], *, batch_size: int = 16,
                  resolution: Optional[str] = None, amp_dtype: Optional[torch.dtype] = None
                  ) -> Iterator[List[ScoredMap]]:
    """:func:`predict_placed` over image files, a chunk at a time: yields one list of
    :class:`ScoredMap` per chunk of ``batch_size`` images (one image under
    tiling, whose windows are batched instead), at ``resolution`` (default the model's
    ``eval.resolution``)."""
    geometry = Geometry.from_config(model.config.data)
    resolution = resolution or model.config.eval.resolution
    step = 1 if geometry.tiled else batch_size
    for start in range(0, len(paths), step):
        canvases, placements = load_placed_images(paths[start:start + step], geometry)
        yield predict_placed(model.generator, canvases, placements, geometry,
                             batch_size=batch_size, amp_dtype=amp_dtype, resolution=resolution)


def load_images(paths: Sequence[Path], image_size: Any) -> torch.Tensor:
    """Float images ``(B, 3, H, W)`` in ``[0, 1]`` at ``image_size`` (a side or ``(height,
    width)``), stretched, as the networks take them."""
    from anoseg.data.mvtec import load_image

    return torch.stack([load_image(p, image_size) for p in paths]).float().div_(255.0)


def load_placed_images(paths: Sequence[Path], geometry: Geometry
                       ) -> Tuple[List[torch.Tensor], List[Placement]]:
    """The images on their canvases (uint8 ``(3, H, W)``,
    :func:`anoseg.data.mvtec.load_placed_image`) and their placements."""
    from anoseg.data.mvtec import load_placed_image

    loaded = [load_placed_image(p, geometry) for p in paths]
    return [canvas for canvas, _ in loaded], [placement for _, placement in loaded]


class AnoSegEnsemble(nn.Module):
    """Several generators of one category used as one.

    ``combine="auto"`` (the default) is ``calibrated`` when the members are of several
    recipes (``groups``), ``mean`` otherwise (:attr:`mode`).

    ``combine="mean"``: their normality maps (and reconstructions, map logits and signal maps)
    are averaged. Independently seeded short runs disagree most where they are wrong, so
    the mean map is steadier than any one run (``docs/experiments.md``).

    ``combine="calibrated"``: members of different recipes (a spot specialist beside the
    general recipe) speak on different scales. ``groups[i]`` names member ``i``'s recipe
    (:func:`recipe_groups`; default: all one recipe); the anomaly logits of one recipe's
    members are averaged, then each recipe's is put on its held-out normal images' scale,
    ``q = (a - median) / (quantile_0.999 - median)``, and the recipes' ``q`` are averaged with
    weights ``1 / std`` of each recipe's per-image maxima of ``q`` on those images (one whose
    normal images peak unevenly counts less). The joint anomaly logit is
    ``soft_knee(4 (q_mean - 1))``: a typical normal pixel sits at -4, the normal pixels' 0.999
    quantile at 0. :meth:`calibrate` (or :func:`calibrate_ensemble`) fits it; the signal maps
    are the mean of the members that have them (:func:`mean_signal_maps`). ``recipe_weights``
    (one per recipe, from each recipe's ``eval.ensemble_weight``: :func:`recipe_weights`)
    fixes the recipes' weights instead, normalised to sum to 1, when none of them is ``None``
    (otherwise :meth:`calibrate` warns and keeps the ``1 / std`` weights).
    """

    def __init__(self, members: Sequence[nn.Module], combine: str = "auto",
                 groups: Optional[Sequence[int]] = None,
                 recipe_weights: Optional[Sequence[Optional[float]]] = None) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.image_size = getattr(members[0], "image_size", None)
        self.combine = combine
        groups = [0] * len(members) if groups is None else [int(g) for g in groups]
        if len(groups) != len(members) or sorted(set(groups)) != list(range(max(groups) + 1)):
            raise ConfigError(f"ensemble groups {groups} must number the {len(members)} "
                              "members' recipes 0, 1, ...")
        self.groups = groups
        weights = None if recipe_weights is None else list(recipe_weights)
        if weights is not None and (len(weights) != max(groups) + 1 or not all(
                w is None or (math.isfinite(float(w)) and float(w) > 0) for w in weights)):
            raise ConfigError(f"ensemble recipe weights {weights} must be one finite number "
                              f"> 0 (or None) per recipe ({max(groups) + 1})")
        self.recipe_weights = None if weights is None else [None if w is None else float(w)
                                                            for w in weights]
        # per recipe group: median, spread (quantile 0.999 - median), weight (sums to 1)
        self.register_buffer("calibration", torch.zeros(max(groups) + 1, 3))

    @property
    def combine(self) -> str:
        return self._combine

    @combine.setter
    def combine(self, value: str) -> None:
        if value not in ENSEMBLE_COMBINES:
            raise ConfigError(f"ensemble combine {value!r} is invalid; expected one of "
                              f"{', '.join(ENSEMBLE_COMBINES)}")
        self._combine = value

    @property
    def mode(self) -> str:
        """``mean`` or ``calibrated``: what ``combine`` means for these members."""
        if self.combine == "auto":
            return "calibrated" if len(set(self.groups)) > 1 else "mean"
        return self.combine

    @property
    def is_calibrated(self) -> bool:
        """Whether :meth:`calibrate` has fitted the members' scales."""
        return bool((self.calibration[:, 1] > 0).all())

    def forward(self, images: torch.Tensor, spans: Optional[torch.Tensor] = None, *,
                reconstruct: bool = True) -> GeneratorOutput:
        outs = [member(images, spans, reconstruct=reconstruct) for member in self.members]

        def mean(parts):
            return None if any(p is None for p in parts) else torch.stack(parts).mean(0)

        recon = mean([o.reconstruction for o in outs])
        if self.mode == "mean":
            return GeneratorOutput(mean([o.normality_map for o in outs]), recon,
                                   mean([o.map_logit for o in outs]),
                                   mean_signal_maps([o.signal_maps for o in outs]))
        if not self.is_calibrated:
            raise ConfigError("a calibrated ensemble must be fitted on held-out normal images "
                              "first: anoseg.inference.calibrate_ensemble(model, paths)")
        logit = -self._calibrated_anomaly_logit([o.map_logit for o in outs])
        signals = [o.signal_maps for o in outs if o.signal_maps is not None]
        return GeneratorOutput(torch.sigmoid(logit), recon, logit,
                               mean_signal_maps(signals) if signals else None)

    def _group_means(self, parts: Sequence[Any]) -> List[Any]:
        """Per recipe group, the mean of its members' ``parts`` (tensors of one shape)."""
        out = []
        for group in range(len(self.calibration)):
            mine = [p for p, g in zip(parts, self.groups) if g == group]
            out.append(sum(mine[1:], mine[0]) / len(mine))
        return out

    def _calibrated_anomaly_logit(self, map_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The joint anomaly logit of the members' normality logits (``combine="calibrated"``)."""
        anomaly = [normality_logit_to_anomaly_logit(logit.float()) for logit in map_logits]
        joint = None
        for (median, spread, weight), logit in zip(self.calibration, self._group_means(anomaly)):
            part = weight * (logit - median) / spread
            joint = part if joint is None else joint + part
        return soft_knee(FEATURE_STATS_OFFSET * (joint - 1.0))

    @torch.no_grad()
    def calibrate(self, member_logits: Sequence[Sequence[torch.Tensor]]) -> None:
        """Fit ``combine="calibrated"``: ``member_logits[i]`` holds member ``i``'s anomaly
        logit maps (any sizes, the image's part only) of the same held-out normal images."""
        if len(member_logits) != len(self.members):
            raise ValueError(f"{len(member_logits)} members' logits for an ensemble of "
                             f"{len(self.members)}")
        if not member_logits[0] or len({len(maps) for maps in member_logits}) != 1:
            raise DataError("calibrating an ensemble needs every member's maps of the same "
                            "held-out images, at least 1")
        per_image = [self._group_means([maps[i] for maps in member_logits])
                     for i in range(len(member_logits[0]))]
        rows = []
        for maps in zip(*per_image):  # one recipe group's maps of every image
            median, spread = median_and_spread(torch.cat([m.flatten() for m in maps]),
                                               CALIBRATION_QUANTILE)
            peaks = torch.tensor([(float(m.max()) - median) / spread for m in maps])
            spread_of_peaks = float(peaks.std()) if len(peaks) > 1 else 1.0
            rows.append([median, spread, 1.0 / max(spread_of_peaks, CALIBRATION_MIN_PEAK_STD)])
        table = torch.tensor(rows, dtype=torch.float32)
        fixed = self.recipe_weights or []
        if fixed and all(w is not None for w in fixed):
            table[:, 2] = torch.tensor(fixed)
        elif any(w is not None for w in fixed):
            unset = [str(i) for i, w in enumerate(fixed) if w is None]
            warnings.warn("eval.ensemble_weight is set on some of the ensemble's recipes but "
                          f"not on recipe {', '.join(unset)} (numbered from 0 in the order of "
                          "the runs): the recipes are weighted by how steady their held-out "
                          "peaks are instead (set it on every recipe to fix the weights)")
        table[:, 2] /= table[:, 2].sum()
        self.calibration.copy_(table.to(self.calibration.device))

    def has_signal_image_map(self) -> bool:
        """Whether every member (``calibrated``: any member) has a fitted signal image map."""
        has = [getattr(m, "has_signal_image_map", lambda: False)() for m in self.members]
        return any(has) if self.mode == "calibrated" else all(has)

    def signal_maps(self, images: torch.Tensor) -> torch.Tensor:
        """The members' signal maps (``calibrated``: of those that have them) averaged
        (:func:`mean_signal_maps`)."""
        members = [m for m in self.members
                   if self.mode == "mean" or getattr(m, "has_signal_image_map",
                                                        lambda: False)()]
        return mean_signal_maps([m.signal_maps(images) for m in members])

    def signal_image_map(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` at each pixel the largest of :meth:`signal_maps`."""
        return self.signal_maps(images).amax(1, keepdim=True)


def mean_signal_maps(parts: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The mean of members' signal maps ``(B, S, H, W)``, signal by signal; ``None`` when any
    is ``None``. Members with different numbers of signals (one weights the residual, one does
    not) are averaged after each is reduced to its largest signal at each pixel (``S = 1``:
    ``signals_mean`` is then ``signals_max``)."""
    if any(p is None for p in parts):
        return None
    if len({int(p.shape[1]) for p in parts}) > 1:  # int: a traced size is a tensor
        parts = [p.amax(1, keepdim=True) for p in parts]
    return torch.stack(list(parts)).mean(0)


CALIBRATION_QUANTILE = 0.999
"""A calibrated ensemble maps this quantile of a member's held-out normal pixels to 1."""
CALIBRATION_MIN_PEAK_STD = 0.05
"""Floor of the std of a member's calibrated held-out image maxima (its weight is 1 / std)."""


def override_eval(model: LoadedModel, **values: Any) -> None:
    """Set the given (not ``None``) ``eval`` keys of a loaded model's config, validated (the
    command-line overrides of eval, predict and export)."""
    for key, value in values.items():
        if value is not None:
            setattr(model.config.eval, key, value)
    model.config.validate()


def ensemble_mode(model: LoadedModel) -> Optional[str]:
    """``mean`` or ``calibrated``: how an ensemble joins its members under its config's
    ``eval.ensemble_combine`` (set on the ensemble, :attr:`AnoSegEnsemble.mode`); ``None`` for
    a single run."""
    generator = model.generator
    if not isinstance(generator, AnoSegEnsemble):
        return None
    generator.combine = model.config.eval.ensemble_combine
    return generator.mode


def calibrate_ensemble(model: LoadedModel, normal_image_paths: Sequence[Union[str, Path]], *,
                       batch_size: int = 16, progress: bool = False) -> None:
    """Set an ensemble's ``combine`` from ``model.config.eval.ensemble_combine`` and, when
    that makes it ``calibrated`` (:attr:`AnoSegEnsemble.mode`), fit it on
    ``normal_image_paths`` (the held-out images no member trained on; each member's logits at
    the model's resolution). A single run is left alone.

    Raises:
        DataError: ``calibrated`` without held-out images.
    """
    if ensemble_mode(model) != "calibrated":
        return
    generator = model.generator
    paths = [Path(p) for p in normal_image_paths]
    if not paths:
        raise DataError("a calibrated ensemble (members of several recipes, or "
                        "eval.ensemble_combine=calibrated) needs held-out normal images no "
                        "member trained on: train the members with the same data.split_seed, "
                        "or pass --ensemble-combine mean")
    geometry = Geometry.from_config(model.config.data)
    logits: List[List[torch.Tensor]] = [[] for _ in generator.members]
    step = 1 if geometry.tiled else batch_size
    with tqdm(total=len(paths), desc="calibrating the ensemble", unit="img",
              disable=not progress, leave=False) as bar:
        for start in range(0, len(paths), step):
            canvases, placements = load_placed_images(paths[start:start + step], geometry)
            for i, member in enumerate(generator.members):
                scored = predict_placed(member, canvases, placements, geometry,
                                        batch_size=batch_size, resolution="model")
                logits[i].extend(s.logit for s in scored)
            bar.update(len(canvases))
    generator.calibrate(logits)


RECIPE_FREE_KEYS = ("train.seed", "data.split_seed", "data.holdout_fraction", "data.root")
"""Config keys that do not make a different recipe (:func:`recipe_groups`), beside the
run-time keys (:func:`anoseg.config.runtime_keys`)."""


def recipe_groups(configs: Sequence[AnoSegConfig]) -> List[int]:
    """Number the members' recipes: members whose configs differ only in
    :data:`RECIPE_FREE_KEYS` and run-time keys share a number (0 for the first recipe met, 1
    for the next, ...). A calibrated ensemble averages each recipe's members first."""
    skip = (*RECIPE_FREE_KEYS, *runtime_keys())
    firsts: List[Dict[str, Any]] = []
    groups = []
    for config in configs:
        mine = config.to_dict()
        found = next((i for i, other in enumerate(firsts)
                      if not config_diff(other, mine, skip=skip)), None)
        if found is None:
            firsts.append(mine)
            found = len(firsts) - 1
        groups.append(found)
    return groups


def load_ensemble(checkpoints: Sequence[Union[str, Path]],
                  device: Union[str, torch.device, None] = None, *,
                  weights: str = "auto") -> LoadedModel:
    """Load several runs of one category as one model (:class:`AnoSegEnsemble`).

    The members must share the image size and the category. The returned model's config,
    checkpoint and weights kind are the first member's; ``members`` lists every member,
    ``step`` is the sum of their steps and ``data.split.holdout`` holds the held-out images
    that *no* member trained on (empty when the members used different splits: give them the
    same ``data.split_seed``).
    """
    if not checkpoints:
        raise ConfigError("an ensemble needs at least one run")
    loaded = [load_model(c, device, weights=weights) for c in checkpoints]
    first = loaded[0]
    for path, model in zip(checkpoints[1:], loaded[1:]):
        for key in ("image_size", "resize", "tiling", "category"):
            mine, theirs = getattr(first.config.data, key), getattr(model.config.data, key)
            if mine != theirs:
                raise ConfigError(f"ensemble member {path} has data.{key}={theirs!r}, the "
                                  f"first member {checkpoints[0]} has {mine!r}; members must "
                                  "share it")
    # A member never trains on its own held-out images, so the images every member held out
    # are exactly those no member trained on.
    def holdout_of(model: LoadedModel) -> List[str]:
        return list(model.data.split.holdout) if model.data is not None else []

    held_by_all = set.intersection(*(set(holdout_of(m)) for m in loaded))
    first_data = first.data or DataRecord(TrainingSplit())
    data = DataRecord(TrainingSplit(list(first_data.split.train),
                                    [p for p in holdout_of(first) if p in held_by_all]),
                      first_data.data_root)
    groups = recipe_groups([m.config for m in loaded])
    ensemble = AnoSegEnsemble([m.generator for m in loaded], first.config.eval.ensemble_combine,
                              groups, recipe_weights(checkpoints, loaded, groups)
                              ).to(first.device).eval()
    return LoadedModel(ensemble, first.config, first.checkpoint, first.device, first.weights,
                       step=sum(m.step or 0 for m in loaded), data=data,
                       members=tuple(str(c) for c in checkpoints))


def recipe_weights(checkpoints: Sequence[Union[str, Path]], loaded: Sequence[LoadedModel],
                   groups: Sequence[int]) -> Optional[List[Optional[float]]]:
    """Each recipe's ``eval.ensemble_weight`` (its first member's; ``None`` where it has none),
    or ``None`` when no recipe sets one. A calibrated ensemble uses them when every recipe has
    one (:meth:`AnoSegEnsemble.calibrate`; with a warning otherwise); a member whose weight
    differs from its recipe's first member's gets a warning naming it."""
    firsts: Dict[int, Optional[float]] = {}
    for path, model, group in zip(checkpoints, loaded, groups):
        weight = model.config.eval.ensemble_weight
        if group in firsts and firsts[group] != weight:
            warnings.warn(f"ensemble member {path} has eval.ensemble_weight={weight!r}, the "
                          f"first member of its recipe {firsts[group]!r}: the first is used")
        firsts.setdefault(group, weight)
    weights = [firsts[g] for g in sorted(firsts)]
    return None if all(w is None for w in weights) else weights


def load_runs(checkpoints: Sequence[Union[str, Path]],
              device: Union[str, torch.device, None] = None, *, ensemble: bool = False,
              weights: str = "auto") -> LoadedModel:
    """One run (:func:`load_model`), or with ``ensemble`` several runs as one model
    (:func:`load_ensemble`): what ``anoseg-predict`` and ``anoseg-export`` load.

    Raises:
        ConfigError: No run, or several without ``ensemble``.
    """
    if not checkpoints:
        raise ConfigError("no run folder or checkpoint given")
    if len(checkpoints) > 1 and not ensemble:
        raise ConfigError(f"{len(checkpoints)} runs given: pass --ensemble to use them as one "
                          "model (their maps averaged), or give one run")
    if ensemble:
        return load_ensemble(checkpoints, device, weights=weights)
    return load_model(checkpoints[0], device, weights=weights)


# --------------------------------------------------------------------------- the detector


@torch.no_grad()
def anoseg_normality(anoseg_generator: nn.Module, images: torch.Tensor, *,
                     amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """AnoSeg's *normality* map ``A_hat`` ``(B, 1, H, W)`` (1 = normal), the paper's convention
    for the discriminator pairs; returned on the device of ``images``."""
    device = next(anoseg_generator.parameters()).device
    anoseg_generator.eval()
    with autocast(device, amp_dtype):
        normality = anoseg_generator(images.to(device)).normality_map
    return normality.float().to(images.device)


def detector_checkpoint_path(path: Union[str, Path]) -> Path:
    """``last.pt`` of a detector, given a ``.pt`` file, a detector folder or a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / DETECTOR_DIR / CHECKPOINT_FILE, path / CHECKPOINT_FILE):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no detector checkpoint at {path / DETECTOR_DIR / CHECKPOINT_FILE}: train one with "
        f"anoseg-train --stage detector --run {path}")


def load_detector_checkpoint(path: Path) -> Dict[str, Any]:
    """A detector checkpoint (``kind`` checked)."""
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != DETECTOR_KIND:
        raise CheckpointError(f"{path} is not a detector checkpoint (kind "
                              f"{ckpt.get('kind')!r}); expected RUN_DIR/detector/last.pt")
    return ckpt


def load_detector_weights(detector: AnoSegDetector, ckpt: Dict[str, Any], path: Path) -> None:
    """Load a detector checkpoint's two networks into ``detector``."""
    try:
        detector.generator.load_state_dict(ckpt["generator"])
        detector.discriminator.load_state_dict(ckpt["discriminator"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its own config: {exc}") from None


@dataclass
class LoadedDetector:
    """A trained detector in eval mode, with its config and checkpoint dict."""

    detector: AnoSegDetector
    config: AnoSegConfig
    checkpoint: Dict[str, Any]
    device: torch.device

    @property
    def anoseg_step(self) -> int:
        """The segmenter checkpoint step the detector was trained on."""
        return int(self.checkpoint["anoseg_step"])


def load_detector(path: Union[str, Path], device: Union[str, torch.device, None] = None
                  ) -> LoadedDetector:
    """Rebuild the detector from a run folder, a detector folder or its ``last.pt``.

    Args:
        path: ``RUN_DIR``, ``RUN_DIR/detector`` or ``RUN_DIR/detector/last.pt``.
        device: where to put it; ``None`` = the best available (CUDA, MPS, CPU).

    Raises:
        CheckpointError: no detector there, or a file that is not a detector checkpoint.
    """
    ckpt_path = detector_checkpoint_path(path)
    ckpt = load_detector_checkpoint(ckpt_path)
    cfg = config_from_dict(ckpt["config"]).validate()
    detector = build_detector(cfg)
    load_detector_weights(detector, ckpt, ckpt_path)
    dev = resolve_device("auto") if device is None else torch.device(device)
    detector.to(dev).eval()
    return LoadedDetector(detector, cfg, ckpt, dev)


@torch.no_grad()
def detector_scores(detector_bundle: LoadedDetector, anoseg_generator: nn.Module,
                    images: torch.Tensor, *, batch_size: int = 16,
                    amp_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Image anomaly scores (eq. 5), higher = more anomalous.

    Args:
        detector_bundle: from :func:`load_detector`.
        anoseg_generator: the AnoSeg generator the detector was trained on
            (``anoseg.load_model(run_dir).generator``).
        images: float ``(B, 3, S, S)`` in ``[0, 1]`` at the model's image size.
        batch_size: images per forward pass.
        amp_dtype: optional autocast dtype.

    Returns:
        ``(B,)`` float scores on the CPU, with ``detector.score_alpha`` and
        ``detector.score_beta`` of the detector's config.
    """
    detector = detector_bundle.detector.eval()
    det_cfg = detector_bundle.config.detector
    device = next(detector.parameters()).device
    scores: List[torch.Tensor] = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size].to(device)
        normality = (anoseg_normality(anoseg_generator, chunk, amp_dtype=amp_dtype)
                     if detector.use_anomaly_map else None)
        with autocast(device, amp_dtype):
            score = detector.score(chunk, normality, alpha=det_cfg.score_alpha,
                                   beta=det_cfg.score_beta)
        scores.append(score.float().cpu())
    return torch.cat(scores) if scores else torch.empty(0)


def run_detector(checkpoint_path: Union[str, Path], model: LoadedModel,
                 device: Union[None, str, torch.device] = None
                 ) -> Tuple[Optional["LoadedDetector"], Optional[str]]:
    """The detector of the run holding ``checkpoint_path``, if it has one; never for an
    ensemble (a member's detector was trained on that member's maps, not the averaged ones).

    Returns:
        ``(LoadedDetector or None, warning or None)``; a detector trained on another segmenter
        checkpoint step is not used, and the warning says so.
    """
    if model.is_ensemble:
        return None, None
    run = RunDir.of_checkpoint(checkpoint_path)
    if run is None or not run.detector.has_checkpoint():
        return None, None
    detector = load_detector(run.path, device=device)
    mismatch = detector_step_mismatch(model, detector, run.detector.checkpoint)
    if mismatch is not None:
        return None, (f"{mismatch}: detector scores skipped (retrain it with anoseg-train "
                      "--stage detector)")
    return detector, None


def detector_step_mismatch(model: LoadedModel, detector: "LoadedDetector",
                           detector_path: Union[str, Path]
                           ) -> Optional[str]:
    """Why ``detector`` does not belong to ``model`` (trained on another segmenter step), or
    ``None`` when it does."""
    step = model.step if model.step is not None else -1
    if detector.anoseg_step == step:
        return None
    return (f"detector {detector_path} was trained on the segmenter at step "
            f"{detector.anoseg_step}, the checkpoint is at step {step}")
