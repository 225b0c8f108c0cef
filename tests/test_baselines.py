"""The wrapped baselines' own additions to torch's optimizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import loraopt
from loraopt.optim.baselines import init_missing_adagrad_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adagrad_state_for_swapped_in_parameters_is_the_constructors(dtype):
    """A parameter swapped into the optimizer after construction (accelerate's FSDP2 preparation) gets exactly the
    state torch's constructor would have given it, and then steps like a freshly built Adagrad."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(dtype)
    opt = loraopt.create_optimizer("adagrad", model, lr=0.1, initial_accumulator_value=0.25)
    swapped = [nn.Parameter(p.detach().clone()) for p in opt.param_groups[0]["params"]]
    opt.param_groups[0]["params"] = swapped
    init_missing_adagrad_state(opt)
    reference = torch.optim.Adagrad([nn.Parameter(p.detach().clone()) for p in swapped], lr=0.1,
                                    initial_accumulator_value=0.25)
    for mine, theirs in zip(swapped, reference.param_groups[0]["params"]):
        for key in ("step", "sum"):
            assert opt.state[mine][key].dtype == reference.state[theirs][key].dtype
            torch.testing.assert_close(opt.state[mine][key], reference.state[theirs][key], rtol=0, atol=0)
    for step in range(3):
        grads = [torch.randn_like(p) for p in swapped]
        for mine, theirs, g in zip(swapped, reference.param_groups[0]["params"], grads):
            mine.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        reference.step()
    for mine, theirs in zip(swapped, reference.param_groups[0]["params"]):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
