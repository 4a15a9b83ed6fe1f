"""Shared pieces of the command-line tools."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from anoseg.errors import AnoSegError


def run_cli(main: Callable[[Optional[Sequence[str]]], int],
            argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main``; bad input prints one clear line (no traceback) and exits with status 2."""
    try:
        return main(argv)
    except AnoSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_ensemble_combine(parser: argparse.ArgumentParser) -> None:
    """``--ensemble-combine`` (``eval.ensemble_combine``) of the commands that take
    ``--ensemble``; the choices are :data:`anoseg.config.ENSEMBLE_COMBINES`."""
    from anoseg.config import ENSEMBLE_COMBINES

    parser.add_argument("--ensemble-combine", choices=ENSEMBLE_COMBINES, default=None,
                        help="with --ensemble: average the members' maps (mean) or put each "
                             "recipe's on its held-out normal images' scale first (calibrated); "
                             "auto: calibrated when the members are of several recipes (e.g. "
                             "cpu_unseen.yaml and cpu_real.yaml), mean otherwise; default: the "
                             "first member's eval.ensemble_combine (auto)")
