#!/usr/bin/env python
"""Train and evaluate AnoSeg on many categories and write the paper's summary tables.

For every category (default: the 15 MVTec AD categories) this trains a run in
``OUTPUT_DIR/<category>``, evaluates it into ``OUTPUT_DIR/<category>/eval`` (as ``anoseg-eval``
does) and, with ``--detector``, trains the image-level detector into
``OUTPUT_DIR/<category>/detector`` and scores it on the test set. At the end it writes
``OUTPUT_DIR/tables.md`` and one CSV per table: Table 1 (pixel and image AUROC), Table 2 (IoU)
and AUPRO / F1-max, with the paper's numbers beside ours (``anoseg.paper_results``).

Calling it again skips what is finished and resumes what was interrupted, so a long job can be
stopped (Ctrl-C saves a checkpoint) and restarted with the same command.

Examples::

    python scripts/run_categories.py --data-root /data/mvtec_ad --output-dir runs/mvtec
    python scripts/run_categories.py --data-root /data/mvtec_ad --output-dir runs/mvtec \\
        --config configs/paper.yaml --detector --gpus 0 1 2 3
    python scripts/run_categories.py --data-root /data/mvtec_ad --output-dir runs/small \\
        --categories bottle grid --config configs/cpu_small.yaml --set train.steps=500

See ``docs/reproduce.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from anoseg.batch_runs import (EXIT_BAD_INPUT, DetectorSpec, Job,  # noqa: F401
                               category_command, category_done, exit_status, run_job,
                               write_tables)
from anoseg.config import MVTEC_CATEGORIES, load_config
from anoseg.errors import AnoSegError, ConfigError
from anoseg.reporting import build_tables  # noqa: F401
from anoseg.run_dir import DETECTOR_DIR

SCRIPT = Path(__file__).resolve()


def child_command(job: Job, category: str) -> List[str]:
    """The command line running one category of ``job`` in a subprocess (no tables)."""
    return category_command(SCRIPT, job, category)


def parse_detector_variant(text: str) -> DetectorSpec:
    """``NAME=CONFIG.yaml`` (or ``NAME``) from ``--detector-variant``."""
    name, _, config = text.partition("=")
    name = name.strip()
    if not name or name in (DETECTOR_DIR, ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"--detector-variant expects NAME=CONFIG.yaml with a plain folder "
                          f"name other than {DETECTOR_DIR!r}, got {text!r}")
    if config and not Path(config).is_file():
        raise ConfigError(f"config file {config} does not exist")
    return DetectorSpec(name, config or None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train and evaluate AnoSeg on a list of categories (default: the 15 MVTec "
                    "AD categories), one run folder per category, then write the paper's "
                    "summary tables (tables.md and CSV) into --output-dir. Finished categories "
                    "are skipped and interrupted ones resumed.")
    parser.add_argument("--data-root", required=True,
                        help="dataset in MVTec AD layout: <root>/<category>/train/good, ...")
    parser.add_argument("--output-dir", required=True,
                        help="one run folder per category (OUTPUT_DIR/<category>) and the tables")
    parser.add_argument("--categories", nargs="+", default=list(MVTEC_CATEGORIES),
                        metavar="NAME", help="categories to run (default: the 15 MVTec AD ones)")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="config file (see configs/); repeat to layer several, later ones "
                             "win")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.steps=500 (repeatable)")
    parser.add_argument("--detector", action="store_true",
                        help="also train the image-level detector (RUN/detector) and report "
                             "its image AUROC")
    parser.add_argument("--detector-variant", action="append", default=[],
                        metavar="NAME=YAML",
                        help="also train a detector with this config into "
                             "RUN/detectors/NAME and score it (repeatable; used by "
                             "run_ablations.py for Table 5)")
    parser.add_argument("--gpus", nargs="+", default=None, metavar="ID",
                        help="run categories in parallel, one per GPU (CUDA_VISIBLE_DEVICES=ID "
                             "per subprocess); default: one after another in this process")
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda, cuda:N or mps (not with --gpus)")
    parser.add_argument("--no-tables", action="store_true",
                        help="do not write the summary tables (used by the per-GPU "
                             "subprocesses)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def job_from_args(args: argparse.Namespace) -> Job:
    """The :class:`Job` of the parsed arguments; checks the config once, up front."""
    detectors = [DetectorSpec(DETECTOR_DIR)] if args.detector else []
    detectors += [parse_detector_variant(text) for text in args.detector_variant]
    names = [spec.name for spec in detectors]
    if len(set(names)) != len(names):
        raise ConfigError(f"detector names given more than once: {names}")
    if args.gpus is not None:
        if len(set(args.gpus)) != len(args.gpus):
            raise ConfigError(f"--gpus lists a GPU more than once: {args.gpus}")
        if args.device not in (None, "auto", "cuda"):
            raise ConfigError("--gpus sets CUDA_VISIBLE_DEVICES per category; leave --device "
                              "unset")
    job = Job(Path(args.data_root).expanduser().resolve(), Path(args.output_dir), list(args.config),
              list(args.overrides), detectors, args.device, not args.no_progress)
    load_config(job.config_paths, job.overrides)  # fail now on a bad file or key
    return job


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        job = job_from_args(args)
        statuses = run_job(job, args.categories, args.gpus, command_for=child_command)
    except AnoSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.no_tables:
        markdown, paths = write_tables(job.output_dir, args.categories,
                                       detector=any(s.name == DETECTOR_DIR
                                                    for s in job.detectors))
        print(markdown)
        print("wrote " + ", ".join(str(p) for p in paths))
    unfinished = {c: s for c, s in statuses.items() if s not in ("done", "skipped")}
    if unfinished:
        print("not finished: " + ", ".join(f"{c} ({s})" for c, s in unfinished.items()))
    return exit_status(statuses)


if __name__ == "__main__":
    sys.exit(main())
