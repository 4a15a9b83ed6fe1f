"""Exporting a trained run to one file for an inspection station: ONNX (ONNX Runtime,
OpenVINO, TensorRT) or TorchScript (libtorch, C++).

The file maps an image batch to what :mod:`anoseg.inference` computes from it::

    images       float32 (batch, 3, S, S), RGB in [0, 1], resized to S x S (S = image_size)
    anomaly_map  float32 (batch, S, S) in [0, 1], 1 = anomalous   (predict_anomaly_scores' map)
    image_score  float32 (batch,), higher = more anomalous         (eval.image_score)

Everything the library does between the image and the maps is inside: the centring to
[-1, 1], the coordinate channels, the generator (an ensemble's members averaged), the flip to
the anomaly map and the image score on the anomaly logit (or the detector's eq. 5 score). The
batch size is dynamic. Stored beside the graph (ONNX ``metadata_props``, TorchScript extra file
``anoseg_metadata.json``; :func:`read_export_metadata` reads both): the image size, the score's
name and the run's label-free thresholds (pixel: ``anomaly_map >= pixel_threshold`` is the
defect mask; image: ``image_score > image_threshold`` is a failed part).

Example:
    >>> result = export_run("runs/bottle", "onnx")            # doctest: +SKIP
    >>> result.path                                           # doctest: +SKIP
    PosixPath('runs/bottle/export/anoseg.onnx')
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anoseg.atomic import atomic_write_bytes
from anoseg.checkpoint import resolve_checkpoint
from anoseg.config import image_hw
from anoseg.errors import ConfigError, ExportError
from anoseg.extras import require, require_extra
from anoseg.metrics import SIGNAL_IMAGE_SCORES, SIGNAL_MEAN_SCORE
from anoseg.inference import (LoadedDetector, LoadedModel, calibrate_ensemble, load_images,
                              load_runs, normality_logit_to_anomaly_logit,
                              normality_to_anomaly, override_eval, run_detector)
from anoseg.run_dir import EXPORT_DIR, RunDir
from anoseg.threshold import (cached_label_free_threshold, headline_image_score,
                              holdout_image_paths, image_threshold_for)

PathLike = Union[str, Path]

EXPORT_FORMATS = ("onnx", "torchscript")
DEFAULT_FILE_NAMES = {"onnx": "anoseg.onnx", "torchscript": "anoseg.torchscript.pt"}
"""The file written into ``RUN_DIR/export/`` when no output is given."""
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "image_score")
METADATA_KEY = "anoseg_metadata"
"""ONNX ``metadata_props`` key holding every field as one JSON object."""
TORCHSCRIPT_METADATA_FILE = "anoseg_metadata.json"
"""The TorchScript extra file holding the same JSON object."""
METADATA_FORMAT = "anoseg-export/1"
ONNX_OPSET = 18
MAP_TOLERANCE = 1e-4
"""Largest difference allowed between the exported file's map and PyTorch's (fp32)."""
SCORE_TOLERANCE = 1e-4
"""The same for the image score, relative to ``max(1, |score|)`` (logits are unbounded)."""

# ----------------------------------------------------------------------- the exported network


def _box_max(logit: torch.Tensor, size: int) -> torch.Tensor:
    """:func:`anoseg.metrics.smoothed_max_image_score` in torch: the max of the box mean over
    the window's pixels inside the image (``count_include_pad=False``)."""
    blurred = F.avg_pool2d(logit[:, None], size, stride=1, padding=size // 2,
                           count_include_pad=False)
    return blurred.flatten(1).amax(1)


def _top_k_mean(logit: torch.Tensor, k: int) -> torch.Tensor:
    flat = logit.flatten(1)
    return torch.topk(flat, min(k, flat.shape[1]), dim=1).values.mean(1)


def _top_fraction_mean(logit: torch.Tensor, fraction: float) -> torch.Tensor:
    pixels = logit.shape[1] * logit.shape[2]
    return _top_k_mean(logit, max(1, math.ceil(fraction * pixels)))


TORCH_IMAGE_SCORES: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max": lambda logit: logit.flatten(1).amax(1),
    "blur3_max": lambda logit: _box_max(logit, 3),
    "blur5_max": lambda logit: _box_max(logit, 5),
    "top10_mean": lambda logit: _top_k_mean(logit, 10),
    "top1pct_mean": lambda logit: _top_fraction_mean(logit, 0.01),
}
""":data:`anoseg.metrics.IMAGE_SCORES` as torch operations ``(B, H, W) -> (B,)`` (float32;
the metrics compute in float64 from the same float32 logits)."""


class DeployedAnoSeg(nn.Module):
    """``images -> (anomaly_map, image_score)``: the generator (or ensemble), the flip to the
    anomaly map and the image score, as one network to export.

    Args:
        generator: an AnoSeg generator or :class:`anoseg.inference.AnoSegEnsemble` (eval mode).
        image_score: a name of :data:`TORCH_IMAGE_SCORES`, ``signals_max`` or ``signals_mean``
            (:data:`anoseg.metrics.SIGNAL_IMAGE_SCORES`, from the generator's signal maps of the
            same pass) or ``detector``.
        detector: the detector networks (``AnoSegDetector``) when ``image_score`` is
            ``detector``; ``alpha`` and ``beta`` weigh its score (eq. 5).
    """

    def __init__(self, generator: nn.Module, image_score: str, *,
                 detector: Optional[nn.Module] = None, alpha: float = 1.0,
                 beta: float = 0.1) -> None:
        super().__init__()
        if image_score == "detector" and detector is None:
            raise ConfigError("image score 'detector' needs the run's detector")
        if image_score in SIGNAL_IMAGE_SCORES and not getattr(
                generator, "has_signal_image_map", lambda: False)():
            raise ConfigError(f"image score {image_score!r} needs a generator with fitted "
                              "signal maps (model.feature_stats)")
        known = [*TORCH_IMAGE_SCORES, *SIGNAL_IMAGE_SCORES, "detector"]
        if image_score not in known:
            raise ConfigError(f"unknown image score {image_score!r}; expected one of "
                              f"{', '.join(known)}")
        self.generator = generator
        self.detector = detector if image_score == "detector" else None
        self.image_score = image_score
        self.alpha, self.beta = float(alpha), float(beta)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        out = self.generator(images)
        anomaly_map = normality_to_anomaly(out.normality_map)[:, 0]
        if self.detector is not None:
            normality = out.normality_map if self.detector.use_anomaly_map else None
            score = self.detector.score(images, normality, alpha=self.alpha, beta=self.beta)
        elif self.image_score in SIGNAL_IMAGE_SCORES:
            peaks = out.signal_maps.flatten(2).amax(2)  # (B, S): each signal's image maximum
            score = peaks.mean(1) if self.image_score == SIGNAL_MEAN_SCORE else peaks.amax(1)
        else:
            logit = normality_logit_to_anomaly_logit(out.map_logit)[:, 0]
            score = TORCH_IMAGE_SCORES[self.image_score](logit)
        return anomaly_map, score


# ----------------------------------------------------------------------------- the run


@dataclass
class ExportResult:
    """What :func:`export_run` wrote.

    Attributes:
        path: The exported file.
        format: ``onnx`` or ``torchscript``.
        metadata: The fields stored in the file (:func:`read_export_metadata`).
        max_map_difference, max_score_difference: Largest differences between the file's
            outputs (run by ONNX Runtime or ``torch.jit.load``) and PyTorch's on the check
            images, at batch sizes 1 and 3.
        warnings: e.g. no held-out images, so no thresholds.
    """

    path: Path
    format: str
    metadata: Dict[str, Any]
    max_map_difference: Optional[float] = None
    max_score_difference: Optional[float] = None
    warnings: List[str] = field(default_factory=list)


def default_export_path(checkpoint_path: PathLike, fmt: str) -> Path:
    """``RUN_DIR/export/anoseg.onnx`` (or ``.torchscript.pt``) for a run's checkpoint, else
    beside a loose checkpoint file."""
    run = RunDir.of_checkpoint(checkpoint_path)
    folder = run.path / EXPORT_DIR if run is not None else Path(checkpoint_path).parent
    return folder / DEFAULT_FILE_NAMES[fmt]


def _thresholds(model: LoadedModel, checkpoint: Path, score: str,
                detector: Optional[LoadedDetector], holdout: Sequence[Path], *,
                batch_size: int, progress: bool, notes: List[str]
                ) -> Tuple[Optional[float], Optional[float]]:
    """``(pixel threshold, image threshold)`` on the held-out images (the run's caches for a
    single run, as ``anoseg-eval`` and ``anoseg-predict`` use them; warnings to ``notes``);
    ``None`` without any."""
    if not holdout:
        return None, None
    pixel, _ = cached_label_free_threshold(model, checkpoint, holdout, batch_size=batch_size,
                                           progress=progress)
    image = image_threshold_for(model, holdout, score, checkpoint, detector,
                                batch_size=batch_size, progress=progress, notes=notes)
    return pixel, image


def export_metadata(model: LoadedModel, score: str, pixel_threshold: Optional[float],
                    image_threshold: Optional[float], n_holdout: int,
                    detector: Optional[LoadedDetector]) -> Dict[str, Any]:
    """The fields stored in an exported file (JSON values)."""
    from anoseg._version import __version__

    cfg = model.config
    size = cfg.data.image_size
    height, width = image_hw(size)
    fit = ("resized to the image size" if cfg.data.resize == "stretch" else
           "resized to fit, keeping its aspect, and centred on a black canvas of the "
           "image size (data.resize=keep_aspect)")
    return {
        "format": METADATA_FORMAT, "anoseg_version": __version__,
        "image_size": list(size) if isinstance(size, (tuple, list)) else size,
        "resize": cfg.data.resize,
        "input": f"{INPUT_NAME}: float32 (batch, 3, {height}, {width}), RGB in [0, 1] (8-bit "
                 f"values / 255), {fit} (anoseg resizes with PIL bilinear)",
        "outputs": "anomaly_map: float32 (batch, H, W) in [0, 1], 1 = anomalous; image_score: "
                   f"float32 (batch,), the {score} score, higher = more anomalous",
        "image_score": score, "image_threshold": image_threshold,
        "image_threshold_quantile": cfg.eval.image_threshold_quantile,
        "image_threshold_rule": "anomalous when image_score > image_threshold",
        "pixel_threshold": pixel_threshold,
        "pixel_threshold_quantile": cfg.eval.threshold_quantile,
        "pixel_threshold_rule": "defect pixel when anomaly_map >= pixel_threshold",
        "n_holdout_images": n_holdout, "category": cfg.data.category,
        "weights": model.weights, "checkpoint_step": model.step,
        "members": list(model.members),
        "detector_step": detector.anoseg_step if detector is not None else None,
    }


def export_run(runs: Union[PathLike, Sequence[PathLike]], fmt: str,
               output: Optional[PathLike] = None, *, ensemble: bool = False,
               weights: str = "auto", image_score: Optional[str] = None,
               data_root: Optional[PathLike] = None, batch_size: Optional[int] = None,
               progress: bool = False, ensemble_combine: Optional[str] = None) -> ExportResult:
    """Export a run (or an ensemble of runs) to one ONNX or TorchScript file, then check it.

    The thresholds are the run's label-free ones (its held-out normal images; the cached values
    when present). The written file is loaded back and run on three held-out images (random
    ones without any) at batch sizes 1 and 3; its outputs must equal PyTorch's within
    :data:`MAP_TOLERANCE` / :data:`SCORE_TOLERANCE`.

    Args:
        runs: A run folder or checkpoint, or several with ``ensemble``.
        fmt: ``onnx`` (needs ``pip install 'anoseg-torch[export]'``) or ``torchscript``.
        output: The file; default ``RUN_DIR/export/anoseg.onnx`` / ``anoseg.torchscript.pt``
            (required for an ensemble).
        ensemble: The runs are members of one model (:func:`anoseg.inference.load_ensemble`).
        weights: ``auto``, ``ema`` or ``raw`` (:func:`anoseg.load_model`).
        image_score: Override the run's ``eval.image_score``; ``detector`` exports the
            run's detector too (a single run with a detector trained on its checkpoint).
        data_root: Where the run's dataset is now, if it moved (for the held-out images).
        batch_size: Images per forward pass for the thresholds (default ``eval.batch_size``).
        progress: Progress bars while the thresholds are computed.
        ensemble_combine: Override the first member's ``eval.ensemble_combine``; a
            calibrated ensemble (:func:`anoseg.inference.ensemble_mode`) is fitted on the
            held-out images first and the file carries its fit.

    Raises:
        MissingExtraError: ONNX without the ``export`` extra (before anything is loaded).
        ExportError: the written file does not reproduce PyTorch's outputs.
        AnoSegError: bad runs, options or data.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"export format {fmt!r} is unknown; expected one of "
                          f"{', '.join(EXPORT_FORMATS)}")
    if fmt == "onnx":
        require_extra("export", "anoseg-export --format onnx")
    listed = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if not listed:
        raise ConfigError("no run folder or checkpoint given")
    checkpoints = [resolve_checkpoint(r) for r in listed]
    if ensemble and output is None and len(checkpoints) > 1:
        raise ConfigError("an ensemble is exported to one file: pass --output FILE")
    model = load_runs(checkpoints, "cpu", ensemble=ensemble, weights=weights)
    if model.config.data.tiling.enabled:
        raise ExportError(f"{checkpoints[0]}: a run with data.tiling is not exported: its "
                          "maps come from a sliding window over the whole image, which the "
                          "one-window file does not do; use anoseg-predict")
    override_eval(model, image_score=image_score, ensemble_combine=ensemble_combine)
    run = RunDir.of_checkpoint(checkpoints[0])
    holdout = holdout_image_paths(model, data_root,
                                  run.path if run is not None and not ensemble else None)
    calibrate_ensemble(model, holdout, batch_size=batch_size or model.config.eval.batch_size,
                       progress=progress)
    detector, warning = run_detector(checkpoints[0], model, "cpu")
    notes: List[str] = [warning] if warning else []
    score = headline_image_score(model, detector, notes)
    if not holdout:
        notes.append("no held-out normal images: the file stores no label-free thresholds "
                     "(pixel_threshold and image_threshold are null)")
    pixel, image = _thresholds(model, checkpoints[0], score, detector, holdout,
                               batch_size=batch_size or model.config.eval.batch_size,
                               progress=progress, notes=notes)
    network = DeployedAnoSeg(model.generator, score,
                             detector=detector.detector if detector is not None else None,
                             alpha=model.config.detector.score_alpha,
                             beta=model.config.detector.score_beta).eval()
    metadata = export_metadata(model, score, pixel, image, len(holdout), detector)
    path = Path(output) if output is not None else default_export_path(checkpoints[0], fmt)
    check_images = _check_images(holdout, model.config.data.image_size)
    WRITERS[fmt](network, check_images[:2], metadata, path)
    map_diff, score_diff = verify_export(path, fmt, network, check_images)
    return ExportResult(path, fmt, metadata, map_diff, score_diff, notes)


def _check_images(holdout: Sequence[Path], image_size: Any) -> torch.Tensor:
    """Three images to trace and check with: held-out ones (repeated if fewer), else seeded
    random ones."""
    if holdout:
        images = load_images(list(holdout[:3]), image_size)
        return images[torch.arange(3) % len(images)]
    return torch.rand(3, 3, *image_hw(image_size), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------------------- the writers


def _write_onnx(network: nn.Module, example: torch.Tensor, metadata: Dict[str, Any],
                path: Path) -> None:
    """Export with ``torch.onnx.export`` (the ``torch.export`` path, a dynamic batch
    dimension), add the metadata and write the file atomically."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            network, (example,), dynamo=True, input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES), opset_version=ONNX_OPSET,
            dynamic_shapes={INPUT_NAME: {0: batch}}, verbose=False)
    proto = program.model_proto
    proto.doc_string = "anoseg: " + metadata["outputs"]
    for key, value in onnx_metadata_props(metadata).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    data = proto.SerializeToString()
    atomic_write_bytes(path, lambda handle: handle.write(data))


def onnx_metadata_props(metadata: Dict[str, Any]) -> Dict[str, str]:
    """ONNX metadata is string to string: every field on its own (strings as they are,
    numbers as text, null as an empty string, lists as JSON), and all of them as one JSON
    object under :data:`METADATA_KEY`."""
    props: Dict[str, str] = {}
    for key, value in metadata.items():
        if value is None:
            props[key] = ""
        elif isinstance(value, str):
            props[key] = value
        elif isinstance(value, float):
            props[key] = repr(value)
        else:
            props[key] = json.dumps(value)
    props[METADATA_KEY] = json.dumps(metadata)
    return props


def _write_torchscript(network: nn.Module, example: torch.Tensor, metadata: Dict[str, Any],
                       path: Path) -> None:
    """Trace (the network has no data-dependent control flow; the batch size stays
    symbolic) and save with the metadata as an extra file, atomically."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream, still libtorch's
        traced = torch.jit.trace(network, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer,
                       _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})
    atomic_write_bytes(path, lambda handle: handle.write(buffer.getvalue()))


WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript}


# ------------------------------------------------------------------------ reading it back


def load_exported(path: PathLike, fmt: Optional[str] = None
                  ) -> Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """A function ``images (B, 3, S, S) float32 -> (anomaly_map, image_score)`` numpy arrays,
    running an exported file with ONNX Runtime (CPU) or ``torch.jit.load``."""
    path = Path(path)
    fmt = fmt or format_of(path)
    if fmt == "onnx":
        ort = require("onnxruntime", extra="export", feature="running an ONNX export")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
            anomaly_map, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
            return anomaly_map, score

        return run_onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu")

    def run_torchscript(images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            anomaly_map, score = module(torch.from_numpy(np.ascontiguousarray(images)))
        return anomaly_map.numpy(), score.numpy()

    return run_torchscript


def format_of(path: PathLike) -> str:
    """``onnx`` for a ``.onnx`` file, else ``torchscript``."""
    return "onnx" if Path(path).suffix.lower() == ".onnx" else "torchscript"


def read_export_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata stored in an exported file (either format), as JSON values.

    Raises:
        ExportError: the file has no anoseg metadata.
    """
    path = Path(path)
    if format_of(path) == "onnx":
        onnx = require("onnx", extra="export", feature="reading an ONNX export")
        model = onnx.load(str(path), load_external_data=False)
        props = {p.key: p.value for p in model.metadata_props}
        text = props.get(METADATA_KEY)
    else:
        files = {TORCHSCRIPT_METADATA_FILE: ""}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        text = files[TORCHSCRIPT_METADATA_FILE] or None
    if not text:
        raise ExportError(f"{path} holds no anoseg metadata ({METADATA_KEY}); was it written "
                          "by anoseg-export?")
    return json.loads(text)


def verify_export(path: Path, fmt: str, network: nn.Module, images: torch.Tensor
                  ) -> Tuple[float, float]:
    """Run the written file on ``images`` at batch sizes 1 and ``len(images)`` and compare
    with ``network`` in PyTorch.

    Returns:
        ``(max |map difference|, max score difference relative to max(1, |score|))``.

    Raises:
        ExportError: a difference above :data:`MAP_TOLERANCE` / :data:`SCORE_TOLERANCE`.
    """
    run = load_exported(path, fmt)
    map_diff = score_diff = 0.0
    for batch in (images[:1], images):
        with torch.no_grad():
            want_map, want_score = (t.numpy() for t in network(batch))
        got_map, got_score = run(batch.numpy())
        if got_map.shape != want_map.shape or got_score.shape != want_score.shape:
            raise ExportError(f"{path} returns shapes {got_map.shape}, {got_score.shape} for a "
                              f"batch of {len(batch)}; expected {want_map.shape}, "
                              f"{want_score.shape}")
        map_diff = max(map_diff, float(np.abs(got_map - want_map).max()))
        score_diff = max(score_diff, float(
            (np.abs(got_score - want_score) / np.maximum(1.0, np.abs(want_score))).max()))
    if not (map_diff <= MAP_TOLERANCE and score_diff <= SCORE_TOLERANCE):
        raise ExportError(f"the exported file {path} does not reproduce PyTorch's outputs: map "
                          f"difference {map_diff:.3g} (allowed {MAP_TOLERANCE}), image score "
                          f"difference {score_diff:.3g} (allowed {SCORE_TOLERANCE})")
    return map_diff, score_diff
