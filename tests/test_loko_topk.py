"""LoKO's reduced softmax observation (``top_k``): which classes it observes, its rows against autograd on every
Jacobian path, the Kalman update against the pure filter with those rows, ``top_k = m`` against the full
observation, and its errors."""

from __future__ import annotations

import pytest
import torch

from loraopt.functional.ekf import EKFConfig, diag_ekf_update
from loraopt.functional.observations import SoftmaxObservation
from loraopt.functional.reference import loop_jacobian
from loraopt.optim.loko import create_loko_optimizer
from test_loko import F64, assert_filter_state, data, flat, make_model, state_p, trainable

M4 = 4  # classes of the models below (top_k < m needs m > 2 to pick among the others)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_select_puts_the_target_first_then_the_most_probable_others():
    obs = SoftmaxObservation(5, top_k=3)
    p = torch.tensor([[0.1, 0.5, 0.05, 0.3, 0.05], [0.6, 0.1, 0.1, 0.1, 0.1]], dtype=F64)
    y = torch.nn.functional.one_hot(torch.tensor([3, 4]), 5).to(F64)
    slots = obs.select(p, y)
    assert slots[0].tolist() == [3, 1, 0]
    assert slots[1, :2].tolist() == [4, 0] and slots[1, 2].item() in (1, 2, 3)  # a tie among the others
    assert SoftmaxObservation(5, top_k=1).select(p, y).tolist() == [[3], [4]]
    e = obs.innovation(y, p)
    torch.testing.assert_close(e[0], torch.tensor([1 - 0.3, -0.5, -0.1], dtype=F64))


def _reference(model, opt, x, y, top_k, **cfg_kw):
    """One joint update through the pure filter with the rows of the selected classes (a loop Jacobian)."""
    params = trainable(model)
    h = torch.softmax(model(x), -1)
    onehot = torch.nn.functional.one_hot(y, M4).to(h.dtype)
    slots = SoftmaxObservation(M4, top_k=top_k).select(h.detach(), onehot)
    H_all = loop_jacobian(h, params).reshape(len(y), M4, -1)
    H = torch.stack([H_all[i, slots[i]] for i in range(len(y))])
    e = (onehot - h.detach()).gather(-1, slots)
    R = opt.state[opt.anchor]["R"]
    return diag_ekf_update(flat(params), state_p(opt, params), R, H, e, EKFConfig(**{"noise_floor": "eig", **cfg_kw}))


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_a_topk_step_equals_the_pure_filter_with_the_selected_rows(top_k):
    model = make_model(m=M4)
    opt = create_loko_optimizer(model, num_outputs=M4, top_k=top_k, lr=0.7, beta=0.9, jitter=1e-6)
    opt.step()  # allocates state only
    x, y = data(2, 5, m=M4)
    ref = _reference(model, opt, x, y, top_k, lr=0.7, beta=0.9, r_min=1e-4, jitter=1e-6, jitter_abs=1e-12)
    opt.observe(model(x), y)
    opt.step()
    assert_filter_state(opt, trainable(model), ref)
    assert opt.state[opt.anchor]["R"].shape == (top_k, top_k)


def test_topk_rows_agree_on_every_jacobian_path():
    x, y = data(4, 6, m=M4)
    out = {}
    for path in ("batch", "func", "per-sample"):
        model = make_model(m=M4)
        opt = create_loko_optimizer(model, num_outputs=M4, top_k=2, jacobian=path)
        for _ in range(3):
            opt.observe(model(x), y, **({} if path == "batch" else {"inputs": x}))
            assert opt.last_jacobian_path == path
            opt.step()
        out[path] = (flat(trainable(model)), opt.state[opt.anchor]["R"].clone())
    for path in ("func", "per-sample"):
        torch.testing.assert_close(out[path][0], out["batch"][0], rtol=0, atol=1e-10)
        torch.testing.assert_close(out[path][1], out["batch"][1], rtol=0, atol=1e-12)


def test_topk_equal_to_m_gives_the_full_observations_first_update():
    """The slots are then a permutation of the classes and R_0 = r0 I is permutation-invariant, so the first update
    is the full observation's (later ones differ through R's EMA over slots instead of classes)."""
    x, y = data(5, 4, m=M4)
    out = {}
    for top_k in (None, M4):
        model = make_model(m=M4)
        opt = create_loko_optimizer(model, num_outputs=M4, top_k=top_k)
        opt.observe(model(x), y)
        opt.step()
        out[top_k] = flat(trainable(model))
    torch.testing.assert_close(out[M4], out[None], rtol=0, atol=1e-12)


def test_topk_sequential_batch_equals_single_sample_steps():
    x, y = data(6, 3, m=M4)
    seq_model, one_model = make_model(m=M4), make_model(m=M4)
    seq = create_loko_optimizer(seq_model, num_outputs=M4, top_k=2, batch_mode="sequential")
    one = create_loko_optimizer(one_model, num_outputs=M4, top_k=2)
    seq.observe(seq_model(x), y, inputs=x)
    seq.step()
    for i in range(3):
        one.observe(one_model(x[i:i + 1]), y[i:i + 1])
        one.step()
    torch.testing.assert_close(flat(trainable(seq_model)), flat(trainable(one_model)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=0), "top_k must be an integer in"),
    (dict(top_k=M4 + 1), "top_k must be an integer in"),
    (dict(top_k=2.0), "top_k must be an integer in"),
    (dict(top_k=2, reduce_simplex=True), "two different reductions"),
    (dict(top_k=2, exact_residual=True), "exact_residual=True"),
    (dict(top_k=2, observation="regression"), "top_k only applies to observation='softmax'"),
])
def test_topk_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_loko_optimizer(make_model(m=M4), num_outputs=M4, **kwargs)


def test_topk_state_dict_roundtrip_and_older_state_dicts_load():
    model = make_model(m=M4)
    opt = create_loko_optimizer(model, num_outputs=M4, top_k=2)
    x, y = data(7, 3, m=M4)
    opt.observe(model(x), y)
    opt.step()
    saved = opt.state_dict()
    fresh = create_loko_optimizer(model, num_outputs=M4, top_k=2)
    fresh.load_state_dict(saved)
    torch.testing.assert_close(fresh.state[fresh.anchor]["R"], opt.state[opt.anchor]["R"])
    with pytest.raises(ValueError, match="top_k"):
        create_loko_optimizer(model, num_outputs=M4).load_state_dict(saved)
    # A state dict written before top_k existed (no such key) loads into a full-observation filter.
    full = create_loko_optimizer(model, num_outputs=M4)
    full.observe(model(x), y)
    full.step()
    old = full.state_dict()
    for group in old["param_groups"]:
        del group["top_k"]
    create_loko_optimizer(model, num_outputs=M4).load_state_dict(old)
