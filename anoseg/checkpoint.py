"""Checkpoints: plain dicts written atomically, and the run folder layout.

A run folder holds::

    config.yaml         the resolved configuration
    split.json          which train/good images were trained on and which were held out
    losses.jsonl        one JSON object per logged step
    checkpoints/last.pt the latest checkpoint (a plain dict, see :func:`save_checkpoint`)
    summary.json        steps, images seen, seconds, why the run stopped
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Union

import torch

from anoseg.errors import CheckpointError

CHECKPOINT_FORMAT = 1
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"


def atomic_write_bytes(path: Union[str, Path], writer) -> None:
    """Call ``writer(file)`` on a temporary file beside ``path``, fsync, then rename.

    A crash at any moment leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(path: Union[str, Path], state: Dict[str, Any]) -> None:
    """Write ``state`` (a plain dict of tensors, numbers, strings) atomically with torch.save."""
    state = dict(state, format=CHECKPOINT_FORMAT)
    atomic_write_bytes(path, lambda handle: torch.save(state, handle))


def resolve_checkpoint(path: Union[str, Path]) -> Path:
    """Accept a checkpoint file or a run folder (then its ``checkpoints/last.pt``)."""
    path = Path(path)
    if path.is_dir():
        candidate = path / LAST_CHECKPOINT
        if not candidate.is_file():
            raise CheckpointError(f"run folder {path} has no checkpoint {LAST_CHECKPOINT}: "
                                  "was training started there?")
        return candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (expected a .pt file or a "
                              "run folder)")
    return path


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint dict written by :func:`save_checkpoint` (file or run folder)."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or "generator" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an anoseg checkpoint (no generator/config)")
    if state.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer anoseg (format "
                              f"{state['format']}); upgrade anoseg to read it")
    return state


def write_json(path: Union[str, Path], data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
