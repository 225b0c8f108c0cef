"""Baselines users compare against: AdamW / SGD on the factors, LoRA+ and Riemannian-preconditioned LoRA.

LoRA+ and the Riemannian optimizer are PEFT's own (``peft.optimizers``), wrapped rather than re-implemented, so that
comparisons are against the real thing.  The wrappers only add what the library contract needs: named parameter
groups, a closure-accepting ``step`` (Lightning always passes one) and uniform factory signatures.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Tuple, Type

import torch
from torch import nn
from torch.optim import Optimizer

from ..lora.layers import NoLoRALayersError, split_lora_parameters
from .base import named_trainable_parameters

__all__ = [
    "create_adamw_optimizer",
    "create_sgd_optimizer",
    "create_adagrad_optimizer",
    "create_lora_plus_optimizer",
    "create_rplora_optimizer",
    "create_riemannian_sgd_optimizer",
    "create_riemannian_adamw_optimizer",
]


def _named(model: nn.Module):
    named = named_trainable_parameters(model)
    if not named:
        raise ValueError("the model has no trainable parameter (requires_grad=True)")
    return named


def _require_lora(model: nn.Module, what: str) -> list:
    """The model's LoRA layers; raises when there is none."""
    layers = split_lora_parameters(model).layers
    if not layers:
        raise NoLoRALayersError(
            f"{what} found no trainable LoRA layer: wrap the model with peft.get_peft_model(model, LoraConfig(...))"
        )
    return layers


def create_adamw_optimizer(
    model: nn.Module,
    *,
    lr: float,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    fused: Optional[bool] = None,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over every trainable parameter (the usual LoRA baseline).  ``fused=None`` lets torch
    choose; the cost benchmark passes ``fused=True`` on CUDA."""
    return torch.optim.AdamW(_named(model), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)


def create_adagrad_optimizer(
    model: nn.Module, *, lr: float, eps: float = 1e-10, weight_decay: float = 0.0, initial_accumulator_value: float = 0.0
) -> torch.optim.Adagrad:
    """``torch.optim.Adagrad`` over every trainable parameter (LoKO's second baseline, arXiv 2410.11551)."""
    return torch.optim.Adagrad(
        _named(model), lr=lr, eps=eps, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value
    )


def create_sgd_optimizer(
    model: nn.Module, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
) -> torch.optim.SGD:
    """``torch.optim.SGD`` over every trainable parameter ("LoRA-SGD")."""
    return torch.optim.SGD(_named(model), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


def _accept_closure(optimizer: Optimizer) -> Optimizer:
    """Let ``step(closure)`` run the closure first and then the wrapped step without it.

    PEFT's Riemannian optimizer rejects closures because a closure run *inside* the base step would overwrite the
    preconditioned gradients; running it before preconditioning is exactly right, and Lightning needs it.
    """
    base_cls = type(optimizer)

    class ClosureFirst(base_cls):  # type: ignore[misc, valid-type]
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            super().step()
            return loss

    ClosureFirst.__name__ = ClosureFirst.__qualname__ = base_cls.__name__
    optimizer.__class__ = ClosureFirst
    return optimizer


def _name_groups(optimizer: Optimizer, model: nn.Module) -> Optimizer:
    """Attach ``param_names`` to groups built from bare tensors, so checkpoints carry names."""
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        if "param_names" not in group:
            group["param_names"] = [names.get(id(p), "") for p in group["params"]]
    return optimizer


def _optimizer_class(optimizer_cls: Any) -> Type[Optimizer]:
    if isinstance(optimizer_cls, str):
        table = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW, "adam": torch.optim.Adam}
        if optimizer_cls.lower() not in table:
            raise ValueError(f"optimizer_cls must be one of {sorted(table)} or an Optimizer subclass")
        return table[optimizer_cls.lower()]
    if not (inspect.isclass(optimizer_cls) and issubclass(optimizer_cls, Optimizer)):
        raise TypeError(f"optimizer_cls must be a torch.optim.Optimizer subclass, got {optimizer_cls!r}")
    return optimizer_cls


def create_lora_plus_optimizer(
    model: nn.Module,
    *,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    optimizer_cls: Any = "adamw",
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> Optimizer:
    """LoRA+ (Hayou et al. 2024, arXiv 2402.12354): ``lora_B`` at ``lr * loraplus_lr_ratio``.  This is PEFT's
    ``create_loraplus_optimizer``; extra keyword arguments go to the base optimizer (AdamW by default)."""
    from peft.optimizers import create_loraplus_optimizer

    _require_lora(model, "LoRA+")
    optimizer = create_loraplus_optimizer(
        model, _optimizer_class(optimizer_cls), lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=loraplus_weight_decay, loraplus_lr_embedding=loraplus_lr_embedding, **kwargs,
    )
    return _name_groups(optimizer, model)


def create_rplora_optimizer(
    model: nn.Module, optimizer_cls: Any = "sgd", *, lr: float, reg: float = 1e-2, **kwargs: Any
) -> Optimizer:
    """Riemannian-preconditioned LoRA (Zhang & Pilanci 2024, arXiv 2402.02347; reference code
    github.com/pilancilab/Riemannian_Preconditioned_LoRA): ``g_A <- (B^T B + reg I)^-1 g_A``,
    ``g_B <- g_B (A A^T + reg I)^-1``, then ``optimizer_cls``.  This is PEFT's ``create_riemannian_optimizer``
    (which preconditions the raw factors, i.e. assumes LoRA scaling 1), made closure-friendly.
    """
    from peft.optimizers import create_riemannian_optimizer

    _require_linear_factors(_require_lora(model, "Riemannian LoRA"))
    optimizer = create_riemannian_optimizer(model, _optimizer_class(optimizer_cls), lr=lr, reg=reg, **kwargs)
    return _accept_closure(_name_groups(optimizer, model))


def _require_linear_factors(layers: list) -> None:
    """PEFT preconditions only 2-D ``lora_A``/``lora_B`` pairs and leaves any other adapter to the plain inner
    optimizer without saying so; a comparison would then mix two methods.  Refuse instead."""
    other = [f"{layer.prefix} ({tuple(layer.A.shape)})" for layer in layers if layer.A.dim() != 2 or layer.B.dim() != 2]
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise ValueError(
            f"Riemannian LoRA (PEFT's create_riemannian_optimizer) preconditions only linear adapters with 2-D "
            f"lora_A/lora_B, but {len(other)} adapter(s) have other shapes: {shown}. It would train them "
            "unpreconditioned. Leave those modules out of LoraConfig(target_modules=...), or use 'psi-lora' / "
            "'scaled-psi-lora', which handle 1x1-conv adapters."
        )


def create_riemannian_sgd_optimizer(
    model: nn.Module, *, lr: float, reg: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0
) -> Optimizer:
    """RPLoRA with SGD (ScaledGD / PrecGD on the factors)."""
    return create_rplora_optimizer(model, "sgd", lr=lr, reg=reg, momentum=momentum, weight_decay=weight_decay)


def create_riemannian_adamw_optimizer(
    model: nn.Module,
    *,
    lr: float,
    reg: float = 1e-2,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> Optimizer:
    """RPLoRA with AdamW ("scaled AdamW")."""
    return create_rplora_optimizer(
        model, "adamw", lr=lr, reg=reg, betas=betas, eps=eps, weight_decay=weight_decay
    )
