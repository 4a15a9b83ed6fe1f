"""The development suite: one recipe on every real set and every generated category, against the
per-pixel Gaussian floor, with a row per defect type.

    python scripts/dev_suite.py --config configs/cpu_real.yaml --budget 1200 \\
        --output-dir runs/suite

Sets: the real sets under ``--real-root`` (``../shared/data/real``: bsdata, deeppcb, kolektorsdd)
and the generated categories of :mod:`anoseg.data.suite` (written once under
``--suite-root``). Per set: the Gaussian floor (cached), then training with the wall-clock
``--budget`` (split evenly over ``--seeds``; with several seeds the members are averaged as an
ensemble sharing one held-out split), then one pass over the test set scoring every pixel, the
whole set and each defect type (that type's images plus all good test images). A finished run
is not retrained (delete its folder to redo). Writes ``suite.json`` and ``suite.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from anoseg.baselines import PerPixelGaussian
from anoseg.atomic import atomic_write_text, write_json
from anoseg.run_dir import RunDir
from anoseg.config import load_config
from anoseg.data.mvtec import MVTecTestDataset, list_train_images, load_image
from anoseg.data.suite import SUITE_CATEGORIES, write_suite
from anoseg.metrics import SegmentationMetrics

REAL_SETS = {"bsdata": "bsdata", "deeppcb": "deeppcb", "kolektorsdd": "kolektorsdd"}
KEYS = ("pixel_auroc", "aupro", "iou_pooled_best", "image_auroc")
NUM_THRESHOLDS = 2000


def score_test_set(map_fn: Callable[[torch.Tensor], torch.Tensor], root: Path, category: str,
                   image_size: int, score_range=(0.0, 1.0)) -> Dict[str, Dict]:
    """Overall and per-defect-type metrics of ``map_fn`` (images -> anomaly maps)."""
    dataset = MVTecTestDataset(root, category, image_size)
    types = sorted({s.defect_type for s in dataset.samples} - {"good"})

    def new():
        return SegmentationMetrics(score_range=score_range, num_thresholds=NUM_THRESHOLDS)

    overall, per_type = new(), {t: new() for t in types}
    for batch in DataLoader(dataset, batch_size=16, shuffle=False):
        maps = map_fn(batch["image"]).float().cpu().numpy()
        masks = batch["mask"][:, 0].numpy()
        labels = np.asarray(batch["label"])
        kinds = np.asarray(batch["defect_type"])
        overall.update(maps, masks, labels=labels)
        for t in types:
            keep = (kinds == t) | (kinds == "good")
            if keep.any():
                per_type[t].update(maps[keep], masks[keep], labels=labels[keep])
    out = {"all": {k: overall.compute().get(k) for k in KEYS}}
    for t in types:
        result = per_type[t].compute()
        out[t] = {k: result.get(k) for k in KEYS}
    return out


def gaussian_floor(root: Path, category: str, image_size: int) -> Dict[str, Dict]:
    images = torch.stack([load_image(p, image_size) for p in list_train_images(root, category)])
    baseline = PerPixelGaussian.fit(images.float() / 255.0)
    return score_test_set(baseline.anomaly_maps, root, category, image_size, score_range=None)


def train_members(cfg_path: str, overrides: List[str], root: Path, category: str,
                  budget: float, seeds: Sequence[int], run_root: Path) -> List[Path]:
    from anoseg.training import train

    runs = []
    for seed in seeds:
        run_dir = run_root / f"s{seed}"
        runs.append(run_dir)
        run = RunDir(run_dir)
        if run.read_summary() is not None:
            continue
        cfg = load_config(cfg_path, overrides, values={
            "data": {"root": str(root), "category": category, "split_seed": seeds[0]},
            "train": {"time_budget": budget / len(seeds), "seed": seed}})
        train(cfg, run_dir, progress=False, resume=run.has_checkpoint())
    return runs


def model_scores(runs: List[Path], root: Path, category: str) -> Dict[str, Dict]:
    from anoseg.inference import load_ensemble, predict_anomaly_maps

    model = load_ensemble(runs, "cpu")
    return score_test_set(lambda x: predict_anomaly_maps(model.generator, x), root, category,
                          model.config.data.image_size)


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(results: Dict[str, Dict]) -> str:
    lines = ["| set | type | method | pixel AUROC | AUPRO | best IoU | image AUROC |",
             "|---|---|---|---:|---:|---:|---:|"]
    for name, result in results.items():
        for kind in result["model"]:
            for method in ("model", "floor"):
                row = result[method].get(kind, {})
                label = "anoseg" if method == "model" else "Gaussian"
                lines.append(f"| {name} | {kind} | {label} | "
                             + " | ".join(_fmt(row.get(k)) for k in KEYS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--budget", type=float, default=1200.0,
                        help="training seconds per set (all seeds together)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--real-root", default="../shared/data/real")
    parser.add_argument("--suite-root", default="runs/suite_data")
    parser.add_argument("--sets", nargs="+", default=None,
                        help="only these sets (names as in the table)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--image-size", type=int, default=128,
                        help="resolution of the Gaussian floor (the model uses its config's)")
    args = parser.parse_args()

    sets = {name: (Path(args.real_root), folder) for name, folder in REAL_SETS.items()
            if (Path(args.real_root) / folder).is_dir()}
    suite_root = write_suite(args.suite_root)
    sets.update({name: (suite_root, name) for name in SUITE_CATEGORIES})
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets}
    output = Path(args.output_dir)
    results: Dict[str, Dict] = {}
    for name, (root, category) in sets.items():
        floor_path = output / name / "floor.json"
        if floor_path.is_file():
            floor = json.loads(floor_path.read_text())
        else:
            floor = gaussian_floor(root, category, args.image_size)
            write_json(floor_path, floor)
        start = time.perf_counter()
        runs = train_members(args.config, args.overrides, root, category, args.budget,
                             args.seeds, output / name)
        train_seconds = sum(RunDir(r).read_summary()["train_seconds"] for r in runs)
        scores = model_scores(runs, root, category)
        results[name] = {"model": scores, "floor": floor, "train_seconds": train_seconds}
        print(f"{name}: {time.perf_counter() - start:.0f} s, train {train_seconds:.0f} s; "
              + ", ".join(f"{k} {_fmt(scores['all'][k])} (floor {_fmt(floor['all'][k])})"
                          for k in KEYS), flush=True)
        write_json(output / "suite.json", {"config": args.config,
                                           "overrides": args.overrides,
                                           "budget": args.budget, "seeds": args.seeds,
                                           "results": results})
        atomic_write_text(output / "suite.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
