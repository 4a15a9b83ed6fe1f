"""``anoseg-predict``: anomaly maps, overlays, masks and image scores for any images."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from anoseg.cli.common import add_ensemble_combine, run_cli
from anoseg.cli.evaluate import _positive_int


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a score in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anoseg-predict",
        description="Write the anomaly map (16-bit PNG, and the float32 logit map), a heat-map "
                    "overlay and a binary mask for each image, and scores.csv with image scores "
                    "and a pass/fail decision (is_anomalous). The mask threshold and the image "
                    "threshold are the run's label-free thresholds (from its held-out normal "
                    "images) unless --threshold / --image-threshold are given.")
    parser.add_argument("--checkpoint", required=True, action="append", metavar="CKPT_OR_RUN",
                        help="checkpoint file (.pt) or run folder; repeat it with --ensemble "
                             "for several runs as one model")
    parser.add_argument("--ensemble", action="store_true",
                        help="the runs are members of one model (same category and "
                             "data.split_seed): average their maps, as anoseg-eval --ensemble")
    add_ensemble_combine(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files and folders of images (PNG, JPEG, BMP, TIFF)")
    parser.add_argument("--output-dir", required=True, help="where to write")
    parser.add_argument("--threshold", type=_score, default=None,
                        help="pixel threshold in [0, 1] for the masks (default: label-free, from "
                             "the run's held-out images)")
    parser.add_argument("--image-threshold", type=float, default=None,
                        help="image threshold for is_anomalous, in the image score's units "
                             "(default: label-free, the eval.image_threshold_quantile of the "
                             "held-out normal images' image scores)")
    parser.add_argument("--image-score", default=None,
                        help="image score for is_anomalous: max, blur3_max, blur5_max, "
                             "top10_mean, top1pct_mean, signals_max, signals_mean or detector "
                             "(default: the run's eval.image_score)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per forward pass, or windows under data.tiling (default: "
                             "the run's eval.batch_size)")
    parser.add_argument("--map-resolution", choices=("native", "model"), default="native",
                        help="write maps, masks and overlays at each input's own size "
                             "(native, default) or at the model's resolution (model)")
    parser.add_argument("--resolution", choices=("model", "native"), default=None,
                        help="where the image scores and label-free thresholds are computed "
                             "(default: the run's eval.resolution)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--data-root", default=None,
                        help="where the run's dataset is now, if it moved since training "
                             "(to find the held-out images)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from anoseg.predict import predict_run

    report = predict_run(args.checkpoint, args.images, args.output_dir,
                         threshold=args.threshold, batch_size=args.batch_size,
                         device=args.device, data_root=args.data_root,
                         progress=not args.no_progress, image_threshold=args.image_threshold,
                         image_score=args.image_score, map_resolution=args.map_resolution,
                         resolution=args.resolution, ensemble=args.ensemble,
                         ensemble_combine=args.ensemble_combine)
    print(report.summary())
    print(f"wrote: {report.output_dir / 'scores.csv'} and maps/, overlays/, masks/ in "
          f"{report.output_dir}")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
