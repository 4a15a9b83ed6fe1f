"""Many runs, one per category: train, evaluate, train and score detectors, skipping what is
finished and resuming what was interrupted; then the summary tables
(:func:`anoseg.reporting.build_tables`). ``scripts/run_categories.py`` and
``scripts/run_ablations.py`` parse their arguments and call this module.

Example:
    >>> job = Job(Path("/data/mvtec_ad"), Path("runs/mvtec"), ["configs/cpu_small.yaml"])
    >>> statuses = run_job(job, ["bottle"])                 # doctest: +SKIP
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from anoseg.atomic import atomic_write_text, read_json, write_json
from anoseg.config import AnoSegConfig, config_diff, load_config, runtime_keys
from anoseg.errors import AnoSegError, ConfigError, DataError
from anoseg.reporting import ablation_markdown, build_tables, csv_text, fmt, table3, table5
from anoseg.results import CategoryResult
from anoseg.run_dir import DETECTOR_DIR, DetectorDir, RunDir

PathLike = Union[str, Path]

DETECTOR_AUROC_FILE = "image_auroc.json"
"""Written into a detector folder: the detector's image AUROC on the test set."""
LOGS_DIR = "logs"
"""``OUTPUT_DIR/logs/<category>.log``: output of the per-GPU subprocesses."""

IGNORED_DIFFERENCES = ("data.root",)
"""Besides the run-time keys: the data root is given anew on every call (a moved dataset is not
another run)."""

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
        return RunDir(run_dir).detector_variant(self.name).path


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


def config_differences(run_dir: Path, cfg: AnoSegConfig) -> List[str]:
    """Keys (other than the run-time keys, :func:`anoseg.config.runtime_keys`, and
    :data:`IGNORED_DIFFERENCES`) whose value in ``run_dir/config.yaml`` differs from ``cfg``;
    empty if the run has no saved config."""
    path = RunDir(run_dir).config
    if not path.is_file():
        return []
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ["config.yaml (unreadable)"]
    return sorted(config_diff(saved, cfg.to_dict(),
                              skip=runtime_keys() + IGNORED_DIFFERENCES))


# ------------------------------------------------------------------------------ run state


def training_completed(folder: Path) -> bool:
    """Whether ``folder/summary.json`` (a run or detector folder) says ``stopped: completed``."""
    return DetectorDir(folder).is_complete()


def segmenter_step(run_dir: Path) -> Optional[int]:
    """The step of the run's last training (from ``summary.json``), if any."""
    return RunDir(run_dir).trained_steps()


def category_metrics(run_dir: Path) -> Optional[Dict[str, Any]]:
    """The run's evaluation result (its only category in ``eval/metrics.json``), if any."""
    metrics = RunDir(run_dir).eval_metrics()
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
    summary = DetectorDir(det_dir).read_summary()
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
    resume = RunDir(run_dir).has_checkpoint()
    if resume:
        print(f"  resuming {run_dir} from its last checkpoint")
    result = train(cfg, run_dir, resume=resume, progress=progress)
    print(f"  trained {run_dir}: {result.stopped} at step {result.steps} "
          f"({result.train_seconds:.1f} s)")
    return result.stopped


def evaluate_segmenter(run_dir: Path, data_root: PathLike, *, device: Optional[str],
                       progress: bool) -> CategoryResult:
    """``anoseg-eval --run RUN_DIR`` into ``RUN_DIR/eval``; returns the category's metrics."""
    from anoseg.evaluation import evaluate_run

    report = evaluate_run(run_dir, data_root=data_root, output_dir=RunDir(run_dir).eval_dir,
                          device=device, progress=progress)
    return next(iter(report.results.values()))


def train_detector_stage(run_dir: Path, spec: DetectorSpec, overrides: Sequence[str], *,
                         progress: bool) -> str:
    """Train (or resume) one detector on the finished segmenter ``run_dir``."""
    from anoseg.detector_training import train_detector

    det_dir = spec.directory(run_dir)
    if training_completed(det_dir):
        return "completed"
    resume = DetectorDir(det_dir).has_checkpoint()
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
    from anoseg.errors import CheckpointError
    from anoseg.evaluation import detector_image_auroc as score_detector
    from anoseg.inference import detector_step_mismatch, load_detector, load_model
    from anoseg.runtime import resolve_device

    torch_device = resolve_device(device)
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
    summary = DetectorDir(det_dir).read_summary() or {}
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


def category_command(script: Path, job: Job, category: str) -> List[str]:
    """The command line running one category of ``job`` with ``script`` (``run_categories.py``)
    in a subprocess (no tables)."""
    command = [sys.executable, str(script), "--data-root", str(job.data_root),
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
                command_for: Callable[[Job, str], List[str]],
                poll_seconds: float = 2.0) -> Dict[str, str]:
    """Run each category as a subprocess (``command_for(job, category)``, a command line
    running that one category) with ``CUDA_VISIBLE_DEVICES`` set to one GPU, at most one
    category per GPU at a time.

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
                process = subprocess.Popen(command_for(job, category), stdout=log,
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


ABLATION_MARKDOWN = "ablations.md"
TABLE3_CSV = "table3_ablation.csv"
TABLE5_CSV = "table5_ablation.csv"
"""Files of :func:`write_ablation_tables`."""


def write_ablation_tables(output_dir: Path, categories: Sequence[str],
                          segmenters: Dict[str, str],
                          detectors: Sequence[Tuple[DetectorSpec, str]] = ()
                          ) -> Tuple[str, List[Path]]:
    """Write ``ablations.md`` and the CSV files of Table 3 and (with ``detectors``) Table 5.

    Args:
        output_dir: Holds a folder per configuration, ``<configuration>/<category>``.
        categories: The rows.
        segmenters: Configuration name -> Table 3 column header; the last is the full
            segmenter, on which the ``detectors`` were trained.
        detectors: (detector variant, Table 5 column header) pairs.

    Returns:
        ``(markdown text, paths written)``.
    """
    full = list(segmenters)[-1]
    tables = [(table3(categories, {name: {c: category_metrics(output_dir / name / c) or {}
                                          for c in categories} for name in segmenters},
                      segmenters), TABLE3_CSV)]
    if detectors:
        values = {spec.name: {c: (detector_auroc_record(output_dir / full / c, spec)
                                  or {}).get("image_auroc") for c in categories}
                  for spec, _ in detectors}
        tables.append((table5(categories, values, {spec.name: title for spec, title in detectors},
                              full), TABLE5_CSV))
    markdown = ablation_markdown(output_dir, categories, [table for table, _ in tables])
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [output_dir / ABLATION_MARKDOWN]
    atomic_write_text(paths[0], markdown)
    for table, name in tables:
        paths.append(output_dir / name)
        atomic_write_text(paths[-1], csv_text(table.csv_headers, table.csv_rows))
    return markdown, paths


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


def run_job(job: Job, categories: Sequence[str], gpus: Optional[Sequence[str]] = None,
            command_for: Optional[Callable[[Job, str], List[str]]] = None) -> Dict[str, str]:
    """Run ``categories`` of ``job``, sequentially or (``gpus``) one per GPU, each category
    a subprocess ``command_for(job, category)``."""
    check_categories(job.data_root, categories)
    job.output_dir.mkdir(parents=True, exist_ok=True)
    if gpus:
        if command_for is None:
            raise ConfigError("running on several GPUs needs the command line of one category")
        return run_on_gpus(job, categories, list(gpus), command_for)
    return run_sequentially(job, categories)


def exit_status(statuses: Dict[str, str]) -> int:
    """0 if every category is done or skipped, 130 if interrupted, else 1."""
    if any(s == "interrupted" for s in statuses.values()):
        return EXIT_INTERRUPTED
    if all(s in ("done", "skipped") for s in statuses.values()):
        return EXIT_OK
    return EXIT_FAILED
