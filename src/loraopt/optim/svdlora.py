"""SVDLoRA: the dense oracle.  Take the full step on ``Delta W`` and project back to rank r by truncated SVD.

``Delta W+ = Pi_r(Delta W - lr * u(G))`` where ``u`` is SGD (with momentum) or AdamW applied to the dense full-weight
gradient ``G = S^T X`` (captured by the same hooks as PSI-LoRA), with dense ``d_out x d_in`` optimizer state.  The
result is written back as balanced factors ``B = U_r S_r^1/2``, ``A = S_r^1/2 V_r^T`` (divided by ``sqrt(s)``).
It costs one SVD and O(d_out d_in) memory per layer per step: a reference for small models and tests, not a
production optimizer.

FSDP2 (``fully_shard``, DTensor parameters): every rank gathers the whole factors and gradients it needs
(``full_tensor``), averages the captured ``G`` over the ranks like DDP, takes the identical step and writes back its own
shard of each parameter.  The dense state stays whole (replicated) on every rank.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..functional.lorsum import svd_factors
from ..lora.capture import GradientCapture
from ..lora.layers import NoLoRALayersError, is_lora_factor_name, require_supported, split_lora_parameters
from .base import LoRAOptimizer
from .checks import check_betas, check_nonnegative, check_positive, check_range, named_trainable_parameters
from .distributed import DistributedContext, full_tensor, require_unsharded_model, write_full_

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

    A step is all-or-nothing: when a gradient, the lr or any result is NaN/inf (or the SVD fails), no parameter
    and no state changes and the step is counted in ``skipped_steps`` (with a rate-limited warning). A step that
    cannot be taken for a reason the caller must fix (a second ``step()`` without a new backward, an empty batch,
    activations not captured) raises before anything changes.

    Under FSDP2 build the optimizer after ``fully_shard`` (it must hold the sharded parameters).
    """

    supports_dtensor = True

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
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"SVDLoRA needs the LoRA model (its layers are hooked), got {type(model).__name__}: pass model=..., or "
                "use loraopt.create_svdlora_optimizer(model, ...)"
            )
        check_nonnegative("lr", lr)
        if base not in ("sgd", "adamw"):
            raise ValueError(f"base must be 'sgd' or 'adamw', got {base!r}")
        check_range("momentum", momentum, 0.0, 1.0)
        check_betas("betas", betas)
        check_positive("eps", eps)
        check_nonnegative("weight_decay", weight_decay)
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype!r}")
        if params is None:
            params = named_trainable_parameters(model)
        defaults = dict(lr=lr, base=base, momentum=momentum, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._require_names(self.param_groups, "create_svdlora_optimizer")
        named = [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])]
        split = split_lora_parameters(model, named)
        if not split.layers:
            raise NoLoRALayersError(
                "SVDLoRA found no trainable LoRA layer among the given parameters: wrap the model with "
                "peft.get_peft_model(model, LoraConfig(...)) and pass its parameters"
            )
        require_supported(split.layers, "SVDLoRA")
        self._layers = split.layers
        self._layer_of_a = {id(layer.A): layer for layer in self._layers}
        self._b_ids = {id(layer.B) for layer in self._layers}
        self._dtype = compute_dtype
        self._dist = DistributedContext(process_group)
        self._capture = GradientCapture(self._layers, mode="rows", row_budget=None)
        # Every LoRA factor of the model, trainable or not: add_param_group refuses them (see there).
        self._model_factor_ids = {id(p) for n, p in model.named_parameters() if is_lora_factor_name(n)}
        self._consumed: Dict[int, Any] = {}  # layer index -> weak reference to the lora_A .grad of the last step
        weakref.finalize(self, self._capture.remove)  # the hooks must not outlive the optimizer

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        factor_ids = getattr(self, "_model_factor_ids", None)
        if factor_ids is not None and isinstance(param_group, dict):
            params = param_group.get("params")
            params = [params] if torch.is_tensor(params) else list(params or [])
            param_group = {**param_group, "params": params}
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            if any(id(p) in factor_ids for p in tensors):
                raise ValueError(
                    "SVDLoRA hooks the LoRA layers it was built with; a LoRA factor added through add_param_group "
                    "would take a plain dense step on its .grad instead of the projected step. Build a new optimizer "
                    "over the model instead: loraopt.create_svdlora_optimizer(model, ...) (add_param_group is fine "
                    "for parameters that are not LoRA factors)"
                )
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._capture.clear()

    def _parameters_swapped(self, mapping: Dict[int, Any]) -> None:
        for layer in self._layers:  # the hooks hold the layer objects, so they see the new factors too
            layer.A = mapping.get(id(layer.A), layer.A)
            layer.B = mapping.get(id(layer.B), layer.B)
        self._layer_of_a = {id(layer.A): layer for layer in self._layers}
        self._b_ids = {id(layer.B) for layer in self._layers}
        self._model_factor_ids = self._model_factor_ids | {
            id(new) for old, new in mapping.items() if old in self._model_factor_ids
        }

    def remove_hooks(self) -> None:
        self._capture.remove()

    def _expected_state_shapes(self, param: torch.Tensor, group: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        layer = self._layer_of_a.get(id(param))
        shape = (layer.d_out, layer.d_in) if layer is not None else tuple(param.shape)
        return {"step": (), "dense_momentum": shape, "dense_exp_avg": shape, "dense_exp_avg_sq": shape}

    # ------------------------------------------------------------------------------------------------- step

    def _direction(self, group, state, grad: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """The base optimizer's step direction for ``grad`` and the state it would leave (nothing is written)."""
        step = state["step"] + 1 if "step" in state else torch.ones((), dtype=torch.float32)
        new: Dict[str, torch.Tensor] = {"step": step}
        if group["base"] == "sgd":
            if group["momentum"] == 0:
                return grad, new
            old = state.get("dense_momentum")
            buf = grad.clone() if old is None else old * group["momentum"] + grad
            new["dense_momentum"] = buf
            return buf, new
        beta1, beta2 = group["betas"]
        m = state.get("dense_exp_avg", torch.zeros_like(grad)).lerp(grad, 1 - beta1)
        v = state.get("dense_exp_avg_sq", torch.zeros_like(grad)) * beta2 + grad * grad * (1 - beta2)
        new["dense_exp_avg"], new["dense_exp_avg_sq"] = m, v
        t = float(step)
        return (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + group["eps"]), new

    def _grad_of(self, layer) -> Optional[torch.Tensor]:
        return layer.A.grad if layer.A.grad is not None else layer.B.grad

    def _factors(self, layer) -> Tuple[torch.Tensor, torch.Tensor]:
        """The whole ``(B: (d_out, r), A: (r, d_in))`` of a layer in the compute dtype (gathered under FSDP2)."""
        A = full_tensor(layer.A.detach()).reshape(layer.rank, -1).to(self._dtype)
        B = full_tensor(layer.B.detach()).reshape(layer.d_out, -1).to(self._dtype)
        return B, A

    def _observed_gradients(self) -> List[Tuple[Dict[str, Any], torch.Tensor, Any, torch.Tensor]]:
        """``[(group, param, layer or None, gradient)]`` to update; raises (before any change) when the step cannot
        be taken as asked."""
        plans = []
        for group in self.param_groups:
            if group["lr"] == 0:
                self._allocate_state(group)
                continue
            for p in group["params"]:
                if id(p) in self._b_ids:
                    continue
                layer = self._layer_of_a.get(id(p))
                if layer is None:
                    if p.grad is not None:
                        plans.append((group, p, None, full_tensor(p.grad).to(self._dtype)))
                    continue
                obs = self._capture.observation(layer)
                if obs.empty:
                    self._explain_empty(layer, obs)
                    continue
                x, s = obs.rows()
                G = self._dist.mean(s.to(self._dtype).mT @ x.to(self._dtype))
                self._check_factor_grads(layer, G)
                plans.append((group, p, layer, G))
        return plans

    def _allocate_state(self, group: Dict[str, Any]) -> None:
        """A step at lr = 0 changes nothing but allocates the state (zeros, ``step`` 0: the next step is numerically
        the same as from no state) of every parameter with a gradient. ``torch.distributed.checkpoint`` loads into
        the state a fresh optimizer already has, and its ``set_state_dict`` / accelerate's FSDP2 loader make it by
        calling ``step()`` once at lr = 0 with zero gradients."""
        for p in group["params"]:
            layer = self._layer_of_a.get(id(p))
            grad = p.grad if layer is None else self._grad_of(layer)
            state = self.state[p]
            if grad is None or "step" in state:
                continue
            if id(p) in self._b_ids:  # B carries only the step count (see _all_or_nothing_step)
                state["step"] = torch.zeros((), dtype=torch.float32)
                continue
            shape = (layer.d_out, layer.d_in) if layer is not None else tuple(p.shape)
            zeros = lambda: torch.zeros(shape, dtype=self._dtype, device=p.device)  # noqa: E731
            state["step"] = torch.zeros((), dtype=torch.float32)
            if group["base"] == "sgd" and group["momentum"] != 0:
                state["dense_momentum"] = zeros()
            elif group["base"] == "adamw":
                state["dense_exp_avg"], state["dense_exp_avg_sq"] = zeros(), zeros()

    def _check_factor_grads(self, layer, G: torch.Tensor) -> None:
        """The update comes from the captured ``G``, not from the factors' ``.grad``.  A non-finite ``.grad`` still
        skips the step (the backward that filled it was bad); an edited one (clipping, masking) is ignored, and a
        warning says so once."""
        grad_a = None if layer.A.grad is None else full_tensor(layer.A.grad)
        grad_b = None if layer.B.grad is None else full_tensor(layer.B.grad)
        grads = [g for g in (grad_a, grad_b) if g is not None]
        if not grads:
            return
        if not self._finite(*grads):
            G.fill_(float("nan"))  # the all-or-nothing check below skips the whole step
            return
        if getattr(self, "_warned_grad_edit", False):
            return
        root = layer.scaling
        B, A = self._factors(layer)
        implied = [
            (grad_a, (B.mT @ G * root).reshape(layer.A.shape)),
            (grad_b, (G @ A.mT * root).reshape(layer.B.shape)),
        ]
        for grad, expected in implied:
            if grad is None:
                continue
            scale = float(expected.abs().max()) + 1e-12
            tol = 1e-3 if grad.dtype in (torch.float32, torch.float64) else 5e-2  # 16-bit grads: their rounding
            if float((grad.to(self._dtype) - expected).abs().max()) > tol * scale:
                self._warned_grad_edit = True
                warnings.warn(
                    f"SVDLoRA: the .grad of {layer.describe()} differs from the gradient its hooks captured (edited "
                    "after backward: clip_grad_norm_, masking, a GradScaler?). SVDLoRA's update uses the captured "
                    "gradient and ignores such edits; scale the loss instead of the gradients (warned once).",
                    UserWarning,
                    stacklevel=5,
                )
                return

    def _explain_empty(self, layer, obs) -> None:
        if obs.x_rows:  # the hooks fired, with zero rows
            raise ValueError(
                f"SVDLoRA: the batch reaching {layer.describe()} was empty (0 rows) since the last step; nothing was "
                "changed. Skip empty batches before the forward pass."
            )
        grad = self._grad_of(layer)
        if grad is None:
            return  # the layer took no part in this step
        last = self._consumed.get(layer.index)
        if last is not None and last() is grad:
            raise RuntimeError(
                f"SVDLoRA.step() was called again without a new backward: the gradient of {layer.describe()} was "
                "already applied by the previous step; nothing was changed. Call zero_grad(), run the forward and "
                "backward passes, then step() once per backward."
            )
        raise RuntimeError(
            f"SVDLoRA: {layer.describe()} has a gradient but its hooks recorded no activations; nothing was changed. "
            "Create the optimizer before the forward pass (its hooks record the LoRA inputs), keep "
            "torch.is_grad_enabled() during that forward, and do not call zero_grad() between backward() and step()."
        )

    @staticmethod
    def _finite(*tensors: torch.Tensor) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in tensors)

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate_closure(closure)
        try:
            self._rebind_if_swapped()
            if self._check_step_lrs():
                self._all_or_nothing_step()
        finally:
            self._capture.clear()
        return loss

    def _all_or_nothing_step(self) -> None:
        plans = self._observed_gradients()
        if not plans:
            return
        if not self._finite(*(grad for _, _, _, grad in plans)):
            self._record_skipped(1, "non-finite gradient")
            return
        writes: List[Tuple[torch.Tensor, torch.Tensor]] = []
        states: List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = []
        for group, p, layer, grad in plans:
            lr, wd = group["lr"], group["weight_decay"]
            update, new_state = self._direction(group, self.state[p], grad)
            states.append((p, new_state))
            if layer is None:
                writes.append((p, full_tensor(p) * (1 - lr * wd) - (lr * update).to(p.dtype)))
                continue
            root = math.sqrt(layer.scaling)
            B0, A0 = self._factors(layer)
            W = B0 @ A0 * layer.scaling
            W = W * (1 - lr * wd) - lr * update
            if not self._finite(W):
                self._record_skipped(1, "non-finite update")
                return
            try:
                B, A = svd_factors(W, layer.rank)
            except RuntimeError:  # torch.linalg.LinAlgError: the SVD did not converge
                self._record_skipped(1, "SVD did not converge")
                return
            # B's update is part of A's: it keeps only the step count, so that every trainable parameter has state
            # (torch.distributed.checkpoint's strict loading asks for it).
            states.append((layer.B, {"step": new_state["step"]}))
            writes.append((layer.A, (A / root).reshape(layer.A.shape)))
            writes.append((layer.B, (B / root).reshape(layer.B.shape)))
        if not self._finite(*(new for _, new in writes), *(t for _, s in states for t in s.values())):
            self._record_skipped(1, "non-finite update")
            return
        for param, new in writes:  # commit: every check passed (each rank writes its shard under FSDP2)
            write_full_(param, new)
        for param, new_state in states:
            self.state[param].update(new_state)
        for layer in self._layers:
            grad = self._grad_of(layer)
            if grad is not None:
                self._consumed[layer.index] = weakref.ref(grad)


def create_svdlora_optimizer(model: nn.Module, *, lr: float, **kwargs: Any) -> SVDLoRA:
    """SVDLoRA oracle (arXiv 2602.16456, §1): dense step + truncated SVD, for small models and tests. The keywords
    are those of :class:`SVDLoRA`."""
    require_unsharded_model(model, "SVDLoRA")
    return SVDLoRA(model=model, lr=lr, **kwargs)


create_svdlora_optimizer.forwards_to = SVDLoRA  # type: ignore[attr-defined]
