"""SVDLoRA: the dense oracle.  Take the full step on ``Delta W`` and project back to rank r by truncated SVD.

``Delta W+ = Pi_r(Delta W - lr * u(G))`` where ``u`` is SGD (with momentum) or AdamW applied to the dense full-weight
gradient ``G = S^T X`` (captured by the same hooks as PSI-LoRA), with dense ``d_out x d_in`` optimizer state.  The
result is written back as balanced factors ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T`` (divided by ``sqrt(s)``).
It costs one SVD and O(d_out d_in) memory per layer per step: a reference for small models and tests, not a
production optimizer.
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable, Optional, Tuple

import torch
from torch import nn

from ..functional.lorsum import svd_factors
from ..lora.capture import GradientCapture
from ..lora.layers import NoLoRALayersError, require_supported, split_lora_parameters
from .base import (
    DistributedContext,
    LoRAOptimizer,
    check_nonnegative,
    check_range,
    named_trainable_parameters,
    require_unsharded_model,
)

__all__ = ["SVDLoRA", "create_svdlora_optimizer"]


class SVDLoRA(LoRAOptimizer):
    """Projected (S)GD / AdamW on the rank-r set: the SVDLoRA oracle of arXiv 2602.16456.

    Args:
        params: named parameters (``None``: every trainable parameter of ``model``).
        model: the LoRA model (its layers are hooked to capture ``G``).
        lr, momentum, weight_decay: the base optimizer's; ``base="sgd"`` uses heavy ball (torch SGD convention),
            ``base="adamw"`` AdamW with ``betas`` and ``eps`` (bias-corrected, decoupled decay).
        compute_dtype: dtype of the dense step and the SVD (fp32; fp64 in tests).
    Other trainable parameters take the same base rule on their ``.grad``.
    """

    def __init__(
        self,
        params: Optional[Iterable] = None,
        *,
        model: nn.Module,
        lr: float,
        base: str = "sgd",
        momentum: float = 0.0,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        compute_dtype: torch.dtype = torch.float32,
        process_group: Optional[Any] = None,
    ):
        check_nonnegative("lr", lr)
        if base not in ("sgd", "adamw"):
            raise ValueError(f"base must be 'sgd' or 'adamw', got {base!r}")
        check_range("momentum", momentum, 0.0, 1.0)
        check_nonnegative("weight_decay", weight_decay)
        if params is None:
            params = named_trainable_parameters(model)
        defaults = dict(lr=lr, base=base, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._require_names(self.param_groups, "create_svdlora_optimizer")
        named = [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])]
        split = split_lora_parameters(model, named)
        if not split.layers:
            raise NoLoRALayersError("SVDLoRA found no trainable LoRA layer among the given parameters")
        require_supported(split.layers, "SVDLoRA")
        self._layers = split.layers
        self._layer_of_a = {id(layer.A): layer for layer in self._layers}
        self._b_ids = {id(layer.B) for layer in self._layers}
        self._dtype = compute_dtype
        self._dist = DistributedContext(process_group)
        self._capture = GradientCapture(self._layers, mode="rows", row_budget=None)
        weakref.finalize(self, self._capture.remove)  # the hooks must not outlive the optimizer

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._capture.clear()

    def remove_hooks(self) -> None:
        self._capture.remove()

    def _dense_update(self, group, state, grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """The base optimizer's step direction for ``grad`` (dense state created on first use)."""
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        state["step"] += 1
        if group["base"] == "sgd":
            if group["momentum"] == 0:
                return grad
            if "dense_momentum" not in state:
                state["dense_momentum"] = grad.clone()
            else:
                state["dense_momentum"].mul_(group["momentum"]).add_(grad)
            return state["dense_momentum"]
        beta1, beta2 = group["betas"]
        if "dense_exp_avg" not in state:
            state["dense_exp_avg"] = torch.zeros_like(grad)
            state["dense_exp_avg_sq"] = torch.zeros_like(grad)
        m, v = state["dense_exp_avg"], state["dense_exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(state["step"])
        return (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + group["eps"])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            for group in self.param_groups:
                lr, wd = group["lr"], group["weight_decay"]
                if lr == 0:
                    continue
                for p in group["params"]:
                    if id(p) in self._b_ids:
                        continue
                    layer = self._layer_of_a.get(id(p))
                    if layer is None:
                        if p.grad is None:
                            continue
                        update = self._dense_update(group, self.state[p], p.grad.to(self._dtype), p)
                        p.mul_(1 - lr * wd).sub_((lr * update).to(p.dtype))
                        continue
                    obs = self._capture.observation(layer)
                    if obs.empty:
                        continue
                    x, s = obs.rows()
                    G = self._dist.mean(s.to(self._dtype).mT @ x.to(self._dtype))
                    root = math.sqrt(layer.scaling)
                    W = layer.b_matrix(self._dtype) @ layer.a_matrix(self._dtype) * layer.scaling
                    update = self._dense_update(group, self.state[p], G, W)
                    W = W * (1 - lr * wd) - lr * update
                    B, A = svd_factors(W, layer.rank)
                    layer.A.copy_((A / root).view_as(layer.A))
                    layer.B.copy_((B / root).view_as(layer.B))
        finally:
            self._capture.clear()
        return loss


def create_svdlora_optimizer(
    model: nn.Module,
    *,
    lr: float,
    base: str = "sgd",
    momentum: float = 0.0,
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
) -> SVDLoRA:
    """SVDLoRA oracle (arXiv 2602.16456, §1): dense step + truncated SVD, for small models and tests."""
    require_unsharded_model(model, "SVDLoRA")
    return SVDLoRA(
        model=model, lr=lr, base=base, momentum=momentum, betas=betas, eps=eps, weight_decay=weight_decay,
        compute_dtype=compute_dtype,
    )
