"""LoKO's step on the parameters: gather the flat state, run one functional filter step, write the results back.

The filter runs on one flat vector over every active parameter (``docs/specs/loko.md`` §3): ``theta`` and ``p``
are gathered in parameter order, :func:`loraopt.functional.ekf.ekf_step` updates them from a reduced observation
(:class:`~loraopt.functional.ekf.OutputRows` or :class:`~loraopt.functional.ekf.LossGradient`), and the results are
written back with multi-tensor copies.

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

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional.ekf import LossGradient, OutputRows, ekf_step, score_scale, score_scale_per_block
from ..functional.jacobian import evaluate_at, model_outputs
from ..functional.observations import Observation
from .distributed import DistributedContext, full_tensor, is_dtensor, write_full_
from .loko_config import SCORE_SNR, LoKOConfig
from .loko_rows import Pending, sample_rows

__all__ = ["filter_update", "apply_outputs", "apply_loss", "exact_residual", "all_gather_rows"]

Active = Sequence[Tuple[Dict[str, Any], Tensor]]


def filter_update(
    state: Dict[Tensor, Dict[str, Any]],
    anchor: Tensor,
    active: Active,
    filtered: Active,
    obs: Union[OutputRows, LossGradient],
    s: LoKOConfig,
    dtype: torch.dtype,
    residual: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    """One filter step on the ``active`` ``(group, parameter)`` pairs, in place.

    ``obs``'s columns are those of ``filtered`` (``active`` is the subset with ``lr != 0``); ``state`` is the
    optimizer's state (``p`` and ``step`` per parameter, ``R`` and ``skipped`` at ``anchor``); ``residual`` as in
    :func:`loraopt.functional.ekf.diag_ekf_update`. Writes the parameters, ``p``, ``step``, ``R`` and ``skipped``;
    returns the 0-dim bool ``skipped`` of this step (the state is then unchanged but for the counters)."""
    dt = dtype
    if len(active) != len(filtered):
        keep = {id(p) for _, p in active}
        mask = torch.cat(
            [torch.full((p.numel(),), id(p) in keep, dtype=torch.bool) for _, p in filtered]
        ).to(obs.H.device)
        obs = obs.columns(mask)
    params = [p for _, p in active]
    states = [state[p] for p in params]
    # FSDP2: the filter runs replicated on the whole flat vector (gathered here); each rank writes back its shard.
    sharded = any(is_dtensor(p) for p in params)
    whole = [full_tensor(p.detach()) for p in params] if sharded else params
    theta = _flatten(whole, dt)
    pvec = _flatten([st["p"] for st in states], dt)
    lr = _per_coordinate(active, "lr", dt, theta.device)
    q = _per_coordinate(active, "q", dt, theta.device)
    p_floor = _per_coordinate(active, "p_floor", dt, theta.device)
    anchor_state = state[anchor]
    R = anchor_state["R"]

    fresh = [i for i, (g, p) in enumerate(active) if g["p_init"] == "score" and float(state[p]["step"]) == 0]
    if fresh:
        mask = torch.cat([torch.full((p.numel(),), i in fresh, dtype=torch.bool, device=pvec.device)
                          for i, p in enumerate(params)])
        pvec = score_scale(pvec, obs.H, mask, SCORE_SNR * s.r0)
    pvec = _score_per_tensor(state, active, obs.H, pvec, SCORE_SNR * s.r0)

    cfg = s.ekf_config(lr, q, p_floor, dt)
    res = ekf_step(theta, pvec, R, obs, cfg, residual=residual)

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
    return res.info.skipped


def _score_per_tensor(state: Dict[Tensor, Dict[str, Any]], active: Active, H: Tensor, pvec: Tensor,
                      target: float) -> Tensor:
    """``p_init="score-layer"``: each such parameter tensor's P0 rescaled so that its share of the prior predictive
    variance of this observation is ``target / T`` (T: the number of such tensors), at the first of its first two
    updates in which its Jacobian block is non-zero. Two chances, because a LoRA ``A`` has no signal while its ``B``
    is still zero (PEFT's initialisation): ``B`` is calibrated at the first update, ``A`` at the second, once ``B``
    has moved. A tensor scored already, or with no signal in either, keeps its values. The per-tensor "scored" flag
    lives on the device, so this adds no host synchronisation (the step count it reads is a CPU tensor)."""
    layered = [i for i, (g, _) in enumerate(active) if g["p_init"] == "score-layer"]
    if not layered:
        return pvec
    pending = [i for i in layered if float(state[active[i][1]]["step"]) < 2]
    if not pending:
        return pvec
    device = pvec.device
    for i in pending:
        state[active[i][1]].setdefault("scored", torch.zeros((), dtype=torch.bool, device=device))
    block = torch.cat([torch.full((p.numel(),), pending.index(i) if i in pending else -1, dtype=torch.int64)
                       for i, (_, p) in enumerate(active)]).to(device)
    scored = torch.stack([state[active[i][1]]["scored"] for i in pending])
    pvec, scored = score_scale_per_block(pvec, H, block, scored, target / len(layered))
    torch._foreach_copy_([state[active[i][1]]["scored"] for i in pending], list(scored.unbind()))
    return pvec


def apply_outputs(
    pending: Optional[Pending],
    filtered: Active,
    s: LoKOConfig,
    ctx: DistributedContext,
    dtype: torch.dtype,
    device: torch.device,
    update: Callable[..., None],
) -> None:
    """Apply an output observation (softmax, regression): ``update(rows, exact=None)`` once for the joint batch, or
    once per sample in sequential mode (each sample's rows taken at the parameters the previous update left).
    Under ``torch.distributed`` the rows of every rank are gathered first (joint mode only)."""
    if pending is None and not ctx.active:
        _stray_grad_error(filtered, s)
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
            _stray_grad_error(filtered, s)
            n_all = sum(p.numel() for _, p in filtered)
            m_obs = s.observation.dim
            rows = OutputRows(torch.zeros(0, n_all, dtype=dtype, device=device),
                              torch.zeros(0, m_obs, dtype=dtype, device=device))
        else:
            rows = pending.rows
        rows = all_gather_rows(ctx, rows)
        if rows.num_samples == 0:
            return
        update(rows)
        return
    sequential = s.batch_mode == "sequential"

    def exact(samples: List[int]):
        return (pending, samples) if s.exact_residual else None

    update(pending.rows, exact=exact([0] if sequential else list(range(pending.num_samples))))
    if sequential and pending.forward is not None:
        for i in range(1, pending.num_samples):
            rows = sample_rows(s.observation, pending.forward, i, pending.targets, pending.params, dtype)
            update(rows, exact=exact([i]))


def apply_loss(
    pending: Optional[Pending],
    active: Active,
    s: LoKOConfig,
    ctx: DistributedContext,
    dtype: torch.dtype,
    consumed: bool,
    update: Callable[[LossGradient], None],
) -> bool:
    """Apply a loss observation (LoKO-scalar): ``update(gradient row)`` from the observed loss and ``.grad``.
    ``consumed``: whether the last step already used this ``.grad``; returns the new value."""
    has_grad = any(p.grad is not None for _, p in active)
    if pending is None:
        if has_grad and consumed:
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
        return consumed
    if not has_grad:
        raise ValueError("LoKO (observation='loss') updates from .grad: call loss.backward() before step()")
    loss = ctx.mean(pending.loss)
    # Under FSDP2 each .grad is a shard (already averaged over ranks by the reduce-scatter): gather it whole.
    grads = [
        full_tensor(p.grad) if p.grad is not None else torch.zeros(p.shape, dtype=p.dtype, device=p.device)
        for _, p in active
    ]
    update(s.observation.gradient_row(grads, loss, dtype))
    return True


def _stray_grad_error(filtered: Active, s: LoKOConfig) -> None:
    if any(p.grad is not None for _, p in filtered):
        raise ValueError(
            f"LoKO (observation={s.observation.name!r}) does not update from .grad: call "
            "optimizer.observe(logits, targets) before step(), or pass a closure returning (logits, targets); "
            "for a gradient-only loop use observation='loss' with optimizer.observe(loss)"
        )


def exact_residual(
    model: nn.Module,
    forward: Callable[[int], Any],
    targets: Tensor,
    params: List[Tensor],
    samples: List[int],
    obs: Observation,
    dtype: torch.dtype,
) -> Callable[[Tensor], Tensor]:
    """``theta_new -> (len(samples), k)``: ``y_i - h(x_i; theta_new)`` for each of ``samples``, with ``forward(i)``
    (which calls ``model``) run at ``theta_new`` through ``torch.func.functional_call``: the parameters are not
    written. ``targets: (b, m)`` encoded; ``theta_new: (n,)`` flat over ``params``."""

    def residual(theta_new: Tensor) -> Tensor:
        # The values the parameters would hold after the write (cast to their dtype, as the write does).
        values = [v.to(p.dtype) for v, p in zip(_unflatten(theta_new, params), params)]
        rows = []
        with torch.no_grad():
            for i in samples:
                out = evaluate_at(model, params, values, forward, i)
                h = obs.predict(obs.outputs_matrix(model_outputs(out, "the outputs"), dtype))
                rows.append(obs.innovation(targets[i : i + 1], h))
        return torch.cat(rows)

    return residual


# ------------------------------------------------------------------------------------------------- helpers


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


def all_gather_rows(ctx: DistributedContext, rows: OutputRows) -> OutputRows:
    """Every rank's ``H: (b_r m, n)`` and ``e: (b_r, m)`` concatenated in rank order (ranks may differ in ``b_r``)."""
    H, e = rows.H, rows.e
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
    return OutputRows(full[:, :, :n].reshape(-1, n), full[:, :, n])
