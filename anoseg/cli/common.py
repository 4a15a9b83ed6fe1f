"""Shared pieces of the command-line tools."""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from anoseg.errors import AnoSegError


def run_cli(main: Callable[[Optional[Sequence[str]]], int],
            argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main``; bad input prints one clear line (no traceback) and exits with status 2."""
    try:
        return main(argv)
    except AnoSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
