"""Watching a training while it happens: ``train.logger=tensorboard``.

``losses.jsonl`` stays the record of a run; a logger only shows it. The loop
(:func:`anoseg.engine.run_training_loop`) hands a logger every line it writes to
``losses.jsonl`` (:meth:`TrainLogger.log_line`) and calls :meth:`TrainLogger.after_step` after
every step. :class:`TensorBoardLogger` writes those values, the learning rates and, every
``train.logger_image_every`` steps, the maps of a fixed :class:`MapProbe` (held-out normal
images and synthetic anomalies made from them) as a picture grid, a histogram and a few
statistics, so a collapsing map (the centre blob, the flat map) shows while it happens.

With ``train.logger=none`` (the default) the loop gets no logger: nothing is done per step.

Example:
    >>> cfg = load_config(None, ["train.logger=tensorboard"])      # doctest: +SKIP
    >>> anoseg.train(cfg, "runs/demo")                              # doctest: +SKIP
    >>> # tensorboard --logdir runs/demo/tensorboard
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from anoseg.config import AnoSegConfig
from anoseg.extras import require
from anoseg.inference import normality_to_anomaly
from anoseg.visualize import map_grid

SCALAR_TAGS = {"seg": "loss/seg", "rec": "loss/rec", "adv": "loss/adv",
               "disc": "loss/discriminator", "total": "loss/total",
               "map_std": "map/batch_std", "grad_norm": "train/grad_norm",
               "seconds": "train/seconds"}
"""TensorBoard tag of each ``losses.jsonl`` field (others go under ``train/``; the learning
rates under ``lr/``)."""

PROBE_SEED = 1_000_003
"""Synthesis seed of the probe's anomalies (fixed, so every grid shows the same ones)."""


class TrainLogger:
    """What the loop calls; this base class does nothing."""

    def log_line(self, step: int, record: Dict[str, Any]) -> None:
        """A line just written to ``losses.jsonl`` (``record`` is its JSON object)."""

    def after_step(self, step: int) -> None:
        """After every optimisation step (``step`` = steps done)."""

    def close(self) -> None:
        """At the end of the run (also on an error)."""


def tensorboard_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or one clear line naming the extra."""
    require("tensorboard", extra="tensorboard", feature="train.logger=tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


@dataclass
class MapProbe:
    """The fixed images whose maps are drawn.

    Attributes:
        normals: ``(N, 3, S, S)`` held-out normal images (training images without any).
        anomalies: ``(N, 3, S, S)`` synthetic anomalies made from them (seed
            :data:`PROBE_SEED`).
        masks: ``(N, S, S)`` the anomalies' masks, 1 = anomalous.
        source: ``held-out`` or ``training``.
    """

    normals: torch.Tensor
    anomalies: torch.Tensor
    masks: torch.Tensor
    source: str


def make_probe(holdout: Sequence[Path], train_images: Sequence[Path], cfg: AnoSegConfig
               ) -> MapProbe:
    """:class:`MapProbe` of ``train.logger_images`` images: the first held-out ones, else the
    first training images."""
    from anoseg.data.training_data import synthetic_batch
    from anoseg.inference import load_images

    n = cfg.train.logger_images
    paths, source = (list(holdout), "held-out") if holdout else (list(train_images), "training")
    normals = load_images(paths[:n], cfg.data.image_size)
    batch = synthetic_batch(normals, cfg.synthesis, PROBE_SEED, anomaly_ratio=1.0)
    return MapProbe(normals, batch["image"], (batch["normality"][:, 0] < 0.5).float(), source)


class TensorBoardLogger(TrainLogger):
    """Writes a run's TensorBoard events into ``log_dir``.

    Args:
        log_dir: ``RUN_DIR/tensorboard``.
        model: returns the generator to draw the probe with (the averaged one with EMA: the
            one inference uses); it is put in eval mode for the probe and back after.
        probe: the fixed images.
        image_every: steps between probes; the last step (``total_steps``) gets one too.
        learning_rates: returns ``{"generator": lr, "discriminator": lr}`` (logged with each
            line under ``lr/``).
        resumed_step: the checkpoint step of a resumed run: its later events are purged, as
            its later ``losses.jsonl`` lines are (``None`` for a fresh run: old event files
            are removed).
    """

    def __init__(self, log_dir: Path, *, model: Callable[[], nn.Module], probe: MapProbe,
                 image_every: int, total_steps: int,
                 learning_rates: Callable[[], Dict[str, float]],
                 resumed_step: Optional[int] = None) -> None:
        writer_class = tensorboard_writer_class()
        log_dir = Path(log_dir)
        if resumed_step is None and log_dir.is_dir():
            for old in log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = writer_class(str(log_dir), purge_step=None if resumed_step is None
                                   else resumed_step + 1)
        self.model, self.probe = model, probe
        self.image_every, self.total_steps = image_every, total_steps
        self.learning_rates = learning_rates

    def log_line(self, step: int, record: Dict[str, Any]) -> None:
        for name, value in record.items():
            if name == "step" or name.startswith("lr_") or not isinstance(value, (int, float)):
                continue  # the learning rates come from ``learning_rates``, named
            self.writer.add_scalar(SCALAR_TAGS.get(name, f"train/{name}"), value, step)
        for name, value in self.learning_rates().items():
            self.writer.add_scalar(f"lr/{name}", value, step)

    def after_step(self, step: int) -> None:
        if step % self.image_every == 0 or step == self.total_steps:
            self.log_probe(step)

    @torch.no_grad()
    def probe_maps(self) -> Dict[str, torch.Tensor]:
        """Anomaly maps ``(N, S, S)`` of the probe's normals and anomalies (float32, CPU)."""
        model = self.model()
        was_training = model.training
        device = next(model.parameters()).device
        model.eval()
        try:
            return {name: normality_to_anomaly(model(images.to(device)).normality_map
                                               .float())[:, 0].cpu()
                    for name, images in (("normal", self.probe.normals),
                                         ("anomaly", self.probe.anomalies))}
        finally:
            model.train(was_training)

    def log_probe(self, step: int) -> None:
        """The probe's grids (``maps/normal``, ``maps/synthetic``: input, map and mask), the
        histogram of the normals' map and ``probe/*`` statistics."""
        maps = self.probe_maps()
        masks = self.probe.masks.bool()
        normal, anomaly = maps["normal"], maps["anomaly"]
        stats = {"probe/normal_mean": normal.mean(), "probe/normal_max": normal.max(),
                 "probe/normal_std": normal.std(),
                 "probe/synthetic_inside_mean": anomaly[masks].mean() if masks.any() else None,
                 "probe/synthetic_outside_mean": anomaly[~masks].mean()}
        for tag, value in stats.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)
        self.writer.add_histogram("probe/normal_map", normal.numpy(), step)
        self.writer.add_image("maps/normal", map_grid(self.probe.normals, normal), step,
                              dataformats="HWC")
        self.writer.add_image("maps/synthetic", map_grid(self.probe.anomalies, anomaly,
                                                         self.probe.masks), step,
                              dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
