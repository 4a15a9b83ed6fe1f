"""The optional extras (``pip install 'anoseg-torch[export]'``, ``[tensorboard]``, ``[plot]``):
one check that names the missing package and the command that installs it.

Example:
    >>> require("json", extra="export", feature="anoseg-export")   # a module that is there
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, Sequence

from anoseg.errors import MissingExtraError

EXTRAS: Dict[str, Sequence[str]] = {
    "export": ("onnx", "onnxscript", "onnxruntime"),
    "tensorboard": ("tensorboard",),
    "plot": ("matplotlib",),
}
"""The packages (import names) of each optional extra in ``pyproject.toml``."""


def install_command(extra: str) -> str:
    """The pip command that installs ``extra``."""
    return f"pip install 'anoseg-torch[{extra}]'"


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise one clear line.

    Raises:
        MissingExtraError: ``"<feature> needs the package <module>, which is not installed:
            pip install 'anoseg-torch[<extra>]'"`` (also when importing it fails).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        missing = isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] == top
        reason = "which is not installed" if missing else f"which cannot be imported ({exc})"
        raise MissingExtraError(f"{feature} needs the package {top}, "
                                f"{reason}: {install_command(extra)}") from None


def require_extra(extra: str, feature: str) -> None:
    """:func:`require` every package of :data:`EXTRAS` ``[extra]``."""
    for module in EXTRAS[extra]:
        require(module, extra=extra, feature=feature)
