#!/usr/bin/env python
"""Run the paper's ablation studies (Table 3, and with ``--detector`` Table 5) on categories.

Table 3 (segmentation) trains and evaluates the four configurations of ``configs/ablation_*.yaml``
on every category, each in its own folder ``OUTPUT_DIR/<configuration>/<category>``:

    cutpaste_only   base model: CutPaste of an unaugmented copy, map decoder only
    hard_aug        + hard augmentation
    adversarial     + adversarial learning with masked reconstruction
    coord           + coordinate channels (the full AnoSeg)

With ``--detector``, the four Table 5 detectors (``configs/detector_*.yaml``) are trained on the
full segmenter of each category, into ``OUTPUT_DIR/coord/<category>/detectors/<detector>``, and
scored by image AUROC. The tables go to ``OUTPUT_DIR/ablations.md`` and
``OUTPUT_DIR/table3_ablation.csv`` / ``table5_ablation.csv``, laid out like the paper's (a column
per configuration, a row per category, a mean row and the paper's mean row).

Runs are done by ``run_categories.py`` (same skipping and resuming; each configuration folder
also gets its own ``tables.md``). Base config files (``--config``) come first, the ablation
file second, ``--set`` overrides last.

Examples::

    python scripts/run_ablations.py --data-root /data/mvtec_ad --output-dir runs/ablations
    python scripts/run_ablations.py --data-root /data/mvtec_ad --output-dir runs/ablations \\
        --categories bottle carpet --config configs/cpu_small.yaml --detector --gpus 0 1

See ``docs/reproduce.md``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from anoseg import batch_runs as rc
from anoseg.config import MVTEC_CATEGORIES, load_config
from anoseg.errors import AnoSegError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class Ablation:
    """One column of an ablation table.

    Attributes:
        name: Folder name and key in :mod:`anoseg.paper_results`.
        config: The YAML file with the configuration's switches.
        title: Column header (the paper's wording).
    """

    name: str
    config: Path
    title: str


TABLE3: Tuple[Ablation, ...] = (
    Ablation("cutpaste_only", CONFIGS_DIR / "ablation_cutpaste_only.yaml",
             "Base model (CutPaste only)"),
    Ablation("hard_aug", CONFIGS_DIR / "ablation_hard_aug.yaml", "+ Hard augmentation"),
    Ablation("adversarial", CONFIGS_DIR / "ablation_adversarial.yaml", "+ Adversarial learning"),
    Ablation("coord", CONFIGS_DIR / "ablation_coord.yaml", "+ Coordinate channel"),
)
"""Table 3's configurations, in the paper's column order; the last is the full AnoSeg."""

TABLE5: Tuple[Ablation, ...] = (
    Ablation("base", CONFIGS_DIR / "detector_base.yaml", "Base model"),
    Ablation("feature_matching", CONFIGS_DIR / "detector_feature_matching.yaml",
             "+ Feature matching loss"),
    Ablation("anomaly_map", CONFIGS_DIR / "detector_anomaly_map.yaml", "+ Input anomaly map"),
    Ablation("full", CONFIGS_DIR / "detector_full.yaml", "+ Anomaly classification loss"),
)
"""Table 5's detector configurations, trained on the full segmenter (``TABLE3[-1]``)."""

FULL_SEGMENTER = TABLE3[-1]


def detector_specs() -> List[rc.DetectorSpec]:
    """The Table 5 detectors as ``run_categories`` detector variants."""
    return [rc.DetectorSpec(a.name, str(a.config)) for a in TABLE5]


def ablation_job(ablation: Ablation, data_root: Path, output_dir: Path,
                 base_configs: Sequence[str], overrides: Sequence[str], *, detector: bool,
                 device: Optional[str], progress: bool) -> rc.Job:
    """The ``run_categories`` job of one Table 3 configuration (with the Table 5 detectors on
    the full segmenter when ``detector``)."""
    detectors = detector_specs() if detector and ablation == FULL_SEGMENTER else []
    return rc.Job(data_root, output_dir / ablation.name, [*base_configs, str(ablation.config)],
                  list(overrides), detectors, device, progress)


def write_ablation_tables(output_dir: Path, categories: Sequence[str],
                          detector: bool = False) -> Tuple[str, List[Path]]:
    """Write ``ablations.md`` and the CSV files (Table 5 only with ``detector``)."""
    return rc.write_ablation_tables(
        output_dir, categories, {a.name: a.title for a in TABLE3},
        list(zip(detector_specs(), (a.title for a in TABLE5))) if detector else [])


# ------------------------------------------------------------------------------ command line


def child_command(job: rc.Job, category: str) -> List[str]:
    """One category of ``job`` as a ``run_categories.py`` command line (for ``--gpus``)."""
    return rc.category_command(Path(__file__).resolve().parent / "run_categories.py", job,
                               category)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the Table 3 segmentation ablation (four configurations) and, with "
                    "--detector, the Table 5 detector ablation on a list of categories; write "
                    "the tables in the paper's layout into --output-dir. Finished runs are "
                    "skipped and interrupted ones resumed.")
    parser.add_argument("--data-root", required=True,
                        help="dataset in MVTec AD layout: <root>/<category>/train/good, ...")
    parser.add_argument("--output-dir", required=True,
                        help="OUTPUT_DIR/<configuration>/<category> run folders and the tables")
    parser.add_argument("--categories", nargs="+", default=list(MVTEC_CATEGORIES),
                        metavar="NAME", help="categories to run (default: the 15 MVTec AD ones)")
    parser.add_argument("--config", action="append", default=[], metavar="YAML",
                        help="base config file(s) applied before each ablation file (e.g. "
                             "configs/cpu_small.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a config key in every run (repeatable); applied after "
                             "the ablation file")
    parser.add_argument("--detector", action="store_true",
                        help="also run the Table 5 detector ablation on the full segmenter")
    parser.add_argument("--gpus", nargs="+", default=None, metavar="ID",
                        help="run the categories of each configuration in parallel, one per GPU")
    parser.add_argument("--device", default=None,
                        help="auto, cpu, cuda, cuda:N or mps (not with --gpus)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status (as ``run_categories.py``)."""
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    data_root = Path(args.data_root).expanduser().resolve()
    statuses: Dict[str, str] = {}
    try:
        for path in [a.config for a in TABLE3 + TABLE5]:
            if not path.is_file():
                raise AnoSegError(f"ablation config {path} is missing")
        jobs = [ablation_job(a, data_root, output_dir, args.config, args.overrides,
                             detector=args.detector, device=args.device,
                             progress=not args.no_progress) for a in TABLE3]
        if args.gpus is not None and args.device not in (None, "auto", "cuda"):
            raise AnoSegError("--gpus sets CUDA_VISIBLE_DEVICES per category; leave --device "
                              "unset")
        for job in jobs:  # fail now on a bad file or key, before any training
            load_config(job.config_paths, job.overrides)
        rc.check_categories(data_root, args.categories)
        for ablation, job in zip(TABLE3, jobs):
            print(f"== {ablation.name}: {ablation.title}")
            done = rc.run_job(job, args.categories, args.gpus, command_for=child_command)
            statuses.update({f"{ablation.name}/{c}": s for c, s in done.items()})
            rc.write_tables(job.output_dir, args.categories)
            if "interrupted" in done.values():
                break
    except AnoSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return rc.EXIT_BAD_INPUT
    markdown, paths = write_ablation_tables(output_dir, args.categories, args.detector)
    print(markdown)
    print("wrote " + ", ".join(str(p) for p in paths))
    unfinished = {c: s for c, s in statuses.items() if s not in ("done", "skipped")}
    if unfinished:
        print("not finished: " + ", ".join(f"{c} ({s})" for c, s in unfinished.items()))
    return rc.exit_status(statuses)


if __name__ == "__main__":
    sys.exit(main())
