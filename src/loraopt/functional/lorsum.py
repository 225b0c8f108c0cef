"""LoRSum: proximal alternating least squares for "low-rank matrix + low-rank update".

Notation (``d_out`` x ``d_in`` matrices, rank ``r``):

* anchor ``(c0, B0, A0)`` with ``B0: (d_out, r)``, ``A0: (r, d_in)``: the current factors.
* terms ``(c_j, L_j, R_j)`` with ``L_j: (d_out, k_j)``, ``R_j: (k_j, d_in)`` for any inner size ``k_j``.
  A gradient is the term ``(c, S^T, X)`` with ``S: (N, d_out)``, ``X: (N, d_in)``; a low-rank momentum is
  ``(c, M_B, M_A)``.  ``Delta = sum_j c_j L_j R_j`` is never formed.  A term ``(c, G, None)`` is a dense
  ``d_out x d_in`` matrix ``G``: the capture holds a gradient that way when ``G`` is smaller than its rows
  (``d_in d_out < N (d_in + d_out)``), and the projections ``B^T G``, ``G A^T`` then cost ``r d_in d_out``.

Batches: every function accepts a leading batch dimension on all matrices (``(L, d_out, r)`` etc., metrics
``(L, d)``), so the LoRSums of L layers of one shape run as one set of batched products and batched r x r
solves.  The per-layer call is the reference; the batched one is tested equal to it in float64.

The target is ``T = c0 B0 A0 + P_out^-1 Delta P_in^-1`` (``P = I`` when no metric is given) and one LoRSum solves

    min_{A,B}  1/2 |P_out^1/2 (B A - T) P_in^1/2|^2 + lam/2 |(A - A0) P_in^1/2|^2 + lam/2 |P_out^1/2 (B - B0)|^2

by exact block minimisation, A first, then B.  ``iters = K >= 1`` runs K alternating rounds; ``iters = 0`` runs
one Jacobi round in which both half-steps start from the anchor (this is the ScaledGD / Riemannian-preconditioned
step, never a no-op).  Every product is associated so that nothing of size ``d_out * d_in`` is materialised, and
all arithmetic runs in ``compute_dtype`` (fp32 by default) whatever the input dtypes.

Distributed use: a term may carry a fourth element ``local=True`` (data that lives on this rank only, e.g. the
captured rows).  The projections of all local terms are summed and passed through ``all_reduce`` once per
half-step, so every rank continues with identical iterates.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Coef = Union[float, Tensor]
Term = Tuple  # (coef, left, right) or (coef, left, right, local)
AllReduce = Optional[Callable[[Tensor], Tensor]]

__all__ = [
    "LoRSumResult",
    "lorsum",
    "lorsum_from_projections",
    "project_left",
    "project_right",
    "spd_solve",
    "svd_project",
    "svd_factors",
    "scaled_svd_project",
    "lowrank_sq_norm",
]


class LoRSumResult(NamedTuple):
    """``B: (d_out, r)``, ``A: (r, d_in)`` in the compute dtype; ``fallbacks``: 0-dim int tensor counting the
    r x r systems whose Cholesky factorisation failed and were solved by LU instead."""

    B: Tensor
    A: Tensor
    fallbacks: Tensor


def spd_solve(gram: Tensor, rhs: Tensor, *, jitter: float, anchor: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Solve ``(gram + jitter*I) X = rhs`` for a symmetric positive (semi)definite ``gram: (r, r)``.

    Cholesky first.  Where it fails (an ill-conditioned Gram matrix of nearly collinear factors, rounded in fp32
    or built from bf16 weights), a second Cholesky with the jitter raised to ``1e-4`` of the system's mean
    diagonal; the solution is then that of a slightly more damped system, which is what a proximal step wants.
    With ``anchor`` (the proximal target, shaped like ``X``) the extra damping pulls towards it, as the proximal
    term does (``rhs`` gains ``extra * anchor``), so an anchor that solves the system stays its solution; without
    it the extra damping pulls towards zero.
    Where that fails too (the system is indefinite, not just ill-conditioned), LU.  A non-finite input stays
    non-finite, and the caller's finiteness guard skips the step.  Every route is evaluated and selected with
    ``torch.where``, so no host synchronisation is needed (an r x r solve is negligible next to the products).
    Batched over leading dimensions.

    Returns ``(X, failed)``; ``failed`` (int64, one per system) is 1 where the first factorisation failed.
    """
    n = gram.shape[-1]
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    system = gram + jitter * eye if _nonzero(jitter) else gram
    chol, info = torch.linalg.cholesky_ex(system)
    x_chol = torch.cholesky_solve(rhs, chol)
    scale = system.diagonal(dim1=-2, dim2=-1).abs().mean(-1)[..., None, None]
    extra = 1e-4 * scale + torch.finfo(gram.dtype).tiny ** 0.5
    chol2, info2 = torch.linalg.cholesky_ex(system + extra * eye)
    x_escalated = torch.cholesky_solve(rhs if anchor is None else rhs + extra * anchor, chol2)
    x_lu, _ = torch.linalg.solve_ex(system, rhs)
    failed = info != 0  # one flag per system of a batch
    x_fallback = torch.where((info2 != 0)[..., None, None], x_lu, x_escalated)
    return torch.where(failed[..., None, None], x_fallback, x_chol), failed.to(torch.int64)


def _nonzero(x: Coef) -> bool:
    """Whether a coefficient may be nonzero: a host number is tested, a tensor (one value per layer, shaped to
    broadcast over the batch, e.g. ``(L, 1, 1)``) is assumed so (testing it would synchronise)."""
    return torch.is_tensor(x) or bool(x)


def _split(term: Term) -> Tuple[Coef, Tensor, Optional[Tensor], bool]:
    if len(term) == 3:
        c, left, right = term
        return c, left, right, False
    c, left, right, local = term
    return c, left, right, bool(local)


def _project(terms: Sequence[Term], apply: Callable[[Tensor, Tensor], Tensor], all_reduce: AllReduce) -> Tensor:
    replicated: Optional[Tensor] = None
    local: Optional[Tensor] = None
    for term in terms:
        c, left, right, is_local = _split(term)
        value = apply(left, right) * c
        if is_local:
            local = value if local is None else local + value
        else:
            replicated = value if replicated is None else replicated + value
    if local is not None and all_reduce is not None:
        local = all_reduce(local)
    parts = [t for t in (replicated, local) if t is not None]
    if not parts:
        raise ValueError("lorsum needs at least one term")
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


def project_left(terms: Sequence[Term], B: Tensor, all_reduce: AllReduce = None) -> Tensor:
    """``B^T Delta = sum_j c_j (B^T L_j) R_j``: ``(r, d_in)``, cost ``O(k_j r (d_out + d_in))`` per term
    (``r d_out d_in`` for a dense term)."""
    return _project(terms, lambda left, right: B.mT @ left if right is None else (B.mT @ left) @ right, all_reduce)


def project_right(terms: Sequence[Term], A: Tensor, all_reduce: AllReduce = None) -> Tensor:
    """``Delta A^T = sum_j c_j L_j (R_j A^T)``: ``(d_out, r)``."""
    return _project(terms, lambda left, right: left @ A.mT if right is None else left @ (right @ A.mT), all_reduce)


def _a_half_step(c0, B0, A0, B, BtDelta, lam, p_in_inv, p_out, jitter):
    """A = (B^T P_out B + lam I)^-1 (lam A0 + c0 (B^T P_out B0) A0 + B^T Delta P_in^-1)."""
    BtP = B.mT if p_out is None else B.mT * p_out.unsqueeze(-2)
    rhs = BtDelta if p_in_inv is None else BtDelta * p_in_inv.unsqueeze(-2)
    rhs = rhs + (BtP @ B0 @ A0) * c0
    lam = lam + jitter  # the jitter acts as extra proximal weight, so it never biases A away from the anchor
    if _nonzero(lam):
        rhs = rhs + lam * A0
    return spd_solve(BtP @ B, rhs, jitter=lam, anchor=A0)


def _b_half_step(c0, B0, A0, A, DeltaAt, lam, p_in, p_out_inv, jitter):
    """B = (lam B0 + c0 B0 (A0 P_in A^T) + P_out^-1 Delta A^T) (A P_in A^T + lam I)^-1."""
    AP = A if p_in is None else A * p_in.unsqueeze(-2)
    rhs = DeltaAt if p_out_inv is None else DeltaAt * p_out_inv.unsqueeze(-1)
    rhs = rhs + (B0 @ (A0 @ AP.mT)) * c0
    lam = lam + jitter
    if _nonzero(lam):
        rhs = rhs + lam * B0
    # B G = rhs with G symmetric  <=>  G B^T = rhs^T
    Bt, failed = spd_solve(AP @ A.mT, rhs.mT, jitter=lam, anchor=B0.mT)
    return Bt.mT, failed


def _as(x: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if x is None else x.to(dtype)


def lorsum_from_projections(
    anchor: Tuple[Coef, Tensor, Tensor],
    BtDelta: Tensor,
    DeltaAt: Tensor,
    *,
    lam: float,
    p_in: Optional[Tensor] = None,
    p_out: Optional[Tensor] = None,
    jitter: float = 1e-6,
    compute_dtype: torch.dtype = torch.float32,
) -> LoRSumResult:
    """The Jacobi round (``iters = 0``) from precomputed projections of Delta on the anchor factors.

    ``BtDelta = B0^T Delta: (r, d_in)`` and ``DeltaAt = Delta A0^T: (d_out, r)``.  This is the entry point of
    the streaming mode, where the projections are accumulated during backward and ``Delta`` never exists as rows.
    An anchor coefficient ``c0 > 0`` is folded into the factors (``sqrt(c0) B0``, ``sqrt(c0) A0``) so that it is
    applied once, not once per half-step.  With ``c0 = 1``: ``A+ = A0 + (B0^T P_out B0 + lam I)^-1 B0^T Delta P_in^-1`` and
    ``B+ = B0 + P_out^-1 Delta A0^T (A0 P_in A0^T + lam I)^-1``.
    """
    c0, B0, A0 = anchor
    B0, A0 = B0.to(compute_dtype), A0.to(compute_dtype)
    BtDelta, DeltaAt = BtDelta.to(compute_dtype), DeltaAt.to(compute_dtype)
    if not (isinstance(c0, (int, float)) and c0 in (0, 1)):
        # Both half-steps start from the anchor, so an anchor coefficient would be applied once by each (c0^2).
        # Writing c0 B0 A0 = (sqrt(c0) B0)(sqrt(c0) A0) makes the anchor coefficient 1 and the round exact for
        # Delta = 0; the projections on the rescaled factors are sqrt(c0) times the given ones.
        # A Python coefficient stays on the host (no host-to-device copy per call).
        if isinstance(c0, (int, float)):
            root = math.sqrt(c0)
        else:
            root = torch.as_tensor(c0, dtype=compute_dtype, device=B0.device).sqrt()
        B0, A0, BtDelta, DeltaAt, c0 = B0 * root, A0 * root, BtDelta * root, DeltaAt * root, 1.0
    p_in, p_out = _as(p_in, compute_dtype), _as(p_out, compute_dtype)
    p_in_inv = None if p_in is None else p_in.reciprocal()
    p_out_inv = None if p_out is None else p_out.reciprocal()
    A, fa = _a_half_step(c0, B0, A0, B0, BtDelta, lam, p_in_inv, p_out, jitter)
    B, fb = _b_half_step(c0, B0, A0, A0, DeltaAt, lam, p_in, p_out_inv, jitter)
    return LoRSumResult(B, A, fa + fb)


def lorsum(
    anchor: Tuple[Coef, Tensor, Tensor],
    terms: Sequence[Term],
    *,
    iters: int,
    lam: float,
    p_in: Optional[Tensor] = None,
    p_out: Optional[Tensor] = None,
    jitter: float = 1e-6,
    all_reduce: AllReduce = None,
    compute_dtype: torch.dtype = torch.float32,
) -> LoRSumResult:
    """Rank-r approximation of ``c0 B0 A0 + P_out^-1 (sum_j c_j L_j R_j) P_in^-1`` anchored at ``(B0, A0)``.

    Args:
        anchor: ``(c0, B0: (d_out, r), A0: (r, d_in))``.  The output has the anchor's rank.
        terms: ``(c_j, L_j: (d_out, k_j), R_j: (k_j, d_in)[, local])``, or ``(c_j, G_j: (d_out, d_in), None[, local])``
            for a dense term.
        iters: K.  ``K >= 1``: K alternating rounds (A then B); ``K = 0``: one Jacobi round.
        lam: proximal weight (already multiplied by the learning rate).  ``lam = 0`` with a rank-deficient
            factor leaves the systems singular up to ``jitter``.
        p_in, p_out: diagonal metric ``(d_in,)``, ``(d_out,)`` (``(L, d)`` for a batch), strictly positive;
            ``None`` means identity.
        jitter: added to ``lam`` (in the systems and in the proximal pull, so the anchor stays a fixed point):
            keeps the r x r systems positive definite when ``lam = 0`` and a factor is rank-deficient.
        all_reduce: applied to the summed projections of the ``local`` terms once per half-step.
        compute_dtype: dtype of every product and solve.

    Returns:
        :class:`LoRSumResult` in ``compute_dtype``.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    c0, B0, A0 = anchor
    B0, A0 = B0.to(compute_dtype), A0.to(compute_dtype)
    terms = [
        (c, left.to(compute_dtype), None if right is None else right.to(compute_dtype), *rest)
        for c, left, right, *rest in terms
    ]
    if iters == 0:
        return lorsum_from_projections(
            (c0, B0, A0),
            project_left(terms, B0, all_reduce),
            project_right(terms, A0, all_reduce),
            lam=lam, p_in=p_in, p_out=p_out, jitter=jitter, compute_dtype=compute_dtype,
        )
    p_in, p_out = _as(p_in, compute_dtype), _as(p_out, compute_dtype)
    p_in_inv = None if p_in is None else p_in.reciprocal()
    p_out_inv = None if p_out is None else p_out.reciprocal()
    B = B0
    fallbacks = torch.zeros(B0.shape[:-2], dtype=torch.int64, device=B0.device)
    for _ in range(iters):
        A, fa = _a_half_step(c0, B0, A0, B, project_left(terms, B, all_reduce), lam, p_in_inv, p_out, jitter)
        B, fb = _b_half_step(c0, B0, A0, A, project_right(terms, A, all_reduce), lam, p_in, p_out_inv, jitter)
        fallbacks = fallbacks + fa + fb
    return LoRSumResult(B, A, fallbacks)


# ---------------------------------------------------------------------------------------------- dense references


def svd_factors(W: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """Balanced factors of the truncated SVD: ``B = U_r S_r^1/2: (d_out, r)``, ``A = S_r^1/2 V_r^T: (r, d_in)``.

    Each singular pair's sign is fixed (the largest-magnitude entry of each column of ``U`` is made positive), so
    the factors, not only their product, are the same on every backend: LAPACK and cuSOLVER may return opposite
    signs for the same matrix, which made FSDP2 ranks on GPUs disagree with a CPU reference by a whole factor.
    When ``rank > min(d_out, d_in)`` the extra components are zero (the factors keep the requested shapes)."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, Vh = canonical_svd_signs(U, Vh)
    root = S[:rank].sqrt()
    B, A = U[:, :rank] * root, root.unsqueeze(-1) * Vh[:rank]
    missing = rank - root.numel()
    if missing > 0:
        B = torch.cat([B, B.new_zeros(B.shape[0], missing)], dim=1)
        A = torch.cat([A, A.new_zeros(missing, A.shape[1])], dim=0)
    return B, A


def canonical_svd_signs(U: Tensor, Vh: Tensor) -> Tuple[Tensor, Tensor]:
    """``(U, Vh)`` with each singular pair's sign flipped so that the largest-magnitude entry of every column of
    ``U: (..., m, k)`` is positive; ``Vh: (..., k, n)`` flips with it, so ``U diag(S) Vh`` is unchanged."""
    pivot = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.where(U.gather(-2, pivot) < 0, -1.0, 1.0).to(U.dtype)
    return U * signs, Vh * signs.transpose(-1, -2)


def svd_project(W: Tensor, rank: int) -> Tensor:
    """``Pi_r(W)``: the best rank-``rank`` approximation of ``W: (d_out, d_in)`` (Eckart-Young)."""
    B, A = svd_factors(W, rank)
    return B @ A


def scaled_svd_project(T: Tensor, rank: int, p_in: Tensor, p_out: Tensor) -> Tensor:
    """``P_out^-1/2 Pi_r(P_out^1/2 T P_in^1/2) P_in^-1/2``: the optimum of the weighted rank-r problem."""
    ro, ri = p_out.sqrt().unsqueeze(-1), p_in.sqrt()
    return svd_project(ro * T * ri, rank) / ro / ri


def lowrank_sq_norm(left: Tensor, right: Tensor) -> Tensor:
    """``|left @ right|_F^2`` for ``left: (..., d_out, N)``, ``right: (..., N, d_in)`` by the cheaper route; one
    value per leading index (a 0-dim tensor for 2-D inputs).

    Gram route ``<left^T left, right right^T>`` costs ``N^2 (d_in + d_out)``; the dense route forms the product in
    row blocks and costs ``N d_in d_out`` with ``O(block * d_in)`` memory per leading index.
    """
    d_out, n = left.shape[-2:]
    d_in = right.shape[-1]
    if n * (d_in + d_out) <= d_in * d_out:
        return ((left.mT @ left) * (right @ right.mT)).sum(dim=(-2, -1))
    total = left.new_zeros(left.shape[:-2])
    for block in row_block_products(left, right):
        total = total + block.square().sum(dim=(-2, -1))
    return total


def row_block_products(left: Tensor, right: Tensor, budget: int = 1 << 24):
    """``left @ right`` for ``left: (..., d_out, N)``, ``right: (..., N, d_in)``, yielded in consecutive blocks of
    rows ``(..., block, d_in)`` of about ``budget`` elements in all (every leading index together), so that a
    statistic of the product never holds the whole ``(..., d_out, d_in)`` matrix."""
    d_out, d_in = left.shape[-2], right.shape[-1]
    batch = max(1, left[..., :1, :1].numel())
    block = max(1, budget // max(d_in * batch, 1))
    for start in range(0, d_out, block):
        yield left[..., start : start + block, :] @ right
