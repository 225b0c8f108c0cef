"""LoRSum against dense float64 references (specs/psi-lora.md §11)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraopt.functional import (
    lorsum,
    lorsum_from_projections,
    lowrank_sq_norm,
    project_left,
    project_right,
    scaled_svd_project,
    spd_solve,
    svd_factors,
    svd_project,
)

F64 = torch.float64


def _problem(d_out=60, d_in=40, r=4, n=30, seed=0, gap=True):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64))[0]
    sv = torch.tensor([10.0, 8.0, 6.0, 5.0, 1.0, 0.5, 0.3, 0.1], dtype=F64) if gap else torch.ones(8, dtype=F64)
    W = (U[:, :8] * sv) @ V[:, :8].T + 0.3 * torch.randn(d_out, d_in, generator=g, dtype=F64)
    B0, A0 = svd_factors(W, r)
    S = 0.1 * torch.randn(n, d_out, generator=g, dtype=F64)
    X = torch.randn(n, d_in, generator=g, dtype=F64)
    return B0, A0, S, X


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_lambda0_many_rounds_is_truncated_svd_of_target():
    B0, A0, S, X = _problem()
    eta = 0.5
    target = B0 @ A0 - eta * S.T @ X
    res = lorsum((1.0, B0, A0), [(-eta, S.T, X)], iters=200, lam=0.0, jitter=0.0, compute_dtype=F64)
    assert _rel(res.B @ res.A, svd_project(target, 4)) < 1e-8
    assert res.fallbacks.item() == 0


def test_error_to_svd_decreases_with_rounds():
    B0, A0, S, X = _problem()
    target = B0 @ A0 - 2.0 * S.T @ X
    ref = svd_project(target, 4)
    errs = [
        _rel((r := lorsum((1.0, B0, A0), [(-2.0, S.T, X)], iters=k, lam=0.0, jitter=0.0, compute_dtype=F64)).B @ r.A, ref)
        for k in (1, 2, 4, 8, 16, 64)
    ]
    assert all(b <= a + 1e-15 for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 * errs[0]


@pytest.mark.parametrize("c0", [1.0, 0.9])
def test_jacobi_is_the_preconditioned_closed_form(c0):
    B0, A0, S, X = _problem()
    eta, lam = 0.3, 0.05
    G = S.T @ X
    res = lorsum((c0, B0, A0), [(-eta, S.T, X)], iters=0, lam=lam, jitter=0.0, compute_dtype=F64)
    eye = torch.eye(4, dtype=F64)
    # c0 B0 A0 = (sqrt(c0) B0)(sqrt(c0) A0): the ScaledGD / PrecGD / RPLoRA form at the rescaled anchor.
    Bc, Ac = B0 * c0**0.5, A0 * c0**0.5
    A_ref = Ac - eta * torch.linalg.solve(Bc.T @ Bc + lam * eye, Bc.T @ G)
    B_ref = Bc - eta * G @ Ac.T @ torch.linalg.inv(Ac @ Ac.T + lam * eye)
    assert (res.A - A_ref).abs().max() < 1e-12
    assert (res.B - B_ref).abs().max() < 1e-12


def test_jacobi_applies_the_anchor_coefficient_once():
    B0, A0, _, _ = _problem()
    zero = (1.0, torch.zeros(60, 1, dtype=F64), torch.zeros(1, 40, dtype=F64))
    for k in (0, 1, 3):
        res = lorsum((0.9, B0, A0), [zero], iters=k, lam=0.0, jitter=0.0, compute_dtype=F64)
        assert _rel(res.B @ res.A, 0.9 * B0 @ A0) < 1e-12, k


def test_jacobi_from_projections_equals_jacobi_from_terms():
    B0, A0, S, X = _problem()
    MB, MA = torch.randn(60, 3, dtype=F64), torch.randn(3, 40, dtype=F64)
    terms = [(-0.2, S.T, X), (-0.1, MB, MA)]
    p_in, p_out = torch.rand(40, dtype=F64) + 0.5, torch.rand(60, dtype=F64) + 0.5
    a = lorsum((1.0, B0, A0), terms, iters=0, lam=0.01, p_in=p_in, p_out=p_out, compute_dtype=F64)
    b = lorsum_from_projections(
        (1.0, B0, A0), project_left(terms, B0), project_right(terms, A0), lam=0.01, p_in=p_in, p_out=p_out,
        compute_dtype=F64,
    )
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_one_round_is_tangent_projection_to_first_order():
    """K = 1, lam -> 0: Delta W = -eta (P_B G + G P_A - P_B G P_A) + O(eta^2)."""
    B0, A0, S, X = _problem()
    G = S.T @ X
    P_B = B0 @ torch.linalg.pinv(B0)
    P_A = torch.linalg.pinv(A0) @ A0
    tangent = P_B @ G + G @ P_A - P_B @ G @ P_A
    errors = []
    for eta in (1e-2, 5e-3, 2.5e-3):
        res = lorsum((1.0, B0, A0), [(-eta, S.T, X)], iters=1, lam=0.0, jitter=0.0, compute_dtype=F64)
        step = res.B @ res.A - B0 @ A0
        errors.append(((step + eta * tangent).norm() / eta).item())
    assert errors[1] / errors[0] == pytest.approx(0.5, rel=0.05)
    assert errors[2] / errors[1] == pytest.approx(0.5, rel=0.05)


def test_scaled_lorsum_is_the_weighted_optimum():
    B0, A0, S, X = _problem()
    g = torch.Generator().manual_seed(3)
    p_in = torch.rand(40, generator=g, dtype=F64) + 0.5
    p_out = torch.rand(60, generator=g, dtype=F64) + 0.5
    eta = 0.5
    res = lorsum((1.0, B0, A0), [(-eta, S.T, X)], iters=300, lam=0.0, p_in=p_in, p_out=p_out, jitter=0.0,
                 compute_dtype=F64)
    target = B0 @ A0 - eta * (S.T @ X) / p_out[:, None] / p_in
    assert _rel(res.B @ res.A, scaled_svd_project(target, 4, p_in, p_out)) < 1e-8


def test_scaled_with_identity_metric_equals_unscaled():
    B0, A0, S, X = _problem()
    ones_in, ones_out = torch.ones(40, dtype=F64), torch.ones(60, dtype=F64)
    for k in (0, 1, 3):
        a = lorsum((1.0, B0, A0), [(-0.3, S.T, X)], iters=k, lam=0.01, compute_dtype=F64)
        b = lorsum((1.0, B0, A0), [(-0.3, S.T, X)], iters=k, lam=0.01, p_in=ones_in, p_out=ones_out, compute_dtype=F64)
        assert torch.allclose(a.A, b.A, atol=1e-13) and torch.allclose(a.B, b.B, atol=1e-13)


def test_zero_B_start_keeps_A_and_solves_B():
    """Standard LoRA init (B0 = 0): A+ = A0 and B+ = c S^T (X A0^T) (A0 A0^T + lam I)^-1."""
    _, A0, S, X = _problem()
    B0 = torch.zeros(60, 4, dtype=F64)
    lam, c = 0.01, -0.4
    for k in (0, 1):
        res = lorsum((1.0, B0, A0), [(c, S.T, X)], iters=k, lam=lam, jitter=0.0, compute_dtype=F64)
        assert torch.allclose(res.A, A0, atol=1e-13)
        B_ref = c * S.T @ (X @ A0.T) @ torch.linalg.inv(A0 @ A0.T + lam * torch.eye(4, dtype=F64))
        assert torch.allclose(res.B, B_ref, atol=1e-12)


def test_local_terms_go_through_all_reduce():
    B0, A0, S, X = _problem()
    calls = []

    def double(t):
        calls.append(t.shape)
        return 2 * t

    a = lorsum((1.0, B0, A0), [(-0.1, S.T, X, True)], iters=2, lam=0.01, all_reduce=double, compute_dtype=F64)
    b = lorsum((1.0, B0, A0), [(-0.2, S.T, X)], iters=2, lam=0.01, compute_dtype=F64)
    assert torch.allclose(a.A, b.A, atol=1e-13) and torch.allclose(a.B, b.B, atol=1e-13)
    assert calls == [(4, 40), (60, 4)] * 2


def test_low_precision_inputs_are_computed_in_fp32():
    B0, A0, S, X = _problem()
    res = lorsum((1.0, B0.bfloat16(), A0.bfloat16()), [(-0.1, S.T.bfloat16(), X.bfloat16())], iters=1, lam=0.01)
    assert res.A.dtype == torch.float32 and res.B.dtype == torch.float32


def test_spd_solve_falls_back_when_cholesky_fails():
    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)
    rhs = torch.tensor([[1.0], [0.0]], dtype=F64)
    x, failed = spd_solve(indefinite, rhs, jitter=0.0)
    assert failed.item() == 1
    assert torch.allclose(indefinite @ x, rhs)
    x, failed = spd_solve(torch.eye(2, dtype=F64) * 3, rhs, jitter=0.0)
    assert failed.item() == 0 and torch.allclose(x, rhs / 3)


@pytest.mark.parametrize("n", [5, 400])
def test_lowrank_sq_norm_both_routes(n):
    left, right = torch.randn(30, n, dtype=F64), torch.randn(n, 20, dtype=F64)
    assert lowrank_sq_norm(left, right).item() == pytest.approx((left @ right).square().sum().item(), rel=1e-12)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_huge_layer_never_materialises_the_dense_matrix():
    d, r, n = 50_000, 4, 64
    g = torch.Generator().manual_seed(0)
    B0, A0 = torch.randn(d, r, generator=g), torch.randn(r, d, generator=g)
    S, X = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    MB, MA = torch.randn(d, r, generator=g), torch.randn(r, d, generator=g)
    with _LargestTensor() as probe:
        for k in (0, 2):
            res = lorsum((1.0, B0, A0), [(-1e-3, S.T, X), (-1e-3, MB, MA)], iters=k, lam=1e-2)
            assert torch.isfinite(res.A).all() and torch.isfinite(res.B).all()
    assert probe.largest <= n * d  # the rows themselves; nothing of size d_out * d_in


def test_svd_factors_do_not_depend_on_the_signs_the_svd_backend_returns(monkeypatch):
    """LAPACK and cuSOLVER may return a singular pair with either sign: the factors must come out the same."""
    import importlib

    lorsum = importlib.import_module("loraopt.functional.lorsum")

    torch.manual_seed(0)
    W = torch.randn(7, 5, dtype=torch.float64)
    B, A = lorsum.svd_factors(W, 3)
    true_svd = torch.linalg.svd

    def flipped_svd(M, full_matrices=True):
        U, S, Vh = true_svd(M, full_matrices=full_matrices)
        signs = torch.tensor([-1.0, 1.0, -1.0, -1.0, 1.0], dtype=M.dtype)[: S.shape[-1]]
        return U * signs, S, Vh * signs.unsqueeze(-1)

    monkeypatch.setattr(torch.linalg, "svd", flipped_svd)
    B_flipped, A_flipped = lorsum.svd_factors(W, 3)
    torch.testing.assert_close(B_flipped, B, rtol=0, atol=1e-14)
    torch.testing.assert_close(A_flipped, A, rtol=0, atol=1e-14)
    U, S, Vh = true_svd(W, full_matrices=False)
    torch.testing.assert_close(B @ A, (U[:, :3] * S[:3]) @ Vh[:3], rtol=0, atol=1e-12)
    pivots = B.abs().argmax(dim=0)
    assert bool((B[pivots, torch.arange(3)] > 0).all())


@pytest.mark.parametrize("n", [3, 40])
def test_lowrank_sq_norm_of_a_batch_is_one_norm_per_leading_index(n):
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(3, 7, n, generator=g, dtype=torch.float64), torch.randn(3, n, 5, generator=g,
                                                                                        dtype=torch.float64)
    torch.testing.assert_close(lowrank_sq_norm(left, right), (left @ right).square().sum(dim=(-2, -1)),
                               rtol=1e-12, atol=0)
