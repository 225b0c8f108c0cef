"""Jacobian rows of a model's outputs with respect to some of its parameters, and the model calls they need.

Three ways to the same rows (LoKO picks one per observation, ``docs/specs/loko.md`` §3):

* :func:`output_jacobian`: from a live graph, ``k`` vector-Jacobian products in one batched backward.
* :func:`func_jacobian`: ``vmap`` over samples of ``jacrev`` of ``torch.func.functional_call``: one vectorised pass
  for the whole batch, no graph needed.
* one-sample graphs: :func:`sample_forward` gives ``forward(i)``, whose graph :func:`output_jacobian` differentiates.
* replicated samples: each sample repeated once per observed row, one ordinary backward of the replicated batch,
  and the per-sample parameter gradients of each linear or convolution layer from its input and output-gradient
  (:func:`linear_sample_grads`, :func:`conv2d_sample_grads`; the hooks are in :mod:`loraopt.lora.per_sample`).

:func:`evaluate_at` runs the model (or a caller's one-sample forward) at other parameter values through
``functional_call``, without writing the parameters. Only ``torch`` is imported; nothing keeps state.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "FuncUnsupported",
    "output_jacobian",
    "func_jacobian",
    "evaluate_at",
    "model_outputs",
    "detached_message",
    "split_inputs",
    "without_trivial_mask",
    "input_batch_size",
    "sample_forward",
    "parameter_names",
    "attention_for_vmap",
    "linear_sample_grads",
    "conv2d_sample_grads",
]


class FuncUnsupported(Exception):
    """The model cannot run under ``torch.func.vmap`` (raised by :func:`func_jacobian`; callers fall back)."""


def output_jacobian(
    outputs: Tensor,
    params: Sequence[Tensor],
    *,
    rows: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
    retain_graph: bool = True,
) -> Tensor:
    """Rows of the Jacobian of ``outputs`` w.r.t. ``params`` from a live graph, in one batched backward.

    Args:
        outputs: any shape, with an autograd graph to ``params``; it is flattened to ``(N,)``.
        params: tensors requiring grad; their Jacobian blocks are flattened and concatenated in this order.
        rows: ``(k,)`` int indices into the flattened outputs (default: all ``N``).
        dtype: dtype of the result.
        retain_graph: keep the graph (default) so the caller may still run ``backward`` on it.

    Returns:
        ``H: (k, n)`` with ``n = sum(p.numel())``; ``H[i] = d outputs.flat[rows[i]] / d params``. Parameters that do
        not reach ``outputs`` give zero columns.

    The ``k`` vector-Jacobian products with the basis vectors are run as one vmapped backward
    (``autograd.grad(..., is_grads_batched=True)``) instead of ``k`` separate backward passes.
    """
    flat = outputs.reshape(-1)
    if rows is None:
        rows = torch.arange(flat.numel(), device=flat.device)
    k = rows.numel()
    basis = torch.zeros(k, flat.numel(), dtype=flat.dtype, device=flat.device)
    basis[torch.arange(k, device=flat.device), rows.to(flat.device)] = 1
    grads = torch.autograd.grad(
        flat, list(params), grad_outputs=basis, retain_graph=retain_graph, allow_unused=True, is_grads_batched=True
    )
    # materialize_grads would give unbatched zeros for unused inputs, so missing blocks are filled here.
    blocks = [
        g.reshape(k, -1).to(dtype) if g is not None else torch.zeros(k, p.numel(), dtype=dtype, device=flat.device)
        for g, p in zip(grads, params)
    ]
    return torch.cat(blocks, dim=1)


def model_outputs(obj: Any, what: str, attr: str = "logits") -> Any:
    """The tensor inside a model's return value: itself, ``obj.logits`` (Hugging Face ``ModelOutput`` or anything
    with that attribute) or ``obj["logits"]``; ``attr="loss"`` for a loss. ``what`` names the caller in errors."""
    if torch.is_tensor(obj):
        return obj
    if isinstance(obj, Mapping) and torch.is_tensor(obj.get(attr)):
        return obj[attr]
    value = getattr(obj, attr, None)
    if torch.is_tensor(value):
        return value
    if isinstance(obj, (tuple, list)):
        raise ValueError(
            f"{what} got a {type(obj).__name__} of {len(obj)} items where a tensor of {attr} was expected: pass the "
            f"{attr} tensor itself (e.g. outputs[0] of a model called with return_dict=False)"
        )
    raise TypeError(
        f"{what} takes the model {attr} as a tensor, or a model output with a .{attr} tensor (a Hugging Face "
        f"ModelOutput); got {type(obj).__name__}"
    )


def detached_message(out: Tensor, grad_enabled: bool = True, prefix: bool = True) -> str:
    """Why ``out`` has no autograd graph, and what to do."""
    if out.is_inference():
        cause = "they were computed under torch.inference_mode()"
    elif not grad_enabled:
        cause = "gradients are disabled here (torch.no_grad() or torch.set_grad_enabled(False) is active)"
    else:
        cause = (
            "they carry no autograd graph: they were computed under torch.no_grad(), .detach()ed, or no parameter "
            "with requires_grad=True feeds them"
        )
    head = "observe() needs the model outputs with their autograd graph, but " if prefix else ""
    return (
        head + cause + ". Compute the outputs with gradients enabled, or pass observe(outputs, targets, inputs=x) so "
        "that LoKO recomputes them from the inputs (detached outputs are then fine)"
    )


def split_inputs(inputs: Any) -> Tuple[List[Tensor], Callable[[List[Tensor]], Tuple[tuple, dict]]]:
    """``(leaves, rebuild)``: the per-sample tensors of a batch (every tensor whose dim 0 has the batch size of the
    first one) and ``rebuild(new_leaves) -> (args, kwargs)`` putting replacements back in their places.

    ``inputs``: a tensor (one positional argument), a tuple/list (positional arguments) or a mapping (keyword
    arguments, e.g. a tokenizer's batch)."""
    if torch.is_tensor(inputs):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, Mapping):
        args, kwargs = (), dict(inputs)
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        raise TypeError(
            "inputs must be a tensor, a tuple of tensors (positional arguments of the model) or a dict of tensors "
            f"(keyword arguments); got {type(inputs).__name__}"
        )
    entries = [(True, i, v) for i, v in enumerate(args)] + [(False, k, v) for k, v in kwargs.items()]
    tensors = [t for t in entries if torch.is_tensor(t[2]) and t[2].dim() >= 1]
    if not tensors:
        raise ValueError("inputs hold no tensor with a batch dimension (dim 0 = samples)")
    b = tensors[0][2].shape[0]
    slots = [t for t in tensors if t[2].shape[0] == b]

    def rebuild(leaves: List[Tensor]) -> Tuple[tuple, dict]:
        a, k = list(args), dict(kwargs)
        for (positional, key, _), leaf in zip(slots, leaves):
            if positional:
                a[key] = leaf
            else:
                k[key] = leaf
        return tuple(a), k

    return [t[2] for t in slots], rebuild


def without_trivial_mask(inputs: Any) -> Any:
    """Drop an all-ones ``attention_mask`` keyword (Hugging Face: the same as no mask). Hugging Face models check
    whether the mask is all ones with Python control flow, which ``vmap`` cannot run; a padded batch (a mask with
    zeros) therefore falls back to one-sample graphs."""
    if isinstance(inputs, Mapping):
        mask = inputs.get("attention_mask")
        if torch.is_tensor(mask) and bool((mask == 1).all()):
            return {k: v for k, v in inputs.items() if k != "attention_mask"}
    return inputs


def input_batch_size(inputs: Any) -> int:
    """``b``: the size of dim 0 of the first batched tensor of ``inputs`` (see :func:`split_inputs`)."""
    return split_inputs(inputs)[0][0].shape[0]


def sample_forward(model: nn.Module, inputs: Any) -> Callable[[int], Any]:
    """``forward(i)``: the model's outputs for sample ``i`` of ``inputs`` alone."""
    leaves, rebuild = split_inputs(inputs)

    def forward(i: int) -> Any:
        args, kwargs = rebuild([x[i : i + 1] for x in leaves])
        return model(*args, **kwargs)

    return forward


def parameter_names(model: nn.Module, params: Sequence[Tensor]) -> List[str]:
    """The names of ``params`` in ``model`` (``named_parameters`` order is irrelevant; tied names are kept)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    missing = sum(id(p) not in names for p in params)
    if missing:
        raise ValueError(
            f"{missing} of the optimizer's {len(params)} parameters are not parameters of the model given for "
            "inputs=: pass the model the optimizer was built on (observe(..., model=model))"
        )
    return [names[id(p)] for p in params]


def attention_for_vmap(math_attention: bool):
    """A context running scaled-dot-product attention on the math kernel when ``math_attention``: the fused kernels
    have no ``vmap`` rule (their backward, and on the CPU the kernel itself, run once per vmapped entry); the math
    kernel is plain batched matmuls. For code that vmaps a model (the func path, the online ensemble)."""
    if not math_attention:
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - old torch
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def func_jacobian(
    model: nn.Module,
    inputs: Any,
    params: Sequence[Tensor],
    observe_one: Callable[..., Tensor],
    *,
    dtype: torch.dtype,
    math_attention: bool = True,
    per_sample: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Jacobian rows and values of an observed function of every sample, from one ``vmap`` of ``jacrev``.

    Args:
        model: the module ``params`` belong to; it is called through ``functional_call`` on one sample at a time.
        inputs: the batch (see :func:`split_inputs`), samples along dim 0 of each batched tensor.
        params: the ``n``-coordinate state, in order.
        observe_one: ``out -> h: (k,)``, the observed function of one sample's model output ``out`` (any shape);
            ``(out, extra) -> h`` when ``per_sample`` is given.
        dtype: dtype of ``H``.
        per_sample: ``(b, ...)``: one more input of ``observe_one`` per sample (e.g. which outputs it observes).
        math_attention: run scaled-dot-product attention on the math kernel (the fused ones cannot be vmapped).

    Returns:
        ``H: (b k, n)`` (rows of sample ``i`` at ``i k ... (i+1) k - 1``) and ``h: (b, k)`` (detached, the model's
        dtype). Raises :class:`FuncUnsupported` when the model cannot run under ``vmap``.
    """
    from torch.func import functional_call, jacrev, vmap

    names = parameter_names(model, params)
    leaves, rebuild = split_inputs(without_trivial_mask(inputs))
    b = leaves[0].shape[0]
    theta = {name: p.detach() for name, p in zip(names, params)}

    extra = [] if per_sample is None else [per_sample]

    def observed(th: Dict[str, Tensor], *sample: Tensor) -> Tuple[Tensor, Tensor]:
        sample, more = sample[: len(leaves)], sample[len(leaves):]
        args, kwargs = rebuild([x.unsqueeze(0) for x in sample])
        h = observe_one(model_outputs(functional_call(model, th, args, kwargs), "the model"), *more)
        return h, h

    rows = vmap(jacrev(observed, has_aux=True), in_dims=(None,) + (0,) * (len(leaves) + len(extra)),
                randomness="different")
    try:
        with attention_for_vmap(math_attention):
            jac, h = rows(theta, *leaves, *extra)
    except (RuntimeError, NotImplementedError) as exc:
        raise FuncUnsupported(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    H = torch.cat([jac[name].reshape(b * h.shape[-1], -1).to(dtype) for name in names], dim=1)
    return H, h.detach()


class _Call(nn.Module):
    """Wraps a caller's function so that ``functional_call`` can swap the parameters of ``model`` around it."""

    def __init__(self, model: nn.Module, fn: Callable[..., Any]):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


def evaluate_at(
    model: nn.Module, params: Sequence[Tensor], values: Sequence[Tensor], fn: Callable[..., Any], *args: Any
) -> Any:
    """``fn(*args)`` with ``model``'s parameters ``params`` replaced by ``values`` (same shapes), through
    ``torch.func.functional_call``: the parameters themselves are never written. ``fn`` calls ``model`` (e.g.
    ``lambda i: model(x[i:i+1])``); other modules it calls see their own parameters."""
    from torch.func import functional_call

    names = parameter_names(model, params)
    return functional_call(_Call(model, fn), {"model." + n: v for n, v in zip(names, values)}, args)


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def linear_sample_grads(x: Tensor, g: Tensor, bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-sample gradients of a linear layer ``y = x W^T + c`` from its input and output-gradient.

    Args:
        x: ``(N, ..., d_in)``, the layer input of every sample (any positions in between, e.g. tokens).
        g: ``(N, ..., d_out)``, ``dL_i / dy`` of sample ``i``'s own scalar ``L_i`` (its positions as in ``x``).
        bias: whether the layer has ``c``.

    Returns:
        ``dW: (N, d_out, d_in)`` with ``dW[i] = sum_positions g_i^T x_i`` and ``dc: (N, d_out)`` (or None), in fp32
        (fp64 for fp64 inputs).
    """
    dtype = _accumulation_dtype(x)
    n = x.shape[0]
    x = x.reshape(n, -1, x.shape[-1]).to(dtype)
    g = g.reshape(n, -1, g.shape[-1]).to(dtype)
    return torch.bmm(g.transpose(1, 2), x), (g.sum(1) if bias else None)


def conv2d_sample_grads(
    x: Tensor,
    g: Tensor,
    kernel_size: Tuple[int, int],
    *,
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    bias: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Per-sample gradients of an ungrouped, zero-padded ``Conv2d`` from its input and output-gradient.

    Args:
        x: ``(N, C_in, H, W)``, the layer input.
        g: ``(N, C_out, H', W')``, ``dL_i / dy`` of sample ``i``'s own scalar.
        kernel_size, stride, padding, dilation: the layer's (numeric) geometry.
        bias: whether the layer has a bias.

    Returns:
        ``dW: (N, C_out, C_in, kh, kw)`` (the convolution's weight gradient restricted to sample ``i``: the output
        gradient times the input patches it saw, summed over output positions) and ``db: (N, C_out)`` or None,
        in fp32 (fp64 for fp64 inputs).
    """
    dtype = _accumulation_dtype(x)
    n, c_out = g.shape[0], g.shape[1]
    if tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        patches = x.reshape(n, x.shape[1], -1)  # a pointwise convolution sees each position's channels alone
    else:
        patches = torch.nn.functional.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    g = g.reshape(n, c_out, -1).to(dtype)
    dW = torch.bmm(g, patches.to(dtype).transpose(1, 2))
    return dW.reshape(n, c_out, x.shape[1], *kernel_size), (g.sum(-1) if bias else None)
