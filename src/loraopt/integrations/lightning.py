"""Lightning integration (``docs/specs/integration.md`` §6).

Automatic optimization needs nothing from here: return the optimizer from ``configure_optimizers`` and Lightning's
``optimizer.step(closure)`` runs the closure (forward, ``zero_grad``, backward) inside the step, which PSI-LoRA,
Scaled PSI-LoRA, RPLoRA and LoKO-scalar (whose closure returns the loss after its backward) all accept.  With
PSI-LoRA / Scaled PSI-LoRA leave ``Trainer(gradient_clip_val=None)`` and clip with the optimizer's own
``max_grad_norm``; :class:`LightningClippingWarningCallback` warns otherwise.

LoKO observes the model outputs and so runs under manual optimization; :func:`loko_step` is its step::

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.automatic_optimization = False

        def configure_optimizers(self):
            return create_loko_optimizer(self.model, num_outputs=2)

        def training_step(self, batch, batch_idx):
            logits = self.model(**batch["inputs"]).logits
            loko_step(self.optimizers(), logits, batch["labels"])
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from torch import Tensor

from .._optional import require
from ._common import trainer_clipping_conflict, unwrap_optimizer

pl = require("lightning.pytorch", "lightning", "loraopt.integrations.lightning")

__all__ = ["loko_step", "LightningClippingWarningCallback"]


def loko_step(optimizer: Any, outputs: Tensor, targets: Optional[Tensor] = None) -> None:
    """One LoKO update under Lightning manual optimization (or with a plain ``LoKO``).

    ``loko_step(opt, logits, labels)`` for output observations; ``loko_step(opt, loss)`` for LoKO-scalar after
    ``self.manual_backward(loss)``.  ``optimizer`` is what ``self.optimizers()`` returns.

    The observation travels through the step's closure instead of ``optimizer.observe(...)`` followed by
    ``optimizer.step()``, for two reasons:

    * ``LightningOptimizer.step`` always hands the optimizer a closure (one returning ``None`` when you pass none),
      and ``LoKO.step`` observes what its closure returns, so a bare ``step()`` fails;
    * ``LightningOptimizer`` makes itself an instance of the optimizer's class, so ``opt.observe(...)`` on it runs
      with the wrapper as ``self`` and stores the observation on the wrapper, where the real step never looks.

    Going through ``optimizer.step`` keeps Lightning's bookkeeping (step counts, precision plugin) intact.
    """
    from ..optim.loko import LoKO

    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, LoKO):
        raise TypeError(f"loko_step needs a LoKO optimizer (self.optimizers()), got {type(inner).__name__}")
    if inner.param_groups[0]["observation"] == "loss":
        if targets is not None:
            raise ValueError(
                "LoKO-scalar (observation='loss') observes the loss alone: call loko_step(optimizer, loss) after "
                "self.manual_backward(loss)"
            )
        optimizer.step(closure=lambda: outputs)
        return
    if targets is None:
        raise ValueError("LoKO observes outputs against targets: call loko_step(optimizer, logits, labels)")
    optimizer.step(closure=lambda: (outputs, targets))


class LightningClippingWarningCallback(pl.Callback):
    """Warns at the start of training when ``Trainer(gradient_clip_val=...)`` would clip gradients that the
    optimizer does not use as Lightning assumes (PSI-LoRA, Scaled PSI-LoRA, SVDLoRA, LoKO-scalar)."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        clip = trainer.gradient_clip_val
        if not clip or clip <= 0:
            return
        for optimizer in trainer.optimizers:
            reason = trainer_clipping_conflict(optimizer)
            if reason is not None:
                warnings.warn(
                    f"Trainer(gradient_clip_val={clip:g}) clips .grad, but {reason} Set gradient_clip_val=None.",
                    UserWarning,
                    stacklevel=2,
                )
