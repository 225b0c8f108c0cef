"""Helpers shared by the Hugging Face and Lightning integrations (no framework imports here)."""

from __future__ import annotations

from typing import Any, Optional

from torch.optim import Optimizer

__all__ = ["unwrap_optimizer", "trainer_clipping_conflict"]


def unwrap_optimizer(optimizer: Any) -> Any:
    """The loraopt/torch optimizer inside framework wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``), or ``optimizer`` itself.

    Methods beyond ``step``/``zero_grad`` (``observe``, ``remove_hooks``) must be called on the unwrapped object:
    ``LightningOptimizer`` pretends to be an instance of the wrapped class, so its ``observe`` would run on the
    wrapper and store the observation where ``step`` never looks.
    """
    seen = 0
    while seen < 8:  # wrappers nest at most a couple of levels; the bound only guards against cycles
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, Optimizer) or inner is optimizer:
            return optimizer
        optimizer, seen = inner, seen + 1
    return optimizer


def trainer_clipping_conflict(optimizer: Any) -> Optional[str]:
    """Why a trainer's own gradient clipping (which rescales ``.grad``) is wrong for ``optimizer``, or ``None``.

    * PSI-LoRA and Scaled PSI-LoRA (and the SVDLoRA oracle) build the LoRA update from the gradients their hooks
      capture, which the trainer never sees: its clipping would rescale only the non-LoRA parameters, by a norm
      that includes the (unused) LoRA ``.grad``.  PSI-LoRA and Scaled PSI-LoRA clip internally instead.
    * LoKO-scalar uses ``.grad`` as the Jacobian of the observed loss; clipping it while the loss value stays
      unclipped makes the filter's innovation and gain disagree.
    """
    # Imported here so that importing the integrations does not import every optimizer module.
    from ..optim.loko import LoKO
    from ..optim.psi import PSILoRA, ScaledPSILoRA
    from ..optim.svdlora import SVDLoRA

    optimizer = unwrap_optimizer(optimizer)
    name = type(optimizer).__name__
    if isinstance(optimizer, (PSILoRA, ScaledPSILoRA)):
        internal = sorted({float(g["max_grad_norm"]) for g in optimizer.param_groups})
        internal_text = ", ".join(f"{v:g}" for v in internal)
        return (
            f"{name} computes the LoRA update from the gradients its hooks capture, so the trainer's clipping would "
            "only rescale the non-LoRA parameters (by a norm that includes the unused LoRA .grad). Disable the "
            f"trainer's clipping and clip inside the optimizer with its max_grad_norm option (now {internal_text}; "
            "0 disables)."
        )
    if isinstance(optimizer, SVDLoRA):
        return (
            f"{name} computes the LoRA update from the gradients its hooks capture, so the trainer's clipping would "
            "only rescale the non-LoRA parameters. Disable the trainer's clipping."
        )
    if isinstance(optimizer, LoKO) and optimizer.param_groups[0]["observation"] == "loss":
        return (
            "LoKO-scalar (observation='loss') uses .grad as the Jacobian of the observed loss; clipping .grad while "
            "the loss value stays unclipped makes the filter's innovation and gain disagree. Disable the trainer's "
            "clipping."
        )
    return None
