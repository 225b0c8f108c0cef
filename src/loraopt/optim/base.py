"""What every loraopt optimizer shares: argument validation, dtype-preserving checkpoints, named parameter groups
and the few collective operations the distributed code needs."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = [
    "LoRAOptimizer",
    "check_nonnegative",
    "check_positive",
    "check_range",
    "check_int",
    "named_trainable_parameters",
    "DistributedContext",
]


# ------------------------------------------------------------------------------------------------- validation


def check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) or torch.is_tensor(value)) or not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) or torch.is_tensor(value)) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_range(name: str, value: float, low: float, high: float, *, high_inclusive: bool = False) -> None:
    ok = isinstance(value, (int, float)) and math.isfinite(float(value)) and low <= value
    ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_int(name: str, value: int, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def named_trainable_parameters(model: nn.Module) -> List[tuple]:
    """``[(name, param)]`` for every parameter with ``requires_grad``, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------------- distributed


class DistributedContext:
    """The process group an optimizer averages its rank-local observations over (``None`` = single process).

    Rank-local data (captured rows, streamed products, metric sums) is averaged exactly like DDP averages ``.grad``
    so that every rank computes the update of the concatenated batch.
    """

    def __init__(self, process_group: Optional[Any] = None):
        self.group = process_group

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    def mean(self, tensor: Tensor) -> Tensor:
        """All-reduce average (out of place for the caller: returns the reduced tensor)."""
        if not self.active:
            return tensor
        out = tensor.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out.div_(self.world_size)

    def sum_many(self, tensors: Sequence[Tensor]) -> List[Tensor]:
        """One bucketed all-reduce (sum) for many tensors of one dtype and device."""
        if not self.active or not tensors:
            return list(tensors)
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return out


# ------------------------------------------------------------------------------------------------- base class


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


def require_unsharded_model(model: nn.Module, optimizer: str) -> None:
    """Refuse models wrapped by FSDP (flat, sharded parameters) or DeepSpeed ZeRO: the structured optimizers need
    each layer's whole ``lora_A`` / ``lora_B`` and its full-size statistics on every rank."""
    wrapper = type(model).__name__
    if wrapper in ("FullyShardedDataParallel", "DeepSpeedEngine") or hasattr(model, "zero_optimization"):
        raise NotImplementedError(
            f"{optimizer} does not support {wrapper}: parameters are sharded or flattened; train with DDP or a single "
            "process, or use a baseline optimizer (adamw, lora-plus) under FSDP/DeepSpeed"
        )


class LoRAOptimizer(Optimizer):
    """``torch.optim.Optimizer`` with the library's checkpoint rule: state keeps the dtype it was saved with (torch casts it to the parameter dtype, which would silently turn fp32 statistics of bf16 adapters
    into bf16 on resume)."""

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        super().__init__(params, defaults)
        if any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            # Sharded parameters would be updated from local shards of statistics that need the whole layer.
            raise NotImplementedError(
                f"{type(self).__name__} does not support FSDP2 / DTensor (sharded) parameters in this version: train "
                "with DDP or a single process, or use a baseline optimizer (adamw, lora-plus) under FSDP"
            )
        self._stashed_state: Optional[Dict[int, Dict[str, Tensor]]] = None
        self.register_load_state_dict_pre_hook(LoRAOptimizer._stash_float_state)
        self.register_load_state_dict_post_hook(LoRAOptimizer._restore_float_state)

    @staticmethod
    def _stash_float_state(optimizer: "LoRAOptimizer", state_dict: Dict[str, Any]) -> None:
        optimizer._stashed_state = {
            # Every tensor but `step`: torch casts integer counters to the parameter dtype as well.
            pid: {k: v for k, v in s.items() if torch.is_tensor(v) and k != "step"}
            for pid, s in state_dict["state"].items()
        }
        optimizer._stashed_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]

    @staticmethod
    def _restore_float_state(optimizer: "LoRAOptimizer") -> None:
        stash, ids = optimizer._stashed_state, optimizer._stashed_ids
        optimizer._stashed_state = optimizer._stashed_ids = None
        if not stash:
            return
        params = [p for g in optimizer.param_groups for p in g["params"]]
        for pid, param in zip(ids, params):
            for key, value in stash.get(pid, {}).items():
                optimizer.state[param][key] = value.to(device=param.device, copy=True)

    @staticmethod
    def _require_names(groups: List[Dict[str, Any]], factory: str) -> None:
        for group in groups:
            names = group.get("param_names")
            if names is None or len(names) != len(group["params"]):
                raise ValueError(
                    "this optimizer pairs LoRA factors by parameter name: pass `model.named_parameters()` (or groups "
                    f"with 'param_names'), or build it with `{factory}(model, ...)`"
                )
