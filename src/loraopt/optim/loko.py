"""LoKO: Low-Rank Kalman Optimizer (Abdi, Sun, Zhang, Kaski, Pan; arXiv 2410.11551).

Fine-tuning as online filtering: the trainable parameters (LoRA factors, DoRA magnitudes, a trained head) are the
state of an extended Kalman filter with a diagonal covariance, observed through the model outputs. No public
implementation by the authors is known; this follows ``docs/specs/loko.md``. The math lives in
:mod:`loraopt.functional.ekf`; this module only builds the Jacobian ``H`` and innovation ``e`` from the model outputs
and writes the results back into the parameters and the optimizer state.

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

import contextlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional.ekf import EKFConfig, diag_ekf_update, scalar_ekf_update
from .base import (
    DistributedContext,
    LoRAOptimizer,
    check_nonnegative,
    check_positive,
    check_range,
    full_tensor,
    is_dtensor,
    require_unsharded_model,
    write_full_,
)

__all__ = ["LoKO", "DEFAULT_P_INIT", "JACOBIAN_PATHS", "create_loko_optimizer", "output_jacobian"]

_OBSERVATIONS = ("softmax", "regression", "loss")
# Where observe() takes the Jacobian rows from (see LoKO.observe); "auto" picks per observation.
JACOBIAN_PATHS = ("auto", "func", "per-sample", "batch")
# The hyperparameters every LoKO parameter group carries (checked when a state dict is loaded).
_GROUP_KEYS = ("lr", "q", "p_init", "p_floor")
_BATCH_MODES = ("joint", "sequential")
# p_init="score": target prior-predictive variance of the observed outputs, as a fraction of r0 (a signal-to-noise
# ratio). 1.0 lets the first observation move the outputs by half their innovation, which over-trusts the
# linearisation: on the digits stream (benchmarks/notes/loko.md) it diverged for one seed in three at b = 8, while
# 0.1 was the best or tied-best P0 on both toy streams measured; 0.01 learns too slowly.
_SCORE_SNR = 0.1
# Default P0 bounds per observation, chosen on the online benchmark (benchmarks/notes/loko.md, "Defaults on
# pretrained models"): the spec's U(1e-4, 1e-2) learned nothing on MiniLM x SST-2 in 1,000 samples (dev accuracy
# 0.51); one decade up was the best or tied-best held-out accuracy on MNIST, Fashion-MNIST and SST-2 for the softmax
# observation, while larger bounds break down on EfficientNet x MNIST. The scalar-loss observation's step saturates
# at a Polyak-type step (L / sum(p g^2)) as p grows, so it tolerates, and gains from, one decade more. Regression
# was not measured and takes the softmax bounds.
DEFAULT_P_INIT = {"softmax": (1e-3, 1e-1), "regression": (1e-3, 1e-1), "loss": (1e-2, 1.0)}
# Hyperparameters of the one filter over all groups (one R, one S); they must agree across parameter groups.
_FILTER_KEYS = (
    "num_outputs", "observation", "beta", "r0", "r_min", "jitter", "batch_mode", "reduce_simplex", "seed", "exact_residual"
)


# ------------------------------------------------------------------------------------------------- Jacobian


def output_jacobian(
    outputs: Tensor,
    params: Sequence[Tensor],
    *,
    rows: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
    retain_graph: bool = True,
) -> Tensor:
    """Rows of the Jacobian of ``outputs`` w.r.t. ``params`` from a live graph, in one batched backward.

    Args:
        outputs: any shape, with an autograd graph to ``params``; it is flattened to ``(N,)``.
        params: tensors requiring grad; their Jacobian blocks are flattened and concatenated in this order.
        rows: ``(k,)`` int indices into the flattened outputs (default: all ``N``).
        dtype: dtype of the result.
        retain_graph: keep the graph (default) so the caller may still run ``backward`` on it.

    Returns:
        ``H: (k, n)`` with ``n = sum(p.numel())``; ``H[i] = d outputs.flat[rows[i]] / d params``. Parameters that do
        not reach ``outputs`` give zero columns.

    The ``k`` vector-Jacobian products with the basis vectors are run as one vmapped backward
    (``autograd.grad(..., is_grads_batched=True)``) instead of ``k`` separate backward passes.
    """
    flat = outputs.reshape(-1)
    if rows is None:
        rows = torch.arange(flat.numel(), device=flat.device)
    k = rows.numel()
    basis = torch.zeros(k, flat.numel(), dtype=flat.dtype, device=flat.device)
    basis[torch.arange(k, device=flat.device), rows.to(flat.device)] = 1
    grads = torch.autograd.grad(
        flat, list(params), grad_outputs=basis, retain_graph=retain_graph, allow_unused=True, is_grads_batched=True
    )
    # materialize_grads would give unbatched zeros for unused inputs, so missing blocks are filled here.
    blocks = [
        g.reshape(k, -1).to(dtype) if g is not None else torch.zeros(k, p.numel(), dtype=dtype, device=flat.device)
        for g, p in zip(grads, params)
    ]
    return torch.cat(blocks, dim=1)


# ------------------------------------------------------------------------------------------------- model calls


class _FuncUnsupported(Exception):
    """The model cannot run under ``torch.func.vmap`` (raised by the func path; the caller falls back)."""


def _model_outputs(obj: Any, what: str, attr: str = "logits") -> Any:
    """The tensor inside a model's return value: itself, ``obj.logits`` (Hugging Face ``ModelOutput`` or anything
    with that attribute) or ``obj["logits"]``; ``attr="loss"`` for the scalar observation."""
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, Mapping) and torch.is_tensor(obj.get(attr)):
        return obj[attr]
    value = getattr(obj, attr, None)
    if torch.is_tensor(value):
        return value
    if isinstance(obj, (tuple, list)):
        raise ValueError(
            f"{what} got a {type(obj).__name__} of {len(obj)} items where a tensor of {attr} was expected: pass the "
            f"{attr} tensor itself (e.g. outputs[0] of a model called with return_dict=False)"
        )
    raise TypeError(
        f"{what} takes the model {attr} as a tensor, or a model output with a .{attr} tensor (a Hugging Face "
        f"ModelOutput); got {type(obj).__name__}"
    )


def _detached_message(out: Tensor, grad_enabled: bool = True, prefix: bool = True) -> str:
    """Why ``out`` has no autograd graph, and what to do."""
    if out.is_inference():
        cause = "they were computed under torch.inference_mode()"
    elif not grad_enabled:
        cause = "gradients are disabled here (torch.no_grad() or torch.set_grad_enabled(False) is active)"
    else:
        cause = (
            "they carry no autograd graph: they were computed under torch.no_grad(), .detach()ed, or no parameter "
            "with requires_grad=True feeds them"
        )
    head = "observe() needs the model outputs with their autograd graph, but " if prefix else ""
    return (
        head + cause + ". Compute the outputs with gradients enabled, or pass observe(outputs, targets, inputs=x) so "
        "that LoKO recomputes them from the inputs (detached outputs are then fine)"
    )


def _split_inputs(inputs: Any) -> Tuple[List[Tensor], Callable[[List[Tensor]], Tuple[tuple, dict]]]:
    """``(leaves, rebuild)``: the per-sample tensors of a batch (every tensor whose dim 0 has the batch size of the
    first one) and ``rebuild(new_leaves) -> (args, kwargs)`` putting replacements back in their places.

    ``inputs``: a tensor (one positional argument), a tuple/list (positional arguments) or a mapping (keyword
    arguments, e.g. a tokenizer's batch)."""
    if torch.is_tensor(inputs):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        raise TypeError(
            "inputs must be a tensor, a tuple of tensors (positional arguments of the model) or a dict of tensors "
            f"(keyword arguments); got {type(inputs).__name__}"
        )
    entries = [(True, i, v) for i, v in enumerate(args)] + [(False, k, v) for k, v in kwargs.items()]
    tensors = [t for t in entries if torch.is_tensor(t[2]) and t[2].dim() >= 1]
    if not tensors:
        raise ValueError("inputs hold no tensor with a batch dimension (dim 0 = samples)")
    b = tensors[0][2].shape[0]
    slots = [t for t in tensors if t[2].shape[0] == b]

    def rebuild(leaves: List[Tensor]) -> Tuple[tuple, dict]:
        a, k = list(args), dict(kwargs)
        for (positional, key, _), leaf in zip(slots, leaves):
            if positional:
                a[key] = leaf
            else:
                k[key] = leaf
        return tuple(a), k

    return [t[2] for t in slots], rebuild


def _without_trivial_mask(inputs: Any) -> Any:
    """Drop an all-ones ``attention_mask`` keyword (Hugging Face: the same as no mask). Hugging Face models check
    whether the mask is all ones with Python control flow, which ``vmap`` cannot run; a padded batch (a mask with
    zeros) therefore falls back to one-sample graphs."""
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        if torch.is_tensor(mask) and bool((mask == 1).all()):
            return {k: v for k, v in inputs.items() if k != "attention_mask"}
    return inputs


def _input_batch_size(inputs: Any) -> int:
    return _split_inputs(inputs)[0][0].shape[0]


def _sample_forward(model: nn.Module, inputs: Any) -> Callable[[int], Any]:
    """``forward(i)``: the model's outputs for sample ``i`` of ``inputs`` alone."""
    leaves, rebuild = _split_inputs(inputs)

    def forward(i: int) -> Any:
        args, kwargs = rebuild([x[i : i + 1] for x in leaves])
        return model(*args, **kwargs)

    return forward


def _parameter_names(model: nn.Module, params: Sequence[Tensor]) -> List[str]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    missing = sum(id(p) not in names for p in params)
    if missing:
        raise ValueError(
            f"{missing} of the optimizer's {len(params)} parameters are not parameters of the model given for "
            "inputs=: pass the model the optimizer was built on (observe(..., model=model))"
        )
    return [names[id(p)] for p in params]


def _attention_for_vmap(math_attention: bool):
    """The fused attention kernels have no ``vmap`` rule for their backward (they run in a per-sample loop);
    the math kernel is plain batched matmuls. Used for the func path only."""
    if not math_attention:
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


# ------------------------------------------------------------------------------------------------- state


class _Settings(NamedTuple):
    num_outputs: Optional[int]
    observation: str
    beta: float
    r0: float
    r_min: float
    jitter: float
    batch_mode: str
    reduce_simplex: bool
    seed: int
    exact_residual: bool


@dataclass
class _Pending:
    """An observation waiting for ``step()`` (a Python attribute, never part of ``state``)."""

    params: List[Tensor]
    H: Optional[Tensor] = None  # (b * m_obs, n) rows of the first ``b`` samples
    e: Optional[Tensor] = None  # (b, m_obs)
    loss: Optional[Tensor] = None  # 0-dim, observation="loss"
    forward: Optional[Callable[[int], Tensor]] = None  # sequential mode / exact residual: outputs of sample i
    targets: Optional[Tensor] = None  # sequential mode / exact residual: targets of all b samples, indexed by i
    num_samples: int = 0


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

    Observations (``observation``):

    * ``"softmax"`` (default): ``h = softmax(logits)``, ``y`` one-hot (or soft) targets, ``m = num_outputs``
      classes. ``R``'s all-ones direction is floored at ``r_min``, which keeps ``S`` invertible without changing the
      update. ``reduce_simplex=True`` observes the first ``m - 1`` classes instead (exact and cheaper; ``R`` is then
      ``(m-1) x (m-1)``, started at the ``1``-orthogonal part of ``r0 I`` so both forms give the same updates).
    * ``"regression"``: ``h`` = the prediction, ``y`` real-valued, ``m = num_outputs``; ``R``'s smallest
      eigenvalue is floored at ``r_min``.
    * ``"loss"``: the scalar-loss variant ("LoKO-scalar", §9; not the paper's method): ``h`` = the mean loss, target
      0, ``H = .grad``; ``O(n)`` per step like AdamW. Hand the loss with ``observe(loss)`` (or return it from the
      closure) and call ``loss.backward()`` before ``step()``.

    Mini-batches (``batch_mode``):

    * ``"joint"`` (default): all ``b`` samples are one stacked observation linearised at the current parameters,
      ``S`` is ``(b m) x (b m)`` and ``R`` takes one EMA step with the mean over the samples.
    * ``"sequential"``: ``b`` single-sample updates, each at the parameters left by the previous one (the paper's
      batch-1 semantics). A fresh forward is needed per sample, so ``observe(outputs, targets, forward=f)`` takes
      ``f(i) -> outputs of sample i`` (at the current parameters); with ``b = 1`` no ``forward`` is needed and
      both modes are identical (tested).

    Why joint is the default (measurements in ``benchmarks/notes/loko.md``): (1) at b = 1, the paper's protocol,
    the modes coincide; (2) joint is the only mode that works from ``(logits, targets)`` alone, i.e. from
    ``LoKOTrainer``, Lightning manual optimisation, a closure, and DDP (which all-gathers the rows of every rank);
    (3) on the toy streams its online and held-out accuracy at b = 8 and 32 matched or beat sequential once P0 is
    well scaled (constant 0.1 or ``"score"``; with the too-small default bounds sequential was ahead); (4) it is
    cheaper per sample when the frozen base is small (0.4-0.8x of sequential on an MLP). Its cost caveat: Jacobian
    rows taken from the batch graph cost one backward over the whole batch each, so with a deep base the joint step
    costs ~b times sequential per sample (4x at b = 8, 19-27x at b = 32 on a 2-layer BERT). Passing the batch,
    ``observe(logits, y, inputs=x)``, builds the rows with ``torch.func`` in one vectorised pass over the samples
    instead (the ``jacobian`` argument; a model ``vmap`` cannot run falls back to one-sample graphs), with the same
    update. The filter itself is ``O((b m)^2 n)`` in joint mode against ``O(b m^2 n)`` in sequential mode.

    Calling two ``observe`` before a ``step`` raises: concatenate the outputs (``torch.cat`` keeps the graphs) and
    targets into one call to observe several micro-batches as one joint update.

    Args:
        params: parameters or named parameters or groups. Per-group values of ``lr``, ``q``, ``p_init`` and
            ``p_floor`` act on that group's coordinates; the other hyperparameters belong to the single filter and
            must be equal in every group.
        num_outputs: ``m``, the number of classes (softmax) or outputs (regression); ignored (may be ``None``) for
            ``observation="loss"``.
        observation: ``"softmax"``, ``"regression"`` or ``"loss"``.
        lr: scales the mean update only (1.0 is the filter's own step); with ``lr = 0`` a step changes nothing.
        p_init: P0. ``(low, high)``: i.i.d. uniform draws from a generator seeded by ``seed`` and the parameter's
            position; a float: constant; ``"score"``: data-driven scale, see below. Default (``None``):
            ``DEFAULT_P_INIT[observation]``, i.e. ``(1e-3, 1e-1)`` for softmax and regression and ``(1e-2, 1)`` for
            the scalar-loss observation (see "Defaults" below).
        beta: forgetting factor of the ``R`` EMA, in ``[0, 1]`` (1 keeps ``R = r0 I``).
        r0: ``R_0 = r0 I``.
        r_min: floor of ``R`` (see ``observation``).
        q: process noise added to ``p`` before each update (0: static parameters, as in the paper).
        jitter: relative diagonal shift ``jitter * tr(S)/k + 1e-12`` before factoring ``S`` (retried x10 up to 3
            times; then the step is skipped).
        p_floor: lower clamp of ``p``.
        batch_mode: ``"joint"`` or ``"sequential"``.
        reduce_simplex: softmax only, observe ``m - 1`` classes.
        seed: seed of the P0 draw (identical on every rank).
        exact_residual: use the exact post-update residual ``y - h(x; theta_new)`` in the ``R`` update instead of
            the linearised ``e - lr H delta`` (``docs/specs/loko.md`` §4). It costs one more forward per sample, so
            ``observe`` then needs ``forward=lambda i: model(x[i:i+1])``; softmax and regression observations only,
            single process. The mean and covariance updates are the same either way; only ``R`` (and therefore
            later steps) differ, and for a model linear in its parameters the two residuals coincide.
        dtype: filter math and state dtype; default fp32, or fp64 when every parameter is fp64.
        process_group: group over which observations are gathered under ``torch.distributed`` (default: world).
        jacobian: where :meth:`observe` takes the Jacobian rows from (the update is the same, up to rounding):
            ``"auto"`` (default), ``"func"`` (``torch.func``: ``vmap`` over samples of ``jacrev`` of
            ``functional_call``; needs ``observe(..., inputs=x)``), ``"per-sample"`` (one-sample graphs; needs
            ``inputs=`` or ``forward=``) or ``"batch"`` (the graph of the observed outputs). ``"auto"`` takes the
            outputs' graph at ``b = 1`` and the func path for ``b > 1`` when ``inputs=`` is given (falling back to
            one-sample graphs, with a warning, for a model ``vmap`` cannot run), else ``forward=``'s one-sample
            graphs, else the batch graph; measured in ``benchmarks/notes/loko.md``. Also settable later as
            ``optimizer.jacobian``.
        model: the model, for ``observe(..., inputs=x)`` (the factory passes it); never saved in the state.

    ``p_init="score"`` (our design; it replaces the gradient-magnitude mapping sketched in ``docs/specs/loko.md`` §5,
    which gives ``p_low`` to every ``lora_A`` entry because their gradient is exactly 0 at the standard ``B = 0``
    init): P0 is the seeded uniform draw on ``(1e-4, 1e-2)`` rescaled, at the first update that sees the parameter,
    by one scalar ``c`` chosen so that the prior predictive variance of the observed outputs is a tenth of the
    noise, ``mean_k (H P0 H^T)_kk = 0.1 r0``. The first observation then moves the outputs by about
    ``0.1 / 1.1`` of its innovation, whatever the model size or parameterisation, so the overall scale of P0 comes
    from the data instead of per-model bounds; coordinates the first observation does not see (``lora_A`` while
    ``B = 0``) get the same scale. The first observation is not spent on calibration (no extra pass). On the two
    toy streams of ``benchmarks/notes/loko.md`` and on EfficientNet x MNIST it matched the best hand-tuned bounds,
    but on MiniLM x SST-2 it was clearly worse (dev accuracy 0.63 against 0.76), so it is not the default.

    Defaults (how they were chosen, ``benchmarks/notes/loko.md``, measured with ``loraopt bench online``, batch 1,
    one pass of 1,000 samples, 2 seeds, on EfficientNet-Lite0 x MNIST and MiniLM x SST-2, 1 seed on
    EfficientNet-Lite0 x Fashion-MNIST):

    * ``p_init``: the spec's ``U(1e-4, 1e-2)`` is one decade too small for pretrained models with a fresh head
      (MiniLM did not learn at all: 0.51 dev accuracy); ``U(1e-3, 1e-1)`` was the best or within noise of the
      best held-out accuracy on every stream for the softmax observation, while ``U(1e-2, 1)`` broke down on MNIST
      (held-out 0.37 against 0.84).
      The scalar-loss observation takes ``U(1e-2, 1)``: its step tends to the bounded Polyak-type step
      ``L p g / sum(p g^2)`` as ``p`` grows, and ``U(1e-2, 1)`` and ``U(0.1, 10)`` were equal and better than
      ``U(1e-3, 1e-1)`` there.
    * ``beta = 0.95``, ``r0 = 0.1`` (the spec's): checked one factor at a time (``beta`` 0.9 / 0.99, ``r0``
      0.01 / 1) around the new ``p_init``; see the notes for the numbers.
    * Why P0 matters this much: with ~10^5 filtered coordinates, a 1,000-sample pass shrinks the mean of ``p`` by
      only ~1%, so the filter acts as a fixed diagonal preconditioner (the P0 draw) normalised by ``S``, and the
      scale of P0 plays the role of a learning rate. For the same reason ``q > 0`` does little on short streams.

    State (tensor-only): per parameter ``p`` (parameter shape, fp32) and ``step`` (CPU fp32 tensor); the first
    parameter of the first group also holds ``R`` (``m x m`` fp32) and ``skipped`` (int64 count of rejected steps;
    a warning is issued the first time). State is allocated on the first ``step()``.

    Distributed: under ``torch.distributed`` with world size > 1, each rank observes its own samples and ``step()``
    all-gathers the Jacobian rows and innovations, so every rank runs the joint update of the concatenated batch
    (rank order) and ends with identical parameters, ``p`` and ``R``; every rank must call ``step()``. Wrapping the
    model in DDP is optional (tested both ways): no ``backward`` is taken, so DDP's gradient all-reduce never runs
    and the parameters stay replicated because every rank applies the same update. ``observation="loss"``
    all-reduces (mean) the observed loss; ``.grad`` is expected to be averaged by DDP.

    FSDP2 (``fully_shard``, DTensor parameters) is supported for ``observation="loss"``: ``step()`` gathers the whole
    flat parameter and gradient vectors (``full_tensor``: two all-gathers of ``n`` values), runs the filter
    replicated on every rank (the covariance ``p`` is kept whole, ``n`` values per rank) and writes back each rank's
    shard of the parameters. Build the optimizer after ``fully_shard``. The output observations (``"softmax"``,
    ``"regression"``) raise ``NotImplementedError`` under FSDP2: their Jacobian rows are per-output derivatives
    with respect to the parameters, and FSDP2 computes gradients on unsharded copies that it reduce-scatters
    (summed over ranks) into ``.grad``; neither ``autograd.grad`` on the sharded parameters nor
    ``torch.func.functional_call`` sees them. Use DDP for those observations.
    """

    supports_dtensor = True

    def __init__(
        self,
        params: Iterable,
        *,
        num_outputs: Optional[int],
        observation: str = "softmax",
        lr: float = 1.0,
        p_init: Union[Tuple[float, float], float, str, None] = None,
        beta: float = 0.95,
        r0: float = 0.1,
        r_min: float = 1e-4,
        q: float = 0.0,
        jitter: float = 1e-6,
        p_floor: float = 1e-12,
        batch_mode: str = "joint",
        reduce_simplex: bool = False,
        seed: int = 0,
        exact_residual: bool = False,
        dtype: Optional[torch.dtype] = None,
        process_group: Optional[Any] = None,
        jacobian: str = "auto",
        model: Optional[nn.Module] = None,
    ):
        defaults = dict(
            lr=lr,
            q=q,
            p_init=_resolve_p_init(p_init, observation),
            p_floor=p_floor,
            num_outputs=num_outputs,
            observation=observation,
            beta=beta,
            r0=r0,
            r_min=r_min,
            jitter=jitter,
            batch_mode=batch_mode,
            reduce_simplex=reduce_simplex,
            seed=seed,
            exact_residual=exact_residual,
        )
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be None, torch.float32 or torch.float64, got {dtype!r}")
        super().__init__(params, defaults)
        self._check_sharded_observation()
        all_params = [p for g in self.param_groups for p in g["params"]]
        if dtype is None:
            dtype = torch.float64 if all(p.dtype == torch.float64 for p in all_params) else torch.float32
        self._dtype = dtype
        self._dist = DistributedContext(process_group)
        self._pending: Optional[_Pending] = None
        self._loss_consumed = False  # observation="loss": the last step used the observed loss and .grad
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self._model = model
        self.jacobian = jacobian
        self._func_failures: Dict[int, str] = {}  # id(model) -> why torch.func could not run it
        self._func_math_attention = True
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

    # --------------------------------------------------------------------------------------------- validation

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["p_init"] = _resolve_p_init(group["p_init"], group["observation"])
        _validate_group(group)
        if len(self.param_groups) > 1:
            first = self.param_groups[0]
            for key in _FILTER_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"{key} must be the same in every parameter group (LoKO runs one filter over all groups), got "
                        f"{first[key]!r} and {group[key]!r}; set it once in the constructor"
                    )

    def _settings(self) -> _Settings:
        first = self.param_groups[0]
        for group in self.param_groups[1:]:
            for key in _FILTER_KEYS:
                if group[key] != first[key]:
                    raise ValueError(
                        f"{key} must be the same in every parameter group (LoKO runs one filter over all groups), "
                        f"got {first[key]!r} and {group[key]!r}"
                    )
        return _Settings(**{key: first[key] for key in _FILTER_KEYS})

    # --------------------------------------------------------------------------------------------- state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """``Optimizer.load_state_dict`` that first checks the state dict is a usable LoKO state for these
        parameters (type, hyperparameter keys, shapes, finiteness); a bad one raises ``ValueError`` naming the
        problem and leaves the optimizer unchanged."""
        self._check_state_dict(state_dict)
        super().load_state_dict(state_dict)
        self._pending = None

    def _check_state_dict(self, state_dict: Any) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"cannot load this LoKO state dict: {msg}; the optimizer was left unchanged")

        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise bad("expected optimizer.state_dict() output, a dict with 'state' and 'param_groups'")
        groups, state = state_dict["param_groups"], state_dict["state"]
        for i, saved in enumerate(groups):
            missing = [k for k in _FILTER_KEYS + _GROUP_KEYS if k not in saved]
            if missing:
                found = sorted({k for st in state.values() for k in st}) if state else []
                raise bad(
                    f"parameter group {i} lacks LoKO's hyperparameters {missing} (state keys {found}): it was saved "
                    "by another optimizer type; load it into that optimizer, or start LoKO afresh"
                )
        if len(groups) != len(self.param_groups):
            raise bad(f"it has {len(groups)} parameter groups, this optimizer has {len(self.param_groups)}")
        ids: List[Any] = []
        for i, (saved, mine) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(mine["params"]):
                raise bad(
                    f"parameter group {i} holds {len(saved['params'])} parameters, this optimizer's holds "
                    f"{len(mine['params'])} (a different model or LoRA configuration)"
                )
            group = dict(saved)
            group["p_init"] = tuple(group["p_init"]) if isinstance(group["p_init"], list) else group["p_init"]
            try:
                _validate_group(group)
            except ValueError as exc:
                raise bad(f"parameter group {i}: {exc}") from None
            for key in ("num_outputs", "observation", "reduce_simplex"):
                if saved[key] != mine[key]:
                    raise bad(
                        f"it was saved with {key}={saved[key]!r}, this optimizer has {key}={mine[key]!r} "
                        "(a different task or head)"
                    )
            for key in _FILTER_KEYS:
                if saved[key] != groups[0][key]:
                    raise bad(f"{key} differs between parameter groups 0 and {i}")
            ids += list(saved["params"])
        params = [p for g in self.param_groups for p in g["params"]]
        names = [n for g in self.param_groups for n in (g.get("param_names") or [None] * len(g["params"]))]
        by_id = {pid: (param, name) for pid, param, name in zip(ids, params, names)}
        s = _Settings(**{key: groups[0][key] for key in _FILTER_KEYS})
        k = self._obs_dim(s)
        for pid, st in state.items():
            if pid not in by_id:
                raise bad(f"state for parameter id {pid!r}, which no parameter group lists")
            param, name = by_id[pid]
            label = f"parameter {name or pid!r}"
            anchor = pid == ids[0]
            allowed = {"p", "step"} | ({"R", "skipped"} if anchor else set())
            extra = sorted(set(st) - allowed)
            if extra:
                raise bad(f"{label} has state {extra}, which LoKO does not keep (state of another optimizer type?)")
            needed = sorted(allowed - set(st))
            if needed:
                raise bad(f"{label} lacks state {needed}")
            p = st["p"]
            if not torch.is_tensor(p) or not p.is_floating_point() or tuple(p.shape) != tuple(param.shape):
                got = tuple(p.shape) if torch.is_tensor(p) else type(p).__name__
                raise bad(
                    f"{label}: covariance p has shape {got}, the parameter has {tuple(param.shape)} (a model with "
                    "other ranks or layers)"
                )
            if not bool(torch.isfinite(p).all()) or not bool((p > 0).all()):
                raise bad(f"{label}: covariance p holds non-finite or non-positive values")
            step = st["step"]
            if not torch.is_tensor(step) or step.numel() != 1 or not math.isfinite(float(step)) or float(step) < 0:
                raise bad(f"{label}: step must be a finite number >= 0, got {step!r}")
            if anchor:
                R, skipped = st["R"], st["skipped"]
                if not torch.is_tensor(R) or not R.is_floating_point() or tuple(R.shape) != (k, k):
                    got = tuple(R.shape) if torch.is_tensor(R) else type(R).__name__
                    raise bad(f"the noise estimate R has shape {got}, expected {(k, k)} for these settings")
                if not bool(torch.isfinite(R).all()):
                    raise bad(
                        "the noise estimate R holds non-finite values (every later step would be skipped); resume "
                        "from an earlier checkpoint, or start LoKO afresh"
                    )
                if (not torch.is_tensor(skipped) or skipped.numel() != 1 or not math.isfinite(float(skipped))
                        or float(skipped) < 0):
                    raise bad(f"the skipped-step count must be an integer >= 0, got {skipped!r}")

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

    def _obs_dim(self, s: _Settings) -> int:
        if s.observation == "loss":
            return 1
        if s.observation == "softmax" and s.reduce_simplex:
            return s.num_outputs - 1
        return s.num_outputs

    def _initial_R(self, s: _Settings, device: torch.device) -> Tensor:
        k = self._obs_dim(s)
        R = s.r0 * torch.eye(k, dtype=self._dtype, device=device)
        if s.observation == "softmax" and s.reduce_simplex:
            # The (m-1)-coordinate view of the 1-orthogonal part of r0 I_m: this start makes the reduced filter
            # give exactly the updates of the full one (whose 1-direction never enters delta or p).
            R = R - s.r0 / s.num_outputs
        return R

    def _init_state(self) -> None:
        s = self._settings()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                if "p" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["p"] = self._draw_p0(group["p_init"], param, s.seed, index)
                index += 1
        anchor_state = self.state[self.anchor]
        if "R" not in anchor_state:
            anchor_state["R"] = self._initial_R(s, self.anchor.device)
            anchor_state["skipped"] = torch.zeros((), dtype=torch.int64, device=self.anchor.device)

    def _draw_p0(self, p_init: Any, param: Tensor, seed: int, index: int) -> Tensor:
        if isinstance(p_init, (int, float)) and not isinstance(p_init, bool):
            return torch.full(param.shape, float(p_init), dtype=self._dtype, device=param.device)
        low, high = (1e-4, 1e-2) if p_init == "score" else p_init
        # One generator per parameter position: the draw does not depend on other groups' settings, on the device,
        # or on the rank.
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + index) % (2**63 - 1))
        u = torch.rand(param.numel(), generator=gen, dtype=torch.float64)
        p0 = (low + (high - low) * u).to(self._dtype).reshape(param.shape)
        return p0.to(param.device)

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
        params = [p for _, p in self._filtered()]
        if not params:
            raise ValueError("LoKO has no parameter with requires_grad=True to filter")
        if s.observation == "loss":
            if targets is not None or forward is not None or inputs is not None:
                raise ValueError("observation='loss' takes only the loss: call observe(loss)")
            loss = _model_outputs(outputs, "observe()", attr="loss")
            if not torch.is_tensor(loss) or loss.numel() != 1:
                raise ValueError(
                    "observation='loss' needs the scalar (mean) loss: call observe(loss) with a 0-dim tensor"
                )
            self._pending = _Pending(params=params, loss=loss.detach().reshape(()).to(self._dtype), num_samples=1)
            self._loss_consumed = False
            return
        if targets is None:
            raise ValueError(
                f"observation={s.observation!r} needs targets: call observe(outputs, targets)"
                + (" (or build the optimizer with observation='loss' to observe a loss)"
                   if s.observation == "softmax" else "")
            )
        grad_enabled = torch.is_grad_enabled()
        outputs = _model_outputs(outputs, "observe()")
        if inputs is not None:
            model = model if model is not None else self._model
            if model is None:
                raise ValueError(
                    "observe(..., inputs=...) needs the model: build the optimizer with create_loko_optimizer(model, "
                    "...) (or LoKO(..., model=model)), or pass observe(..., model=model)"
                )
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        live = outputs.requires_grad
        with torch.enable_grad():
            z = self._logits_matrix(outputs, s)
            b = z.shape[0]
            if b == 0:
                raise ValueError(
                    "observe() got an empty batch (0 samples): skip the step for empty batches (check the data "
                    "loader's last batch or the filtering that produced it)"
                )
            y = self._targets(targets, b, z.device, s)
            if inputs is not None:
                batch_size = _input_batch_size(inputs)
                if batch_size != b:
                    raise ValueError(
                        f"inputs hold {batch_size} samples along dim 0 but the outputs have {b}: pass the batch the "
                        "outputs were computed from"
                    )
                if forward is None:
                    forward = _sample_forward(model, inputs)
            sequential = s.batch_mode == "sequential" and b > 1
            if s.exact_residual and forward is None:
                raise ValueError(
                    "exact_residual=True re-evaluates the outputs after the update: call "
                    "observe(outputs, targets, inputs=x) or observe(outputs, targets, forward=lambda i: "
                    "model(x[i:i+1])) (or build the optimizer with exact_residual=False, the linearised residual)"
                )
            if sequential and forward is None:
                raise ValueError(
                    "batch_mode='sequential' with a batch of more than one sample needs a fresh forward per sample: "
                    "call observe(outputs, targets, inputs=x) (or forward=lambda i: model(x[i:i+1])), observe one "
                    "sample per step(), or use batch_mode='joint'"
                )
            path = self._jacobian_path(b, live, forward is not None, inputs is not None, model, sequential)
            if path == "func":
                try:
                    H, e = self._func_rows(model, inputs, y, params, s)
                except _FuncUnsupported as exc:
                    if self.jacobian == "func":
                        raise ValueError(
                            f"jacobian='func': this model cannot be vmapped by torch.func ({exc}); use "
                            "jacobian='auto' (falls back to one-sample graphs) or 'per-sample'"
                        ) from exc.__cause__
                    self._func_failures[id(model)] = str(exc)
                    warnings.warn(
                        f"LoKO: the torch.func Jacobian path does not run on this model ({exc}); its Jacobian rows "
                        "now come from one-sample graphs (exact, slower). Pass jacobian='per-sample' to silence this.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    path = "per-sample"
            if path == "per-sample":
                count = 1 if sequential else b
                rows = [self._sample_rows(forward, i, y, params, s) for i in range(count)]
                H = torch.cat([r[0] for r in rows])
                e = torch.cat([r[1] for r in rows])
            elif path == "batch":
                if not live:
                    raise ValueError(_detached_message(outputs, grad_enabled))
                H, e = self._rows(self._observe_fn(z, s), y, range(b), params, s)
            self.last_jacobian_path = path
        keep = sequential or s.exact_residual
        self._pending = _Pending(
            params=params,
            H=H,
            e=e,
            forward=forward if keep else None,
            targets=y.detach() if keep else None,
            num_samples=b,
        )

    def _jacobian_path(
        self, b: int, live: bool, has_forward: bool, has_inputs: bool, model: Optional[nn.Module], sequential: bool
    ) -> str:
        """``"func"``, ``"per-sample"`` or ``"batch"`` for this observation (see :meth:`observe`)."""
        mode = self.jacobian
        if mode == "func":
            if not has_inputs:
                raise ValueError(
                    "jacobian='func' builds the rows from the model and its inputs: call observe(outputs, targets, "
                    "inputs=x) (or use jacobian='auto')"
                )
            return "per-sample" if sequential else "func"
        if mode == "per-sample":
            if not has_forward:
                raise ValueError(
                    "jacobian='per-sample' recomputes each sample's outputs: call observe(outputs, targets, inputs=x) "
                    "or observe(outputs, targets, forward=lambda i: model(x[i:i+1])) (or use jacobian='auto')"
                )
            return "per-sample"
        if mode == "batch":
            return "per-sample" if sequential else "batch"
        # auto (measured, benchmarks/notes/loko.md): at b = 1 the rows of the existing graph cost one batched
        # backward and no extra forward; for b > 1 one vmapped pass beats b one-sample graphs, which beat the
        # batch graph (each of whose rows costs a backward over the whole batch).
        if sequential:
            return "per-sample"
        if b == 1 and live:
            return "batch"
        if has_inputs and id(model) not in self._func_failures:
            return "func"
        if has_forward:
            return "per-sample"
        return "batch"

    def _func_rows(
        self, model: nn.Module, inputs: Any, y: Tensor, params: Sequence[Tensor], s: _Settings
    ) -> Tuple[Tensor, Tensor]:
        """``(H, e)`` of every sample from one ``vmap``-over-samples of ``jacrev`` of ``functional_call``.

        Raises :class:`_FuncUnsupported` when the model cannot run under ``vmap`` (the caller falls back)."""
        from torch.func import functional_call, jacrev, vmap

        names = _parameter_names(model, params)
        m, m_obs = s.num_outputs, self._obs_dim(s)
        leaves, rebuild = _split_inputs(_without_trivial_mask(inputs))
        b = leaves[0].shape[0]
        theta = {name: p.detach() for name, p in zip(names, params)}

        def observed(th: Dict[str, Tensor], *sample: Tensor) -> Tuple[Tensor, Tensor]:
            args, kwargs = rebuild([x.unsqueeze(0) for x in sample])
            out = _model_outputs(functional_call(model, th, args, kwargs), "the model")
            if out.numel() != m:
                raise ValueError(
                    f"the model returned {out.numel()} values for one sample, expected num_outputs={m}; pass inputs "
                    "whose dim 0 indexes the samples"
                )
            h = self._observe_fn(out.reshape(1, m), s).reshape(m)[:m_obs]
            return h, h

        rows = vmap(jacrev(observed, has_aux=True), in_dims=(None,) + (0,) * len(leaves), randomness="different")
        try:
            with _attention_for_vmap(self._func_math_attention):
                jac, h = rows(theta, *leaves)
        except (RuntimeError, NotImplementedError) as exc:
            raise _FuncUnsupported(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
        dt = self._dtype
        H = torch.cat([jac[name].reshape(b * m_obs, -1).to(dt) for name in names], dim=1)
        e = y[:, :m_obs] - h.detach().to(dt)
        return H, e

    def _sample_rows(
        self, forward: Callable[[int], Any], i: int, y: Tensor, params: Sequence[Tensor], s: _Settings
    ) -> Tuple[Tensor, Tensor]:
        """``(H_i, e_i)`` of sample ``i`` from ``forward(i)`` at the current parameters."""
        with torch.enable_grad():
            out = _model_outputs(forward(i), f"forward({i})")
            if not out.requires_grad:
                raise ValueError(
                    f"forward({i}) must return the outputs of sample {i} with their autograd graph: "
                    + _detached_message(out, prefix=False)
                )
            if out.numel() != s.num_outputs:
                raise ValueError(
                    f"forward({i}) must return the outputs of sample {i} alone ({s.num_outputs} values), got shape "
                    f"{tuple(out.shape)}"
                )
            h = self._observe_fn(self._logits_matrix(out, s), s)
            return self._rows(h, y[i : i + 1], [0], params, s)

    def _logits_matrix(self, outputs: Tensor, s: _Settings) -> Tensor:
        """``(N, m)`` view of the outputs in the compute dtype (graph kept)."""
        m = s.num_outputs
        if s.observation == "regression" and m == 1 and (outputs.dim() == 1 or outputs.shape[-1] != 1):
            outputs = outputs.unsqueeze(-1)
        if outputs.dim() == 0 or outputs.shape[-1] != m:
            got = outputs.shape[-1] if outputs.dim() else "no"
            raise ValueError(
                f"outputs have {got} entries in the last dimension but num_outputs={m}: pass (batch, {m}) outputs "
                f"or build the optimizer with num_outputs={outputs.shape[-1] if outputs.dim() else '...'}"
            )
        return outputs.reshape(-1, m).to(self._dtype)

    def _observe_fn(self, z: Tensor, s: _Settings) -> Tensor:
        """The observed function of the ``(N, m)`` outputs: softmax probabilities or the outputs themselves."""
        return torch.softmax(z, dim=-1) if s.observation == "softmax" else z

    def _targets(self, targets: Tensor, N: int, device: torch.device, s: _Settings) -> Tensor:
        """``(N, m)`` targets in the compute dtype on ``device``, validated."""
        m = s.num_outputs
        if not torch.is_tensor(targets):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        if s.observation == "softmax":
            if targets.is_floating_point():
                if targets.numel() != N * m:
                    raise ValueError(
                        f"float targets must be class probabilities of shape (batch, {m}); got {tuple(targets.shape)}; "
                        "pass integer class indices instead"
                    )
                y = targets.reshape(N, m).to(device=device, dtype=self._dtype)
                # One host read for all checks (a probability vector per sample: finite, >= 0, sums to 1).
                tol = 1e-6 if self._dtype == torch.float64 else 1e-4
                sums = y.sum(-1)
                bad = ~torch.isfinite(y).all(-1) | (y < 0).any(-1) | ((sums - 1).abs() > tol * m)
                if bool(bad.any()):
                    i = int(bad.nonzero()[0, 0])
                    raise ValueError(
                        f"soft targets must be probabilities that sum to 1 per sample (finite, >= 0); sample {i} has "
                        f"sum {float(sums[i]):.6g} and min {float(y[i].min()):.6g}: normalise them (e.g. "
                        "targets / targets.sum(-1, keepdim=True)) or pass integer class indices"
                    )
                return y
            if targets.numel() != N:
                raise ValueError(
                    f"got {targets.numel()} targets for {N} samples: pass one class index per sample "
                    "(drop ignored positions such as -100 before observe())"
                )
            t = targets.reshape(N).long()
            if bool(((t < 0) | (t >= m)).any()):
                raise ValueError(
                    f"class targets must be in [0, {m}): drop ignored labels (e.g. -100) before observe(), or set "
                    "num_outputs to the number of classes"
                )
            return torch.nn.functional.one_hot(t.to(device), m).to(self._dtype)
        if targets.numel() != N * m:
            raise ValueError(
                f"regression targets must have the outputs' {N * m} entries, got shape {tuple(targets.shape)}"
            )
        return targets.reshape(N, m).to(device=device, dtype=self._dtype)

    def _observed(self, outputs: Tensor, targets: Tensor, s: _Settings) -> Tuple[Tensor, Tensor]:
        """``(h, y)``: the observed function ``(N, m)`` (live graph, compute dtype) and the targets ``(N, m)``."""
        z = self._logits_matrix(_model_outputs(outputs, "the outputs"), s)
        return self._observe_fn(z, s), self._targets(targets, z.shape[0], z.device, s)

    def _rows(
        self, h: Tensor, y: Tensor, samples: Iterable[int], params: Sequence[Tensor], s: _Settings
    ) -> Tuple[Tensor, Tensor]:
        """``H: (len(samples) * m_obs, n)`` and ``e: (len(samples), m_obs)`` for the given sample indices."""
        m = h.shape[1]
        m_obs = self._obs_dim(s)
        idx = torch.as_tensor(list(samples), dtype=torch.long, device=h.device)
        cols = torch.arange(m_obs, device=h.device)
        rows = (idx[:, None] * m + cols[None, :]).reshape(-1)
        H = output_jacobian(h, params, rows=rows, dtype=self._dtype)
        e = (y.index_select(0, idx) - h.detach().index_select(0, idx))[:, :m_obs]
        return H, e


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
        active = [(g, p) for g, p in filtered if _lr_value(g["lr"]) != 0.0]
        fresh = [p for g in self.param_groups for p in g["params"] if "p" not in self.state.get(p, {})]
        self._init_state()
        if not active:
            return result  # lr = 0: state allocated, everything else untouched (pending observation dropped)
        # A step is all-or-nothing: the joint filter step computes everything before writing, but the sequential
        # and exact-residual steps call the user's forward between writes, so those are snapshotted first.
        calls_back = pending is not None and pending.forward is not None
        snapshot = self._snapshot(filtered) if calls_back else None
        try:
            if pending is not None and [id(p) for p in pending.params] != [id(p) for _, p in filtered]:
                raise ValueError(
                    "the trainable parameters changed between observe() and step(): observe again after changing "
                    "requires_grad"
                )
            if s.observation == "loss":
                self._step_loss(pending, filtered, active, s)
            else:
                self._step_outputs(pending, filtered, active, s)
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
        s = self._settings()
        if s.observation == "loss":
            if isinstance(result, (tuple, list)):
                raise ValueError("observation='loss': the closure must return the loss (after loss.backward())")
            if result is None:
                raise ValueError("observation='loss': the closure must return the loss it backpropagated")
            self.observe(result)
            return
        if not (isinstance(result, (tuple, list)) and len(result) == 2):
            raise ValueError(
                f"LoKO (observation={s.observation!r}) updates from the model outputs: the closure must return "
                "(outputs, targets), e.g. `lambda: (model(x), y)`; to observe a scalar loss instead, build the "
                "optimizer with observation='loss'"
            )
        self.observe(result[0], result[1])

    def _stray_grad_error(self, filtered: Sequence[Tuple[Dict[str, Any], Tensor]], s: _Settings) -> None:
        if any(p.grad is not None for _, p in filtered):
            raise ValueError(
                f"LoKO (observation={s.observation!r}) does not update from .grad: call "
                "optimizer.observe(logits, targets) before step(), or pass a closure returning (logits, targets); "
                "for a gradient-only loop use observation='loss' with optimizer.observe(loss)"
            )

    def _step_outputs(self, pending: Optional[_Pending], filtered, active, s: _Settings) -> None:
        ctx = self._dist
        n_all = sum(p.numel() for _, p in filtered)
        m_obs = self._obs_dim(s)
        if pending is None and not ctx.active:
            self._stray_grad_error(filtered, s)
            return
        if ctx.active:
            if s.exact_residual:
                raise NotImplementedError(
                    "exact_residual=True cannot run under torch.distributed (other ranks' samples cannot be "
                    "re-evaluated here): use exact_residual=False"
                )
            if s.batch_mode == "sequential":
                raise NotImplementedError(
                    "batch_mode='sequential' cannot run under torch.distributed (other ranks' samples cannot be "
                    "re-forwarded): use batch_mode='joint', which gathers every rank's rows"
                )
            if pending is None:
                self._stray_grad_error(filtered, s)
                H = torch.zeros(0, n_all, dtype=self._dtype, device=self.anchor.device)
                e = torch.zeros(0, m_obs, dtype=self._dtype, device=self.anchor.device)
            else:
                H, e = pending.H, pending.e
            H, e = _all_gather_rows(ctx, H, e)
            if e.shape[0] == 0:
                return
            self._update(active, filtered, H, e, s)
            return
        sequential = s.batch_mode == "sequential"

        def exact(samples: List[int]):
            return (pending.forward, pending.targets, samples) if s.exact_residual else None

        self._update(active, filtered, pending.H, pending.e, s,
                     exact=exact([0] if sequential else list(range(pending.num_samples))))
        if sequential and pending.forward is not None:
            for i in range(1, pending.num_samples):
                H, e = self._sample_rows(pending.forward, i, pending.targets, pending.params, s)
                self._update(active, filtered, H, e, s, exact=exact([i]))

    def _step_loss(self, pending: Optional[_Pending], filtered, active, s: _Settings) -> None:
        has_grad = any(p.grad is not None for _, p in active)
        if pending is None:
            if has_grad and self._loss_consumed:
                raise ValueError(
                    "step() was called again without a new observe(loss) and loss.backward(): the previous step "
                    "already used that loss and .grad. Call optimizer.zero_grad() after step(), and observe(loss) "
                    "plus loss.backward() before the next one"
                )
            if has_grad:
                raise ValueError(
                    "LoKO (observation='loss') needs the loss value as well as .grad: call optimizer.observe(loss) "
                    "(the detached mean loss) before step(), or pass a closure that returns the loss"
                )
            return
        if not has_grad:
            raise ValueError("LoKO (observation='loss') updates from .grad: call loss.backward() before step()")
        loss = self._dist.mean(pending.loss)
        # Under FSDP2 each .grad is a shard (already averaged over ranks by the reduce-scatter): gather it whole.
        grads = [
            full_tensor(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
            for _, p in active
        ]
        g = _flatten(grads, self._dtype)
        # For the scalar observation the "innovation" slot carries the loss value L (the innovation is -L).
        self._update(active, active, g.unsqueeze(0), loss.reshape(1, 1), s, scalar_loss=True)
        self._loss_consumed = True

    def _update(
        self, active, filtered, H: Tensor, e: Tensor, s: _Settings, *, scalar_loss: bool = False,
        exact: Optional[Tuple[Callable[[int], Tensor], Tensor, List[int]]] = None,
    ) -> None:
        """Run one filter step on the ``active`` columns of ``H: (b * m_obs, n_filtered)``, ``e: (b, m_obs)``.

        ``exact = (forward, targets, samples)``: compute ``R``'s residual from ``forward(i)`` at the updated
        parameters for each ``i`` in ``samples`` (``exact_residual=True``)."""
        dt = self._dtype
        if len(active) != len(filtered):
            keep = {id(p) for _, p in active}
            mask = torch.cat(
                [torch.full((p.numel(),), id(p) in keep, dtype=torch.bool) for _, p in filtered]
            ).to(H.device)
            H = H[:, mask]
        b, m_obs = e.shape
        params = [p for _, p in active]
        states = [self.state[p] for p in params]
        # FSDP2: the filter runs replicated on the whole flat vector (gathered here); each rank writes back its shard.
        sharded = any(is_dtensor(p) for p in params)
        whole = [full_tensor(p.detach()) for p in params] if sharded else params
        theta = _flatten(whole, dt)
        pvec = _flatten([st["p"] for st in states], dt)
        lr = _per_coordinate(active, "lr", dt, theta.device)
        q = _per_coordinate(active, "q", dt, theta.device)
        p_floor = _per_coordinate(active, "p_floor", dt, theta.device)
        anchor_state = self.state[self.anchor]
        R = anchor_state["R"]

        fresh = [i for i, (g, p) in enumerate(active) if g["p_init"] == "score" and float(self.state[p]["step"]) == 0]
        if fresh:
            pvec = self._score_scale(pvec, H, [p for _, p in active], set(fresh), s)

        if scalar_loss:
            floor = "eig"
        elif s.observation == "softmax":
            floor = "none" if s.reduce_simplex else "ones"
        else:
            floor = "eig"
        cfg = EKFConfig(
            lr=lr, q=q, beta=s.beta, r_min=s.r_min, noise_floor=floor, jitter=s.jitter,
            jitter_abs=1e-12 if s.jitter > 0 else 0.0, p_floor=p_floor, dtype=dt,
        )
        if scalar_loss:
            res = scalar_ekf_update(theta, pvec, R, H[0], e.reshape(()), cfg)
        else:
            residual = None if exact is None else self._exact_residual(params, *exact, s)
            res = diag_ekf_update(theta, pvec, R, H.reshape(b, m_obs, -1), e, cfg, residual=residual)

        # Multi-tensor copies from views of the flat results: per-parameter copies or reshapes would cost one
        # dispatcher call (and a launch) each, hundreds per step, and this step is host-bound on GPUs.
        if sharded:
            for param, value in zip(params, _unflatten(res.theta, whole)):
                write_full_(param, value)
        else:
            torch._foreach_copy_(params, _unflatten(res.theta, params))
        torch._foreach_copy_([st["p"] for st in states], _unflatten(res.p, whole))
        torch._foreach_add_([st["step"] for st in states], 1.0)
        R.copy_(res.R)
        anchor_state["skipped"] += res.info.skipped.to(torch.int64)
        # Counted (no host sync on a GPU) and warned about, rate-limited, by the shared counter.
        self._record_skipped(res.info.skipped, "non-finite innovation, covariance or step, or S not factorable")

    def _exact_residual(
        self, params: List[Tensor], forward: Callable[[int], Tensor], targets: Tensor, samples: List[int], s: _Settings
    ) -> Callable[[Tensor], Tensor]:
        """``theta_new -> (len(samples), m_obs)``: writes ``theta_new`` into ``params`` and re-evaluates the samples.
        The caller writes the final parameters afterwards (``theta_new``, or the old values if the step is skipped)."""
        m_obs = self._obs_dim(s)

        def residual(theta_new: Tensor) -> Tensor:
            torch._foreach_copy_(params, _unflatten(theta_new, params))
            rows = []
            with torch.no_grad():
                for i in samples:
                    h, y = self._observed(forward(i), targets[i : i + 1], s)
                    rows.append((y - h)[:, :m_obs])
            return torch.cat(rows)

        return residual

    def _score_scale(self, pvec: Tensor, H: Tensor, params: List[Tensor], fresh: set, s: _Settings) -> Tensor:
        """Rescale the fresh coordinates of ``pvec`` by ``c`` so that ``mean_k (H diag(p) H^T)_kk = 0.1 r0``."""
        mask = torch.cat(
            [torch.full((p.numel(),), i in fresh, dtype=torch.bool, device=pvec.device) for i, p in enumerate(params)]
        )
        pf = torch.where(mask, pvec, torch.zeros_like(pvec))
        den = torch.einsum("kn,kn,n->", H, H, pf) / H.shape[0]
        ok = torch.isfinite(den) & (den > 0)
        c = torch.where(ok, _SCORE_SNR * s.r0 / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(den))
        return torch.where(mask, pvec * c, pvec)


# ------------------------------------------------------------------------------------------------- helpers


def _lr_value(lr: Any) -> float:
    return float(lr)


def _flatten(tensors: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    """``(sum numel,)``: the tensors concatenated in order, in ``dtype`` (one cast for all; called under
    ``no_grad``)."""
    return torch.cat([t.reshape(-1) for t in tensors]).to(dtype)


def _unflatten(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Views of ``flat`` shaped like ``like`` (the inverse of :func:`_flatten`)."""
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in like]), like)]


def _per_coordinate(active, key: str, dtype: torch.dtype, device: torch.device) -> Union[float, Tensor]:
    """A float when every active group agrees (the common case), else an ``(n,)`` vector."""
    values = [float(g[key]) for g, _ in active]
    if all(v == values[0] for v in values):
        return values[0]
    return torch.cat(
        [torch.full((p.numel(),), float(g[key]), dtype=dtype, device=device) for g, p in active]
    )


def _resolve_p_init(p_init: Any, observation: Any) -> Any:
    """``None`` -> the default bounds of the observation; lists -> tuples (so groups compare and print alike)."""
    if p_init is None:
        # An unknown observation is reported by _validate_group; any bounds will do until then.
        return DEFAULT_P_INIT.get(observation, DEFAULT_P_INIT["softmax"])
    return tuple(p_init) if isinstance(p_init, list) else p_init


def _validate_group(group: Dict[str, Any]) -> None:
    if group["observation"] not in _OBSERVATIONS:
        raise ValueError(f"observation must be one of {_OBSERVATIONS}, got {group['observation']!r}")
    m = group["num_outputs"]
    if group["observation"] != "loss":
        low = 2 if group["observation"] == "softmax" else 1
        if isinstance(m, bool) or not isinstance(m, int) or m < low:
            raise ValueError(
                f"num_outputs must be an integer >= {low} for observation={group['observation']!r} (the number of "
                f"{'classes' if low == 2 else 'outputs'}), got {m!r}"
            )
    if group["batch_mode"] not in _BATCH_MODES:
        raise ValueError(f"batch_mode must be 'joint' or 'sequential', got {group['batch_mode']!r}")
    if group["reduce_simplex"] and group["observation"] != "softmax":
        raise ValueError("reduce_simplex=True only applies to observation='softmax'")
    if not isinstance(group["exact_residual"], bool):
        raise ValueError(f"exact_residual must be True or False, got {group['exact_residual']!r}")
    if group["exact_residual"] and group["observation"] == "loss":
        raise ValueError(
            "exact_residual=True applies to the softmax and regression observations; with observation='loss' the "
            "residual is the loss itself (use exact_residual=False)"
        )
    check_nonnegative("lr", float(group["lr"]))
    check_nonnegative("q", group["q"])
    check_range("beta", group["beta"], 0.0, 1.0, high_inclusive=True)
    check_positive("r0", group["r0"])
    check_positive("r_min", group["r_min"])
    check_nonnegative("jitter", group["jitter"])
    check_positive("p_floor", group["p_floor"])
    seed = group["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    p_init = group["p_init"]
    if isinstance(p_init, str):
        if p_init != "score":
            raise ValueError(f"p_init must be (low, high), a positive float or 'score', got {p_init!r}")
    elif isinstance(p_init, (int, float)) and not isinstance(p_init, bool):
        check_positive("p_init", p_init)
    elif isinstance(p_init, tuple) and len(p_init) == 2:
        low, high = p_init
        check_positive("p_init low", low)
        check_positive("p_init high", high)
        if low > high:
            raise ValueError(f"p_init bounds must satisfy low <= high, got {p_init!r}")
    else:
        raise ValueError(f"p_init must be (low, high), a positive float or 'score', got {p_init!r}")


def _all_gather_rows(ctx: DistributedContext, H: Tensor, e: Tensor) -> Tuple[Tensor, Tensor]:
    """Concatenate every rank's ``H: (b_r m, n)`` and ``e: (b_r, m)`` in rank order (ranks may differ in ``b_r``)."""
    world = ctx.world_size
    b = torch.tensor([e.shape[0]], dtype=torch.int64, device=H.device)
    counts = [torch.zeros_like(b) for _ in range(world)]
    dist.all_gather(counts, b, group=ctx.group)
    counts = [int(c) for c in counts]
    b_max = max(counts)
    m = e.shape[1]
    n = H.shape[1]
    # Rows and innovations travel in one buffer so the gather is a single collective.
    buf = torch.zeros(b_max, m, n + 1, dtype=H.dtype, device=H.device)
    buf[: e.shape[0], :, :n] = H.reshape(e.shape[0], m, n)
    buf[: e.shape[0], :, n] = e
    bufs = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(bufs, buf, group=ctx.group)
    full = torch.cat([chunk[:c] for chunk, c in zip(bufs, counts)])
    return full[:, :, :n].reshape(-1, n), full[:, :, n]


# ------------------------------------------------------------------------------------------------- factory


def _is_lora_name(name: str) -> bool:
    return any(tag in name for tag in (".lora_A.", ".lora_B.", "lora_embedding_A", "lora_embedding_B",
                                       "lora_magnitude_vector"))


def create_loko_optimizer(
    model: nn.Module,
    *,
    num_outputs: Optional[int],
    observation: str = "softmax",
    lr: float = 1.0,
    other_lr: Optional[float] = None,
    p_init: Union[Tuple[float, float], float, str, None] = None,
    beta: float = 0.95,
    r0: float = 0.1,
    r_min: float = 1e-4,
    q: float = 0.0,
    jitter: float = 1e-6,
    p_floor: float = 1e-12,
    batch_mode: str = "joint",
    reduce_simplex: bool = False,
    seed: int = 0,
    exact_residual: bool = False,
    dtype: Optional[torch.dtype] = None,
    process_group: Optional[Any] = None,
    jacobian: str = "auto",
) -> LoKO:
    """Build :class:`LoKO` over every trainable parameter of a PEFT/LoRA model.

    Paper: H. Abdi, M. Sun, A. Zhang, S. Kaski, W. Pan, "LoKO: Low-Rank Kalman Optimizer for Online Fine-Tuning of
    Large Models", arXiv:2410.11551 (https://arxiv.org/abs/2410.11551). No reference repository is published by the
    authors; this implementation follows ``docs/specs/loko.md``.

    Two named groups share one filter: ``"lora"`` (``lora_A``/``lora_B``, embedding LoRA, DoRA magnitudes) and
    ``"other"`` (every other trainable parameter, e.g. a ``modules_to_save`` classifier head), with ``lr`` and
    ``other_lr`` (default: ``lr``) scaling their mean updates. The remaining keywords are those of :class:`LoKO`.

    Raises ``ValueError`` when the model has no trainable parameter or no LoRA parameter (build
    ``LoKO(model.named_parameters(), ...)`` directly to filter arbitrary parameters), and ``NotImplementedError``
    for FSDP/DeepSpeed-wrapped models.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"create_loko_optimizer expects an nn.Module (a PEFT model), got {type(model).__name__}")
    require_unsharded_model(model, "LoKO")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "the model has no trainable parameter: apply peft.get_peft_model(model, LoraConfig(...)) first"
        )
    lora = [(n, p) for n, p in named if _is_lora_name(n)]
    other = [(n, p) for n, p in named if not _is_lora_name(n)]
    if not lora:
        raise ValueError(
            "no LoRA parameter found (names with .lora_A./.lora_B.): wrap the model with peft.get_peft_model, or "
            "build LoKO(model.named_parameters(), num_outputs=...) directly to filter arbitrary parameters"
        )
    empty = [n for n, p in lora if p.numel() == 0]
    if empty:
        raise ValueError(
            f"LoRA parameter {empty[0]!r} is empty (rank 0): the adapter has nothing to train. Give it a rank r >= 1 "
            "(LoraConfig(r=...), rank_pattern) or leave the module out of target_modules"
        )
    groups = [{"params": lora, "name": "lora", "lr": lr}]
    if other:
        groups.append({"params": other, "name": "other", "lr": lr if other_lr is None else other_lr})
    return LoKO(
        groups,
        num_outputs=num_outputs,
        observation=observation,
        lr=lr,
        p_init=p_init,
        beta=beta,
        r0=r0,
        r_min=r_min,
        q=q,
        jitter=jitter,
        p_floor=p_floor,
        batch_mode=batch_mode,
        reduce_simplex=reduce_simplex,
        seed=seed,
        exact_residual=exact_residual,
        dtype=dtype,
        process_group=process_group,
        jacobian=jacobian,
        model=model,
    )
