"""anoseg: AnoSeg anomaly segmentation (Song et al.) in PyTorch.

The public API is small::

    import anoseg
    cfg = anoseg.load_config("configs/cpu_small.yaml", ["train.steps=100"])
    result = anoseg.train(cfg, "runs/demo")             # train (demo data when data.root unset)
    model = anoseg.load_model("runs/demo")              # rebuild from a checkpoint or run folder
    maps = anoseg.predict_anomaly_maps(model.generator, images)   # (B, H, W), 1 = anomalous
    # images of any size, as the run's data.image_size / resize / tiling place them:
    # anoseg.predict_placed(model.generator, canvases, placements, anoseg.Geometry.from_config(cfg.data))
    #   -> one ScoredMap(anomaly, logit, signal) per image
    metrics = anoseg.SegmentationMetrics()              # streaming metrics on any method's maps
    anoseg.train_detector("runs/demo")                  # image-level detector, AnoSeg frozen
    scores = anoseg.detector_scores(anoseg.load_detector("runs/demo"), model.generator, images)
    anoseg.export_run("runs/demo", "onnx")              # one ONNX file for ONNX Runtime

Everything returned to users is an *anomaly* map (higher = more anomalous). Names are imported
lazily, so ``import anoseg.metrics`` does not load the model or training code.
"""

from importlib import import_module
from typing import Any

from anoseg._version import __version__

_EXPORTS = {
    "AnoSegConfig": "anoseg.config", "load_config": "anoseg.config",
    "save_config": "anoseg.config",
    "AnoSegError": "anoseg.errors", "CheckpointError": "anoseg.errors",
    "ConfigError": "anoseg.errors", "DataError": "anoseg.errors",
    "load_model": "anoseg.inference", "predict_anomaly_maps": "anoseg.inference",
    "build_generator": "anoseg.models.factory", "build_discriminator": "anoseg.models.factory",
    "build_detector": "anoseg.models.factory",
    "train": "anoseg.training", "train_step": "anoseg.training",
    "SegmentationMetrics": "anoseg.metrics", "label_free_threshold": "anoseg.metrics",
    "evaluate_run": "anoseg.evaluation", "evaluate_category": "anoseg.evaluation",
    "predict_run": "anoseg.predict", "predict_images": "anoseg.predict",
    "train_detector": "anoseg.detector_training", "load_detector": "anoseg.inference",
    "detector_scores": "anoseg.inference", "load_ensemble": "anoseg.inference",
    "RunDir": "anoseg.run_dir",
    "export_run": "anoseg.export", "read_export_metadata": "anoseg.export",
    "Geometry": "anoseg.data.geometry", "predict_placed": "anoseg.inference",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'anoseg' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
