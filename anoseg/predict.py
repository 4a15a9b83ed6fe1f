"""Predicting anomaly maps, overlays, masks and image scores for any images.

Example:
    >>> predict_run("runs/bottle", ["photos/"], "predictions")    # doctest: +SKIP

The command-line tool ``anoseg-predict`` is a thin wrapper around :func:`predict_run`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from anoseg.atomic import atomic_write_text, write_json
from anoseg.checkpoint import resolve_checkpoint
from anoseg.errors import ConfigError, DataError
from anoseg.data.geometry import Geometry, Placement, crop, resize_to_source
from anoseg.inference import (LoadedDetector, LoadedModel, calibrate_ensemble, detector_scores,
                              ensemble_mode, load_placed_images, load_runs, override_eval,
                              predict_placed, run_detector)
from anoseg.run_dir import RunDir, safe_name
from anoseg.runtime import resolve_device
from anoseg.threshold import (cached_label_free_threshold, headline_image_score,
                              holdout_image_paths, image_threshold_for, scored_image_scores)
from anoseg.visualize import (MAPS_README, enlarged_overlay, save_float_map, save_map_png,
                              save_mask_png, save_png)

PathLike = Union[str, Path]


def collect_image_paths(inputs: Sequence[PathLike]) -> List[Path]:
    """Image files from files and folders (a folder's images directly inside it, hidden files
    and other file types ignored), in the given order, without duplicates.

    Raises:
        DataError: A path does not exist, or a folder holds no images.
    """
    from anoseg.data.mvtec import IMAGE_EXTENSIONS, image_files

    paths: List[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = image_files(path)
            if not found:
                raise DataError(f"folder {path} contains no images; expected files ending in "
                                f"{', '.join(IMAGE_EXTENSIONS)}")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"input {path} does not exist; expected an image file or a folder "
                            "of images")
    unique: Dict[Path, None] = {}
    for path in paths:
        unique.setdefault(path, None)
    return list(unique)


def output_names(paths: Sequence[Path]) -> List[str]:
    """A distinct file-name stem per input: the stem, or ``<folder>_<stem>`` (then a number)
    where stems collide."""
    stems = [safe_name(p.stem) for p in paths]
    names = [s if stems.count(s) == 1 else f"{safe_name(p.parent.name)}_{s}"
             for p, s in zip(paths, stems)]
    taken: Dict[str, int] = {}
    unique: List[str] = []
    for name in names:
        count = taken.get(name, 0)
        taken[name] = count + 1
        unique.append(name if count == 0 else f"{name}_{count}")
    return unique


@dataclass
class PredictionReport:
    """What :func:`predict_images` wrote.

    Attributes:
        output_dir: Folder with ``maps/``, ``overlays/``, ``masks/``, ``scores.csv``,
            ``prediction.json``.
        threshold: The pixel threshold of the masks.
        threshold_source: ``"given"``, ``"holdout"`` or ``"holdout (cached)"``.
        rows: One dict per image (the ``scores.csv`` rows).
        image_score: The image score's name (``eval.image_score``).
        image_threshold: The image threshold of ``is_anomalous`` (``image_score >
            image_threshold``).
        image_threshold_source: ``"given"`` or ``"holdout"``.
    """

    output_dir: Path
    threshold: float
    threshold_source: str
    rows: List[Dict[str, Any]]
    image_score: str = "max"
    image_threshold: Optional[float] = None
    image_threshold_source: str = "given"

    @property
    def n_anomalous(self) -> int:
        """Images that fail (image score above the image threshold)."""
        return sum(row["is_anomalous"] for row in self.rows)

    def summary(self) -> str:
        """The pass/fail line ``anoseg-predict`` prints."""
        n = len(self.rows)
        return (f"{n} images: {n - self.n_anomalous} pass, {self.n_anomalous} fail (anomalous: "
                f"image score {self.image_score} > image threshold {self.image_threshold:.4g}, "
                f"{self.image_threshold_source}); masks at pixel threshold "
                f"{self.threshold:.4f} ({self.threshold_source})")


def _write_outputs(output_dir: Path, name: str, image: Any, anomaly_map: torch.Tensor,
                   logit: torch.Tensor, threshold: float) -> Dict[str, Any]:
    """Write one image's map (PNG and float32 logit ``.npy``), overlay and mask; returns its
    ``anomalous_pixel_fraction`` and file names (``scores.csv`` columns). ``image``: the image
    at the map's size (float ``(3, H, W)`` in [0, 1], or uint8 ``(H, W, 3)``)."""
    mask = anomaly_map >= threshold
    files = {"map": f"maps/{name}.png", "overlay": f"overlays/{name}.png",
             "mask": f"masks/{name}.png", "logit_map": f"maps/{name}.logit.npy"}
    save_map_png(output_dir / files["map"], anomaly_map)
    save_float_map(output_dir / files["logit_map"], logit)
    save_png(output_dir / files["overlay"], enlarged_overlay(image, anomaly_map))
    save_mask_png(output_dir / files["mask"], mask)
    return {"anomalous_pixel_fraction": float(mask.float().mean()), **files}


MAP_RESOLUTIONS = ("native", "model")
"""Sizes ``anoseg-predict`` writes maps at: each input's own size, or the model's."""


def _image_at(path: Path, canvas: torch.Tensor, placement: Placement, resolution: str) -> Any:
    """The image at the size of its written map: the file at its own size (uint8
    ``(H, W, 3)``), or the image's part of its canvas."""
    if resolution == "native":
        from anoseg.data.mvtec import load_image

        return load_image(path, None).permute(1, 2, 0).numpy()
    return crop(canvas, placement).permute(1, 2, 0).numpy()


def _predict_chunk(model: LoadedModel, chunk: Sequence[Path], *, batch_size: int,
                   detector: Optional[LoadedDetector], map_resolution: str, write: Any
                   ) -> List[Dict[str, Any]]:
    """One chunk of images through the model: image scores at ``eval.resolution``, then each
    image's files at ``map_resolution`` (``write(index, path, image, map, logit, scores)``
    returns its ``scores.csv`` row). Maps are resized to an image's own size one image at a
    time, so a chunk of large images never holds more than one native-size map."""
    geometry = Geometry.from_config(model.config.data)
    canvases, placements = load_placed_images(chunk, geometry)
    pairs = predict_placed(model.generator, canvases, placements, geometry,
                           batch_size=batch_size)
    score_res = model.config.eval.resolution
    logits = [resize_to_source(s.logit, p) if score_res == "native" else s.logit
              for s, p in zip(pairs, placements)]
    by_name = scored_image_scores(pairs, logits)
    del logits
    if detector is not None:
        images = torch.stack(canvases).float().div_(255.0)
        by_name["detector"] = detector_scores(detector, model.generator, images,
                                              batch_size=batch_size).numpy()
    rows = []
    for index, (path, canvas, placement) in enumerate(zip(chunk, canvases, placements)):
        anomaly, logit = pairs[index].anomaly, pairs[index].logit
        if map_resolution == "native":
            anomaly, logit = resize_to_source(anomaly, placement), resize_to_source(
                logit, placement)
        image = _image_at(path, canvas, placement, map_resolution)
        rows.append(write(index, path, image, anomaly, logit,
                          {k: float(v[index]) for k, v in by_name.items()}))
        pairs[index] = None  # free this image's maps before the next one's
    return rows


def predict_images(model: LoadedModel, image_paths: Sequence[PathLike], output_dir: PathLike, *,
                   threshold: float, image_threshold: float, batch_size: int = 16,
                   progress: bool = True, threshold_source: str = "given",
                   image_threshold_source: str = "given", image_score: Optional[str] = None,
                   detector: Optional[LoadedDetector] = None,
                   map_resolution: str = "native") -> PredictionReport:
    """Write anomaly maps, overlays, masks and scores for images.

    Every image is checked (header) before anything is written. Per image ``<name>``:
    ``maps/<name>.png`` (16-bit map at the input's own size, or with
    ``map_resolution="model"`` at the model's resolution without padding; score = value /
    65535), ``overlays/<name>.png`` (the map blended over the input, enlarged to >= 256 px)
    and ``masks/<name>.png`` (0/255, pixels with score >= ``threshold``), and
    ``maps/<name>.logit.npy`` (the float32 anomaly logit map, exact). ``scores.csv`` has one row
    per image: ``path``, ``map_max`` (max of the written [0, 1] map), ``image_score``
    (``image_score``, default ``eval.image_score``, on the anomaly logit map at
    ``eval.resolution``, as the image threshold was chosen), ``is_anomalous``
    (``image_score > image_threshold``), ``anomalous_pixel_fraction`` (of the written mask) and
    the file names; with a ``detector`` (:class:`anoseg.inference.LoadedDetector`), also
    ``detector_score`` (eq. 5, higher = more anomalous; the image score when ``image_score ==
    "detector"``). Under ``data.tiling`` images go through one at a time (their windows in
    batches of ``batch_size``).

    Raises:
        DataError: An image is missing or unreadable (the message names it).
    """
    from anoseg.data.mvtec import image_size_of

    if map_resolution not in MAP_RESOLUTIONS:
        raise ConfigError(f"map resolution {map_resolution!r} is not one of "
                          f"{', '.join(MAP_RESOLUTIONS)}")
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise DataError("no images to predict")
    for path in paths:
        image_size_of(path)  # fails early, naming the file, before anything is written
    output_dir = Path(output_dir)
    names = output_names(paths)
    image_score = image_score or model.config.eval.image_score
    step = 1 if model.config.data.tiling.enabled else batch_size
    rows: List[Dict[str, Any]] = []

    def write(start: int):
        def one(index, path, image, anomaly, logit, scores):
            row = _write_outputs(output_dir, names[start + index], image, anomaly, logit,
                                 threshold)
            detector_row = {} if "detector" not in scores else {
                "detector_score": scores["detector"]}
            score = scores[image_score]
            return {"path": str(path), "map_max": float(anomaly.max()), "image_score": score,
                    **detector_row, "is_anomalous": int(score > image_threshold), **row}
        return one

    with tqdm(total=len(paths), desc="predict", unit="img", disable=not progress,
              dynamic_ncols=True) as bar:
        for start in range(0, len(paths), step):
            chunk = paths[start:start + step]
            rows.extend(_predict_chunk(model, chunk, batch_size=batch_size, detector=detector,
                                       map_resolution=map_resolution, write=write(start)))
            bar.update(len(chunk))
    return _write_report(model, output_dir, rows, threshold, threshold_source, image_score,
                         image_threshold, image_threshold_source, map_resolution)


def _write_report(model: LoadedModel, output_dir: Path, rows: List[Dict[str, Any]],
                  threshold: float, threshold_source: str, image_score: str,
                  image_threshold: float, image_threshold_source: str,
                  map_resolution: str) -> PredictionReport:
    """``scores.csv``, ``maps/README.txt`` and ``prediction.json`` of :func:`predict_images`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(output_dir / "scores.csv", buffer.getvalue())
    atomic_write_text(output_dir / "maps" / "README.txt", MAPS_README + (
        "<name>.logit.npy: the float32 anomaly logit map (numpy.load), exact and unbounded, at "
        "the map's size (prediction.json map_resolution). scores.csv's image_score is computed "
        "on the logit map at eval.resolution (prediction.json score_resolution), where the "
        "label-free thresholds were chosen: this file when the two are the same.\n"))
    report = PredictionReport(output_dir, threshold, threshold_source, rows, image_score,
                              image_threshold, image_threshold_source)
    data = model.config.data
    size = data.image_size
    write_json(output_dir / "prediction.json", {
        "threshold": threshold, "threshold_source": threshold_source,
        "image_score": image_score, "image_threshold": image_threshold,
        "image_threshold_source": image_threshold_source,
        "image_threshold_quantile": model.config.eval.image_threshold_quantile
        if image_threshold_source == "holdout" else None,
        "image_size": list(size) if isinstance(size, (tuple, list)) else size,
        "resize": data.resize, "tiling": dataclasses.asdict(data.tiling),
        "map_resolution": map_resolution, "score_resolution": model.config.eval.resolution,
        "ensemble": list(model.members) or None,
        "n_images": len(rows), "n_anomalous": report.n_anomalous,
        "n_pass": len(rows) - report.n_anomalous})
    return report


def _prediction_holdout(model: LoadedModel, checkpoint_path: Path,
                        data_root: Optional[PathLike], needed: bool) -> List[Path]:
    """The held-out normal images for the label-free thresholds (when ``needed``) and a
    calibrated ensemble's fit; empty when neither needs them.

    Raises:
        DataError: They are needed and the run (or ensemble) has none.
    """
    if not (needed or ensemble_mode(model) == "calibrated"):
        return []
    run = None if model.is_ensemble else RunDir.of_checkpoint(checkpoint_path)
    holdout = holdout_image_paths(model, data_root, run.path if run is not None else None)
    if not holdout and needed:
        what = ("the ensemble's members share no held-out normal image (train them with "
                "the same data.split_seed)" if model.is_ensemble else
                f"run {checkpoint_path} has no held-out normal images "
                "(data.holdout_fraction = 0)")
        raise DataError(f"{what}, so there is no label-free threshold; pass --threshold "
                        "and --image-threshold")
    return holdout


def predict_run(checkpoint: Union[PathLike, Sequence[PathLike]], inputs: Sequence[PathLike],
                output_dir: PathLike, *, threshold: Optional[float] = None,
                batch_size: Optional[int] = None,
                device: Union[None, str, torch.device] = None, data_root: Optional[PathLike] = None,
                progress: bool = True, image_threshold: Optional[float] = None,
                image_score: Optional[str] = None, map_resolution: str = "native",
                resolution: Optional[str] = None, ensemble: bool = False,
                ensemble_combine: Optional[str] = None) -> PredictionReport:
    """Load a run or checkpoint (or several as one model) and :func:`predict_images` on files
    and folders of images.

    Args:
        checkpoint: Run folder or checkpoint file, or several with ``ensemble``.
        inputs: Image files and folders (see :func:`collect_image_paths`).
        output_dir: Where to write.
        threshold: Pixel threshold of the masks; default: the label-free threshold from the
            run's held-out normal images (cached beside the checkpoint, see
            :func:`cached_label_free_threshold`).
        batch_size: Default: the run's ``eval.batch_size``.
        device: ``auto``/``None``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        data_root: Where the run's dataset is now, if it moved since training.
        progress: Show progress bars.
        image_threshold: Image threshold of ``is_anomalous`` (in the image score's units);
            default: the ``eval.image_threshold_quantile`` of the held-out normal images' image
            scores (cached beside the checkpoint).
        image_score: Default the run's ``eval.image_score``.
        map_resolution: ``native`` (each input's own size, the default) or ``model``: the
            size the maps, masks and overlays are written at.
        resolution: Override the run's ``eval.resolution``, where the image scores and the
            label-free thresholds are computed.
        ensemble: The runs are members of one model, their maps joined
            (:func:`anoseg.inference.load_ensemble`; train them with the same
            ``data.split_seed``): the thresholds come from the images every member held out,
            computed each time, not cached; no detector.
        ensemble_combine: Override the first member's ``eval.ensemble_combine`` (``auto``,
            ``mean`` or ``calibrated``; a calibrated ensemble is fitted on those images first).

    Raises:
        AnoSegError: Bad inputs; a threshold not given and the run has no held-out images.
    """
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise ConfigError(f"threshold {threshold!r} is invalid; expected a score in [0, 1]")
    if image_threshold is not None and not math.isfinite(image_threshold):
        raise ConfigError(f"image threshold {image_threshold!r} is invalid; expected a number")
    listed = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    checkpoints = [resolve_checkpoint(c) for c in listed]
    image_paths = collect_image_paths(inputs)
    model = load_runs(checkpoints, resolve_device(device), ensemble=ensemble)
    checkpoint_path = checkpoints[0]
    override_eval(model, image_score=image_score, resolution=resolution,
                  ensemble_combine=ensemble_combine)
    batch_size = batch_size or model.config.eval.batch_size
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    holdout = _prediction_holdout(model, checkpoint_path, data_root,
                                  threshold is None or image_threshold is None)
    calibrate_ensemble(model, holdout, batch_size=batch_size, progress=progress)
    detector, warning = run_detector(checkpoint_path, model, model.device)
    notes = [] if warning is None else [warning]
    score = headline_image_score(model, detector, notes)
    for note in notes:
        print(f"warning: {note}")
    source = image_source = "given"
    if threshold is None:
        threshold, from_cache = cached_label_free_threshold(
            model, checkpoint_path, holdout, batch_size=batch_size, progress=progress)
        source = "holdout (cached)" if from_cache else "holdout"
    if image_threshold is None:
        few: List[str] = []
        image_threshold = image_threshold_for(model, holdout, score, checkpoint_path, detector,
                                              batch_size=batch_size, progress=progress,
                                              notes=few)
        image_source = "holdout"
        for note in few:
            print(f"warning: {note}")
    return predict_images(model, image_paths, output_dir, threshold=threshold,
                          image_threshold=image_threshold, batch_size=batch_size,
                          progress=progress, threshold_source=source,
                          image_threshold_source=image_source, image_score=score,
                          detector=detector, map_resolution=map_resolution)
