"""One registry for every optimizer: ``create_optimizer(name, model, **hyperparameters)``.

Each entry names a factory ``f(model, **hyperparameters) -> torch.optim.Optimizer`` by import path, so that adding an
optimizer is one line here and importing the registry stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Dict

from torch import nn
from torch.optim import Optimizer

from .checks import check_nonnegative, check_range

__all__ = ["OPTIMIZERS", "load_optimizer", "create_optimizer", "optimizer_hyperparameters"]

_FACTORY_PATHS: Dict[str, str] = {
    "adamw": "loraopt.optim.baselines:create_adamw_optimizer",
    "sgd": "loraopt.optim.baselines:create_sgd_optimizer",
    "adagrad": "loraopt.optim.baselines:create_adagrad_optimizer",
    "lora-plus": "loraopt.optim.baselines:create_lora_plus_optimizer",
    "riemannian-sgd": "loraopt.optim.baselines:create_riemannian_sgd_optimizer",
    "riemannian-adamw": "loraopt.optim.baselines:create_riemannian_adamw_optimizer",
    "psi-lora": "loraopt.optim.psi:create_psi_lora_optimizer",
    "proj-psi-lora": "loraopt.optim.psi:create_proj_psi_lora_optimizer",
    "scaled-psi-lora": "loraopt.optim.psi:create_scaled_psi_lora_optimizer",
    "svdlora": "loraopt.optim.svdlora:create_svdlora_optimizer",
    "loko": "loraopt.optim.loko:create_loko_optimizer",
}


class _LazyRegistry(dict):
    """``{name: factory}``; factories are imported on first access."""

    def __getitem__(self, name: str) -> Callable[..., Optimizer]:
        return load_optimizer(name)

    def values(self):  # pragma: no cover - convenience
        return [load_optimizer(n) for n in self.keys()]

    def items(self):  # pragma: no cover - convenience
        return [(n, load_optimizer(n)) for n in self.keys()]


OPTIMIZERS: Dict[str, Callable[..., Optimizer]] = _LazyRegistry({name: None for name in _FACTORY_PATHS})


def load_optimizer(name: str) -> Callable[..., Optimizer]:
    """The factory registered under ``name`` (case-insensitive; ``_`` and ``-`` are interchangeable)."""
    key = name.lower().replace("_", "-")
    if key not in _FACTORY_PATHS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(sorted(_FACTORY_PATHS))}")
    module, attr = _FACTORY_PATHS[key].split(":")
    return getattr(importlib.import_module(module), attr)


def optimizer_hyperparameters(name: str) -> Dict[str, Any]:
    """``{hyperparameter: default}`` accepted by the factory (``inspect.Parameter.empty`` when required)."""
    factory = load_optimizer(name)
    accepted = {
        p.name: p.default
        for p in list(inspect.signature(factory).parameters.values())[1:]
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
    # A factory that forwards **kwargs to an optimizer class declares it as `forwards_to`.
    target = getattr(factory, "forwards_to", None)
    if target is not None:
        for p in inspect.signature(target.__init__).parameters.values():
            if p.name not in ("self", "params", "model") and p.kind is p.KEYWORD_ONLY:
                accepted.setdefault(p.name, p.default)
    return accepted


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"create_optimizer(name, model, ...) takes the model (an nn.Module, e.g. a PEFT model), got "
            f"{type(model).__name__}; pass the model itself, not model.parameters()"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(
            "the model has no trainable parameter (every requires_grad is False): wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)), or make the adapter trainable again (e.g. "
            "model.set_adapter(name) or requires_grad_(True) on its lora_A/lora_B)"
        )


def _check_group_overrides(hyperparameters: Dict[str, Any]) -> None:
    """The factories put ``other_*`` values into the second parameter group, where the optimizer classes' own
    argument checks do not see them: check them here like the constructor arguments."""
    for key, value in hyperparameters.items():
        if value is None:
            continue  # "same as the LoRA group"
        if key == "lr" or key.endswith("_lr") or key in ("other_weight_decay", "weight_decay"):
            check_nonnegative(key, value)
        elif key == "other_momentum":
            check_range(key, value, 0.0, 1.0)


def create_optimizer(name: str, model: nn.Module, **hyperparameters: Any) -> Optimizer:
    """Build the optimizer ``name`` over the trainable parameters of ``model`` (a PEFT or plain LoRA model).

    Raises ``ValueError`` for an unknown name or a hyperparameter the optimizer does not take, listing the valid ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"create_optimizer(name, model, ...): name must be a string such as 'adamw', got {name!r}")
    factory = load_optimizer(name)
    _check_model(model)
    _check_group_overrides(hyperparameters)
    sig = inspect.signature(factory)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()) and not hasattr(factory, "forwards_to")
    if not takes_any:
        accepted = optimizer_hyperparameters(name)
        unknown = sorted(set(hyperparameters) - set(accepted))
        if unknown:
            raise ValueError(
                f"optimizer {name!r} does not take {', '.join(unknown)}; its hyperparameters are: "
                f"{', '.join(sorted(accepted))}"
            )
    return factory(model, **hyperparameters)
