"""The run folder: every file name of a run, in one place.

A segmenter run folder holds::

    config.yaml          the resolved configuration
    split.json           which train/good images were trained on and which were held out
    losses.jsonl         one JSON object per logged step
    checkpoints/last.pt  the latest checkpoint (a plain dict, :mod:`anoseg.checkpoint`)
    train.lock           while a training runs there: its pid and host (:class:`StageLock`)
    summary.json         steps, images seen, seconds, why the run stopped
    eval/                anoseg-eval's default output (metrics.json, .csv, .md, ...)
    detector/            the image-level detector: last.pt, config.yaml, losses.jsonl,
                         summary.json
    detectors/<name>/    named detector variants (scripts/run_ablations.py)
    export/              anoseg-export's default output (anoseg.onnx, anoseg.torchscript.pt)
    tensorboard/         TensorBoard event files (train.logger=tensorboard)

Example:
    >>> run = RunDir("runs/demo")
    >>> str(run.checkpoint)
    'runs/demo/checkpoints/last.pt'
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from anoseg.atomic import read_json, write_json
from anoseg.errors import DataError, OutputError, RunInUseError

PathLike = Union[str, Path]

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
LOSSES_FILE = "losses.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "last.pt"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = "train.lock"
"""Held by the training that writes a stage folder (pid and host, JSON); removed at its end."""
LAST_CHECKPOINT = Path(CHECKPOINTS_DIR) / CHECKPOINT_FILE
"""A segmenter run's checkpoint, relative to its folder."""
EVAL_DIR = "eval"
"""Evaluation folder inside a run (``anoseg-eval``'s default)."""
METRICS_STEM = "metrics"
METRICS_FILE = f"{METRICS_STEM}.json"
EXPORT_DIR = "export"
"""``anoseg-export``'s default folder inside a run."""
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard event files of a run trained with ``train.logger=tensorboard``."""
DETECTOR_DIR = "detector"
"""The detector's folder inside a run (where ``anoseg-eval`` / ``anoseg-predict`` look)."""
DETECTOR_VARIANTS_DIR = "detectors"
"""Folder inside a run for named detector variants."""
COMPLETED = "completed"
"""``summary.json``'s ``stopped`` when training ran all its steps."""


class StageDir:
    """The files every training stage writes (the segmenter run, a detector folder)."""

    checkpoint_name: Path = Path(CHECKPOINT_FILE)

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.path == self.path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def losses(self) -> Path:
        return self.path / LOSSES_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / self.checkpoint_name

    @property
    def lock(self) -> Path:
        return self.path / LOCK_FILE

    def has_checkpoint(self) -> bool:
        return self.checkpoint.is_file()

    def stale_temporaries(self) -> List[Path]:
        """Temporary checkpoint files (``.last.pt.*.tmp``) left by a process killed while it
        wrote the checkpoint (:func:`anoseg.atomic.atomic_write_bytes` removes its own
        otherwise)."""
        folder = self.checkpoint.parent
        if not folder.is_dir():
            return []
        return sorted(folder.glob(f".{self.checkpoint.name}.*.tmp"))

    def read_summary(self) -> Optional[Dict[str, Any]]:
        """``summary.json``, or ``None`` when it is missing or unreadable."""
        return read_json(self.summary)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        write_json(self.summary, summary)

    def is_complete(self) -> bool:
        """Whether ``summary.json`` says training ran all its steps (``stopped: completed``)."""
        summary = self.read_summary()
        return summary is not None and summary.get("stopped") == COMPLETED

    def trained_steps(self) -> Optional[int]:
        """The step of the last training (from ``summary.json``), if any."""
        summary = self.read_summary()
        return int(summary["steps"]) if summary and "steps" in summary else None


class DetectorDir(StageDir):
    """A detector folder: ``last.pt`` beside its config, log and summary."""


class RunDir(StageDir):
    """A segmenter run folder (see the module docstring for its layout)."""

    checkpoint_name = LAST_CHECKPOINT

    @classmethod
    def of_checkpoint(cls, checkpoint_path: PathLike) -> Optional["RunDir"]:
        """The run folder of ``<run>/checkpoints/<file>.pt``, or ``None`` for a loose file."""
        path = Path(checkpoint_path)
        if path.parent.name == CHECKPOINTS_DIR:
            return cls(path.parent.parent)
        return None

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    @property
    def metrics(self) -> Path:
        return self.eval_dir / METRICS_FILE

    @property
    def detector(self) -> DetectorDir:
        return DetectorDir(self.path / DETECTOR_DIR)

    def detector_variant(self, name: str) -> DetectorDir:
        """``detectors/<name>``, or the main ``detector/`` for ``name == "detector"``."""
        if name == DETECTOR_DIR:
            return self.detector
        return DetectorDir(self.path / DETECTOR_VARIANTS_DIR / name)

    def write_split(self, meta: "DataRecord") -> None:
        write_json(self.split_file, {"data_root": meta.data_root, **meta.split.to_dict()})

    def read_split(self) -> Optional["DataRecord"]:
        """``split.json`` as a :class:`DataRecord`, ``None`` when there is none.

        Raises:
            DataError: the file exists but cannot be read.
        """
        if not self.split_file.is_file():
            return None
        try:
            raw = json.loads(self.split_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read {self.split_file}: {exc}") from None
        return DataRecord(TrainingSplit.from_dict(raw), raw.get("data_root"))

    def eval_metrics(self) -> Optional[Dict[str, Any]]:
        """``eval/metrics.json``, or ``None``."""
        return read_json(self.metrics)


def ensure_folder(path: PathLike, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) as a folder, or raise :class:`OutputError` naming it:
    it or a parent is a file, or it cannot be created (permission, read-only disk)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            if candidate == path:
                raise OutputError(f"{what} {path} is a file; expected a folder (or a path "
                                  "that does not exist yet): choose another --output-dir")
            raise OutputError(f"{what} {path} cannot be created: {candidate} is a file")
        if candidate.is_dir():
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {what} {path}: {exc.strerror or exc}") from None
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


class StageLock:
    """The lock file of a stage folder (``train.lock``), held while a training writes there.

    ``with StageLock(folder):`` creates the folder if needed, writes ``{"pid", "host",
    "started"}`` to ``train.lock`` with an exclusive create, removes checkpoint temporaries a
    killed run left behind, and on exit (normal end, exception, Ctrl-C) removes the lock and,
    if the folder was created here and stayed empty, the folder. A lock whose process is gone
    (same host, pid not alive: a run killed with SIGKILL) is taken over.

    Raises:
        RunInUseError: a live process (or one on another host) holds the lock.
        OutputError: the folder is a file or cannot be written.
    """

    def __init__(self, folder: "StageDir", enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self.host = socket.gethostname()
        self._created = False
        self._held = False
        self.removed_temporaries: List[Path] = []

    def __enter__(self) -> "StageLock":
        if not self.enabled:
            return self
        path = self.folder.path
        self._created = not path.exists()
        ensure_folder(path)
        for _ in range(3):
            if self._try_create():
                break
            self._check_holder()  # raises unless the holder is gone; then retry
        else:
            raise RunInUseError(f"cannot take the lock {self.folder.lock}: it keeps "
                                "reappearing; is another training starting there?")
        self._held = True
        for tmp in self.folder.stale_temporaries():
            try:
                tmp.unlink()
                self.removed_temporaries.append(tmp)
            except OSError:
                pass
        return self

    def _try_create(self) -> bool:
        text = json.dumps({"pid": os.getpid(), "host": self.host, "started": time.time()})
        try:
            fd = os.open(self.folder.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise OutputError(f"cannot write the lock file {self.folder.lock}: "
                              f"{exc.strerror or exc}") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(text + "\n")
        return True

    def _check_holder(self) -> None:
        """Remove a stale lock; raise :class:`RunInUseError` for a live one."""
        lock = self.folder.lock
        holder = read_json(lock)
        if holder is None:  # unreadable: being written right now, or cut by a crash
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                return
            if age < 5.0:
                time.sleep(0.5)
                holder = read_json(lock)
        if holder is not None:
            pid, host = holder.get("pid"), holder.get("host")
            if host != self.host:
                raise RunInUseError(
                    f"{self.folder.path} is in use by a training on host {host} (pid {pid}), "
                    f"see {lock}; if that run is not running any more, delete the lock file "
                    "and continue with --resume")
            if isinstance(pid, int) and _pid_alive(pid):
                raise RunInUseError(
                    f"{self.folder.path} is in use: a training (pid {pid} on {host}) is "
                    f"writing there (lock file {lock}); wait for it to end, stop it, or "
                    "choose another --output-dir")
            print(f"taking over the stale lock {lock} of pid {pid} (no such process)")
        try:
            lock.unlink()
        except FileNotFoundError:
            pass

    def __exit__(self, *exc) -> None:
        if not self._held:
            return
        self._held = False
        holder = read_json(self.folder.lock)
        if holder is not None and holder.get("pid") == os.getpid():
            try:
                self.folder.lock.unlink()
            except OSError:
                pass
        if self._created:
            try:
                self.folder.path.rmdir()  # only when empty: a run that failed before writing
            except OSError:
                pass


def safe_name(text: str) -> str:
    """``text`` as a file name: letters, digits and ``-_.`` kept, anything else ``_``."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


# --------------------------------------------------------------------------- checkpoint meta


@dataclass
class TrainingSplit:
    """The seeded split of ``train/good``: images trained on and held-out normal images."""

    train: List[str] = field(default_factory=list)
    holdout: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, List[str]]:
        return {"train": list(self.train), "holdout": list(self.holdout)}

    @classmethod
    def from_dict(cls, raw: Dict[str, Any]) -> "TrainingSplit":
        return cls(list(raw.get("train") or []), list(raw.get("holdout") or []))


@dataclass
class DataRecord:
    """What a segmenter checkpoint records about its data (keys ``split`` and ``data_root``)."""

    split: TrainingSplit
    data_root: Optional[str] = None

    def to_checkpoint(self) -> Dict[str, Any]:
        """The checkpoint entries (``split``, ``data_root``)."""
        return {"split": self.split.to_dict(), "data_root": self.data_root}

    @classmethod
    def from_checkpoint(cls, ckpt: Dict[str, Any]) -> Optional["DataRecord"]:
        """The record of ``ckpt``, or ``None`` for a checkpoint without a split."""
        split = ckpt.get("split")
        if not isinstance(split, dict):
            return None
        return cls(TrainingSplit.from_dict(split), ckpt.get("data_root"))
