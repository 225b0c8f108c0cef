"""The diagonal Kronecker metric of Scaled PSI-LoRA: statistics -> EMA -> damped fractional power.

Per layer the metric is ``P_in = (v_in + damping)^power`` on the input side (``(d_in,)``) and
``P_out = (v_out + damping)^power`` on the output side (``(d_out,)``), where ``v`` is an exponential moving average
of one of two per-step statistics of the captured rows ``X: (N, d_in)`` and output gradients ``S: (N, d_out)``:

* K-FAC diagonal: ``mean_rows(X * X)`` and ``mean_rows((kappa S) * (kappa S))``, with ``kappa`` undoing the
  ``1/N`` of a mean-reduced loss inside ``S``;
* Shampoo diagonal: ``diag(G^T G)`` and ``diag(G G^T)`` for ``G = S^T X``, times ``kappa'``.

The per-layer step normalisation (``normalize="layer"`` of the PSI family) is the scalar extreme of such a metric:
one EMA of the mean squared entry of ``G`` per layer (:func:`layer_grad_sq_norms`, :func:`layer_step_scale`).
``normalize="factored"`` keeps one EMA per row and per column of ``G * G`` and divides each entry by the root of
their rank-one estimate of its second moment, as Adafactor does (:func:`grad_row_col_sq`,
:func:`factored_step_scales`): Adam's per-entry normalisation from ``d_out + d_in`` numbers per layer.

Every function accepts a leading batch dimension (``(L, d)``), one row per layer.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .lorsum import lowrank_sq_norm, row_block_products

__all__ = ["metric_ema", "debias", "metric_preconditioner", "metric_step", "stack_or_scalar", "layer_grad_sq_norms",
           "layer_step_scale", "grad_row_col_sq", "factored_step_scales", "full_step_scale"]

Scalar = Union[float, Tensor]
# grad_row_col_sq forms G = S^T X in blocks of rows of about this many elements (all layers of the batch together).
_BLOCK_ELEMENTS = 1 << 24


def metric_ema(v: Tensor, stat: Tensor, beta2: float) -> Tensor:
    """``beta2 v + (1 - beta2) stat``."""
    return v * beta2 + stat * (1.0 - beta2)


def debias(v: Tensor, beta2: float, step: Scalar) -> Tensor:
    """Adam's bias correction of an EMA that started at zero: ``v / (1 - beta2^t)`` (``t >= 1``).

    (Removing a unit start, ``(v - beta2^t) / (1 - beta2^t)``, would cancel catastrophically in fp32 when the
    statistics are far below one, as output-gradient statistics are.)"""
    return v / (1.0 - beta2 ** step)


def metric_preconditioner(v: Tensor, damping: float, power: float) -> Tensor:
    """``(v + damping)^power`` elementwise."""
    return (v + damping).pow(power)


def metric_step(
    v_in: Tensor,
    v_out: Tensor,
    stat_in: Tensor,
    stat_out: Tensor,
    *,
    beta2: float,
    damping: float,
    power: float,
    step: Scalar = 1,
    bias_correction: bool = False,
    relative: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One metric update: ``(new v_in, new v_out, P_in, P_out)``; shapes ``(..., d_in)``, ``(..., d_out)``.

    With ``bias_correction`` the EMA must have started at zero, and the preconditioner uses :func:`debias` of it at
    ``step`` (1 for the first update; a host number or a broadcastable tensor): the metric is then the weighted
    average of the statistics seen so far, instead of being pulled towards the unit start for the first
    ~1/(1 - beta2) steps.  Without it the EMA starts at one and is used as is (the reference).

    With ``relative=True`` the metric keeps its shape and drops its scale: the damping is relative to the mean
    of ``v`` (``(v + damping mean(v))^power``) and each preconditioner is divided by its mean, so ``P`` has mean 1
    per layer.  The absolute metric multiplies the step by ``1 / (scale(P_in) scale(P_out))``, and that scale
    follows the loss's: on MiniLM / SST-2 ``v_out`` decays from its unit start towards ~0 and ``P_out`` towards
    ``sqrt(damping)``, a 300-fold rise of the effective step over the first ~500 steps (``benchmarks/notes/psi.md``).
    Relative, the learning rate alone sets the step size and the metric only redistributes it across coordinates.
    """
    new_in, new_out = metric_ema(v_in, stat_in, beta2), metric_ema(v_out, stat_out, beta2)
    used_in, used_out = new_in, new_out
    if bias_correction:
        used_in, used_out = debias(new_in, beta2, step), debias(new_out, beta2, step)
        # Statistics are non-negative; a rounding error must not make the damped base negative.
        used_in, used_out = used_in.clamp_min(0.0), used_out.clamp_min(0.0)
    if not relative:
        return new_in, new_out, metric_preconditioner(used_in, damping, power), metric_preconditioner(used_out, damping, power)
    return new_in, new_out, _relative(used_in, damping, power), _relative(used_out, damping, power)


def _relative(v: Tensor, damping: float, power: float) -> Tensor:
    """``(v + damping mean(v))^power`` divided by its mean, per row; a zero ``v`` gives the identity."""
    mean = v.mean(-1, keepdim=True)
    tiny = torch.finfo(v.dtype).tiny
    p = (v + damping * mean + tiny).pow(power)
    return p / p.mean(-1, keepdim=True)


def layer_grad_sq_norms(left: Tensor, right: Optional[Tensor]) -> Tensor:
    """``|G|_F^2`` of each layer, ``(L,)``: rows ``left = S^T: (L, d_out, N)``, ``right = X: (L, N, d_in)`` (``G =
    S^T X``, by :func:`~loraopt.functional.lorsum.lowrank_sq_norm`'s cheaper route), or ``left = G: (L, d_out,
    d_in)`` and ``right = None`` (dense)."""
    if right is None:
        return left.square().sum(dim=(-2, -1))
    return lowrank_sq_norm(left, right)


def layer_step_scale(
    avg: Tensor, sq_norm: Tensor, *, numel: Scalar, beta2: float, step: Scalar, eps: float
) -> Tuple[Tensor, Tensor]:
    """Per-layer normalisation of the full-weight step: ``(scale, new avg)``, both ``(L,)``.

    ``avg`` is an EMA (rate ``beta2``, started at zero) of each layer's mean squared gradient entry
    ``|G|_F^2 / numel``; ``scale = 1 / (sqrt(avg / (1 - beta2^step)) + eps)``.  Multiplying ``G`` by ``scale`` makes
    the root mean square of each layer's step entries about the learning rate, whatever the scale of that layer's
    gradient: Adam's second moment with one number per layer instead of one per entry.  ``step`` is the index of this
    update (1 for the first)."""
    new_avg = metric_ema(avg, sq_norm / numel, beta2)
    return 1.0 / (debias(new_avg, beta2, step).clamp_min(0.0).sqrt() + eps), new_avg


def stack_or_scalar(values, device) -> Union[float, Tensor]:
    """Per-layer scalars as one host number when they agree, else an ``(L, 1)`` fp32 tensor (no host sync)."""
    if all(not torch.is_tensor(v) for v in values):
        if all(v == values[0] for v in values):
            return values[0]
        return torch.tensor(values, dtype=torch.float32, device=device).view(-1, 1)
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values]).view(-1, 1)


def grad_row_col_sq(left: Tensor, right: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The mean squared entry of each row and each column of ``G``: ``((L, d_out), (L, d_in))``.

    ``left = S^T: (L, d_out, N)``, ``right = X: (L, N, d_in)`` (rows: ``G = S^T X`` is formed in blocks of rows,
    ``N d_in d_out`` flops, what one of the step's own products costs, with ``O(2^24)`` elements of memory), or
    ``left = G`` and ``right = None`` (dense)."""
    if right is None:
        sq = left.square()
        return sq.mean(dim=-1), sq.mean(dim=-2)
    rows, col_sum = [], None
    for block in row_block_products(left, right, _BLOCK_ELEMENTS):
        sq = block.square()
        rows.append(sq.mean(dim=-1))
        col_sum = sq.sum(dim=-2) if col_sum is None else col_sum + sq.sum(dim=-2)
    return torch.cat(rows, dim=-1), col_sum / left.shape[-2]


def factored_step_scales(
    row_avg: Tensor,
    col_avg: Tensor,
    row_sq: Tensor,
    col_sq: Tensor,
    *,
    beta2: float,
    step: Scalar,
    eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Adafactor's factored second moment as two diagonal scalings of ``G``: ``(s_out, s_in, new row_avg,
    new col_avg)``, shapes ``(L, d_out)``, ``(L, d_in)``, ``(L, d_out)``, ``(L, d_in)``.

    ``row_avg`` / ``col_avg`` are EMAs (rate ``beta2``, started at zero, bias-corrected at ``step``, 1 for the first
    update) of the mean squared entry of each row / column of ``G`` (:func:`grad_row_col_sq`).  Their rank-one
    estimate of the second moment of entry ``(i, j)`` is ``V_ij = r_i c_j / mean(r)`` (exact when the second
    moments form a rank-one matrix), and ``G_ij / sqrt(V_ij) = s_out_i G_ij s_in_j`` with
    ``s_out = 1 / sqrt(r)`` and ``s_in = sqrt(mean(r)) / sqrt(c)``: the scaled gradient's entries have RMS about
    one, so the learning rate is a per-entry step size as in Adam.  ``eps`` is a damping relative to the mean of
    each EMA (a row or column that never saw a gradient takes no step, and a nearly dead one no huge step)."""
    new_row, new_col = metric_ema(row_avg, row_sq, beta2), metric_ema(col_avg, col_sq, beta2)
    r = debias(new_row, beta2, step).clamp_min(0.0)
    c = debias(new_col, beta2, step).clamp_min(0.0)
    s_out = _damped_rsqrt(r, eps, dim=-1)
    s_in = r.mean(-1, keepdim=True).sqrt() * _damped_rsqrt(c, eps, dim=-1)
    return s_out, s_in, new_row, new_col


def _damped_rsqrt(v: Tensor, eps: float, dim) -> Tensor:
    """``1 / sqrt(v + eps mean(v) + tiny)``, the mean over ``dim``: the step normalisations' damping relative to
    the second moment's own scale (a coordinate that never saw a gradient takes no step, a nearly dead one no huge
    step, and ``tiny`` keeps an all-zero ``v`` finite)."""
    return (v + eps * v.mean(dim=dim, keepdim=True) + torch.finfo(v.dtype).tiny).rsqrt()


def full_step_scale(avg: Tensor, sq: Tensor, *, beta2: float, step: Scalar, eps: float) -> Tuple[Tensor, Tensor]:
    """Adam's second moment of every entry of ``G``, for measurement: ``(scale, new avg)``, both ``(L, d_out, d_in)``.

    ``avg`` is the EMA (rate ``beta2``, started at zero, bias-corrected at ``step``) of the squared entries ``sq =
    G * G``; ``G * scale`` has entries of RMS about one, as :func:`factored_step_scales` does with its rank-one
    estimate, and ``eps`` is the same damping relative to the EMA's mean.  It keeps ``d_out x d_in`` numbers per
    layer (more than the adapter): the reference the factored estimate approximates."""
    new = metric_ema(avg, sq, beta2)
    v = debias(new, beta2, step).clamp_min(0.0)
    return _damped_rsqrt(v, eps, dim=(-2, -1)), new
