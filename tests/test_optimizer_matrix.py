"""The torch.optim contract over the whole registry (specs/integration.md §1 and §9)."""

import io

import pytest
import torch

import loraopt
from optim_cases import CASE_IDS, CASES, train_step
from toys import SUPPORTED, UNSUPPORTED, loss_fn, make_batch, make_model, params_snapshot, sharding_wrapper

MODEL_CASES = [(c, k) for c in CASES for k in SUPPORTED if k in c.kinds]
MODEL_IDS = [f"{c.id}-{k}" for c, k in MODEL_CASES]


def _run(case, kind, steps, model=None, opt=None, batch_seed=1, accumulate=1):
    model = model if model is not None else make_model(kind)
    opt = opt if opt is not None else case.build(model)
    for t in range(steps):
        x, y = make_batch(kind, seed=batch_seed + t)
        train_step(case, model, opt, x, y, accumulate)
    return model, opt


def _equal_params(a, b):
    pa, pb = params_snapshot(a), params_snapshot(b)
    return all(torch.equal(pa[n], pb[n]) for n in pa)


def test_registry_lists_every_case_name():
    assert {c.name for c in CASES} <= set(loraopt.OPTIMIZERS)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_training_reduces_the_loss(case):
    model = make_model("mlp")
    x, y = make_batch("mlp", n=64, seed=0)
    before = loss_fn(model, x, y).item()
    opt = case.build(model)
    for _ in range(15):
        train_step(case, model, opt, x, y)
    after = loss_fn(model, x, y).item()
    assert after < before, (before, after)
    assert isinstance(opt, torch.optim.Optimizer)


@pytest.mark.parametrize("case,kind", MODEL_CASES, ids=MODEL_IDS)
def test_every_trainable_parameter_moves(case, kind):
    model = make_model(kind)
    before = params_snapshot(model)
    _run(case, kind, 2, model=model)
    moved = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved == trainable
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("case,kind", MODEL_CASES, ids=MODEL_IDS)
def test_resume_is_bit_exact(case, kind):
    straight, _ = _run(case, kind, 6)
    model, opt = _run(case, kind, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # tensor-only state loads without pickled objects
    fresh = make_model(kind, seed=123)
    fresh.load_state_dict(saved["model"])
    fresh_opt = case.build(fresh)
    fresh_opt.load_state_dict(saved["optim"])
    for t in range(3, 6):
        x, y = make_batch(kind, seed=1 + t)
        train_step(case, fresh, fresh_opt, x, y)
    assert _equal_params(straight, fresh)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_state_is_tensor_only_with_named_groups(case):
    model, opt = _run(case, "mlp", 2)
    sd = opt.state_dict()
    for per_param in sd["state"].values():
        assert all(torch.is_tensor(v) for v in per_param.values()), per_param.keys()
    assert not any(isinstance(k, str) for k in sd["state"])
    names = [n for g in sd["param_groups"] for n in g.get("param_names", [])]
    assert len(names) == sum(len(g["params"]) for g in sd["param_groups"]) and all(names)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_lr_zero_step_allocates_state_and_changes_nothing(case):
    model = make_model("mlp")
    opt = case.build(model)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = params_snapshot(model)
    x, y = make_batch("mlp")
    train_step(case, model, opt, x, y)
    assert _equal_params_to(model, before)
    stateful = case.name not in ("sgd",) or case.kwargs.get("momentum", 0) > 0
    if stateful and case.name not in ("lora-plus", "riemannian-sgd", "riemannian-adamw", "adamw", "svdlora"):
        assert len(opt.state) > 0  # loraopt's own optimizers allocate their full state on an lr = 0 step
    if case.name not in ("psi-lora", "scaled-psi-lora", "svdlora", "loko"):
        return  # torch's own optimizers still update their moments at lr = 0; the rule below is loraopt's
    # ... and a later lr = 0 step leaves existing state bit-identical too.
    for g in opt.param_groups:
        g["lr"] = 0.05
    train_step(case, model, opt, *make_batch("mlp", seed=2))
    snap_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    before = params_snapshot(model)
    for g in opt.param_groups:
        g["lr"] = 0.0
    train_step(case, model, opt, *make_batch("mlp", seed=3))
    assert _equal_params_to(model, before)
    for p, s in opt.state.items():
        for k, v in s.items():
            if k != "step" and id(p) in snap_state and k in snap_state[id(p)]:
                assert torch.equal(v, snap_state[id(p)][k]), k


def _equal_params_to(model, snapshot):
    return all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("case", [c for c in CASES if not c.observes_outputs], ids=lambda c: c.id)
def test_closure_is_called_exactly_once(case):
    model = make_model("mlp")
    opt = case.build(model)
    x, y = make_batch("mlp")
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        return loss  # LoKO-scalar observes the loss its closure returns

    before = params_snapshot(model)
    returned = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(returned)
    assert not _equal_params_to(model, before)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_bf16_parameters_keep_fp32_state_through_a_checkpoint(case):
    model = make_model("mlp")
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.bfloat16()
    model.to(torch.bfloat16)
    opt = case.build(model)
    for t in range(2):
        x, y = make_batch("mlp", seed=t)
        train_step(case, model, opt, x.bfloat16(), y)
    dtypes = {(id(p), k): v.dtype for p, s in opt.state.items() for k, v in s.items()}
    ours = case.name in ("psi-lora", "scaled-psi-lora", "svdlora", "loko")
    if ours:
        assert any(dt == torch.float32 for dt in dtypes.values())
        assert all(dt != torch.bfloat16 for (_, k), dt in dtypes.items()), "loraopt keeps fp32 state"
    opt2 = case.build(model)
    opt2.load_state_dict(opt.state_dict())
    for p, s in opt.state.items():
        for k, v in s.items():
            assert opt2.state[p][k].dtype == v.dtype, (k, opt2.state[p][k].dtype, v.dtype)
            assert torch.equal(opt2.state[p][k], v)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradient_accumulation_matches_the_full_batch(case):
    if case.name == "loko":
        pytest.skip("a Kalman filter has no gradient accumulation (specs/loko.md §8)")
    # Streaming clipping is an upper bound under accumulation (exact for one micro-batch): compare unclipped.
    overrides = {"max_grad_norm": 0.0} if case.streams else {}
    full = make_model("mlp")
    acc = make_model("mlp")
    opt_full, opt_acc = case.build(full, **overrides), case.build(acc, **overrides)
    for t in range(3):
        x, y = make_batch("mlp", n=32, seed=t)
        train_step(case, full, opt_full, x, y, accumulate=1)
        train_step(case, acc, opt_acc, x, y, accumulate=4)
    pf, pa = params_snapshot(full), params_snapshot(acc)
    for n in pf:
        assert torch.allclose(pf[n], pa[n], atol=2e-5, rtol=1e-4), n


@pytest.mark.parametrize("case", [c for c in CASES if c.structured], ids=lambda c: c.id)
@pytest.mark.parametrize("kind", UNSUPPORTED)
def test_structured_optimizers_reject_unsupported_adapters(case, kind):
    with pytest.raises(NotImplementedError, match="baseline optimizer"):
        case.build(make_model(kind))


@pytest.mark.parametrize("case", [c for c in CASES if not c.structured], ids=lambda c: c.id)
@pytest.mark.parametrize("kind", UNSUPPORTED)
def test_baselines_train_every_adapter_kind(case, kind):
    if case.name.startswith("riemannian") and kind == "conv3x3":
        # PEFT's preconditioner handles 2-D factors only and would train conv factors unpreconditioned.
        with pytest.raises(ValueError, match="preconditions only linear adapters"):
            case.build(make_model(kind))
        return
    model = make_model(kind)
    before = params_snapshot(model)
    _run(case, kind, 2, model=model)
    magnitude = [n for n in before if "lora_magnitude_vector" in n]
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
    assert (kind == "dora") == bool(magnitude)


@pytest.mark.parametrize("case", [c for c in CASES if not c.observes_outputs], ids=lambda c: c.id)
def test_param_groups_follow_a_scheduler(case):
    model = make_model("mlp")
    opt = case.build(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    base = [g["lr"] for g in opt.param_groups]
    for t in range(2):
        train_step(case, model, opt, *make_batch("mlp", seed=t))
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 0.25 for b in base])


@pytest.mark.parametrize("case", [c for c in CASES if c.observes_outputs], ids=lambda c: c.id)
def test_observe_then_a_closure_returning_none_applies_the_observation(case):
    """Lightning's manual optimization: observe(logits, y), then step(closure) whose closure returns None."""
    model = make_model("mlp")
    opt = case.build(model)
    before = params_snapshot(model)
    x, y = make_batch("mlp")
    opt.observe(model(x), y)
    calls = []
    opt.step(lambda: calls.append(1))
    assert calls == [1] and not _equal_params_to(model, before)


@pytest.mark.parametrize("name", ["riemannian-sgd", "riemannian-adamw"])
def test_riemannian_refuses_conv_adapters_it_cannot_precondition(name):
    model = make_model("conv")  # 1x1-conv adapters: 4-D lora_A / lora_B
    with pytest.raises(ValueError, match="target_modules"):
        loraopt.create_optimizer(name, model, lr=1e-2)


STRUCTURED_HP = {"psi-lora": dict(lr=1e-2), "scaled-psi-lora": dict(lr=0.1), "svdlora": dict(lr=1e-2),
                 "loko": dict(num_outputs=4)}


@pytest.mark.parametrize("name", sorted(STRUCTURED_HP))
@pytest.mark.parametrize("wrapper", ["FullyShardedDataParallel", "DeepSpeedEngine"])
def test_structured_optimizers_refuse_sharding_wrappers(name, wrapper, monkeypatch):
    sharded = sharding_wrapper(wrapper, make_model("mlp"), monkeypatch)
    with pytest.raises(NotImplementedError, match="DDP or a single"):
        loraopt.create_optimizer(name, sharded, **STRUCTURED_HP[name])


_DTENSOR_SCRIPT = r"""
import sys, tempfile, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Replicate
sys.path.insert(0, sys.argv[1])
import loraopt
from toys import make_model
store = tempfile.NamedTemporaryFile(delete=False).name
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
model = make_model("mlp")
for module in model.modules():
    for key, p in list(module._parameters.items()):
        if p is not None and p.requires_grad:
            module._parameters[key] = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()]))
refused, accepted = [], []
for name, hp in [("psi-lora", dict(lr=1e-2)), ("scaled-psi-lora", dict(lr=0.1)), ("loko", dict(num_outputs=4))]:
    try:
        loraopt.create_optimizer(name, model, **hp)
        accepted.append(name)
    except NotImplementedError as error:
        refused.append(name if "DTensor" in str(error) else f"{name}: {error}")
print("REFUSED", ",".join(refused))
print("ACCEPTED", ",".join(accepted))
dist.destroy_process_group()
"""


def test_dtensor_parameters_are_accepted_where_fsdp2_is_supported_and_refused_clearly_elsewhere(tmp_path):
    """The PSI family runs on DTensor (FSDP2) parameters (parity in test_fsdp.py); LoKO's output observation needs
    per-output Jacobian rows that FSDP2 does not expose, and says so."""
    import os
    import subprocess
    import sys

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _DTENSOR_SCRIPT, tests_dir], capture_output=True, text=True,
                         timeout=240, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REFUSED loko\n" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "ACCEPTED psi-lora,scaled-psi-lora\n" in out.stdout, out.stdout + out.stderr[-2000:]
