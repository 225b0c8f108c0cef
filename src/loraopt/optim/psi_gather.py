"""The data flow around one PSI-family step, as plain functions: read the factors (whole, also under FSDP2), stack a
bucket's gradients, reduce the captured observations over ranks, measure the norm that clipping needs, and write the
results back once the whole step is known to be finite.

:class:`~loraopt.optim.psi_base._ProjectedSubspaceOptimizer` calls these; the update rule itself is
:func:`loraopt.functional.psi.psi_step`.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from ..functional.lorsum import lowrank_sq_norm
from ..functional.psi import Gradient, balance_many
from ..lora.capture import LayerObservation
from ..lora.layers import LoRALayer
from .distributed import DistributedContext, full_tensor, is_dtensor, write_full_

__all__ = [
    "compute_dtype",
    "local",
    "whole_a",
    "whole_b",
    "grad_version",
    "stack_factors",
    "stack_gradient",
    "stacked_rows",
    "reduce_observations",
    "clip_norm",
    "Commit",
    "balance_momentum",
]

# Reduced per-observation statistics: tensors, or host numbers for the scales outside torch.distributed.
Reduced = Dict[int, Dict[str, object]]


def compute_dtype(layer: LoRALayer) -> torch.dtype:
    """fp32 for 16- and 32-bit factors (state and math stay fp32), fp64 for fp64 factors (the reference tests)."""
    return torch.promote_types(layer.A.dtype, torch.float32)


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def whole_a(layer: LoRALayer, dtype: torch.dtype) -> Tensor:
    """``A`` as a whole ``(r, d_in)`` matrix in ``dtype`` (gathered when FSDP2 shards it)."""
    if is_dtensor(layer.A):
        return full_tensor(layer.A.detach()).reshape(layer.rank, -1).to(dtype)
    return layer.a_matrix(dtype)


def whole_b(layer: LoRALayer, dtype: torch.dtype) -> Tensor:
    """``B`` as a whole ``(d_out, r)`` matrix in ``dtype`` (gathered when FSDP2 shards it)."""
    if is_dtensor(layer.B):
        return full_tensor(layer.B.detach()).reshape(layer.d_out, -1).to(dtype)
    return layer.b_matrix(dtype)


def grad_version(layer: LoRALayer) -> Tuple[int, int]:
    """Identity and in-place version of ``lora_A``'s gradient: host-side, no synchronisation."""
    grad = layer.A.grad
    return (0, -1) if grad is None else (id(grad), grad._version)


# ------------------------------------------------------------------------------------------------- gather


def stack_factors(layers: Sequence[LoRALayer]) -> Tuple[List[Tensor], List[Tensor], Tensor, Tensor]:
    """The layers' ``A`` and ``B`` parameters and their whole matrices stacked in the compute dtype:
    ``(A params, B params, (L, r, d_in), (L, d_out, r))``."""
    A_params, B_params = [layer.A for layer in layers], [layer.B for layer in layers]
    # Plain fp32 matrices (PEFT Linear with fp32 adapters) are stacked as they are: a per-layer reshape/cast
    # would cost a dispatcher call per layer, and host time is what bounds this step.
    dtype = compute_dtype(layers[0])
    plain = all(a.dim() == 2 and a.dtype == dtype and not is_dtensor(a) for a in A_params + B_params)
    if plain:
        A_raw, B_raw = torch.stack(A_params), torch.stack(B_params)
    else:
        A_raw = torch.stack([whole_a(layer, dtype) for layer in layers])
        B_raw = torch.stack([whole_b(layer, dtype) for layer in layers])
    return A_params, B_params, A_raw, B_raw


def stack_gradient(items: Sequence[Tuple[LoRALayer, LayerObservation]], reds: Sequence[Dict[str, object]]) -> Gradient:
    """The bucket's gradient in the form its layers captured it (projected, dense or rows), stacked over layers."""
    first = items[0][1]
    if first.left is not None:
        return Gradient(torch.stack([red["left"] for red in reds]), torch.stack([red["right"] for red in reds]),
                        projected=True)
    if first.G is not None:
        return Gradient(torch.stack([obs.G for _, obs in items]), None)
    if len(items) == 1:  # rows
        X, S = first.rows()
        return Gradient(S.mT.unsqueeze(0), X.unsqueeze(0))
    # rows of the same length, stacked
    S, X = stacked_rows([obs for _, obs in items])
    return Gradient(S.mT, X)


def stacked_rows(observations: Sequence[LayerObservation]) -> Tuple[Tensor, Tensor]:
    """``(S: (L, N, d_out), X: (L, N, d_in))`` of layers that captured as many rows (``LayerObservation.rows``
    stacked; ``S`` in fp32 at least, ``X`` in ``S``'s dtype).  One stack, cast and division for the bucket when
    every layer holds one block of rows and they share a scaling (the usual case: one batch, one LoRA config),
    instead of a cast and a division per layer; the same elementwise arithmetic either way."""
    first = observations[0]
    if all(len(o.x_rows) == 1 and o.scaling == first.scaling and o.g_rows[0].dtype == first.g_rows[0].dtype
           and o.x_rows[0].dtype == first.x_rows[0].dtype for o in observations):
        g = torch.stack([o.g_rows[0] for o in observations])
        S = g.to(torch.promote_types(g.dtype, torch.float32)) / first.scaling
        X = torch.stack([o.x_rows[0] for o in observations])
    else:
        rows = [o.rows() for o in observations]
        S = torch.stack([s for _, s in rows])
        X = torch.stack([x.to(s.dtype) for x, s in rows])
    return S, X.to(S.dtype)


# ------------------------------------------------------------------------------------------------- reductions


def reduce_observations(
    observations: List[LayerObservation], dist: DistributedContext, mean_loss: Callable[[LayerObservation], bool]
) -> Reduced:
    """Per observation: the rank-averaged projections and the rank-summed statistics, in one collective.
    ``mean_loss(obs)``: whether the loss was a mean over rows (undone in the metric statistics)."""
    out: Reduced = {}
    names: List[Tuple[int, str]] = []
    tensors: List[Tensor] = []
    for obs in observations:
        d: Dict[str, object] = {}
        n = float(obs.n_rows)
        if obs.left is not None:
            d["left"], d["right"] = obs.left, obs.right
        if obs.x_sq is not None:
            kappa = n if mean_loss(obs) else 1.0
            # Without a collective the factor stays a host number, applied later in one batched multiply.
            if dist.active:
                d["x_sq"], d["s_sq"], d["s_sq_scale"] = obs.x_sq, obs.s_sq * (kappa * kappa), 1.0
            else:
                d["x_sq"], d["s_sq"], d["s_sq_scale"] = obs.x_sq, obs.s_sq, kappa * kappa
        if obs.shampoo_in is not None:
            kappa2 = n if mean_loss(obs) else 1.0 / n
            if dist.active:
                d["shampoo_in"], d["shampoo_out"] = obs.shampoo_in * kappa2, obs.shampoo_out * kappa2
                d["shampoo_scale"] = 1.0
            else:
                d["shampoo_in"], d["shampoo_out"], d["shampoo_scale"] = obs.shampoo_in, obs.shampoo_out, kappa2
        out[id(obs)] = d
        if not dist.active:
            # A host number: a device tensor per layer would cost one host-to-device copy each.
            d["n_rows"] = n
            continue
        d["n_rows"] = torch.tensor(n, dtype=torch.float32, device=_device_of(obs))
        for key, value in d.items():
            if torch.is_tensor(value):
                names.append((id(obs), key))
                tensors.append(value.float())
    if dist.active and tensors:
        world = float(dist.world_size)
        summed = dist.sum_many(tensors)
        for (oid, key), value in zip(names, summed):
            # Projections (like .grad under DDP) and per-rank Shampoo statistics are averaged; row sums add up.
            out[oid][key] = value / world if key in ("left", "right", "shampoo_in", "shampoo_out") else value
    return out


def _device_of(obs: LayerObservation) -> torch.device:
    for t in (obs.left, obs.G, obs.x_sq, obs.shampoo_in):
        if t is not None:
            return t.device
    return obs.x_rows[0].device if obs.x_rows else torch.device("cpu")


def clip_norm(active_groups, dist: DistributedContext) -> Tuple[Tensor, bool]:
    """The norm of the whole gradient (the captured ``G`` of every observed layer and the other parameters'
    ``.grad``), rank-averaged; and whether a streamed layer accumulated several micro-batches (its norm is then the
    sum of theirs, an upper bound)."""
    # Squared norms of every piece, gathered in a few multi-tensor reductions rather than one chain of adds
    # per layer (each add is a launch).
    dense, bounds, grads, parts = [], [], [], []
    accumulated_stream = False
    rows: Dict[tuple, List[LayerObservation]] = {}
    for _, observed, with_grad in active_groups:
        for _, obs in observed:
            if obs.G is not None:
                dense.append(obs.G)
            elif obs.x_rows:
                x, g = obs.x_rows[0], obs.g_rows[0]
                key = (obs.n_rows, x.shape[-1], g.shape[-1], x.dtype, g.dtype, x.device)
                rows.setdefault(key, []).append(obs)
            else:
                bounds.append(obs.grad_norm_bound)
                accumulated_stream = accumulated_stream or obs.pairs > 1
        grads += [p.grad for p in with_grad]
    for group in rows.values():
        if len(group) == 1:
            parts.append(group[0].grad_sq_norm())
        else:  # every layer of the group at once, by the cheaper route of lowrank_sq_norm
            S, X = stacked_rows(group)
            parts.append(lowrank_sq_norm(S.mT, X).sum())
    sharded = [local(g) for g in grads if is_dtensor(g)]
    grads = [g for g in grads if not is_dtensor(g)]
    if sharded:
        # FSDP2: shards of the rank-averaged gradient; the sum over ranks of their squares is its squared norm.
        local_sq = torch.stack(torch._foreach_norm([g.float() for g in sharded])).square().sum()
        parts.append(dist.sum_many([local_sq])[0])
    device = (dense + bounds + grads + parts)[0].device
    if dense:
        parts.append(torch.nn.utils.get_total_norm(dense).square())
    if bounds:
        parts.append(torch.stack(bounds).square().sum())
    if grads:  # in fp32 at least (a bf16 norm would round the clipping coefficient)
        grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
        parts.append(torch.nn.utils.get_total_norm(grads).square())
    sq = torch.stack([t.to(device) for t in parts]).sum()
    return dist.mean(sq.sqrt()), accumulated_stream


# ------------------------------------------------------------------------------------------------- write-back


class Commit:
    """New values for a bucket's parameters and state, written back once the whole step is known to be finite
    (``deferred``: ``(destinations, new momentum, old momentum, balance mode)``, written by
    :func:`balance_momentum` after balancing)."""

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
            torch._foreach_copy_(destinations, _rows_as(value, destinations))


def _rows_as(value: Tensor, destinations: List[Tensor]) -> List[Tensor]:
    """The ``L`` slices of ``value: (L, ...)`` shaped like ``destinations``: one ``unbind`` for the bucket, and a
    per-slice ``view`` only where a destination's shape differs (a 1x1 convolution's 4-d weight), since each view is
    a dispatcher call per layer."""
    rows = list(value.unbind(0))
    return [v if v.shape == d.shape else v.view_as(d) for v, d in zip(rows, destinations)]


def balance_momentum(commits: List[Commit], ok: Tensor) -> None:
    """Balance the new low-rank momentum of every bucket (balanced SVD form, ``functional.psi.balance_many``:
    one batched k x k SVD, or the k x k iterations, for all buckets of one ``momentum_balance`` mode, "svd", "gram"
    or "polar") and write it back where the step went through (``ok``; the old momentum, already balanced, stays otherwise).  Runs last in the
    step: ``linalg.svd`` reads its convergence flags on the host, which on CUDA waits for the device, and with
    nothing left to launch after it the wait exposes only this tail instead of the rest of the step."""
    pending = [c.deferred for c in commits if c.deferred is not None]
    if not pending:
        return
    balanced: list = [None] * len(pending)
    for mode in dict.fromkeys(d[3] for d in pending):  # "svd", "gram" or "polar" (a group's momentum_balance)
        idx = [i for i, d in enumerate(pending) if d[3] == mode]
        for i, pair in zip(idx, balance_many([(pending[i][1][0], pending[i][1][1]) for i in idx], mode=mode)):
            balanced[i] = pair
    for (lists, _, old, _), pair in zip(pending, balanced):
        for destinations, value, previous in zip(lists, pair, old):
            value = torch.where(ok, value, previous)
            torch._foreach_copy_(destinations, _rows_as(value, destinations))
