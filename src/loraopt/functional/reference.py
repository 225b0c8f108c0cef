"""Dense references for LoKO's filter math: slow, exact and small, for tests only.

* :func:`full_ekf_update`: the full-covariance EKF step (``P: (n, n)``) that the diagonal filter is compared with.
* :func:`kalman_update`: the textbook Kalman predict/update with an explicit gain.
* :func:`information_posterior`: the closed-form batch posterior of a static linear-Gaussian model.
* :func:`dense_diag_ekf_update`: the joint diagonal update written with explicit dense matrices.
* :func:`linear_softmax_observation`: the analytic Jacobian and innovation of ``softmax(W x)``.
* :func:`loop_jacobian`: Jacobian rows by one ``autograd.grad`` call per output.

Nothing here is used by the optimizers; each function forms ``n x n`` or ``k x k`` matrices explicitly.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from .ekf import (
    EKFConfig,
    EKFInfo,
    _as,
    _batched,
    _compute_dtype,
    _finite,
    block_noise,
    cholesky_with_jitter,
    noise_ema_update,
)

__all__ = [
    "FullEKFResult",
    "full_ekf_update",
    "kalman_update",
    "information_posterior",
    "dense_diag_ekf_update",
    "linear_softmax_observation",
    "loop_jacobian",
]


class FullEKFResult(NamedTuple):
    """``theta: (n,)``, ``P: (n, n)``, ``R: (m, m)`` after the step, plus ``info``."""

    theta: Tensor
    P: Tensor
    R: Tensor
    info: EKFInfo


def full_ekf_update(
    theta: Tensor, P: Tensor, R: Tensor, H: Tensor, e: Tensor, cfg: EKFConfig = EKFConfig()
) -> FullEKFResult:
    """Full-covariance EKF step: the reference the diagonal filter is tested against (``O(n^2)`` memory).

    Same arguments as :func:`loraopt.functional.ekf.diag_ekf_update` with ``P: (n, n)`` instead of ``p``. Predict
    ``P + q I``, then ``K = P H^T S^-1``, ``theta + lr K e``, Joseph-form ``(I - K H) P (I - K H)^T + K R_blk K^T``
    (equal to ``P - K H P`` in exact arithmetic, symmetric and PSD in floating point), and the same ``R`` EMA with
    ``H_i P_new H_i^T``. ``p_floor`` is not applied. Skipping follows the same rule.
    """
    H, e = _batched(H, e)
    b, m, n = H.shape
    k = b * m
    dt = _compute_dtype(cfg, theta, P, R, H)
    dev = theta.device
    lr = _as(cfg.lr, dt, dev)
    q = _as(cfg.q, dt, dev)
    th = theta.to(dt)
    P0 = P.to(dt)
    R0 = R.to(dt)
    Hf = H.reshape(k, n).to(dt)
    ef = e.reshape(k).to(dt)
    eye_n = torch.eye(n, dtype=dt, device=dev)

    Pp = P0 + q * eye_n if not torch.is_tensor(q) else P0 + torch.diag(torch.broadcast_to(q, (n,)))
    Rb = block_noise(R0, b)
    PHt = Pp @ Hf.transpose(0, 1)
    S = Hf @ PHt + Rb
    S = 0.5 * (S + S.transpose(0, 1))
    L, jit, chol_failed = cholesky_with_jitter(S, jitter=cfg.jitter, jitter_abs=cfg.jitter_abs, retries=cfg.retries)
    K = torch.cholesky_solve(PHt.transpose(0, 1), L).transpose(0, 1)  # (n, k)
    delta = K @ ef
    IKH = eye_n - K @ Hf
    P_new = IKH @ Pp @ IKH.transpose(0, 1) + K @ Rb @ K.transpose(0, 1)
    P_new = 0.5 * (P_new + P_new.transpose(0, 1))

    step = lr * delta
    eps = (ef - Hf @ step).reshape(b, m)
    Hb = Hf.reshape(b, m, n)
    hph = torch.einsum("ikn,nj,ilj->kl", Hb, P_new, Hb) / b
    R_new = noise_ema_update(R0, eps, hph, beta=cfg.beta, r_min=cfg.r_min, noise_floor=cfg.noise_floor)

    ok = ~chol_failed & _finite(ef, S, delta, P_new, R_new)
    return FullEKFResult(
        theta=torch.where(ok, th + step, th),
        P=torch.where(ok, P_new, P0),
        R=torch.where(ok, R_new, R0),
        info=EKFInfo(skipped=~ok, jitter=jit, S=S, delta=torch.where(ok, delta, torch.zeros_like(delta))),
    )


def kalman_update(
    theta: Tensor, P: Tensor, R: Tensor, H: Tensor, y: Tensor, q: float = 0.0
) -> Tuple[Tensor, Tensor]:
    """Textbook Kalman step with an explicit inverse: ``theta: (n,)``, ``P: (n, n)``, ``R: (m, m)``, ``H: (m, n)``,
    ``y: (m,)``. Predict ``P + q I``; ``K = P H^T (H P H^T + R)^-1``; returns ``(theta + K (y - H theta),
    (I - K H) P)``."""
    n = P.shape[0]
    eye = torch.eye(n, dtype=P.dtype, device=P.device)
    P_pred = P + q * eye
    K = P_pred @ H.T @ torch.linalg.inv(H @ P_pred @ H.T + R)
    return theta + K @ (y - H @ theta), (eye - K @ H) @ P_pred


def information_posterior(
    theta0: Tensor, P0: Tensor, R: Tensor, Hs: Sequence[Tensor], ys: Sequence[Tensor]
) -> Tuple[Tensor, Tensor]:
    """Closed-form posterior ``(mean: (n,), P: (n, n))`` of a static linear-Gaussian model after observing
    ``y_k = H_k theta + v_k`` (``H_k: (m, n)``, ``y_k: (m,)``, ``v_k ~ N(0, R)``) from the prior ``N(theta0, P0)``,
    in information form: ``P^-1 = P0^-1 + sum H_k^T R^-1 H_k``, ``P^-1 mean = P0^-1 theta0 + sum H_k^T R^-1 y_k``."""
    info = torch.linalg.inv(P0)
    info_mean = info @ theta0
    Rinv = torch.linalg.inv(R)
    for H, y in zip(Hs, ys):
        info = info + H.T @ Rinv @ H
        info_mean = info_mean + H.T @ Rinv @ y
    P = torch.linalg.inv(info)
    return P @ info_mean, P


def dense_diag_ekf_update(
    theta: Tensor, p: Tensor, R: Tensor, H: Tensor, e: Tensor, *, lr: float = 1.0, beta: float = 0.95
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The joint diagonal update with dense matrices (``P = diag(p)`` formed), no floor and no jitter.

    ``theta, p: (n,)``, ``R: (m, m)``, ``H: (b, m, n)``, ``e: (b, m)``. Returns ``(theta_new, p_new, R_new, S,
    delta)`` with ``S = H P H^T + I_b kron R: (b m, b m)``, ``delta = P H^T S^-1 e``, ``p_new = diag(P - K H P)``
    and ``R_new = beta R + (1 - beta) mean_i(eps_i eps_i^T + H_i diag(p_new) H_i^T)``, ``eps = e - lr H delta``."""
    b, m, n = H.shape
    dt = theta.dtype
    Hf, ef, P = H.reshape(b * m, n), e.reshape(-1), torch.diag(p)
    S = Hf @ P @ Hf.T + torch.kron(torch.eye(b, dtype=dt), R)
    K = P @ Hf.T @ torch.linalg.inv(S)
    delta = K @ ef
    p_new = torch.diagonal(P - K @ Hf @ P)
    eps = (ef - lr * Hf @ delta).reshape(b, m)
    per_sample = [torch.outer(eps[i], eps[i]) + H[i] @ torch.diag(p_new) @ H[i].T for i in range(b)]
    R_new = beta * R + (1 - beta) * sum(per_sample) / b
    return theta + lr * delta, p_new, R_new, S, delta


def linear_softmax_observation(W: Tensor, x: Tensor, label: int) -> Tuple[Tensor, Tensor]:
    """Linear softmax model ``h = softmax(W x)``, ``W: (m, d)``, ``x: (d,)``, ``theta = vec(W)`` (row-major).

    Returns ``(H: (m, m d), e: (m,))`` analytically: ``d h_k / d W_cj = (diag(h) - h h^T)_kc x_j`` and
    ``e = onehot(label) - h``."""
    y = torch.softmax(W @ x, 0)
    A = torch.diag(y) - torch.outer(y, y)
    H = torch.kron(A, x[None, :])  # d y_k / d W_cj = A_kc x_j
    e = torch.nn.functional.one_hot(torch.tensor(label), W.shape[0]).to(W.dtype) - y
    return H, e


def loop_jacobian(h: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``(N, n)``: row ``k`` is ``d h.flat[k] / d params`` from its own ``autograd.grad`` call (the graph of ``h`` is
    kept); unused parameters give zero columns."""
    rows = []
    flat = h.reshape(-1)
    for k in range(flat.numel()):
        grads = torch.autograd.grad(flat[k], params, retain_graph=True, allow_unused=True)
        blocks = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
        rows.append(torch.cat(blocks))
    return torch.stack(rows)
