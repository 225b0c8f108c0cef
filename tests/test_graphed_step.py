"""``cuda_graph=True``: the functional step captured per bucket and replayed (``functional.psi.GraphedPSIStep``).

On the CPU the bookkeeping runs with ``emulate=True`` (an eager re-run in place of the replay, into the same static
outputs), which checks what a capture relies on: static inputs refreshed every step, hyperparameters that change
(an lr schedule) read from device scalars, one capture per bucket and position instead of one per step, results
reused only within their step.  With CUDA, the real capture is compared with the eager step."""

from __future__ import annotations

import warnings

import pytest
import torch

import loraopt
from loraopt.functional import psi as fpsi
from toys import loss_fn, make_batch, make_model, params_snapshot

F64 = torch.float64

CASES = [  # the factories' defaults (PSI-LoRA / Proj.: normalize="factored") at lr 1e-3 unless given
    ("psi-lora", {}),
    ("psi-lora", dict(inner_iters=0)),
    ("psi-lora", dict(momentum_balance="polar")),
    ("proj-psi-lora", {}),
    ("scaled-psi-lora", dict(lr=1e-2)),
    ("scaled-psi-lora", dict(lr=1e-2, metric="shampoo", inner_iters=1)),
    ("psi-lora", dict(normalize="layer", max_grad_norm=0.0)),  # a per-layer (L, 1, 1) gradient coefficient
    ("psi-lora", dict(normalize=None, lr=0.03, max_grad_norm=1.0)),  # the plain step (the defaults: "factored")
]


def _run(name, hp, steps, *, step_fn=None, device="cpu", dtype=F64, groups=False):
    torch.manual_seed(0)
    model = make_model().to(device=device, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = loraopt.create_optimizer(name, model, **{"lr": 1e-3, **hp})
    if step_fn is not None:
        opt._step_fn = step_fn
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))  # a new lr at every step
    for t in range(steps):
        x, y = make_batch("mlp", seed=t)
        opt.zero_grad()
        loss_fn(model, x.to(device=device, dtype=dtype), y.to(device)).backward()
        opt.step()
        schedule.step()
    return params_snapshot(model), opt


@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{hp}" for n, hp in CASES])
def test_emulated_graph_step_equals_the_eager_step_under_an_lr_schedule(name, hp):
    eager, _ = _run(name, hp, 6)
    graphed = fpsi.GraphedPSIStep("test", emulate=True)
    replayed, opt = _run(name, hp, 6, step_fn=graphed)
    for n in eager:
        assert torch.equal(eager[n], replayed[n]), n
    assert opt.skipped_steps == 0  # every step moved the factors: the equality is not that of skipped steps
    buckets = graphed.captures
    assert 0 < buckets <= len(opt._layers)  # one capture per bucket, made at the first step
    assert not graphed.disabled


def test_captures_are_made_once_not_per_step():
    graphed = fpsi.GraphedPSIStep("test", emulate=True)
    _run("psi-lora", {}, 2, step_fn=graphed)
    first = graphed.captures
    _run("psi-lora", {}, 5, step_fn=graphed)  # a new optimizer and model of the same shapes: same keys
    assert graphed.captures == first


def test_equal_keys_in_one_step_get_their_own_capture():
    """Two calls with the same shapes and settings in one step (two parameter groups of equal shapes) must not
    share static outputs: the first result is still to be written back when the second call runs."""
    graphed = fpsi.GraphedPSIStep("test", emulate=True)
    A, B = torch.randn(2, 3, 8, dtype=F64), torch.randn(2, 6, 3, dtype=F64)
    grad = fpsi.Gradient(torch.randn(2, 6, 5, dtype=F64), torch.randn(2, 5, 8, dtype=F64), False)  # G = left @ right
    kw = dict(lr=0.1, grad_coef=1.0, momentum_coef=0.0, lam=1e-2, lam_momentum=None)
    graphed.begin_step()
    first = graphed(A, B, grad, **kw)
    second = graphed(A * 2, B, grad, **kw)
    assert graphed.captures == 2 and first.A.data_ptr() != second.A.data_ptr()
    torch.testing.assert_close(first.A, fpsi.psi_step(A, B, grad, **kw).A, rtol=0, atol=0)


def test_a_failure_falls_back_to_the_eager_step_once(monkeypatch):
    graphed = fpsi.GraphedPSIStep("test", emulate=True)

    def broken(*args, **kwargs):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(graphed, "_capture", broken)
    with pytest.warns(RuntimeWarning, match="CUDA-graph step failed"):
        replayed, _ = _run("psi-lora", {}, 3, step_fn=graphed)
    eager, _ = _run("psi-lora", {}, 3)
    assert graphed.disabled
    for n in eager:
        assert torch.equal(eager[n], replayed[n]), n


def test_off_cuda_without_emulation_the_step_is_eager_and_the_flag_is_validated():
    graphed = fpsi.GraphedPSIStep("test")
    _run("psi-lora", {}, 2, step_fn=graphed)
    assert graphed.captures == 0
    model = make_model()
    opt = loraopt.create_optimizer("psi-lora", model, cuda_graph=True)
    assert isinstance(opt._step_fn, fpsi.GraphedPSIStep)
    with pytest.raises(ValueError, match="compile=False and foreach=True"):
        loraopt.create_optimizer("psi-lora", make_model(), cuda_graph=True, compile=True)
    with pytest.raises(ValueError, match="compile=False and foreach=True"):
        loraopt.create_optimizer("scaled-psi-lora", make_model(), cuda_graph=True, foreach=False)
    with pytest.raises(ValueError, match="cuda_graph must be True or False"):
        loraopt.create_optimizer("proj-psi-lora", make_model(), cuda_graph="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the real capture and replay")
@pytest.mark.parametrize("name,hp", CASES, ids=[f"{n}-{hp}" for n, hp in CASES])
def test_cuda_graph_step_equals_the_eager_step_on_the_gpu(name, hp):
    eager, _ = _run(name, hp, 6, device="cuda", dtype=torch.float32)
    graphed = fpsi.GraphedPSIStep("test")
    replayed, _ = _run(name, hp, 6, step_fn=graphed, device="cuda", dtype=torch.float32)
    assert graphed.captures > 0 and not graphed.disabled
    for n in eager:
        torch.testing.assert_close(replayed[n], eager[n], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the real capture and replay")
def test_a_bucket_of_many_equal_layers_is_captured_on_the_gpu():
    """Several equal layers make one bucket whose r x r systems are solved batched: with torch's default library
    choice those solves went to MAGMA, which cannot be captured (an H200 failed every such capture); the capture
    asks for cuSOLVER (functional.psi._capturable_linalg)."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    def run(step_fn=None):
        torch.manual_seed(0)
        base = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(16, 16), nn.Tanh())], nn.Linear(16, 3))
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2", "4", "6"])).cuda()
        opt = loraopt.create_optimizer("psi-lora", model)
        if step_fn is not None:
            opt._step_fn = step_fn
        for t in range(4):
            x = torch.randn(16, 16, generator=torch.Generator().manual_seed(t)).cuda()
            y = torch.arange(16).cuda() % 3
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return params_snapshot(model)

    eager = run()
    graphed = fpsi.GraphedPSIStep("test")
    replayed = run(graphed)
    assert graphed.captures > 0 and not graphed.disabled
    torch.randn(2, device="cuda")  # the CUDA RNG still works after the captures
    for n in eager:
        torch.testing.assert_close(replayed[n], eager[n], rtol=1e-4, atol=1e-5)
