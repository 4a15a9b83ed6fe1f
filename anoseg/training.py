"""Training AnoSeg: losses, one training step, and the loop with checkpoints and resume.

The step is a plain function (:func:`train_step`) you can call from a notebook; :func:`train`
wraps it with data loading, the learning-rate schedule, logging, checkpoints, ``--resume``,
the wall-clock budget and the NaN guard.

Example:
    >>> from anoseg import load_config, train
    >>> cfg = load_config("configs/cpu_small.yaml", ["train.steps=50"])
    >>> result = train(cfg, "runs/demo")          # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from anoseg.checkpoint import (LAST_CHECKPOINT, load_checkpoint, save_checkpoint, write_json)
from anoseg.config import AnoSegConfig, TrainConfig, config_from_dict, save_config
from anoseg.errors import CheckpointError, ConfigError, TrainingDivergedError
from anoseg.models.discriminator import AnoSegDiscriminator
from anoseg.models.generator import AnoSegGenerator

# --------------------------------------------------------------------------- building blocks


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available here; use 'auto' "
                          "or 'cpu'")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None)
                                     and torch.backends.mps.is_available()):
        raise ConfigError(f"train.device={name!r} but MPS is not available here")
    return device


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or ``None`` for plain fp32."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision='fp16' is for CUDA; on CPU use 'bf16' or 'fp32'")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class DistributedContext:
    """Where this process sits in a ``torchrun`` job (world size 1 when run alone)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str) -> DistributedContext:
    """Join the process group that ``torchrun`` set up (NCCL on CUDA, gloo on CPU).

    Without torchrun's environment variables this is a no-op returning world size 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistributedContext(rank, local_rank, world_size)


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def build_generator(cfg: AnoSegConfig, *, map_decoder: bool = True) -> AnoSegGenerator:
    """The AnoSeg generator described by ``cfg`` (loads ``model.init_weights`` if set)."""
    generator = AnoSegGenerator(image_size=cfg.data.image_size, width=cfg.model.width,
                                coord_channels=cfg.model.coord_channels,
                                map_decoder=map_decoder,
                                reconstruction=cfg.model.reconstruction or not map_decoder,
                                map_skips=cfg.model.map_skips)
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
    return AnoSegDiscriminator(image_size=cfg.data.image_size, in_channels=4,
                               width=cfg.model.width)


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


# --------------------------------------------------------------------------- losses


def segmentation_loss(normality_map: torch.Tensor, normality_target: torch.Tensor,
                      balanced: bool = False) -> torch.Tensor:
    """L_Seg (eq. 2): mean absolute error between predicted and target normality maps.

    With ``balanced`` the error is averaged separately over pasted (target 0) and normal
    (target 1) pixels and the two means are averaged; a batch without pasted pixels falls
    back to the plain mean.
    """
    error = (normality_map - normality_target).abs()
    if not balanced:
        return error.mean()
    anomalous = (normality_target < 0.5).to(error.dtype)
    n_anomalous = anomalous.sum()
    if n_anomalous == 0:
        return error.mean()
    normal = 1.0 - anomalous
    return 0.5 * ((error * anomalous).sum() / n_anomalous
                  + (error * normal).sum() / normal.sum().clamp_min(1.0))


def masked_reconstruction_loss(reconstruction: torch.Tensor, images: torch.Tensor,
                               normality_target: torch.Tensor) -> torch.Tensor:
    """L_Re (eq. 4): L1 reconstruction error on normal pixels only, normalised by their count.

    Under DistributedDataParallel the count is summed over all processes (and the loss scaled
    by the world size, which DDP's gradient averaging undoes), so the loss is the same ratio
    of sums as in a single process with the global batch.
    """
    weight = normality_target.expand_as(images)
    count = weight.sum().detach()
    world = _world_size()
    if world > 1:
        count = _all_reduce_sum(count) / world
    return ((images - reconstruction).abs() * weight).sum() / count.clamp_min(1.0)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator side of L_Adv (eq. 3): real pairs -> 1, generated pairs -> 0."""
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator side of L_Adv, in the non-saturating form ``-log D(fake)``."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


# --------------------------------------------------------------------------- one step


@dataclass
class TrainState:
    """Everything that changes during training (what a checkpoint stores)."""

    generator: nn.Module
    discriminator: Optional[nn.Module]
    opt_g: torch.optim.Optimizer
    opt_d: Optional[torch.optim.Optimizer]
    scaler: Optional[torch.amp.GradScaler]
    step: int = 0
    images_seen: int = 0
    train_seconds: float = 0.0
    ema: Optional[nn.Module] = None
    """Exponential moving average of the generator's weights (``train.ema_decay > 0``)."""


def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """``ema = d * ema + (1 - d) * model`` for parameters; buffers (batch-norm statistics)
    are copied. ``d = min(decay, (1 + step) / (10 + step))``, so the first steps are not
    dominated by the random initial weights (short runs)."""
    d = min(decay, (1.0 + step) / (10.0 + step))
    with torch.no_grad():
        for mine, theirs in zip(ema.parameters(), model.parameters()):
            mine.mul_(d).add_(theirs.detach().to(mine.dtype), alpha=1.0 - d)
        for mine, theirs in zip(ema.buffers(), model.buffers()):
            mine.copy_(theirs)


DIVERGED_MESSAGE = ("loss {name} became {value} at step {step}; stopping. The last good "
                    "checkpoint is kept. Lower the learning rates (train.lr_generator, "
                    "train.lr_discriminator) or use train.precision=fp32.")
"""The :class:`TrainingDivergedError` text of :func:`check_finite` (``{name}``, ``{value}``,
``{step}`` are filled in)."""


def check_finite(losses: Dict[str, torch.Tensor], step: int, *,
                 message: str = DIVERGED_MESSAGE, reduce: bool = True) -> Dict[str, float]:
    """Raise :class:`TrainingDivergedError` if any loss is NaN/inf.

    With ``reduce`` (the segmenter) the losses are averaged over processes under DDP first, so
    every process stops alike (a one-sided stop would hang).

    Returns:
        The losses as floats (averaged over processes when reduced).
    """
    names = list(losses)
    values = torch.stack([losses[n].detach().float().reshape(()) for n in names])
    world = _world_size() if reduce else 1
    if world > 1:
        values = _all_reduce_sum(values) / world
    for name, value in zip(names, values):
        if not torch.isfinite(value).all():
            raise TrainingDivergedError(message.format(name=name, value=value.item(),
                                                       step=step))
    return {name: float(value) for name, value in zip(names, values)}


def train_step(state: TrainState, batch: Dict[str, torch.Tensor], cfg: TrainConfig, *,
               device: torch.device, amp_dtype: Optional[torch.dtype] = None,
               channels_last: bool = False) -> Dict[str, float]:
    """One optimisation step of generator and (when adversarial) discriminator.

    Args:
        state: models and optimisers (updated in place).
        batch: ``{"image": (B,3,S,S), "normality": (B,1,S,S)}``, ``x_Seg`` and ``A_Seg``.
        cfg: loss weights and switches.

    Returns:
        The losses of this step as floats.

    Raises:
        TrainingDivergedError: a loss is NaN or infinite. L_Seg and L_Re are checked before
            either optimiser steps, each adversarial loss before the step that uses it.
    """
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    target = batch["normality"].to(device, non_blocking=True)
    generator, discriminator = state.generator, state.discriminator
    adversarial = cfg.adversarial and discriminator is not None
    scaler = state.scaler
    generator.train()

    with autocast(device, amp_dtype):
        out = generator(images)
    normality = out.normality_map.float()
    losses: Dict[str, torch.Tensor] = {
        "seg": segmentation_loss(normality, target, balanced=cfg.seg_loss == "balanced_l1")}
    recon = out.reconstruction.float() if out.reconstruction is not None else None
    if recon is not None:
        losses["rec"] = masked_reconstruction_loss(recon, images.float(), target)

    check_finite(losses, state.step)  # before any optimiser step
    if adversarial:
        discriminator.train()
        real_pair = torch.cat([images, target], dim=1)
        fake_pair = torch.cat([recon, normality], dim=1)
        with autocast(device, amp_dtype):
            real_logits, _ = discriminator(real_pair)
            fake_logits, _ = discriminator(fake_pair.detach())
        loss_d = discriminator_loss(real_logits.float(), fake_logits.float())
        check_finite({"discriminator": loss_d}, state.step)
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
    result = check_finite({**losses, "total": total, "map_std": normality.detach().std()},
                          state.step)
    state.opt_g.zero_grad(set_to_none=True)
    backward(total, scaler)
    grad_norm = optimizer_step(state.opt_g, scaler, cfg.grad_clip)
    if grad_norm is not None:  # logged so a clip threshold can be read off a run
        result["grad_norm"] = float(grad_norm)
    if scaler is not None:
        scaler.update()
    if state.ema is not None:
        ema_update(state.ema, _unwrap(generator), cfg.ema_decay, state.step)
    state.step += 1
    state.images_seen += images.shape[0] * _world_size()
    return result


def backward(loss: torch.Tensor, scaler: Optional[torch.amp.GradScaler]) -> None:
    """``loss.backward()``, through the fp16 gradient scaler when there is one."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def optimizer_step(optimizer: torch.optim.Optimizer,
                   scaler: Optional[torch.amp.GradScaler],
                   max_norm: float = 0.0) -> Optional[torch.Tensor]:
    """``optimizer.step()``, through the fp16 gradient scaler when there is one.

    ``max_norm > 0`` first scales the gradients of the optimiser's parameters down to that
    global L2 norm (after unscaling them, with a scaler) and returns their norm before
    clipping; otherwise returns ``None``."""
    norm = None
    if max_norm > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()
    return norm


# --------------------------------------------------------------------------- shared by both runs
# The segmenter's :func:`train` and the detector's :func:`anoseg.detector.train_detector` share
# the optimisers, the checkpoint layout, resume and the loop below.


def make_adam(params, lr: float, betas: Tuple[float, float],
              weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The Adam optimiser both stages use."""
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)


def make_scaler(precision: str, device: torch.device) -> Optional[torch.amp.GradScaler]:
    """A gradient scaler for fp16 autocast on CUDA; ``None`` otherwise (bf16 and fp32 need none)."""
    amp_dtype = resolve_precision(precision, device)
    return (torch.amp.GradScaler("cuda")
            if amp_dtype == torch.float16 and device.type == "cuda" else None)


def checkpoint_dict(kind: str, cfg: AnoSegConfig, state: Any, generator: nn.Module,
                    discriminator: Optional[nn.Module], *,
                    header: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a checkpoint stores: ``kind``, version and config, then ``header``, the counters,
    the two networks, their optimisers and the scaler of ``state`` (a :class:`TrainState` or a
    detector state), then ``extra``."""
    from anoseg._version import __version__

    return {
        "kind": kind,
        "version": __version__,
        "config": cfg.to_dict(),
        **(header or {}),
        "step": state.step,
        "images_seen": state.images_seen,
        "train_seconds": state.train_seconds,
        "generator": generator.state_dict(),
        "discriminator": discriminator.state_dict() if discriminator is not None else None,
        "opt_g": state.opt_g.state_dict(),
        "opt_d": state.opt_d.state_dict() if state.opt_d is not None else None,
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        **(extra or {}),
    }


def restore_progress(state: Any, ckpt: Dict[str, Any]) -> None:
    """Load the optimisers, the scaler and the counters of :func:`checkpoint_dict` into
    ``state`` (the networks are the caller's)."""
    state.opt_g.load_state_dict(ckpt["opt_g"])
    if state.opt_d is not None:
        state.opt_d.load_state_dict(ckpt["opt_d"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["step"])
    state.images_seen = int(ckpt.get("images_seen", 0))
    state.train_seconds = float(ckpt.get("train_seconds", 0.0))


def diff_keys(a: Dict[str, Dict[str, Any]], b: Dict[str, Dict[str, Any]]) -> List[str]:
    """``section.key`` names of the keys of ``a`` whose value differs in ``b``."""
    return [f"{section}.{key}" for section in a for key in a[section]
            if a[section][key] != b.get(section, {}).get(key)]


def resumed_config(saved: Dict[str, Any], cfg: AnoSegConfig,
                   free_keys: Iterable[Sequence[str]], owner: str) -> AnoSegConfig:
    """The config a resumed run continues with: its ``saved`` one, with the ``(section, key)``
    pairs of ``free_keys`` taken from ``cfg``; other changed keys are reported and ignored."""
    resumed = config_from_dict(saved)
    for section, key in free_keys:  # how to run, not what is trained
        setattr(getattr(resumed, section), key, getattr(getattr(cfg, section), key))
    changed = diff_keys(resumed.to_dict(), cfg.to_dict())
    if changed:
        print(f"resume: using the {owner}'s saved config; ignoring changed keys {changed}")
    return resumed.validate()


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step and save; the second one
    interrupts at once (the last checkpoint on disk stays valid either way)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_StopFlag":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint's step (they will be redone)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    path.write_text("".join(k + "\n" for k in kept))


def reset_log(path: Path, resumed_step: Optional[int]) -> None:
    """Prepare the loss log: a fresh run (``resumed_step`` ``None``) removes an old one, a
    resumed run drops the lines after its checkpoint's step."""
    if resumed_step is not None:
        _truncate_log(path, resumed_step)
    elif path.exists():
        path.unlink()


def training_summary(state: Any, stopped: str, device: torch.device,
                     amp_dtype: Optional[torch.dtype], last_losses: Dict[str, float],
                     **extra: Any) -> Dict[str, Any]:
    """The ``summary.json`` of a run (``extra`` goes before ``last_losses``)."""
    return {"steps": state.step, "images_seen": state.images_seen,
            "train_seconds": round(state.train_seconds, 3), "stopped": stopped,
            "device": str(device), "precision": str(amp_dtype or "fp32"), **extra,
            "last_losses": last_losses}


def run_training_loop(state: Any, batches: Iterable[Any],
                      step_fn: Callable[[Any], Dict[str, float]], *, total_steps: int,
                      save: Callable[[], None], log_path: Optional[Path], log_every: int,
                      checkpoint_every: int, time_budget: Optional[float],
                      stop_at: Optional[int], progress: bool, desc: str,
                      should_stop: Optional[Callable[[List[bool]], List[bool]]] = None,
                      log_extra: Optional[Callable[[], Dict[str, Any]]] = None
                      ) -> Tuple[str, Dict[str, float]]:
    """Call ``step_fn(batch)`` until ``state.step`` reaches ``total_steps``, then ``save()``.

    Args:
        state: has ``step`` (advanced by ``step_fn``) and ``train_seconds`` (kept here).
        batches: an iterable of batches (``iter`` is called once, when the loop starts).
        step_fn: one optimisation step; returns its losses as floats.
        save: writes the checkpoint; called every ``checkpoint_every`` steps and at the end.
        log_path: JSON-lines loss log (means over ``log_every`` steps, appended), ``None`` for
            none (non-zero ranks).
        time_budget: wall-clock seconds of this call, ``None`` for no limit.
        stop_at: stop after this step as if interrupted.
        progress, desc: the tqdm bar.
        should_stop: maps the local ``[interrupted, budget_spent]`` flags to the ones to act on
            (under DDP their maximum over processes, so all stop at the same step).
        log_extra: more fields for each log line, between the losses and ``seconds``.

    Returns:
        ``(stopped, last_losses)``: ``completed``, ``time_budget``, ``interrupted`` or
        ``stop_at``, and the losses of the last step.
    """
    from tqdm.auto import tqdm

    stopped = "completed"
    last: Dict[str, float] = {}
    window: Dict[str, float] = {}
    window_count = 0
    started = time.perf_counter()
    seconds_before = state.train_seconds
    bar = tqdm(total=total_steps, initial=state.step, desc=desc, disable=not progress,
               dynamic_ncols=True)
    try:
        log_file = open(log_path, "a") if log_path is not None else contextlib.nullcontext()
        with _StopFlag() as stop_flag, log_file as log:
            iterator = iter(batches)
            while state.step < total_steps:
                batch = next(iterator)
                last = step_fn(batch)
                state.train_seconds = seconds_before + time.perf_counter() - started
                for name, value in last.items():
                    window[name] = window.get(name, 0.0) + value
                window_count += 1
                bar.update(1)
                if log is not None and (state.step % log_every == 0
                                        or state.step == total_steps):
                    means = {k: v / window_count for k, v in window.items()}
                    bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()}, refresh=False)
                    log.write(json.dumps({"step": state.step, **means,
                                          **(log_extra() if log_extra is not None else {}),
                                          "seconds": round(state.train_seconds, 3)}) + "\n")
                    log.flush()
                    window, window_count = {}, 0
                if state.step % checkpoint_every == 0:
                    save()
                flags = [stop_flag.requested,
                         time_budget is not None
                         and time.perf_counter() - started >= time_budget]
                interrupted, budget_spent = should_stop(flags) if should_stop else flags
                if interrupted:
                    stopped = "interrupted"
                    break
                if stop_at is not None and state.step >= stop_at:
                    stopped = "stop_at"
                    break
                if budget_spent:
                    stopped = "time_budget"
                    break
    finally:
        bar.close()
    save()
    return stopped, last


# --------------------------------------------------------------------------- the segmenter run


@dataclass
class TrainResult:
    run_dir: Path
    checkpoint: Path
    steps: int
    images_seen: int
    train_seconds: float
    stopped: str
    """``completed``, ``time_budget``, ``interrupted`` or ``stop_at``."""
    last_losses: Dict[str, float]


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
        generator = _wrap_ddp(generator, device, cfg.train.sync_batchnorm)
        if discriminator is not None:
            discriminator = _wrap_ddp(discriminator, device, cfg.train.sync_batchnorm)
    t = cfg.train
    betas = (t.beta1, t.beta2)
    opt_g = make_adam(generator.parameters(), t.lr_generator, betas, t.weight_decay)
    opt_d = (make_adam(discriminator.parameters(), t.lr_discriminator, betas, t.weight_decay)
             if discriminator is not None else None)
    ema = None
    if t.ema_decay > 0:
        import copy

        ema = copy.deepcopy(_unwrap(generator)).eval().requires_grad_(False)
    return TrainState(generator, discriminator, opt_g, opt_d, make_scaler(t.precision, device),
                      ema=ema)


def _wrap_ddp(module: nn.Module, device: torch.device, sync_batchnorm: bool) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        if device.type != "cuda":
            raise ConfigError("train.sync_batchnorm=true needs CUDA (PyTorch's SyncBatchNorm "
                              "runs on GPUs only); set it to false for CPU runs")
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def _unwrap(module: Optional[nn.Module]) -> Optional[nn.Module]:
    """The plain model inside DistributedDataParallel and/or ``torch.compile`` wrappers."""
    module = getattr(module, "module", module)  # DDP
    return getattr(module, "_orig_mod", module)  # torch.compile


def state_dict_of(state: TrainState, cfg: AnoSegConfig, extra: Dict[str, Any]) -> Dict[str, Any]:
    """The segmenter checkpoint; with EMA, ``generator_ema`` holds the averaged weights that
    inference uses (``generator`` stays the raw weights training resumes from)."""
    ema = {"generator_ema": state.ema.state_dict()} if state.ema is not None else {}
    return checkpoint_dict("anoseg", cfg, state, _unwrap(state.generator),
                           _unwrap(state.discriminator), extra={**extra, **ema})


def restore_train_state(state: TrainState, ckpt: Dict[str, Any]) -> None:
    _unwrap(state.generator).load_state_dict(ckpt["generator"])
    if state.ema is not None:
        if ckpt.get("generator_ema") is None:
            raise CheckpointError("the checkpoint has no EMA weights but the config sets "
                                  "train.ema_decay > 0; resume with the run's own config")
        state.ema.load_state_dict(ckpt["generator_ema"])
    if state.discriminator is not None:
        if ckpt.get("discriminator") is None:
            raise CheckpointError("the checkpoint has no discriminator but the config asks for "
                                  "adversarial training")
        _unwrap(state.discriminator).load_state_dict(ckpt["discriminator"])
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


RESUME_FREE_KEYS = (
    ("train", "steps"), ("train", "time_budget"), ("train", "device"), ("train", "precision"),
    ("train", "log_every"), ("train", "checkpoint_every"), ("train", "compile"),
    ("data", "num_workers"), ("data", "cache_images"),
)
"""Keys a resumed run takes from the new config; every other key comes from the run's own."""


def train(cfg: AnoSegConfig, output_dir: Union[str, Path], *, resume: bool = False,
          progress: bool = True, stop_at: Optional[int] = None) -> TrainResult:
    """Train AnoSeg on ``cfg.data`` and write the run folder ``output_dir``.

    Args:
        cfg: the validated configuration.
        output_dir: the run folder (created).
        resume: continue from ``output_dir/checkpoints/last.pt``. The run's saved config is
            used, except for the run-time keys of :data:`RESUME_FREE_KEYS` (steps, budget,
            device, precision, workers, ...).
        progress: show a tqdm progress bar.
        stop_at: stop after this step as if interrupted (for tests and staged runs).

    Returns:
        A :class:`TrainResult`; the checkpoint holds everything needed to resume.
    """
    from anoseg.data.mvtec import load_images_cached
    from anoseg.data.training_data import (StepSampler, SyntheticAnomalyDataset,
                                           make_train_loader)

    run_dir = Path(output_dir)
    ckpt_path = run_dir / LAST_CHECKPOINT
    log_path = run_dir / "losses.jsonl"
    ckpt: Optional[Dict[str, Any]] = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        cfg = resumed_config(ckpt["config"], cfg, RESUME_FREE_KEYS, "run")
    elif ckpt_path.exists():
        raise CheckpointError(f"{run_dir} already holds a run ({LAST_CHECKPOINT}); pass "
                              "--resume to continue it or choose another --output-dir")

    ctx = init_distributed(cfg.train.device)
    if ctx.enabled and cfg.train.batch_size % ctx.world_size:
        raise ConfigError(f"train.batch_size={cfg.train.batch_size} must be divisible by the "
                          f"number of processes ({ctx.world_size}): it is the global batch")
    batch_per_process = cfg.train.batch_size // ctx.world_size
    if ctx.enabled and torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        device = torch.device("cuda", ctx.local_rank)
    else:
        device = resolve_device(cfg.train.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    root = resolve_data_root(cfg)
    split = ckpt["split"] if ckpt is not None else prepare_training_split(cfg, root)

    progress = progress and ctx.is_main
    if ctx.is_main:  # only rank 0 writes to the run folder
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "split.json", {"data_root": str(root), **split})

    train_paths = [Path(p) for p in split["train"]]
    images = (load_images_cached(train_paths, cfg.data.image_size, progress=progress)
              if cfg.data.cache_images else train_paths)
    dataset = SyntheticAnomalyDataset(images, cfg.data.image_size, cfg.synthesis)

    state = create_train_state(cfg, device, distributed=ctx.enabled)
    if ckpt is not None:
        restore_train_state(state, ckpt)
    if ctx.is_main:
        reset_log(log_path, state.step if ckpt is not None else None)
    sampler = StepSampler(len(dataset), batch_per_process, cfg.train.seed,
                          start_step=state.step, rank=ctx.rank, world_size=ctx.world_size)
    loader = make_train_loader(dataset, sampler, batch_per_process, cfg.data.num_workers,
                               pin_memory=device.type == "cuda")
    extra = {"split": split, "data_root": str(root)}

    def save() -> None:
        if ctx.is_main:
            save_checkpoint(ckpt_path, state_dict_of(state, cfg, extra))

    def should_stop(reason_flags: List[bool]) -> List[bool]:
        """Every process must stop at the same step: take the maximum of the flags."""
        if not ctx.enabled:
            return reason_flags
        import torch.distributed as dist

        flags = torch.tensor([float(f) for f in reason_flags],
                             device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return [bool(f) for f in flags.tolist()]

    collapse = {"run": 0, "at": None}

    def step(batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        for group in state.opt_g.param_groups:
            group["lr"] = learning_rate(state.step, cfg.train.lr_generator, cfg.train)
        if state.opt_d is not None:
            for group in state.opt_d.param_groups:
                group["lr"] = learning_rate(state.step, cfg.train.lr_discriminator, cfg.train)
        losses = train_step(state, batch, cfg.train, device=device, amp_dtype=amp_dtype,
                            channels_last=cfg.train.channels_last)
        collapse["run"] = collapse["run"] + 1 if losses["map_std"] < COLLAPSE_STD else 0
        if collapse["run"] == COLLAPSE_STEPS and collapse["at"] is None:
            collapse["at"] = state.step
            if ctx.is_main:
                warnings.warn(COLLAPSE_MESSAGE.format(steps=COLLAPSE_STEPS, step=state.step),
                              RuntimeWarning, stacklevel=2)
        return losses

    stopped, last = run_training_loop(
        state, loader, step, total_steps=cfg.train.steps, save=save,
        log_path=log_path if ctx.is_main else None, log_every=cfg.train.log_every,
        checkpoint_every=cfg.train.checkpoint_every, time_budget=cfg.train.time_budget,
        stop_at=stop_at, progress=progress, desc=f"train {cfg.data.category}",
        should_stop=should_stop,
        log_extra=lambda: {"lr_g": state.opt_g.param_groups[0]["lr"]})
    if ctx.is_main:
        summary = training_summary(state, stopped, device, amp_dtype, last,
                                   map_collapsed_at_step=collapse["at"])
        summary["world_size"] = ctx.world_size
        write_json(run_dir / "summary.json", summary)
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()
    if stopped == "interrupted" and ctx.is_main:
        print(f"interrupted: checkpoint saved at step {state.step} in {ckpt_path}; "
              "continue with --resume")
    return TrainResult(run_dir, ckpt_path, state.step, state.images_seen, state.train_seconds,
                       stopped, last)
