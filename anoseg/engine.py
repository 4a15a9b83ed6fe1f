"""The training loop both stages run: the segmenter (:mod:`anoseg.training`) and the detector
(:mod:`anoseg.detector_training`).

A stage brings its networks (a :class:`TrainState`), its dataset and its step function;
:func:`run_stage` does the rest the same way for both: the loss log, the seeded
:class:`~anoseg.data.training_data.StepSampler` that restarts at the resumed step, the loop with
its Ctrl-C flag, wall-clock budget and checkpoint cadence, ``summary.json`` and the result.

Example:
    >>> # a stage = TrainState + dataset + step function; see anoseg.training.train
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from anoseg.checkpoint import save_checkpoint
from anoseg.config import AnoSegConfig, config_diff, config_from_dict, with_runtime_keys
from anoseg.errors import CheckpointError, ConfigError, TrainingDivergedError
from anoseg.run_dir import StageDir, StageLock
from anoseg.runtime import (DistributedContext, all_reduce_max_flags, all_reduce_sum, barrier,
                            process_device, resolve_precision, unwrap, world_size)

# --------------------------------------------------------------------------- state and result


@dataclass
class TrainState:
    """Everything that changes during training (what a checkpoint stores), for both stages:
    the segmenter's generator and discriminator, or the detector's two networks."""

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
    data_wait_seconds: float = 0.0
    """Seconds this process's loop waited on the data loader (``summary.json``; not saved in
    the checkpoint)."""


@dataclass
class TrainResult:
    """What a stage's run returns (the segmenter's :func:`anoseg.train` or the detector's)."""

    run_dir: Path
    """The stage's folder: the run folder, or the detector folder."""
    checkpoint: Path
    steps: int
    images_seen: int
    train_seconds: float
    stopped: str
    """``completed``, ``time_budget``, ``interrupted`` or ``stop_at``."""
    last_losses: Dict[str, float]
    anoseg_step: Optional[int] = None
    """The detector's: the segmenter checkpoint step it was trained on (``None`` otherwise)."""

    @property
    def detector_dir(self) -> Path:
        return self.run_dir


# --------------------------------------------------------------------------- optimisation


def make_adam(params, lr: float, betas: Tuple[float, float],
              weight_decay: float = 0.0, implementation: str = "auto") -> torch.optim.Optimizer:
    """The Adam optimiser both stages use, in one of
    :data:`anoseg.config.ADAM_IMPLEMENTATIONS` (``train.adam``): PyTorch's per-parameter
    ``loop``, its multi-tensor ``foreach`` (the same bits), its ``fused`` kernel (rounds
    differently), or ``auto``, PyTorch's own choice (``loop`` on a CPU, ``foreach`` on CUDA)."""
    flags = {"loop": {"foreach": False}, "foreach": {"foreach": True},
             "fused": {"fused": True}}.get(implementation, {})
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay, **flags)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, keeping ``optimizer``'s implementation (its
    ``foreach``/``fused`` flags, which the saved groups would overwrite): a resumed run uses
    ``train.adam`` as it is set now."""
    flags = [{k: g[k] for k in ("foreach", "fused") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)
        if kept.get("fused"):  # the fused kernel wants its step counts on the parameters' device
            for param in group["params"]:
                state = optimizer.state.get(param)
                if state and torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(param.device, torch.float32)


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
    world = world_size() if reduce else 1
    if world > 1:
        values = all_reduce_sum(values) / world
    for name, value in zip(names, values):
        if not torch.isfinite(value).all():
            raise TrainingDivergedError(message.format(name=name, value=value.item(),
                                                       step=step))
    return {name: float(value) for name, value in zip(names, values)}


class LossWindow:
    """The losses of the steps since the last read, as the step function returned them:
    floats, or 0-d tensors left on the device, so a step needs no host sync. :meth:`read`
    brings every tensor back at once (one sync; under DDP averaged over processes in one
    all-reduce, so each process must read at the same steps) and checks every loss is finite,
    step by step: a NaN or inf raises :class:`TrainingDivergedError` naming the first bad
    loss and its step, before the loop can save a checkpoint.

    Args:
        on_losses: called as ``on_losses(steps_done, losses)`` for each step read, in order.
    """

    def __init__(self, on_losses: Optional[Callable[[int, Dict[str, float]], None]] = None
                 ) -> None:
        self.on_losses = on_losses
        self.pending: List[Tuple[int, Dict[str, Any]]] = []
        self.sums: Dict[str, float] = {}
        self.count = 0
        self.last: Dict[str, float] = {}

    def add(self, step: int, losses: Dict[str, Any]) -> None:
        """The losses of step ``step`` (0-based; ``step + 1`` steps are done after it)."""
        self.pending.append((step, losses))

    def read(self) -> None:
        """Read, check and sum the pending steps' losses (see the class)."""
        tensors = [v for _, losses in self.pending for v in losses.values() if torch.is_tensor(v)]
        values = iter([])
        if tensors:
            stacked = torch.stack([t.detach().float().reshape(()) for t in tensors])
            world = world_size()
            if world > 1:
                stacked = all_reduce_sum(stacked) / world
            values = iter(stacked.tolist())
        pending, self.pending = self.pending, []
        for step, losses in pending:
            read = {name: next(values) if torch.is_tensor(v) else float(v)
                    for name, v in losses.items()}
            for name, value in read.items():
                if not math.isfinite(value):
                    raise TrainingDivergedError(DIVERGED_MESSAGE.format(name=name, value=value,
                                                                        step=step))
                self.sums[name] = self.sums.get(name, 0.0) + value
            self.count += 1
            self.last = read
            if self.on_losses is not None:
                self.on_losses(step + 1, read)

    def means(self) -> Dict[str, float]:
        """The mean of each loss over the steps read since the last call; starts a new window."""
        means = {k: v / self.count for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        return means


# --------------------------------------------------------------------------- checkpoints, resume


def checkpoint_dict(kind: str, cfg: AnoSegConfig, state: TrainState, *,
                    header: Optional[Dict[str, Any]] = None,
                    extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What a checkpoint stores: ``kind``, version and config, then ``header``, the counters,
    the two networks (unwrapped), their optimisers and the scaler of ``state``, then
    ``extra``."""
    from anoseg._version import __version__

    generator, discriminator = unwrap(state.generator), unwrap(state.discriminator)
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


def restore_progress(state: TrainState, ckpt: Dict[str, Any]) -> None:
    """Load the optimisers, the scaler and the counters of :func:`checkpoint_dict` into
    ``state`` (the networks are the caller's)."""
    load_optimizer_state(state.opt_g, ckpt["opt_g"])
    if state.opt_d is not None:
        load_optimizer_state(state.opt_d, ckpt["opt_d"])
    if state.scaler is not None and ckpt.get("scaler"):
        state.scaler.load_state_dict(ckpt["scaler"])
    state.step = int(ckpt["step"])
    state.images_seen = int(ckpt.get("images_seen", 0))
    state.train_seconds = float(ckpt.get("train_seconds", 0.0))


def resumed_config(saved: Dict[str, Any], cfg: AnoSegConfig, owner: str) -> AnoSegConfig:
    """The config a resumed run continues with: its ``saved`` one, with the run-time keys
    (:func:`anoseg.config.runtime_keys`) taken from ``cfg``; other changed keys are reported
    and ignored."""
    resumed = with_runtime_keys(config_from_dict(saved), cfg)
    changed = config_diff(resumed.to_dict(), cfg.to_dict())
    if changed:
        print(f"resume: using the {owner}'s saved config; ignoring changed keys {changed}")
    return resumed.validate()


def refuse_overwrite(folder: StageDir, what: str) -> None:
    """A fresh run must not train over ``folder``'s checkpoint (``what``: "a run", ...)."""
    if folder.checkpoint.exists():
        raise CheckpointError(f"{folder.path} already holds {what} ({folder.checkpoint_name}); "
                              "pass --resume to continue it or choose another --output-dir")


def reset_log(path: Path, resumed_step: Optional[int]) -> None:
    """Prepare the loss log: a fresh run (``resumed_step`` ``None``) removes an old one, a
    resumed run drops the lines after its checkpoint's step (they will be redone)."""
    if resumed_step is None:
        if path.exists():
            path.unlink()
        return
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= resumed_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    path.write_text("".join(k + "\n" for k in kept))


# --------------------------------------------------------------------------- before any work


def stage_lock(folder: StageDir) -> StageLock:
    """The lock of ``folder`` that a training holds while it writes there (rank 0 only under
    torchrun: the other processes write nothing)."""
    return StageLock(folder, enabled=int(os.environ.get("RANK", "0") or 0) == 0)


def machine_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory of ``device``: the GPU's total memory, else the machine's RAM (``None``
    when it cannot be read)."""
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def _hw(image_size: Any) -> Tuple[int, int]:
    if isinstance(image_size, (tuple, list)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def batch_bytes_lower_bound(batch_size: int, image_size: Any, floats_per_pixel: float) -> int:
    """A lower bound of the memory one training batch needs: ``floats_per_pixel`` float32
    values per pixel of every image (the inputs, targets and full-resolution activations that
    the backward pass keeps); ``image_size`` is a side or ``(height, width)``."""
    height, width = _hw(image_size)
    return int(batch_size * height * width * 4 * floats_per_pixel)


def check_batch_fits(key: str, batch_size: int, image_size: Any, floats_per_pixel: float,
                     device: torch.device, memory: Optional[int] = None) -> None:
    """Refuse, before any work, a batch size that cannot fit: a lower bound of what one batch
    needs (:func:`batch_bytes_lower_bound`) above the device's memory (a mistyped number such
    as ``train.batch_size=100000000`` would otherwise swap the machine for hours).

    Raises:
        ConfigError: naming ``key``, the memory needed and available, and the range that fits.
    """
    memory = machine_memory(device) if memory is None else memory
    if memory is None:
        return
    needed = batch_bytes_lower_bound(batch_size, image_size, floats_per_pixel)
    if needed <= memory:
        return
    largest = max(1, memory // max(batch_bytes_lower_bound(1, image_size, floats_per_pixel), 1))
    gib = 1024 ** 3
    raise ConfigError(
        f"{key}={batch_size} is too large: one batch of {'x'.join(map(str, _hw(image_size)))} "
        f"images needs "
        f"at least {needed / gib:,.1f} GiB, but {device.type} memory is {memory / gib:,.1f} "
        f"GiB; expected {key} between 1 and about {largest:,} (typical: 4-64)")


def segmenter_floats_per_pixel(width: float) -> float:
    """Per pixel of a training image: the image and its target and outputs (8 floats) and the
    two full-resolution layers of the last decoder block (2 x 128 x ``model.width``)."""
    return 8.0 + 256.0 * width


# --------------------------------------------------------------------------- the run of a stage


def setup_device(cfg: AnoSegConfig, ctx: DistributedContext = DistributedContext()
                 ) -> Tuple[torch.device, Optional[torch.dtype]]:
    """This process's device and autocast dtype for ``cfg.train``; applies
    ``train.deterministic``."""
    device = process_device(ctx, cfg.train.device)
    amp_dtype = resolve_precision(cfg.train.precision, device)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, amp_dtype


def training_images(paths: List[Path], cfg: AnoSegConfig, progress: bool):
    """The training images: decoded once into memory with ``data.cache_images``, else paths.

    Returns:
        ``(images, placements)``: a uint8 tensor of canvases (a list of them under tiling)
        and their placements (:mod:`anoseg.data.geometry`), or the paths and ``None``.
    """
    from anoseg.data.geometry import Geometry
    from anoseg.data.mvtec import load_placed_cached

    if not cfg.data.cache_images:
        return paths, None
    return load_placed_cached(paths, Geometry.from_config(cfg.data), progress=progress)


def training_summary(state: TrainState, stopped: str, device: torch.device,
                     amp_dtype: Optional[torch.dtype], last_losses: Dict[str, float],
                     **extra: Any) -> Dict[str, Any]:
    """The ``summary.json`` of a run (``extra`` goes before ``last_losses``)."""
    return {"steps": state.step, "images_seen": state.images_seen,
            "train_seconds": round(state.train_seconds, 3),
            "data_wait_seconds": round(state.data_wait_seconds, 3), "stopped": stopped,
            "device": str(device), "precision": str(amp_dtype or "fp32"), **extra,
            "last_losses": last_losses}


@dataclass
class Stage:
    """One training stage, as :func:`run_stage` runs it.

    Attributes:
        folder: where the checkpoint, the loss log and ``summary.json`` go.
        state: the networks and optimisers (already restored on a resume).
        dataset: keyed by the sampler's ``(index, seed)``.
        step_fn: one optimisation step on a batch; returns its losses as floats.
        make_checkpoint: the checkpoint dict of the current state; called with ``final``
            (``True`` for the checkpoint written when the stage stops, ``False`` for the
            periodic ones), so costly end-of-run work (``model.feature_stats``) runs once.
        resumed: whether ``state`` comes from a checkpoint (the log is truncated, not removed).
        total_steps, batch_size, seed, checkpoint_every, time_budget: the loop's settings
            (``batch_size`` per process).
        desc: the progress bar's label; ``checkpoint_name``: how the interrupted message calls
            the checkpoint.
        log_extra: more fields for each log line; ``summary_extra``: fields of
            ``summary.json`` before ``last_losses``, ``summary_tail``: after.
        on_losses: called with ``(steps done, losses)`` for every step once its losses are
            read (:class:`LossWindow`).
    """

    folder: StageDir
    state: TrainState
    dataset: Any
    step_fn: Callable[[Dict[str, torch.Tensor]], Dict[str, float]]
    make_checkpoint: Callable[[bool], Dict[str, Any]]
    resumed: bool
    total_steps: int
    batch_size: int
    seed: int
    checkpoint_every: int
    time_budget: Optional[float]
    desc: str
    checkpoint_name: str = "checkpoint"
    log_extra: Optional[Callable[[], Dict[str, Any]]] = None
    summary_extra: Callable[[], Dict[str, Any]] = dict
    summary_tail: Optional[Dict[str, Any]] = None
    logger: Optional[Any] = None
    """A :class:`anoseg.train_logger.TrainLogger` shown every log line and step (rank 0
    only; ``None``: nothing, no cost); closed at the end."""
    on_losses: Optional[Callable[[int, Dict[str, float]], None]] = None
    """Called with ``(steps done, losses as floats)`` for every step, in order, when its
    losses are read (:class:`LossWindow`)."""


def run_stage(stage: Stage, cfg: AnoSegConfig, *, device: torch.device,
              amp_dtype: Optional[torch.dtype], stop_at: Optional[int], progress: bool,
              ctx: DistributedContext = DistributedContext(),
              anoseg_step: Optional[int] = None) -> TrainResult:
    """Run ``stage`` to its end: log, sampler and loader, :func:`run_training_loop`,
    ``summary.json`` (rank 0 writes every file), the interrupted message, the result."""
    from anoseg.data.training_data import StepSampler, make_train_loader

    state, folder = stage.state, stage.folder
    if ctx.is_main:
        reset_log(folder.losses, state.step if stage.resumed else None)
    sampler = StepSampler(len(stage.dataset), stage.batch_size, stage.seed,
                          start_step=state.step, rank=ctx.rank, world_size=ctx.world_size)
    loader = make_train_loader(stage.dataset, sampler, stage.batch_size, cfg.data.num_workers,
                               pin_memory=device.type == "cuda")

    def save(final: bool) -> None:
        if ctx.is_main:
            save_checkpoint(folder.checkpoint, stage.make_checkpoint(final))

    def should_stop(flags: List[bool]) -> List[bool]:
        """Every process must stop at the same step: take the maximum of the flags."""
        return all_reduce_max_flags(flags, device) if ctx.enabled else flags

    try:
        stopped, last = run_training_loop(
            state, loader, stage.step_fn, total_steps=stage.total_steps, save=save,
            log_path=folder.losses if ctx.is_main else None, log_every=cfg.train.log_every,
            checkpoint_every=stage.checkpoint_every, time_budget=stage.time_budget,
            stop_at=stop_at, progress=progress and ctx.is_main, desc=stage.desc,
            should_stop=should_stop, log_extra=stage.log_extra, logger=stage.logger,
            on_losses=stage.on_losses)
    finally:
        if stage.logger is not None:
            stage.logger.close()
    if ctx.is_main:
        summary = training_summary(state, stopped, device, amp_dtype, last,
                                   **stage.summary_extra())
        folder.write_summary({**summary, **(stage.summary_tail or {})})
    barrier(ctx)
    if stopped == "interrupted" and ctx.is_main:
        print(f"interrupted: {stage.checkpoint_name} saved at step {state.step} in "
              f"{folder.checkpoint}; continue with --resume")
    return TrainResult(folder.path, folder.checkpoint, state.step, state.images_seen,
                       state.train_seconds, stopped, last, anoseg_step)


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


def run_training_loop(state: TrainState, batches: Iterable[Any],
                      step_fn: Callable[[Any], Dict[str, float]], *, total_steps: int,
                      save: Callable[[bool], None], log_path: Optional[Path], log_every: int,
                      checkpoint_every: int, time_budget: Optional[float],
                      stop_at: Optional[int], progress: bool, desc: str,
                      should_stop: Optional[Callable[[List[bool]], List[bool]]] = None,
                      log_extra: Optional[Callable[[], Dict[str, Any]]] = None,
                      logger: Optional[Any] = None,
                      on_losses: Optional[Callable[[int, Dict[str, float]], None]] = None
                      ) -> Tuple[str, Dict[str, float]]:
    """Call ``step_fn(batch)`` until ``state.step`` reaches ``total_steps``, then ``save()``.

    Long: the loop's bookkeeping (the log window, the checkpoint cadence, the logger, the
    three ways to stop) reads best in one place.

    Args:
        state: has ``step`` (advanced by ``step_fn``) and ``train_seconds`` (kept here).
        batches: an iterable of batches (``iter`` is called once, when the loop starts).
        step_fn: one optimisation step; returns its losses as floats or as 0-d tensors (read
            back together at the next log line or checkpoint, :class:`LossWindow`: a NaN
            stops the run there, before the checkpoint is written).
        save: writes the checkpoint; called with ``False`` every ``checkpoint_every`` steps
            and with ``True`` once at the end (however the loop stopped).
        log_path: JSON-lines loss log (means over ``log_every`` steps, appended), ``None`` for
            none (non-zero ranks).
        time_budget: wall-clock seconds of this call, ``None`` for no limit.
        stop_at: stop after this step as if interrupted.
        progress, desc: the tqdm bar.
        should_stop: maps the local ``[interrupted, budget_spent]`` flags to the ones to act on
            (under DDP their maximum over processes, so all stop at the same step).
        log_extra: more fields for each log line, between the losses and ``seconds``.
        logger: shown each log line (``log_line(step, record)``) and each step
            (``after_step(step)``); ``None`` for none.
        on_losses: called with ``(steps done, losses as floats)`` for every step, in order, when
            its losses are read.

    Returns:
        ``(stopped, last_losses)``: ``completed``, ``time_budget``, ``interrupted`` or
        ``stop_at``, and the losses of the last step.
    """
    from tqdm.auto import tqdm

    stopped = "completed"
    window = LossWindow(on_losses)
    started = time.perf_counter()
    seconds_before = state.train_seconds
    bar = tqdm(total=total_steps, initial=state.step, desc=desc, disable=not progress,
               dynamic_ncols=True)
    try:
        log_file = open(log_path, "a") if log_path is not None else contextlib.nullcontext()
        with _StopFlag() as stop_flag, log_file as log:
            iterator = iter(batches)
            while state.step < total_steps:
                waited = time.perf_counter()
                batch = next(iterator)
                state.data_wait_seconds += time.perf_counter() - waited
                window.add(state.step, step_fn(batch))
                state.train_seconds = seconds_before + time.perf_counter() - started
                bar.update(1)
                log_now = state.step % log_every == 0 or state.step == total_steps
                if log_now or state.step % checkpoint_every == 0:
                    window.read()  # every process at the same steps; raises before a save
                if log is not None and log_now:
                    means = window.means()
                    bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()}, refresh=False)
                    record = {"step": state.step, **means,
                              **(log_extra() if log_extra is not None else {}),
                              "seconds": round(state.train_seconds, 3)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    if logger is not None:
                        logger.log_line(state.step, record)
                if state.step % checkpoint_every == 0:
                    save(False)
                if logger is not None:
                    logger.after_step(state.step)
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
            window.read()
    finally:
        bar.close()
    save(True)
    return stopped, window.last
