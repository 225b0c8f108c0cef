"""The step of PSI-LoRA, Proj. PSI-LoRA and Scaled PSI-LoRA (:mod:`loraopt.optim.psi`), all or nothing.

A step takes every layer's captured observation, reduces it over ranks and clips it (:mod:`.psi_gather`), buckets
the layers by shape and gradient form, calls :func:`loraopt.functional.psi.psi_step` once per bucket with the layers
stacked on a leading dimension, updates the other parameters (Adam(W) or SGD with momentum), and only then writes
every result back under one device-side finiteness flag: a non-finite value anywhere leaves every parameter and
state tensor as it was.  Counters (steps, skips, solve fallbacks) are updated on the device and read on the host
through non-blocking copies, so the step does not wait for the device.
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..functional.metrics import (factored_step_scales, full_step_scale, grad_row_col_sq, layer_grad_sq_norms,
                                  layer_step_scale)
from ..functional.psi import Gradient, MetricInput, PSIConfig
from ..lora.capture import LayerObservation
from ..lora.layers import LoRALayer
from .counters import DeferredHostRead
from .psi_base import _PSIOptimizerBase
from .psi_checks import grads_edited, missing_message
from .psi_gather import (
    Commit,
    balance_momentum,
    clip_norm,
    grad_version,
    local,
    reduce_observations,
    stack_factors,
    stack_gradient,
)

__all__ = ["_ProjectedSubspaceOptimizer"]

_FALLBACK_CHECK_INTERVAL = 64  # steps between the (non-blocking) reads of the solve-fallback counters

# normalize="layer": added to the root of the EMA so that a layer whose gradient is exactly zero takes no step.
NORMALIZE_EPS = 1e-12
# normalize="factored": damping of the row / column EMAs relative to their mean (see factored_step_scales).
FACTORED_EPS = 1e-8


class _ProjectedSubspaceOptimizer(_PSIOptimizerBase):
    """The PSI-family step on top of :class:`~loraopt.optim.psi_base._PSIOptimizerBase` (layers, hooks, state)."""

    # ------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        try:
            self._step()
        except BaseException:
            self._capture.clear()
            try:  # the probes of what the factors are now; a failing push must not hide the step's error
                self._push_probes()
            except Exception:
                self._capture.clear_probes()  # the next backward then says that probes are missing
            raise
        self._capture.clear()
        # Stream mode: the factors and momentum changed, push the probes the next backward projects on.
        self._push_probes()
        return loss

    def _step(self) -> None:
        self._rebind_if_swapped()
        begin = getattr(self._step_fn, "begin_step", None)
        if begin is not None:  # the CUDA-graph step counts its calls per step (equal buckets get their own capture)
            begin()
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
            for layer, obs in zip(layers, self._capture.observations_of(layers)):
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
        factor_grads = [local(p.grad) for layer in observed_layers for p in (layer.A, layer.B) if p.grad is not None]
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
        balance_momentum(commits, ok)  # last: its SVD waits for the device on CUDA
        # Remember which gradients this step consumed: a second step() on the same ones is named as such.
        self._consumed = {layer.index: grad_version(layer) for layer in observed_layers}

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
            tensors = [local(t) for t in tensors]  # FSDP2: this rank's shards
            self._others_before.append((tensors, [t.clone() for t in tensors], state))
            self._update_other(group, param, grad)
            finite.append(torch.isfinite(local(grad)).all() & torch.isfinite(local(param)).all())
        return torch.stack(finite)

    def _restore_others_unless(self, ok: Tensor) -> None:
        for tensors, before, state in getattr(self, "_others_before", []):
            for t, old in zip(tensors, before):
                t.copy_(torch.where(ok, t, old))
        self._others_before = []

    def _missing(self, layer: Optional[LoRALayer], obs: Optional[LayerObservation] = None) -> None:
        msg = missing_message(type(self).__name__, layer, obs, self._consumed)
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
        if grads_edited(active_groups, reduced):
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
        return reduce_observations(observations, self._dist, self._mean_loss)

    def _mean_loss(self, obs: LayerObservation) -> bool:
        return True

    def _clip_coefficients(self, active_groups, reduced) -> List[Optional[Tensor]]:
        if not any(group["max_grad_norm"] > 0 for group, _, _ in active_groups):
            return [None] * len(active_groups)
        norm, accumulated_stream = clip_norm(active_groups, self._dist)
        if accumulated_stream and not self._warned_accumulated_clip:
            self._warned_accumulated_clip = True
            warnings.warn(
                f"{type(self).__name__}: gradient accumulation with max_grad_norm > 0 in streaming mode "
                "(inner_iters=0) clips by the sum of the micro-batches' gradient norms, an upper bound "
                "of the accumulated gradient's norm: when clipping is active the step is smaller than "
                "that of one large batch. For exact clipping under accumulation pass capture='rows' "
                "(it keeps the rows or the dense gradient until step()).",
                stacklevel=4,
            )
        coefs: List[Optional[Tensor]] = []
        for group, _, _ in active_groups:
            max_norm = group["max_grad_norm"]
            coefs.append((max_norm / (norm + 1e-6)).clamp(max=1.0) if max_norm > 0 else None)
        return coefs

    # ------------------------------------------------------------------------------------------- the LoRA step

    def _lora_steps(self, group, observed, reduced, clip) -> List["Commit"]:
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

    def _layer_normalization(self, group, layers, grad, g_coef):
        """``normalize="layer"``: the gradient coefficient times each layer's ``1 / RMS`` of ``G`` (an ``(L, 1, 1)``
        tensor), and the write-back of the EMAs.  Under data parallelism the squared norm is the ranks' mean of
        their local ``|G|^2`` (the global ``G`` is never formed): like a second moment at the per-rank batch."""
        states = [self.state[layer.A]["grad_sq_avg"] for layer in layers]
        avg = torch.stack(states)
        sq = layer_grad_sq_norms(grad.left, grad.right).to(avg.dtype)
        if self._dist.active:
            sq = self._dist.mean(sq)
        numel = layers[0].d_in * layers[0].d_out  # a bucket holds one shape
        step = float(self.state[layers[0].A]["step"]) + 1.0  # a CPU tensor: no device sync
        scale, new_avg = layer_step_scale(avg, sq, numel=numel, beta2=group["normalize_beta2"], step=step,
                                          eps=NORMALIZE_EPS)
        return g_coef * scale.view(-1, 1, 1), (states, new_avg, avg)

    def _factored_normalization(self, group, layers, grad):
        """``normalize="factored"``: ``G`` scaled on both sides by Adafactor's factored second moment (each entry
        divided by the root of ``r_i c_j / mean(r)``), and the write-backs of the row and column EMAs.  Under data
        parallelism the row / column statistics are the ranks' means of their local ones."""
        col_states = [self.state[layer.A]["grad_col_sq_avg"] for layer in layers]
        row_states = [self.state[layer.B]["grad_row_sq_avg"] for layer in layers]
        col_avg, row_avg = torch.stack(col_states), torch.stack(row_states)
        row_sq, col_sq = grad_row_col_sq(grad.left, grad.right)
        row_sq, col_sq = row_sq.to(row_avg.dtype), col_sq.to(col_avg.dtype)
        if self._dist.active:
            row_sq, col_sq = self._dist.mean(row_sq), self._dist.mean(col_sq)
        step = float(self.state[layers[0].A]["step"]) + 1.0  # a CPU tensor: no device sync
        s_out, s_in, new_row, new_col = factored_step_scales(
            row_avg, col_avg, row_sq, col_sq, beta2=group["normalize_beta2"], step=step, eps=FACTORED_EPS)
        s_out, s_in = s_out.to(grad.left.dtype), s_in.to(grad.left.dtype)
        if grad.right is None:
            scaled = Gradient(grad.left * s_out.unsqueeze(-1) * s_in.unsqueeze(-2), None)
        else:
            scaled = Gradient(grad.left * s_out.unsqueeze(-1), grad.right * s_in.to(grad.right.dtype).unsqueeze(-2))
        return scaled, [(col_states, new_col, col_avg), (row_states, new_row, row_avg)]

    def _full_normalization(self, group, layers, grad):
        """``normalize="full"``: every entry of ``G`` divided by the root of its own EMA of ``G * G`` (Adam's second
        moment on the full weight; ``d_out x d_in`` numbers per layer, for measuring what the factored estimate
        leaves out).  The step then takes the dense ``G``.  Under data parallelism the squares are the ranks' mean
        of their local ones, as for the factored statistics."""
        states = [self.state[layer.A]["grad_entry_sq_avg"] for layer in layers]
        avg = torch.stack(states)
        G = grad.left if grad.right is None else grad.left @ grad.right.to(grad.left.dtype)
        sq = G.to(avg.dtype).square()
        if self._dist.active:
            sq = self._dist.mean(sq)
        step = float(self.state[layers[0].A]["step"]) + 1.0  # a CPU tensor: no device sync
        scale, new_avg = full_step_scale(avg, sq, beta2=group["normalize_beta2"], step=step, eps=FACTORED_EPS)
        return Gradient(G * scale.to(G.dtype), None), [(states, new_avg, avg)]

    def _lora_step_batched(self, group, items, reduced, clip) -> "Commit":
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
        A_params, B_params, A_raw, B_raw = stack_factors(layers)
        grad = stack_gradient(items, reds)
        normalized = []
        if group.get("normalize") == "layer":
            g_coef, layer_state = self._layer_normalization(group, layers, grad, g_coef)
            normalized.append(layer_state)
        elif group.get("normalize") == "factored":
            grad, normalized = self._factored_normalization(group, layers, grad)
        elif group.get("normalize") == "full":
            grad, normalized = self._full_normalization(group, layers, grad)
        momentum_lists = self._momentum_state(layers)
        momentum = None if momentum_lists is None else tuple(torch.stack(ts) for ts in momentum_lists)
        metric = self._metric_input(group, layers, reds)
        balance = group.get("momentum_balance", "gram")
        reference_compat = group.get("reference_compat", False)
        # The fast path balances the low-rank momentum of every bucket at the end of the step, with one batched SVD
        # (psi_gather.balance_momentum); the per-layer reference balances inside the functional step: same arithmetic.
        defer_balance = (self._foreach and self._variant == "psi" and momentum_lists is not None
                         and balance in ("svd", "gram", "polar")
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
            deferred = (momentum_lists, result.momentum, momentum, balance)
        elif momentum_lists is not None:
            targets += [(ts, new, old) for ts, new, old in zip(momentum_lists, result.momentum, momentum)]
        if metric is not None:
            targets += [
                ([self.state[layer.A]["metric_in"] for layer in layers], result.metric[0], metric.v_in),
                ([self.state[layer.B]["metric_out"] for layer in layers], result.metric[1], metric.v_out),
            ]
        targets += normalized
        torch._foreach_add_([self.state[layer.A]["solve_fallbacks"] for layer in layers],
                            list(result.fallbacks.unbind(0)))
        return Commit(targets, result.ok, deferred)
