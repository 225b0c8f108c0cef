"""What ``LoKO.observe`` does with the model outputs: validate them, pick the Jacobian path, build the rows.

The rows of every path are the same up to rounding (tested); which one is cheapest is measured in
``benchmarks/notes/loko.md``. The math is in :mod:`loraopt.functional.jacobian` and the observation types of
:mod:`loraopt.functional.observations`; this module only decides and reports errors that say what to pass.

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

On a GPU, ``auto`` takes the rows of a batch of more than one sample from replicated samples
(:mod:`loraopt.lora.per_sample`: one plain backward of every sample repeated once per row) when the model's
trainable layers are linear or convolution layers: the vmapped backward of the other paths runs the backward of
convolutions and batch norms once per row. On one H200 against fused AdamW: EfficientNet-Lite0 b32 1.8-2.2x (func
5.7-6.1x), MiniLM b32 1.4-1.5x (func 2.5x), a Llama classifier b8 2.6-2.8x (func 3.2-3.7x) at 5x func's memory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..functional.ekf import OutputRows
from ..functional.jacobian import (
    FuncUnsupported,
    detached_message,
    func_jacobian,
    input_batch_size,
    model_outputs,
    sample_forward,
)
from ..functional.observations import Observation
from ..lora.per_sample import ReplicationUnsupported, replicated_jacobian, replication_problem

__all__ = ["Pending", "ObservedBatch", "observe_outputs", "sample_rows", "choose_path", "prefers_replication"]


@dataclass
class Pending:
    """An observation waiting for ``step()`` (a Python attribute, never part of ``state``)."""

    params: List[Tensor]
    rows: Optional[OutputRows] = None  # H: (b * m_obs, n) rows of the first ``b`` samples, e: (b, m_obs)
    loss: Optional[Tensor] = None  # 0-dim, observation="loss"
    forward: Optional[Callable[[int], Any]] = None  # sequential mode / exact residual: outputs of sample i
    targets: Optional[Tensor] = None  # sequential mode / exact residual: targets of all b samples, indexed by i
    num_samples: int = 0
    model: Optional[nn.Module] = None  # exact residual: the module functional_call evaluates at the new values

    @property
    def H(self) -> Optional[Tensor]:
        return None if self.rows is None else self.rows.H

    @property
    def e(self) -> Optional[Tensor]:
        return None if self.rows is None else self.rows.e


@dataclass(frozen=True)
class ObservedBatch:
    """The rows of one observed batch and what the step may still need from it."""

    rows: OutputRows  # H: (b' k, n), e: (b', k) with b' = b (joint) or 1 (sequential: the first sample)
    targets: Tensor  # (b, m) encoded targets
    forward: Optional[Callable[[int], Any]]  # outputs of sample i at the current parameters, if known
    num_samples: int  # b
    path: str  # "func", "replicate", "per-sample" or "batch"


def prefers_replication(device: torch.device) -> bool:
    """Whether ``auto`` takes rows from replicated samples for outputs on ``device``: on an accelerator, where the
    per-row loops of the vmapped backward are launch-bound (measured, ``benchmarks/notes/loko.md``); not on the
    CPU, where replicating multiplies the forward and backward work by the rows per sample."""
    return device.type != "cpu"


def choose_path(
    mode: str, b: int, live: bool, has_forward: bool, has_inputs: bool, func_failed: bool, sequential: bool,
    replicate_ok: bool = False, accelerator: bool = False,
) -> str:
    """``"func"``, ``"replicate"``, ``"per-sample"`` or ``"batch"`` for this observation (see ``LoKO.observe``).

    ``replicate_ok``: the model qualifies for replicated samples (and has not failed their check);
    ``accelerator``: the outputs live on a GPU (or another non-CPU device)."""
    if mode == "replicate":
        if not has_inputs:
            raise ValueError(
                "jacobian='replicate' re-runs the model on the repeated samples: call observe(outputs, targets, "
                "inputs=x) (or use jacobian='auto')"
            )
        return "per-sample" if sequential else "replicate"
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
    # For b > 1 on a GPU, one plain backward of replicated samples beat torch.func's vmapped one on every model
    # measured (EfficientNet-Lite0 b32, MiniLM b32, a Llama classifier b8); at b = 1 the outputs' own graph was as
    # fast (EfficientNet) or faster (the Llama classifier, 1.1-1.2x against 1.45-1.8x fused AdamW).
    if has_inputs and accelerator and replicate_ok:
        return "replicate"
    if has_inputs and not func_failed:
        return "func"
    if has_forward:
        return "per-sample"
    return "batch"


def sample_rows(
    obs: Observation, forward: Callable[[int], Any], i: int, y: Tensor, params: Sequence[Tensor], dtype: torch.dtype
) -> OutputRows:
    """Rows of sample ``i`` from ``forward(i)`` at the current parameters (``y: (b, m)`` encoded targets)."""
    with torch.enable_grad():
        out = model_outputs(forward(i), f"forward({i})")
        if not out.requires_grad:
            raise ValueError(
                f"forward({i}) must return the outputs of sample {i} with their autograd graph: "
                + detached_message(out, prefix=False)
            )
        if out.numel() != obs.num_outputs:
            raise ValueError(
                f"forward({i}) must return the outputs of sample {i} alone ({obs.num_outputs} values), got shape "
                f"{tuple(out.shape)}"
            )
        h = obs.predict(obs.outputs_matrix(out, dtype))
        return obs.rows(h, y[i : i + 1], [0], params, dtype)


def observe_outputs(
    obs: Observation,
    outputs: Any,
    targets: Tensor,
    params: Sequence[Tensor],
    *,
    forward: Optional[Callable[[int], Any]],
    inputs: Any,
    model: Optional[nn.Module],
    mode: str,
    func_failures: Dict[int, str],
    math_attention: bool,
    sequential_mode: bool,
    exact_residual: bool,
    dtype: torch.dtype,
    replicate_status: Optional[Dict[int, str]] = None,
) -> ObservedBatch:
    """Validate one batch of outputs and targets and build its Jacobian rows (``LoKO.observe``).

    ``func_failures`` (``id(model) -> reason``) is updated when the func path fails and falls back;
    ``replicate_status`` (``id(model) -> "ok"`` or the reason it cannot replicate) likewise for replicated samples,
    whose first use per model is checked against the model's gradient."""
    replicate_status = {} if replicate_status is None else replicate_status
    grad_enabled = torch.is_grad_enabled()
    outputs = model_outputs(outputs, "observe()")
    if inputs is not None:
        if model is None:
            raise ValueError(
                "observe(..., inputs=...) needs the model: build the optimizer with create_loko_optimizer(model, "
                "...) (or LoKO(..., model=model)), or pass observe(..., model=model)"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    live = outputs.requires_grad
    with torch.enable_grad():
        z = obs.outputs_matrix(outputs, dtype)
        b = z.shape[0]
        if b == 0:
            raise ValueError(
                "observe() got an empty batch (0 samples): skip the step for empty batches (check the data "
                "loader's last batch or the filtering that produced it)"
            )
        y = obs.encode_targets(targets, b, z.device, dtype)
        if inputs is not None:
            batch_size = input_batch_size(inputs)
            if batch_size != b:
                raise ValueError(
                    f"inputs hold {batch_size} samples along dim 0 but the outputs have {b}: pass the batch the "
                    "outputs were computed from"
                )
            if forward is None:
                forward = sample_forward(model, inputs)
        sequential = sequential_mode and b > 1
        if exact_residual and forward is None:
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
        failed = inputs is not None and id(model) in func_failures
        replicate_ok = False
        accelerated = prefers_replication(z.device)
        if inputs is not None and mode == "auto" and accelerated:
            if id(model) not in replicate_status:
                problem = replication_problem(model, params)
                if problem is not None:
                    replicate_status[id(model)] = problem
            replicate_ok = replicate_status.get(id(model), "unchecked") in ("ok", "unchecked")
        path = choose_path(mode, b, live, forward is not None, inputs is not None, failed, sequential,
                           replicate_ok=replicate_ok, accelerator=accelerated)
        rows = None
        if path == "replicate":
            try:
                slots = obs.select(obs.predict(z.detach()), y) if getattr(obs, "top_k", None) else None
                H, h = replicated_jacobian(model, inputs, params, obs.observe_one, obs.dim, dtype=dtype,
                                           per_sample=slots, verify=replicate_status.get(id(model)) != "ok")
                replicate_status[id(model)] = "ok"
                observed_y = y[:, : obs.dim] if slots is None else y.gather(-1, slots)
                rows = OutputRows(H, observed_y - h.to(dtype))
            except (ReplicationUnsupported, torch.cuda.OutOfMemoryError) as exc:
                # The replicated batch holds k times the activations (77 GiB against torch.func's 15 GiB on the
                # Llama classifier at b = 8, 10 rows): when that does not fit, auto takes another exact path.
                if mode == "replicate" and isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                if mode == "replicate":
                    raise ValueError(
                        f"jacobian='replicate': the rows of this model cannot come from replicated samples ({exc}); "
                        "use jacobian='auto', 'func' or 'per-sample'"
                    ) from exc
                replicate_status[id(model)] = str(exc)
                warnings.warn(
                    f"LoKO: Jacobian rows from replicated samples are not used for this model any more ({exc}); "
                    "using another exact path.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                path = choose_path(mode, b, live, forward is not None, inputs is not None, failed, sequential)
        if path == "func":
            try:
                # top_k: which classes each sample observes, chosen from the outputs before the rows are taken.
                slots = obs.select(obs.predict(z.detach()), y) if getattr(obs, "top_k", None) else None
                H, h = func_jacobian(model, inputs, params, obs.observe_one, dtype=dtype,
                                     math_attention=math_attention, per_sample=slots)
                observed_y = y[:, : obs.dim] if slots is None else y.gather(-1, slots)
                rows = OutputRows(H, observed_y - h.to(dtype))
            except FuncUnsupported as exc:
                if mode == "func":
                    raise ValueError(
                        f"jacobian='func': this model cannot be vmapped by torch.func ({exc}); use "
                        "jacobian='auto' (falls back to one-sample graphs) or 'per-sample'"
                    ) from exc.__cause__
                func_failures[id(model)] = str(exc)
                warnings.warn(
                    f"LoKO: the torch.func Jacobian path does not run on this model ({exc}); its Jacobian rows "
                    "now come from one-sample graphs (exact, slower). Pass jacobian='per-sample' to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                path = "per-sample"
        if path == "per-sample":
            count = 1 if sequential else b
            parts = [sample_rows(obs, forward, i, y, params, dtype) for i in range(count)]
            rows = OutputRows(torch.cat([r.H for r in parts]), torch.cat([r.e for r in parts]))
        elif path == "batch":
            if not live:
                raise ValueError(detached_message(outputs, grad_enabled))
            rows = obs.rows(obs.predict(z), y, range(b), params, dtype)
    return ObservedBatch(rows=rows, targets=y, forward=forward, num_samples=b, path=path)
