"""Extended Kalman filter over a flat parameter vector: the math of LoKO (arXiv 2410.11551, ``docs/specs/loko.md``).

State-space model (parameters treated as the hidden state, observed through the network):

    theta_k = theta_{k-1} + w_k,          w_k ~ N(0, q I)
    y_k     = h(x_k; theta_k) + v_k,      v_k ~ N(0, R)

Shapes used throughout (one observation = ``b`` samples of ``m`` outputs each):

* ``theta: (n,)`` parameter mean, ``p: (n,)`` the diagonal of the covariance ``P`` (the diagonal filter never forms
  an ``n x n`` matrix), ``P: (n, n)`` only in the full-covariance reference filter
  (:mod:`loraopt.functional.reference`).
* ``H: (m, n)`` or ``(b, m, n)`` Jacobian of the outputs w.r.t. ``theta``; ``e: (m,)`` or ``(b, m)`` innovation
  ``y - h``; ``R: (m, m)`` observation noise of *one* sample. A joint batch uses ``R_blk = I_b kron R`` so ``S`` is
  ``(b m) x (b m)``.

Every function is pure: no modules, hooks or global state, and nothing is modified in place. All arithmetic runs in
the compute dtype (fp32, or fp64 when any floating input is fp64, or ``cfg.dtype``), whatever the input dtypes, and
results come back in that dtype. Failures (non-finite values, a Cholesky factorisation that fails at every jitter
level) are handled with ``torch.where`` instead of Python branches so a step never synchronises with the device;
the caller reads ``info.skipped`` when it wants to know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]

__all__ = [
    "EKFConfig",
    "EKFInfo",
    "EKFResult",
    "OutputRows",
    "LossGradient",
    "ReducedObservation",
    "ekf_step",
    "draw_p0",
    "score_scale",
    "score_scale_per_block",
    "cholesky_with_jitter",
    "floor_ones_direction",
    "floor_min_eigenvalue",
    "apply_noise_floor",
    "clamp_eigenvalues",
    "NOISE_FLOORS",
    "noise_ema_update",
    "diag_ekf_update",
    "scalar_ekf_update",
    "block_noise",
]


class EKFConfig(NamedTuple):
    """Hyperparameters of one filter step.

    ``lr``, ``q`` and ``p_floor`` may be Python floats or ``(n,)`` tensors (per-coordinate values, e.g. one per
    parameter group). ``lr`` scales only the mean update; the covariance and noise updates do not depend on it
    except through the post-update residual.

    * ``beta``: EMA forgetting factor of ``R`` in ``[0, 1]``; 1 keeps ``R`` fixed.
    * ``r_min``: floor used by ``noise_floor`` (``"ones"``: the all-ones direction of a softmax observation;
      ``"eig"``: the smallest eigenvalue, by a shift of every eigenvalue; ``"clamp"``: every eigenvalue clamped at
      ``r_min`` on its own; ``"none"``: no floor).
    * ``jitter`` / ``jitter_abs``: ``S + (jitter * tr(S)/k + jitter_abs) I`` is factored (``k = b m``).
    * ``retries``: how many times the jitter is multiplied by 10 when the factorisation fails before the step is
      skipped.
    * ``dtype``: compute dtype (``None``: fp64 if any floating input is fp64, else fp32).
    """

    lr: Scalar = 1.0
    q: Scalar = 0.0
    beta: float = 0.95
    r_min: float = 1e-4
    noise_floor: str = "ones"
    jitter: float = 1e-6
    jitter_abs: float = 1e-12
    p_floor: Scalar = 1e-12
    retries: int = 3
    dtype: Optional[torch.dtype] = None


class EKFInfo(NamedTuple):
    """Diagnostics of one step.

    * ``skipped``: 0-dim bool, True when the step was rejected (non-finite ``e``, ``S``, ``delta``, ``p`` or ``R``,
      or no jitter level made ``S`` factorable); the returned state then equals the input state.
    * ``jitter``: 0-dim, the diagonal shift that was factored successfully.
    * ``S``: ``(k, k)`` symmetrised innovation covariance before jitter (``k = b m``; ``(1, 1)`` for the scalar
      variant).
    * ``delta``: ``(n,)`` the mean step before ``lr`` (``P H^T S^-1 e``); zeros when skipped.
    """

    skipped: Tensor
    jitter: Tensor
    S: Tensor
    delta: Tensor


class EKFResult(NamedTuple):
    """``theta: (n,)``, ``p: (n,)``, ``R: (m, m)`` after the step, plus ``info``."""

    theta: Tensor
    p: Tensor
    R: Tensor
    info: EKFInfo


# ------------------------------------------------------------------------------------------------- helpers


def _compute_dtype(cfg: EKFConfig, *tensors: Tensor) -> torch.dtype:
    if cfg.dtype is not None:
        return cfg.dtype
    if any(t.dtype == torch.float64 for t in tensors if torch.is_tensor(t)):
        return torch.float64
    return torch.float32


def _as(x: Scalar, dtype: torch.dtype, device: torch.device) -> Scalar:
    return x.to(dtype=dtype, device=device) if torch.is_tensor(x) else x


def _floor(p: Tensor, p_floor: Scalar) -> Tensor:
    """``max(p, p_floor)``; a Python float floor is applied without building a device tensor (a host-to-device copy
    per step on a GPU)."""
    return torch.maximum(p, p_floor) if torch.is_tensor(p_floor) else p.clamp_min(p_floor)


def _batched(H: Tensor, e: Tensor) -> Tuple[Tensor, Tensor]:
    """``(m, n), (m,)`` -> ``(1, m, n), (1, m)``; batched inputs pass through."""
    if H.dim() == 2:
        H = H.unsqueeze(0)
    if H.dim() != 3:
        raise ValueError(f"H must be (m, n) or (b, m, n), got shape {tuple(H.shape)}")
    e = e.reshape(H.shape[0], H.shape[1])
    return H, e


def block_noise(R: Tensor, b: int) -> Tensor:
    """``I_b kron R``: ``(b m, b m)`` noise of ``b`` independent samples sharing ``R: (m, m)``."""
    if b == 1:
        return R
    return torch.block_diag(*([R] * b))


def cholesky_with_jitter(
    S: Tensor, *, jitter: float = 1e-6, jitter_abs: float = 1e-12, retries: int = 3
) -> Tuple[Tensor, Tensor, Tensor]:
    """Lower Cholesky factor of ``S + j I`` for the first jitter ``j`` that succeeds.

    ``S: (k, k)`` symmetric. Levels: ``j0 = jitter * tr(S)/k + jitter_abs``, then ``10 j1, 100 j1, ...`` (``retries``
    of them) with ``j1 = j0`` or, when ``j0 = 0``, ``eps * tr(S)/k`` so that a zero jitter still has something to
    retry with. All levels are factored in one batched call and the first success is selected by index: the k x k
    factorisations are negligible next to the ``O(k^2 n)`` products, and no host synchronisation is needed.

    Returns ``(L, jitter_used, failed)``; when every level fails, ``failed`` is True and ``L`` is the identity (so
    downstream solves stay finite; the caller discards them).
    """
    k = S.shape[-1]
    eye = torch.eye(k, dtype=S.dtype, device=S.device)
    scale = torch.diagonal(S).sum().abs() / k
    j0 = jitter * scale + jitter_abs
    eps = torch.finfo(S.dtype).eps
    j1 = torch.where(j0 > 0, j0, eps * scale + torch.finfo(S.dtype).tiny)
    factors = 10.0 ** torch.arange(1, retries + 1, dtype=S.dtype, device=S.device)
    levels = torch.cat([j0.reshape(1), j1 * factors])
    L_all, info = torch.linalg.cholesky_ex(S.unsqueeze(0) + levels[:, None, None] * eye)
    ok = info == 0
    first = torch.argmax(ok.to(torch.int8))  # index of the first success (0 when none)
    failed = ~ok.any()
    idx = first.reshape(1)  # index_select, not Python indexing, which would read the index on the host
    L = torch.where(failed, eye, L_all.index_select(0, idx)[0])
    return L, levels.index_select(0, idx)[0], failed


def floor_ones_direction(R: Tensor, r_min: float) -> Tensor:
    """Raise the all-ones component of ``R: (m, m)`` to at least ``r_min``.

    ``rho = 1^T R 1 / m``; returns ``R + (max(rho, r_min) - rho) 1 1^T / m``. For a softmax observation the
    innovations and Jacobian rows are orthogonal to ``1``, so the EMA shrinks this direction geometrically and ``S``
    would become singular; the floor restores invertibility without touching the update (``docs/specs/loko.md`` §4).
    """
    m = R.shape[-1]
    rho = R.sum() / m
    return R + torch.clamp_min(r_min - rho, 0.0) / m


def floor_min_eigenvalue(R: Tensor, r_min: float) -> Tensor:
    """``R + max(r_min - lambda_min(R), 0) I``: keeps a general ``R: (m, m)`` (regression, scalar) positive definite.
    For ``m = 1`` this is ``max(R, r_min)``."""
    m = R.shape[-1]
    if m == 1:
        return torch.clamp_min(R, r_min)
    # eigvalsh raises on non-finite input; such an R is rejected by the caller's finiteness check anyway.
    eye = torch.eye(m, dtype=R.dtype, device=R.device)
    lam = torch.linalg.eigvalsh(torch.where(torch.isfinite(R).all(), R, eye))[0]
    return R + torch.clamp_min(r_min - lam, 0.0) * eye


def clamp_eigenvalues(R: Tensor, r_min: float) -> Tensor:
    """``V max(Lambda, r_min) V^T`` for ``R = V Lambda V^T: (m, m)``: every eigenvalue floored at ``r_min`` on its
    own, the others untouched. For a softmax observation this floors the all-ones direction (as
    :func:`floor_ones_direction` does) and also every direction the update sees, so the noise EMA cannot drive ``S``
    towards singular there: with ``S ~ h^2 p + R`` along a row ``h``, the step ``p h e / S`` is at most
    ``|e| sqrt(p / R) / 2``, which stays bounded only while ``R`` does (``benchmarks/notes/loko.md``, "LoKO on the
    10,000-sample streams")."""
    eye = torch.eye(R.shape[-1], dtype=R.dtype, device=R.device)
    lam, V = torch.linalg.eigh(torch.where(torch.isfinite(R).all(), R, eye))
    return (V * torch.clamp_min(lam, r_min)) @ V.transpose(-1, -2)


NOISE_FLOORS = ("ones", "eig", "clamp", "none")


def apply_noise_floor(R: Tensor, r_min: float, kind: str) -> Tensor:
    """Dispatch on ``kind`` in ``NOISE_FLOORS`` (see :class:`EKFConfig`)."""
    if kind == "ones":
        return floor_ones_direction(R, r_min)
    if kind == "eig":
        return floor_min_eigenvalue(R, r_min)
    if kind == "clamp":
        return clamp_eigenvalues(R, r_min)
    if kind == "none":
        return R
    raise ValueError(f"noise_floor must be one of {NOISE_FLOORS}, got {kind!r}")


def noise_ema_update(
    R: Tensor, eps: Tensor, hph: Tensor, *, beta: float, r_min: float = 0.0, noise_floor: str = "none"
) -> Tensor:
    """Residual-form EMA of the observation noise (adaptive EKF of Akhlaghi, Zhou & Huang 2017).

    ``R: (m, m)``; ``eps: (b, m)`` post-update residuals of the ``b`` samples; ``hph: (m, m)`` the per-sample mean
    of ``H_i P_k H_i^T``. Returns ``beta R + (1 - beta) (mean_i eps_i eps_i^T + hph)``, symmetrised and floored.
    Both added terms are PSD, so ``R`` stays PSD (the innovation form ``E[e e^T] - H P H^T`` can go indefinite).
    """
    b = eps.shape[0]
    outer = eps.transpose(0, 1) @ eps / b
    R_new = beta * R + (1.0 - beta) * (outer + hph)
    R_new = 0.5 * (R_new + R_new.transpose(0, 1))
    return apply_noise_floor(R_new, r_min, noise_floor)


def _finite(*tensors: Tensor) -> Tensor:
    ok = torch.ones((), dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok = ok & torch.isfinite(t).all()
    return ok


# ------------------------------------------------------------------------------------------------- diagonal filter


def diag_ekf_update(
    theta: Tensor,
    p: Tensor,
    R: Tensor,
    H: Tensor,
    e: Tensor,
    cfg: EKFConfig = EKFConfig(),
    residual: Optional[Callable[[Tensor], Tensor]] = None,
) -> EKFResult:
    """One diagonal-covariance EKF step (``docs/specs/loko.md`` §3), single sample or joint batch (§8).

    Args:
        theta: ``(n,)`` mean before the step.
        p: ``(n,)`` diagonal of ``P`` before the step (the predict step ``p + q`` happens here).
        R: ``(m, m)`` observation noise of one sample (``R_{k-1}``).
        H: ``(m, n)`` Jacobian, or ``(b, m, n)`` for a joint update of ``b`` samples linearised at ``theta``.
        e: ``(m,)`` innovation ``y - h(x; theta)``, or ``(b, m)``.
        cfg: :class:`EKFConfig`.
        residual: optional ``residual(theta_new) -> (b, m)``, the exact post-update residual
            ``y_i - h(x_i; theta_new)`` (one more evaluation of the model). When given it replaces the linearised
            residual in the ``R`` update; the mean and covariance updates do not depend on it.

    Returns:
        :class:`EKFResult` ``(theta, p, R, info)``: ``theta + lr * P H^T S^-1 e``; the diagonal of
        ``P - P H^T S^-1 H P`` clamped at ``p_floor``; ``R`` after one EMA step (the mean over the ``b`` samples of
        ``eps_i eps_i^T + H_i diag(p_new) H_i^T``, with the linearised residual ``eps = e - lr H delta``) and the
        floor. Cost ``O(k^2 n + k^3)`` with ``k = b m``; transient memory ``~2 k n``.
    """
    H, e = _batched(H, e)
    b, m, n = H.shape
    k = b * m
    dt = _compute_dtype(cfg, theta, p, R, H)
    dev = theta.device
    lr, q, p_floor = (_as(v, dt, dev) for v in (cfg.lr, cfg.q, cfg.p_floor))

    th = theta.to(dt)
    p0 = p.to(dt)
    R0 = R.to(dt)
    Hf = H.reshape(k, n).to(dt)
    ef = e.reshape(k).to(dt)

    pp = p0 + q
    U = Hf * pp
    S = U @ Hf.transpose(0, 1) + block_noise(R0, b)
    S = 0.5 * (S + S.transpose(0, 1))
    L, jit, chol_failed = cholesky_with_jitter(S, jitter=cfg.jitter, jitter_abs=cfg.jitter_abs, retries=cfg.retries)

    s = torch.cholesky_solve(ef.unsqueeze(1), L).squeeze(1)
    delta = U.transpose(0, 1) @ s  # = p * (H^T s); the n x k gain is never formed
    M = torch.cholesky_solve(Hf, L)
    p_new = _floor(pp - pp * pp * (Hf * M).sum(0), p_floor)
    del M

    step = lr * delta
    theta_new = th + step
    if residual is None:
        eps = (ef - Hf @ step).reshape(b, m)
    else:
        eps = residual(theta_new).to(dt).reshape(b, m)
    Hb = Hf.reshape(b, m, n)
    hph = torch.einsum("ikn,iln->kl", Hb * p_new, Hb) / b
    R_new = noise_ema_update(R0, eps, hph, beta=cfg.beta, r_min=cfg.r_min, noise_floor=cfg.noise_floor)

    ok = ~chol_failed & _finite(ef, S, delta, p_new, R_new)
    skipped = ~ok
    return EKFResult(
        theta=torch.where(ok, theta_new, th),
        p=torch.where(ok, p_new, p0),
        R=torch.where(ok, R_new, R0),
        info=EKFInfo(skipped=skipped, jitter=jit, S=S, delta=torch.where(ok, delta, torch.zeros_like(delta))),
    )


def scalar_ekf_update(
    theta: Tensor, p: Tensor, R: Tensor, g: Tensor, loss: Tensor, cfg: EKFConfig = EKFConfig()
) -> EKFResult:
    """Scalar-loss observation (``docs/specs/loko.md`` §9; "LoKO-scalar", not the paper's method).

    The observation is the mean loss itself: ``h = L(x; theta)``, target 0, so ``H = g^T`` (the ordinary gradient)
    and ``e = -L``. ``O(n)`` work, no factorisation.

    Args:
        theta, p: ``(n,)``. R: ``(1, 1)`` or 0-dim. g: ``(n,)`` gradient of the loss. loss: 0-dim loss value.
        cfg: as for :func:`diag_ekf_update`; the same jitter rule is applied to the scalar ``S`` so that this equals
            ``diag_ekf_update(theta, p, R, g[None], -loss[None], cfg)`` with ``noise_floor`` "ones" or "eig" (for
            ``m = 1`` both are ``max(R, r_min)``).

    Returns:
        :class:`EKFResult` with ``R`` shaped ``(1, 1)``:
        ``S = sum p g^2 + R``, ``theta - lr (L/S) p g``, ``max(p - p^2 g^2 / S, p_floor)``,
        ``R <- beta R + (1 - beta)(eps^2 + sum p_new g^2)`` with ``eps = -L + lr (L/S) sum p g^2`` then floored.
    """
    dt = _compute_dtype(cfg, theta, p, R, g)
    dev = theta.device
    lr, q, p_floor = (_as(v, dt, dev) for v in (cfg.lr, cfg.q, cfg.p_floor))
    th = theta.to(dt)
    p0 = p.to(dt)
    R0 = R.to(dt).reshape(1, 1)
    gg = g.to(dt)
    L = loss.to(dt).reshape(())

    pp = p0 + q
    pg = pp * gg
    S = (pg * gg).sum() + R0[0, 0]
    Sj = S + cfg.jitter * S.abs() + cfg.jitter_abs
    delta = -(L / Sj) * pg
    p_new = _floor(pp - pg * pg / Sj, p_floor)
    step = lr * delta
    eps = -L - (gg * step).sum()
    R_new = cfg.beta * R0 + (1.0 - cfg.beta) * (eps * eps + (p_new * gg * gg).sum())
    R_new = apply_noise_floor(R_new, cfg.r_min, cfg.noise_floor)

    ok = (Sj > 0) & _finite(L, S, delta, p_new, R_new)
    return EKFResult(
        theta=torch.where(ok, th + step, th),
        p=torch.where(ok, p_new, p0),
        R=torch.where(ok, R_new, R0),
        info=EKFInfo(
            skipped=~ok, jitter=Sj - S, S=S.reshape(1, 1), delta=torch.where(ok, delta, torch.zeros_like(delta))
        ),
    )


# ------------------------------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class OutputRows:
    """One observation of ``b`` samples, reduced to what the diagonal filter needs.

    * ``H: (b k, n)``: Jacobian rows of the observed function (rows of sample ``i`` at ``i k ... (i+1) k - 1``);
    * ``e: (b, k)``: innovations ``y - h``.
    """

    H: Tensor
    e: Tensor

    @property
    def num_samples(self) -> int:
        return self.e.shape[0]

    def columns(self, mask: Tensor) -> "OutputRows":
        """The rows restricted to the coordinates where ``mask: (n,)`` is True."""
        return OutputRows(self.H[:, mask], self.e)


@dataclass(frozen=True)
class LossGradient:
    """A scalar-loss observation (``docs/specs/loko.md`` §9): ``g: (n,)`` the gradient of the loss, ``loss`` its
    0-dim value (the innovation is ``-loss``)."""

    g: Tensor
    loss: Tensor

    @property
    def H(self) -> Tensor:
        """``(1, n)``: the one Jacobian row."""
        return self.g.unsqueeze(0)

    def columns(self, mask: Tensor) -> "LossGradient":
        return LossGradient(self.g[mask], self.loss)


ReducedObservation = Union[OutputRows, LossGradient]


def ekf_step(
    theta: Tensor,
    p: Tensor,
    R: Tensor,
    obs: ReducedObservation,
    cfg: EKFConfig = EKFConfig(),
    residual: Optional[Callable[[Tensor], Tensor]] = None,
) -> EKFResult:
    """One filter step on a reduced observation: :func:`diag_ekf_update` for :class:`OutputRows` (``residual`` as
    there), :func:`scalar_ekf_update` for :class:`LossGradient`."""
    if isinstance(obs, LossGradient):
        return scalar_ekf_update(theta, p, R, obs.g, obs.loss.reshape(()), cfg)
    b, k = obs.e.shape
    return diag_ekf_update(theta, p, R, obs.H.reshape(b, k, -1), obs.e, cfg, residual=residual)


# ------------------------------------------------------------------------------------------------- prior


def draw_p0(
    p_init: Union[float, Tuple[float, float], str], shape: Sequence[int], seed: int, index: int, dtype: torch.dtype
) -> Tensor:
    """The initial covariance diagonal ``p0`` (CPU, ``shape``) of the parameter at position ``index``.

    ``p_init`` a float: constant. ``(low, high)``: i.i.d. uniform draws from a generator seeded by ``seed`` and
    ``index`` alone (not by other parameters, the device or the rank). ``"score"`` / ``"score-layer"``: the draw on
    ``(1e-4, 1e-2)``, rescaled later by :func:`score_scale` / :func:`score_scale_per_block`."""
    if isinstance(p_init, (int, float)) and not isinstance(p_init, bool):
        return torch.full(tuple(shape), float(p_init), dtype=dtype)
    low, high = (1e-4, 1e-2) if p_init in ("score", "score-layer") else p_init
    numel = 1
    for d in shape:
        numel *= d
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + index) % (2**63 - 1))
    u = torch.rand(numel, generator=gen, dtype=torch.float64)
    return (low + (high - low) * u).to(dtype).reshape(tuple(shape))


def score_scale(p: Tensor, H: Tensor, fresh: Tensor, target: float) -> Tensor:
    """Rescale the ``fresh: (n,)`` bool coordinates of ``p: (n,)`` by one scalar ``c`` so that the prior predictive
    variance of the observed rows ``H: (k, n)`` is ``target``: ``mean_j (H diag(c p_fresh) H^T)_jj = target``.
    Other coordinates, and all of them when that variance is 0 or not finite, are returned unchanged."""
    pf = torch.where(fresh, p, torch.zeros_like(p))
    den = torch.einsum("kn,kn,n->", H, H, pf) / H.shape[0]
    ok = torch.isfinite(den) & (den > 0)
    c = torch.where(ok, target / torch.where(ok, den, torch.ones_like(den)), torch.ones_like(den))
    return torch.where(fresh, p * c, p)


def score_scale_per_block(p: Tensor, H: Tensor, block: Tensor, scored: Tensor, target: Tensor
                          ) -> Tuple[Tensor, Tensor]:
    """Rescale each block of coordinates of ``p: (n,)`` by its own scalar so that the block's share of the prior
    predictive variance of the observed rows ``H: (k, n)`` is ``target``.

    ``block: (n,)`` int64 gives each coordinate's block in ``[0, T)``, or -1 for coordinates left alone;
    ``scored: (T,)`` bool marks the blocks already calibrated (left alone too); ``target``: a scalar or ``(T,)``.
    Block ``t`` gets ``c_t = target_t / v_t`` with ``v_t = mean_i sum_{j in t} H_ij^2 p_j``, and is then scored;
    a block whose ``v_t`` is 0 or not finite (no signal yet: a LoRA ``A`` while its ``B`` is still zero) keeps its
    values and stays unscored, so a later call can calibrate it. Returns the new ``p`` and ``scored``; no host
    synchronisation."""
    T = scored.shape[0]
    inside = block >= 0
    index = torch.where(inside, block, torch.zeros_like(block))
    per_coordinate = torch.where(inside, H.square().mean(0) * p, torch.zeros_like(p))
    v = torch.zeros(T, dtype=p.dtype, device=p.device).index_add_(0, index, per_coordinate)
    calibrate = ~scored & torch.isfinite(v) & (v > 0)
    target = torch.as_tensor(target, dtype=p.dtype, device=p.device).expand(T)
    c = torch.where(calibrate, target / torch.where(calibrate, v, torch.ones_like(v)), torch.ones_like(v))
    return torch.where(inside, p * c[index], p), scored | calibrate
