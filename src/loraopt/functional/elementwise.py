"""Elementwise updates for the parameters that are not LoRA factors (heads, norms, biases, ``modules_to_save``).

One copy of each rule, with fp32 state whatever the parameter dtype (a bf16 head keeps fp32 moments) and one
rounding on write-back.  Every function updates ``param`` and its state in place and takes host numbers for the
hyperparameters and the step index (a CPU counter, as in ``torch.optim``: no device synchronisation).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["sgd_momentum_", "adam_"]


def sgd_momentum_(
    param: Tensor,
    grad: Tensor,
    buf: Optional[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    first_step: bool,
) -> None:
    """``torch.optim.SGD`` with decoupled weight decay: ``buf <- momentum buf + (1 - dampening) g`` (the first
    buffer is ``g`` itself), ``param -= lr buf``.  ``buf`` is ``None`` when ``momentum == 0``."""
    grad = grad.to(buf.dtype if buf is not None else torch.promote_types(grad.dtype, torch.float32))
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    if momentum > 0:
        if first_step:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1.0 - dampening)
        grad = buf
    param.add_(grad.to(param.dtype), alpha=-lr)


def adam_(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    *,
    lr: float,
    betas: tuple,
    eps: float,
    weight_decay: float = 0.0,
    step: float,
) -> None:
    """Adam with bias correction and decoupled weight decay (AdamW); ``step`` is the index of this update (>= 1)."""
    beta1, beta2 = betas
    grad = grad.to(exp_avg.dtype)
    exp_avg.lerp_(grad, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    bias1 = 1.0 - beta1**step
    bias2 = 1.0 - beta2**step
    denom = (exp_avg_sq / bias2).sqrt_().add_(eps)
    param.sub_((exp_avg / denom * (lr / bias1)).to(param.dtype))
