"""loraopt: optimizers built for LoRA fine-tuning.

    import loraopt
    optimizer = loraopt.create_optimizer("proj-psi-lora", peft_model)   # the recommended settings

Every optimizer is an ordinary ``torch.optim.Optimizer``; ``loraopt.OPTIMIZERS`` lists them.
"""

from __future__ import annotations

import importlib
from typing import Any

from .optim.registry import OPTIMIZERS, create_optimizer, load_optimizer, optimizer_hyperparameters

__version__ = "0.1.0"

# Public names resolved on first use, so `import loraopt` does not import transformers/peft eagerly.
_LAZY = {
    "PSILoRA": "loraopt.optim.psi",
    "ProjPSILoRA": "loraopt.optim.psi",
    "ScaledPSILoRA": "loraopt.optim.psi",
    "SVDLoRA": "loraopt.optim.svdlora",
    "LoKO": "loraopt.optim.loko",
    "create_psi_lora_optimizer": "loraopt.optim.psi",
    "create_proj_psi_lora_optimizer": "loraopt.optim.psi",
    "create_scaled_psi_lora_optimizer": "loraopt.optim.psi",
    "create_svdlora_optimizer": "loraopt.optim.svdlora",
    "create_loko_optimizer": "loraopt.optim.loko",
    "create_rplora_optimizer": "loraopt.optim.baselines",
    "create_lora_plus_optimizer": "loraopt.optim.baselines",
    "find_lora_layers": "loraopt.lora",
}

__all__ = ["OPTIMIZERS", "create_optimizer", "load_optimizer", "optimizer_hyperparameters", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraopt' has no attribute {name!r}")
