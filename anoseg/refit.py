"""Refit a finished run's inference statistics (``model.feature_stats``) under changed
inference-time keys, into a new run folder, without training again.

The weights of a run do not depend on the low-pass signal (it is fitted when training stops),
so a run trained with ``model.lowpass_roughness: false`` gains the roughness channel by
fitting its statistics again on the run's own training and held-out images (the split saved in
its checkpoint). Everything else in the checkpoint is kept; the new folder is a complete run
(``anoseg-eval --run`` and ``--ensemble`` read it like any other).

Example:
    >>> from anoseg.refit import refit_run
    >>> refit_run("runs/kol_s0", "runs/kol_s0_rough",
    ...           ["model.lowpass_roughness=true"])  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Union

from anoseg.checkpoint import load_checkpoint, save_checkpoint
from anoseg.config import config_diff, config_from_dict, load_config, save_config
from anoseg.engine import refuse_overwrite, stage_lock
from anoseg.errors import CheckpointError, ConfigError, OutputError
from anoseg.run_dir import DataRecord, RunDir
from anoseg.runtime import resolve_device
from anoseg.models.factory import build_generator
from anoseg.training import (SEGMENTER_KIND, _dataset_and_state, feature_stats_fitter,
                             segmenter_checkpoint)

REFIT_KEYS = ("model.lowpass_weight", "model.lowpass_roughness")
"""The keys a refit may change: they shape what is fitted when training stops, not the
weights."""
_REFITTED_PREFIX = "lowpass."  # the generator's buffers a refit rebuilds from scratch

PathLike = Union[str, Path]


def refit_run(run: PathLike, output_dir: PathLike, overrides: Sequence[str], *,
              device: Union[str, None] = None, progress: bool = True) -> Path:
    """Copy the run ``run`` to ``output_dir`` with ``overrides`` (``section.key=value``
    strings of :data:`REFIT_KEYS`) applied and its feature statistics fitted again.

    Returns:
        The new run folder.

    Raises:
        CheckpointError: ``run`` has no segmenter checkpoint.
        ConfigError: an override names a key outside :data:`REFIT_KEYS`, or the run has no
            ``model.feature_stats`` to fit.
        OutputError: ``output_dir`` is ``run`` itself, or already holds a run.
        DataError: the run's training or held-out images cannot be read any more.
    """
    src, dst = RunDir(run), RunDir(output_dir)
    if not src.checkpoint.is_file():
        raise CheckpointError(f"{src.path} holds no run ({src.checkpoint_name} is missing)")
    if dst.path.resolve() == src.path.resolve():
        raise OutputError(f"{dst.path}: write the refitted run to another folder than its source")
    ckpt = load_checkpoint(src.checkpoint)
    if ckpt.get("kind", SEGMENTER_KIND) != SEGMENTER_KIND:
        raise CheckpointError(f"{src.checkpoint} is a {ckpt['kind']!r} checkpoint, not an "
                              "AnoSeg segmenter")
    saved = config_from_dict(ckpt["config"])
    cfg = load_config(None, overrides, base=saved)
    outside = [k for k in config_diff(saved.to_dict(), cfg.to_dict()) if k not in REFIT_KEYS]
    if outside:
        raise ConfigError(f"{outside[0]}: a refit keeps the trained weights, so it may only "
                          f"change {', '.join(REFIT_KEYS)}")
    if not cfg.model.feature_stats:
        raise ConfigError(f"{src.path}: model.feature_stats is off, there is nothing to refit")
    cfg.model.init_weights = None
    dev = resolve_device("auto" if device is None else device)
    with stage_lock(dst):
        refuse_overwrite(dst, "a run")
        data = DataRecord.from_checkpoint(ckpt)
        fresh = {k: v for k, v in build_generator(cfg).state_dict().items()
                 if k.startswith(_REFITTED_PREFIX)}
        dataset, state = _dataset_and_state(cfg, data, dev, False,
                                            _with_fresh_buffers(ckpt, fresh), progress)
        feature_stats_fitter(cfg, data, state, dataset, dev)()
        dst.path.mkdir(parents=True, exist_ok=True)
        save_config(cfg, dst.config)
        dst.write_split(data)
        save_checkpoint(dst.checkpoint, segmenter_checkpoint(state, cfg, data))
        summary = src.read_summary() or {}
        summary["refit"] = {"from": str(src.path), "set": list(overrides)}
        dst.write_summary(summary)
    return dst.path


def _with_fresh_buffers(ckpt: Dict[str, Any], fresh: Dict[str, Any]) -> Dict[str, Any]:
    """``ckpt`` with its generators' (raw and EMA) low-pass buffers replaced by ``fresh``, a
    new generator's (their number and shape follow the new config; the fit fills them)."""
    out = dict(ckpt)
    for key in ("generator", "generator_ema"):
        if ckpt.get(key) is not None:
            kept = {k: v for k, v in ckpt[key].items() if not k.startswith(_REFITTED_PREFIX)}
            out[key] = {**kept, **fresh}
    return out
