"""Exact-reference tests of the LoKO filter math (``loraopt.functional.ekf``), float64 unless stated."""

from __future__ import annotations

import math

import pytest
import torch

from loraopt.functional.ekf import (
    EKFConfig,
    apply_noise_floor,
    block_noise,
    cholesky_with_jitter,
    diag_ekf_update,
    floor_min_eigenvalue,
    floor_ones_direction,
    noise_ema_update,
    scalar_ekf_update,
)
from loraopt.functional.reference import (
    dense_diag_ekf_update,
    full_ekf_update,
    information_posterior,
    kalman_update,
    linear_softmax_observation,
)

F64 = torch.float64
EXACT = dict(jitter=0.0, jitter_abs=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _spd(n: int, g: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    A = torch.randn(n, n, generator=g, dtype=F64)
    return scale * (A @ A.T / n + 0.5 * torch.eye(n, dtype=F64))


# ------------------------------------------------------------------------------------------------- reference filters


def test_full_filter_equals_closed_form_kalman_static():
    """q = 0, fixed R: after k steps the filter is the batch posterior in information form."""
    g = _gen(0)
    n, m, steps = 5, 3, 12
    theta0 = torch.randn(n, generator=g, dtype=F64)
    P0 = _spd(n, g)
    R = _spd(m, g, 0.3)
    truth = torch.randn(n, generator=g, dtype=F64)
    cfg = EKFConfig(beta=1.0, noise_floor="none", **EXACT)
    theta, P = theta0, P0
    Hs, ys = [], []
    for _ in range(steps):
        H = torch.randn(m, n, generator=g, dtype=F64)
        y = H @ truth + torch.randn(m, generator=g, dtype=F64) * 0.1
        theta, P, R_out, out = full_ekf_update(theta, P, R, H, y - H @ theta, cfg)
        assert not out.skipped
        torch.testing.assert_close(R_out, R, rtol=0, atol=0)
        Hs.append(H)
        ys.append(y)
    mean_cf, P_cf = information_posterior(theta0, P0, R, Hs, ys)
    torch.testing.assert_close(P, P_cf, rtol=0, atol=1e-10)
    torch.testing.assert_close(theta, mean_cf, rtol=0, atol=1e-10)


def test_full_filter_equals_textbook_kalman_with_process_noise():
    g = _gen(1)
    n, m, q = 4, 2, 0.05
    theta, P = torch.zeros(n, dtype=F64), torch.eye(n, dtype=F64)
    th_ref, P_ref = theta.clone(), P.clone()
    R = _spd(m, g, 0.2)
    cfg = EKFConfig(q=q, beta=1.0, noise_floor="none", **EXACT)
    for _ in range(20):
        H = torch.randn(m, n, generator=g, dtype=F64)
        y = torch.randn(m, generator=g, dtype=F64)
        theta, P, _, _ = full_ekf_update(theta, P, R, H, y - H @ theta, cfg)
        th_ref, P_ref = kalman_update(th_ref, P_ref, R, H, y, q)
    torch.testing.assert_close(theta, th_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(P, P_ref, rtol=0, atol=1e-10)


def test_full_filter_joint_batch_equals_sequential_for_linear_model():
    """Block-diagonal noise: one joint update of b samples = b sequential updates (fixed R, linear h)."""
    g = _gen(2)
    n, m, b = 6, 2, 4
    theta, P, R = torch.randn(n, generator=g, dtype=F64), _spd(n, g), _spd(m, g, 0.5)
    H = torch.randn(b, m, n, generator=g, dtype=F64)
    y = torch.randn(b, m, generator=g, dtype=F64)
    cfg = EKFConfig(beta=1.0, noise_floor="none", **EXACT)
    joint = full_ekf_update(theta, P, R, H, y - torch.einsum("bmn,n->bm", H, theta), cfg)
    th, PP = theta, P
    for i in range(b):
        th, PP, _, _ = full_ekf_update(th, PP, R, H[i], y[i] - H[i] @ th, cfg)
    torch.testing.assert_close(joint.theta, th, rtol=0, atol=1e-10)
    torch.testing.assert_close(joint.P, PP, rtol=0, atol=1e-10)


def test_diag_filter_equals_full_filter_while_P_stays_diagonal():
    """Each observation touches one coordinate, so P stays diagonal; the R EMA runs (m = 1)."""
    g = _gen(3)
    n = 7
    p = 0.01 + torch.rand(n, generator=g, dtype=F64)
    theta = torch.randn(n, generator=g, dtype=F64)
    R = torch.full((1, 1), 0.2, dtype=F64)
    cfg = EKFConfig(q=1e-3, beta=0.9, r_min=1e-4, noise_floor="eig", **EXACT)
    th_d, p_d, R_d = theta, p, R
    th_f, P_f, R_f = theta, torch.diag(p), R
    for k in range(200):
        j = int(torch.randint(n, (1,), generator=g))
        H = torch.zeros(1, n, dtype=F64)
        H[0, j] = torch.randn((), generator=g, dtype=F64)
        e = torch.randn(1, generator=g, dtype=F64)
        th_d, p_d, R_d, _ = diag_ekf_update(th_d, p_d, R_d, H, e, cfg)
        th_f, P_f, R_f, _ = full_ekf_update(th_f, P_f, R_f, H, e, cfg)
        torch.testing.assert_close(P_f, torch.diag(torch.diagonal(P_f)), rtol=0, atol=0)
    torch.testing.assert_close(th_d, th_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(p_d, torch.diagonal(P_f), rtol=0, atol=1e-10)
    torch.testing.assert_close(R_d, R_f, rtol=0, atol=1e-10)


def test_diag_filter_equals_full_filter_multi_output_disjoint_coordinates():
    g = _gen(4)
    n, m = 9, 3
    theta, p = torch.randn(n, generator=g, dtype=F64), 0.1 + torch.rand(n, generator=g, dtype=F64)
    R = torch.diag(torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    cfg = EKFConfig(beta=1.0, noise_floor="none", **EXACT)
    th_f, P_f = theta, torch.diag(p)
    for _ in range(30):
        cols = torch.randperm(n, generator=g)[:m]
        H = torch.zeros(m, n, dtype=F64)
        H[torch.arange(m), cols] = torch.randn(m, generator=g, dtype=F64)
        e = torch.randn(m, generator=g, dtype=F64)
        theta, p, _, _ = diag_ekf_update(theta, p, R, H, e, cfg)
        th_f, P_f, _, _ = full_ekf_update(th_f, P_f, R, H, e, cfg)
    torch.testing.assert_close(theta, th_f, rtol=0, atol=1e-10)
    torch.testing.assert_close(p, torch.diagonal(P_f), rtol=0, atol=1e-10)


def test_scalar_case_by_hand():
    """m = n = 1: the textbook update written out."""
    theta, p, R, H, e = 0.3, 0.5, 0.2, 1.7, -0.4
    lr, q, beta = 0.8, 0.01, 0.9
    cfg = EKFConfig(lr=lr, q=q, beta=beta, r_min=1e-4, noise_floor="eig", **EXACT)
    res = diag_ekf_update(
        torch.tensor([theta], dtype=F64), torch.tensor([p], dtype=F64), torch.tensor([[R]], dtype=F64),
        torch.tensor([[H]], dtype=F64), torch.tensor([e], dtype=F64), cfg,
    )
    pp = p + q
    S = pp * H * H + R
    K = pp * H / S
    delta = K * e
    p_new = pp - K * H * pp
    eps = e - H * lr * delta
    R_new = beta * R + (1 - beta) * (eps * eps + H * p_new * H)
    assert res.theta.item() == pytest.approx(theta + lr * delta, abs=1e-15)
    assert res.p.item() == pytest.approx(p_new, abs=1e-15)
    assert res.p.item() == pytest.approx(pp * R / S, abs=1e-15)
    assert res.R.item() == pytest.approx(R_new, abs=1e-15)
    assert res.info.S.item() == pytest.approx(S, abs=1e-15)
    assert res.info.delta.item() == pytest.approx(delta, abs=1e-15)


def test_scalar_loss_variant_equals_matrix_filter_with_one_row():
    g = _gen(5)
    n = 11
    theta, p = torch.randn(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64) * 1e-2
    R = torch.tensor([[0.05]], dtype=F64)
    for floor in ("eig", "ones"):
        cfg = EKFConfig(lr=0.7, q=1e-4, beta=0.9, r_min=1e-3, noise_floor=floor, jitter=1e-6)
        th_s, p_s, R_s = theta, p, R
        th_m, p_m, R_m = theta, p, R
        for _ in range(50):
            grad = torch.randn(n, generator=g, dtype=F64)
            loss = torch.rand((), generator=g, dtype=F64)
            th_s, p_s, R_s, _ = scalar_ekf_update(th_s, p_s, R_s, grad, loss, cfg)
            th_m, p_m, R_m, _ = diag_ekf_update(th_m, p_m, R_m, grad[None], -loss.reshape(1), cfg)
        torch.testing.assert_close(th_s, th_m, rtol=0, atol=1e-12)
        torch.testing.assert_close(p_s, p_m, rtol=0, atol=1e-14)
        torch.testing.assert_close(R_s, R_m, rtol=0, atol=1e-14)


def test_scalar_loss_variant_spec_formulas():
    g = _gen(6)
    n = 5
    theta, p = torch.randn(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64)
    grad, L, R, beta = torch.randn(n, generator=g, dtype=F64), torch.tensor(0.8, dtype=F64), 0.3, 0.9
    cfg = EKFConfig(beta=beta, r_min=1e-4, noise_floor="eig", **EXACT)
    res = scalar_ekf_update(theta, p, torch.tensor(R, dtype=F64), grad, L, cfg)
    S = (p * grad**2).sum() + R
    torch.testing.assert_close(res.theta, theta - (L / S) * p * grad)
    p_new = p - p**2 * grad**2 / S
    torch.testing.assert_close(res.p, p_new)
    eps = L * R / S
    torch.testing.assert_close(res.R[0, 0], beta * R + (1 - beta) * (eps**2 + (p_new * grad**2).sum()))


def test_joint_diag_update_matches_dense_formulas():
    """The (b m) x (b m) joint update, re-derived with explicit dense matrices (P = diag(p) formed here only)."""
    g = _gen(7)
    n, m, b = 10, 3, 4
    theta, p = torch.randn(n, generator=g, dtype=F64), 0.05 + torch.rand(n, generator=g, dtype=F64)
    R = _spd(m, g, 0.2)
    H = torch.randn(b, m, n, generator=g, dtype=F64)
    e = torch.randn(b, m, generator=g, dtype=F64)
    lr, beta = 0.5, 0.8
    cfg = EKFConfig(lr=lr, beta=beta, noise_floor="none", **EXACT)
    res = diag_ekf_update(theta, p, R, H, e, cfg)
    _, p_new, R_new, S, delta = dense_diag_ekf_update(theta, p, R, H, e, lr=lr, beta=beta)
    torch.testing.assert_close(res.theta, theta + lr * delta, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.p, p_new, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.R, R_new, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.info.S, S, rtol=0, atol=1e-12)
    # b = 1 through the batched path equals the unbatched call
    one = diag_ekf_update(theta, p, R, H[:1], e[:1], cfg)
    two = diag_ekf_update(theta, p, R, H[0], e[0], cfg)
    for a, c in zip(one[:3], two[:3]):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_per_coordinate_lr_q_and_floor():
    g = _gen(8)
    n, m = 6, 2
    theta, p, R = torch.randn(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64), _spd(m, g)
    H, e = torch.randn(m, n, generator=g, dtype=F64), torch.randn(m, generator=g, dtype=F64)
    base = diag_ekf_update(theta, p, R, H, e, EKFConfig(lr=1.0, noise_floor="none", **EXACT))
    lr = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    res = diag_ekf_update(theta, p, R, H, e, EKFConfig(lr=lr, noise_floor="none", **EXACT))
    torch.testing.assert_close(res.theta[:3], base.theta[:3], rtol=0, atol=0)
    torch.testing.assert_close(res.theta[3:], theta[3:], rtol=0, atol=0)
    torch.testing.assert_close(res.p, base.p, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- softmax stability


def _softmax_stream(steps, m, d, seed, cfg, reduce=False, r0=0.1, check=None):
    g = _gen(seed)
    W_true = torch.randn(m, d, generator=g, dtype=F64) * 2
    W = torch.zeros(m, d, dtype=F64)
    mo = m - 1 if reduce else m
    p = torch.full((m * d,), 0.05, dtype=F64)
    R = r0 * torch.eye(mo, dtype=F64)
    if reduce:
        R = R - r0 / m
    for _ in range(steps):
        x = torch.randn(d, generator=g, dtype=F64)
        label = int(torch.multinomial(torch.softmax(W_true @ x, 0), 1, generator=g))
        H, e = linear_softmax_observation(W, x, label)
        if reduce:
            H, e = H[:mo], e[:mo]
        R_prev = R
        res = diag_ekf_update(W.reshape(-1), p, R, H, e, cfg)
        W, p, R = res.theta.reshape(m, d), res.p, res.R
        if check is not None:
            check(res, R_prev)
    return W, p, R


def test_softmax_500_steps_keep_R_and_S_spd_and_finite():
    m, d = 10, 4
    cfg = EKFConfig(beta=0.95, r_min=1e-4)
    seen = []

    def check(res, R_prev):
        assert not bool(res.info.skipped)
        for M in (res.R, res.info.S):
            assert torch.isfinite(M).all()
            torch.testing.assert_close(M, M.T, rtol=0, atol=1e-14)
            assert torch.linalg.eigvalsh(M)[0] > 0
        assert (res.p > 0).all() and torch.isfinite(res.p).all()
        seen.append(float(torch.linalg.eigvalsh(res.R)[0]))

    _softmax_stream(500, m, d, 9, cfg, check=check)
    assert len(seen) == 500
    assert min(seen) >= 1e-4 * 0.999  # the ones-direction floor is the smallest eigenvalue once the EMA has decayed


def test_softmax_fp32_500_steps_finite():
    """The library's default precision: no skipped step, R stays SPD."""
    m, d = 10, 4
    g = _gen(10)
    W_true = torch.randn(m, d, generator=g) * 2
    W = torch.zeros(m, d)
    p = torch.full((m * d,), 0.05)
    R = 0.1 * torch.eye(m)
    cfg = EKFConfig()
    for _ in range(500):
        x = torch.randn(d, generator=g)
        y = torch.softmax(W @ x, 0)
        label = int(torch.multinomial(torch.softmax(W_true @ x, 0), 1, generator=g))
        H = torch.kron(torch.diag(y) - torch.outer(y, y), x[None])
        e = torch.nn.functional.one_hot(torch.tensor(label), m).float() - y
        res = diag_ekf_update(W.reshape(-1), p, R, H, e, cfg)
        assert res.theta.dtype == torch.float32
        assert not bool(res.info.skipped)
        W, p, R = res.theta.reshape(m, d), res.p, res.R
    assert torch.linalg.eigvalsh(R.double())[0] > 0


def test_floor_does_not_change_the_update():
    """jitter 0: r_min 1e-4 vs 1e-8 give the same theta after 1000 steps (the floor only acts on the 1-direction)."""
    m, d = 4, 3
    out = {}
    for r_min in (1e-4, 1e-8):
        cfg = EKFConfig(beta=0.95, r_min=r_min, **EXACT)
        W, p, R = _softmax_stream(1000, m, d, 11, cfg)
        out[r_min] = (W, p)
        ones = torch.ones(m, dtype=F64)
        assert float(ones @ R @ ones / m) == pytest.approx(r_min, rel=1e-6)
    torch.testing.assert_close(out[1e-4][0], out[1e-8][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1e-4][1], out[1e-8][1], rtol=0, atol=1e-8)


def test_S_stays_invertible_over_10k_steps():
    m, d = 3, 2
    cfg = EKFConfig(beta=0.9, r_min=1e-8, **EXACT)
    worst = [math.inf]

    def check(res, R_prev):
        assert not bool(res.info.skipped)
        worst[0] = min(worst[0], float(torch.linalg.eigvalsh(res.info.S)[0]))

    _softmax_stream(10_000, m, d, 12, cfg, check=check)
    assert worst[0] > 0


def test_reduce_simplex_equals_full_softmax_filter():
    """Observing m - 1 classes with R started at the 1-orthogonal part of r0 I is the full filter exactly."""
    m, d = 5, 3
    full = _softmax_stream(300, m, d, 13, EKFConfig(beta=0.9, r_min=1e-6, **EXACT))
    red = _softmax_stream(300, m, d, 13, EKFConfig(beta=0.9, noise_floor="none", **EXACT), reduce=True)
    torch.testing.assert_close(full[0], red[0], rtol=0, atol=1e-8)
    torch.testing.assert_close(full[1], red[1], rtol=0, atol=1e-10)
    # the reduced R is the leading block of the full R's 1-orthogonal part
    ones = torch.ones(m, dtype=F64)
    Pperp = torch.eye(m, dtype=F64) - torch.outer(ones, ones) / m
    torch.testing.assert_close((Pperp @ full[2] @ Pperp)[: m - 1, : m - 1], red[2], rtol=0, atol=1e-10)


def test_p_positive_and_nonincreasing_with_q0():
    m, d = 6, 3
    cfg = EKFConfig(beta=0.95)

    def check(res, R_prev):
        check.prev = getattr(check, "prev", None)
        assert (res.p > 0).all()
        if check.prev is not None:
            assert (res.p <= check.prev).all()
        check.prev = res.p

    _softmax_stream(300, m, d, 14, cfg, check=check)


def test_process_noise_tracks_a_drifting_target():
    """Linear regression whose true weights rotate: q > 0 keeps p from collapsing and follows the drift."""
    n, steps = 4, 3000
    errs = {}
    for q in (0.0, 1e-3):
        g = _gen(15)
        truth = torch.randn(n, generator=g, dtype=F64)
        theta, p, R = torch.zeros(n, dtype=F64), torch.full((n,), 1.0, dtype=F64), torch.full((1, 1), 0.01, dtype=F64)
        cfg = EKFConfig(q=q, beta=0.99, r_min=1e-4, noise_floor="eig")
        tail = []
        for k in range(steps):
            truth = truth + 0.01 * torch.randn(n, generator=g, dtype=F64)
            x = torch.randn(n, generator=g, dtype=F64)
            y = x @ truth + 0.05 * torch.randn((), generator=g, dtype=F64)
            theta, p, R, _ = diag_ekf_update(theta, p, R, x[None], (y - x @ theta).reshape(1), cfg)
            if k >= steps - 500:
                tail.append(float((theta - truth).norm()))
        errs[q] = sum(tail) / len(tail)
    assert errs[1e-3] < 0.25 * errs[0.0], errs


# ------------------------------------------------------------------------------------------------- numerics


def test_cholesky_jitter_levels_and_retry():
    g = _gen(16)
    k = 5
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=F64))
    eig = torch.tensor([1.0, 1.0, 1.0, 1.0, -5e-5], dtype=F64)
    S = Q @ torch.diag(eig) @ Q.T
    S = 0.5 * (S + S.T)
    scale = float(torch.trace(S)) / k
    L, used, failed = cholesky_with_jitter(S, jitter=1e-6, jitter_abs=0.0, retries=3)
    assert not bool(failed)
    assert float(used) == pytest.approx(1e-4 * scale, rel=1e-12)  # 1e-6 and 1e-5 fail, 1e-4 succeeds
    torch.testing.assert_close(L @ L.T, S + used * torch.eye(k, dtype=F64))
    L2, used2, failed2 = cholesky_with_jitter(S - torch.eye(k, dtype=F64), jitter=1e-6)
    assert bool(failed2)
    torch.testing.assert_close(L2, torch.eye(k, dtype=F64))
    # zero jitter still has levels to retry with
    sing = torch.zeros(k, k, dtype=F64)
    sing[0, 0] = 1.0
    _, used3, failed3 = cholesky_with_jitter(sing, jitter=0.0, jitter_abs=0.0)
    assert not bool(failed3) and float(used3) > 0


@pytest.mark.parametrize("bad", ["e", "H", "R"])
def test_non_finite_inputs_skip_the_step(bad):
    g = _gen(17)
    n, m = 6, 3
    theta, p, R = torch.randn(n, generator=g, dtype=F64), torch.rand(n, generator=g, dtype=F64), _spd(m, g)
    H, e = torch.randn(m, n, generator=g, dtype=F64), torch.randn(m, generator=g, dtype=F64)
    if bad == "e":
        e[1] = float("nan")
    elif bad == "H":
        H[0, 2] = float("inf")
    else:
        R[0, 0] = float("nan")
    for floor in ("ones", "eig", "none"):
        res = diag_ekf_update(theta, p, R, H, e, EKFConfig(noise_floor=floor))
        assert bool(res.info.skipped)
        assert torch.equal(res.theta, theta) and torch.equal(res.p, p)
        assert torch.equal(res.R, R) or (bad == "R" and torch.isnan(res.R[0, 0]))
        assert torch.equal(res.info.delta, torch.zeros(n, dtype=F64))
    loss = e[1] if bad == "e" else e[0]
    res = scalar_ekf_update(theta, p, R[:1, :1], H[0], loss, EKFConfig(noise_floor="eig"))
    assert bool(res.info.skipped)
    assert torch.equal(res.theta, theta) and torch.equal(res.p, p)


def test_unfactorable_S_skips_the_step():
    n, m = 4, 2
    theta, p = torch.ones(n, dtype=F64), torch.ones(n, dtype=F64)
    R = -10.0 * torch.eye(m, dtype=F64)  # indefinite: no jitter level rescues it
    H, e = torch.ones(m, n, dtype=F64), torch.ones(m, dtype=F64)
    res = diag_ekf_update(theta, p, R, H, e, EKFConfig())
    assert bool(res.info.skipped)
    assert torch.equal(res.theta, theta) and torch.equal(res.p, p) and torch.equal(res.R, R)


def test_noise_floors():
    g = _gen(18)
    m = 4
    ones = torch.ones(m, dtype=F64)
    Pperp = torch.eye(m, dtype=F64) - torch.outer(ones, ones) / m
    A = torch.randn(m, m, generator=g, dtype=F64)
    R = Pperp @ (A @ A.T) @ Pperp + 1e-9 * torch.outer(ones, ones) / m
    Rf = floor_ones_direction(R, 1e-3)
    assert float(ones @ Rf @ ones / m) == pytest.approx(1e-3)
    torch.testing.assert_close(Pperp @ Rf @ Pperp, Pperp @ R @ Pperp, rtol=0, atol=1e-15)
    assert torch.equal(floor_ones_direction(Rf, 1e-6), Rf)  # above the floor: untouched
    Re = floor_min_eigenvalue(R, 1e-3)
    assert float(torch.linalg.eigvalsh(Re)[0]) == pytest.approx(1e-3)
    scalar = floor_min_eigenvalue(torch.tensor([[1e-6]], dtype=F64), 1e-3)
    torch.testing.assert_close(scalar, torch.tensor([[1e-3]], dtype=F64))
    assert torch.equal(apply_noise_floor(R, 1.0, "none"), R)
    with pytest.raises(ValueError, match="noise_floor"):
        apply_noise_floor(R, 1.0, "bogus")


def test_noise_ema_stays_psd_and_matches_formula():
    g = _gen(19)
    m, b = 3, 5
    R = _spd(m, g, 0.1)
    eps = torch.randn(b, m, generator=g, dtype=F64)
    hph = _spd(m, g, 0.01)
    out = noise_ema_update(R, eps, hph, beta=0.9)
    torch.testing.assert_close(out, 0.9 * R + 0.1 * (eps.T @ eps / b + hph))
    assert torch.linalg.eigvalsh(out)[0] > 0
    torch.testing.assert_close(block_noise(R, 2), torch.kron(torch.eye(2, dtype=F64), R))


def test_low_precision_inputs_use_fp32_math():
    g = _gen(20)
    n, m = 8, 3
    theta = torch.randn(n, generator=g).bfloat16()
    p = torch.full((n,), 1e-2)
    R = 0.1 * torch.eye(m)
    H = torch.randn(m, n, generator=g).bfloat16()
    e = torch.randn(m, generator=g).bfloat16()
    res = diag_ekf_update(theta, p, R, H, e, EKFConfig())
    assert res.theta.dtype == res.p.dtype == res.R.dtype == torch.float32
    ref = diag_ekf_update(theta.float(), p, R, H.float(), e.float(), EKFConfig())
    torch.testing.assert_close(res.theta, ref.theta, rtol=0, atol=0)
    res64 = diag_ekf_update(theta, p, R, H, e, EKFConfig(dtype=F64))
    assert res64.theta.dtype == F64


def test_diag_filter_never_forms_n_by_n():
    """A large n runs in O(m n) memory (an n x n fp32 matrix would need 40 GB here)."""
    n, m = 100_000, 4
    g = _gen(21)
    H = torch.randn(m, n, generator=g) * 1e-2
    res = diag_ekf_update(torch.zeros(n), torch.full((n,), 1e-3), 0.1 * torch.eye(m), H, torch.randn(m, generator=g))
    assert res.theta.shape == (n,) and not bool(res.info.skipped)
