"""Finding LoRA layers in a model and pairing their factors by name.

A LoRA layer adds ``s * B A x~`` to a frozen layer, where ``A`` is the weight of ``lora_A[adapter]`` (r x d_in),
``B`` the weight of ``lora_B[adapter]`` (d_out x r), ``s`` the per-module scaling and ``x~`` the input after LoRA
dropout.  This module knows PEFT's layout (``Linear``, GPT-2 ``Conv1D`` with ``fan_in_fan_out``, conv, embedding,
DoRA and other variants, several adapters) and plain modules that expose ``lora_A`` / ``lora_B`` submodules.
It never changes a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "LoRALayer",
    "LoRAParameterSplit",
    "split_lora_parameters",
    "find_lora_layers",
    "is_lora_factor_name",
    "NoLoRALayersError",
]

_A_MARK, _B_MARK = ".lora_A.", ".lora_B."
_EMBEDDING_MARKS = (".lora_embedding_A.", ".lora_embedding_B.")


class NoLoRALayersError(ValueError):
    pass


@dataclass(eq=False)
class LoRALayer:
    """One (module, adapter) pair of LoRA factors.

    ``kind`` is ``"linear"`` (rows are the last dimension), ``"pointwise_conv"`` (a 1x1, stride-1, ungrouped conv:
    one row per pixel, channels last) or ``"unsupported"``; ``unsupported_reason`` then says why the layer's update
    is not a low-rank sum of ``S^T X``.
    """

    index: int
    prefix: str
    adapter: Optional[str]
    a_name: str
    b_name: str
    module: nn.Module
    a_module: nn.Module
    b_module: nn.Module
    A: nn.Parameter
    B: nn.Parameter
    kind: str
    unsupported_reason: str = ""

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def d_in(self) -> int:
        return math.prod(self.A.shape[1:])

    @property
    def d_out(self) -> int:
        return self.B.shape[0]

    @property
    def scaling(self) -> float:
        """``s`` of ``Delta W = s B A``, read live (alpha/r, alpha/sqrt(r) under rsLoRA, rank/alpha patterns)."""
        scaling = getattr(self.module, "scaling", 1.0)
        if isinstance(scaling, dict):
            scaling = scaling[self.adapter] if self.adapter is not None else next(iter(scaling.values()))
        return float(scaling)

    def a_matrix(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``A`` as an ``(r, d_in)`` matrix (a view for conv weights)."""
        a = self.A.detach().reshape(self.rank, -1)
        return a if dtype is None else a.to(dtype)

    def b_matrix(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """``B`` as a ``(d_out, r)`` matrix."""
        b = self.B.detach().reshape(self.d_out, -1)
        return b if dtype is None else b.to(dtype)

    def to_rows(self, t: Tensor) -> Tensor:
        """Flatten an input/output activation to ``(rows, features)``."""
        if self.kind == "pointwise_conv":
            return t.movedim(1, -1).reshape(-1, t.shape[1])
        return t.reshape(-1, t.shape[-1])

    def describe(self) -> str:
        return self.prefix + (f" (adapter {self.adapter!r})" if self.adapter else "")


@dataclass
class LoRAParameterSplit:
    """Trainable parameters of a model split into LoRA factor pairs and everything else."""

    layers: List[LoRALayer] = field(default_factory=list)
    other: List[Tuple[str, nn.Parameter]] = field(default_factory=list)

    @property
    def supported(self) -> List[LoRALayer]:
        return [layer for layer in self.layers if layer.kind != "unsupported"]

    @property
    def unsupported(self) -> List[LoRALayer]:
        return [layer for layer in self.layers if layer.kind == "unsupported"]

    def lora_named_parameters(self) -> List[Tuple[str, nn.Parameter]]:
        out: List[Tuple[str, nn.Parameter]] = []
        for layer in self.layers:
            out += [(layer.a_name, layer.A), (layer.b_name, layer.B)]
        return out


def _strip_param_suffix(rest: str) -> Tuple[Optional[str], str]:
    """``'default.weight'`` -> ``('default', 'weight')``; ``'weight'`` -> ``(None, 'weight')``."""
    if "." in rest:
        adapter, leaf = rest.rsplit(".", 1)
        return adapter, leaf
    return None, rest


def _classify(module: nn.Module, adapter: Optional[str], a_module: nn.Module, b_module: nn.Module) -> Tuple[str, str]:
    variants = getattr(module, "lora_variant", None) or {}
    use_dora = getattr(module, "use_dora", None) or {}
    if (adapter in variants) or (isinstance(use_dora, dict) and use_dora.get(adapter, False)):
        name = type(variants.get(adapter)).__name__ if adapter in variants else "DoRA"
        label = "DoRA" if ("dora" in name.lower() or use_dora.get(adapter, False)) else name
        return "unsupported", f"{label} adapter (its update is not a low-rank sum of S^T X)"
    if type(module).__name__ == "ParamWrapper":
        return "unsupported", "LoRA on a raw parameter (target_parameters): its factors are not applied as layers"
    if isinstance(a_module, nn.Linear) and isinstance(b_module, nn.Linear):
        return "linear", ""
    if isinstance(a_module, nn.modules.conv._ConvNd) and isinstance(b_module, nn.modules.conv._ConvNd):
        pointwise = all(k == 1 for k in a_module.kernel_size) and all(s == 1 for s in a_module.stride)
        pointwise = pointwise and a_module.groups == 1 and all(p == 0 for p in a_module.padding)
        pointwise = pointwise and all(k == 1 for k in b_module.kernel_size) and b_module.groups == 1
        if pointwise:
            return "pointwise_conv", ""
        return "unsupported", (
            f"conv adapter with kernel {tuple(a_module.kernel_size)}, stride {tuple(a_module.stride)}, groups "
            f"{a_module.groups} (only 1x1 stride-1 ungrouped convs are a per-pixel low-rank sum)"
        )
    return "unsupported", f"lora_A/lora_B of type {type(a_module).__name__}/{type(b_module).__name__}"


def _require_rank(a_name: str, A: Tensor, b_name: str, B: Tensor) -> None:
    """A rank-0 adapter has empty factors: nothing to train, and every r x r system of the optimizers is empty."""
    if A.dim() == 0 or A.shape[0] == 0 or B.dim() < 2 or B.shape[1] == 0:
        raise ValueError(
            f"LoRA factors {a_name!r} {tuple(A.shape)} and {b_name!r} {tuple(B.shape)} have rank 0: the adapter has "
            "nothing to train. Give it a rank r >= 1 (LoraConfig(r=...), rank_pattern) or leave the module out of "
            "target_modules"
        )


def split_lora_parameters(model: nn.Module, named_parameters: Optional[Iterable] = None) -> LoRAParameterSplit:
    """Pair every trainable ``...lora_A...`` parameter with its ``...lora_B...`` partner by name.

    ``named_parameters`` defaults to ``model.named_parameters()``; only parameters with ``requires_grad`` count.
    Embedding adapters and unsupported layer kinds are returned as layers of kind ``"unsupported"`` (optimizers that
    need the layer structure reject them; the others treat them as ordinary parameters).  Biases of ``lora_B`` and
    every other trainable parameter go to ``other``.
    """
    named = [(n, p) for n, p in (model.named_parameters() if named_parameters is None else named_parameters)]
    trainable = {n: p for n, p in named if p.requires_grad}
    layers: List[LoRALayer] = []
    used: set = set()

    for name, param in trainable.items():
        for a_mark, b_mark in ((_A_MARK, _B_MARK), _EMBEDDING_MARKS):
            if a_mark not in name:
                continue
            b_name = name.replace(a_mark, b_mark, 1)
            if b_name not in trainable:
                raise ValueError(
                    f"LoRA factor {name!r} has no trainable partner {b_name!r}; freeze both factors of an adapter "
                    "or neither"
                )
            prefix, rest = name.split(a_mark, 1)
            adapter, leaf = _strip_param_suffix(rest)
            if a_mark == _A_MARK and leaf != "weight":
                continue  # e.g. a lora_A bias: an ordinary parameter
            module = model.get_submodule(prefix)
            _require_rank(name, param, b_name, trainable[b_name])
            if a_mark == _A_MARK:
                a_container, b_container = module.lora_A, module.lora_B
                a_module = a_container[adapter] if adapter is not None else a_container
                b_module = b_container[adapter] if adapter is not None else b_container
                kind, reason = _classify(module, adapter, a_module, b_module)
            else:
                adapter = rest
                a_module = b_module = module
                kind, reason = "unsupported", "embedding adapter (its update is not a low-rank sum of S^T X)"
            layers.append(
                LoRALayer(
                    index=len(layers), prefix=prefix, adapter=adapter, a_name=name, b_name=b_name, module=module,
                    a_module=a_module, b_module=b_module, A=param, B=trainable[b_name], kind=kind,
                    unsupported_reason=reason,
                )
            )
            used.update((name, b_name))
    for name in trainable:
        if (_B_MARK in name or _EMBEDDING_MARKS[1] in name) and name.rsplit(".", 1)[-1] == "weight" and name not in used:
            raise ValueError(f"LoRA factor {name!r} has no trainable lora_A partner")
    other = [(n, p) for n, p in trainable.items() if n not in used]
    return LoRAParameterSplit(layers=layers, other=other)


def is_lora_factor_name(name: str) -> bool:
    """Whether a parameter name (``model.named_parameters()``) is a LoRA factor's (trainable or not)."""
    return any(mark in name for mark in (_A_MARK, _B_MARK) + _EMBEDDING_MARKS)


def find_lora_layers(model: nn.Module) -> List[LoRALayer]:
    """Every trainable LoRA layer of ``model`` (supported or not), in module order.

    Raises :class:`NoLoRALayersError` when there is none.
    """
    split = split_lora_parameters(model)
    if not split.layers:
        raise NoLoRALayersError(
            "no trainable LoRA layer found: wrap the model with peft.get_peft_model(model, LoraConfig(...)) (or give "
            "modules `lora_A`/`lora_B` submodules) and make sure the adapter is trainable"
        )
    return split.layers


def require_supported(layers: Sequence[LoRALayer], optimizer: str) -> None:
    bad = [layer for layer in layers if layer.kind == "unsupported"]
    if bad:
        lines = "\n".join(f"  - {layer.describe()}: {layer.unsupported_reason}" for layer in bad)
        raise NotImplementedError(
            f"{optimizer} cannot train these LoRA layers:\n{lines}\n"
            "Use a baseline optimizer for them ('adamw', 'lora-plus', 'riemannian-adamw'), or restrict the LoRA config "
            "to Linear / Conv1D / 1x1-conv layers without DoRA."
        )
