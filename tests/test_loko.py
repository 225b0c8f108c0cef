"""LoKO optimizer: wiring against the pure filter, the torch.optim contract, checkpoints, errors, DDP parity."""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig, get_peft_model
from torch import nn

import loraopt
from loraopt.functional.ekf import EKFConfig, diag_ekf_update, scalar_ekf_update
from loraopt.functional.reference import loop_jacobian
from loraopt.optim.loko import LoKO, create_loko_optimizer, output_jacobian

F64 = torch.float64
D_IN, HIDDEN, M = 6, 8, 3


pytestmark = pytest.mark.usefixtures("one_thread")


class MLP(nn.Module):
    def __init__(self, m: int = M):
        super().__init__()
        self.fc1 = nn.Linear(D_IN, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, m)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def make_model(seed: int = 0, dtype=F64, *, m: int = M, perturb_B: bool = True, dora: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    model = get_peft_model(
        MLP(m), LoraConfig(target_modules=["fc1", "fc2"], r=4, modules_to_save=["head"], use_dora=dora)
    )
    if perturb_B:  # B = 0 makes the A-Jacobian vanish; most tests want every block exercised
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.normal_(0, 0.3)
    return model.to(dtype)


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def data(seed: int, b: int, m: int = M, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, D_IN, generator=g, dtype=dtype), torch.randint(m, (b,), generator=g)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def state_p(opt, params):
    return flat([opt.state[p]["p"] for p in params])


def softmax_reference(model, opt, x, y, **cfg_kw):
    """What one joint LoKO step must do, computed through the pure filter with a loop Jacobian."""
    params = trainable(model)
    h = torch.softmax(model(x), -1)
    H = loop_jacobian(h, params)
    e = torch.nn.functional.one_hot(y, M).to(h.dtype) - h.detach()
    R = opt.state[opt.anchor]["R"]
    cfg = EKFConfig(**{"noise_floor": "ones", **cfg_kw})
    return diag_ekf_update(flat(params), state_p(opt, params), R, H.reshape(len(y), M, -1), e, cfg)


# ------------------------------------------------------------------------------------------------- Jacobian


def test_batched_jacobian_equals_loop_of_autograd_grad():
    model = make_model()
    params = trainable(model)
    x, _ = data(1, 4)
    h = torch.softmax(model(x), -1)
    H = output_jacobian(h, params, dtype=F64)
    ref = loop_jacobian(h, params)
    assert H.shape == (4 * M, sum(p.numel() for p in params))
    torch.testing.assert_close(H, ref, rtol=0, atol=1e-10)
    rows = torch.tensor([1, 5, 7])
    torch.testing.assert_close(output_jacobian(h, params, rows=rows, dtype=F64), ref[rows], rtol=0, atol=1e-10)


def test_jacobian_of_unused_parameter_is_zero():
    w = torch.randn(3, requires_grad=True, dtype=F64)
    unused = torch.randn(2, requires_grad=True, dtype=F64)
    out = torch.stack([w.sum(), (w**2).sum()])
    H = output_jacobian(out, [w, unused], dtype=F64)
    torch.testing.assert_close(H[:, 3:], torch.zeros(2, 2, dtype=F64))
    torch.testing.assert_close(H[1, :3], 2 * w.detach())


# ------------------------------------------------------------------------------------------------- wiring


def test_step_equals_pure_filter_joint_batch():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M, lr=0.7, beta=0.9, jitter=1e-6)
    opt.step()  # no observation: allocates state only
    x, y = data(2, 5)
    ref = softmax_reference(model, opt, x, y, lr=0.7, beta=0.9, r_min=1e-4, jitter=1e-6, jitter_abs=1e-12)
    opt.observe(model(x), y)
    opt.step()
    params = trainable(model)
    assert_filter_state(opt, params, ref)
    assert all(float(opt.state[p]["step"]) == 1 for p in params)


def test_noise_floor_clamp_floors_every_eigenvalue_of_R_and_the_step_equals_the_pure_filter():
    """noise_floor="clamp": one joint step equals the pure filter run with that floor (float64), R ends with no
    eigenvalue below r_min, while the default (the all-ones direction only) leaves a smaller one; a bad value
    names the choices; a state dict saved before the option existed loads with the observation's own floor."""
    from loraopt.functional.ekf import clamp_eigenvalues

    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g, dtype=F64))
    R = Q @ torch.diag(torch.tensor([1e-6, 3e-3, 0.2, 1.5], dtype=F64)) @ Q.T
    expected = Q @ torch.diag(torch.tensor([1e-2, 1e-2, 0.2, 1.5], dtype=F64)) @ Q.T  # same eigenvectors
    torch.testing.assert_close(clamp_eigenvalues(R, 1e-2), expected, rtol=0, atol=1e-14)

    r_min = 0.5  # above the eigenvalues the EMA reaches in these steps, so the floor binds
    ends = {}
    for floor in ("clamp", "ones"):
        model = make_model()
        opt = create_loko_optimizer(model, num_outputs=M, beta=0.5, r_min=r_min, noise_floor=floor)
        opt.step()
        for k in range(4):
            x, y = data(60 + k, 3)
            ref = softmax_reference(model, opt, x, y, beta=0.5, r_min=r_min, noise_floor=floor)
            opt.observe(model(x), y)
            opt.step()
            assert_filter_state(opt, trainable(model), ref)
        ends[floor] = torch.linalg.eigvalsh(opt.state[opt.anchor]["R"])
    assert float(ends["clamp"].min()) >= r_min * (1 - 1e-12)
    assert float(ends["ones"][1:].min()) < r_min  # "ones" floors the all-ones direction only
    with pytest.raises(ValueError, match="noise_floor must be None .* 'clamp'"):
        create_loko_optimizer(make_model(), num_outputs=M, noise_floor="clip")
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["noise_floor"]
    fresh = create_loko_optimizer(make_model(), num_outputs=M, beta=0.5, r_min=r_min)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["noise_floor"] is None


def test_softmax_default_clamps_R_at_1e_2_and_a_state_saved_with_the_old_floor_keeps_it():
    """Defaults per observation: softmax clamps every eigenvalue of R at 1e-2, regression and loss keep their own
    floor at 1e-4; explicit values win. A state dict saved under the earlier softmax default (noise_floor None,
    r_min 1e-4: the all-ones direction) loads with that floor and steps as the pure filter with it."""
    from loraopt.optim.loko_config import DEFAULT_NOISE_FLOOR, DEFAULT_R_MIN

    opt = create_loko_optimizer(make_model(), num_outputs=M)
    assert (opt.param_groups[0]["noise_floor"], opt.param_groups[0]["r_min"]) == ("clamp", 1e-2)
    assert (DEFAULT_NOISE_FLOOR["regression"], DEFAULT_R_MIN["regression"]) == (None, 1e-4)
    assert (DEFAULT_NOISE_FLOOR["loss"], DEFAULT_R_MIN["loss"]) == (None, 1e-4)
    loss_opt = create_loko_optimizer(make_model(), observation="loss")
    assert (loss_opt.param_groups[0]["noise_floor"], loss_opt.param_groups[0]["r_min"]) == (None, 1e-4)
    mine = create_loko_optimizer(make_model(), num_outputs=M, r_min=3e-3, noise_floor="eig")
    assert (mine.param_groups[0]["noise_floor"], mine.param_groups[0]["r_min"]) == ("eig", 3e-3)

    model = make_model()
    old = create_loko_optimizer(model, num_outputs=M, beta=0.5)
    old.step()
    saved = old.state_dict()
    for group in saved["param_groups"]:
        group["noise_floor"], group["r_min"] = None, 1e-4
    resumed = create_loko_optimizer(model, num_outputs=M, beta=0.5)
    resumed.load_state_dict(saved)
    assert (resumed.param_groups[0]["noise_floor"], resumed.param_groups[0]["r_min"]) == (None, 1e-4)
    for k in range(3):
        x, y = data(70 + k, 3)
        ref = softmax_reference(model, resumed, x, y, beta=0.5, r_min=1e-4, noise_floor="ones")
        resumed.observe(model(x), y)
        resumed.step()
        assert_filter_state(resumed, trainable(model), ref)


def assert_filter_state(opt, params, ref):
    """The parameters, covariance and noise of ``opt`` equal the pure filter's result ``ref``."""
    torch.testing.assert_close(flat(params), ref.theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(state_p(opt, params), ref.p, rtol=0, atol=1e-14)
    torch.testing.assert_close(opt.state[opt.anchor]["R"], ref.R, rtol=0, atol=1e-14)


def test_all_trainable_parameters_are_filtered_including_dora_and_head():
    model = make_model(dora=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in names) and any("modules_to_save" in n for n in names)
    opt = create_loko_optimizer(model, num_outputs=M)
    groups = {g["name"]: g["param_names"] for g in opt.param_groups}
    assert set(groups) == {"lora", "other"}
    assert all("modules_to_save" in n for n in groups["other"])
    assert any("lora_magnitude_vector" in n for n in groups["lora"])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x, y = data(3, 4)
    opt.observe(model(x), y)
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n


def test_standard_lora_init_first_step_leaves_A_unchanged():
    model = make_model(perturb_B=False, dtype=torch.float32)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = create_loko_optimizer(model, num_outputs=M)
    x, y = data(4, 2, dtype=torch.float32)
    opt.observe(model(x), y)
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_A." in n:
            assert torch.equal(p, before[n]), n
        elif ".lora_B." in n or "modules_to_save" in n:
            assert not torch.equal(p, before[n]), n
    # p of A is not reduced while B = 0 (its Jacobian is exactly zero)
    ref = create_loko_optimizer(make_model(perturb_B=False, dtype=torch.float32), num_outputs=M)
    ref.step()
    for (n, p), q in zip(
        [(n, p) for n, p in model.named_parameters() if p.requires_grad], [q for q in ref.state]
    ):
        if ".lora_A." in n:
            assert torch.equal(opt.state[p]["p"], ref.state[q]["p"])


def test_unnamed_parameters_and_multiple_groups_with_per_group_lr():
    model = make_model()
    params = trainable(model)
    split = 2
    opt = LoKO(
        [{"params": params[:split], "lr": 0.5}, {"params": params[split:], "lr": 2.0}], num_outputs=M, beta=0.9
    )
    opt.step()
    x, y = data(5, 3)
    n_first = sum(p.numel() for p in params[:split])
    n_rest = flat(params).numel() - n_first
    lr = torch.cat([torch.full((n_first,), 0.5, dtype=F64), torch.full((n_rest,), 2.0, dtype=F64)])
    ref = softmax_reference(model, opt, x, y, lr=lr, beta=0.9)
    opt.observe(model(x), y)
    opt.step()
    torch.testing.assert_close(flat(params), ref.theta, rtol=0, atol=1e-12)


def test_group_with_lr_zero_is_frozen_and_excluded():
    model = make_model()
    params = trainable(model)
    frozen, live = params[:2], params[2:]
    opt = LoKO([{"params": frozen, "lr": 0.0}, {"params": live}], num_outputs=M)
    opt.step()
    before_p = state_p(opt, frozen).clone()
    before = flat(frozen).clone()
    x, y = data(6, 3)
    h = torch.softmax(model(x), -1)
    H = loop_jacobian(h, live)
    e = torch.nn.functional.one_hot(y, M).to(F64) - h.detach()
    R = opt.state[opt.anchor]["R"]
    ref = diag_ekf_update(flat(live), state_p(opt, live), R, H.reshape(3, M, -1), e, EKFConfig())
    opt.observe(model(x), y)
    opt.step()
    assert torch.equal(flat(frozen), before) and torch.equal(state_p(opt, frozen), before_p)
    torch.testing.assert_close(flat(live), ref.theta, rtol=0, atol=1e-12)


def test_filter_level_hyperparameters_must_agree_across_groups():
    params = trainable(make_model())
    with pytest.raises(ValueError, match="beta must be the same in every parameter group"):
        LoKO([{"params": params[:2]}, {"params": params[2:], "beta": 0.5}], num_outputs=M)


def test_regression_observation_equals_pure_filter():
    model = make_model(m=2)
    params = trainable(model)
    opt = create_loko_optimizer(model, num_outputs=2, observation="regression", r0=0.5)
    opt.step()
    x, _ = data(7, 4)
    target = torch.randn(4, 2, dtype=F64)
    pred = model(x)
    H = loop_jacobian(pred, params)
    ref = diag_ekf_update(
        flat(params), state_p(opt, params), opt.state[opt.anchor]["R"], H.reshape(4, 2, -1), target - pred.detach(),
        EKFConfig(noise_floor="eig"),
    )
    opt.observe(model(x), target)
    opt.step()
    torch.testing.assert_close(flat(params), ref.theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[opt.anchor]["R"], ref.R, rtol=0, atol=1e-14)


def test_scalar_loss_observation_equals_pure_filter():
    model = make_model()
    params = trainable(model)
    opt = create_loko_optimizer(model, num_outputs=None, observation="loss", beta=0.9, r0=0.1)
    opt.step()
    x, y = data(8, 4)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.observe(loss.detach())
    loss.backward()
    g = flat([p.grad for p in params])
    ref = scalar_ekf_update(
        flat(params), state_p(opt, params), opt.state[opt.anchor]["R"], g, loss.detach(),
        EKFConfig(beta=0.9, noise_floor="eig"),
    )
    opt.step()
    torch.testing.assert_close(flat(params), ref.theta, rtol=0, atol=1e-12)
    assert opt.state[opt.anchor]["R"].shape == (1, 1)


def test_scalar_loss_closure():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=None, observation="loss")
    x, y = data(9, 4)
    before = flat(trainable(model)).clone()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    out = opt.step(closure)
    assert torch.is_tensor(out) and out.requires_grad
    assert not torch.equal(flat(trainable(model)), before)


def test_closure_called_once_and_equals_observe():
    x, y = data(10, 3)
    m1, m2 = make_model(), make_model()
    o1, o2 = create_loko_optimizer(m1, num_outputs=M), create_loko_optimizer(m2, num_outputs=M)
    calls = []

    def closure():
        calls.append(1)
        return m1(x), y

    ret = o1.step(closure)
    assert len(calls) == 1 and isinstance(ret, tuple)
    o2.observe(m2(x), y)
    o2.step()
    assert torch.equal(flat(trainable(m1)), flat(trainable(m2)))


def test_reduce_simplex_equals_full_observation():
    x_all, y_all = data(11, 12)
    out = {}
    for reduce in (False, True):
        model = make_model()
        opt = create_loko_optimizer(model, num_outputs=M, reduce_simplex=reduce, jitter=0.0, beta=0.9)
        for k in range(4):
            xb, yb = x_all[3 * k : 3 * k + 3], y_all[3 * k : 3 * k + 3]
            opt.observe(model(xb), yb)
            opt.step()
        out[reduce] = (flat(trainable(model)), state_p(opt, trainable(model)), opt.state[opt.anchor]["R"].shape)
    torch.testing.assert_close(out[False][0], out[True][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[False][1], out[True][1], rtol=0, atol=1e-12)
    assert out[True][2] == (M - 1, M - 1)


def test_soft_targets_and_leading_dims():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    x, y = data(12, 4)
    logits = model(x.reshape(2, 2, D_IN))
    opt.observe(logits, torch.nn.functional.one_hot(y, M).reshape(2, 2, M).to(F64))
    opt.step()
    ref_model = make_model()
    ref = create_loko_optimizer(ref_model, num_outputs=M)
    ref.observe(ref_model(x), y)
    ref.step()
    torch.testing.assert_close(flat(trainable(model)), flat(trainable(ref_model)), rtol=0, atol=1e-13)


# ------------------------------------------------------------------------------------------------- batch modes


def test_joint_b1_equals_sequential():
    x, y = data(13, 5)
    out = []
    for mode in ("joint", "sequential"):
        model = make_model()
        opt = create_loko_optimizer(model, num_outputs=M, batch_mode=mode)
        for i in range(5):
            opt.observe(model(x[i : i + 1]), y[i : i + 1])
            opt.step()
        out.append(flat(trainable(model)))
    assert torch.equal(out[0], out[1])


def test_sequential_batch_equals_single_sample_steps():
    x, y = data(14, 4)
    ref_model = make_model()
    ref = create_loko_optimizer(ref_model, num_outputs=M)
    for i in range(4):
        ref.observe(ref_model(x[i : i + 1]), y[i : i + 1])
        ref.step()
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M, batch_mode="sequential")
    opt.observe(model(x), y, forward=lambda i: model(x[i : i + 1]))
    opt.step()
    torch.testing.assert_close(flat(trainable(model)), flat(trainable(ref_model)), rtol=0, atol=1e-13)
    torch.testing.assert_close(opt.state[opt.anchor]["R"], ref.state[ref.anchor]["R"], rtol=0, atol=1e-14)


def test_joint_rows_from_per_sample_forwards_equal_batch_rows():
    """forward= only changes where the Jacobian rows come from (one-sample graphs), not the joint update."""
    x, y = data(16, 4)
    out = []
    for use_forward in (False, True):
        model = make_model()
        opt = create_loko_optimizer(model, num_outputs=M)
        kw = {"forward": lambda i: model(x[i : i + 1])} if use_forward else {}
        for _ in range(2):
            opt.observe(model(x), y, **kw)
            opt.step()
        out.append((flat(trainable(model)), opt.state[opt.anchor]["R"].clone()))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=0, atol=1e-13)


def test_joint_and_sequential_differ_for_b_gt_1():
    x, y = data(15, 4)
    out = []
    for mode in ("joint", "sequential"):
        model = make_model()
        opt = create_loko_optimizer(model, num_outputs=M, batch_mode=mode)
        opt.observe(model(x), y, **({"forward": lambda i: model(x[i : i + 1])} if mode == "sequential" else {}))
        opt.step()
        out.append(flat(trainable(model)))
    assert not torch.allclose(out[0], out[1])


# ------------------------------------------------------------------------------------------------- P0


def test_p_init_uniform_constant_and_seeded():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M, p_init=(1e-3, 2e-3), seed=3)
    opt.step()
    p = state_p(opt, trainable(model))
    assert p.dtype == F64 and (p >= 1e-3).all() and (p <= 2e-3).all() and p.std() > 0
    again = create_loko_optimizer(make_model(seed=5), num_outputs=M, p_init=(1e-3, 2e-3), seed=3)
    again.step()
    assert torch.equal(p, state_p(again, [q for q in again.state]))
    other = create_loko_optimizer(make_model(), num_outputs=M, p_init=(1e-3, 2e-3), seed=4)
    other.step()
    assert not torch.equal(p, state_p(other, [q for q in other.state]))
    const = create_loko_optimizer(make_model(), num_outputs=M, p_init=0.05)
    const.step()
    assert torch.equal(state_p(const, [q for q in const.state]), torch.full_like(p, 0.05))


def test_default_p_init_depends_on_the_observation_and_explicit_values_win():
    from loraopt.optim.loko import DEFAULT_P_INIT

    assert DEFAULT_P_INIT == {"softmax": (1e-3, 1e-1), "regression": (1e-3, 1e-1), "loss": (1e-2, 1.0)}
    for observation, m in (("softmax", M), ("regression", M), ("loss", None)):
        model = make_model()
        opt = create_loko_optimizer(model, num_outputs=m, observation=observation)
        assert all(g["p_init"] == DEFAULT_P_INIT[observation] for g in opt.param_groups)
        opt.step()
        low, high = DEFAULT_P_INIT[observation]
        p = state_p(opt, trainable(model))
        assert (p >= low).all() and (p <= high).all()
    explicit = LoKO(make_model().parameters(), num_outputs=M, p_init=[1e-5, 2e-5])
    assert explicit.param_groups[0]["p_init"] == (1e-5, 2e-5)
    # A group asking for the default (None) gets the observation's bounds, like the constructor.
    model = make_model()
    grouped = LoKO([{"params": [model.base_model.model.fc1.lora_A.default.weight], "p_init": None}],
                   num_outputs=None, observation="loss")
    assert grouped.param_groups[0]["p_init"] == DEFAULT_P_INIT["loss"]


def test_p_init_score_sets_prior_predictive_variance_to_a_tenth_of_r0():
    x, y = data(16, 3)
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M, p_init="score", r0=0.2)
    opt.step()
    params = trainable(model)
    u = state_p(opt, params).clone()  # before the first observation: the seeded uniform draw
    h = torch.softmax(model(x), -1)
    H = loop_jacobian(h, params)
    c = 0.1 * 0.2 / (H.pow(2) @ u).mean()
    p0 = c * u
    assert float((H.pow(2) @ p0).mean()) == pytest.approx(0.1 * 0.2, rel=1e-12)
    e = torch.nn.functional.one_hot(y, M).to(F64) - h.detach()
    ref = diag_ekf_update(flat(params), p0, opt.state[opt.anchor]["R"], H.reshape(3, M, -1), e, EKFConfig())
    opt.observe(model(x), y)
    opt.step()
    torch.testing.assert_close(flat(params), ref.theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(state_p(opt, params), ref.p, rtol=0, atol=1e-14)
    # later steps are ordinary filter steps (no rescaling)
    x2, y2 = data(17, 3)
    ref2 = softmax_reference(model, opt, x2, y2)
    opt.observe(model(x2), y2)
    opt.step()
    torch.testing.assert_close(flat(params), ref2.theta, rtol=0, atol=1e-12)


def test_p_positive_and_nonincreasing_with_q0():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    params = trainable(model)
    prev = None
    for k in range(15):
        x, y = data(100 + k, 2)
        opt.observe(model(x), y)
        opt.step()
        p = state_p(opt, params).clone()
        assert (p > 0).all()
        if prev is not None:
            assert (p <= prev).all()
        prev = p


# ------------------------------------------------------------------------------------------------- no-op steps


def test_lr_zero_step_allocates_state_and_changes_nothing():
    model = make_model()
    before = flat(trainable(model)).clone()
    opt = create_loko_optimizer(model, num_outputs=M, lr=0.0)
    for k in range(2):
        x, y = data(18 + k, 3)
        opt.observe(model(x), y)
        opt.step()
    assert torch.equal(flat(trainable(model)), before)
    ref = create_loko_optimizer(make_model(), num_outputs=M)
    ref.step()
    for p, q in zip(trainable(model), ref.state):
        assert torch.equal(opt.state[p]["p"], ref.state[q]["p"])
        assert float(opt.state[p]["step"]) == 0
    torch.testing.assert_close(opt.state[opt.anchor]["R"], 0.1 * torch.eye(M, dtype=F64), rtol=0, atol=0)
    assert int(opt.state[opt.anchor]["skipped"]) == 0
    assert not opt.has_pending_observation


def test_step_without_observation_is_a_noop_and_dcp_style_init_works():
    model = make_model()
    before = flat(trainable(model)).clone()
    opt = create_loko_optimizer(model, num_outputs=M)
    opt.step()
    assert len(opt.state) == len(trainable(model))
    snap = {k: v.clone() for k, v in opt.state[opt.anchor].items()}
    opt.step()
    assert torch.equal(flat(trainable(model)), before)
    for k, v in opt.state[opt.anchor].items():
        assert torch.equal(v, snap[k])
    # torch.distributed.checkpoint style: zero grads everywhere, lr 0, step, restore lrs
    fresh = create_loko_optimizer(make_model(), num_outputs=M)
    for p in [p for g in fresh.param_groups for p in g["params"]]:
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in fresh.param_groups]
    for g in fresh.param_groups:
        g["lr"] = 0.0
    fresh.step()
    for g, lr in zip(fresh.param_groups, lrs):
        g["lr"] = lr
    assert all("p" in fresh.state[p] for g in fresh.param_groups for p in g["params"])


def test_zero_grad_drops_pending_observation():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    before = flat(trainable(model)).clone()
    x, y = data(20, 2)
    opt.observe(model(x), y)
    opt.zero_grad()
    opt.step()
    assert torch.equal(flat(trainable(model)), before)


# ------------------------------------------------------------------------------------------------- checkpoints


def test_state_dict_roundtrip_keeps_fp32_state_under_bf16_params():
    model = make_model(dtype=torch.bfloat16)
    opt = create_loko_optimizer(model, num_outputs=M)
    x, y = data(21, 3, dtype=torch.bfloat16)
    opt.observe(model(x), y)
    opt.step()
    params = trainable(model)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert all(opt.state[p]["p"].dtype == torch.float32 for p in params)
    assert opt.state[opt.anchor]["R"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = create_loko_optimizer(model, num_outputs=M)
    fresh.load_state_dict(loaded)
    for p in params:
        for key in ("p", "step"):
            assert fresh.state[p][key].dtype == opt.state[p][key].dtype
            assert torch.equal(fresh.state[p][key], opt.state[p][key])
    for key in ("R", "skipped"):
        assert fresh.state[fresh.anchor][key].dtype == opt.state[opt.anchor][key].dtype
        assert torch.equal(fresh.state[fresh.anchor][key], opt.state[opt.anchor][key])
    # every state value is a tensor (weights_only / DCP friendly)
    assert all(torch.is_tensor(v) for s in opt.state_dict()["state"].values() for v in s.values())


def test_score_scale_per_block_matches_a_loop_over_blocks():
    """Each calibrated block's share of the prior predictive variance is its target; scored blocks, blocks with no
    signal and coordinates outside every block keep their values; the flags say which blocks were calibrated."""
    from loraopt.functional.ekf import score_scale_per_block

    g = torch.Generator().manual_seed(3)
    n, k = 12, 5
    H = torch.randn(k, n, generator=g, dtype=F64)
    H[:, 6:8] = 0  # block 2: no signal yet
    p = torch.rand(n, generator=g, dtype=F64) + 0.1
    block = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, -1, -1])
    scored = torch.tensor([False, False, False, True])
    target = torch.tensor([0.5, 2.0, 1.0, 1.0], dtype=F64)
    new_p, new_scored = score_scale_per_block(p, H, block, scored, target)
    assert new_scored.tolist() == [True, True, False, True]
    for t in range(4):
        cols = block == t
        if t in (0, 1):
            share = float((H[:, cols].square() * new_p[cols]).sum(1).mean())
            assert share == pytest.approx(float(target[t]), rel=1e-12)
            ratio = new_p[cols] / p[cols]
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))  # one scalar per block
        else:
            assert torch.equal(new_p[cols], p[cols])
    assert torch.equal(new_p[block < 0], p[block < 0])


def test_p_init_score_layer_gives_each_tensor_an_equal_share_and_calibrates_lora_a_once_b_has_moved(monkeypatch):
    """PEFT's B = 0 leaves the A blocks without signal at the first update: B and the head are calibrated then, each
    to SCORE_SNR * r0 / T of the prior predictive variance of that observation (T = 6 tensors), the A tensors at
    the second update; from the third update on nothing is rescaled. A checkpoint taken between the first and the
    second update resumes to the same parameters as the uninterrupted run."""
    import loraopt.optim.loko_step as loko_step
    from loraopt.functional.ekf import score_scale_per_block
    from loraopt.optim.loko_config import SCORE_SNR

    calls = []

    def recording(p, H, block, scored, target):
        out = score_scale_per_block(p, H, block, scored, target)
        calls.append((p, H, block, scored.clone(), target, *out))
        return out

    monkeypatch.setattr(loko_step, "score_scale_per_block", recording)
    steps = [data(40 + k, 2) for k in range(4)]

    def run(model, opt, batch):
        for x, y in batch:
            opt.observe(model(x), y)
            opt.step()

    model = make_model(perturb_B=False)
    opt = create_loko_optimizer(model, num_outputs=M, p_init="score-layer", r0=0.2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    run(model, opt, steps)
    assert len(calls) == 2  # the first two updates only
    is_a = torch.tensor([".lora_A." in n for n in names])
    for call, expected in zip(calls, (~is_a, torch.ones(len(names), dtype=torch.bool))):
        p, H, block, before, target, new_p, after = call
        assert target == pytest.approx(SCORE_SNR * 0.2 / len(names))
        calibrated = after & ~before
        assert torch.equal(after, expected)
        for t in torch.nonzero(calibrated).flatten().tolist():
            cols = block == t
            assert float((H[:, cols].square() * new_p[cols]).sum(1).mean()) == pytest.approx(target, rel=1e-10)
    assert all(bool(opt.state[p]["scored"]) for p in trainable(model))

    calls.clear()
    first = make_model(perturb_B=False)
    first_opt = create_loko_optimizer(first, num_outputs=M, p_init="score-layer", r0=0.2)
    run(first, first_opt, steps[:1])
    ckpt = copy.deepcopy({"model": first.state_dict(), "opt": first_opt.state_dict()})
    resumed = make_model(seed=7, perturb_B=False)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = create_loko_optimizer(resumed, num_outputs=M, p_init="score-layer", r0=0.2)
    resumed_opt.load_state_dict(ckpt["opt"])
    run(resumed, resumed_opt, steps[1:])
    assert torch.equal(flat(trainable(resumed)), flat(trainable(model)))
    assert torch.equal(state_p(resumed_opt, trainable(resumed)), state_p(opt, trainable(model)))
    with pytest.raises(ValueError, match="'score-layer'"):
        create_loko_optimizer(make_model(), num_outputs=M, p_init="score-layers")


def test_resume_is_bit_exact():
    steps = [data(30 + k, 3, dtype=torch.float32) for k in range(6)]

    def run(model, opt, batch):
        for x, y in batch:
            opt.observe(model(x), y)
            opt.step()

    full_model = make_model(dtype=torch.float32)
    full_opt = create_loko_optimizer(full_model, num_outputs=M, p_init="score")
    run(full_model, full_opt, steps)

    model = make_model(dtype=torch.float32)
    opt = create_loko_optimizer(model, num_outputs=M, p_init="score")
    run(model, opt, steps[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = make_model(seed=123, dtype=torch.float32)
    resumed.load_state_dict(ckpt["model"])
    resumed_opt = create_loko_optimizer(resumed, num_outputs=M, p_init="score")
    resumed_opt.load_state_dict(ckpt["opt"])
    run(resumed, resumed_opt, steps[3:])

    assert torch.equal(flat(trainable(resumed)), flat(trainable(full_model)))
    assert torch.equal(state_p(resumed_opt, trainable(resumed)), state_p(full_opt, trainable(full_model)))
    assert torch.equal(resumed_opt.state[resumed_opt.anchor]["R"], full_opt.state[full_opt.anchor]["R"])


# ------------------------------------------------------------------------------------------------- numerics


def test_bf16_parameters_use_fp32_filter_math():
    model = make_model(dtype=torch.bfloat16)
    opt = create_loko_optimizer(model, num_outputs=M, p_init=0.5)
    before = flat(trainable(model)).clone()
    x, y = data(22, 3, dtype=torch.bfloat16)
    opt.observe(model(x), y)
    opt.step()
    params = trainable(model)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert not torch.equal(flat(params), before)
    assert torch.isfinite(flat(params).float()).all()


def test_non_finite_observation_is_skipped_with_one_warning():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    opt.step()
    before = flat(trainable(model)).clone()
    p_before = state_p(opt, trainable(model)).clone()
    x, y = data(23, 2)
    with pytest.warns(RuntimeWarning, match="skipped 1 step"):
        opt.observe(model(x) * float("nan"), y)
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.observe(model(x) * float("nan"), y)
        opt.step()
    assert opt.skipped_steps == 2
    assert torch.equal(flat(trainable(model)), before)
    assert torch.equal(state_p(opt, trainable(model)), p_before)
    opt.observe(model(x), y)
    opt.step()
    assert opt.skipped_steps == 2 and not torch.equal(flat(trainable(model)), before)


def test_registry_builds_loko():
    model = make_model()
    opt = loraopt.create_optimizer("loko", model, num_outputs=M, beta=0.9)
    assert isinstance(opt, LoKO) and opt.param_groups[0]["beta"] == 0.9


# ------------------------------------------------------------------------------------------------- errors


def test_adamw_style_step_raises_with_instructions():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    x, y = data(24, 2)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"observe\(logits, targets\).*closure"):
        opt.step()


def test_closure_returning_loss_in_softmax_mode_raises():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    x, y = data(25, 2)
    with pytest.raises(ValueError, match=r"closure must return \(outputs, targets\)"):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=1.5), "beta"),
        (dict(r0=0.0), "r0"),
        (dict(r_min=-1.0), "r_min"),
        (dict(q=-1.0), "q"),
        (dict(lr=-0.1), "lr"),
        (dict(jitter=-1.0), "jitter"),
        (dict(p_floor=0.0), "p_floor"),
        (dict(num_outputs=1), "num_outputs"),
        (dict(num_outputs=None), "num_outputs"),
        (dict(p_init=(1e-2, 1e-4)), "low <= high"),
        (dict(p_init="fisher"), "p_init"),
        (dict(p_init=-1.0), "p_init"),
        (dict(batch_mode="chunked"), "batch_mode"),
        (dict(observation="logits"), "observation"),
        (dict(observation="regression", reduce_simplex=True), "reduce_simplex"),
        (dict(seed=-1), "seed"),
        (dict(dtype=torch.float16), "dtype"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    kw = {"num_outputs": M, **kwargs}
    with pytest.raises(ValueError, match=match):
        create_loko_optimizer(make_model(), **kw)


def test_observation_errors():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    x, y = data(26, 2)
    with pytest.raises(ValueError, match="autograd graph"):
        opt.observe(model(x).detach(), y)
    with pytest.raises(ValueError, match="num_outputs"):
        opt.observe(model(x)[:, :2], y)
    with pytest.raises(ValueError, match="drop ignored labels"):
        opt.observe(model(x), torch.tensor([0, -100]))
    with pytest.raises(ValueError, match="one class index per sample"):
        opt.observe(model(x), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="needs targets"):
        opt.observe(model(x))
    with pytest.raises(ValueError, match="alone"):
        opt.observe(model(x), y, forward=lambda i: model(x))
    with pytest.raises(ValueError, match="autograd graph"):
        opt.observe(model(x), y, forward=lambda i: model(x[i : i + 1]).detach())
    opt.observe(model(x), y)
    with pytest.raises(ValueError, match="already called"):
        opt.observe(model(x), y)
    seq = create_loko_optimizer(model, num_outputs=M, batch_mode="sequential")
    with pytest.raises(ValueError, match="forward=lambda i"):
        seq.observe(model(x), y)


def test_loss_mode_errors():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=None, observation="loss")
    x, y = data(27, 2)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.observe(loss.detach())
    with pytest.raises(ValueError, match=r"loss.backward\(\)"):
        opt.step()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with pytest.raises(ValueError, match=r"observe\(loss\)"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.observe(torch.ones(3))
    with pytest.raises(ValueError, match="only the loss"):
        opt.observe(loss, y)
    with pytest.raises(ValueError, match="closure must return the loss"):
        opt.step(lambda: (model(x), y))


def test_factory_errors():
    with pytest.raises(ValueError, match="no LoRA parameter"):
        create_loko_optimizer(MLP(), num_outputs=M)
    frozen = MLP()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        create_loko_optimizer(frozen, num_outputs=M)
    with pytest.raises(TypeError, match="nn.Module"):
        create_loko_optimizer([torch.zeros(2)], num_outputs=M)
    with pytest.raises(ValueError, match="does not take"):
        loraopt.create_optimizer("loko", make_model(), num_outputs=M, momentum=0.9)


# ------------------------------------------------------------------------------------------------- DDP


# rank r observes these sample slices of each step's batch (unequal sizes exercise the padded gather)
_DDP_SLICES = [(0, 3), (3, 5)]
_DDP_STEPS = 3


def _ddp_batches():
    return [data(40 + k, 5, dtype=torch.float32) for k in range(_DDP_STEPS)]


def _ddp_worker(rank: int, world: int, out_dir: str, wrap: bool) -> None:
    torch.set_num_threads(1)
    # File rendezvous: no TCP port that a concurrent test run could also pick.
    init = "file://" + os.path.join(out_dir, "rendezvous")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = make_model(dtype=torch.float32)
        forward = nn.parallel.DistributedDataParallel(model) if wrap else model
        opt = create_loko_optimizer(model, num_outputs=M, p_init="score")
        lo, hi = _DDP_SLICES[rank]
        for x, y in _ddp_batches():
            opt.observe(forward(x[lo:hi]), y[lo:hi])
            opt.step()
        torch.save(
            {
                "params": flat(trainable(model)),
                "p": state_p(opt, trainable(model)),
                "R": opt.state[opt.anchor]["R"].clone(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
    # Skip interpreter teardown: freeing DDP's reducer there can deadlock on the GIL with gloo's worker thread
    # (seen with torch 2.13). Everything this worker produces is already on disk.
    os._exit(0)


@pytest.mark.parametrize("wrap", [False, True], ids=["plain", "ddp-wrapped"])
def test_ddp_two_process_parity_with_single_process_joint_update(tmp_path, wrap):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), wrap), nprocs=2, join=True)
    model = make_model(dtype=torch.float32)
    opt = create_loko_optimizer(model, num_outputs=M, p_init="score")
    for x, y in _ddp_batches():
        opt.observe(model(x), y)
        opt.step()
    ref = {"params": flat(trainable(model)), "p": state_p(opt, trainable(model)), "R": opt.state[opt.anchor]["R"]}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in ("params", "p", "R"):
            torch.testing.assert_close(got[key], ref[key], rtol=0, atol=1e-6, msg=f"rank {rank} {key}")
        assert not torch.equal(got["params"], flat(trainable(make_model(dtype=torch.float32))))


# ------------------------------------------------------------------------------------------------- exact residual


def test_exact_residual_equals_the_linearised_one_for_a_model_linear_in_its_parameters():
    torch.manual_seed(3)
    linear = nn.Linear(D_IN, 2).to(F64)
    twin = nn.Linear(D_IN, 2).to(F64)
    twin.load_state_dict(linear.state_dict())
    kw = dict(num_outputs=2, observation="regression", beta=0.8, p_init=0.05)
    exact = LoKO(linear.named_parameters(), exact_residual=True, model=linear, **kw)  # evaluated at new values
    approx = LoKO(twin.named_parameters(), **kw)
    for t in range(4):
        x, _ = data(20 + t, 3)
        target = torch.randn(3, 2, dtype=F64)
        exact.observe(linear(x), target, forward=lambda i, x=x: linear(x[i : i + 1]))
        exact.step()
        approx.observe(twin(x), target)
        approx.step()
    torch.testing.assert_close(flat(linear.parameters()), flat(twin.parameters()), rtol=0, atol=1e-12)
    torch.testing.assert_close(exact.state[exact.anchor]["R"], approx.state[approx.anchor]["R"], rtol=0, atol=1e-12)


def test_exact_residual_feeds_R_with_the_post_update_outputs():
    from loraopt.functional.ekf import noise_ema_update

    model, twin = make_model(), make_model()
    kw = dict(num_outputs=M, beta=0.7, p_init=0.05)
    opt = create_loko_optimizer(model, exact_residual=True, **kw)
    ref = create_loko_optimizer(twin, **kw)
    for o in (opt, ref):
        o.step()  # allocate state
    params = trainable(model)
    x, y = data(9, 3)
    R0 = opt.state[opt.anchor]["R"].clone()
    H = loop_jacobian(torch.softmax(model(x), -1), params).reshape(3, M, -1)
    opt.observe(model(x), y, forward=lambda i: model(x[i : i + 1]))
    opt.step()
    ref.observe(twin(x), y)
    ref.step()
    # The mean and covariance updates do not depend on the residual ...
    torch.testing.assert_close(flat(params), flat(trainable(twin)), rtol=0, atol=1e-12)
    p_new = state_p(opt, params)
    torch.testing.assert_close(p_new, state_p(ref, trainable(twin)), rtol=0, atol=1e-14)
    # ... R does: it takes y - softmax(f(x; theta_new)), which differs from the linearised residual.
    with torch.no_grad():
        eps = nn.functional.one_hot(y, M).to(F64) - torch.softmax(model(x), -1)
    hph = torch.einsum("ikn,iln->kl", H * p_new, H) / 3
    expected = noise_ema_update(R0, eps, hph, beta=0.7, r_min=opt.defaults["r_min"], noise_floor=opt.defaults["noise_floor"])
    torch.testing.assert_close(opt.state[opt.anchor]["R"], expected, rtol=0, atol=1e-12)
    assert not torch.allclose(opt.state[opt.anchor]["R"], ref.state[ref.anchor]["R"], rtol=0, atol=1e-9)


def test_exact_residual_sequential_batch_equals_single_sample_steps():
    model, twin = make_model(), make_model()
    kw = dict(num_outputs=M, exact_residual=True, batch_mode="sequential", p_init=0.05)
    opt, ref = create_loko_optimizer(model, **kw), create_loko_optimizer(twin, **kw)
    x, y = data(11, 3)
    opt.observe(model(x), y, forward=lambda i: model(x[i : i + 1]))
    opt.step()
    for i in range(3):
        ref.observe(twin(x[i : i + 1]), y[i : i + 1], forward=lambda j, i=i: twin(x[i : i + 1]))
        ref.step()
    torch.testing.assert_close(flat(trainable(model)), flat(trainable(twin)), rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[opt.anchor]["R"], ref.state[ref.anchor]["R"], rtol=0, atol=1e-12)


def test_exact_residual_errors():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M, exact_residual=True)
    x, y = data(12, 2)
    with pytest.raises(ValueError, match="forward=lambda i"):
        opt.observe(model(x), y)
    with pytest.raises(ValueError, match="softmax and regression"):
        create_loko_optimizer(model, num_outputs=None, observation="loss", exact_residual=True)
    with pytest.raises(ValueError, match="exact_residual must be True or False"):
        create_loko_optimizer(model, num_outputs=M, exact_residual=1)


# ------------------------------------------------------------------------------------------------- Jacobian paths

PATHS = ("func", "replicate", "per-sample", "batch")


def _observe_with(opt, model, x, y, path):
    """The same observation through each Jacobian path."""
    opt.jacobian = path
    if path == "batch":
        opt.observe(model(x), y)
    elif path == "per-sample" and opt.param_groups[0]["batch_mode"] == "joint":
        opt.observe(model(x), y, forward=lambda i: model(x[i : i + 1]))
    else:
        opt.observe(model(x), y, inputs=x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduce", [False, True], ids=["m", "m-1"])
def test_jacobian_rows_of_every_path_equal_a_loop_of_autograd_grad(path, reduce):
    model = make_model()
    params = trainable(model)
    x, y = data(50, 4)
    ref = loop_jacobian(torch.softmax(model(x), -1), params).reshape(4, M, -1)
    opt = create_loko_optimizer(model, num_outputs=M, reduce_simplex=reduce)
    _observe_with(opt, model, x, y, path)
    assert opt.last_jacobian_path == path
    m_obs = M - 1 if reduce else M
    H = opt._pending.H
    assert H.dtype == F64 and H.shape == (4 * m_obs, ref.shape[-1])
    torch.testing.assert_close(H, ref[:, :m_obs].reshape(4 * m_obs, -1), rtol=0, atol=1e-10)
    e = nn.functional.one_hot(y, M).to(F64) - torch.softmax(model(x), -1).detach()
    torch.testing.assert_close(opt._pending.e, e[:, :m_obs], rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("observation", ["softmax", "regression"])
def test_update_is_the_same_for_every_jacobian_path(path, observation):
    out = {}
    for p in ("batch", path):
        model = make_model()
        opt = create_loko_optimizer(model, num_outputs=M, observation=observation, beta=0.8)
        for k in range(3):
            x, y = data(60 + k, 4)
            noise = torch.randn(4, M, dtype=F64, generator=torch.Generator().manual_seed(k))
            target = y if observation == "softmax" else noise
            _observe_with(opt, model, x, target, p)
            opt.step()
        out[p] = (flat(trainable(model)), state_p(opt, trainable(model)), opt.state[opt.anchor]["R"].clone())
    for a, b in zip(out["batch"], out[path]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_sequential_mode_from_inputs_equals_single_sample_steps():
    x, y = data(14, 4)
    ref_model = make_model()
    ref = create_loko_optimizer(ref_model, num_outputs=M)
    for i in range(4):
        ref.observe(ref_model(x[i : i + 1]), y[i : i + 1])
        ref.step()
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M, batch_mode="sequential")
    opt.observe(model(x), y, inputs=x)
    opt.step()
    torch.testing.assert_close(flat(trainable(model)), flat(trainable(ref_model)), rtol=0, atol=1e-13)


def test_auto_path_choice():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    assert opt.jacobian == "auto"
    x, y = data(70, 3)
    cases = [
        (lambda: opt.observe(model(x[:1]), y[:1]), "batch"),  # b = 1: the outputs' own graph, no extra forward
        (lambda: opt.observe(model(x[:1]), y[:1], inputs=x[:1]), "batch"),
        (lambda: opt.observe(model(x), y, inputs=x), "func"),
        (lambda: opt.observe(model(x).detach(), y, inputs=x), "func"),  # outputs only supply the shapes
        (lambda: opt.observe(model(x), y, forward=lambda i: model(x[i : i + 1])), "per-sample"),
        (lambda: opt.observe(model(x), y), "batch"),
    ]
    for call, path in cases:
        call()
        assert opt.last_jacobian_path == path
        opt.clear_observation()
    with pytest.raises(ValueError, match="jacobian must be one of"):
        opt.jacobian = "jacfwd"
    with pytest.raises(ValueError, match="jacobian must be one of"):
        create_loko_optimizer(model, num_outputs=M, jacobian="fast")
    opt.jacobian = "func"
    with pytest.raises(ValueError, match="inputs=x"):
        opt.observe(model(x), y)
    opt.jacobian = "per-sample"
    with pytest.raises(ValueError, match="inputs=x"):
        opt.observe(model(x), y)
    bare = LoKO(trainable(model), num_outputs=M)
    with pytest.raises(ValueError, match="needs the model"):
        bare.observe(model(x), y, inputs=x)
    bare.observe(model(x), y, inputs=x, model=model)
    assert bare.last_jacobian_path == "func"
    with pytest.raises(ValueError, match="inputs hold 2 samples"):
        opt.observe(model(x), y, inputs=x[:2])
    with pytest.raises(ValueError, match="not parameters of the model"):
        LoKO(trainable(model), num_outputs=M, jacobian="func").observe(model(x), y, inputs=x, model=make_model())


class _DataDependent(nn.Module):
    """Python control flow on tensor values: torch.func.vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D_IN, M)

    def forward(self, x):
        z = self.fc(x)
        return z if float(z.sum()) > -1e9 else -z


def test_model_that_cannot_be_vmapped_falls_back_once_with_a_warning():
    torch.manual_seed(0)
    model = get_peft_model(_DataDependent(), LoraConfig(target_modules=["fc"], r=2)).to(F64)
    twin = get_peft_model(_DataDependent(), LoraConfig(target_modules=["fc"], r=2)).to(F64)
    twin.load_state_dict(model.state_dict())
    opt = create_loko_optimizer(model, num_outputs=M)
    ref = create_loko_optimizer(twin, num_outputs=M, jacobian="batch")
    x, y = data(71, 3)
    with pytest.warns(RuntimeWarning, match="torch.func Jacobian path does not run on this model"):
        opt.observe(model(x), y, inputs=x)
    assert opt.last_jacobian_path == "per-sample"
    opt.step()
    ref.observe(twin(x), y)
    ref.step()
    torch.testing.assert_close(flat(trainable(model)), flat(trainable(twin)), rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remembered: no second attempt, no second warning
        opt.observe(model(x), y, inputs=x)
    assert opt.last_jacobian_path == "per-sample"
    strict = create_loko_optimizer(model, num_outputs=M, jacobian="func")
    with pytest.raises(ValueError, match="cannot be vmapped"):
        strict.observe(model(x), y, inputs=x)


def test_hugging_face_model_outputs_and_dict_inputs():
    from toys import tiny_bert_classifier

    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(0, 64, (3, 7), generator=g),
             "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    y = torch.tensor([0, 2, 1])  # no padding: the all-ones mask is dropped for the func path
    out = {}
    for path in ("batch", "func", "replicate", "per-sample"):
        model = tiny_bert_classifier(num_labels=3).to(F64)
        opt = create_loko_optimizer(model, num_outputs=3, jacobian=path)
        for _ in range(2):
            outputs = model(**batch)  # a SequenceClassifierOutput, not a tensor
            opt.observe(outputs, y, **({} if path == "batch" else {"inputs": batch}))
            assert opt.last_jacobian_path == path
            opt.step()
        out[path] = flat(trainable(model))
    torch.testing.assert_close(out["func"], out["batch"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["per-sample"], out["batch"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["replicate"], out["batch"], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------- bad inputs


def _opt_snapshot(opt, model):
    return (flat(trainable(model)).clone(), {k: {kk: vv.clone() if torch.is_tensor(vv) else vv for kk, vv in v.items()}
                                             for k, v in opt.state_dict()["state"].items()},
            [dict(g) for g in opt.state_dict()["param_groups"]])


def _assert_unchanged(before, opt, model):
    params, state, groups = before
    assert torch.equal(flat(trainable(model)), params)
    now = opt.state_dict()
    assert now["state"].keys() == state.keys()
    for k in state:
        assert now["state"][k].keys() == state[k].keys()
        for kk in state[k]:
            assert torch.equal(now["state"][k][kk], state[k][kk]), (k, kk)
    assert now["param_groups"] == groups


def _trained(seed=0, **kw):
    model = make_model(seed)
    opt = create_loko_optimizer(model, num_outputs=M, **kw)
    x, y = data(80, 3)
    opt.observe(model(x), y, inputs=x)
    opt.step()
    return model, opt


def test_load_state_dict_refuses_another_optimizers_state_and_leaves_the_optimizer_unchanged():
    model, opt = _trained()
    twin = make_model()
    adamw = torch.optim.AdamW(trainable(twin), lr=1e-3)
    nn.functional.cross_entropy(twin(data(1, 2)[0]), data(1, 2)[1]).backward()
    adamw.step()
    before = _opt_snapshot(opt, model)
    with pytest.raises(ValueError, match="another optimizer type"):
        opt.load_state_dict(adamw.state_dict())
    _assert_unchanged(before, opt, model)
    # LoKO hyperparameters but AdamW-like state entries
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1] = {**sd["state"][1], "exp_avg": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"does not keep"):
        opt.load_state_dict(sd)
    _assert_unchanged(before, opt, model)
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict({"state": {}})


def test_load_state_dict_refuses_other_ranks_nan_R_and_bad_shapes():
    model, opt = _trained()
    before = _opt_snapshot(opt, model)
    lora = LoraConfig(target_modules=["fc1", "fc2"], r=2, modules_to_save=["head"])
    other_model = get_peft_model(MLP(), lora).to(F64)
    other = create_loko_optimizer(other_model, num_outputs=M)
    x, y = data(81, 2)
    other.observe(other_model(x), y)
    other.step()
    with pytest.raises(ValueError, match="other ranks"):
        opt.load_state_dict(other.state_dict())
    _assert_unchanged(before, opt, model)

    cases = []
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["R"] = torch.full_like(sd["state"][0]["R"], float("nan"))
    cases.append((sd, "non-finite"))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["R"] = torch.eye(M + 1, dtype=F64)
    cases.append((sd, "R has shape"))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][2]["p"] = -sd["state"][2]["p"]
    cases.append((sd, "non-positive"))
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][2]["p"] = sd["state"][2]["p"].reshape(-1)[:3]
    cases.append((sd, "covariance p has shape"))
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["skipped"]
    cases.append((sd, "lacks state"))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0] = {**sd["param_groups"][0], "num_outputs": M + 2}
    cases.append((sd, "num_outputs"))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0] = {**sd["param_groups"][0], "beta": float("nan")}
    cases.append((sd, "beta"))
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"] = sd["param_groups"][:1]
    cases.append((sd, "parameter groups"))
    for sd, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(sd)
        _assert_unchanged(before, opt, model)
    # a good one still loads (and an empty state, saved before the first step, too)
    opt.load_state_dict(opt.state_dict())
    fresh = create_loko_optimizer(make_model(), num_outputs=M)
    fresh.load_state_dict(create_loko_optimizer(make_model(), num_outputs=M).state_dict())


def test_every_skipped_step_is_counted_and_the_warning_is_rate_limited():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    x, y = data(82, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            opt.observe(model(x) * float("nan"), y)
            opt.step()
    skips = [w for w in caught if "step(s) so far" in str(w.message)]
    assert opt.skipped_steps == 12 and int(opt.state[opt.anchor]["skipped"]) == 12
    assert len(skips) == 2 and "skipped 1 step" in str(skips[0].message) and "skipped 10 step" in str(skips[1].message)


def test_nan_lr_from_a_scheduler_is_a_counted_skip_and_a_negative_one_an_error():
    model, opt = _trained()
    before = _opt_snapshot(opt, model)
    x, y = data(83, 2)
    opt.param_groups[0]["lr"] = float("nan")
    opt.observe(model(x), y)
    with pytest.warns(RuntimeWarning, match="non-finite lr"):
        opt.step()
    assert opt.skipped_steps == 1 and not opt.has_pending_observation
    opt.param_groups[0]["lr"] = -0.1
    opt.observe(model(x), y)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = 1.0
    _assert_unchanged(before, opt, model)


def test_soft_targets_must_be_probabilities():
    model, opt = _trained()
    before = _opt_snapshot(opt, model)
    x, _ = data(84, 2)
    for bad, match in (
        (torch.tensor([[0.5, 0.3, 0.1], [0.2, 0.2, 0.6]], dtype=F64), "sample 0 has sum 0.9"),
        (torch.tensor([[1.5, -0.5, 0.0], [0.2, 0.2, 0.6]], dtype=F64), "min -0.5"),
        (torch.tensor([[2.0, 3.0, 5.0], [1.0, 1.0, 1.0]], dtype=F64), "normalise"),
        (torch.tensor([[float("nan"), 0.5, 0.5], [0.2, 0.2, 0.6]], dtype=F64), "finite"),
    ):
        with pytest.raises(ValueError, match=match):
            opt.observe(model(x), bad)
        assert not opt.has_pending_observation
        opt.step()
        _assert_unchanged(before, opt, model)
    opt.observe(model(x), torch.tensor([[0.5, 0.25, 0.25], [0.0, 0.0, 1.0]], dtype=F64))  # fine


def test_observe_accepts_model_outputs_with_logits():
    class Out:
        def __init__(self, logits):
            self.logits = logits

    x, y = data(85, 3)
    results = []
    for wrap in (lambda z: z, Out, lambda z: {"logits": z}):
        model = make_model()
        opt = create_loko_optimizer(model, num_outputs=M)
        opt.observe(wrap(model(x)), y)
        opt.step()
        results.append(flat(trainable(model)))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    with pytest.raises(ValueError, match=r"outputs\[0\]"):
        opt.observe((model(x),), y)
    with pytest.raises(TypeError, match="ModelOutput"):
        opt.observe("logits", y)
    loss_opt = create_loko_optimizer(model, num_outputs=None, observation="loss")

    class LossOut:
        def __init__(self, loss):
            self.loss = loss

    loss_opt.observe(LossOut(nn.functional.cross_entropy(model(x), y)))
    assert loss_opt.has_pending_observation


def test_detached_outputs_error_names_the_real_cause():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M)
    x, y = data(86, 2)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"torch.no_grad\(\) or torch.set_grad_enabled\(False\) is active"):
            opt.observe(model(x), y)
    with torch.inference_mode():
        z = model(x)
    with pytest.raises(ValueError, match="inference_mode"):
        opt.observe(z, y)
    with pytest.raises(ValueError, match=r"\.detach\(\)ed.*inputs=x"):
        opt.observe(model(x).detach(), y)
    frozen = make_model()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        opt.observe(frozen(x), y)


def test_failing_sequential_step_is_all_or_nothing():
    model, opt = _trained(batch_mode="sequential")
    before = _opt_snapshot(opt, model)
    x, y = data(87, 4)
    calls = []

    def forward(i):
        calls.append(i)
        if i == 2:
            raise RuntimeError("data loader broke")
        return model(x[i : i + 1])

    opt.observe(model(x), y, forward=forward)
    with pytest.raises(RuntimeError, match="data loader broke"):
        opt.step()
    assert calls == [0, 1, 2]  # samples 0 and 1 were applied before the failure, then rolled back
    _assert_unchanged(before, opt, model)


def test_failing_exact_residual_step_is_all_or_nothing_and_a_failed_first_step_leaves_no_state():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=M, exact_residual=True)
    before = _opt_snapshot(opt, model)
    x, y = data(88, 2)
    n = {"calls": 0}

    def forward(i):
        n["calls"] += 1
        if n["calls"] > 2:  # the re-evaluation after the update fails
            raise RuntimeError("out of memory")
        return model(x[i : i + 1])

    opt.observe(model(x), y, forward=forward)
    with pytest.raises(RuntimeError, match="out of memory"):
        opt.step()
    _assert_unchanged(before, opt, model)
    assert len(opt.state) == 0


def test_padded_hugging_face_batch_falls_back_to_one_sample_graphs():
    from toys import tiny_bert_classifier

    g = torch.Generator().manual_seed(4)
    batch = {"input_ids": torch.randint(0, 64, (3, 7), generator=g),
             "attention_mask": torch.ones(3, 7, dtype=torch.long)}
    batch["attention_mask"][0, 5:] = 0
    y = torch.tensor([1, 0, 2])
    out = {}
    for path in ("batch", "auto"):
        model = tiny_bert_classifier(num_labels=3).to(F64)
        opt = create_loko_optimizer(model, num_outputs=3, jacobian=path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.observe(model(**batch), y, **({} if path == "batch" else {"inputs": batch}))
        if path == "auto":
            assert opt.last_jacobian_path == "per-sample"
            assert any("torch.func Jacobian path does not run" in str(w.message) for w in caught)
        opt.step()
        out[path] = flat(trainable(model))
    torch.testing.assert_close(out["auto"], out["batch"], rtol=0, atol=1e-10)


def test_scalar_loss_second_step_without_a_new_observation_names_the_cause():
    model = make_model()
    opt = create_loko_optimizer(model, num_outputs=None, observation="loss")
    x, y = data(89, 3)
    loss = nn.functional.cross_entropy(model(x), y)
    opt.observe(loss)
    loss.backward()
    opt.step()
    before = flat(trainable(model)).clone()
    with pytest.raises(ValueError, match="called again without a new observe"):
        opt.step()
    assert torch.equal(flat(trainable(model)), before)


def test_rank_0_lora_layer_is_refused():
    class Adapter(nn.Module):
        def __init__(self, r):
            super().__init__()
            self.lora_A = nn.ModuleDict({"default": nn.Linear(D_IN, r, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(r, M, bias=False)})

        def forward(self, x):
            return self.lora_B["default"](self.lora_A["default"](x))

    model = nn.Sequential(Adapter(0))
    with pytest.raises(ValueError, match="rank 0"):
        create_loko_optimizer(model, num_outputs=M)


def test_observation_instance_equals_the_string_option():
    from loraopt.functional.observations import RegressionObservation, SoftmaxObservation

    x, y = data(90, 3)
    out = []
    for kw in (dict(num_outputs=M, reduce_simplex=True), dict(observation=SoftmaxObservation(M, reduce_simplex=True))):
        model = make_model()
        opt = create_loko_optimizer(model, **kw)
        opt.observe(model(x), y)
        opt.step()
        assert opt.observation == SoftmaxObservation(M, reduce_simplex=True)
        out.append(flat(trainable(model)))
    assert torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="disagrees"):
        create_loko_optimizer(make_model(), num_outputs=2, observation=RegressionObservation(M))
    with pytest.raises(ValueError, match="num_outputs must be an integer >= 2"):
        SoftmaxObservation(1)


def test_exact_residual_evaluates_the_new_values_without_writing_the_parameters():
    model = make_model()
    params = trainable(model)
    opt = create_loko_optimizer(model, num_outputs=M, exact_residual=True)
    x, y = data(91, 2)
    seen = []

    def forward(i):
        seen.append(flat(params).clone())  # what the parameter tensors hold while the model runs
        return model(x[i : i + 1])

    before = flat(params).clone()
    opt.observe(model(x), y, forward=forward)
    versions = [p._version for p in params]
    opt.step()
    assert len(seen) == 4  # two one-sample graphs for the rows, two re-evaluations for R
    assert torch.equal(seen[2], before) and torch.equal(seen[3], before)  # the model ran at the new values ...
    assert [p._version - v for p, v in zip(params, versions)] == [1] * len(params)  # ... written once, at the end
    assert not torch.equal(flat(params), before)
