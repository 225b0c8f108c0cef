"""Stream capture (K = 0): the optimizer pushes the probes the hooks project on; the hooks never call back into it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import loraopt  # noqa: E402
from loraopt.optim.psi_base import _PSIOptimizerBase  # noqa: E402


def _model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    return peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"]))


def _backward(model, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(12, 8, generator=g), torch.randint(0, 3, (12,), generator=g)
    nn.functional.cross_entropy(model(x), y).backward()


def _train(monkeypatch=None, steps=3):
    model = _model()
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=0, momentum=0.9, capture="stream")
    if monkeypatch is not None:
        def refuse(*args, **kwargs):
            raise AssertionError("the optimizer was called during backward")

        for name in ("_push_probes", "_probe_momentum", "_ensure_layer_state", "_rebind_if_swapped"):
            monkeypatch.setattr(opt, name, refuse)
    for t in range(steps):
        opt.zero_grad()
        _backward(model, t)
        if t == 0:
            assert len(opt.state) == 0, "state was allocated during backward"
        if monkeypatch is not None:
            monkeypatch.undo()  # step() itself may allocate state and push
        opt.step()
        if monkeypatch is not None and t + 1 < steps:
            for name in ("_push_probes", "_probe_momentum", "_ensure_layer_state", "_rebind_if_swapped"):
                monkeypatch.setattr(opt, name, refuse)
    return [p.detach().clone() for p in model.parameters() if p.requires_grad]


def test_backward_does_not_call_into_the_optimizer(monkeypatch):
    reference = _train()
    refused = _train(monkeypatch)
    for a, b in zip(reference, refused):
        assert torch.equal(a, b)


def test_first_probes_match_the_state_allocated_at_the_first_step():
    model = _model()
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=0, momentum=0.9, capture="stream")
    before = {layer.index: tuple(t.clone() for t in opt._capture.probes_of(layer)) for layer in opt.layers}
    opt.zero_grad()
    _backward(model, 0)
    opt.step()
    for layer in opt.layers:
        left, _ = before[layer.index]
        r = layer.rank
        assert left[:, r:].abs().sum() == 0  # zero momentum columns before the first step


def test_missing_probes_are_an_error_not_a_recomputation():
    model = _model()
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=0, capture="stream")
    opt._capture.clear_probes()
    with pytest.raises(RuntimeError, match="no probes were pushed"):
        _backward(model, 0)


def test_in_place_edits_of_the_factors_are_refused_until_zero_grad_refreshes():
    model = _model()
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=0, capture="stream")
    layer = opt.layers[0]
    with torch.no_grad():
        layer.B.add_(1.0)
    with pytest.raises(RuntimeError, match="changed in place"):
        _backward(model, 0)
    opt.zero_grad()
    left, _ = opt._capture.probes_of(layer)
    assert torch.equal(left[:, : layer.rank], layer.b_matrix(torch.float32) * layer.scaling**0.5)
    _backward(model, 0)
    opt.step()


def test_load_state_dict_pushes_the_loaded_momentum():
    model = _model()
    opt = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=0, momentum=0.9, capture="stream")
    for t in range(2):
        opt.zero_grad()
        _backward(model, t)
        opt.step()
    saved = opt.state_dict()
    fresh = loraopt.create_optimizer("psi-lora", model, normalize=None, lr=0.1, inner_iters=0, momentum=0.9, capture="stream", seed=7)
    fresh.load_state_dict(saved)
    for layer_a, layer_b in zip(opt.layers, fresh.layers):
        for x, y in zip(opt._capture.probes_of(layer_a), fresh._capture.probes_of(layer_b)):
            assert torch.equal(x, y)
    assert isinstance(fresh, _PSIOptimizerBase)


def test_a_sharded_factor_is_stale_once_its_local_shard_changes_in_place():
    """Sharded (DTensor) factors are checked through their local shard, where an in-place checkpoint load writes."""
    from types import SimpleNamespace

    from loraopt.lora import capture

    class FakeSharded:  # the part of DTensor the check reads: to_local() gives a view of the local shard
        def __init__(self, local):
            self.local = local

        def to_local(self):
            return self.local.view_as(self.local)

    a, b = FakeSharded(torch.zeros(2, 3)), FakeSharded(torch.zeros(4, 2))
    layer = SimpleNamespace(A=a, B=b)
    before = capture._stamp(layer)
    assert before is not None and capture._stamp(layer) == before
    a.local.add_(1.0)  # an in-place write into the shard
    assert capture._stamp(layer) != before
