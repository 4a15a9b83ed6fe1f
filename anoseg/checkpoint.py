"""Checkpoints: plain dicts written atomically with ``torch.save`` (the folder they live in is
:mod:`anoseg.run_dir`'s)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Union

import torch

from anoseg.atomic import atomic_write_bytes
from anoseg.errors import CheckpointError, OutputError
from anoseg.run_dir import LAST_CHECKPOINT

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: Union[str, Path], state: Dict[str, Any]) -> None:
    """Write ``state`` (a plain dict of tensors, numbers, strings) atomically with torch.save.

    Raises:
        OutputError: the write failed (disk full, permission, ...); the message names the path.
            The file that was there before (if any) is unchanged and no temporary is left.
    """
    state = dict(state, format=CHECKPOINT_FORMAT)
    path = Path(path)
    try:
        atomic_write_bytes(path, lambda handle: torch.save(state, handle))
    except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as RuntimeError
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        kept = (f"the previous checkpoint {path.name} is unchanged" if path.is_file()
                else "no checkpoint was written")
        raise OutputError(f"cannot write checkpoint {path}: {reason}; {kept}. Free disk space "
                          "or fix the folder's permissions, then continue with --resume"
                          ) from None


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


def _short_reason(exc: BaseException) -> str:
    """One line of ``exc``'s text (torch.load's weights-only errors run over several)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].split("Check the documentation", 1)[0].strip()
    return text if len(text) <= 200 else text[:197] + "..."


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint dict written by :func:`save_checkpoint` (file or run folder)."""
    path = resolve_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt, truncated, not a torch file
        raise CheckpointError(f"cannot read checkpoint {path}: {_short_reason(exc)}; it is "
                              "truncated, corrupt or not a checkpoint written by anoseg"
                              ) from None
    if not isinstance(state, dict) or "generator" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an anoseg checkpoint (no generator/config)")
    if state.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer anoseg (format "
                              f"{state['format']}); upgrade anoseg to read it")
    return state
