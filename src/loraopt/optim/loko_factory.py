"""``create_loko_optimizer``: :class:`~loraopt.optim.loko.LoKO` over every trainable parameter of a PEFT model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

from torch import nn

from ..functional.observations import Observation
from ..lora.layers import is_lora_factor_name
from .distributed import require_unsharded_model

if TYPE_CHECKING:  # pragma: no cover
    from .loko import LoKO

__all__ = ["create_loko_optimizer"]

def _is_lora_name(name: str) -> bool:
    """A LoRA factor (lora/layers.py decides) or a DoRA magnitude: both belong to the "lora" group."""
    return is_lora_factor_name(name) or "lora_magnitude_vector" in name


def create_loko_optimizer(
    model: nn.Module,
    *,
    num_outputs: Optional[int] = None,
    observation: Union[str, Observation] = "softmax",
    lr: float = 1.0,
    other_lr: Optional[float] = None,
    **kwargs: Any,
) -> "LoKO":
    """Build :class:`LoKO` over every trainable parameter of a PEFT/LoRA model.

    Paper: H. Abdi, M. Sun, A. Zhang, S. Kaski, W. Pan, "LoKO: Low-Rank Kalman Optimizer for Online Fine-Tuning of
    Large Models", arXiv:2410.11551 (https://arxiv.org/abs/2410.11551). No reference repository is published by the
    authors; this implementation follows ``docs/specs/loko.md``.

    Two named groups share one filter: ``"lora"`` (``lora_A``/``lora_B``, embedding LoRA, DoRA magnitudes) and
    ``"other"`` (every other trainable parameter, e.g. a ``modules_to_save`` classifier head), with ``lr`` and
    ``other_lr`` (default: ``lr``) scaling their mean updates. The remaining keywords are those of :class:`LoKO`
    (``p_init``, ``beta``, ``r0``, ..., ``jacobian``), with its defaults.

    Raises ``ValueError`` when the model has no trainable parameter or no LoRA parameter (build
    ``LoKO(model.named_parameters(), ...)`` directly to filter arbitrary parameters), and ``NotImplementedError``
    for FSDP/DeepSpeed-wrapped models.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"create_loko_optimizer expects an nn.Module (a PEFT model), got {type(model).__name__}")
    require_unsharded_model(model, "LoKO")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "the model has no trainable parameter: apply peft.get_peft_model(model, LoraConfig(...)) first"
        )
    lora = [(n, p) for n, p in named if _is_lora_name(n)]
    other = [(n, p) for n, p in named if not _is_lora_name(n)]
    if not lora:
        raise ValueError(
            "no LoRA parameter found (names with .lora_A./.lora_B.): wrap the model with peft.get_peft_model, or "
            "build LoKO(model.named_parameters(), num_outputs=...) directly to filter arbitrary parameters"
        )
    empty = [n for n, p in lora if p.numel() == 0]
    if empty:
        raise ValueError(
            f"LoRA parameter {empty[0]!r} is empty (rank 0): the adapter has nothing to train. Give it a rank r >= 1 "
            "(LoraConfig(r=...), rank_pattern) or leave the module out of target_modules"
        )
    from .loko import LoKO  # the optimizer module imports this factory

    groups = [{"params": lora, "name": "lora", "lr": lr}]
    if other:
        groups.append({"params": other, "name": "other", "lr": lr if other_lr is None else other_lr})
    return LoKO(groups, num_outputs=num_outputs, observation=observation, lr=lr, model=model, **kwargs)
