"""The development suite: one recipe on every real set and every generated category, against the
per-pixel Gaussian floor, with a row per defect type.

    python scripts/dev_suite.py --config configs/cpu_real.yaml --budget 1200 \\
        --output-dir runs/suite

    # the README's real-data recipe: two general seeds and a spot specialist, one ensemble
    python scripts/dev_suite.py --member configs/cpu_unseen.yaml 540 0 1 \\
        --member configs/cpu_real.yaml 120 0 --output-dir runs/suite_recipe

Sets: the real sets under ``--real-root`` (``../shared/data/real``: bsdata, deeppcb, kolektorsdd;
any other folder there with a ``train/good`` folder is a set too, named by its folder) and the
generated categories of :mod:`anoseg.data.suite` (written once under
``--suite-root``). Per set: the Gaussian floor (cached), then training with the wall-clock
``--budget`` (split evenly over ``--seeds``; with several seeds the members are averaged as an
ensemble sharing one held-out split; with ``--separate-seeds`` each seed is its own model with
the whole budget, and the table shows the mean over seeds ± their standard deviation; with
``--member`` several recipes, each with its seconds per seed and its seeds, are scored as one
ensemble, calibrated as ``anoseg-eval --ensemble`` does), then
one pass over the test set scoring every pixel, the
whole set and each defect type (that type's images plus all good test images). A finished run
is not retrained (delete its folder to redo). Writes ``suite.json`` and ``suite.md``.
"""

from __future__ import annotations

import argparse

from anoseg.dev_suite import KEYS, Member, run_suite, suite_sets
from anoseg.reporting import suite_table


def _size(text: str):
    """``128`` (a square) or ``320x128`` / ``320,128`` (height x width)."""
    parts = text.replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a side or HxW, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a side or HxW, got {text!r}")
    return values[0] if len(values) == 1 else tuple(values)


def _member(parser: argparse.ArgumentParser, values) -> Member:
    """``CONFIG SECONDS SEED [SEED ...]`` of ``--member`` -> :class:`Member` (a usage error
    otherwise)."""
    if len(values) < 3:
        parser.error(f"--member takes CONFIG SECONDS SEED [SEED ...], got {' '.join(values)}")
    try:
        return Member(values[0], float(values[1]), tuple(int(v) for v in values[2:]))
    except ValueError:
        parser.error(f"--member {' '.join(values)}: SECONDS must be a number and the seeds "
                     "integers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="one recipe, trained for --budget over --seeds")
    parser.add_argument("--member", nargs="+", action="append", default=[],
                        metavar="CONFIG SECONDS SEED",
                        help="one recipe of a multi-recipe model: its config, training seconds "
                             "per seed, and its seeds; repeat for each recipe (instead of "
                             "--config); all members' runs are scored as one ensemble")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--budget", type=float, default=1200.0,
                        help="training seconds per set (all seeds together; with "
                             "--separate-seeds, per seed)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--real-root", default="../shared/data/real",
                        help="folder of real sets in MVTec layout (one folder per set)")
    parser.add_argument("--suite-root", default="runs/suite_data")
    parser.add_argument("--sets", nargs="+", default=None,
                        help="only these sets (names as in the table)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--image-size", type=_size, default=128,
                        help="size of the Gaussian floor, a side or HxW such as 320x128 (the "
                             "model uses its config's)")
    parser.add_argument("--floor-resize", choices=("stretch", "keep_aspect", "match_aspect"),
                        default="stretch",
                        help="how the Gaussian floor's images are brought to --image-size "
                             "(match_aspect: the canvas a run with data.resize=match_aspect "
                             "would choose)")
    parser.add_argument("--resolution", choices=("model", "native"), default="model",
                        help="score floor and models at the model's resolution (padding cut "
                             "off) or at each image's own size (native: every geometry on the "
                             "same pixels)")
    parser.add_argument("--separate-seeds", action="store_true",
                        help="train every seed as its own model with the whole --budget and "
                             "report the mean over seeds ± their standard deviation (instead "
                             "of one ensemble): tells a change of recipe from seed noise")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="data.split_seed of every run (default 0): one held-out split "
                             "for all seeds and calls, so runs can be joined with --ensemble")
    args = parser.parse_args()
    if bool(args.config) == bool(args.member):
        parser.error("give either --config or one --member per recipe")
    recipe = args.config or [_member(parser, values) for values in args.member]

    sets = suite_sets(args.real_root, args.suite_root, args.sets)
    results = run_suite(sets, recipe, args.overrides, budget=args.budget, seeds=args.seeds,
                        output_dir=args.output_dir, image_size=args.image_size,
                        floor_resize=args.floor_resize, resolution=args.resolution,
                        separate_seeds=args.separate_seeds, split_seed=args.split_seed)
    print(suite_table(results, KEYS))


if __name__ == "__main__":
    main()
