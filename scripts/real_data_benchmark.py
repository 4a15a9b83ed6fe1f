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
import json
import time
from pathlib import Path
from typing import Dict, List, Optional

from anoseg.config import load_config
from anoseg.evaluation import evaluate_run
from anoseg.run_dir import RunDir
from anoseg.training import train

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
COLUMNS = [("pixel_auroc", "pixel AUROC"), ("image_auroc", "image AUROC"),
           ("aupro", "AUPRO@0.3"), ("iou_pooled_best", "best IoU"), ("pixel_f1_max", "F1-max")]


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


GOAL_METRICS = ("pixel_auroc", "aupro", "iou_pooled_best")


def run_one(data_root: Path, category: str, config: str, overrides: List[str], budget: float,
            run_dir: Path, progress: bool, seed: int = 0,
            split_seed: Optional[int] = None) -> Dict:
    run = RunDir(run_dir)
    if not run.summary.is_file():
        data = {"root": str(data_root), "category": category}
        if split_seed is not None:
            data["split_seed"] = split_seed
        cfg = load_config(config, overrides, values={
            "data": data, "train": {"time_budget": budget, "seed": seed}})
        # an interrupted run (checkpoint, no summary) continues where it stopped
        train(cfg, run_dir, progress=progress, resume=run.has_checkpoint())
    summary = json.loads(run.summary.read_text())
    start = time.perf_counter()
    report = evaluate_run(run_dir, output_dir=run.eval_dir, progress=progress, pictures=6)
    result = dict(report.results[category])
    result["eval_seconds"] = time.perf_counter() - start
    result["steps"] = summary["steps"]
    result["train_seconds"] = summary["train_seconds"]
    return result


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

    ours = {c: [run_one(Path(args.data_root), c, args.config, args.overrides, member_budget,
                        run_dir(c, seed), not args.no_progress, seed=seed,
                        split_seed=split_seed)
                for seed in args.seeds] for c in args.categories}
    ensembles = {}
    if args.ensemble:
        for c in args.categories:
            members = [run_dir(c, seed) for seed in args.seeds]
            report = evaluate_run(members, output_dir=out / f"{c}_ensemble",
                                  progress=not args.no_progress, pictures=6, ensemble=True)
            ensembles[c] = dict(report.results[c])
            ensembles[c]["steps"] = sum(r["steps"] for r in ours[c])
            ensembles[c]["train_seconds"] = sum(r["train_seconds"] for r in ours[c])
    lines = [f"Training budget {args.budget:.0f} s per set, config `{args.config}`"
             + (f", overrides {args.overrides}" if args.overrides else "")
             + f", seeds {args.seeds}"
             + (f" as one ensemble ({member_budget:.0f} s each)" if args.ensemble else "")
             + ".", "",
             "| set | method | " + " | ".join(n for _, n in COLUMNS) + " | steps | train s |",
             "|---|---|" + "---|" * (len(COLUMNS) + 2)]
    for category in args.categories:
        runs = ours[category]
        for seed, r in zip(args.seeds, runs):
            lines.append(f"| {category} | anoseg seed {seed} | "
                         + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS)
                         + f" | {r['steps']} | {r['train_seconds']:.0f} |")
        mean = {k: (sum(r[k] for r in runs) / len(runs)
                    if all(r.get(k) is not None for r in runs) else None) for k, _ in COLUMNS}
        if len(runs) > 1:
            lines.append(f"| {category} | {'' if args.ensemble else '**'}anoseg mean of "
                         f"{len(runs)}{'' if args.ensemble else '**'} | "
                         + " | ".join(_fmt(mean[k]) for k, _ in COLUMNS) + " | | |")
        headline = mean  # what the margin row measures: the mean, or the ensemble below
        if args.ensemble:
            e = ensembles[category]
            lines.append(f"| {category} | **anoseg ensemble of {len(runs)}** | "
                         + " | ".join(_fmt(e.get(k)) for k, _ in COLUMNS)
                         + f" | {e['steps']} | {e['train_seconds']:.0f} |")
            headline = {k: e.get(k) for k, _ in COLUMNS}
        peers = [numbers[category] for numbers in PEERS.values() if category in numbers]
        for peer, numbers in PEERS.items():
            if category in numbers:
                lines.append(f"| {category} | {peer} | "
                             + " | ".join(_fmt(numbers[category].get(k)) for k, _ in COLUMNS)
                             + " | | |")
        if peers:
            margins = []
            for k, _ in COLUMNS:
                best = max(p[k] for p in peers)
                margins.append(f"{headline[k] - best:+.3f}" if k in GOAL_METRICS
                               and headline[k] is not None else "")
            which = (" ensemble" if args.ensemble else " mean" if len(runs) > 1 else "")
            lines.append(f"| {category} | margin of anoseg{which} "
                         "over the better peer | " + " | ".join(margins) + " | | |")
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    print(table)
    print(f"wrote {out / 'table.md'}")


if __name__ == "__main__":
    main()
