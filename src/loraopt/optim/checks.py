"""Argument checks shared by every loraopt optimizer: each raises a ``ValueError`` that names the argument, the
rule and the value it got."""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List

import torch
from torch import nn

__all__ = [
    "check_nonnegative",
    "check_positive",
    "check_range",
    "check_int",
    "check_betas",
    "check_group_hyperparameters",
    "named_trainable_parameters",
    "group_label",
]


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if torch.is_tensor(value):
        return value.numel() == 1 and (value.is_floating_point() or not value.is_complex())
    return isinstance(value, (int, float))


def check_positive(name: str, value: float) -> None:
    if not _is_number(value) or not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not _is_number(value) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_range(name: str, value: float, low: float, high: float, *, high_inclusive: bool = False) -> None:
    ok = _is_number(value) and math.isfinite(float(value)) and low <= value
    ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_int(name: str, value: int, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_betas(name: str, betas: Any) -> None:
    """``betas`` must be a pair of numbers in ``[0, 1)``."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2) with values in [0, 1), e.g. (0.9, 0.999); got {betas!r}")
    check_range(f"{name}[0]", betas[0], 0.0, 1.0)
    check_range(f"{name}[1]", betas[1], 0.0, 1.0)


def check_group_hyperparameters(group: Dict[str, Any], where: str = "param group") -> None:
    """Validate the hyperparameters every optimizer family shares, wherever a group carries them: ``lr``,
    ``weight_decay``, ``momentum``, ``betas`` and ``eps``.  Per-group overrides (the factories' ``other_lr``,
    ``other_weight_decay``, a group passed to ``add_param_group``, a loaded checkpoint) go through here, so a NaN or
    negative value is refused where it enters instead of silently freezing or reversing a group."""
    checks: Dict[str, Callable[[str, Any], None]] = {
        "lr": check_nonnegative,
        "weight_decay": check_nonnegative,
        "momentum": lambda n, v: check_range(n, v, 0.0, 1.0),
        "betas": check_betas,
        "eps": check_nonnegative,
    }
    for key, check in checks.items():
        if key in group:
            try:
                check(key, group[key])
            except ValueError as error:
                raise ValueError(
                    f"{where}: {error}; pass a valid {key} for this group (the factories' other_lr / "
                    "other_weight_decay set the second group's)"
                ) from None


def named_trainable_parameters(model: nn.Module) -> List[tuple]:
    """``[(name, param)]`` for every parameter with ``requires_grad``, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def group_label(group: Dict[str, Any], index: int) -> str:
    name = group.get("name")
    return f"param group {index}" + (f" ({name!r})" if isinstance(name, str) else "")
