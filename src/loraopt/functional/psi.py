"""One step of the PSI-LoRA family for a batch of LoRA layers of one shape: the single source of the update rule.

Shapes (``L`` layers stacked on a leading dimension; one layer is a batch of one):

* ``A: (L, r, d_in)``, ``B: (L, d_out, r)``: the *effective* factors (``sqrt(s)`` times PEFT's, so ``B A = Delta W``),
  in the compute dtype (fp32, or fp64 in tests).
* the captured gradient ``G = S^T X`` of each layer, in one of three equivalent forms (:class:`Gradient`): its rows,
  the dense ``(L, d_out, d_in)`` matrix, or (K = 0 streaming) its projections on the anchor and momentum factors.
* momentum state: ``(M_B: (L, d_out, r_m), M_A: (L, r_m, d_in))`` (low-rank momentum) or
  ``(buf_A, buf_B, prev_A, prev_B)`` of the factor shapes (factor-space momentum of Proj. PSI-LoRA).
* metric state (Scaled PSI-LoRA): ``v_in: (L, d_in)``, ``v_out: (L, d_out)`` and this step's statistics.

Variants (``docs/specs/psi-lora.md`` §3, §3b, §4), with ``g = grad_coef`` (``(1 - dampening) c`` or
``(1 - beta1) c``, ``c`` the clip factor) and ``m = momentum_coef``:

* ``"psi"``: ``(A, B) <- LoRSum(anchor (c0, B, A); (-lr g, G), (-lr m, M_B M_A); K, lam)`` and
  ``(M_B, M_A) <- LoRSum(anchor (m, M_B, M_A); (g, G); K, lam_momentum)``.  With a metric this is Scaled PSI-LoRA
  (the weights' LoRSum is weighted by ``P_out``, ``P_in``; the momentum's is not).
* ``"proj"``: a momentum-free LoRSum of the weights, then factor-space heavy ball at the new factors: preconditioned
  factor gradients ``g_A = (B^T B + lam I)^-1 B^T G`` and ``g_B = G A^T (A A^T + lam I)^-1``, the old buffers
  transported by ``T_A = (B^T B + lam I)^-1 (B^T prev_B) buf_A`` and ``T_B = buf_B (prev_A A^T) (A A^T + lam I)^-1``,
  ``buf <- m T + g g_*``, ``prev <- (A, B)``, then ``A -= lr m T_A``, ``B -= lr m T_B``.

Deliberate differences from the reference code, each switchable:

* ``momentum_balance="gram"`` (default) rewrites the low-rank momentum after each update in balanced SVD form,
  ``M_B = U sqrt(S)``, ``M_A = sqrt(S) V^T``, from r_m x r_m Grams, Cholesky factors and an SVD in float64 (see
  :func:`balance_gram`); ``"svd"`` gets there with two thin QRs and an r_m x r_m SVD.  The product ``M_B M_A`` is
  unchanged.  Without it the momentum LoRSum shrinks one factor by ``mu`` per step while the other absorbs the
  gradient: the factors drift apart, ``M_A M_A^T`` becomes ill-conditioned and the next solves amplify rounding
  until the step blows up (``benchmarks/notes/psi.md``).  ``"polar"`` balances without any host
  synchronisation (:func:`balance_polar`).  ``"norm"`` only equalises the two Frobenius norms; ``"none"`` is the
  reference.
* ``reference_compat=True`` reproduces the reference where it differs from the paper, which is only at K = 0: its
  unscaled LoRSum is a no-op there (plain PSI-LoRA never moves, the momentum never updates, the first step of
  Proj. PSI-LoRA does nothing).  At K >= 1 the switch changes nothing.

No hooks, no optimizer state, no host synchronisation: the result carries per-layer ``ok`` flags (every output
finite) and the outputs of a failed layer are its inputs, so the caller can write everything back unconditionally.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .lorsum import lorsum, lorsum_from_projections, project_left, project_right, spd_solve
from .metrics import metric_step

__all__ = [
    "PSIConfig",
    "Gradient",
    "MetricInput",
    "PSIStepResult",
    "psi_step",
    "balance_svd",
    "balance_gram",
    "balance_norm",
    "balance_many",
    "balance_polar",
    "CompiledPSIStep",
    "resolve_compile",
]

Coef = Union[float, Tensor]
AllReduce = Optional[Callable[[Tensor], Tensor]]


class PSIConfig(NamedTuple):
    """The static (per parameter group) choices of the step."""

    variant: str = "psi"  # "psi" (low-rank momentum; Scaled PSI-LoRA when a metric is given) or "proj"
    iters: int = 1  # K; 0 is the Jacobi round
    jitter: float = 1e-6
    momentum_balance: str = "gram"  # "gram", "svd", "polar", "norm" or "none"
    momentum_prox: float = 1e-2  # relative proximal weight of the momentum LoRSum, used when lam_momentum is None
    reference_compat: bool = False
    # False: the low-rank momentum is returned unbalanced and the caller balances it (``balance_many``): the
    # optimizer then balances every bucket with one batched SVD at the end of its step (``linalg.svd`` checks its
    # convergence flags on the host, a synchronisation on CUDA: once per step instead of once per bucket).
    balance_in_step: bool = True


class Gradient(NamedTuple):
    """The captured gradient of each layer.

    * rows: ``left = S^T: (L, d_out, N)``, ``right = X: (L, N, d_in)``;
    * dense: ``left = G: (L, d_out, d_in)``, ``right = None``;
    * projections (``projected=True``, K = 0 only): ``left = [B | M_B]^T G: (L, r + r_m, d_in)`` and
      ``right = G [A^T | M_A^T]: (L, d_out, r + r_m)``, taken at the current factors and already reduced over ranks.

    Rows and dense gradients are rank-local: their projections go through ``all_reduce`` inside the step.
    """

    left: Tensor
    right: Optional[Tensor]
    projected: bool = False


class MetricInput(NamedTuple):
    """Scaled PSI-LoRA's diagonal metric: stored EMAs, this step's statistics and the hyperparameters."""

    v_in: Tensor  # (L, d_in)
    v_out: Tensor  # (L, d_out)
    stat_in: Tensor  # (L, d_in)
    stat_out: Tensor  # (L, d_out)
    beta2: float
    damping: float
    power: float
    step: Coef = 1  # index of this update (bias correction only)
    bias_correction: bool = False
    relative: bool = False  # scale-free metric: relative damping, unit mean (functional.metrics.metric_step)


class PSIStepResult(NamedTuple):
    """New effective factors, momentum state (same structure as given), metric EMAs ``(v_in, v_out)``, and per layer
    ``ok: (L,) bool`` and ``fallbacks: (L,) int64`` (r x r systems that needed the Cholesky fallback).  Where
    ``ok`` is false every output equals its input."""

    A: Tensor
    B: Tensor
    momentum: Optional[Tuple[Tensor, ...]]
    metric: Optional[Tuple[Tensor, Tensor]]
    ok: Tensor
    fallbacks: Tensor


# ---------------------------------------------------------------------------------------------- balancing


def balance_norm(B: Tensor, A: Tensor) -> Tuple[Tensor, Tensor]:
    """``(B, A)`` rescaled to equal Frobenius norms per matrix of the batch; ``B A`` is unchanged."""
    nb = torch.linalg.vector_norm(B, dim=(-2, -1), keepdim=True)
    na = torch.linalg.vector_norm(A, dim=(-2, -1), keepdim=True)
    scale = torch.where((nb > 0) & (na > 0), (na / nb).sqrt(), torch.ones_like(nb))
    return B * scale, A / scale


def balance_svd(B: Tensor, A: Tensor, *, floor: float = 1e-4) -> Tuple[Tensor, Tensor]:
    """``(U sqrt(S), sqrt(S) V^T)`` for the SVD ``U S V^T`` of ``B A`` (``B: (..., m, k)``, ``A: (..., k, n)``),
    from two thin QRs and a k x k SVD; the product is unchanged.

    Singular values below ``floor`` times the largest are split unevenly (``M_A`` keeps ``sqrt(floor s_max)``, so
    its rows stay a well-conditioned subspace for the next power iteration); a zero product (the initial momentum)
    is returned as given.  When ``k`` exceeds ``m`` or ``n`` the thin QR cannot represent it: norm balancing then.
    """
    return balance_many([(B, A)], mode="svd", floor=floor)[0]


def _svd_core(B: Tensor, A: Tensor):
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.mT)
    core = Rb @ Ra.mT  # B A = Qb core Qa^T
    finite = torch.isfinite(core).flatten(-2).all(-1)
    # The SVD raises on non-finite input: factor zeros there (the inputs are returned, and the caller's guard
    # sees them).
    return Qb, Qa, torch.where(finite[..., None, None], core, torch.zeros_like(core)), finite


def _svd_finish(B, A, Qb, Qa, finite, U, S, Vh, floor):
    top = S[..., :1]
    kept = torch.maximum(S, floor * top)
    root = kept.sqrt()
    new_B = (Qb @ U) * (S / root.clamp_min(torch.finfo(S.dtype).tiny)).unsqueeze(-2)
    new_A = root.unsqueeze(-1) * (Vh @ Qa.mT)
    usable = finite & (top[..., 0] > 0) & torch.isfinite(new_B).flatten(-2).all(-1) & torch.isfinite(new_A).flatten(-2).all(-1)
    usable = usable[..., None, None]
    return torch.where(usable, new_B, B), torch.where(usable, new_A, A)


def balance_gram(B: Tensor, A: Tensor, *, floor: float = 1e-4) -> Tuple[Tensor, Tensor]:
    """:func:`balance_svd` without a QR of the tall factors: the same balanced form in exact arithmetic.

    With the k x k Grams ``G_B = B^T B``, ``G_A = A A^T`` and triangular ``R_B``, ``R_A`` (``R^T R = G``, shifted
    Cholesky QR run twice, in float64), the core ``R_B R_A^T = U S V^T`` is SVD'd and the factors are rewritten by
    two k x k transforms: ``B' = B R_B^-1 U S / sqrt(S_kept)``, ``A' = sqrt(S_kept) V^T R_A^-T A`` (``S_kept``: the
    singular values floored at ``floor`` times the largest, as in :func:`balance_svd`).  ``B' A' = B A`` for any
    invertible ``R_B``, ``R_A``, so the product holds up to rounding even where the Grams are singular.

    Differences from :func:`balance_svd`: the signs of the singular pairs (each is a valid SVD), and rank-deficient
    factors, whose null directions have no basis without a QR: where ``B`` has rank below k the columns of ``B'``
    there are ~0, as with ``balance_svd``; where ``A`` has rank below k the rows of ``A'`` in its null directions
    stay short (``balance_svd`` fills them with ``sqrt(floor s_max)`` times directions picked by its QR).  Per
    pair, where the result is not finite or not in balanced form to ``sqrt(eps)`` of the input dtype (a
    k x k check: ``B'^T B'`` and ``A' A'^T`` against the diagonals they should be), the pair is returned as given;
    no host synchronisation beyond the SVD's.
    """
    return balance_many([(B, A)], mode="gram", floor=floor)[0]


def _shifted_cholesky(G: Tensor, eye: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(L^T, L^-T, ok)`` for ``L L^T = G + shift I`` (``G: (T, k, k)``, modified in place), the shift 1e-14 of
    the trace: rank-deficient or ill-conditioned Grams stay factorisable, directions below it are left short.
    ``ok``: factorised, and ``G`` not zero."""
    diag = G.diagonal(dim1=-2, dim2=-1)
    trace = diag.sum(-1, keepdim=True)
    diag.add_(trace, alpha=1e-14)
    L, info = torch.linalg.cholesky_ex(G)
    ok = (info == 0) & (trace[:, 0] > 0)
    L = torch.where(ok[:, None, None], L, eye)
    Linv = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    return L.mT, Linv.mT, ok


def _cholesky_qr2(pairs):
    """The k x k reduction shared by ``"gram"`` and ``"polar"`` for pairs of one k: ``B = Y_B R_B`` and
    ``A^T = Y_A R_A`` by Cholesky QR run twice in float64 (CholeskyQR2: the second pass on the explicit first-pass
    ``Q``, so ill-conditioned factors are still orthonormalised to rounding), both sides of every pair in one
    batch.  Returns ``(Y, sizes, G2, R2inv, core, usable)``: ``Y`` the tall orthonormal factors (the B sides, then
    the A sides), ``G2`` their Grams, ``R2inv`` the second pass's inverse factors, ``core = R_B R_A^T (P, k, k)``
    with ``B A = Y_B core Y_A^T`` and ``usable (P,)`` where both factorisations succeeded and the core is finite."""
    k = pairs[0][0].shape[-1]
    P = len(pairs)
    tall = [B.to(torch.float64).reshape(-1, B.shape[-2], k) for B, _ in pairs]
    tall += [A.to(torch.float64).mT.reshape(-1, A.shape[-1], k) for _, A in pairs]
    sizes = [x.shape[0] for x in tall]
    G = torch.cat([torch.bmm(x.mT, x) for x in tall])
    eye = torch.eye(k, dtype=G.dtype, device=G.device)
    R1, R1inv, ok1 = _shifted_cholesky(G, eye)
    Y = [torch.bmm(x, r) for x, r in zip(tall, R1inv.split(sizes))]
    G2 = torch.cat([torch.bmm(y.mT, y) for y in Y])
    R2, R2inv, ok2 = _shifted_cholesky(G2.clone(), eye)
    R = torch.bmm(R2, R1)
    h = sum(sizes[:P])
    usable = ok1 & ok2
    usable = usable[:h] & usable[h:]
    core = torch.bmm(R[:h], R[h:].mT)  # B A = (B R_B^-1) core (A^T R_A^-1)^T
    usable = usable & torch.isfinite(core).flatten(1).all(1)
    return Y, sizes, G2, R2inv, core, usable


def _rewrite(pairs, Y, sizes, Tb, Ta, usable):
    """``B' = Y_B Tb``, ``A' = Ta Y_A^T`` per pair, in the pair's dtype; the pair as given where not ``usable``."""
    P = len(pairs)
    out = []
    for (B, A), yb, ya, tb, ta, u in zip(pairs, Y[:P], Y[P:], Tb.split(sizes[:P]), Ta.split(sizes[:P]),
                                          usable[:, None, None].split(sizes[:P])):
        new_B = torch.bmm(yb, tb).to(B.dtype).reshape(B.shape)
        new_A = torch.bmm(ta, ya.mT).to(A.dtype).reshape(A.shape)
        u = u.reshape(B.shape[:-2] + (1, 1))
        out.append((torch.where(u, new_B, B), torch.where(u, new_A, A)))
    return out


def _gram_group(pairs, floor: float):
    """:func:`balance_gram` for pairs of one k: the k x k work of all pairs (both sides) in one batch, and per
    pair only its tall products (two Grams, the first Cholesky QR pass and the rewrite: four ``bmm`` per side)."""
    Y, sizes, G2, R2inv, core, usable = _cholesky_qr2(pairs)
    h = core.shape[0]
    U, S, Vh = torch.linalg.svd(torch.where(usable[:, None, None], core, torch.zeros_like(core)))
    top = S[:, :1]
    kept = torch.maximum(S, floor * top)
    root = kept.sqrt()
    scale = S / root.clamp_min(torch.finfo(S.dtype).tiny)
    Tb = torch.bmm(R2inv[:h], U) * scale.unsqueeze(1)  # B' = Y_B Tb
    Ta = root.unsqueeze(2) * torch.bmm(Vh, R2inv[h:].mT)  # A' = Ta Y_A^T
    # Balanced form on the k x k Grams of Y: B'^T B' = diag(S^2 / S_kept), A' A'^T = diag(S_kept).  Rows of A'
    # where the core has no singular value above the shifts' level are only bounded.
    tol = torch.finfo(pairs[0][0].dtype).eps ** 0.5
    eb = torch.bmm(torch.bmm(Tb.mT, G2[:h]), Tb) - torch.diag_embed(scale.square())
    ea = torch.bmm(torch.bmm(Ta, G2[h:]), Ta.mT) - torch.diag_embed(kept)
    live = S > 1e-5 * top
    bad_a = (live.unsqueeze(2) & live.unsqueeze(1)) & (ea.abs() > tol * (root.unsqueeze(2) * root.unsqueeze(1)))
    usable = (usable & (top[:, 0] > 0) & (eb.abs() <= tol * top.unsqueeze(2)).flatten(1).all(1)
              & ~bad_a.flatten(1).any(1) & (ea.diagonal(dim1=-2, dim2=-1) <= tol * kept).all(1))
    # (non-finite Tb or Ta fail the comparisons above: NaN compares false, and reaches eb's and ea's diagonals)
    return _rewrite(pairs, Y, sizes, Tb, Ta, usable)


# Fixed iteration counts of the sync-free "polar" balancing (no convergence test, so no host read): the polar
# iteration lifts a singular value s of the normalised core by ~1.5x per step while small, so 32 steps resolve
# s >= ~1e-5 of the Frobenius norm before the quadratic phase; the square root then sees eigenvalues >= the floor
# shift (1e-4 of the norm), which 20 coupled Newton-Schulz steps resolve (~2.25x per step while small).
POLAR_ITERS = 32
SQRT_ITERS = 20


def _polar_group(pairs, floor: float):
    """:func:`balance_polar` for pairs of one k (see :func:`_gram_group` for the batching)."""
    Y, sizes, G2, R2inv, core, usable = _cholesky_qr2(pairs)
    h, k = core.shape[0], core.shape[-1]
    C = torch.where(usable[:, None, None], core, torch.zeros_like(core))
    norm = torch.linalg.matrix_norm(C).clamp_min(torch.finfo(C.dtype).tiny)[:, None, None]  # Frobenius
    # Polar factor W of C (C = W H) by the Newton-Schulz iteration X <- 1.5 X - 0.5 X X^T X, X_0 = C / |C|_F.
    X = C / norm
    for _ in range(POLAR_ITERS):
        X = torch.baddbmm(X, X, torch.bmm(X.mT, X), beta=1.5, alpha=-0.5)
    H = torch.bmm(X.mT, C)
    eye = torch.eye(k, dtype=C.dtype, device=C.device).expand_as(C)
    H = 0.5 * (H + H.mT) + (floor * norm) * eye  # symmetric, floored: small directions keep sqrt(floor |C|)
    # H^(1/2) and H^(-1/2) by the coupled Newton-Schulz square root on H / |H|_F.
    hn = torch.linalg.matrix_norm(H)[:, None, None]
    Sq, Z = H / hn, eye
    for _ in range(SQRT_ITERS):
        T = torch.baddbmm(eye, Z, Sq, beta=1.5, alpha=-0.5)
        Sq, Z = torch.bmm(Sq, T), torch.bmm(T, Z)
    root, inv_root = Sq * hn.sqrt(), Z / hn.sqrt()
    Tb = torch.bmm(torch.bmm(R2inv[:h], C), inv_root)  # B' = Y_B C H^-1/2
    Ta = torch.bmm(root, R2inv[h:].mT)  # A' = H^1/2 Y_A^T, so B' A' = Y_B C Y_A^T = B A for any H
    # Balanced to the floor: B'^T B' = H^-1/2 C^T C H^-1/2 and A' A'^T = H agree up to ~floor |C|_F.
    gb = torch.bmm(torch.bmm(Tb.mT, G2[:h]), Tb)
    ga = torch.bmm(torch.bmm(Ta, G2[h:]), Ta.mT)
    err = (gb - ga).abs().flatten(1).amax(1)
    usable = usable & (norm[:, 0, 0] > torch.finfo(C.dtype).tiny) & (err <= 10 * floor * norm[:, 0, 0])
    return _rewrite(pairs, Y, sizes, Tb, Ta, usable)


def balance_polar(B: Tensor, A: Tensor, *, floor: float = 1e-4) -> Tuple[Tensor, Tensor]:
    """A balanced factorisation of ``B A`` without any host synchronisation: ``B' A' = B A`` (to rounding) with
    ``B'^T B' = A' A'^T`` (to ``~floor |B A|_F``), from the Cholesky QR of :func:`balance_gram` and, instead of
    its k x k SVD, the polar decomposition ``core = W H`` and ``H^(1/2)`` by fixed counts of Newton-Schulz
    iterations (batched products only): ``B' = Y_B core H^-1/2``, ``A' = H^1/2 Y_A^T``.

    The same singular values as :func:`balance_svd` (``sqrt(s)`` on both sides) up to a rotation ``Q``:
    ``(B' , A') = (U sqrt(S) Q, Q^T sqrt(S) V^T)``, which the PSI momentum step does not see (its solves use
    Grams and products only).  The floor is a shift ``floor |core|_F I`` of ``H`` rather than a clamp of each
    singular value, so every direction moves by at most that amount.  Where the iterations have not balanced a
    pair to ``10 floor |core|_F`` (or the core is zero or not finite) the pair is returned as given.  No operation
    reads a device value on the host, so the step stays free of synchronisations and can be captured in a CUDA
    graph.
    """
    return balance_many([(B, A)], mode="polar", floor=floor)[0]


def balance_many(pairs, *, mode: str = "svd", floor: float = 1e-4):
    """``[balance(B, A) for (B, A) in pairs]`` with one batched k x k SVD for all pairs of one (k, dtype, device).

    The same arithmetic as balancing each pair on its own (the thin QRs stay per pair; only the SVD call is
    shared; ``mode="gram"`` batches all its k x k work over the pairs of one k, whatever their dtypes, and keeps
    only the tall products per pair): ``linalg.svd`` reads its convergence flags
    on the host, a synchronisation on CUDA, so one call for every bucket of a step costs one synchronisation
    instead of one per bucket."""
    if mode not in ("svd", "gram", "polar"):
        return [_BALANCE[mode](B, A) for B, A in pairs]
    out: list = [None] * len(pairs)
    groups: dict = {}
    for i, (B, A) in enumerate(pairs):
        k = B.shape[-1]
        if k > B.shape[-2] or k > A.shape[-1]:
            out[i] = balance_norm(B, A)
            continue
        groups.setdefault((k, B.dtype, B.device), []).append(i)
    if mode in ("gram", "polar"):
        group_fn = _gram_group if mode == "gram" else _polar_group
        by_k: dict = {}
        for (k, _, device), idx in groups.items():
            by_k.setdefault((k, device), []).extend(idx)
        for idx in by_k.values():
            for i, pair in zip(idx, group_fn([pairs[i] for i in idx], floor)):
                out[i] = pair
        return out
    for idx in groups.values():
        prepared = [_svd_core(*pairs[i]) for i in idx]
        cores = [c for _, _, c, _ in prepared]
        batch_shapes = [c.shape[:-2] for c in cores]
        if len(cores) == 1:
            U, S, Vh = torch.linalg.svd(cores[0])
            parts = [(U, S, Vh)]
        else:
            k = cores[0].shape[-1]
            flat = torch.cat([c.reshape(-1, k, k) for c in cores])
            U, S, Vh = torch.linalg.svd(flat)
            sizes = [c.reshape(-1, k, k).shape[0] for c in cores]
            parts = [
                (u.reshape(*bs, k, k), s_.reshape(*bs, k), v.reshape(*bs, k, k))
                for u, s_, v, bs in zip(U.split(sizes), S.split(sizes), Vh.split(sizes), batch_shapes)
            ]
        for i, (Qb, Qa, _, finite), (U, S, Vh) in zip(idx, prepared, parts):
            B, A = pairs[i]
            out[i] = _svd_finish(B, A, Qb, Qa, finite, U, S, Vh, floor)
    return out


_BALANCE = {"svd": balance_svd, "gram": balance_gram, "polar": balance_polar, "norm": balance_norm,
            "none": lambda B, A: (B, A)}


# ---------------------------------------------------------------------------------------------- the step


def _finite(x: Tensor) -> Tensor:
    """``(L,)``: whether each matrix (or vector) of the batch is finite."""
    return torch.isfinite(x).flatten(1).all(dim=1)


def _keep(ok: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(ok.view((-1,) + (1,) * (new.dim() - 1)), new, old)


def _terms(grad: Gradient, coef: Coef):
    """The gradient as a LoRSum term (rank-local data)."""
    return (coef, grad.left, grad.right, True)


def psi_step(
    A: Tensor,
    B: Tensor,
    grad: Gradient,
    *,
    lr: float,
    grad_coef: Coef,
    momentum_coef: float,
    lam: float,
    lam_momentum: Optional[float],
    anchor_coef: float = 1.0,
    momentum: Optional[Tuple[Tensor, ...]] = None,
    metric: Optional[MetricInput] = None,
    config: PSIConfig = PSIConfig(),
    all_reduce: AllReduce = None,
) -> PSIStepResult:
    """One PSI-family step for ``L`` layers of one shape (see the module docstring for the rule and the shapes).

    Args:
        A, B: effective factors ``(L, r, d_in)``, ``(L, d_out, r)`` in the compute dtype.
        grad: the captured gradient (:class:`Gradient`).
        lr: the step on Delta W.  ``grad_coef``: ``(1 - d) c`` or ``(1 - beta1) c`` (a host number or a 0-dim
            tensor: the clip factor is computed on the device).  ``momentum_coef``: mu or beta1.
        lam, lam_momentum: proximal weights of the weights' and the momentum's LoRSum (lr already applied).
            ``lam_momentum=None``: relative to the momentum's own scale, ``config.momentum_prox`` times the mean
            eigenvalue of its anchor's Gram matrix (see :func:`_relative_momentum_lam`).
        anchor_coef: ``1 - lr * weight_decay``.
        momentum: ``(M_B, M_A)`` for ``"psi"``; ``(buf_A, buf_B, prev_A, prev_B)`` for ``"proj"``; ``None``
            when the variant runs without momentum.
        metric: Scaled PSI-LoRA's metric (``"psi"`` only); ``None`` means the Euclidean metric.
        config: :class:`PSIConfig`.
        all_reduce: averages rank-local projections (rows or dense gradients) over data-parallel ranks.
    """
    if config.variant not in ("psi", "proj"):
        raise ValueError(f"variant must be 'psi' or 'proj', got {config.variant!r}")
    if grad.projected and config.variant == "proj":
        raise ValueError("Proj. PSI-LoRA needs G at the new factors: pass rows or the dense gradient, not projections")
    reference_noop = config.reference_compat and config.iters == 0
    dtype = A.dtype  # the compute dtype: everything else is brought to it (state may be kept in another)
    grad = Gradient(grad.left.to(dtype), None if grad.right is None else grad.right.to(dtype), grad.projected)
    if momentum is not None:
        momentum = tuple(t.to(dtype) for t in momentum)
    if metric is not None:
        metric = metric._replace(v_in=metric.v_in.to(dtype), v_out=metric.v_out.to(dtype),
                                 stat_in=metric.stat_in.to(dtype), stat_out=metric.stat_out.to(dtype))
    p_in = p_out = None
    new_metric = None
    if metric is not None:
        v_in, v_out, p_in, p_out = metric_step(
            metric.v_in, metric.v_out, metric.stat_in, metric.stat_out, beta2=metric.beta2, damping=metric.damping,
            power=metric.power, step=metric.step, bias_correction=metric.bias_correction, relative=metric.relative,
        )
        new_metric = (v_in, v_out)
    if config.variant == "psi":
        new_A, new_B, new_momentum, fallbacks = _psi(
            A, B, grad, lr=lr, g=grad_coef, m=momentum_coef, lam=lam, lam_m=lam_momentum, c0=anchor_coef,
            momentum=momentum, p_in=p_in, p_out=p_out, config=config, reference_noop=reference_noop,
            all_reduce=all_reduce,
        )
    else:
        new_A, new_B, new_momentum, fallbacks = _proj(
            A, B, grad, lr=lr, g=grad_coef, m=momentum_coef, lam=lam, c0=anchor_coef, momentum=momentum,
            config=config, reference_noop=reference_noop, all_reduce=all_reduce,
        )
    ok = _finite(new_A) & _finite(new_B)
    for t in (new_momentum or ()) + (new_metric or ()):
        ok = ok & _finite(t)
    new_A, new_B = _keep(ok, new_A, A), _keep(ok, new_B, B)
    if new_momentum is not None:
        new_momentum = tuple(_keep(ok, n, o) for n, o in zip(new_momentum, momentum))
    if new_metric is not None:
        new_metric = (_keep(ok, new_metric[0], metric.v_in), _keep(ok, new_metric[1], metric.v_out))
    return PSIStepResult(new_A, new_B, new_momentum, new_metric, ok, fallbacks)


def _psi(A, B, grad, *, lr, g, m, lam, lam_m, c0, momentum, p_in, p_out, config, reference_noop, all_reduce):
    """Low-rank momentum (PSI-LoRA, Scaled PSI-LoRA): the weights' LoRSum, then the momentum's."""
    iters, jitter = config.iters, config.jitter
    uses_m = momentum is not None and m > 0
    M_B, M_A = momentum if momentum is not None else (None, None)
    zero = torch.zeros(A.shape[:-2], dtype=torch.int64, device=A.device)
    # The reference's unscaled LoRSum is a no-op at K = 0; its scaled one (metric given) is not.
    if reference_noop and p_in is None:
        new_A, new_B, fallbacks = A, B, zero
    elif grad.projected:
        r = A.shape[-2]
        BtDelta = grad.left[..., :r, :] * (-lr * g)
        DeltaAt = grad.right[..., :r] * (-lr * g)
        if uses_m:
            BtDelta = BtDelta - (lr * m) * ((B.mT @ M_B) @ M_A)
            DeltaAt = DeltaAt - (lr * m) * (M_B @ (M_A @ A.mT))
        res = lorsum_from_projections((c0, B, A), BtDelta, DeltaAt, lam=lam, p_in=p_in, p_out=p_out, jitter=jitter,
                                      compute_dtype=A.dtype)
        new_A, new_B, fallbacks = res.A, res.B, res.fallbacks
    else:
        terms = [_terms(grad, -lr * g)]
        if uses_m:
            terms.append((-lr * m, M_B, M_A))
        res = lorsum((c0, B, A), terms, iters=iters, lam=lam, p_in=p_in, p_out=p_out, jitter=jitter,
                     all_reduce=all_reduce, compute_dtype=A.dtype)
        new_A, new_B, fallbacks = res.A, res.B, res.fallbacks
    if not uses_m or reference_noop:
        return new_A, new_B, (None if momentum is None else tuple(momentum)), fallbacks
    if lam_m is None:
        lam_m = _relative_momentum_lam(M_A, m, config.momentum_prox)
    if grad.projected:
        r = A.shape[-2]
        mres = lorsum_from_projections((m, M_B, M_A), grad.left[..., r:, :] * g, grad.right[..., r:] * g,
                                       lam=lam_m, jitter=jitter, compute_dtype=A.dtype)
    else:
        mres = lorsum((m, M_B, M_A), [_terms(grad, g)], iters=iters, lam=lam_m, jitter=jitter, all_reduce=all_reduce,
                      compute_dtype=A.dtype)
    if config.balance_in_step:
        new_MB, new_MA = _BALANCE[config.momentum_balance](mres.B, mres.A)
    else:
        new_MB, new_MA = mres.B, mres.A
    return new_A, new_B, (new_MB, new_MA), fallbacks + mres.fallbacks


def _relative_momentum_lam(M_A: Tensor, m: float, rho: float) -> Tensor:
    """``rho`` times the mean eigenvalue of the momentum anchor's Gram matrix ``m M_A M_A^T``, per layer ``(L, 1, 1)``.

    The momentum target ``m M + g G`` does not depend on the learning rate, so neither should its proximal weight.
    A weight proportional to lr (the reference) dominates ``M_A M_A^T`` at large lr: each update can then only
    shrink the momentum (by ``m`` per step) and it dies; at small lr it leaves ill-conditioned solves unregularised.
    Relative to the anchor's own scale the projection is scale-free (in balanced SVD form ``M_A M_A^T = S``, so
    this is ``rho m mean(S)``)."""
    r_m = M_A.shape[-2]
    return (M_A.square().sum(dim=(-2, -1), keepdim=True) * (rho * m / r_m))


def _proj(A, B, grad, *, lr, g, m, lam, c0, momentum, config, reference_noop, all_reduce):
    """Factor-space momentum (Proj. PSI-LoRA): a momentum-free LoRSum, then transported heavy ball."""
    if reference_noop:
        new_A, new_B = A, B
        fallbacks = torch.zeros(A.shape[:-2], dtype=torch.int64, device=A.device)
    else:
        res = lorsum((c0, B, A), [_terms(grad, -lr * g)], iters=config.iters, lam=lam, jitter=config.jitter,
                     all_reduce=all_reduce, compute_dtype=A.dtype)
        new_A, new_B, fallbacks = res.A, res.B, res.fallbacks
    if momentum is None:
        return new_A, new_B, None, fallbacks
    buf_A, buf_B, prev_A, prev_B = momentum
    reg = lam + config.jitter
    BtG = project_left([_terms(grad, 1.0)], new_B, all_reduce)  # (r, d_in)
    GAt = project_right([_terms(grad, 1.0)], new_A, all_reduce)  # (d_out, r)
    r = new_A.shape[-2]
    # One solve per side for the new gradient and the transported buffer: (B^T B + reg I)^-1 [B^T G | (B^T prev_B) buf_A]
    left, fa = spd_solve(new_B.mT @ new_B, torch.cat([BtG, (new_B.mT @ prev_B) @ buf_A], dim=-1), jitter=reg)
    right, fb = spd_solve(new_A @ new_A.mT, torch.cat([GAt, buf_B @ (prev_A @ new_A.mT)], dim=-2).mT, jitter=reg)
    d_in = new_A.shape[-1]
    g_A, T_A = left[..., :d_in], left[..., d_in:]
    right = right.mT
    g_B, T_B = right[..., : new_B.shape[-2], :], right[..., new_B.shape[-2] :, :]
    del r
    new_buf_A = T_A * m + g_A * g
    new_buf_B = T_B * m + g_B * g
    out_A = new_A - (lr * m) * T_A
    out_B = new_B - (lr * m) * T_B
    return out_A, out_B, (new_buf_A, new_buf_B, new_A, new_B), fallbacks + fa + fb


# ---------------------------------------------------------------------------------------------- compiled step


def _warn_eager_from_now(owner: str, what: str, switch: str, error: Exception) -> None:
    """The one warning of a fast path that failed and hands over to the eager step for good."""
    import warnings

    warnings.warn(
        f"{owner}: {what} failed ({type(error).__name__}: {str(error)[:200]}); running the eager step from now on "
        f"(same results, more host time per step). Pass {switch} to silence this.",
        RuntimeWarning,
        stacklevel=5,
    )


class CompiledPSIStep:
    """:func:`psi_step` through ``torch.compile``, falling back to the eager function.

    The compiled step fuses the elementwise work around the batched products and r x r solves into a few
    generated kernels, and its wrapper launches them with far less host time per op than eager dispatch: the step is
    launch-bound on GPUs, so host time is what it saves.  The first step pays for compiling (the first bucket shape
    static, the next ones through one recompile with dynamic sizes); hyperparameters that change between steps (lr, the clip factor, the bias-correction step) are traced as
    symbolic numbers, not baked in.

    Fallback: when compiling or running the compiled step raises (no C++ compiler or Triton, an unsupported op,
    ...), one ``RuntimeWarning`` names the error and this object runs the eager :func:`psi_step` from then on; the
    failing call is repeated eagerly, so the step is not lost (the step function is pure: a failure leaves nothing
    half-written).  ``disabled`` says whether it fell back.
    """

    #: at least this many compiled variants of the step per process (several shapes, variants and optimizers share
    #: one code object, and torch's default limit of 8 would silently send the rest to eager)
    recompile_limit = 64

    def __init__(self, owner: str = "loraopt", **compile_kwargs):
        self.owner = owner
        # torch's default (dynamic=None): the first shape compiles static, a second one recompiles with dynamic
        # sizes that then serve every later bucket shape, so a model costs two or three compiles, not one per shape.
        self.compile_kwargs = dict(compile_kwargs)
        self.disabled = False
        self._fn: Optional[Callable] = None

    def __call__(self, *args, **kwargs) -> PSIStepResult:
        if self.disabled or kwargs.get("all_reduce") is not None:
            return psi_step(*args, **kwargs)  # collectives inside the step stay eager
        try:
            if self._fn is None:
                import torch._dynamo.config as dynamo_config

                if getattr(dynamo_config, "recompile_limit", self.recompile_limit) < self.recompile_limit:
                    dynamo_config.recompile_limit = self.recompile_limit
                self._fn = torch.compile(psi_step, **self.compile_kwargs)
            return self._fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any failure of the compiler stack means: run eagerly
            self.disabled = True
            _warn_eager_from_now(self.owner, "torch.compile of the PSI step", "compile=False", error)
            return psi_step(*args, **kwargs)


# Hyperparameters of psi_step that may change from step to step (an lr scheduler moves lr, and with it lam,
# lam_momentum and anchor_coef; the clip factor is a device tensor; the bias-correction step counts): a captured step
# reads them from device tensors filled before each replay (0-dim, or (L, 1, 1) for a per-layer gradient coefficient).
# Everything else is part of the capture key.
_DYNAMIC_SCALARS = ("lr", "grad_coef", "lam", "lam_momentum", "anchor_coef")


class _Capture(NamedTuple):
    inputs: List[Tensor]  # static copies of the step's tensor inputs
    scalars: List[Tensor]  # device tensors of the dynamic hyperparameters (and the metric step)
    outputs: PSIStepResult  # what the step wrote, at the same addresses every replay
    graph: Any  # torch.cuda.CUDAGraph, or None when emulated
    run: Callable[[], PSIStepResult]  # the step on the static inputs (the emulated replay)


class GraphedPSIStep:
    """:func:`psi_step` captured once per bucket in a CUDA graph and replayed at every later step.

    The step is launch-bound on GPUs (hundreds of small kernels per bucket whose host-side launch costs as much as
    their work); a replay launches the whole captured step at once.  Per call: the tensor inputs are copied into the
    capture's static inputs (one batched copy), the dynamic hyperparameters (``_DYNAMIC_SCALARS`` and the metric's
    bias-correction step) are written into 0-dim tensors, the graph is replayed, and the result is returned: tensors
    of the capture, overwritten by the next replay of the same capture, so the caller uses them within the step (the
    PSI optimizers write them back before the step ends).  A capture is keyed on everything else: shapes, dtypes,
    the step's configuration, the constant hyperparameters, and the call's position in the step among calls with
    the same key (two buckets of equal shapes get two captures).  :meth:`begin_step` starts the count of a step.

    Eager instead: off CUDA (unless ``emulate``), with ``all_reduce`` (collectives), and after any failure: one
    ``RuntimeWarning`` names the error and the eager :func:`psi_step` runs from then on (the failing call is repeated
    eagerly; the step is pure, so nothing is half-written).  ``emulate=True`` runs the same bookkeeping on any device
    with an eager re-run in place of the replay (the tests' check of the static-buffer logic on the CPU).
    """

    def __init__(self, owner: str = "loraopt", *, emulate: bool = False, warmup: int = 2):
        self.owner = owner
        self.emulate = emulate
        self.warmup = warmup
        self.disabled = False
        self.captures = 0  # how many captures were made (one per bucket and position, not per step)
        self._captured: Dict[tuple, _Capture] = {}
        self._seen: Dict[tuple, int] = {}
        self._pool = None

    def begin_step(self) -> None:
        self._seen.clear()

    def __call__(self, A: Tensor, B: Tensor, grad: Gradient, **kwargs) -> PSIStepResult:
        if self.disabled or kwargs.get("all_reduce") is not None or not (A.is_cuda or self.emulate):
            return psi_step(A, B, grad, **kwargs)
        try:
            return self._replay(A, B, grad, kwargs)
        except Exception as error:  # noqa: BLE001 - any failure of capture or replay means: run eagerly
            self.disabled = True
            _warn_eager_from_now(self.owner, "the CUDA-graph step", "cuda_graph=False", error)
            return psi_step(A, B, grad, **kwargs)

    # ------------------------------------------------------------------------------------------ bookkeeping

    @staticmethod
    def _split(A: Tensor, B: Tensor, grad: Gradient, kwargs: Dict[str, Any]):
        """``(tensors, scalars, key)``: the tensor inputs in a fixed order, the dynamic hyperparameters (numbers or
        0-dim tensors), and the key of everything static."""
        tensors = [A, B, grad.left] + ([] if grad.right is None else [grad.right])
        momentum, metric = kwargs.get("momentum"), kwargs.get("metric")
        tensors += list(momentum or ())
        if metric is not None:
            tensors += [metric.v_in, metric.v_out, metric.stat_in, metric.stat_out]
        dynamic = [k for k in _DYNAMIC_SCALARS if kwargs.get(k) is not None]
        scalars = [kwargs[k] for k in dynamic] + ([metric.step] if metric is not None else [])
        static = {k: v for k, v in kwargs.items() if k not in _DYNAMIC_SCALARS and k not in ("momentum", "metric")}
        key = (
            tuple((tuple(t.shape), t.dtype, t.device) for t in tensors), grad.projected, grad.right is None,
            None if momentum is None else len(momentum),
            None if metric is None else (metric.beta2, metric.damping, metric.power, metric.bias_correction,
                                         metric.relative),
            tuple(dynamic), tuple(tuple(v.shape) if torch.is_tensor(v) else () for v in scalars),
            tuple(sorted((k, repr(v)) for k, v in static.items())),
        )
        return tensors, scalars, key

    @staticmethod
    def _assemble(inputs: List[Tensor], scalars: List[Tensor], grad: Gradient, kwargs: Dict[str, Any]):
        """The call of :func:`psi_step` on the capture's static inputs (the same structure as the original)."""
        it = iter(inputs)
        A, B, left = next(it), next(it), next(it)
        right = None if grad.right is None else next(it)
        kw = dict(kwargs)
        if kwargs.get("momentum") is not None:
            kw["momentum"] = tuple(next(it) for _ in kwargs["momentum"])
        dynamic = [k for k in _DYNAMIC_SCALARS if kwargs.get(k) is not None]
        for name, value in zip(dynamic, scalars):
            kw[name] = value
        if kwargs.get("metric") is not None:
            v_in, v_out, stat_in, stat_out = (next(it) for _ in range(4))
            kw["metric"] = kwargs["metric"]._replace(v_in=v_in, v_out=v_out, stat_in=stat_in, stat_out=stat_out,
                                                     step=scalars[len(dynamic)])
        return A, B, Gradient(left, right, grad.projected), kw

    @staticmethod
    def _fill(buffers: List[Tensor], values: List[Any]) -> None:
        for buffer, value in zip(buffers, values):
            if torch.is_tensor(value):  # 0-dim, or per layer (L, 1, 1) (normalize="layer")
                buffer.copy_(value.reshape(buffer.shape))
            else:
                buffer.fill_(float(value))

    def _replay(self, A: Tensor, B: Tensor, grad: Gradient, kwargs: Dict[str, Any]) -> PSIStepResult:
        tensors, scalars, key = self._split(A, B, grad, kwargs)
        position = self._seen.get(key, 0)
        self._seen[key] = position + 1
        key = key + (position,)
        captured = self._captured.get(key)
        if captured is None:
            captured = self._captured[key] = self._capture(tensors, scalars, grad, kwargs, A)
            self.captures += 1
        else:
            torch._foreach_copy_(captured.inputs, tensors)
            self._fill(captured.scalars, scalars)
            if captured.graph is not None:
                captured.graph.replay()
            else:
                torch._foreach_copy_(_flat_result(captured.outputs), _flat_result(captured.run()))
        return captured.outputs

    def _capture(self, tensors, scalars, grad, kwargs, A: Tensor) -> _Capture:
        inputs = [t.detach().clone() for t in tensors]
        dtype = A.dtype if A.dtype == torch.float64 else torch.float32
        buffers = [torch.zeros(tuple(s.shape) if torch.is_tensor(s) else (), dtype=dtype, device=A.device)
                   for s in scalars]
        self._fill(buffers, scalars)
        call = self._assemble(inputs, buffers, grad, kwargs)

        def run() -> PSIStepResult:
            return psi_step(call[0], call[1], call[2], **call[3])

        if self.emulate and not A.is_cuda:
            return _Capture(inputs, buffers, run(), None, run)
        with _capturable_linalg():
            side = torch.cuda.Stream(device=A.device)
            side.wait_stream(torch.cuda.current_stream(A.device))
            with torch.cuda.stream(side):  # warm-up off the capture (library handles, workspaces, lazy kernels)
                for _ in range(self.warmup):
                    run()
            torch.cuda.current_stream(A.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):  # one memory pool for every capture, replayed in order
                outputs = run()
        self._pool = graph.pool()
        graph.replay()  # this call's result (the capture itself does not run the kernels)
        return _Capture(inputs, buffers, outputs, graph, run)


@contextlib.contextmanager
def _capturable_linalg():
    """cuSOLVER for the linear algebra of a capture (warm-up included), the previous choice restored after.

    With torch's default choice the batched Cholesky solves of a multi-layer bucket go to MAGMA, whose
    ``magma_spotrs_batched`` is not capturable: on an H200 (torch 2.11) every capture failed with "operation not
    permitted when stream is capturing", and the failed capture left the CUDA RNG unusable in the process ("Offset
    increment outside graph capture" at the next random initialisation; benchmarks/notes/cost.md).  cuSOLVER's
    kernels capture.  The eager step keeps torch's choice (on the same GPU it was faster with MAGMA)."""
    previous = torch.backends.cuda.preferred_linalg_library()
    torch.backends.cuda.preferred_linalg_library("cusolver")
    try:
        yield
    finally:
        torch.backends.cuda.preferred_linalg_library(previous)


def _flat_result(result: PSIStepResult) -> List[Tensor]:
    """The tensors of a :class:`PSIStepResult`, in a fixed order."""
    out = [result.A, result.B]
    out += list(result.momentum or ())
    out += list(result.metric or ())
    return out + [result.ok, result.fallbacks]


def resolve_compile(flag: Union[bool, str], device: torch.device) -> bool:
    """``compile="auto"``: on for CUDA devices only (on the CPU the eager step is already cheap to launch and a
    compile costs seconds to minutes); ``True`` / ``False`` as given."""
    if flag == "auto":
        return device.type == "cuda"
    if not isinstance(flag, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {flag!r}")
    return flag
