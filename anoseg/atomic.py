"""Files written atomically (a crash leaves the old file or the new one, never half of one)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Union


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


def write_json(path: Union[str, Path], data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The JSON object in ``path``, or ``None`` if it is missing or unreadable."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
