"""``anoseg-train``: train AnoSeg on a category in MVTec AD layout (or the built-in demo)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from anoseg.cli.common import run_cli
from anoseg.config import DEMO_OVERRIDES, load_config
from anoseg.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anoseg-train",
        description="Train AnoSeg on normal images of one category. Without --data-root it "
                    "trains a small model on the built-in demo dataset (a few minutes on CPU).")
    parser.add_argument("--category", default=None,
                        help="category folder under --data-root (default: bottle; "
                             "demo_texture on the demo data)")
    parser.add_argument("--data-root", default=None,
                        help="folder in MVTec AD layout: <root>/<category>/train/good, ...")
    parser.add_argument("--config", default=None, help="YAML config file (see configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=500 (repeatable)")
    parser.add_argument("--output-dir", default=None,
                        help="run folder (default: runs/<category>)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop cleanly after this many seconds of training")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output-dir from its last checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--stage", choices=("segmenter", "detector"), default="segmenter",
                        help="segmenter (default): train AnoSeg; detector: train the image-level "
                             "detector of a finished run (--run), AnoSeg frozen. With "
                             "--stage detector, --config is applied on top of the run's config "
                             "and --output-dir is the detector folder (default RUN/detector)")
    parser.add_argument("--run", default=None, metavar="RUN_DIR",
                        help="the segmenter run folder the detector is trained on")
    return parser


def _train_detector(args: argparse.Namespace) -> int:
    from anoseg.detector_training import train_detector

    if args.run is None:
        raise ConfigError("--stage detector needs --run RUN_DIR (a trained segmenter run)")
    if args.data_root is not None or args.category is not None:
        raise ConfigError("--data-root and --category do not apply to --stage detector: it "
                          "trains on the images of the segmenter run given with --run")
    overrides = list(args.overrides)
    if args.device is not None:
        overrides.insert(0, f"train.device={args.device}")
    result = train_detector(args.run, overrides, config_path=args.config,
                            output_dir=args.output_dir, resume=args.resume,
                            progress=not args.no_progress, time_budget=args.time_budget)
    print(f"{result.stopped}: {result.steps} detector steps on the segmenter at step "
          f"{result.anoseg_step}, {result.train_seconds:.1f} s; checkpoint {result.checkpoint}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.stage == "detector":
        return _train_detector(args)
    if args.run is not None:
        raise ConfigError("--run is for --stage detector; a segmenter run's folder is "
                          "--output-dir")
    base = DEMO_OVERRIDES if args.data_root is None and args.config is None else None
    # Flag values are set as they are (not parsed as YAML like --set text), after --set.
    values: Dict[str, Dict[str, Any]] = {"data": {}, "train": {}}
    if args.data_root is not None:
        values["data"]["root"] = args.data_root
    category = args.category or ("demo_texture" if args.data_root is None else None)
    if category is not None:
        values["data"]["category"] = category
    if args.device is not None:
        values["train"]["device"] = args.device
    if args.time_budget is not None:
        values["train"]["time_budget"] = args.time_budget
    cfg = load_config(args.config, list(args.overrides), base=base, values=values)
    output_dir = Path(args.output_dir or Path("runs") / cfg.data.category)

    from anoseg.training import train

    if cfg.data.root is None:
        print(f"no --data-root: training on the built-in demo dataset, category "
              f"{cfg.data.category!r}")
    result = train(cfg, output_dir, resume=args.resume, progress=not args.no_progress)
    print(f"{result.stopped}: {result.steps} steps, {result.images_seen} images, "
          f"{result.train_seconds:.1f} s; checkpoint {result.checkpoint}")
    print(f"evaluate with: anoseg-eval --run {output_dir}")
    return 0


def _main_then_leave_group(argv: Optional[Sequence[str]] = None) -> int:
    """:func:`main`, then leave a torchrun job's process group on every rank."""
    from anoseg.runtime import shutdown_distributed

    try:
        return main(argv)
    finally:
        shutdown_distributed()


def entry_point() -> None:
    sys.exit(run_cli(_main_then_leave_group))


if __name__ == "__main__":
    entry_point()
