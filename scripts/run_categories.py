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
import csv
import io
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import yaml

from anoseg import paper_results as paper
from anoseg.checkpoint import LAST_CHECKPOINT, atomic_write_text, write_json
from anoseg.config import MVTEC_CATEGORIES, AnoSegConfig, load_config
from anoseg.errors import AnoSegError, ConfigError, DataError

PathLike = Union[str, Path]

SCRIPT = Path(__file__).resolve()
EVAL_DIR = "eval"
"""Evaluation folder inside a run (``anoseg-eval``'s default)."""
DETECTOR_DIR = "detector"
"""The ``--detector`` folder inside a run (where ``anoseg-eval`` / ``anoseg-predict`` look)."""
DETECTOR_VARIANTS_DIR = "detectors"
"""Folder inside a run for named detector variants (``--detector-variant``)."""
DETECTOR_AUROC_FILE = "image_auroc.json"
"""Written into a detector folder: the detector's image AUROC on the test set."""
LOGS_DIR = "logs"
"""``OUTPUT_DIR/logs/<category>.log``: output of the per-GPU subprocesses."""
MISSING = "-"
"""Table cell for a value that does not exist (paper has none, run not done, undefined)."""

RUNTIME_KEYS = frozenset({
    "train.steps", "train.time_budget", "train.device", "train.precision", "train.log_every",
    "train.checkpoint_every", "train.deterministic", "data.num_workers", "data.cache_images",
    "data.root", "eval.batch_size", "detector.time_budget", "detector.checkpoint_every"})
"""Keys that may differ between a run's saved config and the requested one without a warning."""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


# ------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DetectorSpec:
    """A detector to train on each segmenter run.

    Attributes:
        name: ``detector`` for the run's main detector (``RUN/detector``, the one ``anoseg-eval``
            uses), else a variant name (``RUN/detectors/<name>``).
        config: YAML applied on top of the run's config (``detector.*`` keys), or ``None``.
    """

    name: str
    config: Optional[str] = None

    def directory(self, run_dir: Path) -> Path:
        """Where this detector's files go inside ``run_dir``."""
        if self.name == DETECTOR_DIR:
            return run_dir / DETECTOR_DIR
        return run_dir / DETECTOR_VARIANTS_DIR / self.name


def category_config(config_paths: Sequence[PathLike], overrides: Sequence[str],
                    data_root: PathLike, category: str,
                    device: Optional[str] = None) -> AnoSegConfig:
    """The config of one category's run: defaults, the config files in order (later ones
    win), the overrides, then ``data.root``, ``data.category`` (and ``train.device``)."""
    # set as values, not as YAML-parsed --set text: a '#' or ':' in a path stays as it is
    fixed: Dict[str, Dict[str, Any]] = {"data": {"root": str(Path(data_root)),
                                                 "category": category}}
    if device is not None:
        fixed["train"] = {"device": device}
    return load_config(config_paths, overrides, values=fixed)


def _flatten(config: Dict[str, Any]) -> Dict[str, Any]:
    return {f"{section}.{key}": value for section, values in config.items()
            for key, value in (values or {}).items()}


def config_differences(run_dir: Path, cfg: AnoSegConfig) -> List[str]:
    """Keys (other than :data:`RUNTIME_KEYS`) whose value in ``run_dir/config.yaml`` differs
    from ``cfg``; empty if the run has no saved config."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    try:
        saved = _flatten(yaml.safe_load(path.read_text()) or {})
    except (OSError, yaml.YAMLError):
        return ["config.yaml (unreadable)"]
    wanted = _flatten(cfg.to_dict())
    return sorted(key for key in set(saved) | set(wanted)
                  if key not in RUNTIME_KEYS and saved.get(key) != wanted.get(key))


# ------------------------------------------------------------------------------ run state


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``, or ``None`` if it is missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def training_completed(folder: Path) -> bool:
    """Whether ``folder/summary.json`` (a run or detector folder) says ``stopped: completed``."""
    summary = read_json(folder / "summary.json")
    return summary is not None and summary.get("stopped") == "completed"


def segmenter_step(run_dir: Path) -> Optional[int]:
    """The step of the run's last training (from ``summary.json``), if any."""
    summary = read_json(run_dir / "summary.json")
    return int(summary["steps"]) if summary and "steps" in summary else None


def category_metrics(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The run's evaluation result (its only category in ``eval/metrics.json``), if any."""
    metrics = read_json(run_dir / EVAL_DIR / "metrics.json")
    categories = (metrics or {}).get("categories") or {}
    if len(categories) != 1:
        return None
    return next(iter(categories.values()))


def evaluation_current(run_dir: Path) -> bool:
    """Whether the run has ``eval/metrics.json`` for its current checkpoint step."""
    result = category_metrics(run_dir)
    if result is None:
        return False
    step = segmenter_step(run_dir)
    return step is None or result.get("checkpoint_step") in (None, step)


def detector_auroc_record(run_dir: Path, spec: DetectorSpec) -> Optional[Dict[str, Any]]:
    """The detector's ``image_auroc.json`` if it matches the detector's and the segmenter's
    current steps, else ``None``."""
    det_dir = spec.directory(run_dir)
    record = read_json(det_dir / DETECTOR_AUROC_FILE)
    summary = read_json(det_dir / "summary.json")
    if record is None or summary is None:
        return None
    if (record.get("detector_step") != summary.get("steps")
            or record.get("anoseg_step") != segmenter_step(run_dir)):
        return None
    return record


def detector_done(run_dir: Path, spec: DetectorSpec) -> bool:
    """Whether the detector finished training and was scored."""
    return (training_completed(spec.directory(run_dir))
            and detector_auroc_record(run_dir, spec) is not None)


def category_done(run_dir: Path, detectors: Sequence[DetectorSpec] = ()) -> bool:
    """A category is done when its run completed training (``summary.json`` says
    ``completed``), its evaluation exists for that checkpoint, and every requested detector
    is trained and scored."""
    return (training_completed(run_dir) and evaluation_current(run_dir)
            and all(detector_done(run_dir, spec) for spec in detectors))


# ------------------------------------------------------------------------------ stages


def train_segmenter(cfg: AnoSegConfig, run_dir: Path, *, progress: bool) -> str:
    """Train (or resume) the run; returns how training stopped (``completed``, ...)."""
    from anoseg.training import train

    if training_completed(run_dir):
        return "completed"
    resume = (run_dir / LAST_CHECKPOINT).is_file()
    if resume:
        print(f"  resuming {run_dir} from its last checkpoint")
    result = train(cfg, run_dir, resume=resume, progress=progress)
    print(f"  trained {run_dir}: {result.stopped} at step {result.steps} "
          f"({result.train_seconds:.1f} s)")
    return result.stopped


def evaluate_segmenter(run_dir: Path, data_root: PathLike, *, device: Optional[str],
                       progress: bool) -> Dict[str, Any]:
    """``anoseg-eval --run RUN_DIR`` into ``RUN_DIR/eval``; returns the category's metrics."""
    from anoseg.evaluation import evaluate_run

    report = evaluate_run(run_dir, data_root=data_root, output_dir=run_dir / EVAL_DIR,
                          device=device, progress=progress)
    return next(iter(report.results.values()))


def train_detector_stage(run_dir: Path, spec: DetectorSpec, overrides: Sequence[str], *,
                         progress: bool) -> str:
    """Train (or resume) one detector on the finished segmenter ``run_dir``."""
    from anoseg.detector import train_detector

    det_dir = spec.directory(run_dir)
    if training_completed(det_dir):
        return "completed"
    resume = (det_dir / "last.pt").is_file()
    result = train_detector(run_dir, overrides, config_path=spec.config, output_dir=det_dir,
                            resume=resume, progress=progress)
    print(f"  trained detector {det_dir}: {result.stopped} at step {result.steps} "
          f"({result.train_seconds:.1f} s)")
    return result.stopped


def detector_image_auroc(run_dir: Path, det_dir: Path, data_root: PathLike, *,
                         device: Optional[str] = None, batch_size: Optional[int] = None
                         ) -> Optional[float]:
    """Image AUROC of a detector's score (paper eq. 5) on the category's test set.

    Args:
        run_dir: The segmenter run the detector was trained on.
        det_dir: The detector folder (holding ``last.pt``).
        data_root: Dataset root in MVTec AD layout.
        device: ``None``/``auto``, ``cpu``, ``cuda``, ...
        batch_size: Test images per forward pass (default: the run's ``eval.batch_size``).

    Returns:
        The AUROC, or ``None`` when the test set lacks good or defective images.

    Raises:
        AnoSegError: Missing checkpoints or data, or a detector of another segmenter step.
    """
    from anoseg.detector import load_detector
    from anoseg.errors import CheckpointError
    from anoseg.evaluation import (detector_image_auroc as score_detector,
                                   detector_step_mismatch, resolve_device_name)
    from anoseg.inference import load_model

    torch_device = resolve_device_name(device)
    model = load_model(run_dir, torch_device)
    detector = load_detector(det_dir, torch_device)
    mismatch = detector_step_mismatch(model, detector, det_dir)
    if mismatch is not None:
        raise CheckpointError(mismatch)
    return score_detector(model, detector, data_root,
                          batch_size=batch_size or model.config.eval.batch_size)


def score_detector_stage(run_dir: Path, spec: DetectorSpec, data_root: PathLike, *,
                         device: Optional[str]) -> Optional[float]:
    """The detector's image AUROC, computed once per (segmenter step, detector step) and kept
    in ``<detector folder>/image_auroc.json``."""
    record = detector_auroc_record(run_dir, spec)
    if record is not None:
        return record.get("image_auroc")
    det_dir = spec.directory(run_dir)
    value = detector_image_auroc(run_dir, det_dir, data_root, device=device)
    summary = read_json(det_dir / "summary.json") or {}
    write_json(det_dir / DETECTOR_AUROC_FILE, {
        "image_auroc": value, "detector": spec.name, "detector_config": spec.config,
        "detector_step": summary.get("steps"), "anoseg_step": segmenter_step(run_dir)})
    return value


# ------------------------------------------------------------------------------ one category


@dataclass
class Job:
    """Everything needed to run the categories of one output folder."""

    data_root: Path
    output_dir: Path
    config_paths: List[str] = field(default_factory=list)
    overrides: List[str] = field(default_factory=list)
    detectors: List[DetectorSpec] = field(default_factory=list)
    device: Optional[str] = None
    progress: bool = True


def run_category(job: Job, category: str) -> str:
    """Train, evaluate and (optionally) train and score detectors for one category.

    Returns:
        ``skipped`` (already done), ``done``, ``incomplete`` (training stopped by a time budget:
        evaluated, resumed next time) or ``interrupted`` (Ctrl-C: stop everything).
    """
    run_dir = job.output_dir / category
    cfg = category_config(job.config_paths, job.overrides, job.data_root, category, job.device)
    differences = config_differences(run_dir, cfg)
    if differences:
        print(f"  warning: {run_dir} was trained with other settings ({', '.join(differences)});"
              " it is kept as it is: delete it or choose another --output-dir to retrain")
    if category_done(run_dir, job.detectors):
        print(f"  {category}: done, skipped")
        return "skipped"

    stopped = train_segmenter(cfg, run_dir, progress=job.progress)
    if stopped in ("interrupted", "stop_at"):
        return "interrupted"
    if not evaluation_current(run_dir):
        print(f"  evaluating {run_dir}")
        evaluate_segmenter(run_dir, job.data_root, device=job.device, progress=job.progress)
    if stopped != "completed":
        print(f"  {category}: training stopped ({stopped}); evaluated the checkpoint, the next "
              "call resumes it")
        return "incomplete"

    detector_overrides = [*job.overrides] + ([f"train.device={job.device}"] if job.device else [])
    for spec in job.detectors:
        det_stopped = train_detector_stage(run_dir, spec, detector_overrides,
                                           progress=job.progress)
        if det_stopped in ("interrupted", "stop_at"):
            return "interrupted"
        if det_stopped != "completed":
            print(f"  {category}: detector {spec.name} stopped ({det_stopped}); the next call "
                  "resumes it")
            return "incomplete"
        value = score_detector_stage(run_dir, spec, job.data_root, device=job.device)
        print(f"  detector {spec.name}: image AUROC {fmt(value)}")
    return "done"


def run_sequentially(job: Job, categories: Sequence[str]) -> Dict[str, str]:
    """Run the categories one after another in this process.

    A category that raises is reported (with its traceback) as ``failed`` and the next one
    starts; Ctrl-C stops after the current training step (checkpoint saved) and skips the rest.
    """
    statuses: Dict[str, str] = {}
    for index, category in enumerate(categories, 1):
        print(f"[{index}/{len(categories)}] {category}")
        try:
            status = run_category(job, category)
        except KeyboardInterrupt:
            status = "interrupted"
        except Exception as exc:  # noqa: BLE001 -- report and go on with the next category
            if isinstance(exc, AnoSegError):
                print(f"  {category}: error: {exc}", file=sys.stderr)
            else:
                traceback.print_exc()
            status = "failed"
        statuses[category] = status
        if status == "interrupted":
            print("interrupted: the checkpoint is saved; run the same command again to resume")
            break
    return statuses


# ------------------------------------------------------------------------------ several GPUs


def child_command(job: Job, category: str) -> List[str]:
    """The command line running one category of ``job`` in a subprocess (no tables)."""
    command = [sys.executable, str(SCRIPT), "--data-root", str(job.data_root),
               "--output-dir", str(job.output_dir), "--categories", category, "--no-tables",
               "--no-progress"]
    for path in job.config_paths:
        command += ["--config", str(Path(path).resolve())]
    for text in job.overrides:
        command += ["--set", text]
    for spec in job.detectors:
        if spec.name == DETECTOR_DIR and spec.config is None:
            command.append("--detector")
        else:
            command += ["--detector-variant",
                        f"{spec.name}={Path(spec.config).resolve()}" if spec.config
                        else spec.name]
    return command


_STATUS_BY_EXIT = {EXIT_OK: "done", EXIT_FAILED: "failed", EXIT_BAD_INPUT: "failed",
                   EXIT_INTERRUPTED: "interrupted"}


def run_on_gpus(job: Job, categories: Sequence[str], gpus: Sequence[str],
                poll_seconds: float = 2.0) -> Dict[str, str]:
    """Run each category as a subprocess of this script with ``CUDA_VISIBLE_DEVICES`` set to
    one GPU, at most one category per GPU at a time.

    Output goes to ``OUTPUT_DIR/logs/<category>.log``. On Ctrl-C (which the children receive
    too, and answer by saving a checkpoint) no new category starts and the running ones are
    waited for.
    """
    pending = [c for c in categories if not category_done(job.output_dir / c, job.detectors)]
    statuses: Dict[str, str] = {c: "skipped" for c in categories if c not in pending}
    for category in statuses:
        print(f"{category}: done, skipped")
    logs_dir = job.output_dir / LOGS_DIR
    logs_dir.mkdir(parents=True, exist_ok=True)
    running: Dict[str, Tuple[str, subprocess.Popen, Any]] = {}
    interrupted = False

    def reap(block: bool) -> None:
        for gpu, (category, process, log) in list(running.items()):
            code = process.wait() if block else process.poll()
            if code is None:
                continue
            log.close()
            del running[gpu]
            statuses[category] = _STATUS_BY_EXIT.get(code, "failed")
            print(f"{category} (GPU {gpu}): {statuses[category]} (exit status {code}); log "
                  f"{logs_dir / (category + '.log')}")

    try:
        while pending or running:
            for gpu in gpus:
                if gpu in running or not pending:
                    continue
                category = pending.pop(0)
                log = open(logs_dir / f"{category}.log", "a")
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
                process = subprocess.Popen(child_command(job, category), stdout=log,
                                           stderr=subprocess.STDOUT, env=env)
                running[gpu] = (category, process, log)
                print(f"{category}: started on GPU {gpu} (pid {process.pid})")
            time.sleep(poll_seconds)
            reap(block=False)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted: waiting for {len(running)} running categories to save and stop")
        while running:
            try:
                reap(block=True)
            except KeyboardInterrupt:
                continue
    for category in pending:
        statuses[category] = "interrupted" if interrupted else "not started"
    return statuses


# ------------------------------------------------------------------------------ tables


def mean_of(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the defined (not ``None``, finite) values, or ``None`` if there are none."""
    defined = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(defined) / len(defined) if defined else None


def fmt(value: Optional[float], digits: int = 3) -> str:
    """A fraction with ``digits`` decimals, or :data:`MISSING`."""
    return MISSING if value is None else f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """CSV with a header line; ``None`` cells are written as :data:`MISSING`."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow([MISSING if cell is None else cell for cell in row])
    return buffer.getvalue()


def paper_mean(table: Dict[str, float], published: float,
               categories: Sequence[str]) -> Tuple[Optional[float], str]:
    """The paper's number for a mean row over ``categories``.

    Returns:
        ``(value, kind)``: the published mean for exactly the 15 MVTec AD categories
        (``published``); the mean of the paper's per-category values when every category has
        one (``subset``); else ``(None, "none")``.
    """
    if set(categories) == set(MVTEC_CATEGORIES):
        return published, "published"
    values = [table.get(c) for c in categories]
    if categories and all(v is not None for v in values):
        return mean_of(values), "subset"
    return None, "none"


@dataclass
class Table:
    """One summary table: Markdown cells plus the same values as numbers for the CSV."""

    title: str
    headers: List[str]
    rows: List[List[str]]
    csv_headers: List[str]
    csv_rows: List[List[Any]]
    notes: List[str] = field(default_factory=list)

    def markdown(self) -> str:
        text = f"## {self.title}\n\n" + markdown_table(self.headers, self.rows)
        if self.notes:
            text += "\n" + "\n".join(f"- {note}" for note in self.notes) + "\n"
        return text


def collect_results(output_dir: Path, categories: Sequence[str],
                    detector: bool = False) -> Dict[str, Dict[str, Any]]:
    """Per category: its ``eval/metrics.json`` values (empty if not evaluated) and
    ``image_auroc_detector`` from a current ``detector/image_auroc.json`` (with ``detector``,
    ``None`` where there is none, so the table gets its detector column)."""
    results: Dict[str, Dict[str, Any]] = {}
    for category in categories:
        run_dir = output_dir / category
        result = dict(category_metrics(run_dir) or {})
        record = detector_auroc_record(run_dir, DetectorSpec(DETECTOR_DIR))
        if record is not None:
            result["image_auroc_detector"] = record.get("image_auroc")
        elif detector:
            result.setdefault("image_auroc_detector", None)
        results[category] = result
    return results


def _metric_rows(categories: Sequence[str], results: Dict[str, Dict[str, Any]],
                 columns: Sequence[Tuple[str, Optional[Dict[str, float]], int]],
                 paper_means: Sequence[Tuple[Optional[float], str]]
                 ) -> Tuple[List[List[str]], List[List[Any]]]:
    """Rows (Markdown, CSV) for ``columns`` = (result key or ``paper:<name>``, paper table,
    digits); a paper column takes its numbers from the table and its mean from ``paper_means``
    (in the order of the paper columns)."""
    md_rows: List[List[str]] = []
    csv_rows: List[List[Any]] = []
    for category in categories:
        md, raw = [category], [category]
        for key, table, digits in columns:
            value = table.get(category) if table is not None else results[category].get(key)
            md.append(fmt(value, digits))
            raw.append(value)
        md_rows.append(md)
        csv_rows.append(raw)
    md, raw = ["**Mean**"], ["mean"]
    paper_iter = iter(paper_means)
    for key, table, digits in columns:
        if table is not None:
            value, _ = next(paper_iter)
        else:
            value = mean_of(results[c].get(key) for c in categories)
        md.append(fmt(value, digits))
        raw.append(value)
    md_rows.append(md)
    csv_rows.append(raw)
    return md_rows, csv_rows


def _mean_notes(categories: Sequence[str], results: Dict[str, Dict[str, Any]],
                keys: Sequence[str], paper_kinds: Sequence[str]) -> List[str]:
    notes = []
    missing = [c for c in categories if results[c].get(keys[0]) is None]
    if missing:
        notes.append(f"Not evaluated or undefined ({MISSING}): {', '.join(missing)}; our means "
                     "average the categories that have a value.")
    if "published" in paper_kinds:
        notes.append("Paper means are the published mean rows (over all 15 MVTec AD "
                     "categories).")
    if "subset" in paper_kinds:
        notes.append("Paper means are the means of the paper's per-category numbers over the "
                     "categories listed here.")
    return notes


def build_tables(categories: Sequence[str], results: Dict[str, Dict[str, Any]]) -> List[Table]:
    """Table 1 (AUROC), Table 2 (IoU) and AUPRO / F1-max, with the paper's numbers beside ours.

    Our image AUROC is the maximum of the anomaly map; the paper's (Table 4) is that of its
    image-level detector, which is in our ``Image AUROC (detector)`` column when the runs have
    one.
    """
    has_detector = any("image_auroc_detector" in results[c] for c in categories)
    pixel_mean = paper_mean(paper.PIXEL_AUROC, paper.PIXEL_AUROC_MEAN, categories)
    image_mean = paper_mean(paper.IMAGE_AUROC, paper.IMAGE_AUROC_MEAN, categories)
    columns: List[Tuple[str, Optional[Dict[str, float]], int]] = [
        ("pixel_auroc", None, 3), ("paper_pixel_auroc", paper.PIXEL_AUROC, 2),
        ("image_auroc", None, 3)]
    headers = ["Category", "Pixel AUROC", "Paper pixel AUROC (Table 1)",
               "Image AUROC (map max)"]
    csv_headers = ["category", "pixel_auroc", "paper_pixel_auroc", "image_auroc"]
    if has_detector:
        columns.append(("image_auroc_detector", None, 3))
        headers.append("Image AUROC (detector)")
        csv_headers.append("image_auroc_detector")
    columns.append(("paper_image_auroc", paper.IMAGE_AUROC, 2))
    headers.append("Paper image AUROC (Table 4)")
    csv_headers.append("paper_image_auroc")
    md_rows, csv_rows = _metric_rows(categories, results, columns, [pixel_mean, image_mean])
    notes = _mean_notes(categories, results, ["pixel_auroc"], [pixel_mean[1], image_mean[1]])
    notes.append("Our image AUROC (map max) scores an image by the maximum of its anomaly map; "
                 "the paper's image AUROC is that of its anomaly detector (section 3.4)"
                 + (", our `Image AUROC (detector)` column." if has_detector
                    else "; run with --detector to train and score ours."))
    table1 = Table("Table 1: pixel-level and image-level AUROC", headers, md_rows,
                   csv_headers, csv_rows, notes)

    iou_mean = ((paper.IOU_MEAN, "published") if set(categories) == set(MVTEC_CATEGORIES)
                else (None, "none"))
    columns = [("iou_pooled_best", None, 3), ("paper_iou", {}, 3),
               ("label_free_iou", None, 3), ("iou_mean_per_image_best", None, 3)]
    md_rows, csv_rows = _metric_rows(categories, results, columns, [iou_mean])
    notes = _mean_notes(categories, results, ["iou_pooled_best"], [iou_mean[1]])
    notes.append("IoU: all test pixels pooled, at the threshold that maximises it (the paper's "
                 "definition); the paper gives only the mean (0.542, Table 2). IoU @ label-free: "
                 "at the threshold chosen on held-out normal images. IoU per image: mean over "
                 "defective images at the best common threshold.")
    table2 = Table("Table 2: IoU", ["Category", "IoU", "Paper IoU (Table 2)",
                                    "IoU @ label-free", "IoU per image"], md_rows,
                   ["category", "iou", "paper_iou", "label_free_iou", "iou_per_image"],
                   csv_rows, notes)

    columns = [("aupro", None, 3), ("pixel_f1_max", None, 3)]
    md_rows, csv_rows = _metric_rows(categories, results, columns, [])
    notes = _mean_notes(categories, results, ["aupro"], [])
    notes.append("The paper reports neither AUPRO (FPR <= 0.3) nor pixel F1-max.")
    table3 = Table("AUPRO and F1-max", ["Category", "AUPRO", "F1-max"], md_rows,
                   ["category", "aupro", "pixel_f1_max"], csv_rows, notes)
    return [table1, table2, table3]


TABLE_FILES = ("table1_auroc.csv", "table2_iou.csv", "aupro_f1.csv")
"""CSV files of :func:`build_tables`' tables, in order; the Markdown goes to ``tables.md``."""


def write_tables(output_dir: Path, categories: Sequence[str],
                 detector: bool = False) -> Tuple[str, List[Path]]:
    """Write ``tables.md`` and the CSV files into ``output_dir``.

    Returns:
        ``(markdown text, paths written)``.
    """
    results = collect_results(output_dir, categories, detector)
    tables = build_tables(categories, results)
    markdown = (f"# AnoSeg on {len(categories)} categories\n\nRuns in `{output_dir}`; values "
                "are fractions (the paper's per-category numbers have two decimals).\n\n"
                + "\n".join(table.markdown() for table in tables))
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / "tables.md"]
    atomic_write_text(paths[0], markdown)
    for table, name in zip(tables, TABLE_FILES):
        paths.append(output_dir / name)
        atomic_write_text(paths[-1], csv_text(table.csv_headers, table.csv_rows))
    return markdown, paths


# ------------------------------------------------------------------------------ command line


def check_categories(data_root: Path, categories: Sequence[str]) -> None:
    """Fail early (before hours of training) on a missing data root or category folder.

    Raises:
        DataError: naming the missing folders.
    """
    if not data_root.is_dir():
        raise DataError(f"data root {data_root} does not exist or is not a folder")
    missing = [c for c in categories if not (data_root / c / "train" / "good").is_dir()]
    if missing:
        raise DataError(f"no <category>/train/good under {data_root} for: {', '.join(missing)}")
    duplicates = sorted({c for c in categories if list(categories).count(c) > 1})
    if duplicates:
        raise ConfigError(f"categories given more than once: {', '.join(duplicates)}")


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


def run_job(job: Job, categories: Sequence[str], gpus: Optional[Sequence[str]] = None
            ) -> Dict[str, str]:
    """Run ``categories`` of ``job``, sequentially or (``gpus``) one per GPU."""
    check_categories(job.data_root, categories)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    if gpus:
        return run_on_gpus(job, categories, list(gpus))
    return run_sequentially(job, categories)


def exit_status(statuses: Dict[str, str]) -> int:
    """0 if every category is done or skipped, 130 if interrupted, else 1."""
    if any(s == "interrupted" for s in statuses.values()):
        return EXIT_INTERRUPTED
    if all(s in ("done", "skipped") for s in statuses.values()):
        return EXIT_OK
    return EXIT_FAILED


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        job = job_from_args(args)
        statuses = run_job(job, args.categories, args.gpus)
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
