"""The label-free thresholds: the run's held-out normal images, the pixel-score quantile on
them (the pixel threshold) and the image-score quantile (the image threshold), and their caches
beside the checkpoint. Used by evaluation and by prediction.

Example:
    >>> model = anoseg.load_model("runs/demo")                                 # doctest: +SKIP
    >>> threshold = compute_label_free_threshold(model, holdout_image_paths(model))  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from anoseg.atomic import write_json
from anoseg.errors import DataError
from anoseg.data.geometry import Geometry, group_by_shape
from anoseg.inference import (LoadedDetector, LoadedModel, ScoredMap, detector_scores,
                              load_placed_images, scored_images)
from anoseg.metrics import (IMAGE_SCORES, SIGNAL_IMAGE_SCORES, NormalScoreQuantile,
                            image_score_threshold, image_scores, signal_image_scores)
from anoseg.run_dir import DataRecord, RunDir, TrainingSplit

PathLike = Union[str, Path]


def recorded_data(model: LoadedModel, run_dir: Optional[Path] = None) -> DataRecord:
    """The run's data root and split: from the checkpoint, else the run's ``split.json``
    (an empty record when neither has one)."""
    if model.data is not None:
        return model.data
    record = RunDir(run_dir).read_split() if run_dir is not None else None
    return record if record is not None else DataRecord(TrainingSplit())


def resolve_eval_data_root(model: LoadedModel, data_root: Optional[PathLike] = None,
                           run_dir: Optional[Path] = None) -> Path:
    """The dataset to evaluate on.

    ``data_root`` if given; else the root the run was trained on; else (a demo run whose cache
    was deleted) the regenerated demo dataset.

    Raises:
        DataError: ``data_root`` or the recorded root does not exist.
    """
    if data_root is not None:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise DataError(f"data root {root} does not exist or is not a folder; expected a "
                            "folder in MVTec AD layout (<root>/<category>/test/...)")
        return root
    recorded = recorded_data(model, run_dir).data_root or model.config.data.root
    if recorded and Path(recorded).is_dir():
        return Path(recorded)
    if model.config.data.root is None:  # trained on the built-in demo dataset
        from anoseg.data.demo import ensure_demo_dataset

        return ensure_demo_dataset()
    raise DataError(f"the run's data root {recorded} does not exist any more; pass "
                    "--data-root with the dataset's current location")


def holdout_image_paths(model: LoadedModel, data_root: Optional[PathLike] = None,
                        run_dir: Optional[Path] = None) -> List[Path]:
    """The run's held-out normal images (never trained on), moved under ``data_root`` if the
    dataset was moved since training.

    Raises:
        DataError: A held-out image exists neither under ``data_root`` nor where it was.
    """
    record = recorded_data(model, run_dir)
    recorded_root = Path(record.data_root) if record.data_root else None
    paths: List[Path] = []
    for text in record.split.holdout:
        original = Path(text)
        candidates = []
        if data_root is not None and recorded_root is not None:
            try:
                candidates.append(Path(data_root) / original.relative_to(recorded_root))
            except ValueError:
                pass
        candidates.append(original)
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise DataError(f"held-out normal image {original} (from the run's split) does not "
                            "exist; pass --data-root with the dataset the run was trained on")
        paths.append(found)
    return paths


def compute_label_free_threshold(model: LoadedModel, normal_image_paths: Sequence[PathLike], *,
                                 quantile: Optional[float] = None, batch_size: int = 16,
                                 progress: bool = False) -> float:
    """The ``quantile`` of the anomaly scores of all pixels of ``normal_image_paths``.

    Args:
        model: The loaded model.
        normal_image_paths: Defect-free images the model never trained on (the run's holdout).
        quantile: Default ``model.config.eval.threshold_quantile``.
        batch_size: Images per forward pass.
        progress: Show a progress bar.

    Raises:
        DataError: No images, or one is unreadable.
    """
    paths = [Path(p) for p in normal_image_paths]
    if not paths:
        raise DataError("no held-out normal images to choose a label-free threshold on")
    quantile = model.config.eval.threshold_quantile if quantile is None else quantile
    estimator = NormalScoreQuantile(quantile)
    with tqdm(total=len(paths), desc="label-free threshold", unit="img", disable=not progress,
              leave=False) as bar:
        for pairs in scored_images(model, paths, batch_size=batch_size):
            maps = [scored.anomaly for scored in pairs]
            for group in group_by_shape(maps):  # padding is cut off: sizes may differ
                estimator.update(torch.stack([maps[i] for i in group]))
            bar.update(len(pairs))
    return estimator.threshold()


def threshold_cache_path(checkpoint_path: PathLike) -> Path:
    """Where a checkpoint's label-free threshold is cached: ``<stem>.threshold.json`` beside it."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.threshold.json")


def _json_size(size: Any) -> Any:
    """``data.image_size`` as JSON reads it back (a pair is a list)."""
    return list(size) if isinstance(size, (tuple, list)) else size


def _cache_key(model: LoadedModel, checkpoint_path: Path, paths: Sequence[Path],
               quantile: float) -> Dict[str, Any]:
    stat = checkpoint_path.stat()
    holdout_digest = hashlib.sha256("\n".join(str(p) for p in paths).encode()).hexdigest()
    return {"checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
            "checkpoint_step": model.step if model.step is not None else -1,
            "weights": model.weights,
            "image_size": _json_size(model.config.data.image_size), "quantile": quantile,
            **({} if model.config.eval.resolution == "model"
               else {"resolution": model.config.eval.resolution}),
            "holdout_sha256": holdout_digest, "n_holdout_images": len(paths)}


def cached_label_free_threshold(model: LoadedModel, checkpoint_path: PathLike,
                                normal_image_paths: Sequence[PathLike], *,
                                quantile: Optional[float] = None, batch_size: int = 16,
                                progress: bool = False) -> Tuple[float, bool]:
    """:func:`compute_label_free_threshold`, cached in :func:`threshold_cache_path`.

    The cache is used only if the checkpoint file (size, modification time, step), the weights
    (EMA or raw), the image size, the quantile and the list of held-out images are unchanged;
    otherwise the threshold is recomputed and the cache rewritten (silently skipped if the
    folder is read-only). An ensemble is never cached: the file beside its first member's
    checkpoint is that member's.

    Returns:
        ``(threshold, came_from_cache)``.
    """
    checkpoint_path = Path(checkpoint_path)
    paths = [Path(p) for p in normal_image_paths]
    quantile = model.config.eval.threshold_quantile if quantile is None else float(quantile)
    if model.is_ensemble:
        return compute_label_free_threshold(model, paths, quantile=quantile,
                                            batch_size=batch_size, progress=progress), False
    key = _cache_key(model, checkpoint_path, paths, quantile)
    cache = threshold_cache_path(checkpoint_path)
    try:
        cached = json.loads(cache.read_text())
        if {k: cached.get(k) for k in key} == key and math.isfinite(cached["threshold"]):
            return float(cached["threshold"]), True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    threshold = compute_label_free_threshold(model, paths, quantile=quantile,
                                             batch_size=batch_size, progress=progress)
    try:
        write_json(cache, {"threshold": threshold, **key})
    except OSError:
        pass
    return threshold, False


# --------------------------------------------------------------------- the image threshold


def holdout_image_scores(model: LoadedModel, normal_image_paths: Sequence[PathLike], *,
                         batch_size: int = 16, progress: bool = False) -> Dict[str, List[float]]:
    """Every cheap image score (:func:`scored_image_scores`) of each of
    ``normal_image_paths``: score name -> one value per image, in order.

    Raises:
        DataError: No images, or one is unreadable.
    """
    paths = [Path(p) for p in normal_image_paths]
    if not paths:
        raise DataError("no held-out normal images to choose a label-free image threshold on")
    scores: Dict[str, List[float]] = {name: [] for name in image_score_names(model)}
    with tqdm(total=len(paths), desc="image threshold", unit="img", disable=not progress,
              leave=False) as bar:
        for scored in scored_images(model, paths, batch_size=batch_size):
            for name, values in scored_image_scores(scored).items():
                scores[name].extend(float(v) for v in values)
            bar.update(len(scored))
    return scores


def logit_image_scores(logits: Sequence[torch.Tensor]) -> Dict[str, np.ndarray]:
    """Every cheap image score (:func:`anoseg.metrics.image_scores`) of each anomaly logit map
    in ``logits`` (any sizes; maps of one size are scored as one batch), in order."""
    out: Dict[str, np.ndarray] = {name: np.zeros(len(logits)) for name in IMAGE_SCORES}
    for group in group_by_shape(logits):
        for name, values in image_scores(torch.stack([logits[i] for i in group])).items():
            out[name][group] = values
    return out


def scored_image_scores(scored: Sequence[ScoredMap],
                        logits: Optional[Sequence[torch.Tensor]] = None
                        ) -> Dict[str, np.ndarray]:
    """:func:`logit_image_scores` of the images' logits (or of ``logits``, e.g. resized), plus
    the :data:`~anoseg.metrics.SIGNAL_IMAGE_SCORES` of their signal maps
    (:func:`~anoseg.metrics.signal_image_scores`) when every image has them."""
    out = logit_image_scores([s.logit for s in scored] if logits is None else logits)
    if scored and all(s.signal is not None for s in scored):
        out.update(signal_image_scores([s.signal for s in scored]))
    return out


def has_signal_score(model: LoadedModel) -> bool:
    """Whether the run's generator gives the :data:`~anoseg.metrics.SIGNAL_IMAGE_SCORES`
    (fitted signal maps; not under tiling)."""
    has = getattr(model.generator, "has_signal_image_map", None)
    return bool(has is not None and has() and not model.config.data.tiling.enabled)


def image_score_names(model: LoadedModel) -> List[str]:
    """The image scores :func:`holdout_image_scores` computes for the run."""
    return [*IMAGE_SCORES, *(SIGNAL_IMAGE_SCORES if has_signal_score(model) else ())]


def image_threshold_cache_path(checkpoint_path: PathLike) -> Path:
    """Where a checkpoint's held-out image scores are cached:
    ``<stem>.image_threshold.json`` beside it."""
    path = Path(checkpoint_path)
    return path.with_name(f"{path.stem}.image_threshold.json")


def cached_holdout_image_scores(model: LoadedModel, checkpoint_path: Optional[PathLike],
                                normal_image_paths: Sequence[PathLike], *,
                                batch_size: int = 16, progress: bool = False
                                ) -> Tuple[Dict[str, List[float]], bool]:
    """:func:`holdout_image_scores`, cached in :func:`image_threshold_cache_path` (with
    ``checkpoint_path=None`` or an ensemble, not cached) under the same conditions as the pixel
    threshold's cache (:func:`cached_label_free_threshold`; the quantile is not part of the key:
    the cache holds the scores, any quantile is taken from them).

    Returns:
        ``(scores by name, came_from_cache)``.
    """
    paths = [Path(p) for p in normal_image_paths]
    if checkpoint_path is None or model.is_ensemble:
        return holdout_image_scores(model, paths, batch_size=batch_size,
                                    progress=progress), False
    checkpoint_path = Path(checkpoint_path)
    key = _cache_key(model, checkpoint_path, paths, 0.0)
    del key["quantile"]
    cache = image_threshold_cache_path(checkpoint_path)
    try:
        cached = json.loads(cache.read_text())
        scores = cached["scores"]
        names = image_score_names(model)
        if ({k: cached.get(k) for k in key} == key and set(scores) == set(names)
                and all(len(v) == len(paths) for v in scores.values())):
            return {name: [float(v) for v in scores[name]] for name in names}, True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    scores = holdout_image_scores(model, paths, batch_size=batch_size, progress=progress)
    try:
        write_json(cache, {**key, "scores": scores})
    except OSError:
        pass
    return scores, False


def label_free_image_threshold(holdout_scores: Dict[str, Sequence[float]], score: str,
                               quantile: float) -> float:
    """The ``quantile`` of the held-out normal images' ``score`` values
    (:func:`anoseg.metrics.image_score_threshold`): an image scoring strictly above it is
    anomalous."""
    if score not in holdout_scores:
        raise DataError(f"no held-out image scores named {score!r}")
    return image_score_threshold(holdout_scores[score], quantile)


def image_threshold_note(n_images: int, quantile: float) -> Optional[str]:
    """A warning when ``n_images`` held-out images are too few to resolve ``quantile``
    (``n_images * (1 - quantile) < 1``): the threshold is then their largest score, which
    about ``1 / (n_images + 1)`` of normal images exceed (more where the test images differ
    from the held-out ones), not ``1 - quantile``; ``None`` otherwise."""
    if n_images <= 0 or n_images * (1.0 - quantile) >= 1.0:
        return None
    needed = math.ceil(1.0 / (1.0 - quantile) - 1e-9)
    return (f"the label-free image threshold is the largest score of only {n_images} held-out "
            f"normal images (eval.image_threshold_quantile={quantile:g} needs {needed}): expect "
            f"about {1.0 / (n_images + 1):.1%} of normal images above it, not "
            f"{1.0 - quantile:.1%}, and more where the test images differ from the held-out "
            "ones; hold out more images (data.holdout_fraction) for a tighter threshold")


def headline_image_score(model: LoadedModel, detector: Optional[LoadedDetector],
                         warnings: List[str]) -> str:
    """``eval.image_score``, or ``max`` (with a warning) when it is ``detector`` and the run
    has no usable detector, or ``signals_max`` / ``signals_mean`` and the run has no fitted
    signal maps (a checkpoint from before them)."""
    name = model.config.eval.image_score
    if name == "detector" and detector is None:
        warnings.append("eval.image_score=detector but the run has no usable detector: the "
                        "image score is the map max")
        return "max"
    if name in SIGNAL_IMAGE_SCORES and not has_signal_score(model):
        warnings.append(f"eval.image_score={name} but the run's generator has no fitted "
                        "signal maps (refit its feature statistics): the image score is the "
                        "map max")
        return "max"
    return name


def image_threshold_for(model: LoadedModel, holdout_paths: Sequence[Path], score: str,
                        cache_for: Optional[PathLike], detector: Optional[LoadedDetector], *,
                        batch_size: int, progress: bool,
                        notes: Optional[List[str]] = None) -> Optional[float]:
    """The label-free *image* threshold: the ``eval.image_threshold_quantile`` of the held-out
    normal images' ``score`` (cached beside ``cache_for``'s checkpoint for the cheap scores,
    never for an ensemble); ``None`` without held-out images. :func:`image_threshold_note`
    goes to ``notes`` when the images are too few for the quantile."""
    if not holdout_paths:
        return None
    quantile = model.config.eval.image_threshold_quantile
    note = image_threshold_note(len(holdout_paths), quantile)
    if note is not None and notes is not None:
        notes.append(note)
    if score == "detector":
        canvases, _ = load_placed_images(holdout_paths, Geometry.from_config(model.config.data))
        images = torch.stack(canvases).float().div_(255.0)
        values = detector_scores(detector, model.generator, images, batch_size=batch_size)
        return label_free_image_threshold({score: values.tolist()}, score, quantile)
    scores, _ = cached_holdout_image_scores(model, cache_for, holdout_paths,
                                            batch_size=batch_size, progress=progress)
    return label_free_image_threshold(scores, score, quantile)
