"""The development suite: one recipe (or several as one ensemble) trained and scored on every
real set and every generated category, against the per-pixel Gaussian floor, with a row per
defect type.

``scripts/dev_suite.py`` is its command line. Per set: the Gaussian floor
(:class:`anoseg.baselines.PerPixelGaussian`), training (:func:`train_members`: one run per seed
of each recipe (:class:`Member`), all sharing one held-out split), then one pass over the test
set scoring every pixel, the whole set and each defect type (:func:`score_test_set`), the runs
joined as one ensemble (:func:`model_scores`).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader

from anoseg.atomic import atomic_write_text, write_json
from anoseg.baselines import PerPixelGaussian
from anoseg.config import image_hw, load_config
from anoseg.errors import ConfigError, DataError
from anoseg.data.geometry import (Geometry, Placement, crop, group_by_shape, match_aspect_canvas,
                                  to_resolution)
from anoseg.data.mvtec import (MVTecTestDataset, collate_samples, image_size_of,
                               list_test_samples, list_train_images, load_placed_image,
                               placement_of)
from anoseg.data.suite import SUITE_CATEGORIES, write_suite
from anoseg.metrics import SegmentationMetrics
from anoseg.reporting import fmt, suite_table
from anoseg.run_dir import RunDir

REAL_SETS = {"bsdata": "bsdata", "deeppcb": "deeppcb", "kolektorsdd": "kolektorsdd"}
KEYS = ("pixel_auroc", "aupro", "iou_pooled_best", "image_auroc")
NUM_THRESHOLDS = 2000


@dataclass(frozen=True)
class Member:
    """One recipe of the suite's model: ``config`` trained once per seed of ``seeds``, each
    run with ``seconds`` of training. Several members are scored as one ensemble
    (:func:`anoseg.load_ensemble`; ``eval.ensemble_combine: auto`` calibrates members of
    several recipes), as the README's real-data recipe is evaluated."""

    config: str
    seconds: float
    seeds: Tuple[int, ...]


def member_root(run_root: Path, members: Sequence[Member], member: Member) -> Path:
    """Where ``member``'s runs go: ``run_root`` itself for a one-recipe model (``s<seed>``
    under it), else ``run_root/<config stem>``."""
    return run_root if len(members) == 1 else run_root / Path(member.config).stem


def check_members(members: Sequence[Member]) -> None:
    """Raises ConfigError for no member, a member without seeds or with a budget that is not
    positive, or two members whose configs share a file name (their runs would share a
    folder)."""
    if not members:
        raise ConfigError("the suite's model needs at least one recipe (--config or --member)")
    stems = [Path(m.config).stem for m in members]
    for member in members:
        if not member.seeds:
            raise ConfigError(f"recipe {member.config} has no seeds")
        if not member.seconds > 0:
            raise ConfigError(f"recipe {member.config}: seconds per seed must be > 0, got "
                              f"{member.seconds}")
        if stems.count(Path(member.config).stem) > 1:
            raise ConfigError(f"two recipes are named {Path(member.config).stem!r}: their runs "
                              "would share a folder; give the configs different file names")


MapFn = Callable[[Any, List[Placement]], List[torch.Tensor]]
"""(canvases, their placements) -> one anomaly map per image, at the scored resolution."""


def score_test_set(map_fn: MapFn, root: Path, category: str, geometry: Any,
                   score_range=(0.0, 1.0), resolution: str = "model") -> Dict[str, Dict]:
    """Overall and per-defect-type metrics of ``map_fn`` (:data:`MapFn`) on the test images
    placed by ``geometry`` (a :class:`~anoseg.data.geometry.Geometry` or a size to stretch
    to), scored at ``resolution`` (``model``: the maps' box of the canvas, padding cut off;
    ``native``: each image's own size, masks read at it)."""
    dataset = MVTecTestDataset(root, category, Geometry.of(geometry),
                               native_masks=resolution == "native")
    types = sorted({s.defect_type for s in dataset.samples} - {"good"})

    def new():
        return SegmentationMetrics(score_range=score_range, num_thresholds=NUM_THRESHOLDS)

    overall, per_type = new(), {t: new() for t in types}
    for batch in DataLoader(dataset, batch_size=16, shuffle=False, collate_fn=collate_samples):
        placements = [placement_of(row) for row in batch["placement"]]
        maps = [m.float().cpu() for m in map_fn(batch["image"], placements)]
        masks = [batch["mask"][i][0] if resolution == "native" else crop(batch["mask"][i][0], p)
                 for i, p in enumerate(placements)]
        labels = np.asarray(batch["label"])
        kinds = np.asarray(batch["defect_type"])
        for group in group_by_shape(maps):
            part_maps = torch.stack([maps[i] for i in group]).numpy()
            part_masks = torch.stack([masks[i] for i in group]).numpy()
            overall.update(part_maps, part_masks, labels=labels[group])
            for t in types:
                keep = (kinds[group] == t) | (kinds[group] == "good")
                if keep.any():
                    per_type[t].update(part_maps[keep], part_masks[keep],
                                       labels=labels[group][keep])
    out = {"all": {k: overall.compute().get(k) for k in KEYS}}
    for t in types:
        result = per_type[t].compute()
        out[t] = {k: result.get(k) for k in KEYS}
    return out


def gaussian_floor(root: Path, category: str, image_size: Any, resize: str = "stretch",
                   resolution: str = "model") -> Dict[str, Dict]:
    """The per-pixel Gaussian's scores: fitted on the training images placed at
    ``image_size`` (a side or ``(height, width)``) by ``resize`` (``stretch`` or
    ``keep_aspect``: the padding is fitted too, and cut off before scoring; ``match_aspect``:
    a stretch onto the canvas a training run would choose for these images), scored at
    ``resolution``."""
    paths = list_train_images(root, category)
    hw = image_hw(image_size)
    if resize == "match_aspect":
        hw, resize = match_aspect_canvas(hw, [image_size_of(p) for p in paths]), "stretch"
    geometry = Geometry(hw, resize)
    canvases = [load_placed_image(p, geometry)[0] for p in paths]
    baseline = PerPixelGaussian.fit(torch.stack(canvases).float() / 255.0)

    def map_fn(images, placements):
        maps = baseline.anomaly_maps(images)
        return [to_resolution(m, p, resolution) for m, p in zip(maps, placements)]

    return score_test_set(map_fn, root, category, geometry, score_range=None,
                          resolution=resolution)


def floor_file(image_size: Any, resize: str, resolution: str) -> str:
    """The cached floor's file name: ``floor.json`` for the default (128, stretch, model),
    else one naming the floor's geometry and resolution."""
    height, width = image_hw(image_size)
    if (height, width, resize, resolution) == (128, 128, "stretch", "model"):
        return "floor.json"
    return f"floor_{height}x{width}_{resize}_{resolution}.json"


def set_signature(root: Union[str, Path], category: str) -> Dict[str, int]:
    """The number of training images and of test images of each type: what a cached floor
    was computed on."""
    counts: Dict[str, int] = {"train/good": len(list_train_images(root, category))}
    for sample in list_test_samples(root, category):
        counts[sample.defect_type] = counts.get(sample.defect_type, 0) + 1
    return counts


def cached_floor(path: Path, root: Union[str, Path], category: str, image_size: Any,
                 resize: str, resolution: str) -> Dict:
    """:func:`gaussian_floor`, cached in ``path`` with the :func:`set_signature` it was
    computed on; a cache of another set (a defect type added, images added or removed) or
    without one (written before the signature) is computed again."""
    signature = set_signature(root, category)
    try:
        cached = json.loads(path.read_text())
        if cached.get("test_set") == signature:
            return cached["floor"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass
    floor = gaussian_floor(root, category, image_size, resize, resolution)
    write_json(path, {"test_set": signature, "floor": floor})
    return floor


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
                  budget: float, seeds: Sequence[int], run_root: Path,
                  split_seed: int = 0) -> List[Path]:
    """One run per seed under ``run_root/s<seed>``, all with the held-out split of
    ``split_seed`` (one split whatever the seeds, so runs of separate calls join as an
    ensemble) and ``budget / len(seeds)`` seconds each (:func:`train_once`)."""
    runs = []
    split = split_seed
    for seed in seeds:
        run_dir = run_root / f"s{seed}"
        runs.append(run_dir)
        cfg = load_config(cfg_path, overrides, values={
            "data": {"root": str(root), "category": category, "split_seed": split},
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


def model_scores(runs: List[Path], root: Path, category: str,
                 resolution: str = "model") -> Dict[str, Dict]:
    """The runs' (one model, or an ensemble) scores at ``resolution``, in their geometry
    (``data.image_size``, ``data.resize``, ``data.tiling``). An ensemble of several recipes is
    calibrated on the held-out images no member trained on first, as ``anoseg-eval`` does."""
    from anoseg.inference import (calibrate_ensemble, ensemble_mode, load_ensemble,
                                  predict_placed)
    from anoseg.threshold import holdout_image_paths

    model = load_ensemble(runs, "cpu")
    if ensemble_mode(model) == "calibrated":
        calibrate_ensemble(model, holdout_image_paths(model, root))
    geometry = Geometry.from_config(model.config.data)

    def map_fn(images, placements):
        return [s.anomaly for s in predict_placed(model.generator, images, placements, geometry,
                                             resolution=resolution)]

    return score_test_set(map_fn, root, category, geometry, resolution=resolution)


def seed_statistics(per_seed: Sequence[Dict[str, Dict]]) -> Tuple[Dict[str, Dict],
                                                                    Dict[str, Dict]]:
    """The mean and the sample standard deviation over seeds of each row and metric of
    :func:`model_scores` results (a metric that is ``None`` for some seed is averaged over the
    others; ``None`` where no seed has it, and a std of ``None`` with fewer than two)."""
    mean: Dict[str, Dict] = {}
    std: Dict[str, Dict] = {}
    for kind in per_seed[0]:
        mean[kind], std[kind] = {}, {}
        for key in per_seed[0][kind]:
            values = [s[kind][key] for s in per_seed if s.get(kind, {}).get(key) is not None]
            mean[kind][key] = statistics.fmean(values) if values else None
            std[kind][key] = statistics.stdev(values) if len(values) > 1 else None
    return mean, std


def _set_scores(members: Sequence[Member], overrides: Sequence[str], root: Path,
                category: str, run_root: Path, resolution: str, separate_seeds: bool,
                split_seed: int = 0) -> Dict[str, Any]:
    """Train and score one set: every member's seeds as one ensemble, or with
    ``separate_seeds`` (one member) one model per seed, scored alone and summarised by
    :func:`seed_statistics`."""
    if not separate_seeds:
        runs: List[Path] = []
        for member in members:
            runs += train_members(member.config, list(overrides), root, category,
                                  member.seconds * len(member.seeds), list(member.seeds),
                                  member_root(run_root, members, member), split_seed=split_seed)
        return {"model": model_scores(runs, root, category, resolution),
                "train_seconds": _train_seconds(runs)}
    (member,) = members
    per_seed, runs = {}, []
    for seed in member.seeds:
        run = train_members(member.config, list(overrides), root, category, member.seconds,
                            [seed], run_root, split_seed=split_seed)
        runs += run
        per_seed[seed] = model_scores(run, root, category, resolution)
    mean, std = seed_statistics(list(per_seed.values()))
    return {"model": mean, "model_std": std,
            "per_seed": {str(seed): scores for seed, scores in per_seed.items()},
            "train_seconds": _train_seconds(runs)}


def _train_seconds(runs: Sequence[Path]) -> float:
    return sum(RunDir(r).read_summary()["train_seconds"] for r in runs)


def suite_sets(real_root: Union[str, Path], suite_root: Union[str, Path],
               only: Optional[Sequence[str]] = None) -> Dict[str, Tuple[Path, str]]:
    """Set name -> (data root, category): the real sets found under ``real_root`` (the known
    ones of :data:`REAL_SETS`, then every other folder with a ``train/good`` folder, by name:
    a user's own category in MVTec layout) and the generated categories (written once under
    ``suite_root``), optionally only ``only``."""
    real_root = Path(real_root)
    sets = {name: (real_root, folder) for name, folder in REAL_SETS.items()
            if (real_root / folder).is_dir()}
    users = [d for d in sorted(real_root.iterdir()) if (d / "train" / "good").is_dir()
             and d.name not in REAL_SETS.values()] if real_root.is_dir() else []
    for folder in users:
        if folder.name in SUITE_CATEGORIES:
            raise DataError(f"real set {folder} has the name of a generated category of the "
                            "suite; rename the folder")
        sets[folder.name] = (real_root, folder.name)
    generated = write_suite(suite_root)
    sets.update({name: (generated, name) for name in SUITE_CATEGORIES})
    return {k: v for k, v in sets.items() if not only or k in only}


def run_suite(sets: Dict[str, Tuple[Path, str]], config: Union[str, Sequence[Member]],
              overrides: Sequence[str], *, budget: float = 1200.0, seeds: Sequence[int] = (0,),
              output_dir: Union[str, Path], image_size: Any = 128,
              floor_resize: str = "stretch", resolution: str = "model",
              separate_seeds: bool = False, split_seed: int = 0) -> Dict[str, Dict]:
    """long: Floor, training and scores for every set; ``suite.json`` and ``suite.md`` in
    ``output_dir`` are rewritten after each set (a finished run is not retrained).

    ``config`` is one recipe's config file, trained for ``budget`` seconds split evenly over
    ``seeds`` (the seeds' ensemble), or a list of :class:`Member` recipes (``budget`` and
    ``seeds`` unused), whose runs are scored as one ensemble. The floor is fitted at
    ``image_size`` with ``floor_resize``; floor and models are scored at ``resolution``
    (``native``: every geometry on the same pixels, comparable). With ``separate_seeds`` (one
    recipe only) every seed is its own model with the whole ``budget`` (the rows are the mean
    over seeds; ``model_std`` and ``per_seed`` hold the spread and each seed's scores), to
    tell a change of recipe from seed noise. Every run holds out the images of
    ``split_seed``.

    Raises:
        ConfigError: bad members (:func:`check_members`), or ``separate_seeds`` with several.
    """
    if isinstance(config, str):
        seeds = tuple(seeds)
        members = [Member(config, budget if separate_seeds else budget / max(len(seeds), 1),
                          seeds)]
    else:
        members = list(config)
    check_members(members)
    if separate_seeds and len(members) > 1:
        raise ConfigError("--separate-seeds takes one recipe (--config), not several members")
    output = Path(output_dir)
    results: Dict[str, Dict] = {}
    for name, (root, category) in sets.items():
        floor = cached_floor(output / name / floor_file(image_size, floor_resize, resolution),
                             root, category, image_size, floor_resize, resolution)
        start = time.perf_counter()
        results[name] = _set_scores(members, overrides, root, category, output / name,
                                    resolution, separate_seeds, split_seed)
        results[name]["floor"] = floor
        scores, train_seconds = results[name]["model"], results[name]["train_seconds"]
        print(f"{name}: {time.perf_counter() - start:.0f} s, train {train_seconds:.0f} s; "
              + ", ".join(f"{k} {fmt(scores['all'][k])} (floor {fmt(floor['all'][k])})"
                          for k in KEYS), flush=True)
        write_json(output / "suite.json", {"members": [asdict(m) for m in members],
                                           "overrides": list(overrides),
                                           "resolution": resolution,
                                           "floor": {"image_size": list(image_hw(image_size)),
                                                     "resize": floor_resize},
                                           "separate_seeds": separate_seeds,
                                           "split_seed": split_seed,
                                           "results": results})
        atomic_write_text(output / "suite.md", suite_table(results, KEYS))
    return results
