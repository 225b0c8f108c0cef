"""momentum_balance="gram": the balanced SVD form of the low-rank momentum from k x k Grams (Cholesky QR in
float64) and a k x k SVD, without a QR of the tall factors.  Same result as "svd" up to the signs of the singular
pairs; the product M_B M_A is kept to rounding."""

import warnings

import pytest
import torch

import loraopt
from loraopt.lora import find_lora_layers
from loraopt.functional.psi import balance_gram, balance_svd
from toys import loss_fn, make_batch, make_model, params_snapshot
from test_step_launches import _calls_per_step

F64 = torch.float64
L, M, K, N = 4, 40, 6, 30


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _orthonormal(rows, cols, g):
    return torch.linalg.qr(torch.randn(L, rows, cols, dtype=F64, generator=g))[0]


def _pairs():
    """Pairs ``(B, A)`` batched over L layers of one shape, by name."""
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(L, M, K, dtype=F64, generator=g), torch.randn(L, K, N, dtype=F64, generator=g)
    U, V, W = _orthonormal(M, K, g), _orthonormal(N, K, g), _orthonormal(K, K, g)
    s = torch.logspace(1, -6, K, dtype=F64)  # singular values 1e1 .. 1e-6
    rank1 = torch.randn(L, M, 1, dtype=F64, generator=g) @ torch.randn(L, 1, K, dtype=F64, generator=g)
    return {
        "random": (B, A),
        "scaled": (B * 100.0, A * 1e-3),
        "ill-conditioned product": ((U * s.sqrt()) @ W, W.mT @ (s.sqrt()[:, None] * V.mT)),
        "ill-conditioned B": (U * s, V.mT.contiguous()),
        "ill-conditioned A": (U.contiguous(), s[:, None] * V.mT),
        "rank-1 B": (rank1, A),
        "rank-1 A": (B, rank1.mT[:, :, :N].contiguous()),
    }


def _align(gB, gA, sB, sA):
    """``(gB, gA)`` with each singular pair's sign matched to ``(sB, sA)``."""
    sign = torch.sign((gB * sB).sum(-2, keepdim=True) + (gA * sA).sum(-1, keepdim=True).mT)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return gB * sign, gA * sign.mT


@pytest.mark.parametrize("case", list(_pairs()))
def test_gram_balance_equals_svd_balance(case):
    B, A = _pairs()[case]
    sB, sA = balance_svd(B, A)
    gB, gA = balance_gram(B, A)
    assert not torch.equal(gB, B)  # balanced, not returned as given
    assert _rel(gB @ gA, B @ A) < 1e-13
    top = torch.linalg.matrix_norm(B @ A, ord=2).max().item()
    # Balanced form: B'^T B' = diag(S^2 / S_kept), A' A'^T = diag(S_kept), as the SVD path gives.
    assert torch.allclose(gB.mT @ gB, sB.mT @ sB, atol=1e-10 * top)
    assert torch.allclose(torch.linalg.svdvals(gB), torch.linalg.svdvals(sB), atol=1e-10 * top ** 0.5)
    aB, aA = _align(gB, gA, sB, sA)
    if case.startswith("rank-1"):
        # The SVD path fills M_A's rows where the product has no singular value with directions its QR picks
        # (sqrt(floor s_max) long); the Gram path leaves them ~0 where A is rank-deficient.  Only the resolved
        # pair is compared there.
        aB, aA, sB, sA = aB[..., :1], aA[..., :1, :], sB[..., :1], sA[..., :1, :]
        assert (torch.linalg.vector_norm(gA[..., 1:, :], dim=-1) <= 1.01 * (1e-4 * top) ** 0.5).all()
    else:
        assert torch.allclose(gA @ gA.mT, sA @ sA.mT, atol=1e-10 * top)
    assert (aB - sB).abs().max().item() < 1e-9 * top ** 0.5
    assert (aA - sA).abs().max().item() < 1e-9 * top ** 0.5


def test_gram_balance_leaves_zero_and_nonfinite_pairs_as_given():
    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(L, M, K, dtype=F64, generator=g), torch.randn(L, K, N, dtype=F64, generator=g)
    zero = torch.zeros_like(B)
    B_mixed = torch.cat([zero[:2], B[2:]])  # per layer: two zero momenta, two balanced
    out_B, out_A = balance_gram(B_mixed, A)
    assert torch.equal(out_B[:2], zero[:2]) and torch.equal(out_A[:2], A[:2])
    sB, sA = balance_svd(B[2:], A[2:])
    assert torch.allclose(out_B[2:].mT @ out_B[2:], sB.mT @ sB, atol=1e-10 * (B @ A).norm().item())
    bad = B.clone()
    bad[1, 0, 0] = float("nan")
    out_B, out_A = balance_gram(bad, A)
    assert torch.equal(out_A[1], A[1]) and torch.isnan(out_B[1]).any()
    assert not torch.equal(out_A[0], A[0])


def test_gram_balance_in_float32_keeps_the_product():
    B, A = _pairs()["random"]
    gB, gA = balance_gram(B.float(), A.float())
    assert gB.dtype == torch.float32 and gA.dtype == torch.float32
    assert _rel(gB.double() @ gA.double(), B @ A) < 1e-6
    sB, _ = balance_svd(B, A)
    assert torch.allclose(gB.double().mT @ gB.double(), sB.mT @ sB, atol=1e-5 * (B @ A).norm().item())


def test_momentum_balance_is_validated():
    with pytest.raises(ValueError, match="'gram', 'svd', 'polar', 'norm' or 'none'"):
        loraopt.create_optimizer("psi-lora", make_model(), normalize=None, momentum_balance="qr")


@pytest.mark.parametrize("name,hp", [
    ("psi-lora", {}),
    ("psi-lora", dict(inner_iters=0)),
    ("psi-lora", dict(foreach=False)),
    ("scaled-psi-lora", {}),
])
def test_a_gram_balanced_run_equals_an_svd_balanced_run(name, hp):
    """Ten float64 steps on a tiny PEFT model: the same parameters to 1e-10 and the same momentum product."""
    p_svd, m_svd = _ten_steps(name, hp, "svd")
    p_gram, m_gram = _ten_steps(name, hp, "gram")
    for n in p_svd:
        assert (p_svd[n] - p_gram[n]).abs().max().item() < 1e-10, n
    assert len(m_svd) > 0 and len(m_svd) == len(m_gram)
    for a, b in zip(m_svd, m_gram):
        assert (a - b).abs().max().item() < 1e-10 * max(a.abs().max().item(), 1.0)


def _ten_steps(name, hp, balance):
    """Parameters and per-layer momentum products after ten float64 steps of ``name`` with ``balance``."""
    model = make_model().to(F64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = loraopt.create_optimizer(name, model, lr=1e-2, momentum_balance=balance, **hp)
    for t in range(10):
        x, y = make_batch("mlp", seed=t)
        opt.zero_grad()
        loss_fn(model, x.to(F64), y).backward()
        opt.step()
    momentum = [opt.state[layer.B]["momentum_B"] @ opt.state[layer.A]["momentum_A"]
                for layer in find_lora_layers(model)]
    return params_snapshot(model), momentum


@pytest.mark.parametrize("name,hp", [("psi-lora", {}), ("psi-lora", dict(inner_iters=0)), ("scaled-psi-lora", {})])
def test_gram_balance_makes_no_more_dispatcher_calls_than_svd(name, hp):
    svd = _calls_per_step(name, dict(hp, momentum_balance="svd"), 2, 64)
    gram = _calls_per_step(name, dict(hp, momentum_balance="gram"), 2, 64)
    assert gram <= svd, (svd, gram)


# ------------------------------------------------------------------------------------------- "polar" (sync-free)

@pytest.mark.parametrize("case", list(_pairs()))
def test_polar_balance_keeps_the_product_and_balances_the_factors(case):
    """``balance_polar``: the product to rounding; equal Grams up to the floor shift; on the directions the SVD
    resolves (singular values above 1 % of the largest), the singular values of both factors equal the SVD
    path's ``sqrt(s)``."""
    from loraopt.functional.psi import balance_polar

    B, A = _pairs()[case]
    pB, pA = balance_polar(B, A)
    assert not torch.equal(pB, B)
    assert _rel(pB @ pA, B @ A) < 1e-13
    fro = torch.linalg.matrix_norm(B @ A).amax().item()
    assert (pB.mT @ pB - pA @ pA.mT).abs().max().item() <= 10 * 1e-4 * fro
    sB, sA = balance_svd(B, A)
    s = torch.linalg.svdvals(B @ A)[..., :K]
    resolved = s > 1e-2 * s[..., :1]
    for new, ref in ((pB, sB), (pA, sA)):
        got, want = torch.linalg.svdvals(new)[resolved], torch.linalg.svdvals(ref)[resolved]
        assert torch.allclose(got, want, rtol=2e-3), case


def test_polar_balance_leaves_zero_and_nonfinite_pairs_as_given():
    from loraopt.functional.psi import balance_polar

    g = torch.Generator().manual_seed(3)
    B, A = torch.randn(L, M, K, dtype=F64, generator=g), torch.randn(L, K, N, dtype=F64, generator=g)
    B_mixed = torch.cat([torch.zeros_like(B[:2]), B[2:]])
    out_B, out_A = balance_polar(B_mixed, A)
    assert torch.equal(out_B[:2], B_mixed[:2]) and torch.equal(out_A[:2], A[:2])
    assert not torch.equal(out_A[2:], A[2:])
    bad = B.clone()
    bad[1, 0, 0] = float("nan")
    out_B, out_A = balance_polar(bad, A)
    assert torch.equal(out_A[1], A[1]) and torch.isnan(out_B[1]).any()
    assert not torch.equal(out_A[0], A[0])


@pytest.mark.parametrize("name,hp", [
    ("psi-lora", {}),
    ("psi-lora", dict(inner_iters=0)),
    ("psi-lora", dict(foreach=False)),
    ("scaled-psi-lora", dict(normalize=None, max_grad_norm=1.0)),
])
def test_a_polar_balanced_run_follows_the_svd_balanced_run(name, hp):
    """Ten float64 steps: the PSI momentum step sees the balanced factors only through Grams and products, so a
    rotation of the balanced pair does not change the run; what remains is the floor (a shift of every direction
    by 1e-4 of the core's norm instead of a clamp of the small ones)."""
    p_svd, m_svd = _ten_steps(name, hp, "svd")
    p_polar, m_polar = _ten_steps(name, hp, "polar")
    for n in p_svd:
        scale = p_svd[n].abs().max().item()
        assert (p_svd[n] - p_polar[n]).abs().max().item() < 2e-5 * scale, n
    assert len(m_svd) > 0 and len(m_svd) == len(m_polar)
    for a, b in zip(m_svd, m_polar):
        assert (a - b).abs().max().item() < 5e-3 * a.abs().max().item()
