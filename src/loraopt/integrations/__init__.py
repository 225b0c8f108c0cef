"""Framework integrations: Hugging Face ``Trainer`` (:mod:`loraopt.integrations.hf`, the ``hf`` extra) and Lightning
(:mod:`loraopt.integrations.lightning`, the ``lightning`` extra).

Names are resolved on first use, so importing this package imports neither transformers' Trainer nor Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LoRAOptFactory": "loraopt.integrations.hf",
    "PSILoRAFactory": "loraopt.integrations.hf",
    "ScaledPSILoRAFactory": "loraopt.integrations.hf",
    "LoKOFactory": "loraopt.integrations.hf",
    "RPLoRAFactory": "loraopt.integrations.hf",
    "TrainerClippingWarningCallback": "loraopt.integrations.hf",
    "LoRAOptTrainerMixin": "loraopt.integrations.hf",
    "LoRAOptTrainer": "loraopt.integrations.hf",
    "LoKOTrainer": "loraopt.integrations.hf",
    "LoKOScalarMixin": "loraopt.integrations.hf",
    "LoKOScalarTrainer": "loraopt.integrations.hf",
    "loko_step": "loraopt.integrations.lightning",
    "LightningClippingWarningCallback": "loraopt.integrations.lightning",
    "unwrap_optimizer": "loraopt.integrations._common",
    "trainer_clipping_conflict": "loraopt.integrations._common",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loraopt.integrations' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
