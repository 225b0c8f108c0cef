"""Baselines users compare against: AdamW / SGD on the factors, LoRA+ and Riemannian-preconditioned LoRA.

LoRA+ and the Riemannian optimizer are PEFT's own (``peft.optimizers``), wrapped rather than re-implemented, so that
comparisons are against the real thing.  The wrappers only add what the library contract needs: named parameter
groups, a closure-accepting ``step`` (Lightning always passes one), uniform factory signatures, and the library's
reliability rules (the guard below):

* hyperparameters are validated by the factories (a NaN, infinite or negative lr is refused with the argument's name);
* a step is all-or-nothing: a NaN/inf gradient or lr skips the whole step (parameters and state unchanged), counts
  it in ``optimizer.skipped_steps`` and warns (rate-limited); a negative lr at step time raises.  The check costs
  one host synchronisation per step; set ``optimizer.skip_nonfinite = False`` to leave torch's behaviour (NaN
  propagates) and save it;
* ``load_state_dict`` refuses state from another optimizer, another model (other ranks), of the wrong shape or with
  NaN/inf values, and leaves the optimizer unchanged (``loraopt.optim.base.CheckedStateDict``);
* LoRA factors added through ``add_param_group``: LoRA+ warns once (they take the lr you pass, not
  ``lr * loraplus_lr_ratio``), the Riemannian optimizer raises (its preconditioner only knows the pairs it was
  built with).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Dict, FrozenSet, Iterable, Optional, Tuple, Type

import torch
from torch import nn
from torch.optim import Optimizer

from .._optional import require
from ..lora.layers import NoLoRALayersError, is_lora_factor_name, split_lora_parameters
from .base import CheckedStateDict
from .checks import (
    check_betas,
    check_group_hyperparameters,
    check_nonnegative,
    check_positive,
    check_range,
    group_label,
    named_trainable_parameters,
)
from .counters import SkippedStepCounter
from .distributed import all_ranks_true, is_dtensor

__all__ = [
    "create_adamw_optimizer",
    "create_sgd_optimizer",
    "create_adagrad_optimizer",
    "create_lora_plus_optimizer",
    "create_rplora_optimizer",
    "create_riemannian_sgd_optimizer",
    "create_riemannian_adamw_optimizer",
]


# ------------------------------------------------------------------------------------------------- the guard

# Group keys torch fills in itself when a checkpoint lacks them (older torch versions did not save them).
_TORCH_FLAGS = frozenset(
    {"foreach", "maximize", "capturable", "differentiable", "fused", "amsgrad", "decoupled_weight_decay", "nesterov"}
)
# Per-parameter state of torch's SGD / Adam / AdamW / Adagrad that has the parameter's shape.
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum")


class _BaselineGuard(SkippedStepCounter, CheckedStateDict):
    """Mixed into the torch / PEFT optimizer classes the baseline factories return (see the module docstring)."""

    skip_nonfinite = True
    #: set for optimizers that cannot run on DTensor (FSDP2) parameters: the refusal raised by step()
    _sharded_refusal: Optional[str] = None
    _factor_ids: FrozenSet[int] = frozenset()
    _on_factor: Optional[Callable[[Any], None]] = None

    def _required_group_keys(self, group: Dict[str, Any]) -> FrozenSet[str]:
        return frozenset(self.defaults) - _TORCH_FLAGS  # type: ignore[attr-defined]

    def _expected_state_shapes(self, param, group) -> Dict[str, Tuple[int, ...]]:
        shapes: Dict[str, Tuple[int, ...]] = {key: tuple(param.shape) for key in _PARAM_SHAPED}
        shapes["step"] = ()
        return shapes

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            check_group_hyperparameters(param_group, group_label(param_group, len(self.param_groups)))
            params = param_group.get("params")
            params = [params] if torch.is_tensor(params) else list(params or [])
            param_group = {**param_group, "params": params}
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            if self._on_factor is not None and any(id(p) in self._factor_ids for p in tensors):
                self._on_factor(self)
        super().add_param_group(param_group)  # type: ignore[misc]

    def _grads_finite(self) -> bool:
        grads, sharded = [], []
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if is_dtensor(g):  # FSDP2: check this rank's shard, then agree with the other ranks below
                    sharded.append(g)
                    g = g.to_local()
                grads.append(g.coalesce()._values() if g.is_sparse else g)
        # max |g| over every gradient: NaN/inf iff some entry is
        finite = not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"))))
        # One rank skipping while another steps would make the shards of one parameter disagree.
        return all_ranks_true(finite, sharded)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            # Run first: PEFT's Riemannian optimizer rejects closures because one run *inside* the base step would
            # overwrite the preconditioned gradients; running it before is exactly right, and Lightning needs it.
            with torch.enable_grad():
                loss = closure()
        if self._sharded_refusal and any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            # accelerate's FSDP2 preparation swaps sharded parameters into an optimizer built before sharding.
            raise NotImplementedError(self._sharded_refusal)
        if not self._check_step_lrs():
            return loss
        if self.skip_nonfinite and not self._grads_finite():
            self._record_skipped(1, "non-finite gradient")
            return loss
        super().step()  # type: ignore[misc]
        return loss


_GUARDED: Dict[type, type] = {}


def _guarded_class(base_cls: type) -> type:
    cls = _GUARDED.get(base_cls)
    if cls is None:
        qualname = f"_Guarded{base_cls.__name__}"
        cls = type(base_cls.__name__, (_BaselineGuard, base_cls), {"__module__": __name__, "__qualname__": qualname})
        if base_cls.__module__.startswith("torch.optim"):
            globals()[qualname] = cls  # picklable by reference, like the torch class it extends
        _GUARDED[base_cls] = cls
    return cls


def _guard(
    optimizer: Optimizer, tag: str, *, factor_ids: Iterable[int] = (), on_factor: Optional[Callable] = None
) -> Optimizer:
    """Give a torch / PEFT optimizer the library's rules (see the module docstring) in place."""
    if not isinstance(optimizer, _BaselineGuard):
        optimizer.__class__ = _guarded_class(type(optimizer))
    optimizer._skip_init()
    optimizer._install_state_checks()
    optimizer.state_tag = tag
    optimizer._factor_ids = frozenset(factor_ids)
    optimizer._on_factor = on_factor
    return optimizer


def _check_lr(lr: Any) -> None:
    check_nonnegative("lr", lr)


def _factor_ids(model: nn.Module) -> set:
    return {id(p) for n, p in model.named_parameters() if is_lora_factor_name(n)}


def _warn_lora_plus_factor(optimizer: Any) -> None:
    if getattr(optimizer, "_warned_factor", False):
        return
    optimizer._warned_factor = True
    warnings.warn(
        "LoRA+ gives lora_B the learning rate lr * loraplus_lr_ratio only in the groups create_lora_plus_optimizer "
        "built; LoRA factors added through add_param_group take the lr of their group as given. Pass lr * "
        "loraplus_lr_ratio for lora_B yourself, or rebuild the optimizer with create_lora_plus_optimizer(model, ...) "
        "after changing the adapters (warned once).",
        UserWarning,
        stacklevel=4,
    )


def _refuse_riemannian_factor(optimizer: Any) -> None:
    raise ValueError(
        "the Riemannian preconditioner only knows the lora_A/lora_B pairs the optimizer was built with; LoRA factors "
        "added through add_param_group would be trained unpreconditioned. Rebuild the optimizer with "
        "create_rplora_optimizer(model, ...) (or 'riemannian-sgd' / 'riemannian-adamw') after changing the adapters; "
        "nothing was added"
    )


def _named(model: nn.Module):
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected the model (an nn.Module, e.g. a PEFT model), got {type(model).__name__}")
    named = named_trainable_parameters(model)
    if not named:
        raise ValueError(
            "the model has no trainable parameter (requires_grad=True): wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)) or unfreeze the parameters to train"
        )
    return named


def _require_lora(model: nn.Module, what: str) -> list:
    """The model's LoRA layers; raises when there is none."""
    _named(model)
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
    _check_lr(lr)
    check_betas("betas", betas)
    check_nonnegative("eps", eps)
    check_nonnegative("weight_decay", weight_decay)
    optimizer = torch.optim.AdamW(_named(model), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
    return _guard(optimizer, "adamw")


def create_adagrad_optimizer(
    model: nn.Module, *, lr: float, eps: float = 1e-10, weight_decay: float = 0.0, initial_accumulator_value: float = 0.0
) -> torch.optim.Adagrad:
    """``torch.optim.Adagrad`` over every trainable parameter (LoKO's second baseline, arXiv 2410.11551)."""
    _check_lr(lr)
    check_nonnegative("eps", eps)
    check_nonnegative("weight_decay", weight_decay)
    check_nonnegative("initial_accumulator_value", initial_accumulator_value)
    optimizer = torch.optim.Adagrad(
        _named(model), lr=lr, eps=eps, weight_decay=weight_decay, initial_accumulator_value=initial_accumulator_value
    )
    optimizer.register_step_pre_hook(init_missing_adagrad_state)
    return _guard(optimizer, "adagrad")


def init_missing_adagrad_state(optimizer: torch.optim.Adagrad, args: Any = (), kwargs: Any = None) -> None:
    """Give every parameter without Adagrad state the state ``torch.optim.Adagrad``'s constructor creates.

    Before torch 2.12 Adagrad builds its state in the constructor only, so a parameter swapped in afterwards has
    none and ``step()`` raises ``KeyError: 'sum'``. That swap is what accelerate's FSDP2 preparation does (it
    replaces the parameters by their sharded DTensors); measured on two GPUs with torch 2.11. Registered as a step
    pre-hook; a no-op where the state exists."""
    scalar_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        init = group["initial_accumulator_value"]
        for p in group["params"]:
            state = optimizer.state[p]
            if "sum" in state:
                continue
            if group.get("fused"):
                state["step"] = torch.zeros((), dtype=scalar_dtype, device=p.device)
            else:
                state["step"] = torch.tensor(0.0, dtype=scalar_dtype)
            value = complex(init, init) if torch.is_complex(p) else init
            state["sum"] = torch.full_like(p, value, memory_format=torch.preserve_format)


def create_sgd_optimizer(
    model: nn.Module, *, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
) -> torch.optim.SGD:
    """``torch.optim.SGD`` over every trainable parameter ("LoRA-SGD")."""
    _check_lr(lr)
    check_range("momentum", momentum, 0.0, 1.0)
    check_nonnegative("weight_decay", weight_decay)
    if nesterov and momentum == 0:
        raise ValueError("nesterov=True needs momentum > 0 (e.g. momentum=0.9), or pass nesterov=False")
    optimizer = torch.optim.SGD(_named(model), lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    return _guard(optimizer, "sgd")


def _check_accepted(cls: Type[Optimizer], kwargs: Dict[str, Any], what: str) -> None:
    """Keyword arguments forwarded to ``cls`` must be ones it takes (a clear error instead of a TypeError deep in
    PEFT)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n in params if n not in ("self", "params")}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(
            f"{what} does not take {', '.join(unknown)}: extra keyword arguments go to {cls.__name__}, whose "
            f"hyperparameters are: {', '.join(sorted(accepted))}"
        )


def _check_forwarded(kwargs: Dict[str, Any]) -> None:
    """Hyperparameters forwarded to the inner torch optimizer get the library's checks first."""
    for key, check in (("weight_decay", check_nonnegative), ("eps", check_nonnegative), ("betas", check_betas),
                       ("momentum", lambda n, v: check_range(n, v, 0.0, 1.0))):
        if key in kwargs:
            check(key, kwargs[key])


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
    create_loraplus_optimizer = require("peft.optimizers", "peft", "lora-plus").create_loraplus_optimizer

    _check_lr(lr)
    check_positive("loraplus_lr_ratio", loraplus_lr_ratio)
    check_nonnegative("loraplus_weight_decay", loraplus_weight_decay)
    check_nonnegative("loraplus_lr_embedding", loraplus_lr_embedding)
    _check_forwarded(kwargs)
    cls = _optimizer_class(optimizer_cls)
    _check_accepted(cls, kwargs, "LoRA+")
    _require_lora(model, "LoRA+")
    optimizer = create_loraplus_optimizer(
        model, cls, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=loraplus_weight_decay, loraplus_lr_embedding=loraplus_lr_embedding, **kwargs,
    )
    return _guard(
        _name_groups(optimizer, model), "lora-plus", factor_ids=_factor_ids(model), on_factor=_warn_lora_plus_factor
    )


def create_rplora_optimizer(
    model: nn.Module, optimizer_cls: Any = "sgd", *, lr: float, reg: float = 1e-2, **kwargs: Any
) -> Optimizer:
    """Riemannian-preconditioned LoRA (Zhang & Pilanci 2024, arXiv 2402.02347; reference code
    github.com/pilancilab/Riemannian_Preconditioned_LoRA): ``g_A <- (B^T B + reg I)^-1 g_A``,
    ``g_B <- g_B (A A^T + reg I)^-1``, then ``optimizer_cls``.  This is PEFT's ``create_riemannian_optimizer``
    (which preconditions the raw factors, i.e. assumes LoRA scaling 1), made closure-friendly.
    """
    create_riemannian_optimizer = require("peft.optimizers", "peft", "riemannian-adamw").create_riemannian_optimizer

    _check_lr(lr)
    check_positive("reg", reg)
    _check_forwarded(kwargs)
    cls = _optimizer_class(optimizer_cls)
    _check_accepted(cls, kwargs, "Riemannian LoRA")
    _require_linear_factors(_require_lora(model, "Riemannian LoRA"))
    if any(is_dtensor(p) for p in model.parameters()):
        raise NotImplementedError(_RIEMANNIAN_SHARDED)
    optimizer = create_riemannian_optimizer(model, cls, lr=lr, reg=reg, **kwargs)
    tag = f"riemannian-{cls.__name__.lower()}"
    guarded = _guard(
        _name_groups(optimizer, model), tag, factor_ids=_factor_ids(model), on_factor=_refuse_riemannian_factor
    )
    guarded._sharded_refusal = _RIEMANNIAN_SHARDED
    return guarded


_RIEMANNIAN_SHARDED = (
    "Riemannian LoRA (PEFT's create_riemannian_optimizer) does not run under FSDP2 / DTensor (sharded) parameters: "
    "its preconditioner builds (B^T B + reg I)^-1 from a sharded factor and a plain identity, which DTensor refuses. "
    "Under FSDP2 use 'psi-lora' (its K = 0 round is the Riemannian-preconditioned step), 'scaled-psi-lora', 'adamw', "
    "'lora-plus', 'svdlora' or LoKO-scalar ('loko' with observation='loss'); "
    "Riemannian LoRA runs under DDP or in a single process"
)


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
