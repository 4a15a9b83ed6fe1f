"""anoseg: AnoSeg anomaly segmentation (Song et al.) in PyTorch.

The public API is small::

    import anoseg
    cfg = anoseg.load_config("configs/cpu_small.yaml", ["train.steps=100"])
    result = anoseg.train(cfg, "runs/demo")             # train (demo data when data.root unset)
    model = anoseg.load_model("runs/demo")              # rebuild from a checkpoint or run folder
    maps = anoseg.predict_anomaly_maps(model.generator, images)   # (B, H, W), 1 = anomalous

Everything returned to users is an *anomaly* map (higher = more anomalous).
"""

from anoseg._version import __version__  # noqa: E402

from anoseg.config import AnoSegConfig, load_config, save_config  # noqa: E402
from anoseg.errors import AnoSegError, CheckpointError, ConfigError, DataError  # noqa: E402
from anoseg.inference import load_model, predict_anomaly_maps  # noqa: E402
from anoseg.training import build_discriminator, build_generator, train, train_step  # noqa: E402

__all__ = [
    "__version__", "AnoSegConfig", "load_config", "save_config", "AnoSegError",
    "CheckpointError", "ConfigError", "DataError", "load_model", "predict_anomaly_maps",
    "build_generator", "build_discriminator", "train", "train_step",
]
