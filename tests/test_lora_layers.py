"""Finding LoRA layers and capturing (X, S) exactly (specs/psi-lora.md §3, pitfalls 2, 3, 5, 6)."""

import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from loraopt.lora import GradientCapture, NoLoRALayersError, find_lora_layers, split_lora_parameters
from toys import MLP, SUPPORTED, UNSUPPORTED, loss_fn, make_batch, make_model


# ------------------------------------------------------------------------------------------------ discovery


@pytest.mark.parametrize("kind", SUPPORTED)
def test_supported_layers_are_found_and_paired(kind):
    model = make_model(kind)
    split = split_lora_parameters(model)
    assert len(split.layers) == 2 and not split.unsupported
    for layer in split.layers:
        assert layer.a_name.replace(".lora_A.", ".lora_B.") == layer.b_name
        assert layer.adapter == "default"
        assert layer.kind == ("pointwise_conv" if kind == "conv" else "linear")
        assert layer.scaling == pytest.approx(2.0)
    assert {n.split(".modules_to_save.")[0] for n, _ in split.other} == {"base_model.model.head"}


def test_gpt2_conv1d_shapes_follow_the_factors_not_the_base_weight():
    layers = find_lora_layers(make_model("gpt2"))
    assert [(layer.d_in, layer.d_out) for layer in layers] == [(12, 16), (16, 16)]


@pytest.mark.parametrize("kind", UNSUPPORTED)
def test_unsupported_kinds_are_flagged_with_a_reason(kind):
    split = split_lora_parameters(make_model(kind))
    assert split.unsupported
    reason = " ".join(layer.unsupported_reason for layer in split.unsupported)
    assert {"embedding": "embedding", "dora": "DoRA", "conv3x3": "kernel"}[kind] in reason


def test_pairing_is_by_name_not_order():
    model = make_model("mlp")
    named = list(model.named_parameters())
    random.Random(0).shuffle(named)
    split = split_lora_parameters(model, named)
    for layer in split.layers:
        assert layer.B is model.get_parameter(layer.b_name)


def test_missing_partner_is_an_error():
    model = make_model("mlp")
    model.get_parameter("base_model.model.fc1.lora_B.default.weight").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable partner"):
        split_lora_parameters(model)


def test_no_lora_layers_is_a_clear_error():
    with pytest.raises(NoLoRALayersError, match="get_peft_model"):
        find_lora_layers(MLP())


def test_per_module_scaling_rslora_and_patterns():
    model = make_model("mlp", use_rslora=True, rank_pattern={"fc2": 2}, alpha_pattern={"fc2": 7})
    scaling = {layer.prefix.rsplit(".", 1)[-1]: layer.scaling for layer in find_lora_layers(model)}
    assert scaling["fc1"] == pytest.approx(8 / 4**0.5)
    assert scaling["fc2"] == pytest.approx(7 / 2**0.5)


def test_only_the_trainable_adapter_is_found():
    model = make_model("mlp")
    model.add_adapter("other", LoraConfig(r=2, target_modules=["fc1"]))
    layers = find_lora_layers(model)  # add_adapter leaves "other" frozen
    assert {layer.adapter for layer in layers} == {"default"}
    model.set_adapter("other")
    layers = find_lora_layers(model)
    assert {layer.adapter for layer in layers} == {"other"} and layers[0].rank == 2


class PlainLoRALinear(nn.Module):
    def __init__(self, d_in, d_out, r, scaling):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False)
        self.lora_B = nn.Linear(r, d_out, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.1)
        self.scaling = scaling

    def forward(self, x):
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def test_plain_modules_with_lora_factors():
    model = nn.Sequential(PlainLoRALinear(6, 5, 2, 0.5), nn.Tanh(), nn.Linear(5, 3))
    split = split_lora_parameters(model)
    assert len(split.layers) == 1 and split.layers[0].adapter is None and split.layers[0].scaling == 0.5
    assert len(split.other) == 2  # the head's weight and bias


# ------------------------------------------------------------------------------------------------ capture


def _capture_grads(model, batches, mode="rows", accumulate=1):
    layers = find_lora_layers(model)
    probes = lambda layer: (  # noqa: E731
        layer.b_matrix(torch.float32) * layer.scaling**0.5,
        layer.a_matrix(torch.float32).mT * layer.scaling**0.5,
    )
    cap = GradientCapture(layers, mode=mode, probes=probes if mode == "stream" else None, kfac_stats=True)
    model.zero_grad()
    for x, y in batches:
        (loss_fn(model, x, y) / accumulate).backward()
    cap.remove()  # keep what was recorded, stop observing
    return layers, cap


def _dense_G(cap, layer):
    x, s = cap.observation(layer).rows()
    return s.double().mT @ x.double()


@pytest.mark.parametrize("kind", SUPPORTED)
def test_captured_G_reproduces_autograd_with_dropout_and_scaling(kind):
    model = make_model(kind, lora_dropout=0.3, lora_alpha=3)
    model.train()
    torch.manual_seed(5)
    layers, cap = _capture_grads(model, [make_batch(kind)])
    for layer in layers:
        G, s = _dense_G(cap, layer), layer.scaling
        A, B = layer.a_matrix(torch.float64), layer.b_matrix(torch.float64)
        assert torch.allclose(s * B.T @ G, layer.A.grad.double().reshape(A.shape), atol=1e-6)
        assert torch.allclose(s * G @ A.T, layer.B.grad.double().reshape(B.shape), atol=1e-6)


@pytest.mark.parametrize("mode", ["rows", "stream"])
def test_gradient_accumulation_sums_micro_batches_exactly(mode):
    x, y = make_batch("mlp", n=32)
    model = make_model("mlp")
    layers, full = _capture_grads(model, [(x, y)], mode=mode)
    micro = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 32, 8)]
    _, acc = _capture_grads(model, micro, mode=mode, accumulate=4)
    for layer in layers:
        a, b = full.observation(layer), acc.observation(layer)
        assert a.n_rows == b.n_rows == 32
        if mode == "rows":
            assert torch.allclose(_dense_G(full, layer), _dense_G(acc, layer), atol=1e-6)
        else:
            assert torch.allclose(a.left, b.left, atol=1e-6) and torch.allclose(a.right, b.right, atol=1e-6)
        assert torch.allclose(a.x_sq, b.x_sq, atol=1e-5)
        assert torch.allclose(a.s_sq * 32**2, b.s_sq * 32**2, rtol=1e-5)  # S carries the 1/4 of accumulation


def test_stream_projections_equal_rows_products():
    model = make_model("mlp")
    batch = make_batch("mlp")
    layers, rows = _capture_grads(model, [batch], mode="rows")
    _, stream = _capture_grads(model, [batch], mode="stream")
    for layer in layers:
        G = _dense_G(rows, layer).float()
        root = layer.scaling**0.5
        obs = stream.observation(layer)
        assert torch.allclose(obs.left, root * layer.b_matrix(torch.float32).T @ G, atol=1e-6)
        assert torch.allclose(obs.right, root * G @ layer.a_matrix(torch.float32).T, atol=1e-6)


class CheckpointedMLP(MLP):
    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant

    def forward(self, x):
        h = checkpoint(lambda t: torch.tanh(self.fc2(torch.tanh(self.fc1(t)))), x, use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_is_not_counted_twice(reentrant):
    x, y = make_batch("mlp")
    x.requires_grad_(reentrant)  # reentrant checkpointing needs an input that requires grad
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], modules_to_save=["head"])
    torch.manual_seed(0)
    plain = get_peft_model(MLP(), cfg)
    torch.manual_seed(0)
    ckpt = get_peft_model(CheckpointedMLP(reentrant), cfg)
    ckpt.load_state_dict(plain.state_dict())
    layers_p, cap_p = _capture_grads(plain, [(x, y)])
    layers_c, cap_c = _capture_grads(ckpt, [(x, y)])
    for lp, lc in zip(layers_p, layers_c):
        assert cap_c.observation(lc).n_rows == cap_p.observation(lp).n_rows == 16
        assert torch.allclose(_dense_G(cap_p, lp), _dense_G(cap_c, lc), atol=1e-6)


def test_forwards_without_gradient_record_and_hold_nothing():
    model = make_model("mlp")
    layers = find_lora_layers(model)
    cap = GradientCapture(layers, mode="rows")
    x, y = make_batch("mlp")
    model.eval()
    with torch.no_grad():
        model(x)
    assert all(cap.observation(layer).empty for layer in layers)
    assert not any(v is not None for v in cap._pending_input.values())
    model.train()
    model(x)  # a logging forward whose graph is dropped without backward
    loss_fn(model, x[:4], y[:4]).backward()
    assert all(cap.observation(layer).n_rows == 4 for layer in layers)
    cap.clear()
    assert all(cap.observation(layer).empty for layer in layers)
    cap.remove()
    loss_fn(model, x, y).backward()
    assert all(cap.observation(layer).empty for layer in layers)
