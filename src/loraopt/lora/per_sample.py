"""Jacobian rows from replicated samples: one ordinary backward instead of a vmapped one.

LoKO needs ``k`` rows per sample: the gradients of ``k`` observed outputs of that sample with respect to the trainable
parameters. The batched backward (``is_grads_batched``, ``torch.func``) runs them as a ``vmap`` over ``k``
cotangents, and the backward of a convolution or batch norm has no ``vmap`` rule: it runs ``k`` times, one launch
each (``benchmarks/notes/loko.md``). Here every sample is instead repeated ``k`` times in the batch, replica ``j``
of sample ``i`` is given the cotangent of output ``j``, and one plain backward of the replicated batch yields, for
every layer that owns a trainable parameter, its input ``x`` and output-gradient ``g`` per replica. A linear or
convolution layer's per-replica parameter gradient follows from those two (``loraopt.functional.jacobian``), and it
is exactly row ``(i, j)``: replicas do not interact when no layer mixes samples (no batch norm in training mode).

What it needs from the model (checked; anything else raises :class:`ReplicationUnsupported` so the caller falls
back to another path):

* every trainable parameter is the weight or bias of an ``nn.Linear`` or an ungrouped, zero-padded ``nn.Conv2d``
  (LoRA factors in PEFT, a classification head), called batch-first (samples along dim 0);
* no batch norm in training mode;
* no trainable parameter is used outside its layer (e.g. a tied weight read by an embedding): the first call per
  model checks a random combination of the rows against the ordinary gradient of that combination of outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..functional.jacobian import conv2d_sample_grads, linear_sample_grads, model_outputs, split_inputs

__all__ = ["ReplicationUnsupported", "replicated_jacobian", "replication_problem"]


class ReplicationUnsupported(Exception):
    """The model's rows cannot be taken from replicated samples (why in the message); use another path."""


@dataclass
class _Call:
    module: nn.Module
    x: Tensor
    y: Tensor


def _conv_padding(conv: nn.Conv2d) -> Optional[Tuple[int, int]]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        if tuple(conv.kernel_size) == (1, 1):  # "same" with a 1x1 kernel pads nothing
            return (0, 0)
        return None
    return tuple(conv.padding)


def _inspect(model: nn.Module, params: Sequence[Tensor]) -> Tuple[Dict[int, List[nn.Module]], Optional[str]]:
    """One pass over the modules: the layers owning each of ``params`` (by id) and why replication cannot serve
    them (None: it can)."""
    wanted = {id(p) for p in params}
    owners: Dict[int, List[nn.Module]] = {}
    problem = None
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and problem is None:
            problem = f"{type(module).__name__} in training mode mixes the samples of a batch"
        for value in module._parameters.values():
            if value is not None and id(value) in wanted:
                owners.setdefault(id(value), []).append(module)
    if problem is not None:
        return owners, problem
    for p in params:
        mods = owners.get(id(p))
        if not mods:
            return owners, f"a trainable parameter of shape {tuple(p.shape)} is not owned by any module of the model"
        for m in mods:
            if type(m) is nn.Linear:
                continue
            if type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros" and _conv_padding(m) is not None:
                continue
            return owners, (f"a trainable parameter belongs to a {type(m).__name__} (only nn.Linear and ungrouped, "
                            "zero-padded nn.Conv2d layers have per-sample gradients here)")
    return owners, None


def replication_problem(model: nn.Module, params: Sequence[Tensor]) -> Optional[str]:
    """Why :func:`replicated_jacobian` cannot serve ``params`` of ``model`` (None: it can). Cheap, no forward."""
    return _inspect(model, params)[1]


def _check_tolerance(model: nn.Module) -> float:
    """Relative tolerance of the first-use check. Two exact computations of the same gradient differ by rounding:
    ~1e-3 relative with TF32 convolutions on a GPU (EfficientNet-Lite0, fp32), ~3e-2 through a bf16 base (a Llama
    classifier), where the other exact paths disagree by as much (``benchmarks/notes/loko.md``). A parameter used
    outside its layer misses a whole term of its gradient, typically an O(1) relative error."""
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes & {torch.float16, torch.bfloat16}:
        return 0.15
    return 1e-6 if dtypes == {torch.float64} else 2e-2


def _sample_grads(call: _Call, g: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    m = call.module
    if isinstance(m, nn.Conv2d):
        return conv2d_sample_grads(call.x, g, tuple(m.kernel_size), stride=tuple(m.stride),
                                   padding=_conv_padding(m), dilation=tuple(m.dilation), bias=m.bias is not None)
    return linear_sample_grads(call.x, g, bias=m.bias is not None)


def replicated_jacobian(
    model: nn.Module,
    inputs: Any,
    params: Sequence[Tensor],
    observe_one: Callable[..., Tensor],
    rows_per_sample: int,
    *,
    dtype: torch.dtype,
    per_sample: Optional[Tensor] = None,
    verify: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Jacobian rows and values of an observed function of every sample, from one backward of replicated samples.

    Args:
        model: the module ``params`` belong to, called as ``model(*args, **kwargs)`` on the replicated batch.
        inputs: the batch (see :func:`loraopt.functional.jacobian.split_inputs`), samples along dim 0.
        params: the ``n``-coordinate state, in order (weights and biases of ``nn.Linear`` / ``nn.Conv2d`` layers).
        observe_one: ``out -> h: (k,)``, the observed function of one sample's outputs (``(out, extra) -> h`` when
            ``per_sample`` is given); applied under ``vmap`` to the outputs only.
        rows_per_sample: ``k``.
        dtype: dtype of ``H``.
        per_sample: ``(b, ...)``: one more input of ``observe_one`` per sample (e.g. which outputs it observes).
        verify: also take the ordinary gradient of a random combination of the observed outputs and check that the
            same combination of the rows equals it (catches a parameter used outside its layer); costs one more
            backward.

    Returns:
        ``H: (b k, n)`` (rows of sample ``i`` at ``i k ... (i+1) k - 1``, the layout of ``func_jacobian``) and
        ``h: (b, k)`` (detached). Raises :class:`ReplicationUnsupported` when the model does not qualify.
    """
    owners, problem = _inspect(model, params)
    if problem is not None:
        raise ReplicationUnsupported(problem)
    k = int(rows_per_sample)
    leaves, rebuild = split_inputs(inputs)
    b = leaves[0].shape[0]
    n_rep = b * k
    args, kwargs = rebuild([x.repeat_interleave(k, dim=0) for x in leaves])
    layers = {id(m): m for mods in owners.values() for m in mods}
    calls: List[_Call] = []

    def record(module: nn.Module, hook_args: tuple, output: Any) -> None:
        if torch.is_tensor(output) and output.requires_grad and hook_args and torch.is_tensor(hook_args[0]):
            calls.append(_Call(module, hook_args[0].detach(), output))

    handles = [m.register_forward_hook(record) for m in layers.values()]
    try:
        with torch.enable_grad():
            out = model_outputs(model(*args, **kwargs), "the model")
    finally:
        for handle in handles:
            handle.remove()
    for call in calls:
        if call.x.shape[0] != n_rep or call.y.shape[0] != n_rep:
            raise ReplicationUnsupported(
                f"a {type(call.module).__name__} layer saw {call.x.shape[0]} rows along dim 0 for a batch of {n_rep}: "
                "layers must be called batch-first"
            )
    extra = [] if per_sample is None else [per_sample.repeat_interleave(k, dim=0)]
    with torch.enable_grad():
        h = torch.vmap(observe_one)(out.reshape(n_rep, -1), *extra)  # (b k, k)
        if h.shape != (n_rep, k):
            raise ValueError(f"observe_one returned {tuple(h.shape[1:])} values per sample, expected ({k},)")
        picked = h.reshape(b, k, k).diagonal(dim1=1, dim2=2).reshape(n_rep)  # replica j of sample i: output j
    grads = torch.autograd.grad(picked.sum(), [c.y for c in calls], allow_unused=True, retain_graph=verify)
    blocks = {id(p): torch.zeros(n_rep, p.numel(), dtype=dtype, device=p.device) for p in params}
    for call, g in zip(calls, grads):
        if g is None:
            continue
        dW, db = _sample_grads(call, g)
        m = call.module
        if id(m.weight) in blocks:
            blocks[id(m.weight)].add_(dW.reshape(n_rep, -1).to(dtype))
        if db is not None and id(m.bias) in blocks:
            blocks[id(m.bias)].add_(db.to(dtype))
    H = torch.cat([blocks[id(p)] for p in params], dim=1)
    if verify:
        # A random combination of the rows against the ordinary gradient of the same combination of the outputs
        # (a plain sum would not do: softmax outputs sum to one, so its gradient is zero whatever the rows).
        weights = torch.rand(n_rep, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
        weights = weights.to(device=picked.device, dtype=picked.dtype)
        total = torch.autograd.grad((picked * weights).sum(), list(params), allow_unused=True)
        total = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).to(dtype)
                           for g, p in zip(total, params)])
        err = float((weights.to(dtype) @ H - total).norm())
        if not err <= _check_tolerance(model) * float(total.norm()) + 1e-12:
            raise ReplicationUnsupported(
                "the per-layer gradients do not add up to the model's gradient (relative error "
                f"{err / max(float(total.norm()), 1e-30):.2g}): a trainable parameter is used outside its layer"
            )
    return H, h.detach().reshape(b, k, k)[:, 0, :]
