"""Jacobian rows from replicated samples (loraopt.lora.per_sample) and the per-sample layer gradients they use,
against loops of autograd and the torch.func path, in float64."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loraopt.functional.jacobian import conv2d_sample_grads, func_jacobian, linear_sample_grads
from loraopt.functional.observations import SoftmaxObservation
from loraopt.lora.per_sample import ReplicationUnsupported, replicated_jacobian, replication_problem
from loraopt.optim import loko_rows
from loraopt.optim.loko import LoKO, create_loko_optimizer

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _loop_sample_grads(layer, x):
    """Per-sample weight / bias gradients of sum(layer(x_i) * w_i) by a loop of autograd.grad, with w_i fixed random
    cotangents; returns (dW, db, g) where g is the stacked output cotangent."""
    out = layer(x)
    g = torch.randn(out.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    dW, db = [], []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad((layer(x[i : i + 1]) * g[i : i + 1]).sum(), [layer.weight, layer.bias])
        dW.append(grads[0])
        db.append(grads[1])
    return torch.stack(dW), torch.stack(db), g


@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5)], ids=["flat", "tokens"])
def test_linear_sample_grads_equal_a_loop_of_autograd(shape):
    torch.manual_seed(0)
    layer = nn.Linear(5, 7).to(F64)
    x = torch.randn(shape, dtype=F64)
    ref_w, ref_b, g = _loop_sample_grads(layer, x)
    dW, db = linear_sample_grads(x, g, bias=True)
    torch.testing.assert_close(dW, ref_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(db, ref_b, rtol=0, atol=1e-12)
    assert linear_sample_grads(x, g, bias=False)[1] is None


@pytest.mark.parametrize(
    "geometry",
    [dict(kernel_size=1), dict(kernel_size=3, padding=1), dict(kernel_size=(3, 2), stride=2, padding=(1, 0), dilation=(1, 2))],
    ids=["pointwise", "3x3", "strided-dilated"],
)
def test_conv2d_sample_grads_equal_a_loop_of_autograd(geometry):
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, **geometry).to(F64)
    x = torch.randn(5, 3, 9, 8, dtype=F64)
    ref_w, ref_b, g = _loop_sample_grads(layer, x)
    dW, db = conv2d_sample_grads(x, g, tuple(layer.kernel_size), stride=tuple(layer.stride),
                                 padding=tuple(layer.padding), dilation=tuple(layer.dilation), bias=True)
    torch.testing.assert_close(dW, ref_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(db, ref_b, rtol=0, atol=1e-12)


class ConvNet(nn.Module):
    """LoRA on a 3x3 and a pointwise convolution, batch norm (eval), a frozen depthwise convolution and a head."""

    def __init__(self, m=5):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8)
        self.fc = nn.Linear(8, m)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        return self.fc(torch.relu(self.dw(self.c2(x))).mean((2, 3)))


def conv_model(seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(ConvNet(), LoraConfig(r=2, target_modules=["c1", "c2"], modules_to_save=["fc"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
        bn = model.base_model.model.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model.to(F64).eval()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("top_k", [None, 2])
def test_replicated_rows_equal_the_torch_func_rows(top_k):
    model = conv_model()
    params = trainable(model)
    x = torch.randn(3, 3, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    obs = SoftmaxObservation(num_outputs=5, top_k=top_k)
    slots = None
    if top_k:
        y = obs.encode_targets(torch.tensor([0, 4, 2]), 3, x.device, F64)
        slots = obs.select(obs.predict(model(x).detach()), y)
    ref_H, ref_h = func_jacobian(model, x, params, obs.observe_one, dtype=F64, per_sample=slots)
    H, h = replicated_jacobian(model, x, params, obs.observe_one, obs.dim, dtype=F64, per_sample=slots, verify=True)
    assert H.shape == (3 * obs.dim, sum(p.numel() for p in params))
    assert H.abs().sum() > 0
    torch.testing.assert_close(H, ref_H, rtol=0, atol=1e-12)
    torch.testing.assert_close(h, ref_h, rtol=0, atol=1e-12)


def test_loko_update_from_replicated_rows_equals_the_batch_graph_update():
    out = {}
    for path in ("batch", "replicate"):
        model = conv_model()
        opt = create_loko_optimizer(model, num_outputs=5, jacobian=path)
        for k in range(3):
            g = torch.Generator().manual_seed(10 + k)
            x, y = torch.randn(2, 3, 8, 8, dtype=F64, generator=g), torch.randint(5, (2,), generator=g)
            opt.observe(model(x), y, **({} if path == "batch" else {"inputs": x}))
            assert opt.last_jacobian_path == path
            opt.step()
        out[path] = torch.cat([p.detach().reshape(-1) for p in trainable(model)])
    torch.testing.assert_close(out["replicate"], out["batch"], rtol=0, atol=1e-12)


class Tied(nn.Module):
    """The head's weight is also read outside the head: per-layer gradients miss that use."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h) + (h @ self.head.weight.T) * 0.5


def test_what_replication_refuses():
    model = conv_model()
    params = trainable(model)
    assert replication_problem(model, params) is None
    model.base_model.model.bn.train()
    assert "training mode" in replication_problem(model, params)
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    assert "Conv2d" in replication_problem(grouped, list(grouped.parameters()))
    norm = nn.LayerNorm(4)
    assert "LayerNorm" in replication_problem(norm, list(norm.parameters()))
    assert "not owned" in replication_problem(nn.Linear(2, 2), [nn.Parameter(torch.zeros(3))])
    tied = Tied().to(F64)
    obs = SoftmaxObservation(num_outputs=3)
    x = torch.randn(2, 4, dtype=F64)
    with pytest.raises(ReplicationUnsupported, match="used outside its layer"):
        replicated_jacobian(tied, x, list(tied.parameters()), obs.observe_one, 3, dtype=F64, verify=True)


def test_explicit_replicate_errors_say_what_to_do():
    model = conv_model()
    opt = create_loko_optimizer(model, num_outputs=5, jacobian="replicate")
    x, y = torch.randn(2, 3, 8, 8, dtype=F64), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="inputs=x"):
        opt.observe(model(x), y)
    model.base_model.model.bn.train()
    with pytest.raises(ValueError, match="cannot come from replicated samples.*training mode"):
        opt.observe(model(x), y, inputs=x)


def test_auto_uses_replication_where_preferred_and_falls_back_once(monkeypatch):
    monkeypatch.setattr(loko_rows, "prefers_replication", lambda device: True)
    model = conv_model()
    opt = create_loko_optimizer(model, num_outputs=5)
    x, y = torch.randn(2, 3, 8, 8, dtype=F64), torch.tensor([3, 1])
    opt.observe(model(x), y, inputs=x)
    assert opt.last_jacobian_path == "replicate"
    opt.clear_observation()
    opt.observe(model(x[:1]), y[:1], inputs=x[:1])  # b = 1: the outputs' own graph is as cheap
    assert opt.last_jacobian_path == "batch"
    opt.clear_observation()
    opt.observe(model(x), y)  # no inputs: nothing to replicate
    assert opt.last_jacobian_path == "batch"
    opt.clear_observation()
    model.base_model.model.bn.train()
    fresh = create_loko_optimizer(model, num_outputs=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.observe(model(x), y, inputs=x)  # refused up front (torch.func then fails on batch norm too)
    assert fresh.last_jacobian_path == "per-sample"
    assert "training mode" in fresh._replicate_status[id(model)]
    assert not any("replicated samples" in str(w.message) for w in caught)
    # A parameter used outside its layer: found by the first use's check, warned once, then never tried again;
    # the update is the batch graph's.
    torch.manual_seed(0)
    tied, twin = Tied().to(F64), Tied().to(F64)
    twin.load_state_dict(tied.state_dict())
    opt = LoKO(tied.named_parameters(), num_outputs=3, model=tied)
    ref = LoKO(twin.named_parameters(), num_outputs=3, jacobian="batch")
    x, y = torch.randn(2, 4, dtype=F64), torch.tensor([0, 2])
    with pytest.warns(RuntimeWarning, match="replicated samples are not used"):
        opt.observe(tied(x), y, inputs=x)
    assert opt.last_jacobian_path == "func"
    opt.step()
    ref.observe(twin(x), y)
    ref.step()
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in tied.parameters()]),
                               torch.cat([p.reshape(-1) for p in twin.parameters()]), rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.observe(tied(x), y, inputs=x)
    assert opt.last_jacobian_path == "func"


def test_choose_path_prefers_replication_only_on_an_accelerator():
    common = dict(mode="auto", b=4, live=True, has_forward=True, has_inputs=True, func_failed=False, sequential=False)
    assert loko_rows.choose_path(**common, replicate_ok=True, accelerator=True) == "replicate"
    assert loko_rows.choose_path(**common, replicate_ok=True, accelerator=False) == "func"
    assert loko_rows.choose_path(**common, replicate_ok=False, accelerator=True) == "func"
    assert loko_rows.choose_path(**{**common, "b": 1}, replicate_ok=True, accelerator=True) == "batch"
    assert loko_rows.choose_path(**{**common, "sequential": True}, replicate_ok=True, accelerator=True) == "per-sample"
    assert not loko_rows.prefers_replication(torch.device("cpu"))


def test_auto_falls_back_when_the_replicated_batch_does_not_fit(monkeypatch):
    monkeypatch.setattr(loko_rows, "prefers_replication", lambda device: True)

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(loko_rows, "replicated_jacobian", out_of_memory)
    model, twin = conv_model(), conv_model()
    opt = create_loko_optimizer(model, num_outputs=5)
    ref = create_loko_optimizer(twin, num_outputs=5, jacobian="func")
    x, y = torch.randn(2, 3, 8, 8, dtype=F64), torch.tensor([0, 4])
    with pytest.warns(RuntimeWarning, match="out of memory"):
        opt.observe(model(x), y, inputs=x)
    assert opt.last_jacobian_path == "func"
    opt.step()
    ref.observe(twin(x), y, inputs=x)
    ref.step()
    torch.testing.assert_close(torch.cat([p.reshape(-1) for p in trainable(model)]),
                               torch.cat([p.reshape(-1) for p in trainable(twin)]), rtol=0, atol=1e-12)
    explicit = create_loko_optimizer(model, num_outputs=5, jacobian="replicate")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        explicit.observe(model(x), y, inputs=x)
