"""Training AnoSeg (the segmenter): one training step, and the run with checkpoints and resume.

The step is a plain function (:func:`train_step`) you can call from a notebook; :func:`train`
prepares the run folder, the data and the networks and hands the loop (logging, checkpoints,
``--resume``, the wall-clock budget) to :func:`anoseg.engine.run_stage`. The losses are
:mod:`anoseg.losses`, the networks :mod:`anoseg.models.factory`.

Example:
    >>> from anoseg import load_config, train
    >>> cfg = load_config("configs/cpu_small.yaml", ["train.steps=50"])
    >>> result = train(cfg, "runs/demo")          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from anoseg.checkpoint import load_checkpoint
from anoseg.config import AnoSegConfig, TrainConfig, save_config
from anoseg.engine import (Stage, TrainResult, TrainState, backward, check_finite,
                           checkpoint_dict, make_adam, optimizer_step, refuse_overwrite,
                           restore_progress, resumed_config, run_stage, setup_device,
                           check_batch_fits, segmenter_floats_per_pixel, stage_lock,
                           training_images)
from anoseg.errors import CheckpointError, ConfigError
from anoseg.losses import (discriminator_loss, generator_adversarial_loss,
                           focal_segmentation_loss, masked_reconstruction_loss,
                           reconstruction_loss, segmentation_loss)
from anoseg.models.factory import build_discriminator, build_generator
from anoseg.run_dir import DataRecord, RunDir, TrainingSplit
from anoseg.runtime import (autocast, init_distributed, make_scaler, unwrap, world_size,
                            wrap_ddp)

SEGMENTER_KIND = "anoseg"
"""``kind`` of a segmenter checkpoint (the detector's is ``anoseg-detector``)."""


def learning_rate(step: int, base_lr: float, cfg: TrainConfig) -> float:
    """Linear warm-up, then constant or cosine decay to ``base_lr * min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return base_lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return base_lr
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = base_lr * cfg.min_lr_ratio
    return floor + (base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int, *,
               foreach: bool = True) -> None:
    """``ema = d * ema + (1 - d) * model`` for parameters; the batch norms' running statistics
    are copied (:func:`_norm_buffers`). ``d = min(decay, (1 + step) / (10 + step))``, so the
    first steps are not dominated by the random initial weights (short runs).

    ``foreach`` does it with PyTorch's multi-tensor ops (``_foreach_mul_``, ``_foreach_add_``,
    ``_foreach_copy_``) instead of a Python loop over the tensors: the same operations, so
    the same bits, about 4x faster (docs/performance.md)."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        mine, theirs = list(ema.parameters()), [p.detach() for p in model.parameters()]
        if foreach and mine and all(a.dtype == b.dtype for a, b in zip(mine, theirs)):
            torch._foreach_mul_(mine, d)
            torch._foreach_add_(mine, theirs, alpha=1.0 - d)
            buffers, sources = _norm_buffers(ema), _norm_buffers(model)
            if buffers:
                torch._foreach_copy_(buffers, sources)
            return
        for a, b in zip(mine, theirs):
            a.mul_(d).add_(b.to(a.dtype), alpha=1.0 - d)
        for a, b in zip(_norm_buffers(ema), _norm_buffers(model)):
            a.copy_(b)


def _norm_buffers(model: nn.Module) -> List[torch.Tensor]:
    """The buffers training changes: the batch norms' running statistics. The others (the
    normal and feature statistics) are set on each copy on their own and are not copied."""
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers(recurse=False)]


def train_step(state: TrainState, batch: Dict[str, torch.Tensor], cfg: TrainConfig, *,
               device: torch.device, amp_dtype: Optional[torch.dtype] = None,
               channels_last: bool = False, read_losses: bool = True,
               foreach_ema: bool = True) -> Dict[str, Any]:
    """One optimisation step of generator and (when adversarial) discriminator.

    Long: it reads top to bottom in the order the step must happen (forward, L_Seg/L_Re
    checked, discriminator step, generator step, EMA), which pieces would hide.

    Args:
        state: models and optimisers (updated in place).
        batch: ``{"image": (B,3,H,W), "normality": (B,1,H,W)}``, ``x_Seg`` and ``A_Seg``;
            under tiling also ``span`` (B, 4), the tiles' coordinates in their images; with
            ``train.rec_target=clean`` also ``clean`` (B,3,H,W), the images before synthesis.
        cfg: loss weights and switches.
        read_losses: check the losses and return them as floats (three host syncs). False
            returns them as 0-d tensors, unchecked, so the step never waits for the device:
            the training loop reads and checks them at its next log line or checkpoint
            (:class:`anoseg.engine.LossWindow`), before anything is saved.
        foreach_ema: :func:`ema_update`'s ``foreach``.

    Returns:
        The losses of this step (floats, or tensors without ``read_losses``).

    Raises:
        TrainingDivergedError: with ``read_losses``, a loss is NaN or infinite. L_Seg and L_Re
            are checked before either optimiser steps, each adversarial loss before the step
            that uses it.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    target = batch["normality"].to(device, non_blocking=True)
    generator, discriminator = state.generator, state.discriminator
    adversarial = cfg.adversarial and discriminator is not None
    scaler = state.scaler
    generator.train()

    spans = batch.get("span")  # tiles' coordinates in their images (data.tiling)
    with autocast(device, amp_dtype):
        out = generator(images) if spans is None else generator(images, spans.to(device))
    normality = out.normality_map.float()
    losses: Dict[str, torch.Tensor] = {
        "seg": (focal_segmentation_loss(normality, target, cfg.seg_focal_gamma,
                                        anomaly_weight=cfg.seg_anomaly_weight)
                if cfg.seg_loss == "focal" else
                segmentation_loss(normality, target, balanced=cfg.seg_loss == "balanced_l1"))}
    recon = out.reconstruction.float() if out.reconstruction is not None else None
    if recon is not None:
        if cfg.rec_target == "clean":
            # reconstruct the image before synthesis, on every pixel (DRAEM's target)
            if "clean" not in batch:
                raise ValueError("train.rec_target=clean needs the batch's 'clean' images "
                                 "(SyntheticAnomalyDataset(keep_clean=True), "
                                 "synthetic_batch(keep_clean=True))")
            clean = batch["clean"].to(device, non_blocking=True).float()
            losses["rec"] = reconstruction_loss(recon, clean)
        else:
            losses["rec"] = masked_reconstruction_loss(recon, images.float(), target)

    check = check_finite if read_losses else _unread
    check(losses, state.step)  # before any optimiser step
    if adversarial:
        discriminator.train()
        real_pair = torch.cat([images, target], dim=1)
        fake_pair = torch.cat([recon, normality], dim=1)
        with autocast(device, amp_dtype):
            real_logits, _ = discriminator(real_pair)
            fake_logits, _ = discriminator(fake_pair.detach())
        loss_d = discriminator_loss(real_logits.float(), fake_logits.float())
        check({"discriminator": loss_d}, state.step)
        state.opt_d.zero_grad(set_to_none=True)
        backward(loss_d, scaler)
        optimizer_step(state.opt_d, scaler, cfg.grad_clip)
        with autocast(device, amp_dtype):
            fake_logits_g, _ = discriminator(fake_pair)
        losses["adv"] = generator_adversarial_loss(fake_logits_g.float())
        losses["disc"] = loss_d.detach()

    total = cfg.weight_seg * losses["seg"]
    if "rec" in losses:
        total = total + cfg.weight_rec * losses["rec"]
    if "adv" in losses:
        total = total + cfg.weight_adv * losses["adv"]
    # map_std ~ 0: the map collapsed to a constant; read back with the losses (one host sync)
    result = check({**losses, "total": total, "map_std": normality.detach().std()},
                   state.step)
    state.opt_g.zero_grad(set_to_none=True)
    backward(total, scaler)
    grad_norm = optimizer_step(state.opt_g, scaler, cfg.grad_clip)
    if grad_norm is not None:  # logged so a clip threshold can be read off a run
        result["grad_norm"] = float(grad_norm) if read_losses else grad_norm.detach()
    if scaler is not None:
        scaler.update()
    if state.ema is not None:
        ema_update(state.ema, unwrap(generator), cfg.ema_decay, state.step, foreach=foreach_ema)
    state.step += 1
    state.images_seen += images.shape[0] * world_size()
    return result


def _unread(losses: Dict[str, torch.Tensor], step: int) -> Dict[str, torch.Tensor]:
    """:func:`~anoseg.engine.check_finite` without the read: the losses, detached."""
    return {name: value.detach() for name, value in losses.items()}


def create_train_state(cfg: AnoSegConfig, device: torch.device,
                       distributed: bool = False) -> TrainState:
    """Seeded models and optimisers for ``cfg`` on ``device``.

    With ``distributed`` the models are wrapped in DistributedDataParallel (and their batch
    norms synchronised when ``train.sync_batchnorm``); every process starts from the same
    seeded weights, which DDP also broadcasts from rank 0.
    """
    torch.manual_seed(cfg.train.seed)
    generator = build_generator(cfg).to(device)
    discriminator = build_discriminator(cfg).to(device) if cfg.train.adversarial else None
    if cfg.train.channels_last:
        generator = generator.to(memory_format=torch.channels_last)
        if discriminator is not None:
            discriminator = discriminator.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        generator = torch.compile(generator)
        if discriminator is not None:
            discriminator = torch.compile(discriminator)
    if distributed:
        generator = wrap_ddp(generator, device, cfg.train.sync_batchnorm)
        if discriminator is not None:
            discriminator = wrap_ddp(discriminator, device, cfg.train.sync_batchnorm)
    t = cfg.train
    betas = (t.beta1, t.beta2)
    opt_g = make_adam(generator.parameters(), t.lr_generator, betas, t.weight_decay, t.adam)
    opt_d = (make_adam(discriminator.parameters(), t.lr_discriminator, betas, t.weight_decay,
                       t.adam) if discriminator is not None else None)
    ema = None
    if t.ema_decay > 0:
        ema = copy.deepcopy(unwrap(generator)).eval().requires_grad_(False)
    return TrainState(generator, discriminator, opt_g, opt_d, make_scaler(t.precision, device),
                      ema=ema)


def segmenter_checkpoint(state: TrainState, cfg: AnoSegConfig, data: DataRecord
                         ) -> Dict[str, Any]:
    """The segmenter checkpoint dict; with EMA, ``generator_ema`` holds the averaged weights
    that inference uses (``generator`` stays the raw weights training resumes from)."""
    ema = {"generator_ema": state.ema.state_dict()} if state.ema is not None else {}
    return checkpoint_dict(SEGMENTER_KIND, cfg, state, extra={**data.to_checkpoint(), **ema})


def restore_train_state(state: TrainState, ckpt: Dict[str, Any]) -> None:
    unwrap(state.generator).load_state_dict(ckpt["generator"])
    if state.ema is not None:
        if ckpt.get("generator_ema") is None:
            raise CheckpointError("the checkpoint has no EMA weights but the config sets "
                                  "train.ema_decay > 0; resume with the run's own config")
        state.ema.load_state_dict(ckpt["generator_ema"])
    if state.discriminator is not None:
        if ckpt.get("discriminator") is None:
            raise CheckpointError("the checkpoint has no discriminator but the config asks for "
                                  "adversarial training")
        unwrap(state.discriminator).load_state_dict(ckpt["discriminator"])
    restore_progress(state, ckpt)


def resolve_data_root(cfg: AnoSegConfig) -> Path:
    """``data.root``, or the built-in demo dataset (generated once) when it is unset."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    from anoseg.data.demo import ensure_demo_dataset

    return ensure_demo_dataset()


def prepare_training_split(cfg: AnoSegConfig, root: Path) -> Dict[str, List[str]]:
    """The seeded split of ``train/good`` into training images and held-out normal images."""
    from anoseg.data.mvtec import list_train_images, split_holdout

    paths = list_train_images(root, cfg.data.category)
    seed = cfg.train.seed if cfg.data.split_seed is None else cfg.data.split_seed
    train_paths, holdout = split_holdout(paths, cfg.data.holdout_fraction, seed)
    return {"train": [str(p) for p in train_paths], "holdout": [str(p) for p in holdout]}


def matched_canvas_config(cfg: AnoSegConfig, train_paths: Sequence[str], *,
                          announce: bool = False) -> AnoSegConfig:
    """``cfg`` with ``data.resize: match_aspect`` resolved from the training images' sizes
    (:func:`anoseg.data.geometry.match_aspect_canvas`): ``data.image_size`` becomes the
    matched canvas and ``data.resize`` ``stretch``, which the run's saved config records.
    Any other config (tiling included, which ignores ``data.resize``) is returned as it is."""
    if cfg.data.resize != "match_aspect" or cfg.data.tiling.enabled:
        return cfg
    from anoseg.config import image_hw
    from anoseg.data.geometry import match_aspect_canvas
    from anoseg.data.mvtec import image_size_of

    canvas = match_aspect_canvas(image_hw(cfg.data.image_size),
                                 [image_size_of(p) for p in train_paths])
    data = dataclasses.replace(cfg.data, image_size=list(canvas), resize="stretch")
    if announce:
        print(f"data.resize=match_aspect: the canvas is {data.image_size[0]}x"
              f"{data.image_size[1]} (height x width), shaped like the training images",
              flush=True)
    return dataclasses.replace(cfg, data=data)


COLLAPSE_STD = 0.02
COLLAPSE_STEPS = 20
COLLAPSE_MESSAGE = ("the normality map has been nearly constant (std < 0.02 over the batch) for "
                    "{steps} steps, up to step {step}: the map decoder collapsed and will not "
                    "recover (its sigmoid is saturated). Set train.grad_clip (e.g. 1.0), lower "
                    "train.lr_generator, or use a smaller model.width; summary.json records the "
                    "step as map_collapsed_at_step.")
"""Warned once per run when every one of ``COLLAPSE_STEPS`` consecutive steps has a map
standard deviation below ``COLLAPSE_STD``. Seen at width 0.5, lr 1e-3 on bsdata: after the
collapse the batch std stayed between 0.003 and 0.016 (L_Seg stuck at 0.500), while healthy
runs keep it above 0.1 after their first few steps (docs/experiments.md)."""


def train(cfg: AnoSegConfig, output_dir: Union[str, Path], *, resume: bool = False,
          progress: bool = True, stop_at: Optional[int] = None) -> TrainResult:
    """Train AnoSeg on ``cfg.data`` and write the run folder ``output_dir``.

    Args:
        cfg: the validated configuration.
        output_dir: the run folder (created).
        resume: continue from ``output_dir/checkpoints/last.pt``. The run's saved config is
            used, except for the run-time keys (:func:`anoseg.config.runtime_keys`: steps,
            budget, device, precision, workers, ...).
        progress: show a tqdm progress bar.
        stop_at: stop after this step as if interrupted (for tests and staged runs).

    Returns:
        A :class:`~anoseg.engine.TrainResult`; the checkpoint holds everything needed to resume.

    Raises:
        RunInUseError: another training holds ``output_dir/train.lock``.
        OutputError: ``output_dir`` is a file, or a checkpoint cannot be written.
        ConfigError: e.g. a batch that cannot fit in the device's memory.
    """
    run = RunDir(output_dir)
    with stage_lock(run):  # removed at the end, on an exception and on Ctrl-C
        return _train_locked(cfg, run, resume=resume, progress=progress, stop_at=stop_at)


def _train_locked(cfg: AnoSegConfig, run: RunDir, *, resume: bool, progress: bool,
                  stop_at: Optional[int]) -> TrainResult:
    """:func:`train` once the run folder's lock is held."""
    ckpt: Optional[Dict[str, Any]] = None
    if resume:
        ckpt = load_checkpoint(run.checkpoint)
        cfg = resumed_config(ckpt["config"], cfg, "run")
    else:
        refuse_overwrite(run, "a run")
    if cfg.train.logger == "tensorboard":
        from anoseg.train_logger import tensorboard_writer_class

        tensorboard_writer_class()  # a missing extra stops here, before any work

    ctx = init_distributed(cfg.train.device)
    if ctx.enabled and cfg.train.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                          f"number of processes ({ctx.world_size}): it is the global batch")
    device, amp_dtype = setup_device(cfg, ctx)
    root = resolve_data_root(cfg)
    split = ckpt["split"] if ckpt is not None else prepare_training_split(cfg, root)
    cfg = matched_canvas_config(cfg, split["train"], announce=ctx.is_main)
    check_batch_fits("train.batch_size", cfg.train.batch_size // ctx.world_size,
                     cfg.data.image_size, segmenter_floats_per_pixel(cfg.model.width), device)
    data = DataRecord(TrainingSplit.from_dict(split), str(root))

    progress = progress and ctx.is_main
    if ctx.is_main:  # only rank 0 writes to the run folder
        run.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        run.write_split(data)

    dataset, state = _dataset_and_state(cfg, data, device, ctx.enabled, ckpt, progress)
    watch = CollapseWatch(warn=ctx.is_main)

    def step(batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        set_learning_rates(state, cfg.train)
        return train_step(state, batch, cfg.train, device=device, amp_dtype=amp_dtype,
                          channels_last=cfg.train.channels_last, read_losses=False)

    fit = feature_stats_fitter(cfg, data, state, dataset, device)

    def make_checkpoint(final: bool) -> Dict[str, Any]:
        if final:
            fit()
        return segmenter_checkpoint(state, cfg, data)

    stage = Stage(run, state, dataset, step, make_checkpoint,
                  resumed=ckpt is not None, total_steps=cfg.train.steps,
                  batch_size=cfg.train.batch_size // ctx.world_size, seed=cfg.train.seed,
                  checkpoint_every=cfg.train.checkpoint_every,
                  time_budget=cfg.train.time_budget, desc=f"train {cfg.data.category}",
                  log_extra=lambda: {"lr_g": state.opt_g.param_groups[0]["lr"]},
                  summary_extra=lambda: {"map_collapsed_at_step": watch.at},
                  summary_tail={"world_size": ctx.world_size},
                  logger=segmenter_logger(cfg, run, state, data, ckpt) if ctx.is_main else None,
                  on_losses=lambda steps, losses: watch.update(losses["map_std"], steps))
    return run_stage(stage, cfg, device=device, amp_dtype=amp_dtype, stop_at=stop_at,
                     progress=progress, ctx=ctx)


def _dataset_and_state(cfg: AnoSegConfig, data: DataRecord, device: torch.device,
                       distributed: bool, ckpt: Optional[Dict[str, Any]], progress: bool):
    """The training images as a synthetic-anomaly dataset, and the models and optimisers:
    restored from ``ckpt``, or new (with the normal statistics of ``model.normal_stats``)."""
    from anoseg.data.geometry import Geometry
    from anoseg.data.training_data import SyntheticAnomalyDataset

    images, placements = training_images([Path(p) for p in data.split.train], cfg, progress)
    dataset = SyntheticAnomalyDataset(images, cfg.data.image_size, cfg.synthesis,
                                      geometry=Geometry.from_config(cfg.data),
                                      placements=placements,
                                      keep_clean=cfg.train.rec_target == "clean")
    state = create_train_state(cfg, device, distributed=distributed)
    if ckpt is not None:
        restore_train_state(state, ckpt)
    elif cfg.model.normal_stats:
        set_normal_stats(state, dataset)
    return dataset, state


FEATURE_STATS_BATCH = 32
"""Images per forward pass when fitting ``model.feature_stats``."""


def feature_stats_fitter(cfg: AnoSegConfig, data: DataRecord, state: TrainState, dataset,
                         device: torch.device):
    """A function that fits ``model.feature_stats`` of the raw and the EMA generator on the
    training images and the held-out normal images (the training images when none are held
    out); a no-op without ``model.feature_stats``. Called for the checkpoint written when
    training stops (however it stops). Making the fitter marks both generators' statistics as
    not fitted, since training moves the weights from the first step: a periodic checkpoint
    never pairs statistics with newer weights (its maps are the map head's alone, and loading
    it warns). Fitting at every periodic checkpoint took 23 % of a 1500-step deeppcb run
    (``docs/performance.md``)."""
    if not cfg.model.feature_stats:
        return lambda: None
    from anoseg.data.geometry import Geometry
    from anoseg.data.mvtec import load_placed_cached

    holdout = None
    if data.split.holdout:
        holdout, _ = load_placed_cached([Path(p) for p in data.split.holdout],
                                        Geometry.from_config(cfg.data), progress=False)

    def batches(source):
        if source is None:  # the training images
            for start in range(0, len(dataset), FEATURE_STATS_BATCH):
                stop = min(start + FEATURE_STATS_BATCH, len(dataset))
                yield torch.stack([dataset.normal_image(i) for i in range(start, stop)]
                                  ).to(device)
        else:
            for start in range(0, len(source), FEATURE_STATS_BATCH):
                yield source[start:start + FEATURE_STATS_BATCH].to(device).float().div_(255.0)

    models = [m for m in (unwrap(state.generator), state.ema) if m is not None]
    for model in models:
        model.clear_feature_stats()

    def fit() -> None:
        for model in models:
            model.fit_feature_stats(batches(None), batches(holdout))

    return fit


def set_normal_stats(state: TrainState, dataset) -> None:
    """``model.normal_stats``: the training images' per-pixel statistics into the generator
    (and its EMA copy), before the first step; a resumed run has them in its checkpoint."""
    from anoseg.data.training_data import normal_pixel_statistics

    mean, std = normal_pixel_statistics(dataset)
    for model in (unwrap(state.generator), state.ema):
        if model is not None:
            model.set_normal_stats(mean.to(model.stats_mean.device),
                                   std.to(model.stats_std.device))


def segmenter_logger(cfg: AnoSegConfig, run: RunDir, state: TrainState, data: DataRecord,
                     ckpt: Optional[Dict[str, Any]]):
    """The :class:`anoseg.train_logger.TensorBoardLogger` of ``train.logger=tensorboard``
    (probe: the run's first held-out images), else ``None``."""
    if cfg.train.logger == "none":
        return None
    from anoseg.run_dir import TENSORBOARD_DIR
    from anoseg.train_logger import TensorBoardLogger, make_probe

    def rates() -> Dict[str, float]:
        optimisers = {"generator": state.opt_g, "discriminator": state.opt_d}
        return {name: opt.param_groups[0]["lr"] for name, opt in optimisers.items()
                if opt is not None}

    probe = make_probe([Path(p) for p in data.split.holdout],
                       [Path(p) for p in data.split.train], cfg)
    return TensorBoardLogger(
        run.path / TENSORBOARD_DIR, probe=probe, learning_rates=rates,
        model=lambda: state.ema if state.ema is not None else unwrap(state.generator),
        image_every=cfg.train.logger_image_every, total_steps=cfg.train.steps,
        resumed_step=int(ckpt["step"]) if ckpt is not None else None)


def set_learning_rates(state: TrainState, cfg: TrainConfig) -> None:
    """Both optimisers' learning rates for ``state.step`` (:func:`learning_rate`)."""
    for group in state.opt_g.param_groups:
        group["lr"] = learning_rate(state.step, cfg.lr_generator, cfg)
    if state.opt_d is not None:
        for group in state.opt_d.param_groups:
            group["lr"] = learning_rate(state.step, cfg.lr_discriminator, cfg)


class CollapseWatch:
    """Counts consecutive steps whose map std is below :data:`COLLAPSE_STD`; at
    :data:`COLLAPSE_STEPS` records the step in :attr:`at` and (``warn``) warns once."""

    def __init__(self, warn: bool) -> None:
        self.warn = warn
        self.run = 0
        self.at: Optional[int] = None

    def update(self, map_std: float, step: int) -> None:
        self.run = self.run + 1 if map_std < COLLAPSE_STD else 0
        if self.run == COLLAPSE_STEPS and self.at is None:
            self.at = step
            if self.warn:
                warnings.warn(COLLAPSE_MESSAGE.format(steps=COLLAPSE_STEPS, step=step),
                              RuntimeWarning, stacklevel=3)
