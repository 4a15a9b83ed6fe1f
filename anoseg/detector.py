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

The score (eq. 5) is :meth:`anoseg.models.detector.AnoSegDetector.score`; :func:`detector_scores`
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
import torch.nn.functional as F
from torch import nn

from anoseg.checkpoint import LAST_CHECKPOINT, load_checkpoint, save_checkpoint, write_json
from anoseg.config import (AnoSegConfig, DetectorConfig, SynthesisConfig, config_from_dict,
                           load_config, save_config)
from anoseg.data.synthesis import synthesize_anomaly
from anoseg.data.training_data import SyntheticAnomalyDataset
from anoseg.errors import CheckpointError, ConfigError
from anoseg.models.detector import AnoSegDetector
from anoseg.training import (autocast, backward, build_generator, check_finite, checkpoint_dict,
                             diff_keys, discriminator_loss, generator_adversarial_loss,
                             make_adam, make_scaler, optimizer_step, reset_log,
                             resolve_device, resolve_precision, restore_progress,
                             resumed_config, run_training_loop, training_summary)

DETECTOR_DIR = "detector"
DETECTOR_CHECKPOINT = "last.pt"
DETECTOR_KIND = "anoseg-detector"

# Keys outside ``detector.*`` that may differ from the segmenter run's config: they change where
# and how fast the detector trains, not what AnoSeg is or which images it saw.
_FREE_KEYS = ("train.device", "train.precision", "train.deterministic", "train.log_every",
              "data.num_workers", "data.cache_images")

# --------------------------------------------------------------------------- data


class DetectorTrainingDataset(SyntheticAnomalyDataset):
    """Normal images, each with a synthetic anomaly of itself for ``L_cls``.

    ``dataset[(index, seed)]`` returns ``{"image", "normality"}`` (the normal image and its
    all-ones mask ``A_Nor``) and, when ``with_anomalies``, ``{"anomaly_image",
    "anomaly_normality"}`` (``x_Ano`` and ``A_Ano``, seeded by ``seed``). Keys come from
    :class:`anoseg.data.training_data.StepSampler`, so a step's batch is a pure function of the
    step and resume is exact.
    """

    def __init__(self, images: Union[torch.Tensor, Sequence[Path]], image_size: int,
                 cfg: SynthesisConfig, *, with_anomalies: bool = True) -> None:
        super().__init__(images, image_size, dataclasses.replace(cfg, anomaly_ratio=0.0))
        self.with_anomalies = with_anomalies

    def __getitem__(self, key: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        index, sample_seed = key
        image = self._image(int(index))
        sample = {"image": image, "normality": torch.ones(1, *image.shape[1:])}
        if self.with_anomalies:
            generator = torch.Generator().manual_seed(int(sample_seed))
            sample["anomaly_image"], sample["anomaly_normality"] = synthesize_anomaly(
                image, self.cfg, generator)
        return sample


# --------------------------------------------------------------------------- losses


def reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """L_rec: mean absolute error between ``x_hat`` and ``x`` (all pixels are normal here)."""
    return F.l1_loss(reconstruction, images)


def feature_matching_loss(fake_features: torch.Tensor, real_features: torch.Tensor
                          ) -> torch.Tensor:
    """L_fea: MSE between ``f(x_hat, A_hat)`` and the (fixed) target ``f(x, A_Nor)``."""
    return F.mse_loss(fake_features, real_features.detach())


def classification_loss(real_logits: torch.Tensor, anomaly_logits: torch.Tensor) -> torch.Tensor:
    """L_cls: real pairs ``(x_Nor, A_Nor)`` -> 1, synthetic anomaly pairs ``(x_Ano, A_Ano)`` -> 0."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(anomaly_logits,
                                                 torch.zeros_like(anomaly_logits)))


# --------------------------------------------------------------------------- building blocks


def build_detector(cfg: AnoSegConfig) -> AnoSegDetector:
    """The detector networks for ``cfg`` (same image size, width and coordinates as AnoSeg)."""
    return AnoSegDetector(image_size=cfg.data.image_size, width=cfg.model.width,
                          coord_channels=cfg.model.coord_channels,
                          use_anomaly_map=cfg.detector.use_anomaly_map)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients: AnoSeg is fixed while the detector trains."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


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


@dataclass
class DetectorState:
    """Everything that changes while the detector trains (what its checkpoint stores)."""

    detector: AnoSegDetector
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0


def create_detector_state(cfg: AnoSegConfig, device: torch.device) -> DetectorState:
    """Seeded detector networks and their Adam optimisers (betas from ``train.beta1/2``; no
    weight decay: ``train.weight_decay`` is not applied to the detector)."""
    torch.manual_seed(cfg.train.seed)
    detector = build_detector(cfg).to(device)
    betas = (cfg.train.beta1, cfg.train.beta2)
    opt_g = make_adam(detector.generator.parameters(), cfg.detector.lr_generator, betas)
    opt_d = make_adam(detector.discriminator.parameters(), cfg.detector.lr_discriminator, betas)
    return DetectorState(detector, opt_g, opt_d, make_scaler(cfg.train.precision, device))


_DIVERGED_MESSAGE = ("detector loss {name} became {value} at step {step}; stopping. The last "
                     "good detector checkpoint is kept. Lower detector.lr_generator and "
                     "detector.lr_discriminator or use train.precision=fp32.")


def _check_finite(losses: Dict[str, torch.Tensor], step: int) -> Dict[str, float]:
    return check_finite(losses, step, message=_DIVERGED_MESSAGE, reduce=False)


# --------------------------------------------------------------------------- one step


def detector_train_step(state: DetectorState, anoseg_generator: nn.Module,
                        batch: Dict[str, torch.Tensor], cfg: DetectorConfig, *,
                        device: torch.device, amp_dtype: Optional[torch.dtype] = None
                        ) -> Dict[str, float]:
    """One optimisation step of the detector's discriminator, then its generator.

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
        if "anomaly_image" not in batch:
            raise ValueError("detector.use_cls_loss needs batch['anomaly_image'] and "
                             "batch['anomaly_normality'] (see DetectorTrainingDataset)")
        anomalies = batch["anomaly_image"].to(device, non_blocking=True)
        if cfg.cls_map == "anoseg" and cfg.use_anomaly_map:
            anomaly_normality = anoseg_normality(anoseg_generator, anomalies,
                                                 amp_dtype=amp_dtype)
        else:
            anomaly_normality = batch["anomaly_normality"].to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            anomaly_logits, _ = discriminator(detector.pair(anomalies, anomaly_normality))
        losses["cls"] = classification_loss(real_logits.float(), anomaly_logits.float())
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


# --------------------------------------------------------------------------- checkpoints


def detector_checkpoint_path(path: Union[str, Path]) -> Path:
    """``last.pt`` of a detector, given a ``.pt`` file, a detector folder or a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / DETECTOR_DIR / DETECTOR_CHECKPOINT, path / DETECTOR_CHECKPOINT):
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"no detector checkpoint at {path / DETECTOR_DIR / DETECTOR_CHECKPOINT}: train one with "
        f"anoseg-train --stage detector --run {path}")


def _detector_state_dict(state: DetectorState, cfg: AnoSegConfig, anoseg_step: int,
                         anoseg_checkpoint: Path) -> Dict[str, Any]:
    return checkpoint_dict(DETECTOR_KIND, cfg, state, state.detector.generator,
                           state.detector.discriminator,
                           header={"anoseg_step": anoseg_step,
                                   "anoseg_checkpoint": str(anoseg_checkpoint)})


def _load_detector_checkpoint(path: Path) -> Dict[str, Any]:
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != DETECTOR_KIND:
        raise CheckpointError(f"{path} is not a detector checkpoint (kind "
                              f"{ckpt.get('kind')!r}); expected RUN_DIR/detector/last.pt")
    return ckpt


def _restore(state: DetectorState, ckpt: Dict[str, Any], path: Path) -> None:
    try:
        state.detector.generator.load_state_dict(ckpt["generator"])
        state.detector.discriminator.load_state_dict(ckpt["discriminator"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not match its own config: {exc}") from None
    restore_progress(state, ckpt)


# --------------------------------------------------------------------------- the run


@dataclass
class DetectorTrainResult:
    detector_dir: Path
    checkpoint: Path
    steps: int
    images_seen: int
    train_seconds: float
    stopped: str
    """``completed``, ``time_budget``, ``interrupted`` or ``stop_at``."""
    last_losses: Dict[str, float]
    anoseg_step: int


def _detector_config(base: AnoSegConfig, config_path: Optional[Union[str, Path]],
                     overrides: Sequence[str]) -> AnoSegConfig:
    """The segmenter run's config, then a YAML file, then ``--set`` overrides; only
    ``detector.*`` and a few run-time keys may change."""
    cfg = load_config(config_path, overrides, base=base, validate=False)
    changed = [key for key in diff_keys(base.to_dict(), cfg.to_dict())
               if not key.startswith("detector.") and key not in _FREE_KEYS]
    if changed:
        raise ConfigError(f"the detector is trained on the segmenter run's data and model; "
                          f"{', '.join(changed)} cannot change (only detector.* and "
                          f"{', '.join(_FREE_KEYS)})")
    return cfg.validate()


def train_detector(run_dir: Union[str, Path], overrides: Sequence[str] = (), *,
                   config_path: Optional[Union[str, Path]] = None,
                   output_dir: Optional[Union[str, Path]] = None, resume: bool = False,
                   progress: bool = True, stop_at: Optional[int] = None,
                   time_budget: Optional[float] = None) -> DetectorTrainResult:
    """Train the detector of a finished AnoSeg run, with AnoSeg frozen.

    Args:
        run_dir: the segmenter's run folder (``checkpoints/last.pt``, ``split.json``).
        overrides: ``section.key=value`` strings on top of the run's config (``detector.*``).
        config_path: optional YAML file applied before ``overrides`` (e.g.
            ``configs/detector_base.yaml``).
        output_dir: detector folder; default ``run_dir/detector``.
        resume: continue from ``output_dir/last.pt`` (its saved config is used; only
            ``detector.steps`` and ``detector.time_budget`` may differ).
        progress: show a tqdm progress bar.
        stop_at: stop after this step as if interrupted (tests, staged runs).
        time_budget: wall-clock seconds; overrides ``detector.time_budget``.

    Returns:
        A :class:`DetectorTrainResult`.

    Raises:
        CheckpointError: no trained segmenter in ``run_dir``, a detector already there without
            ``resume``, or a detector trained on another segmenter checkpoint.
    """
    from anoseg.data.mvtec import load_images_cached
    from anoseg.data.training_data import StepSampler, make_train_loader

    run_dir = Path(run_dir)
    seg_path = run_dir / LAST_CHECKPOINT
    if not seg_path.is_file():
        raise CheckpointError(f"no trained segmenter: {seg_path} does not exist; train AnoSeg "
                              f"first (anoseg-train --output-dir {run_dir})")
    seg_ckpt = load_checkpoint(seg_path)
    if seg_ckpt.get("kind", "anoseg") != "anoseg":
        raise CheckpointError(f"{seg_path} is not an AnoSeg segmenter checkpoint")
    seg_cfg = config_from_dict(seg_ckpt["config"])
    cfg = _detector_config(seg_cfg, config_path, overrides)
    if time_budget is not None:
        cfg.detector.time_budget = float(time_budget)
    cfg.validate()

    det_dir = Path(output_dir) if output_dir is not None else run_dir / DETECTOR_DIR
    ckpt_path = det_dir / DETECTOR_CHECKPOINT
    log_path = det_dir / "losses.jsonl"
    anoseg_step = int(seg_ckpt["step"])
    det_ckpt: Optional[Dict[str, Any]] = None
    if resume:
        if not ckpt_path.is_file():
            raise CheckpointError(f"cannot resume: {ckpt_path} does not exist")
        det_ckpt = _load_detector_checkpoint(ckpt_path)
        if int(det_ckpt["anoseg_step"]) != anoseg_step:
            raise CheckpointError(
                f"{ckpt_path} was trained on the segmenter at step {det_ckpt['anoseg_step']}, "
                f"but {seg_path} is now at step {anoseg_step}; train a new detector")
        # run-time settings follow this invocation
        free = ("detector.steps", "detector.time_budget", *_FREE_KEYS)
        cfg = resumed_config(det_ckpt["config"], cfg, [key.split(".") for key in free],
                             "detector")
    elif ckpt_path.exists():
        raise CheckpointError(f"{det_dir} already holds a detector ({DETECTOR_CHECKPOINT}); "
                              "pass --resume to continue it or choose another --output-dir")

    det = cfg.detector
    device = resolve_device(cfg.train.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    # The frozen segmenter, rebuilt from its own checkpoint.
    seg_cfg.model.init_weights = None
    anoseg_generator = build_generator(seg_cfg)
    anoseg_generator.load_state_dict(seg_ckpt["generator"])
    anoseg_generator = freeze(anoseg_generator.to(device))

    det_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, det_dir / "config.yaml")
    train_paths = [Path(p) for p in seg_ckpt["split"]["train"]]
    images = (load_images_cached(train_paths, cfg.data.image_size, progress=progress)
              if cfg.data.cache_images else train_paths)
    dataset = DetectorTrainingDataset(images, cfg.data.image_size, cfg.synthesis,
                                      with_anomalies=det.use_cls_loss)

    state = create_detector_state(cfg, device)
    if det_ckpt is not None:
        _restore(state, det_ckpt, ckpt_path)
    reset_log(log_path, state.step if det_ckpt is not None else None)
    sampler = StepSampler(len(dataset), det.batch_size, cfg.train.seed, start_step=state.step)
    loader = make_train_loader(dataset, sampler, det.batch_size, cfg.data.num_workers,
                               pin_memory=device.type == "cuda")

    def save() -> None:
        save_checkpoint(ckpt_path, _detector_state_dict(state, cfg, anoseg_step, seg_path))

    def step(batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        return detector_train_step(state, anoseg_generator, batch, det, device=device,
                                   amp_dtype=amp_dtype)

    stopped, last = run_training_loop(
        state, loader, step, total_steps=det.steps, save=save, log_path=log_path,
        log_every=cfg.train.log_every, checkpoint_every=det.checkpoint_every,
        time_budget=det.time_budget, stop_at=stop_at, progress=progress, desc="train detector")
    write_json(det_dir / "summary.json", training_summary(state, stopped, device, amp_dtype,
                                                          last, anoseg_step=anoseg_step))
    if stopped == "interrupted":
        print(f"interrupted: detector checkpoint saved at step {state.step} in {ckpt_path}; "
              "continue with --resume")
    return DetectorTrainResult(det_dir, ckpt_path, state.step, state.images_seen,
                               state.train_seconds, stopped, last, anoseg_step)


# --------------------------------------------------------------------------- inference


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
    ckpt = _load_detector_checkpoint(ckpt_path)
    cfg = config_from_dict(ckpt["config"]).validate()
    detector = build_detector(cfg)
    try:
        detector.generator.load_state_dict(ckpt["generator"])
        detector.discriminator.load_state_dict(ckpt["discriminator"])
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt_path} does not match its own config: {exc}") from None
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
