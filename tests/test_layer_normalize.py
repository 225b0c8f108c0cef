"""The PSI family's step normalisations: normalize="layer" divides each layer's G by its RMS entry (a per-layer second
moment); normalize="factored" divides each entry by the root of Adafactor's rank-one second-moment estimate;
normalize="full" by the root of its own second moment (Adam's, on the full weight)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loraopt
from loraopt.functional import metrics
from loraopt.functional.metrics import (factored_step_scales, full_step_scale, grad_row_col_sq, layer_grad_sq_norms,
                                        layer_step_scale)
from loraopt.functional.psi import Gradient, PSIConfig, psi_step
from loraopt.optim.psi_step import FACTORED_EPS, NORMALIZE_EPS
from toys import loss_fn, make_batch, make_model, one_lora_linear, params_snapshot

F64 = torch.float64


@pytest.mark.parametrize("n", [3, 40])  # 3 rows: the Gram route; 40 rows: G formed (cheaper there)
def test_layer_grad_sq_norms_equal_the_dense_gradients_norms(n):
    g = torch.Generator().manual_seed(0)
    S, X = torch.randn(2, n, 7, generator=g, dtype=F64), torch.randn(2, n, 5, generator=g, dtype=F64)
    G = S.mT @ X
    want = G.square().sum(dim=(-2, -1))
    torch.testing.assert_close(layer_grad_sq_norms(S.mT, X), want, rtol=1e-12, atol=0)
    torch.testing.assert_close(layer_grad_sq_norms(G, None), want, rtol=1e-12, atol=0)


def test_layer_step_scale_is_the_bias_corrected_rms_of_the_gradient_entries():
    beta2, numel = 0.9, 6
    sq = [torch.tensor([4.0, 0.25], dtype=F64), torch.tensor([1.0, 9.0], dtype=F64), torch.tensor([16.0, 1.0], dtype=F64)]
    avg = torch.zeros(2, dtype=F64)
    for t, s in enumerate(sq, start=1):
        scale, avg = layer_step_scale(avg, s, numel=numel, beta2=beta2, step=t, eps=0.0)
        weights = [(1 - beta2) * beta2 ** (t - 1 - i) for i in range(t)]
        mean_sq = sum(w * q for w, q in zip(weights, sq[:t])) / sum(weights) / numel
        torch.testing.assert_close(scale, mean_sq.rsqrt(), rtol=1e-12, atol=0)
    # A layer whose gradient is exactly zero takes no step (eps keeps the scale finite).
    scale, _ = layer_step_scale(torch.zeros(1), torch.zeros(1), numel=3, beta2=0.99, step=1, eps=1e-12)
    assert torch.isfinite(scale).all() and (scale * 0 == 0).all()


def _step_returning_full_weight_gradient(model, opt, g):
    """One optimizer step of the one-layer toy on a fresh random batch; returns dL/dW0, the full-weight gradient
    ``G`` the PSI step uses (the frozen base weight's gradient, taken for the test)."""
    base = model.base_model.model[0].base_layer.weight
    x, y = torch.randn(8, 6, generator=g, dtype=F64), torch.randn(8, 5, generator=g, dtype=F64)
    base.requires_grad_(True)
    opt.zero_grad()
    base.grad = None
    nn.functional.mse_loss(model(x), y).backward()
    G = base.grad.detach().clone()
    base.requires_grad_(False)
    opt.step()
    return G


def test_two_normalized_steps_equal_the_functional_step_with_a_hand_computed_layer_scale():
    """The optimizer divides G by its running RMS entry (bias-corrected EMA from zero) and nothing else changes."""
    lr, lmbd, beta2 = 0.05, 0.1, 0.9
    model = one_lora_linear(r=3, d_in=6, d_out=5, dtype=F64)
    opt = loraopt.create_optimizer("psi-lora", model, lr=lr, lmbd=lmbd, momentum=0.0, max_grad_norm=0.0,
                                   inner_iters=1, normalize="layer", normalize_beta2=beta2)
    (A,) = [p for n, p in model.named_parameters() if "lora_A" in n]
    (B,) = [p for n, p in model.named_parameters() if "lora_B" in n]
    A_ref, B_ref, avg = A.detach().clone(), B.detach().clone(), torch.zeros(1, dtype=F64)
    g = torch.Generator().manual_seed(3)
    for t in (1, 2):
        G = _step_returning_full_weight_gradient(model, opt, g)
        scale, avg = layer_step_scale(avg, G.square().sum().view(1), numel=G.numel(), beta2=beta2, step=t,
                                      eps=NORMALIZE_EPS)
        ref = psi_step(A_ref[None], B_ref[None], Gradient(G[None], None), lr=lr, grad_coef=scale.view(-1, 1, 1),
                       momentum_coef=0.0, lam=lr * lmbd, lam_momentum=lr * lmbd, config=PSIConfig(iters=1))
        A_ref, B_ref = ref.A[0], ref.B[0]
        torch.testing.assert_close(A.detach(), A_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(B.detach(), B_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(opt.state[A]["grad_sq_avg"].view(1), avg, rtol=1e-12, atol=0)


def _train(name, loss_scale, steps=3, **kw):
    model = make_model("mlp")
    if name != "scaled-psi-lora":  # Scaled PSI-LoRA's other parameters always take Adam
        kw["other_optimizer"] = "adam"
    opt = loraopt.create_optimizer(name, model, max_grad_norm=0.0, **kw)
    for t in range(steps):
        x, y = make_batch("mlp", seed=t)
        opt.zero_grad()
        (loss_fn(model, x, y) * loss_scale).backward()
        opt.step()
    return {n: p for n, p in params_snapshot(model).items() if "lora_" in n}


@pytest.mark.parametrize("name", ["psi-lora", "proj-psi-lora"])
def test_the_normalized_step_does_not_depend_on_the_loss_scale(name):
    kw = dict(lr=0.01, inner_iters=1, momentum=0.9)
    one, big = _train(name, 1.0, normalize="layer", **kw), _train(name, 1000.0, normalize="layer", **kw)
    for n in one:
        torch.testing.assert_close(big[n], one[n], rtol=1e-5, atol=1e-6)
    # Without the normalisation the same runs differ: the check above can fail.
    plain_one, plain_big = _train(name, 1.0, normalize=None, **kw), _train(name, 1000.0, normalize=None, **kw)
    assert any(not torch.allclose(plain_one[n], plain_big[n], rtol=1e-3, atol=1e-4) for n in plain_one)


def test_scaled_psi_lora_takes_the_layer_normalisation_too():
    kw = dict(lr=1e-3, inner_iters=1)
    one, big = (_train("scaled-psi-lora", s, normalize="layer", other_lr=1e-2, **kw) for s in (1.0, 1000.0))
    for n in one:
        torch.testing.assert_close(big[n], one[n], rtol=1e-4, atol=1e-6)


def test_streaming_capture_and_unknown_modes_are_refused_with_what_to_do():
    for mode in ("layer", "factored", "full"):
        with pytest.raises(ValueError, match="normalize=None only"):
            loraopt.create_optimizer("psi-lora", make_model("mlp"), inner_iters=0, normalize=mode, capture="stream")
    with pytest.raises(ValueError, match="normalize must be None, 'layer', 'factored' or 'full'"):
        loraopt.create_optimizer("psi-lora", make_model("mlp"), normalize="row")
    with pytest.raises(ValueError, match="normalize_beta2"):
        loraopt.create_optimizer("psi-lora", make_model("mlp"), normalize="layer", normalize_beta2=1.0)
    # K = 0 with capture="auto" keeps rows (the norm needs them) and steps.
    model = make_model("mlp")
    opt = loraopt.create_optimizer("psi-lora", model, inner_iters=0, normalize="layer")
    before = params_snapshot(model)
    x, y = make_batch("mlp")
    loss_fn(model, x, y).backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in params_snapshot(model).items() if "lora_A" in n)


@pytest.mark.parametrize("mode", ["layer", "factored", "full"])
@pytest.mark.parametrize("name", ["psi-lora", "proj-psi-lora", "scaled-psi-lora"])
def test_the_batched_step_equals_the_per_layer_reference_with_normalisation(name, mode):
    runs = []
    for foreach in (True, False):
        torch.manual_seed(0)
        model = make_model("mlp").to(F64)
        opt = loraopt.create_optimizer(name, model, lr=1e-3, inner_iters=1, normalize=mode, max_grad_norm=0.0,
                                       foreach=foreach)
        for t in range(3):
            x, y = make_batch("mlp", seed=t)
            opt.zero_grad()
            loss_fn(model, x.to(F64), y).backward()
            opt.step()
        runs.append(params_snapshot(model))
    for n in runs[0]:
        torch.testing.assert_close(runs[1][n], runs[0][n], rtol=1e-10, atol=1e-12)


def test_normalized_settings_are_the_measured_quality_method_and_build():
    """PSI_NORMALIZED_SETTINGS is what the suites measured as psi-lora-norm / proj-psi-lora-norm at its lr, and the
    factories take it (a step moves the factors)."""
    from loraopt.optim.psi import PSI_NORMALIZED_SETTINGS
    from loraopt_bench.quality import METHODS

    for key in ("psi-lora-norm", "proj-psi-lora-norm"):
        method = METHODS[key]
        assert {k: PSI_NORMALIZED_SETTINGS[k] for k in method.hp} == dict(method.hp)
        assert PSI_NORMALIZED_SETTINGS["lr"] in method.lrs
    model = make_model("mlp")
    opt = loraopt.create_optimizer("proj-psi-lora", model, **PSI_NORMALIZED_SETTINGS)
    assert opt.param_groups[0]["normalize"] == "layer" and opt.param_groups[0]["max_grad_norm"] == 0.0
    before = params_snapshot(model)
    x, y = make_batch("mlp")
    loss_fn(model, x, y).backward()
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------------------------------------- normalize="factored"


@pytest.mark.parametrize("block", [None, 20])  # None: G in one block; 20 elements: two rows per block here
@pytest.mark.parametrize("n", [3, 40])
def test_grad_row_col_sq_are_the_mean_squares_of_the_dense_gradients_rows_and_columns(n, block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(metrics, "_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(1)
    S, X = torch.randn(2, n, 7, generator=g, dtype=F64), torch.randn(2, n, 5, generator=g, dtype=F64)
    G = S.mT @ X
    for left, right in ((S.mT, X), (G, None)):
        rows, cols = grad_row_col_sq(left, right)
        torch.testing.assert_close(rows, (G * G).mean(dim=2), rtol=1e-12, atol=0)
        torch.testing.assert_close(cols, (G * G).mean(dim=1), rtol=1e-12, atol=0)


def test_factored_scales_are_exact_on_a_rank_one_second_moment():
    """G = diag(a) Z diag(b) with |Z| = 1: the second moments a_i^2 b_j^2 form a rank-one matrix, which the factored
    estimate recovers exactly, so the scaled gradient is Z (entries of RMS one) at the first (bias-corrected) step."""
    g = torch.Generator().manual_seed(2)
    a, b = torch.rand(2, 6, generator=g, dtype=F64) * 3 + 0.1, torch.rand(2, 4, generator=g, dtype=F64) * 0.01 + 1e-3
    Z = torch.randint(0, 2, (2, 6, 4), generator=g).to(F64) * 2 - 1
    G = a[..., :, None] * Z * b[..., None, :]
    rows, cols = grad_row_col_sq(G, None)
    s_out, s_in, _, _ = factored_step_scales(torch.zeros(2, 6, dtype=F64), torch.zeros(2, 4, dtype=F64), rows, cols,
                                             beta2=0.999, step=1, eps=0.0)
    torch.testing.assert_close(s_out[..., :, None] * G * s_in[..., None, :], Z, rtol=1e-12, atol=1e-12)


def test_factored_scales_divide_each_entry_by_the_root_of_the_bias_corrected_rank_one_estimate():
    beta2, g = 0.9, torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 3, generator=g, dtype=F64) * (t + 1) for t in range(3)]
    row_avg, col_avg = torch.zeros(1, 5, dtype=F64), torch.zeros(1, 3, dtype=F64)
    for t, G in enumerate(grads, start=1):
        rows, cols = grad_row_col_sq(G[None], None)
        s_out, s_in, row_avg, col_avg = factored_step_scales(row_avg, col_avg, rows, cols, beta2=beta2, step=t,
                                                             eps=0.0)
        weights = torch.tensor([(1 - beta2) * beta2 ** (t - 1 - i) for i in range(t)], dtype=F64)
        r = sum(w * (Gi * Gi).mean(dim=1) for w, Gi in zip(weights, grads)) / weights.sum()
        c = sum(w * (Gi * Gi).mean(dim=0) for w, Gi in zip(weights, grads)) / weights.sum()
        V = r[:, None] * c[None, :] / r.mean()
        torch.testing.assert_close((s_out[0][:, None] * G * s_in[0][None, :]), G / V.sqrt(), rtol=1e-12, atol=0)
    # A gradient that is exactly zero gives finite scales and no step.
    s_out, s_in, _, _ = factored_step_scales(torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1, 2),
                                             torch.zeros(1, 3), beta2=0.99, step=1, eps=FACTORED_EPS)
    assert torch.isfinite(s_out).all() and torch.isfinite(s_in).all() and (s_in == 0).all()


@pytest.mark.parametrize("mode", ["factored", "full"])
@pytest.mark.parametrize("name", ["psi-lora", "proj-psi-lora"])
def test_two_normalised_steps_equal_the_functional_step_on_the_hand_scaled_gradient(name, mode):
    """The optimizer replaces G by its hand-scaled form and nothing else: factored, s_out G s_in (bias-corrected row
    / column EMAs from zero); full, G / sqrt(V) (bias-corrected EMA of G * G from zero)."""
    lr, lmbd, beta2 = 0.05, 0.1, 0.9
    mu = 0.0 if name == "psi-lora" else 0.5  # Proj.'s factor-space momentum starts at zero: a known state
    model = one_lora_linear(r=3, d_in=6, d_out=5, dtype=F64)
    opt = loraopt.create_optimizer(name, model, lr=lr, lmbd=lmbd, momentum=mu, max_grad_norm=0.0, inner_iters=1,
                                   normalize=mode, normalize_beta2=beta2)
    (A,) = [p for n, p in model.named_parameters() if "lora_A" in n]
    (B,) = [p for n, p in model.named_parameters() if "lora_B" in n]
    A_ref, B_ref = A.detach().clone(), B.detach().clone()
    avg = {"row": torch.zeros(1, 5, dtype=F64), "col": torch.zeros(1, 6, dtype=F64),
           "entry": torch.zeros(1, 5, 6, dtype=F64)}
    variant = "psi" if name == "psi-lora" else "proj"
    momentum = None if mu == 0 else tuple(torch.zeros_like(t)[None] for t in (A_ref, B_ref, A_ref, B_ref))
    g = torch.Generator().manual_seed(4)
    for t in (1, 2):
        G = _step_returning_full_weight_gradient(model, opt, g)
        if mode == "factored":
            rows, cols = grad_row_col_sq(G[None], None)
            s_out, s_in, avg["row"], avg["col"] = factored_step_scales(avg["row"], avg["col"], rows, cols,
                                                                       beta2=beta2, step=t, eps=FACTORED_EPS)
            scaled = s_out[..., :, None] * G[None] * s_in[..., None, :]
        else:
            scale, avg["entry"] = full_step_scale(avg["entry"], (G * G)[None], beta2=beta2, step=t, eps=FACTORED_EPS)
            scaled = G[None] * scale
        ref = psi_step(A_ref[None], B_ref[None], Gradient(scaled, None), lr=lr, grad_coef=1.0, momentum_coef=mu,
                       lam=lr * lmbd, lam_momentum=lr * lmbd, momentum=momentum, config=PSIConfig(variant=variant, iters=1))
        A_ref, B_ref, momentum = ref.A[0], ref.B[0], ref.momentum
        torch.testing.assert_close(A.detach(), A_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(B.detach(), B_ref, rtol=1e-9, atol=1e-12)
    if mode == "factored":
        torch.testing.assert_close(opt.state[B]["grad_row_sq_avg"][None], avg["row"], rtol=1e-12, atol=0)
        torch.testing.assert_close(opt.state[A]["grad_col_sq_avg"][None], avg["col"], rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(opt.state[A]["grad_entry_sq_avg"][None], avg["entry"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["factored", "full"])
@pytest.mark.parametrize("name", ["psi-lora", "proj-psi-lora", "scaled-psi-lora"])
def test_the_factored_and_full_steps_do_not_depend_on_the_loss_scale(name, mode):
    kw = dict(lr=1e-3, inner_iters=1)
    if name == "scaled-psi-lora":
        kw["other_lr"] = 1e-2
    one, big = _train(name, 1.0, normalize=mode, **kw), _train(name, 1000.0, normalize=mode, **kw)
    for n in one:
        torch.testing.assert_close(big[n], one[n], rtol=1e-4, atol=1e-6)


def test_the_defaults_are_the_factored_step_and_the_plain_settings_restore_the_papers_step():
    """The factories default to normalize="factored" at 3e-5 without clipping (the suites' *-fact keys measured
    that); PSI_PLAIN_SETTINGS is the plain step the quality keys psi-lora / proj-psi-lora pin (at its lr)."""
    from loraopt.optim.psi import PSI_PLAIN_SETTINGS
    from loraopt_bench.quality import LIBRARY_DEFAULT_METHODS, METHODS

    for name in ("psi-lora", "proj-psi-lora"):
        group = loraopt.create_optimizer(name, make_model("mlp")).param_groups[0]
        assert (group["normalize"], group["lr"], group["max_grad_norm"]) == ("factored", 3e-5, 0.0)
        assert {k: group[k] for k in METHODS[f"{name}-fact"].hp} == dict(METHODS[f"{name}-fact"].hp)
        plain = loraopt.create_optimizer(name, make_model("mlp"), **PSI_PLAIN_SETTINGS).param_groups[0]
        pinned = {m.key: m for m in LIBRARY_DEFAULT_METHODS}[name]
        assert {k: plain[k] for k in pinned.hp} == dict(pinned.hp)
        assert plain["lr"] == PSI_PLAIN_SETTINGS["lr"] and PSI_PLAIN_SETTINGS["lr"] in pinned.lrs


def test_scaled_defaults_are_the_factored_step_and_the_plain_settings_restore_the_earlier_defaults():
    """Scaled PSI-LoRA defaults to normalize="factored" at 3e-4 without clipping (the suites' scaled-psi-lora-fact
    key measured that, notes/psi.md §12); SCALED_PLAIN_SETTINGS gives back the plain step at 0.3 that the keys
    scaled-psi-lora / scaled-psi-lora-default pin, on top of the same metric settings."""
    from loraopt.optim.psi import SCALED_PLAIN_SETTINGS
    from loraopt_bench.quality import LIBRARY_DEFAULT_METHODS, METHODS

    group = loraopt.create_optimizer("scaled-psi-lora", make_model("mlp")).param_groups[0]
    assert (group["normalize"], group["lr"], group["max_grad_norm"]) == ("factored", 3e-4, 0.0)
    assert (group["metric_scale"], group["bias_correction"], group["damping"]) == ("relative", True, 1e-2)
    assert {k: group[k] for k in METHODS["scaled-psi-lora-fact"].hp} == dict(METHODS["scaled-psi-lora-fact"].hp)
    plain = loraopt.create_optimizer("scaled-psi-lora", make_model("mlp"), **SCALED_PLAIN_SETTINGS).param_groups[0]
    assert (plain["normalize"], plain["lr"], plain["max_grad_norm"]) == (None, 0.3, 1.0)
    assert (plain["metric_scale"], plain["bias_correction"], plain["damping"]) == ("relative", True, 1e-2)
    for pinned in ({m.key: m for m in LIBRARY_DEFAULT_METHODS}["scaled-psi-lora"], METHODS["scaled-psi-lora-default"]):
        assert {k: plain[k] for k in pinned.hp} == dict(pinned.hp)
        assert SCALED_PLAIN_SETTINGS["lr"] in pinned.lrs


# ------------------------------------------------------------------------------------- normalize="full"


def test_full_scale_divides_each_entry_by_the_root_of_its_bias_corrected_second_moment():
    beta2, g = 0.9, torch.Generator().manual_seed(5)
    grads = [torch.randn(4, 3, generator=g, dtype=F64) * (t + 1) for t in range(3)]
    avg = torch.zeros(1, 4, 3, dtype=F64)
    for t, G in enumerate(grads, start=1):
        scale, avg = full_step_scale(avg, (G * G)[None], beta2=beta2, step=t, eps=0.0)
        weights = torch.tensor([(1 - beta2) * beta2 ** (t - 1 - i) for i in range(t)], dtype=F64)
        V = sum(w * Gi * Gi for w, Gi in zip(weights, grads)) / weights.sum()
        torch.testing.assert_close(G * scale[0], G / V.sqrt(), rtol=1e-12, atol=0)
    # On a rank-one second moment the factored estimate is the same scaling.
    G = torch.outer(torch.tensor([1.0, 2.0, 0.5], dtype=F64), torch.tensor([3.0, 1.0], dtype=F64))[None]
    full, _ = full_step_scale(torch.zeros_like(G), G * G, beta2=0.9, step=1, eps=0.0)
    rows, cols = grad_row_col_sq(G, None)
    s_out, s_in, _, _ = factored_step_scales(torch.zeros_like(rows), torch.zeros_like(cols), rows, cols, beta2=0.9,
                                             step=1, eps=0.0)
    torch.testing.assert_close(G * full, s_out[..., :, None] * G * s_in[..., None, :], rtol=1e-12, atol=0)
    # A gradient that is exactly zero gives a finite scale and no step.
    scale, _ = full_step_scale(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), beta2=0.99, step=1, eps=FACTORED_EPS)
    assert torch.isfinite(scale).all()


def test_moment_probe_rank_one_estimate_is_what_the_factored_step_uses_on_the_same_gradients():
    """``loraopt_bench.moment_probe`` builds Adafactor's estimate from the full EMA ``V``: by linearity its row and
    column means are the factored step's EMAs over the same gradients, so the estimate is the one the factored step
    divides by (checked against ``factored_step_scales``), and exact where ``V`` has rank one."""
    from loraopt_bench.moment_probe import compare_moments, rank_one_estimate

    beta2, g = 0.95, torch.Generator().manual_seed(5)
    full = torch.zeros(1, 6, 4, dtype=F64)
    rows, cols = torch.zeros(1, 6, dtype=F64), torch.zeros(1, 4, dtype=F64)
    for t in range(1, 5):
        G = torch.randn(1, 6, 4, generator=g, dtype=F64) * torch.arange(1, 7, dtype=F64)[None, :, None]
        _, full = full_step_scale(full, G * G, beta2=beta2, step=t, eps=0.0)
        r_sq, c_sq = grad_row_col_sq(G, None)
        s_out, s_in, rows, cols = factored_step_scales(rows, cols, r_sq, c_sq, beta2=beta2, step=t, eps=0.0)
    V = full[0] / (1 - beta2 ** 4)  # bias-corrected, as both steps use it
    estimate = rank_one_estimate(V)
    torch.testing.assert_close(estimate, 1.0 / (s_out[0][:, None] * s_in[0][None, :]).square(), rtol=1e-10, atol=0)
    # Not rank one here: the estimate is off, and the probe says by how much.
    report = compare_moments(V)
    assert report["rel_error"] > 0.05
    assert report["weight_quantiles"]["0.01"] < 1.0 < report["weight_quantiles"]["0.99"]
    # Rank one: exact, every weight 1.
    exact = compare_moments(torch.outer(torch.rand(6, dtype=F64) + 0.1, torch.rand(4, dtype=F64) + 0.1))
    assert exact["rel_error"] < 1e-12
    assert all(abs(q - 1.0) < 1e-10 for q in exact["weight_quantiles"].values())


def test_moment_probe_reports_every_adapted_module_of_a_full_second_moment_run_and_refuses_other_runs():
    from loraopt_bench.moment_probe import probe

    for normalize in ("full", "factored"):
        model = make_model("mlp")
        opt = loraopt.create_optimizer("proj-psi-lora", model, lr=1e-3, normalize=normalize, max_grad_norm=0.0)
        x, y = make_batch("mlp")
        for _ in range(2):
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            opt.step()
        if normalize == "full":
            report = probe(opt, model)
            assert sorted(report) == ["fc1", "fc2"] and all(row["layers"] == 1 for row in report.values())
            assert all(0.0 <= row["rel_error_mean"] <= row["rel_error_max"] for row in report.values())
        else:
            with pytest.raises(ValueError, match="normalize='full'"):
                probe(opt, model)
        if hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
