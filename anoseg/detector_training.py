"""Training and using the image-level anomaly detector (paper 3.4, appendix A).

The detector is trained *after* AnoSeg, with AnoSeg frozen, on the same normal training
images. Per step, with ``x`` a batch of normal images ``x_Nor``, ``A_Nor`` all ones and
``A_hat`` AnoSeg's normality map of ``x`` (computed without gradients):

* ``L_Adv^AD`` (eq. 6): the discriminator learns real pair ``(x, A_Nor)`` -> 1 and fake pair
  ``(x_hat, A_hat)`` -> 0, where ``x_hat`` is the detector's reconstruction of ``x``; the
  generator gets the non-saturating ``-log D(x_hat, A_hat)``.
* ``L_cls`` (appendix A): the discriminator also learns synthetic anomalies
  ``(x_Ano, A_Ano)`` -> 0 against the real pair -> 1 (``A_Ano`` is the synthetic normality mask,
  or AnoSeg's map of ``x_Ano`` with ``detector.cls_map=anoseg``).
* ``L_fea`` (appendix A): the generator matches the discriminator features
  ``f(x_hat, A_hat)`` to ``f(x, A_Nor)`` (MSE).
* ``L_rec``: L1 between ``x`` and ``x_hat``.

The score (eq. 5) is :meth:`anoseg.models.detector.AnoSegDetector.score`; :func:`anoseg.inference.detector_scores`
applies it to a batch. Files go to ``RUN_DIR/detector/``: ``last.pt``, ``config.yaml``,
``losses.jsonl`` and ``summary.json``.

Example:
    >>> result = train_detector("runs/demo", ["detector.steps=200"])     # doctest: +SKIP
    >>> bundle = load_detector("runs/demo")                              # doctest: +SKIP
    >>> segmenter = anoseg.load_model("runs/demo")                       # doctest: +SKIP
    >>> scores = detector_scores(bundle, segmenter.generator, images)    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from anoseg.checkpoint import load_checkpoint
from anoseg.config import (AnoSegConfig, DetectorConfig, SynthesisConfig, config_diff,
                           config_from_dict, load_config, runtime_keys, save_config)
from anoseg.data.geometry import Geometry, Placement
from anoseg.data.training_data import SyntheticAnomalyDataset, synthesize_in_box
from anoseg.engine import (Stage, TrainResult, TrainState, backward, check_finite,
                           checkpoint_dict, make_adam, optimizer_step, refuse_overwrite,
                           restore_progress, resumed_config, run_stage, setup_device,
                           check_batch_fits, segmenter_floats_per_pixel, stage_lock,
                           training_images)
from anoseg.errors import CheckpointError, ConfigError
from anoseg.inference import (DETECTOR_KIND, anoseg_normality, load_detector_checkpoint,
                              load_detector_weights)
from anoseg.losses import (classification_loss, discriminator_loss, feature_matching_loss,
                           generator_adversarial_loss, reconstruction_loss)
from anoseg.models.detector import AnoSegDetector
from anoseg.models.factory import build_detector, build_generator
from anoseg.run_dir import DetectorDir, RunDir
from anoseg.runtime import autocast, make_scaler
from anoseg.training import SEGMENTER_KIND

# --------------------------------------------------------------------------- data


class DetectorTrainingDataset(SyntheticAnomalyDataset):
    """Normal images, each with a synthetic anomaly of itself for ``L_cls``.

    ``dataset[(index, seed)]`` returns ``{"image", "normality"}`` (the normal image and its
    all-ones mask ``A_Nor``) and, when ``with_anomalies``, ``{"anomaly_image",
    "anomaly_normality"}`` (``x_Ano`` and ``A_Ano``, seeded by ``seed``). Keys come from
    :class:`anoseg.data.training_data.StepSampler`, so a step's batch is a pure function of the
    step and resume is exact.
    """

    def __init__(self, images: Union[torch.Tensor, Sequence[Any]], image_size: Any,
                 cfg: SynthesisConfig, *, with_anomalies: bool = True,
                 geometry: Optional[Geometry] = None,
                 placements: Optional[List[Placement]] = None) -> None:
        super().__init__(images, image_size, dataclasses.replace(cfg, anomaly_ratio=0.0),
                         geometry=geometry, placements=placements)
        self.with_anomalies = with_anomalies

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        index, sample_seed = key
        image, box, _ = self.view(int(index), None)
        sample = {"image": image, "normality": torch.ones(1, *image.shape[1:])}
        if self.with_anomalies:
            rng = torch.Generator().manual_seed(int(sample_seed))
            sample["anomaly_image"], sample["anomaly_normality"], _ = synthesize_in_box(
                image, box, self.cfg, rng)
        return sample


# --------------------------------------------------------------------------- building blocks


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: AnoSeg is fixed while the detector trains."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


@dataclass
class DetectorState(TrainState):
    """The detector's :class:`~anoseg.engine.TrainState`: ``generator`` and ``discriminator``
    are the two networks of :attr:`detector`."""

    detector: Optional[AnoSegDetector] = None


def create_detector_state(cfg: AnoSegConfig, device: torch.device) -> DetectorState:
    """Seeded detector networks and their Adam optimisers (betas from ``train.beta1/2``; no
    weight decay: ``train.weight_decay`` is not applied to the detector)."""
    torch.manual_seed(cfg.train.seed)
    detector = build_detector(cfg).to(device)
    betas = (cfg.train.beta1, cfg.train.beta2)
    opt_g = make_adam(detector.generator.parameters(), cfg.detector.lr_generator, betas)
    opt_d = make_adam(detector.discriminator.parameters(), cfg.detector.lr_discriminator, betas)
    return DetectorState(detector.generator, detector.discriminator, opt_g, opt_d,
                         make_scaler(cfg.train.precision, device), detector=detector)


_DIVERGED_MESSAGE = ("detector loss {name} became {value} at step {step}; stopping. The last "
                     "good detector checkpoint is kept. Lower detector.lr_generator and "
                     "detector.lr_discriminator or use train.precision=fp32.")


def _check_finite(losses: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
    return check_finite(losses, step, message=_DIVERGED_MESSAGE, reduce=False)


# --------------------------------------------------------------------------- one step


def _cls_loss(detector: nn.Module, anoseg_generator: nn.Module,
              batch: Dict[str, torch.Tensor], real_logits: torch.Tensor, cfg: DetectorConfig, *,
              device: torch.device, amp_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """L_cls of :func:`detector_train_step`: the discriminator tells the real pair from a
    synthetic anomaly paired with its map (the mask, or AnoSeg's map with ``cls_map=anoseg``)."""
    if "anomaly_image" not in batch:
        raise ValueError("detector.use_cls_loss needs batch['anomaly_image'] and "
                         "batch['anomaly_normality'] (see DetectorTrainingDataset)")
    anomalies = batch["anomaly_image"].to(device, non_blocking=True)
    if cfg.cls_map == "anoseg" and cfg.use_anomaly_map:
        anomaly_normality = anoseg_normality(anoseg_generator, anomalies, amp_dtype=amp_dtype)
    else:
        anomaly_normality = batch["anomaly_normality"].to(device, non_blocking=True)
    with autocast(device, amp_dtype):
        anomaly_logits, _ = detector.discriminator(detector.pair(anomalies, anomaly_normality))
    return classification_loss(real_logits.float(), anomaly_logits.float())


def detector_train_step(state: DetectorState, anoseg_generator: nn.Module,
                        batch: Dict[str, torch.Tensor], cfg: DetectorConfig, *,
                        device: torch.device, amp_dtype: Optional[torch.dtype] = None
                        ) -> Dict[str, float]:
    """One optimisation step of the detector's discriminator, then its generator.

    Long: it reads top to bottom in the order of eq. 6 (discriminator step on the detached
    pair, then the generator's adversarial, reconstruction and feature-matching losses).

    Args:
        state: detector networks and optimisers (updated in place).
        anoseg_generator: the trained AnoSeg generator; only read, never updated.
        batch: ``{"image": x_Nor (B,3,S,S)}`` and, when ``cfg.use_cls_loss``,
            ``{"anomaly_image": x_Ano, "anomaly_normality": A_Ano (B,1,S,S)}`` (see
            :class:`DetectorTrainingDataset`).
        cfg: loss weights and the ablation switches.
        device: where the detector lives.
        amp_dtype: autocast dtype, ``None`` for fp32.

    Returns:
        The losses as floats: always ``disc`` (discriminator side of eq. 6), ``adv``, ``rec``
        and ``total`` (generator); ``fea`` with feature matching, ``cls`` with L_cls.

    Raises:
        TrainingDivergedError: a loss is NaN or infinite (no weight is updated then).
        ValueError: ``use_cls_loss`` but the batch has no synthetic anomalies.
    """
    detector, scaler = state.detector, state.scaler
    discriminator = detector.discriminator
    images = batch["image"].to(device, non_blocking=True)
    ones = torch.ones_like(images[:, :1])  # A_Nor
    # A_hat: AnoSeg's map of the *input* x (eq. 6), paired with the reconstruction x_hat.
    normality_hat = (anoseg_normality(anoseg_generator, images, amp_dtype=amp_dtype)
                     if cfg.use_anomaly_map else None)
    detector.train()

    with autocast(device, amp_dtype):
        reconstruction = detector.reconstruct(images)
    reconstruction = reconstruction.float()
    real_pair = detector.pair(images, ones)
    fake_pair = detector.pair(reconstruction, normality_hat)

    # Discriminator: eq. 6 (+ L_cls).
    losses: Dict[str, torch.Tensor] = {}
    with autocast(device, amp_dtype):
        real_logits, real_features = discriminator(real_pair)
        fake_logits, _ = discriminator(fake_pair.detach())
    loss_adv_d = discriminator_loss(real_logits.float(), fake_logits.float())
    loss_d = loss_adv_d
    if cfg.use_cls_loss:
        losses["cls"] = _cls_loss(detector, anoseg_generator, batch, real_logits, cfg,
                                  device=device, amp_dtype=amp_dtype)
        loss_d = loss_d + cfg.weight_cls * losses["cls"]
    _check_finite({"disc": loss_adv_d, **losses, "disc_total": loss_d}, state.step)
    state.opt_d.zero_grad(set_to_none=True)
    backward(loss_d, scaler)
    optimizer_step(state.opt_d, scaler)

    # Generator: adversarial, reconstruction (+ feature matching against the real pair's f).
    with autocast(device, amp_dtype):
        fake_logits_g, fake_features = discriminator(fake_pair)
    losses["adv"] = generator_adversarial_loss(fake_logits_g.float())
    losses["rec"] = reconstruction_loss(reconstruction, images.float())
    total = cfg.weight_adv * losses["adv"] + cfg.weight_rec * losses["rec"]
    if cfg.use_feature_matching:
        # Target: f(x, A_Nor) from this step's discriminator pass, held fixed (detached).
        losses["fea"] = feature_matching_loss(fake_features.float(), real_features.float())
        total = total + cfg.weight_fea * losses["fea"]
    losses["disc"] = loss_adv_d.detach()
    result = _check_finite({**losses, "total": total}, state.step)
    state.opt_g.zero_grad(set_to_none=True)
    backward(total, scaler)
    optimizer_step(state.opt_g, scaler)
    if scaler is not None:
        scaler.update()
    state.step += 1
    state.images_seen += images.shape[0]
    return result


# --------------------------------------------------------------------------- the run


def _detector_config(base: AnoSegConfig, config_path: Optional[Union[str, Path]],
                     overrides: Sequence[str]) -> AnoSegConfig:
    """The segmenter run's config, then a YAML file, then ``--set`` overrides; only
    ``detector.*`` and a few run-time keys may change."""
    cfg = load_config(config_path, overrides, base=base, validate=False)
    free = [key for key in runtime_keys() if not key.startswith("detector.")]
    changed = [key for key in config_diff(base.to_dict(), cfg.to_dict(), skip=free)
               if not key.startswith("detector.")]
    if changed:
        raise ConfigError(f"the detector is trained on the segmenter run's data and model; "
                          f"{', '.join(changed)} cannot change (only detector.* and "
                          f"{', '.join(free)})")
    return cfg.validate()


def detector_checkpoint(state: DetectorState, cfg: AnoSegConfig, anoseg_step: int,
                        anoseg_checkpoint: Path) -> Dict[str, Any]:
    """The detector checkpoint dict (``kind`` ``anoseg-detector``, the segmenter step it was
    trained on first)."""
    return checkpoint_dict(DETECTOR_KIND, cfg, state,
                           header={"anoseg_step": anoseg_step,
                                   "anoseg_checkpoint": str(anoseg_checkpoint)})


def load_segmenter_checkpoint(run: RunDir) -> Dict[str, Any]:
    """The finished segmenter's checkpoint the detector is trained on.

    Raises:
        CheckpointError: there is none, or it is not a segmenter checkpoint.
    """
    if not run.has_checkpoint():
        raise CheckpointError(f"no trained segmenter: {run.checkpoint} does not exist; train "
                              f"AnoSeg first (anoseg-train --output-dir {run.path})")
    seg_ckpt = load_checkpoint(run.checkpoint)
    if seg_ckpt.get("kind", SEGMENTER_KIND) != SEGMENTER_KIND:
        raise CheckpointError(f"{run.checkpoint} is not an AnoSeg segmenter checkpoint")
    return seg_ckpt


def frozen_segmenter(seg_ckpt: Dict[str, Any], device: torch.device) -> nn.Module:
    """The segmenter's generator rebuilt from its checkpoint, frozen on ``device``."""
    seg_cfg = config_from_dict(seg_ckpt["config"])
    seg_cfg.model.init_weights = None
    anoseg_generator = build_generator(seg_cfg)
    anoseg_generator.load_state_dict(seg_ckpt["generator"])
    return freeze(anoseg_generator.to(device))


def _checkpoint_to_resume(folder: DetectorDir, run: RunDir, anoseg_step: int
                          ) -> Dict[str, Any]:
    """The detector checkpoint to resume, checked to be trained on the segmenter's current
    step."""
    if not folder.has_checkpoint():
        raise CheckpointError(f"cannot resume: {folder.checkpoint} does not exist")
    det_ckpt = load_detector_checkpoint(folder.checkpoint)
    if int(det_ckpt["anoseg_step"]) != anoseg_step:
        raise CheckpointError(
            f"{folder.checkpoint} was trained on the segmenter at step "
            f"{det_ckpt['anoseg_step']}, but {run.checkpoint} is now at step "
            f"{anoseg_step}; train a new detector")
    return det_ckpt


def train_detector(run_dir: Union[str, Path], overrides: Sequence[str] = (), *,
                   config_path: Optional[Union[str, Path]] = None,
                   output_dir: Optional[Union[str, Path]] = None, resume: bool = False,
                   progress: bool = True, stop_at: Optional[int] = None,
                   time_budget: Optional[float] = None) -> TrainResult:
    """Train the detector of a finished AnoSeg run, with AnoSeg frozen.

    Args:
        run_dir: the segmenter's run folder (``checkpoints/last.pt``, ``split.json``).
        overrides: ``section.key=value`` strings on top of the run's config (``detector.*``).
        config_path: optional YAML file applied before ``overrides`` (e.g.
            ``configs/detector_base.yaml``).
        output_dir: detector folder; default ``run_dir/detector``.
        resume: continue from ``output_dir/last.pt`` (its saved config is used, except for the
            run-time keys, :func:`anoseg.config.runtime_keys`).
        progress: show a tqdm progress bar.
        stop_at: stop after this step as if interrupted (tests, staged runs).
        time_budget: wall-clock seconds; overrides ``detector.time_budget``.

    Returns:
        A :class:`~anoseg.engine.TrainResult` (``run_dir`` is the detector folder,
        ``anoseg_step`` the segmenter step it was trained on).

    Raises:
        CheckpointError: no trained segmenter in ``run_dir``, a detector already there without
            ``resume``, or a detector trained on another segmenter checkpoint.
        RunInUseError: another training holds the detector folder's ``train.lock``.
    """
    run = RunDir(run_dir)
    seg_ckpt = load_segmenter_checkpoint(run)
    folder = DetectorDir(output_dir) if output_dir is not None else run.detector
    with stage_lock(folder):  # removed at the end, on an exception and on Ctrl-C
        return _train_detector_locked(run, seg_ckpt, folder, overrides, config_path=config_path,
                                      resume=resume, progress=progress, stop_at=stop_at,
                                      time_budget=time_budget)


def _train_detector_locked(run: RunDir, seg_ckpt: Dict[str, Any], folder: DetectorDir,
                           overrides: Sequence[str], *,
                           config_path: Optional[Union[str, Path]], resume: bool,
                           progress: bool, stop_at: Optional[int],
                           time_budget: Optional[float]) -> TrainResult:
    """:func:`train_detector` once the detector folder's lock is held."""
    cfg = _detector_config(config_from_dict(seg_ckpt["config"]), config_path, overrides)
    if time_budget is not None:
        cfg.detector.time_budget = float(time_budget)
    cfg.validate()
    if cfg.data.tiling.enabled:
        raise ConfigError("the detector scores whole images and does not support "
                          "data.tiling yet; train it on a run without tiling")

    anoseg_step = int(seg_ckpt["step"])
    det_ckpt: Optional[Dict[str, Any]] = None
    if resume:
        det_ckpt = _checkpoint_to_resume(folder, run, anoseg_step)
        cfg = resumed_config(det_ckpt["config"], cfg, "detector")
    else:
        refuse_overwrite(folder, "a detector")

    det = cfg.detector
    device, amp_dtype = setup_device(cfg)
    check_batch_fits("detector.batch_size", det.batch_size, cfg.data.image_size,
                     segmenter_floats_per_pixel(cfg.model.width), device)
    anoseg_generator = frozen_segmenter(seg_ckpt, device)

    folder.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder.config)
    images, placements = training_images([Path(p) for p in seg_ckpt["split"]["train"]], cfg,
                                         progress)
    dataset = DetectorTrainingDataset(images, cfg.data.image_size, cfg.synthesis,
                                      with_anomalies=det.use_cls_loss,
                                      geometry=Geometry.from_config(cfg.data),
                                      placements=placements)
    state = create_detector_state(cfg, device)
    if det_ckpt is not None:
        load_detector_weights(state.detector, det_ckpt, folder.checkpoint)
        restore_progress(state, det_ckpt)

    def step(batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        return detector_train_step(state, anoseg_generator, batch, det, device=device,
                                   amp_dtype=amp_dtype)

    stage = Stage(folder, state, dataset, step,
                  lambda final: detector_checkpoint(state, cfg, anoseg_step, run.checkpoint),
                  resumed=det_ckpt is not None, total_steps=det.steps,
                  batch_size=det.batch_size, seed=cfg.train.seed,
                  checkpoint_every=det.checkpoint_every, time_budget=det.time_budget,
                  desc="train detector", checkpoint_name="detector checkpoint",
                  summary_extra=lambda: {"anoseg_step": anoseg_step})
    return run_stage(stage, cfg, device=device, amp_dtype=amp_dtype, stop_at=stop_at,
                     progress=progress, anoseg_step=anoseg_step)
