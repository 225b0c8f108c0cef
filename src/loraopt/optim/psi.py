"""PSI-LoRA, Proj. PSI-LoRA and Scaled PSI-LoRA (arXiv 2602.16456; reference code github.com/zeligism/PSI-LoRA).

All three replace the LoRA step on the factors by a LoRSum projection of the *full-weight* step back to rank r,
where ``G = S^T X`` is captured per layer by hooks and never formed.  The update rule itself lives in one pure
function, :func:`loraopt.functional.psi.psi_step` (batched over layers of one shape); the classes here discover the
layers, hold the state, gather tensors, call it and write the results back:

* PSI-LoRA: ``Delta W <- LoRSum(Delta W - lr ((1 - d) c G + mu M))`` with a low-rank heavy-ball momentum
  ``M = M_B M_A <- LoRSum(mu M + (1 - d) c G)``, kept in balanced SVD form.
* Proj. PSI-LoRA: a momentum-free LoRSum of the weights, heavy ball in factor space (preconditioned factor
  gradients, transported to the new factors each step).
* Scaled PSI-LoRA: the LoRSum in a diagonal fractional-power K-FAC or Shampoo metric, with an EMA momentum.

Which to use (one epoch of SST-2 on MiniLM-L6, r = 8, 3 seeds, H200; ``benchmarks/notes/psi.md``): at the
factories' LoRA settings (with the head at 1e-3) PSI-LoRA reached 85.6 ± 0.2 % dev accuracy, Proj. PSI-LoRA
85.9 ± 0.4 % and Scaled PSI-LoRA 85.1 ± 0.4 %, against 86.6 ± 0.5 % for AdamW at its best lr: still slightly behind
AdamW, but far less sensitive to the lr (PSI-LoRA within 0.8 points over lr 0.01-0.1, where AdamW spans 20 points
over 3e-4-1e-2).

Implementation notes:
* K = 0 is the Jacobi round (the Riemannian-preconditioned / ScaledGD step), never a no-op.  At K = 0 the hooks of
  PSI-LoRA and Scaled PSI-LoRA stream the projections ``[B~ | M_B]^T G`` and ``G [A~ | M_A]^T`` and keep no rows
  (``capture="auto"``).
* Under ``torch.distributed`` every rank-local quantity is averaged (projections, statistics) so all ranks compute
  the update of the concatenated batch.  Under FSDP2 (``fully_shard``, DTensor factors) each step gathers the
  whole r x d factors it needs, computes that same update on every rank and writes back each rank's shard; build
  the optimizer after sharding, or let accelerate swap the sharded parameters in (followed at the next step).
* A step is all or nothing: a non-finite gradient, lr, loss or result anywhere leaves every parameter and every
  state tensor as it was, and is counted (``optimizer.skipped_steps``) and warned about.  A step with lr = 0
  allocates the state and changes nothing.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..functional.elementwise import adam_, sgd_momentum_
from ..functional.metrics import stack_or_scalar
from ..functional.psi import (
    CompiledPSIStep,
    Gradient,
    MetricInput,
    PSIConfig,
    balance_many,
    psi_step,
    resolve_compile,
)
from ..lora.capture import GradientCapture, LayerObservation
from ..lora.layers import (
    LoRALayer,
    NoLoRALayersError,
    is_lora_factor_name,
    require_supported,
    split_lora_parameters,
)
from .base import (
    DeferredHostRead,
    DistributedContext,
    LoRAOptimizer,
    check_int,
    check_nonnegative,
    check_positive,
    check_range,
    full_tensor,
    is_dtensor,
    named_trainable_parameters,
    require_unsharded_model,
    write_full_,
)

__all__ = [
    "PSILoRA",
    "ProjPSILoRA",
    "ScaledPSILoRA",
    "create_psi_lora_optimizer",
    "create_proj_psi_lora_optimizer",
    "create_scaled_psi_lora_optimizer",
]

_SCALED_LAM_FLOOR = 1e-5
_FALLBACK_CHECK_INTERVAL = 64  # steps between the (non-blocking) reads of the solve-fallback counters


class _ProjectedSubspaceOptimizer(LoRAOptimizer):
    """Machinery shared by PSI-LoRA and Scaled PSI-LoRA: layer discovery, hooks, reductions, the LoRSum step and
    the guarded write-back.  Subclasses define the momentum coefficients, the metric and the rule for other
    parameters."""

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
        compile: Union[bool, str] = "auto",
    ):
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
        streamable = self._variant == "psi" and all(g["inner_iters"] == 0 for g in lora_groups)
        if capture == "auto":
            capture = "stream" if streamable else "rows"
        if capture not in ("rows", "stream"):
            raise ValueError(f"capture must be 'auto', 'rows' or 'stream', got {capture!r}")
        if capture == "stream" and not streamable:
            raise ValueError(
                "capture='stream' keeps no rows: it supports inner_iters=0 of PSI-LoRA and Scaled PSI-LoRA only "
                "(Proj. PSI-LoRA needs the gradient at the new factors); use capture='rows' or 'auto'"
            )
        metrics = {g.get("metric") for g in lora_groups}
        self._capture = GradientCapture(
            self._layers,
            mode=capture,
            probes=self._probes if capture == "stream" else None,
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
        self._step_fn = CompiledPSIStep(type(self).__name__) if self._compile else psi_step
        self._probe_cache: Dict[int, Tuple[Tensor, Tensor]] = {}
        self._root_cache: Dict[tuple, Tensor] = {}
        # The hooks must not outlive the optimizer: a dropped optimizer would otherwise keep recording rows.
        weakref.finalize(self, self._capture.remove)
        if any(layer.A.dtype in (torch.bfloat16, torch.float16) for layer in self._layers):
            warnings.warn(
                f"{type(self).__name__}: LoRA factors are {self._layers[0].A.dtype}; the optimizer computes and keeps "
                "its state in fp32, but the weights are rounded on every write. Prefer fp32 adapters "
                "(peft.get_peft_model(..., autocast_adapter_dtype=True), the default).",
                stacklevel=3,
            )

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
            param, grad = param.to_local(), _local(grad)
            state = {k: _local(v) for k, v in state.items()}
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
        self._probe_cache.clear()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear ``.grad`` and the captured activations: discarding a gradient means both."""
        super().zero_grad(set_to_none=set_to_none)
        self._capture.clear()

    # ------------------------------------------------------------------------------------------- state

    def _expected_state_shapes(self, param: Tensor, group: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        """The shape of every state tensor of ``param`` (checked by ``load_state_dict``)."""
        counters = {"step": (), "skipped_steps": (), "solve_fallbacks": ()}
        for layer in self._layers:
            if param is layer.A or param is layer.B:
                r_m = self._momentum_rank(group, layer)
                if param is layer.A:
                    return {**counters, "momentum_A": (r_m, layer.d_in), "metric_in": (layer.d_in,),
                            "momentum_buffer": (layer.rank, layer.d_in), "previous_factor": (layer.rank, layer.d_in)}
                return {**counters, "momentum_B": (layer.d_out, r_m), "metric_out": (layer.d_out,),
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
        dtype = _compute_dtype(layer)  # fp32 state for 16/32-bit factors, fp64 for fp64 ones
        if self._uses_momentum(group) and self._variant == "proj":
            # Factor-space heavy ball: buffers and the factors they were expressed at (zero: nothing to transport).
            state_a["momentum_buffer"] = torch.zeros(layer.rank, layer.d_in, device=device, dtype=dtype)
            state_b["momentum_buffer"] = torch.zeros(layer.d_out, layer.rank, device=device, dtype=dtype)
            state_a["previous_factor"] = torch.zeros(layer.rank, layer.d_in, device=device, dtype=dtype)
            state_b["previous_factor"] = torch.zeros(layer.d_out, layer.rank, device=device, dtype=dtype)
        elif self._uses_momentum(group):
            r_m = self._momentum_rank(group, layer)
            # Seeded by (seed, layer index), not the global RNG, so every DDP rank starts from the same subspace.
            gen = torch.Generator().manual_seed(self._seed * 1_000_003 + layer.index)
            state_a["momentum_A"] = torch.randn(r_m, layer.d_in, generator=gen).to(device=device, dtype=dtype)
            state_b["momentum_B"] = torch.zeros(layer.d_out, r_m, device=device, dtype=dtype)
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

    def _probes(self, layer: LoRALayer) -> Tuple[Tensor, Tensor]:
        """Stream mode: ``([B~ | M_B], [A~^T | M_A^T])`` in fp32, fixed between steps."""
        cached = self._probe_cache.get(layer.index)
        if cached is not None:
            return cached
        self._rebind_if_swapped()  # the first backward after accelerate swapped in sharded parameters
        group = self._group_of(layer)
        with torch.no_grad():
            self._ensure_layer_state(group, layer)
            root = math.sqrt(layer.scaling)
            dtype = _compute_dtype(layer)
            # FSDP2: gathered here, in the backward, in the same layer order on every rank.
            left = [_whole_b(layer, dtype) * root]
            right = [_whole_a(layer, dtype).mT * root]
            state_a, state_b = self.state[layer.A], self.state[layer.B]
            if "momentum_A" in state_a:
                left.append(state_b["momentum_B"].to(dtype))
                right.append(state_a["momentum_A"].mT.to(dtype))
            probes = (torch.cat(left, dim=1), torch.cat(right, dim=1))
        self._probe_cache[layer.index] = probes
        return probes

    # ------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._step()
        finally:
            self._capture.clear()
            self._probe_cache.clear()
        return loss

    def _step(self) -> None:
        self._rebind_if_swapped()
        if not self._check_step_lrs():  # a NaN/inf lr (a broken scheduler): counted, warned, nothing changes
            return
        anything = False
        active_groups = []
        for gi, group in enumerate(self.param_groups):
            layers = self._layers_by_group.get(gi, [])
            others = [p for p in group["params"] if id(p) not in self._factor_ids]
            if group["lr"] == 0:
                # A no-op step (distributed-checkpoint state init, warm-up from 0): allocate state, drop the data.
                for layer in layers:
                    self._ensure_layer_state(group, layer)
                for p in others:
                    self._ensure_other_state(group, p)
                continue
            observed = []
            for layer in layers:
                obs = self._capture.observation(layer)
                if obs.empty:
                    if layer.A.grad is not None or layer.B.grad is not None or obs.pairs:
                        self._missing(layer, obs)
                    continue
                observed.append((layer, obs))
            with_grad = [p for p in others if p.grad is not None]
            if observed or with_grad:
                anything = True
                active_groups.append((group, observed, with_grad))
        if not anything:
            if any(g["lr"] != 0 for g in self.param_groups):
                self._missing(None)
            return
        reduced = self._reduce([obs for _, observed, _ in active_groups for _, obs in observed])
        clip = self._clip_coefficients(active_groups, reduced)
        # All or nothing: every update is computed first, then written back under one device-side flag, so a
        # non-finite value anywhere (a gradient, a solve, a head update) leaves every parameter and state as it was.
        commits, oks, others = [], [], []
        for (group, observed, with_grad), c in zip(active_groups, clip):
            for layer, _ in observed:
                self._ensure_layer_state(group, layer)
            commits += self._lora_steps(group, observed, reduced, c)
            for p in with_grad:
                self._ensure_other_state(group, p)
                others.append((group, p, p.grad if c is None else p.grad * c))
        oks += [commit.ok for commit in commits]
        observed_layers = [layer for _, observed, _ in active_groups for layer, _ in observed]
        factor_grads = [_local(p.grad) for layer in observed_layers for p in (layer.A, layer.B) if p.grad is not None]
        if factor_grads:
            # PSI steps with the captured G, not .grad; a non-finite .grad still means this batch is broken.
            oks.append(torch.isfinite(torch.stack(torch._foreach_norm(factor_grads))))
            if not self._checked_grad_edits:
                self._checked_grad_edits = True
                self._warn_if_grads_edited(active_groups, reduced)
        if others:
            oks.append(self._update_others(others))
        ok = torch.stack([o.all() for o in oks]).all() if len(oks) > 1 else oks[0].all()
        if self._dist.active and self._sharded():
            # Local shards were checked (factor .grad, other parameters): every rank must take the same decision.
            ok = self._dist.mean(ok.to(torch.float32)) == 1.0
        for commit in commits:
            commit.write(ok)
        self._restore_others_unless(ok)
        self._count_step(observed_layers, ok)
        self._record_skipped((~ok).to(torch.int64), "non-finite gradient, loss or update")
        self._balance_momentum(commits, ok)  # last: its SVD waits for the device on CUDA
        # Remember which gradients this step consumed: a second step() on the same ones is named as such.
        self._consumed = {layer.index: _grad_version(layer) for layer in observed_layers}

    def _count_step(self, layers: List[LoRALayer], ok: Tensor) -> None:
        """Count the step (and a skipped one) per observed layer without a host synchronisation."""
        if not layers:
            return
        skipped = (~ok).to(torch.int64)
        states_a = [self.state[layer.A] for layer in layers]
        torch._foreach_add_([st["skipped_steps"] for st in states_a], [skipped] * len(layers))
        torch._foreach_add_([st["step"] for st in states_a] + [self.state[layer.B]["step"] for layer in layers], 1.0)
        self._steps_counted += 1
        if self._steps_counted % _FALLBACK_CHECK_INTERVAL == 1:
            self._start_fallback_read()
        self._warn_on_solve_fallbacks()

    def _start_fallback_read(self) -> None:
        """Every ``_FALLBACK_CHECK_INTERVAL`` steps: start a non-blocking copy of the total solve-fallback count to
        the host (no synchronisation; :meth:`_warn_on_solve_fallbacks` picks it up once it has landed)."""
        counters = [self.state[layer.A]["solve_fallbacks"] for layer in self._layers
                    if "solve_fallbacks" in self.state[layer.A]]
        if not counters:
            return
        device = counters[0].device
        if any(c.device != device for c in counters):
            counters = [c.to(device) for c in counters]
        if "_fallback_reader" not in self.__dict__:
            self._fallback_reader = DeferredHostRead()
        self._fallback_reader.start(torch.stack(counters).sum())

    def _warn_on_solve_fallbacks(self) -> None:
        """Warn when r x r solves needed the escalated-jitter fallback, the first time and then each time their count
        has grown tenfold.  The count is the one copied to the host by the last completed non-blocking read (taken
        every ``_FALLBACK_CHECK_INTERVAL`` steps): on a GPU the warning comes a step or so after that read, on the CPU
        during the step that started it."""
        reader = self.__dict__.get("_fallback_reader")
        value = None if reader is None else reader.poll()
        if value is None:
            return
        total = int(value)
        if total and total >= self._fallbacks_warned_at * 10:
            self._fallbacks_warned_at = total
            warnings.warn(
                f"{type(self).__name__}: {total} r x r system(s) were too ill-conditioned for a plain Cholesky "
                "solve and were solved with raised jitter (the step went through, slightly more damped). The LoRA or "
                "momentum factors are nearly rank-deficient; if this keeps growing, raise lmbd or jitter. "
                "state[lora_A]['solve_fallbacks'] counts them per layer.",
                RuntimeWarning,
                stacklevel=5,
            )

    def _update_others(self, others) -> Tensor:
        """Update the non-LoRA parameters in place, keeping copies to restore; returns whether all stayed finite."""
        self._others_before = []
        finite = []
        for group, param, grad in others:
            state = self.state[param]
            # `step` (a CPU counter) is left out: reading a device flag into it would synchronise.
            tensors = [param] + [v for k, v in state.items() if torch.is_tensor(v) and k != "step"]
            tensors = [_local(t) for t in tensors]  # FSDP2: this rank's shards
            self._others_before.append((tensors, [t.clone() for t in tensors], state))
            self._update_other(group, param, grad)
            finite.append(torch.isfinite(_local(grad)).all() & torch.isfinite(_local(param)).all())
        return torch.stack(finite)

    def _restore_others_unless(self, ok: Tensor) -> None:
        for tensors, before, state in getattr(self, "_others_before", []):
            for t, old in zip(tensors, before):
                t.copy_(torch.where(ok, t, old))
        self._others_before = []

    def _missing(self, layer: Optional[LoRALayer], obs: Optional[LayerObservation] = None) -> None:
        name = type(self).__name__
        if layer is None:
            msg = (
                f"{name}.step() was called without a preceding backward: no LoRA layer recorded activations and no "
                "parameter has a gradient. Run loss.backward() before step(). (If the model switched adapters with "
                "set_adapter(), the layers this optimizer hooks were not used: build an optimizer for the active "
                "adapter.)"
            )
        elif obs is not None and obs.pairs:
            msg = (
                f"{name}: {layer.describe()} received an empty batch (0 rows reached it since the last step). Skip "
                "empty batches before the forward pass (e.g. DataLoader(drop_last=True) or a length check)."
            )
        elif self._consumed.get(layer.index) == _grad_version(layer):
            msg = (
                f"{name}.step() was called again on the gradient of a backward that an earlier step() already "
                "used (each backward's activations are consumed by one step). Call optimizer.zero_grad(), then "
                "forward and backward, before each step()."
            )
        else:
            msg = (
                f"{name}: {layer.describe()} has a gradient but no captured activations. Create the optimizer before "
                "the forward pass (its hooks record the LoRA inputs), keep torch.is_grad_enabled() during that "
                "forward, and do not call optimizer.zero_grad() (or another optimizer's) between backward() and "
                "step()."
            )
        if self._strict:
            raise RuntimeError(msg)
        key = None if layer is None else layer.index
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(msg + " (strict=False: skipped)", stacklevel=4)

    def _warn_if_grads_edited(self, active_groups, reduced) -> None:
        """Once, on the first step: warn if the LoRA factors' ``.grad`` no longer matches the captured gradient
        (``clip_grad_norm_``, masking or scaling after backward).  PSI steps with the captured full-weight gradient,
        so such edits would be silently ignored.  One host synchronisation, on the first step only."""
        if self._dist.active:
            return  # the warning is issued in single-process runs only (rank-local .grad differs from the mean)
        worst = []
        for _, observed, _ in active_groups:
            for layer, obs in observed:
                if layer.A.grad is None or obs.left is None and obs.G is None and not obs.x_rows:
                    continue
                root = math.sqrt(layer.scaling)
                f64 = torch.float64  # once per optimizer: precision over speed
                B_eff = layer.b_matrix(f64) * root
                if obs.left is not None:  # stream: left[:r] = B~^T G
                    BtG = reduced[id(obs)]["left"][: layer.rank].to(f64)
                elif obs.G is not None:
                    BtG = B_eff.mT @ obs.G.to(f64)
                else:
                    X, S = obs.rows()
                    BtG = (S.to(f64) @ B_eff).mT @ X.to(f64)
                expected = BtG * root  # dL/dA = s B^T G = sqrt(s) B~^T G
                got = layer.A.grad.detach().to(f64).reshape(expected.shape)
                scale = expected.norm() + got.norm() + 1e-30
                # A 16-bit .grad is rounded (~1e-2 relative); an edit (clipping, masking) changes far more.
                tol = 1e-3 if layer.A.grad.dtype in (torch.float32, torch.float64) else 5e-2
                worst.append((got - expected).norm() / scale / tol)
        if worst and bool(torch.stack(worst).max() > 1.0) and not self._dist.active:
            warnings.warn(
                f"{type(self).__name__}: the LoRA factors' .grad differs from the gradient captured in backward (was it "
                "clipped, masked or scaled after loss.backward()?). PSI optimizers step with the captured full-weight "
                "gradient and ignore such edits: clip with the optimizer's max_grad_norm=, and mask or scale the loss "
                "instead of .grad.",
                stacklevel=4,
            )

    # ------------------------------------------------------------------------------------------- reductions

    def _reduce(self, observations: List[LayerObservation]) -> Dict[int, Dict[str, Tensor]]:
        """Per observation: the rank-averaged projections and the rank-summed statistics, in one collective."""
        out: Dict[int, Dict[str, Tensor]] = {}
        names: List[Tuple[int, str]] = []
        tensors: List[Tensor] = []
        for obs in observations:
            d: Dict[str, Tensor] = {}
            n = float(obs.n_rows)
            if obs.left is not None:
                d["left"], d["right"] = obs.left, obs.right
            if obs.x_sq is not None:
                kappa = n if self._mean_loss(obs) else 1.0
                # Without a collective the factor stays a host number, applied later in one batched multiply.
                if self._dist.active:
                    d["x_sq"], d["s_sq"], d["s_sq_scale"] = obs.x_sq, obs.s_sq * (kappa * kappa), 1.0
                else:
                    d["x_sq"], d["s_sq"], d["s_sq_scale"] = obs.x_sq, obs.s_sq, kappa * kappa
            if obs.shampoo_in is not None:
                kappa2 = n if self._mean_loss(obs) else 1.0 / n
                if self._dist.active:
                    d["shampoo_in"], d["shampoo_out"] = obs.shampoo_in * kappa2, obs.shampoo_out * kappa2
                    d["shampoo_scale"] = 1.0
                else:
                    d["shampoo_in"], d["shampoo_out"], d["shampoo_scale"] = obs.shampoo_in, obs.shampoo_out, kappa2
            out[id(obs)] = d
            if not self._dist.active:
                # A host number: a device tensor per layer would cost one host-to-device copy each.
                d["n_rows"] = n
                continue
            d["n_rows"] = torch.tensor(n, dtype=torch.float32, device=self._device_of(obs))
            for key, value in d.items():
                if torch.is_tensor(value):
                    names.append((id(obs), key))
                    tensors.append(value.float())
        if self._dist.active and tensors:
            world = float(self._dist.world_size)
            summed = self._dist.sum_many(tensors)
            for (oid, key), value in zip(names, summed):
                # Projections (like .grad under DDP) and per-rank Shampoo statistics are averaged; row sums add up.
                out[oid][key] = value / world if key in ("left", "right", "shampoo_in", "shampoo_out") else value
        return out

    def _device_of(self, obs: LayerObservation) -> torch.device:
        for t in (obs.left, obs.G, obs.x_sq, obs.shampoo_in):
            if t is not None:
                return t.device
        return obs.x_rows[0].device if obs.x_rows else torch.device("cpu")

    def _mean_loss(self, obs: LayerObservation) -> bool:
        return True

    def _clip_coefficients(self, active_groups, reduced) -> List[Optional[Tensor]]:
        if not any(group["max_grad_norm"] > 0 for group, _, _ in active_groups):
            return [None] * len(active_groups)
        # Squared norms of every piece, gathered in a few multi-tensor reductions rather than one chain of adds
        # per layer (each add is a launch).
        dense, bounds, grads, parts = [], [], [], []
        for _, observed, with_grad in active_groups:
            for _, obs in observed:
                if obs.G is not None:
                    dense.append(obs.G)
                elif obs.x_rows:
                    parts.append(obs.grad_sq_norm())
                else:
                    bounds.append(obs.grad_norm_bound)
                    if obs.pairs > 1 and not self._warned_accumulated_clip:
                        self._warned_accumulated_clip = True
                        warnings.warn(
                            f"{type(self).__name__}: gradient accumulation with max_grad_norm > 0 in streaming mode "
                            "(inner_iters=0) clips by the sum of the micro-batches' gradient norms, an upper bound "
                            "of the accumulated gradient's norm: when clipping is active the step is smaller than "
                            "that of one large batch. For exact clipping under accumulation pass capture='rows' "
                            "(it keeps the rows or the dense gradient until step()).",
                            stacklevel=4,
                        )
            grads += [p.grad for p in with_grad]
        sharded = [_local(g) for g in grads if is_dtensor(g)]
        grads = [g for g in grads if not is_dtensor(g)]
        if sharded:
            # FSDP2: shards of the rank-averaged gradient; the sum over ranks of their squares is its squared norm.
            local_sq = torch.stack(torch._foreach_norm([g.float() for g in sharded])).square().sum()
            parts.append(self._dist.sum_many([local_sq])[0])
        device = (dense + bounds + grads + parts)[0].device
        if dense:
            parts.append(torch.nn.utils.get_total_norm(dense).square())
        if bounds:
            parts.append(torch.stack(bounds).square().sum())
        if grads:  # in fp32 at least (a bf16 norm would round the clipping coefficient)
            grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
            parts.append(torch.nn.utils.get_total_norm(grads).square())
        sq = torch.stack([t.to(device) for t in parts]).sum()
        norm = self._dist.mean(sq.sqrt())
        coefs: List[Optional[Tensor]] = []
        for group, _, _ in active_groups:
            max_norm = group["max_grad_norm"]
            coefs.append((max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else None)
        return coefs

    # ------------------------------------------------------------------------------------------- the LoRA step

    def _lora_steps(self, group, observed, reduced, clip) -> List["_Commit"]:
        """The LoRA update of every observed layer of one group, as pending commits.

        Layers are bucketed by shape and gradient form, and each bucket is one call of
        :func:`loraopt.functional.psi.psi_step` with the layers stacked on a leading dimension: the few hundred
        r x r solves and small products of a model then cost a few dozen launches instead of ~100 per layer.  A layer
        holding rows (few rows, K >= 1) shares a bucket with the layers of its shape that hold as many rows.
        ``foreach=False`` makes
        every layer a bucket of one: the per-layer reference, tested equal in float64."""
        buckets: Dict[tuple, list] = {}
        for layer, obs in observed:
            if not self._foreach:
                key: tuple = ("layer", layer.index)
            else:
                state_a = self.state[layer.A]
                m_shape = tuple(state_a["momentum_A"].shape) if "momentum_A" in state_a else None
                # Rows stack when the layers saw the same number of rows (one batch through every layer).
                form = "projected" if obs.left is not None else "dense" if obs.G is not None else ("rows", obs.n_rows)
                key = (form, layer.rank, layer.d_in, layer.d_out, layer.A.device, m_shape)
            buckets.setdefault(key, []).append((layer, obs))
        return [self._lora_step_batched(group, items, reduced, clip) for items in buckets.values()]

    def _metric_input(self, group, layers, reds) -> Optional[MetricInput]:
        return None

    def _momentum_state(self, layers) -> Optional[Tuple[List[Tensor], ...]]:
        """Per momentum tensor of the functional step, the list of state tensors of ``layers`` (``None``: none)."""
        states_a = [self.state[layer.A] for layer in layers]
        states_b = [self.state[layer.B] for layer in layers]
        if "momentum_A" in states_a[0]:
            return [st["momentum_B"] for st in states_b], [st["momentum_A"] for st in states_a]
        if "previous_factor" in states_a[0]:
            return tuple(
                [st[key] for st in states]
                for key, states in (("momentum_buffer", states_a), ("momentum_buffer", states_b),
                                    ("previous_factor", states_a), ("previous_factor", states_b))
            )
        return None

    def _lora_step_batched(self, group, items, reduced, clip) -> "_Commit":
        """Gather the stacked factors, gradient, momentum and metric of one bucket, run the functional step, and
        return what to write back."""
        layers = [layer for layer, _ in items]
        reds = [reduced[id(obs)] for _, obs in items]
        lr = group["lr"]
        g_coef, m_coef = self._coefficients(group)
        if clip is not None:
            g_coef = clip * g_coef
        device = layers[0].A.device
        roots = tuple(math.sqrt(layer.scaling) for layer in layers)
        # One Python number when the layers share their scaling (the usual case); otherwise a device tensor made
        # once and cached (the scalings are fixed), not a host-to-device copy per step.
        if all(v == roots[0] for v in roots):
            root = roots[0]
        else:
            root = self._root_cache.get((roots, device))
            if root is None:
                root = self._root_cache[(roots, device)] = torch.tensor(roots, device=device).view(-1, 1, 1)
        A_params, B_params = [layer.A for layer in layers], [layer.B for layer in layers]
        # Plain fp32 matrices (PEFT Linear with fp32 adapters) are stacked as they are: a per-layer reshape/cast
        # would cost a dispatcher call per layer, and host time is what bounds this step.
        dtype = _compute_dtype(layers[0])
        plain = all(a.dim() == 2 and a.dtype == dtype and not is_dtensor(a) for a in A_params + B_params)
        if plain:
            A_raw, B_raw = torch.stack(A_params), torch.stack(B_params)
        else:
            A_raw = torch.stack([_whole_a(layer, dtype) for layer in layers])
            B_raw = torch.stack([_whole_b(layer, dtype) for layer in layers])
        first = items[0][1]
        if first.left is not None:
            grad = Gradient(torch.stack([red["left"] for red in reds]), torch.stack([red["right"] for red in reds]),
                            projected=True)
        elif first.G is not None:
            grad = Gradient(torch.stack([obs.G for _, obs in items]), None)
        elif len(items) == 1:  # rows
            X, S = first.rows()
            grad = Gradient(S.mT.unsqueeze(0), X.unsqueeze(0))
        else:  # rows of the same length, stacked
            rows = [obs.rows() for _, obs in items]
            grad = Gradient(torch.stack([S.mT for _, S in rows]), torch.stack([X.to(S.dtype) for X, S in rows]))
        momentum_lists = self._momentum_state(layers)
        momentum = None if momentum_lists is None else tuple(torch.stack(ts) for ts in momentum_lists)
        metric = self._metric_input(group, layers, reds)
        balance = group.get("momentum_balance", "svd")
        reference_compat = group.get("reference_compat", False)
        # The fast path balances the low-rank momentum of every bucket at the end of the step, with one batched SVD
        # (_balance_momentum); the per-layer reference balances inside the functional step.  Same arithmetic.
        defer_balance = (self._foreach and self._variant == "psi" and momentum_lists is not None and balance == "svd"
                         and m_coef > 0 and not (reference_compat and group["inner_iters"] == 0))
        config = PSIConfig(
            variant=self._variant, iters=group["inner_iters"], jitter=group["jitter"],
            momentum_balance=balance,
            momentum_prox=group.get("momentum_prox") or 0.0, reference_compat=reference_compat,
            balance_in_step=not defer_balance,
        )
        result = self._step_fn(
            A_raw * root, B_raw * root, grad, lr=lr, grad_coef=g_coef, momentum_coef=m_coef, lam=self._lam(group),
            lam_momentum=None if group.get("momentum_prox") is not None else lr * group["lmbd_momentum"],
            anchor_coef=1.0 - lr * group["weight_decay"],
            momentum=momentum, metric=metric, config=config,
            all_reduce=self._dist.mean if self._dist.active else None,
        )
        targets: List[Tuple[List[Tensor], Tensor, Tensor]] = [
            (A_params, result.A / root, A_raw), (B_params, result.B / root, B_raw),
        ]
        deferred = None
        if momentum_lists is not None and defer_balance:
            deferred = (momentum_lists, result.momentum, momentum)
        elif momentum_lists is not None:
            targets += [(ts, new, old) for ts, new, old in zip(momentum_lists, result.momentum, momentum)]
        if metric is not None:
            targets += [
                ([self.state[layer.A]["metric_in"] for layer in layers], result.metric[0], metric.v_in),
                ([self.state[layer.B]["metric_out"] for layer in layers], result.metric[1], metric.v_out),
            ]
        torch._foreach_add_([self.state[layer.A]["solve_fallbacks"] for layer in layers],
                            list(result.fallbacks.unbind(0)))
        return _Commit(targets, result.ok, deferred)

    def _balance_momentum(self, commits: List["_Commit"], ok: Tensor) -> None:
        """Balance the new low-rank momentum of every bucket (balanced SVD form, ``functional.psi.balance_many``:
        one batched k x k SVD for all buckets) and write it back where the step went through (``ok``; the old
        momentum, already balanced, stays otherwise).  Runs last in the step: ``linalg.svd`` reads its convergence
        flags on the host, which on CUDA waits for the device, and with nothing left to launch after it the wait
        exposes only this tail instead of the rest of the step."""
        pending = [c.deferred for c in commits if c.deferred is not None]
        if not pending:
            return
        balanced = balance_many([(new[0], new[1]) for _, new, _ in pending], mode="svd")
        for (lists, _, old), pair in zip(pending, balanced):
            for destinations, value, previous in zip(lists, pair, old):
                value = torch.where(ok, value, previous)
                torch._foreach_copy_(destinations, [v.view_as(d) for v, d in zip(value.unbind(0), destinations)])


class _Commit:
    """New values for a bucket's parameters and state, written back once the whole step is known to be finite
    (``deferred``: the new low-rank momentum, written by ``_balance_momentum`` after balancing)."""

    def __init__(self, targets: List[Tuple[List[Tensor], Tensor, Tensor]], ok: Tensor, deferred=None):
        self.targets, self.ok, self.deferred = targets, ok, deferred

    def write(self, ok: Tensor) -> None:
        """Copy the new values (where ``ok``; the old ones elsewhere) into the parameters and state tensors."""
        for destinations, new, old in self.targets:
            value = torch.where(ok, new, old)
            if any(is_dtensor(d) for d in destinations):  # FSDP2 parameters: each rank writes its shard
                for v, d in zip(value.unbind(0), destinations):
                    write_full_(d, v.reshape(d.shape))
                continue
            torch._foreach_copy_(destinations, [v.view_as(d) for v, d in zip(value.unbind(0), destinations)])


_ARGS_DOC = r"""
    Args:
        params: ``model.named_parameters()`` (or groups with ``param_names``); ``None`` takes every trainable
            parameter of ``model``.  LoRA factors are paired by name; everything else is an "other" parameter.
        model: the (PEFT) model whose LoRA layers are hooked.
        lr: step size on Delta W (independent of alpha, r and rsLoRA: the math runs on the effective factors).
        inner_iters: K, alternating LoRSum rounds; 0 is the Jacobi (Riemannian-preconditioned) round.
        lmbd: proximal weight; lambda = lr * lmbd follows the learning-rate schedule.
        lmbd_momentum: proximal weight of the momentum LoRSum (default: ``lmbd``).
        rank_mult: momentum rank r_m = round(r * rank_mult).
        weight_decay: decoupled decay on Delta W (anchor coefficient 1 - lr * wd) and on other parameters.
        max_grad_norm: clip the full gradient (captured G of every layer plus other parameters' .grad) to this
            norm inside the optimizer; 0 disables.  Disable the trainer's own clipping: it never sees G.
        jitter: added to the diagonal of every r x r system.
        momentum_balance: ``"svd"`` (default) keeps the low-rank momentum in balanced SVD form after each update
            (``M_B = U sqrt(S)``, ``M_A = sqrt(S) V^T``; the product is unchanged), which keeps its solves well
            conditioned; ``"norm"`` only equalises the factor norms; ``"none"`` is the reference code.
        reference_compat: reproduce the reference code where it differs from the paper, which is only at K = 0
            (its unscaled LoRSum is a no-op there: plain PSI-LoRA does not move and no momentum updates).  For
            comparisons with published runs; it changes nothing at K >= 1.
        capture: ``"auto"`` (stream at K = 0, rows otherwise), ``"rows"`` or ``"stream"``.
        row_budget: rows mode: error when a layer captures more rows than this in one step.
        seed: seeds the momentum subspace M_A per layer (identical on every rank).
        strict: a layer with a gradient but no captured activations is an error (else one warning, skipped).
        process_group: the group to average rank-local data over (default: the world, when initialised).
        foreach: update all layers of one shape with batched products and batched r x r solves (the fast path,
            default); ``False`` runs the per-layer reference loop (same math, tested equal in float64).
        dense: ``"auto"`` holds a layer's gradient as the dense ``d_out x d_in`` matrix instead of its rows when
            that is smaller (rows mode), and projects the dense micro-batch gradient when that is cheaper (stream
            mode); ``"never"`` keeps the row forms.  Same math either way.
        compile: run the batched step through ``torch.compile`` (``True``), eagerly (``False``), or ``"auto"``
            (default): compiled on CUDA, eager elsewhere.  Each bucket shape compiles at its first step; if the
            compiler fails, one warning and the eager step from then on (same math; ``foreach=False`` and
            distributed runs always step eagerly).
"""


class PSILoRA(_ProjectedSubspaceOptimizer):
    __doc__ = (
        """PSI-LoRA: proximal subspace iteration with a low-rank heavy-ball momentum.

    Per LoRA layer: ``Delta W <- LoRSum_r(Delta W - lr ((1 - dampening) c G + momentum * M))`` and
    ``M <- LoRSum_{r_m}(momentum * M + (1 - dampening) c G)``.  Other trainable parameters: SGD with momentum or
    AdamW (``other_optimizer``).  Build it with ``loraopt.create_optimizer("psi-lora", model)``: the factory's
    defaults are the recommended settings (lr 0.03, K = 1, momentum 0.9, clipping 1.0, an AdamW head at 3e-3); this
    class's own defaults are the paper's (no momentum, no clipping, SGD for the other parameters).
"""
        + _ARGS_DOC
        + """        momentum, dampening: heavy-ball coefficients (torch.optim.SGD convention).
        other_optimizer: the rule for parameters that are not LoRA factors: ``"sgd"`` (SGD with this group's
            momentum, the reference) or ``"adam"`` (AdamW with ``adam_betas``, ``adam_eps``).
    """
    )

    _factory_name = "create_psi_lora_optimizer"

    def __init__(
        self,
        params: Optional[Iterable] = None,
        *,
        model: nn.Module,
        lr: float,
        inner_iters: int = 1,
        lmbd: float = 1e-2,
        lmbd_momentum: Optional[float] = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        rank_mult: float = 1.0,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        jitter: float = 1e-6,
        momentum_balance: str = "svd",
        momentum_prox: Optional[float] = None,
        other_optimizer: str = "sgd",
        adam_betas: Tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        reference_compat: bool = False,
        capture: str = "auto",
        row_budget: Optional[int] = 1 << 20,
        seed: int = 0,
        strict: bool = True,
        process_group: Optional[Any] = None,
        foreach: bool = True,
        dense: str = "auto",
        compile: Union[bool, str] = "auto",
    ):
        check_nonnegative("lr", lr)
        check_int("inner_iters", inner_iters, 0)
        check_nonnegative("lmbd", lmbd)
        lmbd_momentum = lmbd if lmbd_momentum is None else lmbd_momentum
        check_nonnegative("lmbd_momentum", lmbd_momentum)
        check_range("momentum", momentum, 0.0, 1.0)
        check_range("dampening", dampening, 0.0, 1.0)
        check_positive("rank_mult", rank_mult)
        check_nonnegative("weight_decay", weight_decay)
        check_nonnegative("max_grad_norm", max_grad_norm)
        check_nonnegative("jitter", jitter)
        _check_balance(momentum_balance)
        if momentum_prox is not None:
            check_nonnegative("momentum_prox", momentum_prox)
        if other_optimizer not in ("sgd", "adam"):
            raise ValueError(f"other_optimizer must be 'sgd' or 'adam', got {other_optimizer!r}")
        _check_adam(adam_betas, adam_eps)
        defaults = dict(
            lr=lr, inner_iters=inner_iters, lmbd=lmbd, lmbd_momentum=lmbd_momentum, momentum=momentum,
            dampening=dampening, rank_mult=rank_mult, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
            jitter=jitter, momentum_balance=momentum_balance, momentum_prox=momentum_prox,
            other_optimizer=other_optimizer, adam_betas=tuple(adam_betas), adam_eps=adam_eps,
            reference_compat=reference_compat,
        )
        super().__init__(
            params, model, defaults, capture=capture, row_budget=row_budget, seed=seed, strict=strict,
            process_group=process_group, foreach=foreach, dense=dense, compile=compile,
        )

    def _coefficients(self, group):
        return 1.0 - group["dampening"], group["momentum"]


class ProjPSILoRA(PSILoRA):
    __doc__ = (
        """Proj. PSI-LoRA: a momentum-free LoRSum step with heavy-ball momentum kept in factor space.

    Per LoRA layer: ``Delta W <- LoRSum_r(Delta W - lr (1 - dampening) c G)``; then, at the new factors, the
    preconditioned factor gradients ``g_A = (B^T B + lam I)^-1 B^T G``, ``g_B = G A^T (A A^T + lam I)^-1``, the old
    buffers transported to the new factors (``T_A = (B^T B + lam I)^-1 B^T B_prev buf_A``, likewise ``T_B``),
    ``buf <- momentum T + (1 - dampening) c g`` and ``A -= lr momentum T_A``, ``B -= lr momentum T_B``
    (docs/specs/psi-lora.md §3b; the variant the paper's authors ran on GLUE).  The momentum costs two factor-shaped
    buffers per factor and no extra LoRSum.  Other trainable parameters: SGD with momentum.
    Build it with :func:`create_proj_psi_lora_optimizer` or ``loraopt.create_optimizer("proj-psi-lora", model)``.
"""
        + _ARGS_DOC
        + """        momentum, dampening: heavy-ball coefficients (torch.optim.SGD convention).
        (``rank_mult``, ``lmbd_momentum`` and ``momentum_balance`` do not apply: the buffers have the factors'
        shapes.)  The gradient is held as rows or as the dense ``G`` (never streamed), since it is projected on
        the new factors.
    """
    )

    _factory_name = "create_proj_psi_lora_optimizer"
    _variant = "proj"


class ScaledPSILoRA(_ProjectedSubspaceOptimizer):
    __doc__ = (
        """Scaled PSI-LoRA: LoRSum in a diagonal, fractional-power K-FAC or Shampoo metric.

    Per LoRA layer: ``v_in, v_out <- EMA_beta2(stat(X, S))``, ``P = (v + damping)^power``, then the weighted LoRSum
    of ``Delta W - lr P_out^-1 ((1 - beta1) c G + beta1 M) P_in^-1`` and ``M <- LoRSum(beta1 M + (1 - beta1) c G)``.
    At K = 0 (default) this is damped diagonal K-FAC with power p applied to each factor.  Other trainable
    parameters: Adam (bias-corrected, decoupled weight decay) with their group's lr.
    Build it with ``loraopt.create_optimizer("scaled-psi-lora", model)``: the factory's defaults are the recommended
    settings (lr 0.3, ``metric_scale="relative"``, bias correction, damping 1e-2, ``momentum_prox=1e-2``, head at
    3e-3); this class's own defaults are the paper's metric, which collapsed above lr 0.06 on MiniLM / SST-2.
"""
        + _ARGS_DOC
        + """        betas: (beta1, beta2): momentum EMA and metric EMA (no bias correction).
        damping, power: P = (v + damping) ** power.
        metric: ``"kfac"`` (EMA of squared input / output rows) or ``"shampoo"`` (diag(G^T G), diag(G G^T)).
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over rows (undoes 1/N inside S for the metric).
        adam_betas, adam_eps: Adam for the other parameters.
        bias_correction: use the metric EMA with its unit start removed (``(v - beta2^t) / (1 - beta2^t)``).
        metric_scale: ``"absolute"`` (the paper: ``P = (v + damping)^power``) or ``"relative"`` (damping relative
            to mean(v) and ``P`` normalised to mean 1 per layer: the metric redistributes the step, the lr sets its
            size, whatever the loss's scale).
    """
    )

    _factory_name = "create_scaled_psi_lora_optimizer"
    _scaled = True

    def __init__(
        self,
        params: Optional[Iterable] = None,
        *,
        model: nn.Module,
        lr: float,
        inner_iters: int = 0,
        lmbd: float = 1e-2,
        lmbd_momentum: Optional[float] = None,
        betas: Tuple[float, float] = (0.9, 0.99),
        damping: float = 1e-5,
        power: float = 0.5,
        metric: str = "kfac",
        loss_reduction: str = "mean",
        rank_mult: float = 1.0,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        adam_betas: Tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        bias_correction: bool = False,
        metric_scale: str = "absolute",
        jitter: float = 1e-6,
        momentum_balance: str = "svd",
        momentum_prox: Optional[float] = None,
        reference_compat: bool = False,
        capture: str = "auto",
        row_budget: Optional[int] = 1 << 20,
        seed: int = 0,
        strict: bool = True,
        process_group: Optional[Any] = None,
        foreach: bool = True,
        dense: str = "auto",
        compile: Union[bool, str] = "auto",
    ):
        check_nonnegative("lr", lr)
        check_int("inner_iters", inner_iters, 0)
        check_nonnegative("lmbd", lmbd)
        lmbd_momentum = lmbd if lmbd_momentum is None else lmbd_momentum
        check_nonnegative("lmbd_momentum", lmbd_momentum)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_range("betas[0]", betas[0], 0.0, 1.0)
        check_range("betas[1]", betas[1], 0.0, 1.0)
        check_positive("damping", damping)
        check_range("power", power, 0.0, 1.0, high_inclusive=True)
        if metric not in ("kfac", "shampoo"):
            raise ValueError(f"metric must be 'kfac' or 'shampoo', got {metric!r}")
        if metric_scale not in ("absolute", "relative"):
            raise ValueError(f"metric_scale must be 'absolute' or 'relative', got {metric_scale!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        check_positive("rank_mult", rank_mult)
        check_nonnegative("weight_decay", weight_decay)
        check_nonnegative("max_grad_norm", max_grad_norm)
        _check_adam(adam_betas, adam_eps)
        check_nonnegative("jitter", jitter)
        _check_balance(momentum_balance)
        if momentum_prox is not None:
            check_nonnegative("momentum_prox", momentum_prox)
        defaults = dict(
            lr=lr, inner_iters=inner_iters, lmbd=lmbd, lmbd_momentum=lmbd_momentum, betas=tuple(betas),
            damping=damping, power=power, metric=metric, loss_reduction=loss_reduction, rank_mult=rank_mult,
            weight_decay=weight_decay, max_grad_norm=max_grad_norm, adam_betas=tuple(adam_betas), adam_eps=adam_eps,
            bias_correction=bool(bias_correction), metric_scale=metric_scale, jitter=jitter, other_optimizer="adam", momentum_balance=momentum_balance, momentum_prox=momentum_prox,
            reference_compat=reference_compat,
        )
        self._loss_reduction = loss_reduction
        super().__init__(
            params, model, defaults, capture=capture, row_budget=row_budget, seed=seed, strict=strict,
            process_group=process_group, foreach=foreach, dense=dense, compile=compile,
        )

    def _coefficients(self, group):
        beta1 = group["betas"][0]
        return 1.0 - beta1, beta1

    def _lam(self, group):
        return max(group["lr"] * group["lmbd"], _SCALED_LAM_FLOOR)

    def _mean_loss(self, obs):
        return self._loss_reduction == "mean"

    def _init_metric_state(self, layer):
        # The reference starts the EMA at one; a bias-corrected EMA starts at zero (functional.metrics.debias).
        group = self.param_groups[self._group_index(layer)]
        start = torch.zeros if group.get("bias_correction", False) else torch.ones
        dtype = _compute_dtype(layer)
        self.state[layer.A]["metric_in"] = start(layer.d_in, device=layer.A.device, dtype=dtype)
        self.state[layer.B]["metric_out"] = start(layer.d_out, device=layer.B.device, dtype=dtype)

    def _metric_input(self, group, layers, reds) -> MetricInput:
        """The stacked metric EMAs and this step's statistics (``(L, d_in)``, ``(L, d_out)``)."""
        beta2 = group["betas"][1]
        device = layers[0].A.device
        v_in = torch.stack([self.state[layer.A]["metric_in"] for layer in layers])
        v_out = torch.stack([self.state[layer.B]["metric_out"] for layer in layers])
        if group["metric"] == "kfac":
            n = stack_or_scalar([red["n_rows"] for red in reds], device)
            stat_in = torch.stack([red["x_sq"] for red in reds]) / n
            k2 = stack_or_scalar([red["s_sq_scale"] for red in reds], device)
            stat_out = torch.stack([red["s_sq"] for red in reds]) * (k2 / n)
        else:
            k2 = stack_or_scalar([red["shampoo_scale"] for red in reds], device)
            stat_in = torch.stack([red["shampoo_in"] for red in reds]) * k2
            stat_out = torch.stack([red["shampoo_out"] for red in reds]) * k2
        # The step counter is a CPU tensor: its value is a host number (no device sync).
        step = float(self.state[layers[0].A]["step"]) + 1.0
        return MetricInput(v_in, v_out, stat_in, stat_out, beta2=beta2, damping=group["damping"],
                           power=group["power"], step=step, bias_correction=group.get("bias_correction", False),
                           relative=group.get("metric_scale", "absolute") == "relative")


# ------------------------------------------------------------------------------------------------- factories


def _groups(model: nn.Module, lora_overrides: Dict[str, Any], other_overrides: Dict[str, Any]) -> List[Dict[str, Any]]:
    require_unsharded_model(model, "PSI-LoRA")
    split = split_lora_parameters(model)
    if not split.layers:
        raise NoLoRALayersError(
            "no trainable LoRA layer found: wrap the model with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    lora = split.lora_named_parameters()
    groups = [dict(params=[p for _, p in lora], param_names=[n for n, _ in lora], **lora_overrides)]
    if split.other:
        groups.append(
            dict(params=[p for _, p in split.other], param_names=[n for n, _ in split.other], **other_overrides)
        )
    return groups


def _drop_none(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


# The recommended settings (the factories' defaults), from the one-epoch SST-2 / MiniLM sweep of benchmarks/README.md
# (H200, 3 seeds; lr 0.03 is PSI-LoRA's and Proj. PSI-LoRA's best there) and short CPU checks (benchmarks/notes/psi.md):
# the head at AdamW's usual 3e-3 learns much faster than at 1e-3, and lr 0.1, better for 60-step text runs, was
# unstable on EfficientNet (100 steps: 62-66 % against 83-87 % at lr 0.03).
PSI_DEFAULTS = dict(lr=3e-2, inner_iters=1, lmbd=1e-2, momentum=0.9, max_grad_norm=1.0, other_optimizer="adam")
OTHER_ADAM_LR = 3e-3
SCALED_DEFAULTS = dict(lr=0.3, metric_scale="relative", bias_correction=True, damping=1e-2, momentum_prox=1e-2,
                       other_lr=OTHER_ADAM_LR)


def _other_group(other_optimizer: str, lr: float, other_lr, other_momentum, other_weight_decay) -> Dict[str, Any]:
    if other_lr is None:
        # Adam on a head wants an Adam learning rate, not the LoRA step on Delta W; SGD follows the LoRA group.
        other_lr = OTHER_ADAM_LR if other_optimizer == "adam" else lr
    check_nonnegative("other_lr", other_lr)
    return _drop_none(dict(lr=other_lr, momentum=other_momentum, weight_decay=other_weight_decay))


def _build_heavy_ball(cls, model: nn.Module, *, other_lr, other_momentum, other_weight_decay, **kwargs: Any):
    """PSI-LoRA or Proj. PSI-LoRA over ``model``: the LoRA group and the ``other`` group (see the factories)."""
    groups = _groups(model, {}, _other_group(kwargs["other_optimizer"], kwargs["lr"], other_lr, other_momentum,
                                             other_weight_decay))
    return cls(groups, model=model, **kwargs)


def create_psi_lora_optimizer(
    model: nn.Module,
    *,
    lr: float = PSI_DEFAULTS["lr"],
    inner_iters: int = PSI_DEFAULTS["inner_iters"],
    lmbd: float = PSI_DEFAULTS["lmbd"],
    momentum: float = PSI_DEFAULTS["momentum"],
    max_grad_norm: float = PSI_DEFAULTS["max_grad_norm"],
    other_optimizer: str = PSI_DEFAULTS["other_optimizer"],
    other_lr: Optional[float] = None,
    other_momentum: Optional[float] = None,
    other_weight_decay: Optional[float] = None,
    **kwargs: Any,
) -> PSILoRA:
    """PSI-LoRA (arXiv 2602.16456) over a PEFT LoRA model, with the recommended settings as defaults.

    Two parameter groups: ``lora`` (paired factors) and ``other`` (every other trainable parameter).  The other
    parameters take AdamW at ``other_lr`` (default 3e-3) or, with ``other_optimizer="sgd"`` (the reference), SGD
    with momentum at ``other_lr`` / ``other_momentum`` (default: ``lr`` / ``momentum``).  Defaults: lr 0.03,
    K = 1, heavy-ball momentum 0.9 (kept in balanced SVD form), clipping at 1.0.  Remaining keyword arguments are
    :class:`PSILoRA` arguments.
    """
    return _build_heavy_ball(PSILoRA, model, lr=lr, inner_iters=inner_iters, lmbd=lmbd, momentum=momentum,
                             max_grad_norm=max_grad_norm, other_optimizer=other_optimizer, other_lr=other_lr,
                             other_momentum=other_momentum, other_weight_decay=other_weight_decay, **kwargs)


def create_proj_psi_lora_optimizer(
    model: nn.Module,
    *,
    lr: float = PSI_DEFAULTS["lr"],
    inner_iters: int = PSI_DEFAULTS["inner_iters"],
    lmbd: float = PSI_DEFAULTS["lmbd"],
    momentum: float = PSI_DEFAULTS["momentum"],
    max_grad_norm: float = PSI_DEFAULTS["max_grad_norm"],
    other_optimizer: str = PSI_DEFAULTS["other_optimizer"],
    other_lr: Optional[float] = None,
    other_momentum: Optional[float] = None,
    other_weight_decay: Optional[float] = None,
    **kwargs: Any,
) -> ProjPSILoRA:
    """Proj. PSI-LoRA (arXiv 2602.16456, factor-space momentum) over a PEFT LoRA model, with the recommended
    settings as defaults (as :func:`create_psi_lora_optimizer`).  Remaining keyword arguments are
    :class:`ProjPSILoRA` arguments.
    """
    return _build_heavy_ball(ProjPSILoRA, model, lr=lr, inner_iters=inner_iters, lmbd=lmbd, momentum=momentum,
                             max_grad_norm=max_grad_norm, other_optimizer=other_optimizer, other_lr=other_lr,
                             other_momentum=other_momentum, other_weight_decay=other_weight_decay, **kwargs)


def create_scaled_psi_lora_optimizer(
    model: nn.Module,
    *,
    lr: float = SCALED_DEFAULTS["lr"],
    metric_scale: str = SCALED_DEFAULTS["metric_scale"],
    bias_correction: bool = SCALED_DEFAULTS["bias_correction"],
    damping: float = SCALED_DEFAULTS["damping"],
    momentum_prox: Optional[float] = SCALED_DEFAULTS["momentum_prox"],
    other_lr: float = SCALED_DEFAULTS["other_lr"],
    other_weight_decay: Optional[float] = None,
    **kwargs: Any,
) -> ScaledPSILoRA:
    """Scaled PSI-LoRA (arXiv 2602.16456) over a PEFT LoRA model, with the recommended settings as defaults.

    Two parameter groups: ``lora`` and ``other`` (Adam at ``other_lr``; a scheduler scales both groups, so the
    other parameters follow the LoRA schedule).  Defaults: lr 0.3 with the scale-free metric
    (``metric_scale="relative"``, bias-corrected, damping 1e-2 relative to the metric's mean) and a momentum whose
    proximal weight follows its own scale (``momentum_prox=1e-2``).  The paper's settings are
    ``metric_scale="absolute", bias_correction=False, damping=1e-5, momentum_prox=None`` (lr 0.2 there; on MiniLM /
    SST-2 they collapse above lr 0.06).  Remaining keyword arguments are :class:`ScaledPSILoRA` arguments.
    """
    check_nonnegative("other_lr", other_lr)
    groups = _groups(model, {}, _drop_none(dict(lr=other_lr, weight_decay=other_weight_decay)))
    return ScaledPSILoRA(groups, model=model, lr=lr, metric_scale=metric_scale, bias_correction=bias_correction,
                         damping=damping, momentum_prox=momentum_prox, **kwargs)


create_psi_lora_optimizer.forwards_to = PSILoRA  # type: ignore[attr-defined]
create_proj_psi_lora_optimizer.forwards_to = ProjPSILoRA  # type: ignore[attr-defined]
create_scaled_psi_lora_optimizer.forwards_to = ScaledPSILoRA  # type: ignore[attr-defined]


def _compute_dtype(layer: LoRALayer) -> torch.dtype:
    """fp32 for 16- and 32-bit factors (state and math stay fp32), fp64 for fp64 factors (the reference tests)."""
    return torch.promote_types(layer.A.dtype, torch.float32)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def _whole_a(layer: LoRALayer, dtype: torch.dtype) -> Tensor:
    """``A`` as a whole ``(r, d_in)`` matrix in ``dtype`` (gathered when FSDP2 shards it)."""
    if is_dtensor(layer.A):
        return full_tensor(layer.A.detach()).reshape(layer.rank, -1).to(dtype)
    return layer.a_matrix(dtype)


def _whole_b(layer: LoRALayer, dtype: torch.dtype) -> Tensor:
    """``B`` as a whole ``(d_out, r)`` matrix in ``dtype`` (gathered when FSDP2 shards it)."""
    if is_dtensor(layer.B):
        return full_tensor(layer.B.detach()).reshape(layer.d_out, -1).to(dtype)
    return layer.b_matrix(dtype)


def _grad_version(layer: LoRALayer) -> Tuple[int, int]:
    """Identity and in-place version of ``lora_A``'s gradient: host-side, no synchronisation."""
    grad = layer.A.grad
    return (0, -1) if grad is None else (id(grad), grad._version)


def _check_balance(value: str) -> None:
    if value not in ("svd", "norm", "none"):
        raise ValueError(f"momentum_balance must be 'svd', 'norm' or 'none', got {value!r}")


def _check_adam(betas, eps) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"adam_betas must be a pair (beta1, beta2), got {betas!r}")
    check_range("adam_betas[0]", betas[0], 0.0, 1.0)
    check_range("adam_betas[1]", betas[1], 0.0, 1.0)
    check_positive("adam_eps", eps)
