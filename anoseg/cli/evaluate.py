"""``anoseg-eval``: metrics tables (and optional maps, pictures, plots) for trained runs."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from anoseg.cli.common import add_ensemble_combine, run_cli


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _add_scoring_options(parser: argparse.ArgumentParser) -> None:
    """``--ensemble``, ``--ensemble-combine``, ``--image-score`` and
    ``--image-threshold-quantile``."""
    parser.add_argument("--ensemble", action="store_true",
                        help="the runs are members of one model (same category): average "
                             "their maps and evaluate them as one")
    add_ensemble_combine(parser)
    parser.add_argument("--image-score", default=None,
                        help="headline image score (Image AUROC, image threshold): max, "
                             "blur3_max, blur5_max, top10_mean, top1pct_mean, signals_max, "
                             "signals_mean or detector (default: the run's eval.image_score); "
                             "every cheap score's image AUROC is reported anyway")
    parser.add_argument("--image-threshold-quantile", type=float, default=None, metavar="Q",
                        help="label-free image threshold = this quantile of the held-out normal "
                             "images' image scores (default: the run's "
                             "eval.image_threshold_quantile, 0.99)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anoseg-eval",
        description="Evaluate trained AnoSeg runs on their category's test set: pixel and image "
                    "AUROC, IoU, AUPRO, F1, and IoU/F1 at a label-free threshold chosen on the "
                    "run's held-out normal images. Several runs (one category each) give one "
                    "table with a mean row.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", nargs="+", metavar="RUN_DIR",
                        help="run folder(s) written by anoseg-train")
    source.add_argument("--checkpoint", nargs="+", metavar="CKPT",
                        help="checkpoint file(s) (.pt) or run folder(s)")
    parser.add_argument("--data-root", default=None,
                        help="dataset root in MVTec AD layout (default: the run's own)")
    parser.add_argument("--category", default=None,
                        help="category to test on (default: the run's; one run only)")
    parser.add_argument("--output-dir", default=None,
                        help="where to write (default: RUN_DIR/eval; required for several "
                             "runs)")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help="test images per forward pass (default: the run's eval.batch_size)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--num-workers", type=_count, default=0,
                        help="data-loader worker processes for reading test images (default 0)")
    parser.add_argument("--save-maps", action="store_true",
                        help="write every test map as a 16-bit PNG (score = value / 65535, for "
                             "viewing) and as exact float32 .npy files (map and anomaly logit)")
    parser.add_argument("--pictures", type=_count, default=0, metavar="N",
                        help="write input | map | ground-truth pictures and overlays of N test "
                             "images per category")
    parser.add_argument("--plot", action="store_true",
                        help="plot IoU against the threshold (needs matplotlib: "
                             "pip install 'anoseg-torch[plot]')")
    parser.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                        help="generator weights of a run trained with train.ema_decay: the "
                             "averaged ones (auto, ema) or the last raw iterate (raw)")
    _add_scoring_options(parser)
    parser.add_argument("--report", action="store_true",
                        help="also write report.html: one self-contained page (no network) "
                             "with the tables, thresholds, IoU curves and galleries of the "
                             "worst-missed defects, strongest false alarms and a random sample")
    parser.add_argument("--resolution", choices=("model", "native"), default=None,
                        help="score maps at the model's resolution (model) or at each image's "
                             "own size, masks read at it (native); default: the run's "
                             "eval.resolution")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from anoseg.evaluation import evaluate_run

    runs = args.run or args.checkpoint
    if args.category is not None and len(runs) > 1 and not args.ensemble:
        from anoseg.errors import ConfigError

        raise ConfigError("--category applies to one run only; each run is evaluated on the "
                          "category it was trained on")
    report = evaluate_run(runs, categories=args.category, data_root=args.data_root,
                          output_dir=args.output_dir, batch_size=args.batch_size,
                          device=args.device, save_maps=args.save_maps, pictures=args.pictures,
                          plot=args.plot, progress=not args.no_progress,
                          num_workers=args.num_workers, weights=args.weights,
                          ensemble=args.ensemble, image_score=args.image_score,
                          image_threshold_quantile=args.image_threshold_quantile,
                          report=args.report, resolution=args.resolution,
                          ensemble_combine=args.ensemble_combine)
    print(report.table, end="")
    if report.image_table:
        print()
        print(report.image_table, end="")
    for note in report.mean_notes:
        print(f"note: {note}")
    for category, result in report.results.items():
        for warning in result.warnings:
            print(f"warning ({category}): {warning}")
    for message in report.messages:
        print(message)
    print("wrote:")
    for path in report.files:
        print(f"  {path}{'/' if path.is_dir() else ''}")
    return 0


def entry_point() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    entry_point()
