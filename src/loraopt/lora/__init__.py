"""LoRA layers in a model: discovery, factor pairing, input / output-gradient capture, and per-sample Jacobian rows
from replicated samples."""

from .capture import GradientCapture, LayerObservation, RowBudgetExceeded
from .per_sample import ReplicationUnsupported, replicated_jacobian, replication_problem
from .layers import (
    LoRALayer,
    LoRAParameterSplit,
    NoLoRALayersError,
    find_lora_layers,
    require_supported,
    split_lora_parameters,
)
