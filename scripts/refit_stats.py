"""Refit a finished run's inference statistics under changed inference-time keys
(:data:`anoseg.refit.REFIT_KEYS`), into a new run folder, without training again.

    python scripts/refit_stats.py runs/kol_s0 runs/kol_s0_rough --set model.lowpass_roughness=true

An ensemble is refitted member by member (one call each)."""

from __future__ import annotations

import argparse
import sys

from anoseg.errors import AnoSegError
from anoseg.refit import REFIT_KEYS, refit_run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="the finished run folder")
    parser.add_argument("output_dir", help="the new run folder (must not hold a run)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=f"one of {', '.join(REFIT_KEYS)} (repeatable)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: the best)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        out = refit_run(args.run, args.output_dir, args.overrides, device=args.device,
                        progress=not args.no_progress)
    except AnoSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
