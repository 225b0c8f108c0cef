"""PSI-LoRA and Scaled PSI-LoRA against exact references and their special cases (specs/psi-lora.md §5, §11)."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import loraopt
from loraopt.lora import find_lora_layers
from toys import MLP, loss_fn, make_batch, make_model, params_snapshot


# The paper's / reference settings where the library's recommended defaults differ (the references compare those).
REFERENCE = dict(momentum=0.0, max_grad_norm=0.0, other_optimizer="sgd")
SCALED_PAPER = dict(metric_scale="absolute", bias_correction=False, damping=1e-5, momentum_prox=None)


def _lora_model(seed=0, r=4, alpha=None, head=True, d_in=12, d_out=10):
    """LoRA on one Linear(d_in, d_out) (module "0"), optionally followed by tanh and a frozen-free head."""
    torch.manual_seed(seed)
    layers = [nn.Linear(d_in, d_out)] + ([nn.Tanh(), nn.Linear(d_out, 3)] if head else [])
    model = get_peft_model(nn.Sequential(*layers), LoraConfig(r=r, lora_alpha=alpha or r, target_modules=["0"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def _step(model, opt, x, y, loss=None):
    opt.zero_grad()
    (loss or (lambda: loss_fn(model, x, y)))().backward()
    opt.step()


def _delta_w(model):
    layer = find_lora_layers(model)[0]
    return layer.scaling * layer.b_matrix(torch.float64) @ layer.a_matrix(torch.float64)


def test_jacobi_psi_equals_peft_riemannian_sgd():
    """K = 0, mu = 0, s = 1: the Riemannian-preconditioned SGD step with reg = lr * lmbd (+ jitter)."""
    lr, lmbd, jitter = 0.05, 0.1, 1e-6
    a, b = make_model("mlp", lora_alpha=4), make_model("mlp", lora_alpha=4)  # r = 4: s = 1
    psi = loraopt.create_optimizer("psi-lora", a, normalize=None, lr=lr, inner_iters=0, lmbd=lmbd, jitter=jitter, **REFERENCE)
    rp = loraopt.create_optimizer("riemannian-sgd", b, lr=lr, reg=lr * lmbd + jitter)
    for t in range(3):
        x, y = make_batch("mlp", seed=t)
        _step(a, psi, x, y)
        _step(b, rp, x, y)
    pa, pb = params_snapshot(a), params_snapshot(b)
    for n in pa:
        assert torch.allclose(pa[n], pb[n], atol=1e-6), n


def test_psi_with_many_rounds_and_full_rank_momentum_is_projected_heavy_ball():
    """K large, lam -> 0, r_m = full rank: Pi_r(W - lr (G + mu M)), M <- mu M + G == SVDLoRA with SGD momentum."""
    lr, mu = 0.2, 0.5
    a, b = _lora_model(r=2, head=False), _lora_model(r=2, head=False)
    psi = loraopt.create_optimizer(
        "psi-lora", a, normalize=None, lr=lr, inner_iters=200, lmbd=1e-9, jitter=0.0, momentum=mu, rank_mult=5.0, max_grad_norm=0.0
    )
    oracle = loraopt.create_optimizer("svdlora", b, lr=lr, momentum=mu, compute_dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    target = torch.randn(10, 12, generator=g)
    for t in range(4):
        x = torch.randn(32, 12, generator=g)
        for model, opt in ((a, psi), (b, oracle)):
            opt.zero_grad()
            (model(x) - x @ target.T).square().mean().backward()
            opt.step()
        assert torch.allclose(_delta_w(a), _delta_w(b), atol=2e-4, rtol=1e-3), t


@pytest.mark.parametrize("name,kw", [
    ("psi-lora", dict(lr=0.1, inner_iters=1, momentum=0.5)),
    ("psi-lora", dict(lr=0.1, inner_iters=0)),
    ("scaled-psi-lora", dict(lr=0.1, max_grad_norm=0.0)),
])
def test_updates_of_delta_w_do_not_depend_on_alpha_or_rank_scaling(name, kw):
    """Pitfall 2: the math runs on the effective factors, so (alpha, r) only change the parametrisation."""
    models = []
    for alpha in (4, 16):
        m = _lora_model(r=4, alpha=alpha, head=False)
        layer = find_lora_layers(m)[0]
        with torch.no_grad():  # same effective factors sqrt(s) A, sqrt(s) B (so the same Delta W) for both
            layer.A.mul_((4 / alpha) ** 0.5)
            layer.B.mul_((4 / alpha) ** 0.5)
        models.append(m)
    assert torch.allclose(_delta_w(models[0]), _delta_w(models[1]), atol=1e-6)
    opts = [loraopt.create_optimizer(name, m, **kw) for m in models]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(16, 12, generator=g)
        for m, o in zip(models, opts):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert torch.allclose(_delta_w(models[0]), _delta_w(models[1]), atol=1e-5)


def test_scaled_with_identity_metric_and_no_momentum_is_psi_jacobi():
    """Scaled PSI-LoRA with power 0 (P = I) and beta1 = 0 makes the same LoRA step as PSI-LoRA at K = 0."""
    a, b = make_model("mlp"), make_model("mlp")
    psi = loraopt.create_optimizer("psi-lora", a, normalize=None, lr=0.1, inner_iters=0, lmbd=0.01)
    scaled = loraopt.create_optimizer(
        "scaled-psi-lora", b, lr=0.1, lmbd=0.01, power=0.0, betas=(0.0, 0.99), max_grad_norm=0.0, normalize=None
    )
    x, y = make_batch("mlp")
    _step(a, psi, x, y)
    _step(b, scaled, x, y)
    for la, lb in zip(find_lora_layers(a), find_lora_layers(b)):
        assert torch.allclose(la.A, lb.A, atol=1e-6) and torch.allclose(la.B, lb.B, atol=1e-6)


def test_kfac_statistics_are_the_ema_of_mean_squared_rows():
    model = make_model("mlp")
    opt = loraopt.create_optimizer("scaled-psi-lora", model, lr=0.1, betas=(0.9, 0.8), **SCALED_PAPER)
    x, y = make_batch("mlp", n=16)
    rows = {}
    hooks = [
        layer.a_module.register_forward_hook(lambda m, a, o, key=layer.index: rows.__setitem__(key, a[0].detach()))
        for layer in opt.layers
    ]
    _step(model, opt, x, y)
    for h in hooks:
        h.remove()
    for layer in opt.layers:
        v_in = opt.state[layer.A]["metric_in"]
        assert torch.allclose(v_in, 0.8 + 0.2 * rows[layer.index].square().mean(0), atol=1e-6)
        assert opt.state[layer.B]["metric_out"].shape == (layer.d_out,)


def test_clipping_scales_the_step_by_the_full_gradient_norm():
    """With lmbd = 0 a clipped step equals an unclipped step at lr * c, c = max / |(G_layers, g_other)|."""
    max_norm = 0.05
    a, b, ref = make_model("mlp"), make_model("mlp"), make_model("mlp")
    x, y = make_batch("mlp")
    loss_fn(ref, x, y).backward()
    capture_opt = loraopt.create_optimizer("psi-lora", ref, normalize=None, lr=0.0)
    ref.zero_grad()
    loss_fn(ref, x, y).backward()
    sq = sum(capture_opt._capture.observation(layer).grad_sq_norm() for layer in capture_opt.layers)
    sq = sq + sum(p.grad.square().sum() for n, p in ref.named_parameters() if p.requires_grad and "lora" not in n)
    c = min(1.0, max_norm / (math.sqrt(sq) + 1e-6))
    assert c < 0.5
    clipped = loraopt.create_optimizer("psi-lora", a, normalize=None, lr=0.1, lmbd=0.0, max_grad_norm=max_norm)
    plain = loraopt.create_optimizer("psi-lora", b, normalize=None, lr=0.1 * c, lmbd=0.0)
    _step(a, clipped, x, y)
    _step(b, plain, x, y)
    pa, pb = params_snapshot(a), params_snapshot(b)
    for n in pa:
        assert torch.allclose(pa[n], pb[n], atol=1e-5), n


def test_reference_compat_freezes_momentum_at_zero():
    model = make_model("mlp")
    opt = loraopt.create_optimizer("scaled-psi-lora", model, lr=0.1, reference_compat=True)
    for t in range(2):
        _step(model, opt, *make_batch("mlp", seed=t))
    for layer in opt.layers:
        assert torch.count_nonzero(opt.state[layer.B]["momentum_B"]) == 0


def test_a_non_finite_step_changes_nothing_and_is_counted():
    model = make_model("mlp")
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, momentum=0.9)
    _step(model, opt, *make_batch("mlp"))
    before = params_snapshot(model)
    state_before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    x, y = make_batch("mlp", seed=4)
    _step(model, opt, x, y, loss=lambda: loss_fn(model, x, y) * float("nan"))
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    for p, s in opt.state.items():
        for k in ("momentum_A", "momentum_B", "momentum_buffer"):
            if k in s:
                assert torch.equal(s[k], state_before[id(p)][k]), k
    assert sum(int(opt.state[layer.A]["skipped_steps"]) for layer in opt.layers) == len(opt.layers)


def test_clear_errors():
    model = make_model("mlp")
    with pytest.raises(TypeError, match="create_psi_lora_optimizer"):
        loraopt.PSILoRA(model.parameters(), model=None, lr=0.1)
    with pytest.raises(ValueError, match="named_parameters"):
        loraopt.PSILoRA([p for p in model.parameters() if p.requires_grad], model=model, lr=0.1)
    with pytest.raises(ValueError, match="inner_iters"):
        loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=-1)
    with pytest.raises(ValueError, match="metric"):
        loraopt.create_optimizer("scaled-psi-lora", model, lr=0.1, metric="diag")
    with pytest.raises(ValueError, match="lr"):
        loraopt.create_optimizer("psi-lora", model, normalize=None, lr=float("nan"))
    with pytest.raises(ValueError, match="get_peft_model"):
        loraopt.create_optimizer("psi-lora", MLP(), normalize=None, lr=0.1)
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1)
    with pytest.raises(RuntimeError, match="without a preceding backward"):
        opt.step()
    loss_fn(model, *make_batch("mlp")).backward()
    opt._capture.clear()  # as if zero_grad() of another optimizer had dropped the activations
    with pytest.raises(RuntimeError, match="no captured activations"):
        opt.step()


def test_plain_module_with_lora_factors_trains():
    from test_lora_layers import PlainLoRALinear

    torch.manual_seed(0)
    model = nn.Sequential(PlainLoRALinear(6, 5, 2, 0.5), nn.Tanh(), nn.Linear(5, 3))
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.5, inner_iters=2)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    first = nn.functional.cross_entropy(model(x), y).item()
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert nn.functional.cross_entropy(model(x), y).item() < first


@pytest.mark.parametrize("inner_iters", [0, 1])
def test_hooks_do_not_outlive_the_optimizer(inner_iters):
    import gc

    model = make_model("mlp")
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=inner_iters, row_budget=40)
    capture = opt._capture
    del opt
    gc.collect()
    x, y = make_batch("mlp", n=16)
    for _ in range(5):  # 80 rows: over the row budget if anything were still recording
        loss_fn(model, x, y).backward()
    assert all(capture.observation(layer).n_rows == 0 for layer in capture.layers)
