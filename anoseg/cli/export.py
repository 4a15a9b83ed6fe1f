"""``anoseg-export``: a trained run as one ONNX or TorchScript file (image batch in, anomaly
map and image score out, preprocessing included, thresholds as metadata)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from anoseg.cli.common import add_ensemble_combine, run_cli
from anoseg.cli.evaluate import _positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anoseg-export",
        description="Export a trained run to one file for deployment: an image batch (float32 "
                    "NCHW RGB in [0, 1] at the run's image size, any batch size) in, the "
                    "anomaly map and the image score out, with the image size and the run's "
                    "label-free thresholds stored as metadata. The file is loaded back and "
                    "checked against PyTorch before the command returns.")
    parser.add_argument("--run", nargs="+", required=True, metavar="RUN_DIR",
                        help="run folder (or checkpoint file); several with --ensemble")
    parser.add_argument("--format", required=True, choices=("onnx", "torchscript"),
                        help="onnx (ONNX Runtime, OpenVINO, TensorRT; needs "
                             "pip install 'anoseg-torch[export]') or torchscript (libtorch)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="the file to write (default: RUN_DIR/export/anoseg.onnx or "
                             "anoseg.torchscript.pt; required for an ensemble)")
    parser.add_argument("--ensemble", action="store_true",
                        help="the runs are members of one model: export their averaged maps")
    add_ensemble_combine(parser)
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="generator weights of a run trained with train.ema_decay")
    parser.add_argument("--image-score", default=None,
                        help="max, blur3_max, blur5_max, top10_mean, top1pct_mean, "
                             "signals_max, signals_mean or detector (exports the run's "
                             "detector too); default the run's eval.image_score")
    parser.add_argument("--data-root", default=None,
                        help="where the run's dataset is now, if it moved (held-out images)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per forward pass for the thresholds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from anoseg.export import export_run

    result = export_run(args.run, args.format, args.output, ensemble=args.ensemble,
                        weights=args.weights, image_score=args.image_score,
                        data_root=args.data_root, batch_size=args.batch_size,
                        progress=not args.no_progress,
                        ensemble_combine=args.ensemble_combine)
    for note in result.warnings:
        print(f"warning: {note}")
    meta = result.metadata

    def shown(value: Optional[float]) -> str:
        return "none" if value is None else f"{value:.6g}"

    print(f"image size {meta['image_size']}, image score {meta['image_score']}, image "
          f"threshold {shown(meta['image_threshold'])}, pixel threshold "
          f"{shown(meta['pixel_threshold'])}")
    print(f"checked against PyTorch at batch sizes 1 and 3: max map difference "
          f"{result.max_map_difference:.2g}, max image score difference "
          f"{result.max_score_difference:.2g}")
    print(f"wrote: {result.path}")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
