"""The state side of PSI-LoRA, Proj. PSI-LoRA and Scaled PSI-LoRA (:mod:`loraopt.optim.psi`): validate the
hyperparameters every variant shares, discover the LoRA layers once and hook them, keep the per-parameter state
(allocated lazily on the first step) and the stream-mode probes the hooks project on: computed here, outside any
backward, and pushed into the capture (at construction, after every step, after ``load_state_dict``, and on
``zero_grad`` for layers whose factors were edited in place), so the hooks never call back into the optimizer.  The
step is :mod:`.psi_step`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..functional.elementwise import adam_, sgd_momentum_
from ..functional.psi import CompiledPSIStep, GraphedPSIStep, psi_step, resolve_compile
from ..lora.capture import GradientCapture
from ..lora.layers import (
    LoRALayer,
    NoLoRALayersError,
    is_lora_factor_name,
    require_supported,
    split_lora_parameters,
)
from .base import LoRAOptimizer
from .checks import check_int, check_nonnegative, check_positive, check_range, named_trainable_parameters
from .distributed import DistributedContext, is_dtensor
from .psi_gather import compute_dtype, local, stack_factors

__all__ = ["_PSIOptimizerBase", "check_shared_hyperparameters"]


def check_shared_hyperparameters(defaults: Dict[str, Any]) -> None:
    """Validate the hyperparameters PSI-LoRA, Proj. PSI-LoRA and Scaled PSI-LoRA share (``ValueError`` naming the
    argument)."""
    check_nonnegative("lr", defaults["lr"])
    check_int("inner_iters", defaults["inner_iters"], 0)
    check_nonnegative("lmbd", defaults["lmbd"])
    check_nonnegative("lmbd_momentum", defaults["lmbd_momentum"])
    check_positive("rank_mult", defaults["rank_mult"])
    check_nonnegative("weight_decay", defaults["weight_decay"])
    check_nonnegative("max_grad_norm", defaults["max_grad_norm"])
    check_nonnegative("jitter", defaults["jitter"])
    if defaults["momentum_balance"] not in ("svd", "gram", "polar", "norm", "none"):
        raise ValueError(
            f"momentum_balance must be 'gram', 'svd', 'polar', 'norm' or 'none', got {defaults['momentum_balance']!r}"
        )
    if defaults["momentum_prox"] is not None:
        check_nonnegative("momentum_prox", defaults["momentum_prox"])
    if defaults.get("normalize") not in (None, "layer", "factored", "full"):
        raise ValueError(f"normalize must be None, 'layer', 'factored' or 'full', got {defaults['normalize']!r}")
    check_range("normalize_beta2", defaults.get("normalize_beta2", 0.999), 0.0, 1.0)
    betas = defaults["adam_betas"]
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"adam_betas must be a pair (beta1, beta2), got {betas!r}")
    check_range("adam_betas[0]", betas[0], 0.0, 1.0)
    check_range("adam_betas[1]", betas[1], 0.0, 1.0)
    check_positive("adam_eps", defaults["adam_eps"])


class _PSIOptimizerBase(LoRAOptimizer):
    """What a PSI-family optimizer holds: its LoRA layers (discovered once, hooked), their parameter groups, and the
    per-parameter state, allocated lazily.  The step is :class:`~loraopt.optim.psi_step._ProjectedSubspaceOptimizer`;
    subclasses define the momentum coefficients, the metric and the rule for other parameters."""

    _factory_name = ""
    _scaled = False
    # FSDP2: the whole factors are gathered for the step (they are r x d), every rank computes the same update from
    # the rank-averaged captured products and writes back its own shard; other parameters take their elementwise
    # rule on each rank's shard.
    supports_dtensor = True
    _variant = "psi"  # functional.psi variant: "psi" (low-rank momentum) or "proj" (factor-space momentum)
    # Hyperparameters added after the first release: a checkpoint without them takes the current group's values.
    _optional_group_keys = frozenset(
        {"momentum_balance", "momentum_prox", "other_optimizer", "adam_betas", "adam_eps", "bias_correction",
         "metric_scale"}
    )

    def __init__(
        self,
        params: Optional[Iterable],
        model: nn.Module,
        defaults: Dict[str, Any],
        *,
        capture: str,
        row_budget: Optional[int],
        seed: int,
        strict: bool,
        process_group: Optional[Any],
        foreach: bool = True,
        dense: str = "auto",
        compile: Union[bool, str] = False,
        cuda_graph: bool = False,
    ):
        # The hyperparameters every variant takes (each variant has checked its own before building ``defaults``).
        check_shared_hyperparameters(defaults)
        defaults = {**defaults, "adam_betas": tuple(defaults["adam_betas"])}
        if model is None or not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} needs the model (its LoRA layers are hooked): pass model=..., or use "
                f"loraopt.{self._factory_name}(model, ...)"
            )
        if params is None:
            params = named_trainable_parameters(model)
        super().__init__(params, defaults)
        self._require_names(self.param_groups, self._factory_name)
        named = [(n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"])]
        split = split_lora_parameters(model, named)
        if not split.layers:
            raise NoLoRALayersError(
                f"{type(self).__name__} found no trainable LoRA layer among the given parameters: wrap the model with "
                "peft.get_peft_model(model, LoraConfig(...)) and pass its parameters"
            )
        require_supported(split.layers, type(self).__name__)
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for layer in split.layers:
            if group_of[id(layer.A)] != group_of[id(layer.B)]:
                raise ValueError(f"{layer.a_name} and {layer.b_name} must be in the same parameter group")
        self._layers: List[LoRALayer] = split.layers
        self._layers_by_group: Dict[int, List[LoRALayer]] = {}
        for layer in self._layers:
            self._layers_by_group.setdefault(group_of[id(layer.A)], []).append(layer)
        self._factor_ids = {id(p) for layer in self._layers for p in (layer.A, layer.B)}
        self._seed = seed
        self._strict = strict
        self._dist = DistributedContext(process_group)
        self._warned: set = set()
        self._consumed: Dict[int, Tuple[int, int]] = {}
        self._checked_grad_edits = False
        self._warned_accumulated_clip = False
        self._steps_counted = 0
        self._fallbacks_warned_at = 0.1  # warn at the first fallback, then at 10x growth
        # Every LoRA factor of the model, trainable or not: one added later by add_param_group would get no hooks.
        self._model_factor_ids = {id(p) for name, p in model.named_parameters() if is_lora_factor_name(name)}

        lora_groups = [self.param_groups[i] for i in self._layers_by_group]
        # Stream mode keeps only projections of G: no inner iterations, and no |G| for the step normalisations.
        streamable = self._variant == "psi" and all(g["inner_iters"] == 0 and not g.get("normalize")
                                                    for g in lora_groups)
        if capture == "auto":
            capture = "stream" if streamable else "rows"
        if capture not in ("rows", "stream"):
            raise ValueError(f"capture must be 'auto', 'rows' or 'stream', got {capture!r}")
        if capture == "stream" and not streamable:
            raise ValueError(
                "capture='stream' keeps no rows: it supports inner_iters=0 of PSI-LoRA and Scaled PSI-LoRA without "
                "normalize=None only (Proj. PSI-LoRA needs the gradient at the new factors, a normalisation its "
                "entries); use capture='rows' or 'auto'"
            )
        metrics = {g.get("metric") for g in lora_groups}
        self._capture = GradientCapture(
            self._layers,
            mode=capture,
            kfac_stats="kfac" in metrics,
            shampoo_stats="shampoo" in metrics,
            grad_norm=any(g["max_grad_norm"] > 0 for g in self.param_groups),
            row_budget=row_budget,
            dense=dense,
        )
        self._foreach = bool(foreach)
        # torch.compile of the batched functional step (CUDA by default); the eager step is the fallback.
        device = self._layers[0].A.device
        self._compile = resolve_compile(compile, device) and self._foreach
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if cuda_graph and (self._compile or not self._foreach):
            raise ValueError("cuda_graph=True captures the batched eager step: use it with compile=False and "
                             "foreach=True")
        self._step_fn = (CompiledPSIStep(type(self).__name__) if self._compile
                         else GraphedPSIStep(type(self).__name__) if cuda_graph else psi_step)
        self._root_cache: Dict[tuple, Tensor] = {}
        # Stream mode: the momentum subspace a layer's state will start from, drawn when its first probes are pushed
        # (before its state exists) and taken over by the state when it is allocated.
        self._initial_momentum: Dict[int, Tensor] = {}
        self.register_load_state_dict_post_hook(_PSIOptimizerBase._push_probes_after_load)
        # The hooks must not outlive the optimizer: a dropped optimizer would otherwise keep recording rows.
        weakref.finalize(self, self._capture.remove)
        if any(layer.A.dtype in (torch.bfloat16, torch.float16) for layer in self._layers):
            warnings.warn(
                f"{type(self).__name__}: LoRA factors are {self._layers[0].A.dtype}; the optimizer computes and keeps "
                "its state in fp32, but the weights are rounded on every write. Prefer fp32 adapters "
                "(peft.get_peft_model(..., autocast_adapter_dtype=True), the default).",
                stacklevel=3,
            )
        # Stream mode: the first backward projects on these (the factors as they are now, zero momentum columns):
        # pushed here, so nothing of the optimizer runs inside a backward.
        self._push_probes()

    # ------------------------------------------------------------------------------------------- subclass hooks

    def _coefficients(self, group: Dict[str, Any]) -> Tuple[float, float]:
        """``(gradient coefficient, momentum coefficient)``."""
        raise NotImplementedError

    def _lam(self, group: Dict[str, Any]) -> float:
        return group["lr"] * group["lmbd"]

    def _init_metric_state(self, layer: LoRALayer) -> None:
        pass

    def _init_other_state(self, group: Dict[str, Any], param: Tensor) -> None:
        state = self.state[param]
        dtype = torch.promote_types(param.dtype, torch.float32)
        if group["other_optimizer"] == "adam":
            state["exp_avg"] = torch.zeros_like(param, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype)
        elif group.get("momentum", 0.0) > 0:
            state["momentum_buffer"] = torch.zeros_like(param, dtype=dtype)

    def _update_other(self, group: Dict[str, Any], param: Tensor, grad: Tensor) -> None:
        """The rule for parameters that are not LoRA factors: Adam(W) or SGD with the group's momentum."""
        state = self.state[param]
        if is_dtensor(param):  # FSDP2: an elementwise rule, applied by each rank to its own shard (and state shard)
            param, grad = param.to_local(), local(grad)
            state = {k: local(v) for k, v in state.items()}
        state["step"] += 1
        step = float(state["step"])  # a CPU tensor, as in torch.optim: no device sync
        if group["other_optimizer"] == "adam":
            adam_(param, grad, state["exp_avg"], state["exp_avg_sq"], lr=group["lr"], betas=group["adam_betas"],
                  eps=group["adam_eps"], weight_decay=group["weight_decay"], step=step)
        else:
            sgd_momentum_(param, grad, state.get("momentum_buffer"), lr=group["lr"], momentum=group["momentum"],
                          dampening=group["dampening"], weight_decay=group["weight_decay"], first_step=step == 1)

    # ------------------------------------------------------------------------------------------- public API

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        factor_ids = getattr(self, "_model_factor_ids", None)
        if factor_ids is not None and isinstance(param_group, dict):
            params = param_group.get("params", [])
            params = [params] if torch.is_tensor(params) else list(params)
            params = [p[1] if isinstance(p, tuple) else p for p in params]
            if any(id(p) in factor_ids for p in params):
                raise ValueError(
                    f"{type(self).__name__}.add_param_group: LoRA factors cannot be added after construction (their "
                    "layer would get no capture hooks and would be stepped as a plain tensor). Unfreeze them first "
                    f"and build a new optimizer, e.g. loraopt.{self._factory_name}(model, ...)."
                )
        super().add_param_group(param_group)

    @property
    def layers(self) -> List[LoRALayer]:
        """The LoRA layers this optimizer updates."""
        return list(self._layers)

    def remove_hooks(self) -> None:
        """Detach the capture hooks (the optimizer cannot step afterwards)."""
        self._capture.remove()

    def _parameters_swapped(self, mapping: Dict[int, Tensor]) -> None:
        for layer in self._layers:  # the hooks hold these layer objects: they see the new factors too
            layer.A = mapping.get(id(layer.A), layer.A)
            layer.B = mapping.get(id(layer.B), layer.B)
        self._factor_ids = {id(p) for layer in self._layers for p in (layer.A, layer.B)}
        self._model_factor_ids = self._model_factor_ids | {
            id(new) for old, new in mapping.items() if old in self._model_factor_ids
        }
        # The pushed probes stay: they are keyed by layer index and hold the same values (a swap replaces the tensor
        # objects, not the numbers); the next push (after the step) reads the new parameters.

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` and the captured activations: discarding a gradient means both."""
        super().zero_grad(set_to_none=set_to_none)
        self._capture.clear()
        if self._capture.mode == "stream":
            # Factors edited in place since the probes were pushed (a checkpoint loaded into the model, a DDP
            # broadcast): refresh those layers' probes now, before the backward that projects on them.
            stale = [layer for layer in self._layers if self._capture.probes_stale(layer)]
            if stale:
                self._push_probes(stale)

    # ------------------------------------------------------------------------------------------- state

    def _expected_state_shapes(self, param: Tensor, group: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        """The shape of every state tensor of ``param`` (checked by ``load_state_dict``)."""
        counters = {"step": (), "skipped_steps": (), "solve_fallbacks": (), "grad_sq_avg": ()}
        for layer in self._layers:
            if param is layer.A or param is layer.B:
                r_m = self._momentum_rank(group, layer)
                if param is layer.A:
                    return {**counters, "momentum_A": (r_m, layer.d_in), "metric_in": (layer.d_in,),
                            "grad_col_sq_avg": (layer.d_in,), "grad_entry_sq_avg": (layer.d_out, layer.d_in),
                            "momentum_buffer": (layer.rank, layer.d_in), "previous_factor": (layer.rank, layer.d_in)}
                return {**counters, "momentum_B": (layer.d_out, r_m), "metric_out": (layer.d_out,),
                        "grad_row_sq_avg": (layer.d_out,),
                        "momentum_buffer": (layer.d_out, layer.rank), "previous_factor": (layer.d_out, layer.rank)}
        shape = tuple(param.shape)
        return {"step": (), "momentum_buffer": shape, "exp_avg": shape, "exp_avg_sq": shape}

    def _sharded(self) -> bool:
        return any(is_dtensor(p) for g in self.param_groups for p in g["params"])

    def _momentum_rank(self, group: Dict[str, Any], layer: LoRALayer) -> int:
        return max(1, int(round(layer.rank * group["rank_mult"])))

    def _uses_momentum(self, group: Dict[str, Any]) -> bool:
        return self._coefficients(group)[1] > 0

    def _ensure_layer_state(self, group: Dict[str, Any], layer: LoRALayer) -> None:
        state_a, state_b = self.state[layer.A], self.state[layer.B]
        if "step" in state_a:
            return
        device = layer.A.device
        state_a["step"] = torch.zeros((), dtype=torch.float32)
        state_b["step"] = torch.zeros((), dtype=torch.float32)
        state_a["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=device)
        state_a["solve_fallbacks"] = torch.zeros((), dtype=torch.int64, device=device)
        dtype = compute_dtype(layer)  # fp32 state for 16/32-bit factors, fp64 for fp64 ones
        if self._uses_momentum(group) and self._variant == "proj":
            # Factor-space heavy ball: buffers and the factors they were expressed at (zero: nothing to transport).
            state_a["momentum_buffer"] = torch.zeros(layer.rank, layer.d_in, device=device, dtype=dtype)
            state_b["momentum_buffer"] = torch.zeros(layer.d_out, layer.rank, device=device, dtype=dtype)
            state_a["previous_factor"] = torch.zeros(layer.rank, layer.d_in, device=device, dtype=dtype)
            state_b["previous_factor"] = torch.zeros(layer.d_out, layer.rank, device=device, dtype=dtype)
        elif self._uses_momentum(group):
            r_m = self._momentum_rank(group, layer)
            state_a["momentum_A"] = self._initial_momentum_a(group, layer, take=True)
            state_b["momentum_B"] = torch.zeros(layer.d_out, r_m, device=device, dtype=dtype)
        if group.get("normalize") == "layer":  # EMA of the mean squared entry of G, from zero (bias-corrected)
            state_a["grad_sq_avg"] = torch.zeros((), device=device, dtype=dtype)
        elif group.get("normalize") == "factored":  # EMAs of the mean squared entry of each column / row of G
            state_a["grad_col_sq_avg"] = torch.zeros(layer.d_in, device=device, dtype=dtype)
            state_b["grad_row_sq_avg"] = torch.zeros(layer.d_out, device=device, dtype=dtype)
        elif group.get("normalize") == "full":  # EMA of every squared entry of G (d_out x d_in: for measurement)
            state_a["grad_entry_sq_avg"] = torch.zeros(layer.d_out, layer.d_in, device=device, dtype=dtype)
        self._init_metric_state(layer)

    def _ensure_other_state(self, group: Dict[str, Any], param: Tensor) -> None:
        if "step" not in self.state[param]:
            self.state[param]["step"] = torch.zeros((), dtype=torch.float32)
            self._init_other_state(group, param)

    def _group_index(self, layer: LoRALayer) -> int:
        for i, layers in self._layers_by_group.items():
            if layer in layers:
                return i
        raise KeyError(layer.a_name)

    def _group_of(self, layer: LoRALayer) -> Dict[str, Any]:
        for i, layers in self._layers_by_group.items():
            if layer in layers:
                return self.param_groups[i]
        raise KeyError(layer.a_name)

    def _initial_momentum_a(self, group: Dict[str, Any], layer: LoRALayer, take: bool = False) -> Tensor:
        """The ``(r_m, d_in)`` momentum subspace a layer's state starts from.  Seeded by (seed, layer index), not the
        global RNG, so every DDP rank starts from the same subspace; drawn once (for the first probes or the state,
        whichever comes first) and handed to the state with ``take``."""
        r_m, dtype, device = self._momentum_rank(group, layer), compute_dtype(layer), layer.A.device
        m = self._initial_momentum.get(layer.index)
        if m is None or m.shape != (r_m, layer.d_in) or m.dtype != dtype or m.device != device:
            gen = torch.Generator().manual_seed(self._seed * 1_000_003 + layer.index)
            m = torch.randn(r_m, layer.d_in, generator=gen).to(device=device, dtype=dtype)
            self._initial_momentum[layer.index] = m
        if take:
            del self._initial_momentum[layer.index]
        return m

    def _probe_momentum(self, layer: LoRALayer) -> Optional[Tuple[Optional[Tensor], Tensor]]:
        """``(M_B, M_A)`` the probes of ``layer`` carry (``M_B`` ``None``: zero, state not allocated yet), ``None``
        without momentum; the same tensors :meth:`_ensure_layer_state` keeps or will allocate."""
        state_a, state_b = self.state.get(layer.A, {}), self.state.get(layer.B, {})
        if "step" in state_a:
            return (state_b["momentum_B"], state_a["momentum_A"]) if "momentum_A" in state_a else None
        group = self._group_of(layer)
        if self._uses_momentum(group) and self._variant != "proj":
            return None, self._initial_momentum_a(group, layer)
        return None

    def _push_probes(self, layers: Optional[List[LoRALayer]] = None) -> None:
        """Stream mode: compute ``([B~ | M_B], [A~^T | M_A^T])`` of ``layers`` (default: all) from the current factors
        and momentum and push them into the capture, which projects every gradient of the next backward on them.

        Called outside backward only (construction, the end of every ``step()``, ``load_state_dict``, ``zero_grad``
        after in-place edits of the factors).  Layers are stacked per shape, so the work does not grow per layer;
        FSDP2 factors are gathered here, in the same layer order on every rank."""
        if self._capture.mode != "stream":
            return
        self._rebind_if_swapped()
        buckets: Dict[tuple, list] = {}
        for layer in self._layers if layers is None else layers:
            momentum = self._probe_momentum(layer)
            m_shape = None if momentum is None else tuple(momentum[1].shape)
            # The factor dtype, not compute_dtype(): torch.promote_types is a dispatcher call, once per bucket below.
            key = (layer.A.dtype, layer.rank, layer.d_in, layer.d_out, layer.A.device, m_shape)
            buckets.setdefault(key, []).append((layer, momentum))
        pushed: Dict[int, Tuple[Tensor, Tensor]] = {}
        with torch.no_grad():
            for (_, _, _, d_out, device, m_shape), items in buckets.items():
                bucket = [layer for layer, _ in items]
                dtype = compute_dtype(bucket[0])
                _, _, A_raw, B_raw = stack_factors(bucket)
                roots = tuple(math.sqrt(layer.scaling) for layer in bucket)
                root: Union[float, Tensor] = roots[0]
                if any(v != roots[0] for v in roots):  # made once and cached: no host-to-device copy per step
                    root = self._root_cache.get((roots, device, dtype))
                    if root is None:
                        root = torch.tensor(roots, dtype=dtype, device=device).view(-1, 1, 1)
                        self._root_cache[(roots, device, dtype)] = root
                left, right = B_raw * root, A_raw.mT * root
                if m_shape is not None:
                    zero = None
                    m_b = []
                    for _, (mb, _) in items:
                        if mb is None:
                            if zero is None:
                                zero = torch.zeros(d_out, m_shape[0], device=device, dtype=dtype)
                            mb = zero
                        m_b.append(mb)
                    m_a = torch.stack([ma for _, (_, ma) in items])
                    left = torch.cat([left, torch.stack(m_b).to(dtype)], dim=-1)
                    right = torch.cat([right, m_a.mT.to(dtype)], dim=-1)
                else:
                    left, right = left.contiguous(), right.contiguous()
                for layer, l_probe, r_probe in zip(bucket, left.unbind(0), right.unbind(0)):
                    pushed[layer.index] = (l_probe, r_probe)
        self._capture.push_probes(pushed)

    @staticmethod
    def _push_probes_after_load(optimizer: "_PSIOptimizerBase") -> None:
        """``load_state_dict`` replaced the momentum (and maybe the state's existence): push probes that match it."""
        optimizer._push_probes()
