"""The development suite: one recipe trained and scored on every real set and every generated
category, against the per-pixel Gaussian floor, with a row per defect type.

``scripts/dev_suite.py`` is its command line. Per set: the Gaussian floor
(:class:`anoseg.baselines.PerPixelGaussian`), training (:func:`train_members`: one run per seed,
sharing one held-out split, the budget split evenly), then one pass over the test set scoring
every pixel, the whole set and each defect type (:func:`score_test_set`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from anoseg.atomic import atomic_write_text, write_json
from anoseg.baselines import PerPixelGaussian
from anoseg.config import load_config
from anoseg.data.mvtec import MVTecTestDataset, list_train_images, load_image
from anoseg.data.suite import SUITE_CATEGORIES, write_suite
from anoseg.metrics import SegmentationMetrics
from anoseg.reporting import fmt, suite_table
from anoseg.run_dir import RunDir

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


def train_once(cfg, run_dir: Union[str, Path], *, progress: bool = False) -> Dict:
    """Train ``run_dir`` unless it already has a ``summary.json`` (any stop reason: a budgeted
    run that spent its budget is done); a checkpoint without a summary (an interrupted run)
    is resumed. Returns the summary."""
    from anoseg.training import train

    run = RunDir(run_dir)
    if run.read_summary() is None:
        train(cfg, run_dir, progress=progress, resume=run.has_checkpoint())
    return run.read_summary()


def train_members(cfg_path: str, overrides: List[str], root: Path, category: str,
                  budget: float, seeds: Sequence[int], run_root: Path) -> List[Path]:
    """One run per seed under ``run_root/s<seed>``, all with the first seed's held-out split
    and ``budget / len(seeds)`` seconds each (:func:`train_once`)."""
    runs = []
    for seed in seeds:
        run_dir = run_root / f"s{seed}"
        runs.append(run_dir)
        cfg = load_config(cfg_path, overrides, values={
            "data": {"root": str(root), "category": category, "split_seed": seeds[0]},
            "train": {"time_budget": budget / len(seeds), "seed": seed}})
        train_once(cfg, run_dir)
    return runs


def train_and_evaluate(data_root: Path, category: str, config: str, overrides: List[str],
                       budget: float, run_dir: Path, progress: bool, seed: int = 0,
                       split_seed: Optional[int] = None) -> Dict:
    """One budgeted run (:func:`train_once`) evaluated with ``anoseg-eval``'s defaults and 6
    pictures into its ``eval/``; the result dict gains ``eval_seconds``, ``steps`` and
    ``train_seconds`` (``scripts/real_data_benchmark.py``)."""
    from anoseg.evaluation import evaluate_run

    data = {"root": str(data_root), "category": category}
    if split_seed is not None:
        data["split_seed"] = split_seed
    cfg = load_config(config, overrides, values={
        "data": data, "train": {"time_budget": budget, "seed": seed}})
    summary = train_once(cfg, run_dir, progress=progress)
    start = time.perf_counter()
    report = evaluate_run(run_dir, output_dir=RunDir(run_dir).eval_dir, progress=progress,
                          pictures=6)
    result = report.results[category].to_dict()
    result["eval_seconds"] = time.perf_counter() - start
    result["steps"] = summary["steps"]
    result["train_seconds"] = summary["train_seconds"]
    return result


def model_scores(runs: List[Path], root: Path, category: str) -> Dict[str, Dict]:
    from anoseg.inference import load_ensemble, predict_anomaly_maps

    model = load_ensemble(runs, "cpu")
    return score_test_set(lambda x: predict_anomaly_maps(model.generator, x), root, category,
                          model.config.data.image_size)


def suite_sets(real_root: Union[str, Path], suite_root: Union[str, Path],
               only: Optional[Sequence[str]] = None) -> Dict[str, Tuple[Path, str]]:
    """Set name -> (data root, category): the real sets found under ``real_root`` and the
    generated categories (written once under ``suite_root``), optionally only ``only``."""
    real_root = Path(real_root)
    sets = {name: (real_root, folder) for name, folder in REAL_SETS.items()
            if (real_root / folder).is_dir()}
    generated = write_suite(suite_root)
    sets.update({name: (generated, name) for name in SUITE_CATEGORIES})
    return {k: v for k, v in sets.items() if not only or k in only}


def run_suite(sets: Dict[str, Tuple[Path, str]], config: str, overrides: Sequence[str], *,
              budget: float, seeds: Sequence[int], output_dir: Union[str, Path],
              image_size: int = 128) -> Dict[str, Dict]:
    """Floor, training and scores for every set; ``suite.json`` and ``suite.md`` in
    ``output_dir`` are rewritten after each set (a finished run is not retrained)."""
    output = Path(output_dir)
    results: Dict[str, Dict] = {}
    for name, (root, category) in sets.items():
        floor_path = output / name / "floor.json"
        if floor_path.is_file():
            floor = json.loads(floor_path.read_text())
        else:
            floor = gaussian_floor(root, category, image_size)
            write_json(floor_path, floor)
        start = time.perf_counter()
        runs = train_members(config, list(overrides), root, category, budget,
                             list(seeds), output / name)
        train_seconds = sum(RunDir(r).read_summary()["train_seconds"] for r in runs)
        scores = model_scores(runs, root, category)
        results[name] = {"model": scores, "floor": floor, "train_seconds": train_seconds}
        print(f"{name}: {time.perf_counter() - start:.0f} s, train {train_seconds:.0f} s; "
              + ", ".join(f"{k} {fmt(scores['all'][k])} (floor {fmt(floor['all'][k])})"
                          for k in KEYS), flush=True)
        write_json(output / "suite.json", {"config": config,
                                           "overrides": list(overrides),
                                           "budget": budget, "seeds": list(seeds),
                                           "results": results})
        atomic_write_text(output / "suite.md", suite_table(results, KEYS))
    return results
