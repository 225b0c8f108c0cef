"""LoRA layers in a model: discovery, factor pairing, and input / output-gradient capture."""

from .capture import GradientCapture, LayerObservation, RowBudgetExceeded
from .layers import (
    LoRALayer,
    LoRAParameterSplit,
    NoLoRALayersError,
    find_lora_layers,
    require_supported,
    split_lora_parameters,
)
