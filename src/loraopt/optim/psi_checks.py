"""What the PSI-family optimizers tell the user when a step cannot use what it was given: a layer without captured
activations (and why), and ``.grad`` edited after ``backward`` (which the captured gradient does not see)."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ..lora.capture import LayerObservation
from ..lora.layers import LoRALayer
from .psi_gather import grad_version

__all__ = ["missing_message", "grads_edited"]


def missing_message(
    name: str, layer: Optional[LoRALayer], obs: Optional[LayerObservation], consumed: Dict[int, Tuple[int, int]]
) -> str:
    """Why ``layer`` (``None``: every layer) has nothing to step with, and what to do.  ``consumed``: per layer index,
    the :func:`~loraopt.optim.psi_gather.grad_version` of the gradient the last step used."""
    if layer is None:
        return (
            f"{name}.step() was called without a preceding backward: no LoRA layer recorded activations and no "
            "parameter has a gradient. Run loss.backward() before step(). (If the model switched adapters with "
            "set_adapter(), the layers this optimizer hooks were not used: build an optimizer for the active "
            "adapter.)"
        )
    if obs is not None and obs.pairs:
        return (
            f"{name}: {layer.describe()} received an empty batch (0 rows reached it since the last step). Skip "
            "empty batches before the forward pass (e.g. DataLoader(drop_last=True) or a length check)."
        )
    if consumed.get(layer.index) == grad_version(layer):
        return (
            f"{name}.step() was called again on the gradient of a backward that an earlier step() already "
            "used (each backward's activations are consumed by one step). Call optimizer.zero_grad(), then "
            "forward and backward, before each step()."
        )
    return (
        f"{name}: {layer.describe()} has a gradient but no captured activations. Create the optimizer before "
        "the forward pass (its hooks record the LoRA inputs), keep torch.is_grad_enabled() during that "
        "forward, and do not call optimizer.zero_grad() (or another optimizer's) between backward() and "
        "step()."
    )


def grads_edited(active_groups, reduced) -> bool:
    """Whether the LoRA factors' ``.grad`` no longer matches the captured gradient (``clip_grad_norm_``, masking or
    scaling after backward).  Compared in float64, with one host synchronisation."""
    worst = []
    for _, observed, _ in active_groups:
        for layer, obs in observed:
            if layer.A.grad is None or obs.left is None and obs.G is None and not obs.x_rows:
                continue
            root = math.sqrt(layer.scaling)
            f64 = torch.float64  # once per optimizer: precision over speed
            B_eff = layer.b_matrix(f64) * root
            if obs.left is not None:  # stream: left[:r] = B~^T G
                BtG = reduced[id(obs)]["left"][: layer.rank].to(f64)
            elif obs.G is not None:
                BtG = B_eff.mT @ obs.G.to(f64)
            else:
                X, S = obs.rows()
                BtG = (S.to(f64) @ B_eff).mT @ X.to(f64)
            expected = BtG * root  # dL/dA = s B^T G = sqrt(s) B~^T G
            got = layer.A.grad.detach().to(f64).reshape(expected.shape)
            scale = expected.norm() + got.norm() + 1e-30
            # A 16-bit .grad is rounded (~1e-2 relative); an edit (clipping, masking) changes far more.
            tol = 1e-3 if layer.A.grad.dtype in (torch.float32, torch.float64) else 5e-2
            worst.append((got - expected).norm() / scale / tol)
    return bool(worst) and bool(torch.stack(worst).max() > 1.0)
