"""LoKO: Low-Rank Kalman Optimizer (Abdi, Sun, Zhang, Kaski, Pan; arXiv 2410.11551).

Fine-tuning as online filtering: the trainable parameters (LoRA factors, DoRA magnitudes, a trained head) are the
state of an extended Kalman filter with a diagonal covariance, observed through the model outputs. No public
implementation by the authors is known; this follows ``docs/specs/loko.md``. The pieces:

* :mod:`loraopt.functional.observations`: the observation models (softmax, regression, scalar loss) as types;
* :mod:`loraopt.functional.jacobian`: the Jacobian rows (``torch.func``, one-sample graphs or the batch graph);
* :mod:`loraopt.functional.ekf`: the filter step on a typed reduced observation;
* :mod:`loraopt.optim.loko_config`: the validated settings; :mod:`loraopt.optim.loko_rows`: ``observe``'s choice
  of Jacobian path.

This module holds the optimizer: parameter groups, lazy state, and one filter step per ``step()``.

Usage (softmax observation, one update per batch)::

    opt = create_loko_optimizer(peft_model, num_outputs=num_classes)
    for x, y in stream:
        logits = peft_model(x)
        opt.observe(logits, y)      # before any backward on this graph
        opt.step()

or ``opt.step(lambda: (peft_model(x), y))``. For mini-batches pass the batch too,
``opt.observe(logits, y, inputs=x)`` (a tensor, a tuple of tensors or a dict such as a tokenizer batch): the
Jacobian rows then come from ``torch.func`` in one vectorised pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..functional.ekf import LossGradient, OutputRows, draw_p0
from ..functional.jacobian import model_outputs, output_jacobian
from ..functional.observations import (
    LossObservation,
    Observation,
    RegressionObservation,
    SoftmaxObservation,
)
from .base import LoRAOptimizer
from .distributed import DistributedContext, is_dtensor
from .loko_config import (
    DEFAULT_P_INIT,
    FILTER_KEYS,
    JACOBIAN_PATHS,
    LoKOConfig,
    check_same_filter,
    check_state_dict,
    expand_observation,
    resolve_p_init,
    resolve_noise_floor,
    resolve_r0,
    validate_group,
)
from .loko_factory import create_loko_optimizer
from .loko_rows import Pending, observe_outputs
from .loko_step import apply_loss, apply_outputs, exact_residual, filter_update

__all__ = [
    "LoKO",
    "DEFAULT_P_INIT",
    "JACOBIAN_PATHS",
    "create_loko_optimizer",
    "output_jacobian",
    "LoKOConfig",
    "SoftmaxObservation",
    "RegressionObservation",
    "LossObservation",
]


# ------------------------------------------------------------------------------------------------- optimizer


class LoKO(LoRAOptimizer):
    r"""LoKO: diagonal-covariance extended Kalman filter over the trainable (LoRA) parameters (arXiv 2410.11551).

    All parameters of all groups form one state vector :math:`\theta` with diagonal covariance :math:`p`, observed
    through the model outputs :math:`h(x;\theta)` with noise :math:`R` (``docs/specs/loko.md`` §2-4)::

        input: theta, p (P0 draw), R = r0 I, beta, q, lr
        for each observation (b samples, m outputs each):
            p <- p + q                                            (predict; q = 0: static parameters)
            e = y - h(x; theta),  H = dh/dtheta                   (one batched VJP call, (b m) x n)
            U = H * p;  S = U H^T + I_b kron R + jitter I;  L = chol(S)
            delta = U^T S^-1 e;               theta <- theta + lr * delta
            p <- max(p - p^2 * colsum(H * S^-1 H), p_floor)
            eps = e - lr H delta              (linearised post-update residual)
            R <- beta R + (1 - beta) mean_i(eps_i eps_i^T + H_i diag(p) H_i^T);   floor R

    Observations (``observation``: a string, or an instance of the types of :mod:`loraopt.functional.observations`,
    which own ``h``, ``y``, ``R_0``, the floor of ``R`` and the validation):

    * ``"softmax"`` / ``SoftmaxObservation(m)`` (default): ``h = softmax(logits)``, ``y`` one-hot (or soft)
      targets, ``m = num_outputs`` classes. Every eigenvalue of ``R`` is clamped at ``r_min`` (``noise_floor``), which keeps ``S``
      invertible and bounds the gain in every direction the update sees. ``reduce_simplex=True`` observes the first ``m - 1`` classes instead (exact and cheaper; ``R`` is then
      ``(m-1) x (m-1)``, started at the ``1``-orthogonal part of ``r0 I`` so both forms give the same updates while the
      clamp of ``R`` does not bind).
    * ``"regression"`` / ``RegressionObservation(m)``: ``h`` = the prediction, ``y`` real-valued,
      ``m = num_outputs``; ``R``'s smallest eigenvalue is floored at ``r_min``.
    * ``"loss"`` / ``LossObservation()``: the scalar-loss variant ("LoKO-scalar", §9; not the paper's method):
      ``h`` = the mean loss, target 0, ``H = .grad``; ``O(n)`` per step like AdamW. Hand the loss with ``observe(loss)`` (or return it from the
      closure) and call ``loss.backward()`` before ``step()``.

    Mini-batches (``batch_mode``):

    * ``"joint"`` (default): all ``b`` samples are one stacked observation linearised at the current parameters,
      ``S`` is ``(b m) x (b m)`` and ``R`` takes one EMA step with the mean over the samples.
    * ``"sequential"``: ``b`` single-sample updates, each at the parameters left by the previous one (the paper's
      batch-1 semantics). A fresh forward is needed per sample, so ``observe(outputs, targets, forward=f)`` takes
      ``f(i) -> outputs of sample i`` (at the current parameters); with ``b = 1`` no ``forward`` is needed and
      both modes are identical (tested).

    Why joint is the default, and what each Jacobian path costs (measured): :mod:`loraopt.optim.loko_rows`.

    Calling two ``observe`` before a ``step`` raises: concatenate the outputs (``torch.cat`` keeps the graphs) and
    targets into one call to observe several micro-batches as one joint update.

    Args:
        params: parameters or named parameters or groups. Per-group values of ``lr``, ``q``, ``p_init`` and
            ``p_floor`` act on that group's coordinates; the other hyperparameters belong to the single filter and
            must be equal in every group.
        num_outputs: ``m``, the number of classes (softmax) or outputs (regression); ignored (may be ``None``) for
            ``observation="loss"``.
        observation: ``"softmax"``, ``"regression"`` or ``"loss"``, or an observation instance (then
            ``num_outputs`` and ``reduce_simplex`` come from it).
        lr: scales the mean update only (1.0 is the filter's own step); with ``lr = 0`` a step changes nothing.
        p_init: P0. ``(low, high)``: i.i.d. uniform draws from a generator seeded by ``seed`` and the parameter's
            position; a float: constant; ``"score"``: data-driven scale (see below); ``"score-layer"``: one
            data-driven scale per parameter tensor, each tensor getting an equal share of the prior predictive
            variance (calibrated at the first of its first two updates with a non-zero Jacobian block, so a LoRA
            ``A`` is calibrated once its ``B`` has moved; ``loraopt.optim.loko_step``). Default (``None``):
            ``DEFAULT_P_INIT[observation]``, i.e. ``(1e-3, 1e-1)`` for softmax and regression and ``(1e-2, 1)`` for
            the scalar-loss observation.
        beta: forgetting factor of the ``R`` EMA, in ``[0, 1]`` (1 keeps ``R = r0 I``).
        r0: ``R_0 = r0 I``. Default (``None``): ``0.1`` for softmax and regression; ``"first-loss"`` for
            ``observation="loss"``: ``R_0 = max(0.1, L_1^2)``, set at the first update from the first observed (rank-
            averaged) loss, so that a loss that stays far from 0 (a language model's ~4 nats) is not met with
            near-Polyak steps toward 0 while the ``R`` EMA catches up (``loraopt.optim.loko_config``). ``"score"``
            then calibrates against that ``R_0``.
        r_min: floor of ``R`` (see ``observation`` and ``noise_floor``). Default (``None``): ``1e-2`` for softmax,
            ``1e-4`` for regression and loss (``loraopt.optim.loko_config.DEFAULT_R_MIN``).
        noise_floor: how ``r_min`` floors ``R``. Default (``None``): ``"clamp"`` for softmax, the observation's own
            for regression and loss (the smallest eigenvalue). ``"clamp"``: every eigenvalue clamped at ``r_min``,
            which bounds the gain in every direction the update sees (on long streams the EMA can drive ``R``
            towards 0 along directions of confident predictions; one outsized step then saturates the softmax,
            whose Jacobian vanishes, and the filter stops learning: ``benchmarks/notes/loko.md``, "LoKO at its
            defaults collapses on the long EfficientNet stream"); ``"ones"``: the all-ones direction only (the
            softmax default before that finding, with ``r_min=1e-4``; the update never sees that direction);
            ``"eig"``: every eigenvalue shifted until the smallest is ``r_min``; ``"none"``. A state dict saved
            with the earlier defaults keeps its floor when loaded.
        q: process noise added to ``p`` before each update (0: static parameters, as in the paper).
        jitter: relative diagonal shift ``jitter * tr(S)/k + 1e-12`` before factoring ``S`` (retried x10 up to 3
            times; then the step is skipped).
        p_floor: lower clamp of ``p``.
        batch_mode: ``"joint"`` or ``"sequential"``.
        reduce_simplex: softmax only, observe ``m - 1`` classes.
        top_k: softmax only, a reduced observation: per sample the target class and the ``top_k - 1`` other
            classes the model finds most probable (``SoftmaxObservation``); ``top_k / m`` of the Jacobian rows.
        seed: seed of the P0 draw (identical on every rank).
        exact_residual: use the exact post-update residual ``y - h(x; theta_new)`` in the ``R`` update instead of
            the linearised ``e - lr H delta`` (``docs/specs/loko.md`` §4). It costs one more forward per sample, so
            ``observe`` then needs ``inputs=x`` or ``forward=lambda i: model(x[i:i+1])``, and the model (``model``);
            the forward runs through ``torch.func.functional_call`` at the updated values, so the parameters are
            written once, with the result. Softmax and regression observations only, single process. The mean and covariance updates are the same either way; only ``R`` (and therefore
            later steps) differ, and for a model linear in its parameters the two residuals coincide.
        dtype: filter math and state dtype; default fp32, or fp64 when every parameter is fp64.
        process_group: group over which observations are gathered under ``torch.distributed`` (default: world).
        jacobian: where :meth:`observe` takes the Jacobian rows from (the update is the same, up to rounding):
            ``"auto"`` (default), ``"func"`` (``torch.func``: ``vmap`` over samples of ``jacrev`` of
            ``functional_call``; needs ``observe(..., inputs=x)``), ``"per-sample"`` (one-sample graphs; needs
            ``inputs=`` or ``forward=``), ``"replicate"`` (each sample repeated once per observed row, one plain
            backward, per-sample gradients of the ``nn.Linear`` / ``nn.Conv2d`` layers that own the trainable
            parameters: :mod:`loraopt.lora.per_sample`; needs ``inputs=``) or ``"batch"`` (the graph of the observed
            outputs). ``"auto"``: the outputs' graph at ``b = 1``; for ``b > 1`` with ``inputs=``, replicated
            samples on a GPU when the model qualifies (with a warning and another exact path if its first-use check
            fails or the replicated batch runs out of memory), else the func path (falling back to one-sample
            graphs, with a warning, for a model ``vmap`` cannot run); else ``forward=``'s one-sample graphs, else
            the batch graph; measured in ``benchmarks/notes/loko.md``. Also settable later as
            ``optimizer.jacobian``.
        model: the model, for ``observe(..., inputs=x)`` (the factory passes it); never saved in the state.

    ``p_init="score"`` (P0 scaled so that the prior predictive variance of the observed outputs is ``0.1 r0``) and
    how the defaults were chosen (measured, ``benchmarks/notes/loko.md``): :mod:`loraopt.optim.loko_config`.

    State (tensor-only): per parameter ``p`` (parameter shape, fp32) and ``step`` (CPU fp32 tensor); the first
    parameter of the first group also holds ``R`` (``m x m`` fp32) and ``skipped`` (int64 count of rejected steps;
    a warning is issued the first time). State is allocated on the first ``step()``.

    Distributed (DDP: every rank runs the joint update of the all-gathered rows; FSDP2: ``observation="loss"`` only,
    the output observations raise ``NotImplementedError``): :mod:`loraopt.optim.loko_step`.
    """

    supports_dtensor = True

    # State dicts saved before ``top_k`` / ``noise_floor`` existed lack them: they load with None (the full observation,
    # the observation's own floor).
    _optional_group_keys = frozenset({"top_k", "noise_floor"})
    _legacy_group_values = {"top_k": None, "noise_floor": None}

    def __init__(
        self,
        params: Iterable,
        *,
        num_outputs: Optional[int] = None,
        observation: Union[str, Observation] = "softmax",
        lr: float = 1.0,
        p_init: Union[Tuple[float, float], float, str, None] = None,
        beta: float = 0.95,
        r0: Union[float, str, None] = None,
        r_min: Optional[float] = None,
        noise_floor: Optional[str] = None,
        q: float = 0.0,
        jitter: float = 1e-6,
        p_floor: float = 1e-12,
        batch_mode: str = "joint",
        reduce_simplex: bool = False,
        top_k: Optional[int] = None,
        seed: int = 0,
        exact_residual: bool = False,
        dtype: Optional[torch.dtype] = None,
        process_group: Optional[Any] = None,
        jacobian: str = "auto",
        model: Optional[nn.Module] = None,
    ):
        filter_values = dict(num_outputs=num_outputs, observation=observation, reduce_simplex=reduce_simplex,
                             top_k=top_k)
        expand_observation(filter_values)
        r_min, noise_floor = resolve_noise_floor(r_min, noise_floor, filter_values["observation"])
        defaults = dict(
            lr=lr, q=q, p_init=resolve_p_init(p_init, filter_values["observation"]), p_floor=p_floor, beta=beta,
            r0=resolve_r0(r0, filter_values["observation"]), r_min=r_min, noise_floor=noise_floor, jitter=jitter,
            batch_mode=batch_mode,
            seed=seed, exact_residual=exact_residual,
            **filter_values,
        )
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be None, torch.float32 or torch.float64, got {dtype!r}")
        self._config_cache: Optional[Tuple[tuple, LoKOConfig]] = None
        super().__init__(params, defaults)
        self._check_sharded_observation()
        all_params = [p for g in self.param_groups for p in g["params"]]
        if dtype is None:
            dtype = torch.float64 if all(p.dtype == torch.float64 for p in all_params) else torch.float32
        self._dtype = dtype
        self._dist = DistributedContext(process_group)
        self._pending: Optional[Pending] = None
        self._loss_consumed = False  # observation="loss": the last step used the observed loss and .grad
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self._model = model
        self.jacobian = jacobian
        self._func_failures: Dict[int, str] = {}  # id(model) -> why torch.func could not run it
        self._func_math_attention = True
        self._replicate_status: Dict[int, str] = {}  # id(model) -> "ok" or why replicated samples do not apply
        self.last_jacobian_path: Optional[str] = None  # which path built the rows of the last observation

    def _check_sharded_observation(self) -> None:
        sharded = [p for g in self.param_groups for p in g["params"] if is_dtensor(p)]
        if sharded and any(g["observation"] != "loss" for g in self.param_groups):
            raise NotImplementedError(
                f"LoKO with observation={self.param_groups[0]['observation']!r} does not support FSDP2 / DTensor "
                "(sharded) parameters: its Jacobian rows need per-output derivatives with respect to the whole "
                "parameters, which FSDP2 only produces on its unsharded copies and sums over ranks into .grad. Use "
                "observation='loss' (LoKO-scalar, supported under FSDP2), or DDP / a single process for output "
                "observations"
            )

    def _parameters_swapped(self, mapping: Dict[int, Tensor]) -> None:
        self._check_sharded_observation()

    @property
    def jacobian(self) -> str:
        """Where :meth:`observe` takes the Jacobian rows from: ``"auto"``, ``"func"``, ``"per-sample"``, ``"batch"``."""
        return self._jacobian

    @jacobian.setter
    def jacobian(self, value: str) -> None:
        if value not in JACOBIAN_PATHS:
            raise ValueError(f"jacobian must be one of {JACOBIAN_PATHS}, got {value!r}")
        self._jacobian = value

    @property
    def config(self) -> LoKOConfig:
        """The filter-level settings (validated, equal in every parameter group)."""
        return self._settings()

    @property
    def observation(self) -> Observation:
        """The observation model (a :mod:`loraopt.functional.observations` type)."""
        return self._settings().observation

    # --------------------------------------------------------------------------------------------- validation

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        expand_observation(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["p_init"] = resolve_p_init(group["p_init"], group["observation"])
        group["r0"] = resolve_r0(group["r0"], group["observation"])
        group["r_min"], group["noise_floor"] = resolve_noise_floor(group["r_min"], group["noise_floor"],
                                                                   group["observation"])
        validate_group(group)
        if len(self.param_groups) > 1:
            check_same_filter(self.param_groups[0], group, "; set it once in the constructor")

    def _settings(self) -> LoKOConfig:
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            check_same_filter(first, group)
        key = tuple(first.get(k) for k in FILTER_KEYS)
        if self._config_cache is None or self._config_cache[0] != key:
            self._config_cache = (key, LoKOConfig.from_group(first))
        return self._config_cache[1]

    # --------------------------------------------------------------------------------------------- state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """``Optimizer.load_state_dict`` that first checks the state dict is a usable LoKO state for these
        parameters (type, hyperparameter keys, shapes, finiteness); a bad one raises ``ValueError`` naming the
        problem and leaves the optimizer unchanged."""
        check_state_dict(state_dict, self.param_groups)
        super().load_state_dict(state_dict)
        self._pending = None
        self._noise_checked = False

    @property
    def anchor(self) -> Tensor:
        """The parameter whose state holds the filter-level ``R`` and ``skipped``."""
        return self.param_groups[0]["params"][0]

    @property
    def has_pending_observation(self) -> bool:
        return self._pending is not None

    def clear_observation(self) -> None:
        """Drop the pending observation (``zero_grad`` does this too)."""
        self._pending = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad`` that also drops a pending observation: discarding the gradient discards the
        observation it belongs to."""
        self._pending = None
        super().zero_grad(set_to_none=set_to_none)

    def _init_state(self) -> None:
        s = self._settings()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                if "p" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["p"] = draw_p0(group["p_init"], param.shape, s.seed, index, self._dtype).to(param.device)
                index += 1
        anchor_state = self.state[self.anchor]
        if "R" not in anchor_state:
            anchor_state["R"] = s.observation.initial_noise(s.r0, self._dtype, self.anchor.device)
            anchor_state["skipped"] = torch.zeros((), dtype=torch.int64, device=self.anchor.device)

    # --------------------------------------------------------------------------------------------- observe

    def _filtered(self) -> List[Tuple[Dict[str, Any], Tensor]]:
        return [(g, p) for g in self.param_groups for p in g["params"] if p.requires_grad]

    def observe(
        self,
        outputs: Any,
        targets: Optional[Tensor] = None,
        *,
        forward: Optional[Callable[[int], Any]] = None,
        inputs: Any = None,
        model: Optional[nn.Module] = None,
    ) -> None:
        """Record the observation of one batch; the next ``step()`` applies it.

        * softmax: ``observe(logits, targets)`` with ``logits: (..., m)`` and ``targets`` class indices ``(...)`` or
          probabilities ``(..., m)`` (non-negative, each row summing to 1). Leading dims are flattened into samples.
        * regression: ``observe(predictions, targets)``, both ``(..., m)`` (or ``(b,)`` when ``m = 1``).
        * loss: ``observe(loss)`` with the (mean) loss; ``.grad`` must be filled by ``loss.backward()`` before
          ``step()``.

        ``outputs`` may be a tensor, a Hugging Face ``ModelOutput`` or any object with ``.logits`` (its ``.logits``
        is used), or a dict with a ``"logits"`` entry.

        Where the Jacobian rows come from (``jacobian`` of the constructor; every path gives the same update up to
        rounding, tested):

        * ``inputs=`` (the batch the outputs were computed from: a tensor, a tuple of positional tensors, or a dict
          of keyword tensors such as a tokenizer batch, all with the samples along dim 0): the rows are built with
          ``torch.func`` (``vmap`` over samples of ``jacrev`` of ``functional_call(model, ...)``), one vectorised
          pass for the whole batch. ``model`` defaults to the model given to :func:`create_loko_optimizer` (or
          ``LoKO(..., model=...)``). The outputs then only supply the shapes and may be detached. A model that
          cannot be vmapped (e.g. BatchNorm in training mode) falls back, once and for all for that model, to
          one-sample graphs ``model(inputs[i:i+1])`` with a warning.
        * ``inputs=`` with ``jacobian="replicate"`` (``"auto"`` for ``b > 1`` on a GPU when the model qualifies;
          it holds ``k`` times the activations of the batch): every sample
          repeated once per observed row, one plain backward of that batch, and each row taken from the inputs and
          output-gradients of the layers that own the trainable parameters (no ``vmap`` of the backward, whose
          convolutions and batch norms would otherwise run once per row).
        * ``forward=`` (``forward(i)`` returns the outputs of sample ``i`` alone, recomputed at the current
          parameters, e.g. ``lambda i: model(x[i:i+1])``): rows from one-sample graphs, one batched backward each.
          Sequential mode with more than one sample needs this (or ``inputs=``), as does ``exact_residual=True``.
        * neither: rows from the graph of ``outputs`` (one vmapped backward over the whole batch; must run before
          any ``backward`` that frees the graph, which is kept). Cheapest at ``b = 1``; each row costs a backward
          over the whole batch, so for ``b > 1`` pass ``inputs=``.
        """
        if self._pending is not None:
            raise ValueError(
                "observe() was already called for this step: call step() between observations (to observe several "
                "micro-batches as one joint update, torch.cat their outputs and targets into one observe() call)"
            )
        s = self._settings()
        obs = s.observation
        params = [p for _, p in self._filtered()]
        if not params:
            raise ValueError("LoKO has no parameter with requires_grad=True to filter")
        if isinstance(obs, LossObservation):
            if targets is not None or forward is not None or inputs is not None:
                raise ValueError("observation='loss' takes only the loss: call observe(loss)")
            loss = obs.loss_value(model_outputs(outputs, "observe()", attr="loss"), self._dtype)
            self._pending = Pending(params=params, loss=loss, num_samples=1)
            self._loss_consumed = False
            return
        if targets is None:
            raise ValueError(
                f"observation={obs.name!r} needs targets: call observe(outputs, targets)"
                + (" (or build the optimizer with observation='loss' to observe a loss)"
                   if isinstance(obs, SoftmaxObservation) else "")
            )
        model = model if model is not None else self._model
        if s.exact_residual and model is None:
            raise ValueError(
                "exact_residual=True evaluates the model at the updated parameters (torch.func.functional_call), so "
                "it needs the model: build the optimizer with create_loko_optimizer(model, ...) or LoKO(..., "
                "model=model), or pass observe(..., model=model)"
            )
        batch = observe_outputs(
            obs, outputs, targets, params, forward=forward, inputs=inputs, model=model, mode=self.jacobian,
            func_failures=self._func_failures, math_attention=self._func_math_attention,
            sequential_mode=s.batch_mode == "sequential", exact_residual=s.exact_residual, dtype=self._dtype,
            replicate_status=self._replicate_status,
        )
        self.last_jacobian_path = batch.path
        keep = (s.batch_mode == "sequential" and batch.num_samples > 1) or s.exact_residual
        self._pending = Pending(
            params=params,
            rows=batch.rows,
            forward=batch.forward if keep else None,
            targets=batch.targets.detach() if keep else None,
            num_samples=batch.num_samples,
            model=model if s.exact_residual else None,
        )

    # --------------------------------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Apply the pending observation (see :meth:`observe`).

        ``closure``, if given, is called once under ``torch.enable_grad()`` and must return ``(outputs, targets)``
        (softmax/regression) or the loss (observation="loss", after its ``backward``); it is observed and applied,
        and its return value is returned.  A closure returning ``None`` after an explicit :meth:`observe` (what
        Lightning's manual optimization does) applies that observation.
        """
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
            # Lightning's manual optimization passes a closure that returns None after the user already called
            # observe(): the pending observation is then the one to apply.
            if not (result is None and self._pending is not None):
                self._observe_result(result)
        self._rebind_if_swapped()
        pending, self._pending = self._pending, None
        s = self._settings()
        filtered = self._filtered()
        if not self._check_step_lrs():  # a NaN/inf scheduler lr: a counted, warned skip; a negative one raises
            return result
        active = [(g, p) for g, p in filtered if float(g["lr"]) != 0.0]
        fresh = [p for g in self.param_groups for p in g["params"] if "p" not in self.state.get(p, {})]
        self._init_state()
        if not active:
            return result  # lr = 0: state allocated, everything else untouched (pending observation dropped)
        # A step is all-or-nothing: the joint filter step computes everything before writing, but the sequential
        # step calls the user's forward between writes, so it is snapshotted first.
        calls_back = pending is not None and pending.forward is not None
        snapshot = self._snapshot(filtered) if calls_back else None
        try:
            if pending is not None and [id(p) for p in pending.params] != [id(p) for _, p in filtered]:
                raise ValueError(
                    "the trainable parameters changed between observe() and step(): observe again after changing "
                    "requires_grad"
                )
            if isinstance(s.observation, LossObservation):
                self._loss_consumed = apply_loss(
                    pending, active, s, self._dist, self._dtype, self._loss_consumed,
                    update=lambda obs: self._update(active, active, obs, s),
                )
            else:
                apply_outputs(
                    pending, filtered, s, self._dist, self._dtype, self.anchor.device,
                    update=lambda rows, exact=None: self._update(active, filtered, rows, s, exact=exact),
                )
        except BaseException:
            if snapshot is not None:
                self._restore(snapshot)
            for p in fresh:  # a failed first step leaves no state behind either
                self.state.pop(p, None)
            raise
        return result

    def _snapshot(self, filtered) -> List[Tuple[Tensor, Tensor]]:
        """``(live tensor, copy)`` of every parameter and state tensor a step may write."""
        pairs = [(p, p.detach().clone()) for _, p in filtered]
        for _, p in filtered:
            pairs += [(v, v.clone()) for v in self.state[p].values() if torch.is_tensor(v)]
        pairs += [(v, v.clone()) for k, v in self.state[self.anchor].items() if k in ("R", "skipped")]
        return pairs

    @staticmethod
    def _restore(pairs: List[Tuple[Tensor, Tensor]]) -> None:
        with torch.no_grad():
            for live, saved in pairs:
                live.copy_(saved)

    def _observe_result(self, result: Any) -> None:
        obs = self._settings().observation
        if isinstance(obs, LossObservation):
            if isinstance(result, (tuple, list)):
                raise ValueError("observation='loss': the closure must return the loss (after loss.backward())")
            if result is None:
                raise ValueError("observation='loss': the closure must return the loss it backpropagated")
            self.observe(result)
            return
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ValueError(
                f"LoKO (observation={obs.name!r}) updates from the model outputs: the closure must return "
                "(outputs, targets), e.g. `lambda: (model(x), y)`; to observe a scalar loss instead, build the "
                "optimizer with observation='loss'"
            )
        self.observe(result[0], result[1])

    def _update(
        self, active, filtered, obs: Union[OutputRows, LossGradient], s: LoKOConfig, *,
        exact: Optional[Tuple[Pending, List[int]]] = None,
    ) -> None:
        """One filter step on the ``active`` coordinates of ``obs`` (columns: those of ``filtered``); ``exact =
        (pending, samples)``: ``R``'s residual re-evaluated at the updated parameters for ``samples``."""
        residual = None
        if exact is not None:
            pending, samples = exact
            residual = exact_residual(pending.model, pending.forward, pending.targets, [p for _, p in active],
                                      samples, s.observation, self._dtype)
        if s.r0_from_loss and isinstance(obs, LossGradient) and not getattr(self, "_noise_checked", False):
            # Read on the host once per optimizer (and once after a load), not at every step: later steps stay free
            # of host synchronisation. A resumed filter (steps > 0) keeps the R it saved.
            if all(float(self.state[p]["step"]) == 0 for _, p in active):
                s = self._warm_start_noise(obs, s)
                # A non-finite first loss (the step is skipped) leaves R alone and tries again at the next update.
                self._noise_checked = bool(torch.isfinite(obs.loss).all())
            else:
                self._noise_checked = True
        skipped = filter_update(self.state, self.anchor, active, filtered, obs, s, self._dtype, residual)
        # Counted (no host sync on a GPU) and warned about, rate-limited, by the shared counter.
        self._record_skipped(skipped, "non-finite innovation, covariance or step, or S not factorable")


    def _warm_start_noise(self, obs: LossGradient, s: LoKOConfig) -> LoKOConfig:
        """``r0="first-loss"``, first update: ``R = max(r0 floor, L^2)`` from the observed (rank-averaged) loss, so
        the noise EMA starts at the value it tends to while the loss stays near its first value, instead of far
        below it (``loraopt.optim.loko_config``). A non-finite loss leaves ``R`` alone (the step is then skipped).
        Returns the settings with that ``r0``, so that ``p_init="score"`` calibrates against the same noise."""
        R = self.state[self.anchor]["R"]
        L = obs.loss.to(R.dtype).reshape(())
        value = torch.where(torch.isfinite(L), torch.clamp(L * L, min=s.r0), R.reshape(()))
        R.copy_(value.reshape(R.shape))
        return dataclasses.replace(s, r0=float(value))  # one host sync, on the first step only


create_loko_optimizer.forwards_to = LoKO  # type: ignore[attr-defined]  (the registry lists LoKO's keywords too)
