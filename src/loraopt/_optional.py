"""Imports of optional dependencies (the extras of ``pyproject.toml``) that name the extra when it is missing."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import ``module`` for ``what`` (e.g. ``"lora-plus"``); if its package is missing, raise
    :class:`MissingExtraError` saying ``pip install "loraopt[extra]"``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = (error.name or module).split(".")[0]
        raise MissingExtraError(
            f"{what} needs the '{extra}' extra ({missing} is not installed): pip install \"loraopt[{extra}]\""
        ) from error
