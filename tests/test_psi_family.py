"""The one functional PSI step and what it adds: balanced momentum, Proj. PSI-LoRA, the relative metric,
reference_compat, all-or-nothing steps and the step-time messages (specs/psi-lora.md §3, §3b, §4, §10, §11)."""

import warnings

import pytest
import torch

import loraopt
from loraopt.functional import spd_solve
from loraopt.functional.metrics import debias, metric_step
from loraopt.functional.psi import Gradient, PSIConfig, balance_norm, balance_svd, psi_step
from loraopt.lora import find_lora_layers
from toys import loss_fn, make_batch, make_model, one_lora_linear, params_snapshot

F64 = torch.float64


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------ balancing


@pytest.mark.parametrize("shape", [(1, 9, 3, 7), (4, 6, 2, 5)])
def test_balance_svd_keeps_the_product_and_balances_the_factors(shape):
    L, m, k, n = shape
    g = torch.Generator().manual_seed(0)
    B = torch.randn(L, m, k, dtype=F64, generator=g) * 100.0
    A = torch.randn(L, k, n, dtype=F64, generator=g) * 1e-3
    nB, nA = balance_svd(B, A, floor=0.0)
    assert _rel(nB @ nA, B @ A) < 1e-12
    # Balanced SVD form: B^T B = A A^T = diag(singular values of B A).
    s = torch.linalg.svdvals(B @ A)[..., :k]
    assert torch.allclose(nB.mT @ nB, torch.diag_embed(s), atol=1e-10 * s.max().item())
    assert torch.allclose(nA @ nA.mT, torch.diag_embed(s), atol=1e-10 * s.max().item())
    nB, nA = balance_norm(B, A)
    assert _rel(nB @ nA, B @ A) < 1e-12
    assert torch.allclose(nB.norm(dim=(-2, -1)), nA.norm(dim=(-2, -1)))


def test_balance_svd_floors_small_directions_and_leaves_zero_or_nonfinite_input():
    g = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(torch.randn(8, 2, dtype=F64, generator=g))[0]
    v = torch.linalg.qr(torch.randn(6, 2, dtype=F64, generator=g))[0]
    B, A = u * torch.tensor([1.0, 1e-9], dtype=F64), v.mT.clone()  # singular values 1 and 1e-9
    nB, nA = balance_svd(B[None], A[None], floor=1e-4)
    assert _rel(nB[0] @ nA[0], B @ A) < 1e-12
    # M_A keeps a well-conditioned row space (its small direction is not scaled to ~0).
    sv = torch.linalg.svdvals(nA[0])
    assert (sv[0] / sv[-1]).item() < 1e3
    zero_B = torch.zeros(1, 8, 2, dtype=F64)
    out_B, out_A = balance_svd(zero_B, A[None])
    assert torch.equal(out_B, zero_B) and torch.equal(out_A, A[None])
    bad = B.clone()[None]
    bad[0, 0, 0] = float("nan")
    out_B, out_A = balance_svd(bad, A[None])
    assert torch.equal(out_A, A[None]) and torch.isnan(out_B).any()


def test_svd_balanced_momentum_leaves_the_psi_trajectory_unchanged_in_exact_arithmetic():
    """Balancing only re-parametrises M = M_B M_A: with many ALS rounds (the projection depends on M, not on its
    factors) the weights follow the same path whichever balancing is used."""
    runs = {}
    for balance in ("svd", "norm", "none"):
        model = one_lora_linear(dtype=F64)
        opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, momentum=0.9, inner_iters=60, lmbd=1e-10,
                                       jitter=0.0, rank_mult=2.0, momentum_balance=balance)
        g = torch.Generator().manual_seed(0)
        target = torch.randn(10, 12, dtype=F64, generator=g)
        for _ in range(3):
            x = torch.randn(32, 12, dtype=F64, generator=g)
            opt.zero_grad()
            (model(x) - x @ target.T).square().mean().backward()
            opt.step()
        layer = find_lora_layers(model)[0]
        runs[balance] = layer.B.detach() @ layer.A.detach()
    assert _rel(runs["svd"], runs["none"]) < 1e-6
    assert _rel(runs["norm"], runs["none"]) < 1e-6


# ------------------------------------------------------------------------------------------------ Proj. PSI-LoRA


def _assert_same_training(*runs, steps=3):
    """Train each (model, optimizer) on the same batches; all end with the same parameters (to 1e-6)."""
    for t in range(steps):
        x, y = make_batch("mlp", seed=t)
        for model, opt in runs:
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
    first = params_snapshot(runs[0][0])
    for model, _ in runs[1:]:
        other = params_snapshot(model)
        for n in first:
            assert torch.allclose(first[n], other[n], atol=1e-6), n



@pytest.mark.parametrize("inner_iters", [0, 1, 2])
def test_proj_without_momentum_is_psi_without_momentum(inner_iters):
    a, b = make_model("mlp"), make_model("mlp")
    psi = loraopt.create_optimizer("psi-lora", a, normalize=None, lr=0.1, inner_iters=inner_iters, momentum=0.0)
    proj = loraopt.create_optimizer("proj-psi-lora", b, normalize=None, lr=0.1, inner_iters=inner_iters, momentum=0.0)
    _assert_same_training((a, psi), (b, proj))


def test_proj_jacobi_without_momentum_is_peft_riemannian_sgd():
    lr, lmbd, jitter = 0.05, 0.1, 1e-6
    a, b = make_model("mlp", lora_alpha=4), make_model("mlp", lora_alpha=4)
    proj = loraopt.create_optimizer("proj-psi-lora", a, normalize=None, lr=lr, inner_iters=0, lmbd=lmbd, jitter=jitter, momentum=0.0,
                                    max_grad_norm=0.0, other_optimizer="sgd")
    rp = loraopt.create_optimizer("riemannian-sgd", b, lr=lr, reg=lr * lmbd + jitter)
    _assert_same_training((a, proj), (b, rp))


def test_proj_two_steps_equal_a_dense_hand_computation():
    """specs/psi-lora.md §3b steps 1-4 in float64 at K = 0, including the transport of the first buffer."""
    lr, mu, lmbd = 0.1, 0.5, 0.1
    lam = lr * lmbd
    model = one_lora_linear(dtype=F64)
    layer = find_lora_layers(model)[0]
    opt = loraopt.create_optimizer("proj-psi-lora", model, normalize=None, lr=lr, inner_iters=0, lmbd=lmbd, jitter=0.0, momentum=mu,
                                   max_grad_norm=0.0)
    base = model.base_model.model[0].base_layer
    W0, bias = base.weight.detach().clone(), base.bias.detach().clone()
    g = torch.Generator().manual_seed(0)
    target = torch.randn(10, 12, dtype=F64, generator=g)
    batches = [torch.randn(16, 12, dtype=F64, generator=g) for _ in range(2)]
    eye = torch.eye(4, dtype=F64)

    def grad_at(A, B, x):
        dW = (B @ A).requires_grad_(True)
        ((x @ (W0 + dW).T + bias) - x @ target.T).square().mean().backward()
        return dW.grad

    def jacobi(A, B, G):
        return (A - lr * torch.linalg.solve(B.T @ B + lam * eye, B.T @ G),
                B - lr * G @ A.T @ torch.linalg.inv(A @ A.T + lam * eye))

    def precondition(A, B, G):
        QA = torch.linalg.solve(B.T @ B + lam * eye, B.T)  # (r, d_out)
        QB = A.T @ torch.linalg.inv(A @ A.T + lam * eye)  # (d_in, r)
        return QA, QB, QA @ G, G @ QB

    A, B = layer.A.detach().clone(), layer.B.detach().clone()
    # step 1: no momentum to apply; the buffer starts as the preconditioned gradient at the new factors
    G1 = grad_at(A, B, batches[0])
    A1, B1 = jacobi(A, B, G1)
    _, _, gA1, gB1 = precondition(A1, B1, G1)
    # step 2: LoRSum, then transport the step-1 buffer to the new factors and apply it
    G2 = grad_at(A1, B1, batches[1])
    A2, B2 = jacobi(A1, B1, G2)
    QA, QB, _, _ = precondition(A2, B2, G2)
    TA, TB = QA @ B1 @ gA1, gB1 @ A1 @ QB
    expected_A, expected_B = A2 - lr * mu * TA, B2 - lr * mu * TB

    for x in batches:
        opt.zero_grad()
        (model(x) - x @ target.T).square().mean().backward()
        opt.step()
    assert _rel(layer.A.detach(), expected_A) < 1e-10
    assert _rel(layer.B.detach(), expected_B) < 1e-10
    st_a, st_b = opt.state[layer.A], opt.state[layer.B]
    _, _, gA2, gB2 = precondition(A2, B2, G2)
    assert _rel(st_a["momentum_buffer"], mu * TA + gA2) < 1e-10
    assert _rel(st_b["momentum_buffer"], mu * TB + gB2) < 1e-10
    assert _rel(st_a["previous_factor"], A2) < 1e-10 and _rel(st_b["previous_factor"], B2) < 1e-10


def test_proj_refuses_streaming_capture():
    with pytest.raises(ValueError, match="capture='rows'"):
        loraopt.create_optimizer("proj-psi-lora", make_model("mlp"), normalize=None, lr=0.1, inner_iters=0, capture="stream")


# ------------------------------------------------------------------------------------------------ reference_compat


def test_reference_compat_is_a_no_op_only_where_the_reference_is():
    """At K = 0 the reference's unscaled LoRSum returns its input: PSI-LoRA does not move its factors.  At K >= 1
    reference_compat changes nothing."""
    model = make_model("mlp")
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=0, momentum=0.9, reference_compat=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    for t in range(2):
        opt.zero_grad()
        loss_fn(model, *make_batch("mlp", seed=t)).backward()
        opt.step()
    for n, p in model.named_parameters():
        if n in before:  # unchanged up to the rounding of sqrt(s) A / sqrt(s)
            assert torch.allclose(p.detach(), before[n], rtol=1e-6, atol=0), n
    runs = []
    for compat in (True, False):
        model = make_model("mlp")
        opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=1, momentum=0.9,
                                       reference_compat=compat)
        for t in range(3):
            opt.zero_grad()
            loss_fn(model, *make_batch("mlp", seed=t)).backward()
            opt.step()
        runs.append(params_snapshot(model))
    for n in runs[0]:
        assert torch.equal(runs[0][n], runs[1][n]), n


# ------------------------------------------------------------------------------------------------ metric


def test_relative_metric_has_unit_mean_and_ignores_the_statistics_scale():
    g = torch.Generator().manual_seed(0)
    v_in, v_out = torch.zeros(3, 7), torch.zeros(3, 5)  # a bias-corrected EMA starts at zero
    s_in, s_out = torch.rand(3, 7, generator=g), torch.rand(3, 5, generator=g) * 1e-6
    kw = dict(beta2=0.9, damping=1e-2, power=0.5, step=1, bias_correction=True, relative=True)
    _, _, p_in, p_out = metric_step(v_in, v_out, s_in, s_out, **kw)
    assert torch.allclose(p_in.mean(-1), torch.ones(3)) and torch.allclose(p_out.mean(-1), torch.ones(3))
    # Bias-corrected at step 1 the metric is this step's statistic alone, so a rescaled statistic gives the same P.
    _, _, q_in, q_out = metric_step(v_in, v_out, s_in * 1e3, s_out * 1e3, **kw)
    assert torch.allclose(p_in, q_in, rtol=1e-4) and torch.allclose(p_out, q_out, rtol=1e-4)


def test_debiased_ema_is_the_weighted_average_of_the_statistics():
    beta2, stats = 0.9, [torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([1.0])]
    v = torch.zeros(1, dtype=F64)
    weighted, norm = 0.0, 0.0
    for t, stat in enumerate(stats, start=1):
        v = v * beta2 + stat.double() * (1 - beta2)
        weighted = weighted * beta2 + stat.double() * (1 - beta2)
        norm = norm * beta2 + (1 - beta2)
        assert torch.allclose(debias(v, beta2, t), weighted / norm)


# ------------------------------------------------------------------------------------------------ solves


def test_escalated_solve_keeps_an_anchor_that_solves_the_system():
    gram = torch.zeros(3, 3)
    anchor = torch.randn(3, 2)
    x, failed = spd_solve(gram, gram @ anchor, jitter=0.0, anchor=anchor)
    assert failed.item() == 1 and torch.allclose(x, anchor, atol=1e-6)


def test_spd_solve_escalates_the_jitter_on_an_ill_conditioned_gram():
    """A Gram matrix that is PSD in exact arithmetic but fails Cholesky in fp32 gets the solution of a slightly more
    damped system (finite, flagged), not an LU solve of a singular matrix."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, 2, generator=g)
    gram = v @ v.T  # rank 2 in R^{4x4}
    gram[3, 3] -= 1e-3  # rounding-sized indefiniteness
    rhs = torch.randn(4, 1, generator=g)
    x, failed = spd_solve(gram, rhs, jitter=0.0)
    assert failed.item() == 1 and torch.isfinite(x).all()
    scale = gram.diagonal().abs().mean()
    damped = gram + (1e-4 * scale + torch.finfo(torch.float32).tiny ** 0.5) * torch.eye(4)
    if torch.linalg.cholesky_ex(damped)[1] == 0:
        assert torch.allclose(damped @ x, rhs, atol=1e-3)


# ------------------------------------------------------------------------------------------------ functional


def test_functional_step_keeps_the_inputs_of_a_failed_layer():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 3, 6, generator=g), torch.randn(2, 5, 3, generator=g)
    G = torch.randn(2, 5, 6, generator=g)
    G[1, 0, 0] = float("nan")
    M = (torch.zeros(2, 5, 3), torch.randn(2, 3, 6, generator=g))
    out = psi_step(A, B, Gradient(G, None), lr=0.1, grad_coef=1.0, momentum_coef=0.9, lam=0.01, lam_momentum=0.01,
                   momentum=M, config=PSIConfig(iters=1))
    assert out.ok.tolist() == [True, False]
    assert torch.equal(out.A[1], A[1]) and torch.equal(out.B[1], B[1]) and torch.equal(out.momentum[1][1], M[1][1])
    assert not torch.equal(out.A[0], A[0])


# ------------------------------------------------------------------------------------------------ steps


def test_a_nan_head_gradient_leaves_the_lora_factors_unchanged_and_is_counted():
    model = make_model("mlp")
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, momentum=0.9)
    x, y = make_batch("mlp")
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    opt.step()
    before = params_snapshot(model)
    opt.zero_grad()
    loss_fn(model, x, y).backward()
    model.base_model.model.head.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert opt.skipped_steps == 1


def test_a_nan_lr_is_a_counted_skip():
    model = make_model("mlp")
    opt = loraopt.create_optimizer("scaled-psi-lora", model, lr=0.1)
    before = params_snapshot(model)
    opt.param_groups[0]["lr"] = float("nan")
    loss_fn(model, *make_batch("mlp")).backward()
    with pytest.warns(RuntimeWarning, match="lr"):
        opt.step()
    assert opt.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_clipping_the_factor_grads_after_backward_is_named_once():
    model = make_model("mlp")
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1)
    loss_fn(model, *make_batch("mlp")).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with pytest.warns(UserWarning, match="max_grad_norm"):
        opt.step()


def test_an_untouched_backward_gives_no_grad_edit_warning():
    model = make_model("mlp")
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=0)
    loss_fn(model, *make_batch("mlp")).backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_step_messages_name_the_cause():
    model = make_model("mlp")
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1)
    x, y = make_batch("mlp")
    loss_fn(model, x, y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="called again"):
        opt.step()
    opt.zero_grad()
    empty = model(x[:0])
    empty.sum().backward()
    with pytest.raises(RuntimeError, match="empty batch"):
        opt.step()


def test_lora_factors_added_later_are_refused():
    model = make_model("mlp")
    factors = [p for n, p in model.named_parameters() if "fc2.lora_" in n]
    for p in factors:
        p.requires_grad_(False)
    opt = loraopt.create_optimizer("proj-psi-lora", model, normalize=None, lr=0.1)
    with pytest.raises(ValueError, match="add_param_group"):
        opt.add_param_group({"params": factors})


def test_accumulated_streaming_clip_is_named():
    model = make_model("mlp")
    # K = 0 streaming with clipping (the plain step's)
    opt = loraopt.create_optimizer("scaled-psi-lora", model, lr=0.1, normalize=None, max_grad_norm=1.0)
    x, y = make_batch("mlp")
    for xm, ym in zip(x.chunk(2), y.chunk(2)):
        (loss_fn(model, xm, ym) / 2).backward()
    with pytest.warns(UserWarning, match="capture='rows'"):
        opt.step()


def test_exact_clipping_under_accumulation_with_rows_capture():
    """capture='rows' clips with the norm of the accumulated gradient: 5 + 3 rows == one batch of 8."""
    models = [make_model("mlp"), make_model("mlp")]
    opts = [loraopt.create_optimizer("scaled-psi-lora", m, lr=0.1, max_grad_norm=1e-3, capture="rows")
            for m in models]
    x, y = make_batch("mlp", n=8)
    opts[0].zero_grad()
    loss_fn(models[0], x, y).backward()
    opts[0].step()
    opts[1].zero_grad()
    for sl in (slice(0, 5), slice(5, 8)):
        (torch.nn.functional.cross_entropy(models[1](x[sl]), y[sl], reduction="sum") / 8).backward()
    opts[1].step()
    pa, pb = params_snapshot(models[0]), params_snapshot(models[1])
    for n in pa:
        assert torch.allclose(pa[n], pb[n], atol=1e-6), n


def test_solve_fallbacks_are_counted_and_warned():
    """Rank-deficient factors with no proximal weight make the r x r Gram singular: the escalated-jitter solve takes
    over, the step goes through, and the optimizer says so."""
    model = make_model("mlp")
    with torch.no_grad():
        for layer in find_lora_layers(model):
            layer.B.zero_()  # B^T B = 0: singular without lmbd / jitter
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, lmbd=0.0, jitter=0.0, inner_iters=1)
    before = {layer.a_name: layer.A.detach().clone() for layer in opt.layers}
    loss_fn(model, *make_batch("mlp")).backward()
    with pytest.warns(RuntimeWarning, match="raised jitter"):
        opt.step()
    assert sum(int(opt.state[layer.A]["solve_fallbacks"]) for layer in opt.layers) > 0
    assert opt.skipped_steps == 0
    for layer in opt.layers:
        # The extra damping pulls towards the anchor, as the proximal term does: A (its half-step has B = 0 and
        # nothing to fit) stays where it was instead of collapsing to zero; B takes the step.
        assert torch.allclose(layer.A, before[layer.a_name], rtol=1e-4, atol=1e-6)
        assert torch.isfinite(layer.B).all() and layer.B.abs().sum() > 0
