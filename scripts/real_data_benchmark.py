"""Equal-compute comparison on the real datasets: train with a wall-clock budget, evaluate,
and write the table next to the peer numbers (DRAEM via anomalib 2.7, and a per-pixel
Gaussian), measured on this kind of 2-core machine at 128x128 with 1200 s of training.

    python scripts/real_data_benchmark.py --data-root ../shared/data/real \\
        --config configs/cpu_real.yaml --budget 1200 --output-dir runs/real

Runs that already finished are evaluated again but not retrained (delete the folder to redo).
With ``--seeds 0 1 2`` every set is trained once per seed (``train.seed``; also the held-out
split) and the table gets a row per seed, their mean, and the margin of the mean over the
better peer on the metrics the issue's goal names (pixel AUROC, AUPRO, best IoU).
With ``--ensemble`` the seeds are members of one model: each member gets ``budget / len(seeds)``
seconds (so the ensemble stays within the budget), all share the held-out split
(``data.split_seed`` = the first seed), and the table adds the ensemble (maps averaged,
``anoseg-eval --ensemble``) with its summed training time; the margin row is then the ensemble's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict

from anoseg.dev_suite import train_and_evaluate
from anoseg.evaluation import evaluate_run
from anoseg.reporting import benchmark_table

# From the issue "Real defects": DRAEM (anomalib 2.7), 128x128, batch 8, Adam 1e-4, 1200 s on
# the 2 cores, independent evaluator; and a per-pixel Gaussian of the training images.
PEERS: Dict[str, Dict[str, Dict[str, float]]] = {
    "DRAEM 1200 s": {
        "bsdata": {"pixel_auroc": 0.705, "image_auroc": 0.899, "aupro": 0.231,
                   "iou_pooled_best": 0.025, "pixel_f1_max": 0.050},
        "deeppcb": {"pixel_auroc": 0.844, "image_auroc": 0.641, "aupro": 0.543,
                    "iou_pooled_best": 0.005, "pixel_f1_max": 0.010},
    },
    "per-pixel Gaussian": {
        "bsdata": {"pixel_auroc": 0.884, "image_auroc": 0.952, "aupro": 0.451,
                   "iou_pooled_best": 0.013, "pixel_f1_max": 0.025},
        "deeppcb": {"pixel_auroc": 0.412, "image_auroc": 0.484, "aupro": 0.074,
                    "iou_pooled_best": 0.001, "pixel_f1_max": 0.002},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--categories", nargs="+", default=["bsdata", "deeppcb"])
    parser.add_argument("--config", default="configs/cpu_real.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--budget", type=float, default=1200.0, help="training seconds")
    parser.add_argument("--output-dir", default="runs/real")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="train.seed values; one run per set and seed")
    parser.add_argument("--ensemble", action="store_true",
                        help="the seeds are members of one model sharing the budget")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    member_budget = args.budget / len(args.seeds) if args.ensemble else args.budget
    split_seed = args.seeds[0] if args.ensemble else None

    out = Path(args.output_dir)

    def run_dir(category: str, seed: int) -> Path:
        return out / category if seed == 0 else out / f"{category}_seed{seed}"

    ours = {c: [train_and_evaluate(Path(args.data_root), c, args.config, args.overrides,
                                   member_budget, run_dir(c, seed), not args.no_progress,
                                   seed=seed, split_seed=split_seed)
                for seed in args.seeds] for c in args.categories}
    ensembles = {}
    if args.ensemble:
        for c in args.categories:
            members = [run_dir(c, seed) for seed in args.seeds]
            report = evaluate_run(members, output_dir=out / f"{c}_ensemble",
                                  progress=not args.no_progress, pictures=6, ensemble=True)
            ensembles[c] = report.results[c].to_dict()
            ensembles[c]["steps"] = sum(r["steps"] for r in ours[c])
            ensembles[c]["train_seconds"] = sum(r["train_seconds"] for r in ours[c])
    table = benchmark_table(ours, ensembles, PEERS, seeds=args.seeds, budget=args.budget,
                            member_budget=member_budget, config=args.config,
                            overrides=args.overrides)
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out / 'table.md'}")


if __name__ == "__main__":
    main()
