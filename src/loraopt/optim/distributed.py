"""The few collective operations the distributed code needs, the FSDP2 (DTensor) helpers, and the refusal of models
whose wrappers flatten their parameters."""

from __future__ import annotations

import sys
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistributedContext",
    "is_dtensor",
    "full_tensor",
    "write_full_",
    "all_ranks_true",
    "require_unsharded_model",
    "sharding_wrapper_classes",
]



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


# ------------------------------------------------------------------------------------------------- sharding


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 / tensor-parallel sharded parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor as a plain ``torch.Tensor`` on every rank: ``t.full_tensor()`` (an all-gather over the
    DTensor's mesh) for a DTensor such as an FSDP2 parameter or its ``.grad``, ``t`` itself otherwise.

    Every rank must call it for the same tensors in the same order (it is a collective for DTensors)."""
    if is_dtensor(t):
        return t.full_tensor()
    return t


def write_full_(param: Tensor, value: Tensor) -> None:
    """Write the whole tensor ``value`` (replicated: the same on every rank) into ``param`` in place.

    For a DTensor ``param`` (an FSDP2 parameter, or state laid out like it), each rank copies its own shard of
    ``value``, cut by DTensor itself (``distribute_tensor`` with the parameter's mesh and placements, with
    ``src_data_rank=None``: no communication, since ``value`` is already the same everywhere) into
    ``param.to_local()``, the local storage FSDP2 all-gathers from."""
    if not is_dtensor(param):
        param.copy_(value)
        return
    from torch.distributed.tensor import distribute_tensor

    shard = distribute_tensor(
        value.to(dtype=param.dtype, device=param.device), param.device_mesh, param.placements, src_data_rank=None
    )
    param.to_local().copy_(shard.to_local())


def all_ranks_true(flag: bool, tensors: Sequence[Tensor] = ()) -> bool:
    """``flag`` and-reduced over every mesh the DTensors among ``tensors`` live on (``flag`` itself when there are
    none): a decision taken from local shards (e.g. "every gradient entry is finite") must be the same on every rank,
    or one rank steps while another skips and the replicas drift apart."""
    meshes = {}
    for t in tensors:
        if is_dtensor(t):
            meshes[id(t.device_mesh)] = t.device_mesh
    if not meshes:
        return flag
    for mesh in meshes.values():
        device = mesh.device_type
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        for dim in range(mesh.ndim):
            dist.all_reduce(value, op=dist.ReduceOp.MIN, group=mesh.get_group(dim))
        flag = bool(value.item() > 0)
    return flag


def sharding_wrapper_classes() -> Tuple[type, ...]:
    """The wrapper classes that flatten and shard a model's parameters: FSDP1's ``FullyShardedDataParallel`` and
    DeepSpeed's ``DeepSpeedEngine`` (FSDP2's ``fully_shard`` keeps one DTensor per parameter and is supported).

    Only modules already imported are looked at: a model cannot be an instance of a class whose module was never
    imported, so nothing is imported here (DeepSpeed need not be installed).
    """
    classes = []
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if fsdp is not None:
        classes.append(getattr(fsdp, "FullyShardedDataParallel", None))
    deepspeed = sys.modules.get("deepspeed")
    if deepspeed is not None:
        classes.append(getattr(deepspeed, "DeepSpeedEngine", None))
    return tuple(c for c in classes if isinstance(c, type))


def require_unsharded_model(model: nn.Module, optimizer: str) -> None:
    """Refuse models wrapped by FSDP1 (``FullyShardedDataParallel``: flat, sharded parameters) or DeepSpeed ZeRO:
    the structured optimizers need each layer's whole ``lora_A`` / ``lora_B``, which these wrappers hide in flat
    buffers.  FSDP2 (``torch.distributed.fsdp.fully_shard``: one DTensor per parameter) is supported: the optimizers
    gather the whole factors they need and write back each rank's shard."""
    if isinstance(model, sharding_wrapper_classes()):
        wrapper = type(model).__name__
        raise NotImplementedError(
            f"{optimizer} does not support {wrapper}: its parameters are flattened and sharded, so the whole LoRA "
            "factors this optimizer needs cannot be found. The supported sharded path is FSDP2: shard the model with "
            "torch.distributed.fsdp.fully_shard (accelerate: fsdp_version 2) and build the optimizer afterwards; "
            "otherwise train with DDP or a single process, or use a baseline optimizer (adamw, lora-plus)"
        )
