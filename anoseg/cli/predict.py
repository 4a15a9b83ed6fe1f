"""``anoseg-predict``: anomaly maps, overlays, masks and image scores for any images."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from anoseg.cli.common import run_cli
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
        description="Write the anomaly map (16-bit PNG), a heat-map overlay and a binary mask "
                    "for each image, and scores.csv with image scores (max of the map). The mask "
                    "threshold is the run's label-free threshold (from its held-out normal "
                    "images) unless --threshold is given.")
    parser.add_argument("--checkpoint", required=True, metavar="CKPT_OR_RUN",
                        help="checkpoint file (.pt) or run folder")
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER",
                        help="image files and folders of images (PNG, JPEG, BMP, TIFF)")
    parser.add_argument("--output-dir", required=True, help="where to write")
    parser.add_argument("--threshold", type=_score, default=None,
                        help="pixel threshold in [0, 1] for masks and is_anomalous (default: "
                             "label-free, from the run's held-out images)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="images per forward pass (default: the run's eval.batch_size)")
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
                         progress=not args.no_progress)
    n_anomalous = sum(row["is_anomalous"] for row in report.rows)
    print(f"{len(report.rows)} images, {n_anomalous} anomalous at threshold "
          f"{report.threshold:.4f} ({report.threshold_source})")
    print(f"wrote: {report.output_dir / 'scores.csv'} and maps/, overlays/, masks/ in "
          f"{report.output_dir}")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
