"""The gradient baselines of ``loraopt bench online`` as one ensemble per (stream, seed): ``--ensemble``.

Every AdamW and AdaGrad grid point of one (stream, seed) sees the same stream order and starts from the same model
(the seed fixes both), so their runs differ only in the optimizer's hyperparameters. :func:`run_ensemble` runs E of
them together: the model is built once, exactly as :func:`~loraopt_bench.online.run_one` builds it; the trainable
parameters of the E members are stacked along a new leading dimension (frozen parameters and buffers stay shared);
one pass gives the ``(E, 1, m)`` logits of the sample, either with the members as the batch (the sample repeated
E times, each layer that owns trainable parameters applying member e's to row e: :class:`members_as_batch`, used
where it is exact and passes a first-sample check) or with one ``torch.vmap`` of ``torch.func.functional_call``
(any other model); the summed
cross-entropy of the members is back-propagated once (each member's gradient is that of its own loss); and the
members' updates are applied on the stacked tensors by :class:`StackedAdamW` / :class:`StackedAdagrad`, which
reproduce ``torch.optim.AdamW`` / ``torch.optim.Adagrad`` as built by the library factories (hyperparameters and
parameter groups are read from the real optimizer of each member, including the library's rule that a step with a
non-finite gradient is skipped). The updates are plain tensor ops with per-member hyperparameters broadcast along
dim 0 and no host synchronisation.

Each member yields the record of its own run (the format of ``run_one``); held-out accuracy is computed by loading
the member's parameters into the model and calling the same ``predict`` as ``run_one``. Timing: the ensemble's wall
time per sample is ``ensemble_sec_per_sample``; ``sec_per_sample`` is that divided by ``ensemble_size`` (the cost
per member when amortised over the ensemble, not the time of a run on its own).

Results equal those of the separate runs up to float32 rounding: the ensemble's forward and backward run batched
kernels, so logits and gradients can differ in the last bits, which can flip a rare near-tie argmax. AdamW and
AdaGrad amplify such differences at the unstable learning rates, and on a GPU cuDNN's TF32 convolutions (torch's
default) make them larger; in float64 the two paths agree to ~1e-11 (``benchmarks/notes/loko.md``, "Ensembled
baselines for the online sweep"; ``scripts/online_ensemble_check.py``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loraopt.functional.jacobian import attention_for_vmap
from loraopt.optim.registry import create_optimizer
from .common import jsonable, set_cpu_threads
from . import online

__all__ = [
    "ENSEMBLE_OPTIMIZERS",
    "EnsembleTask",
    "EnsembleUnsupportedError",
    "StackedAdamW",
    "StackedAdagrad",
    "ensemble_eligible",
    "group_ensembles",
    "run_ensemble",
    "ensemble_pass",
    "stack_parameters",
]

#: the registered optimizers whose grid points run as ensemble members (update GRADIENT)
ENSEMBLE_OPTIMIZERS = ("adamw", "adagrad")


class EnsembleUnsupportedError(RuntimeError):
    """The stream's model cannot run under ``torch.vmap``."""


# ------------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class EnsembleTask:
    """The runs of one (stream, seed) that run as one ensemble; picklable like :class:`~online.RunTask`."""

    members: Tuple[online.RunTask, ...]
    #: capture each step as a CUDA graph (``--graph``; see :class:`GraphedSteps`)
    graph: bool = False

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("an ensemble needs at least one member")
        first = self.members[0]
        for task in self.members:
            if _group_key(task) != _group_key(first):
                raise ValueError(f"ensemble members must share the stream, seed, sizes and device: {first} vs {task}")
            if not ensemble_eligible(task):
                raise ValueError(f"{task.method} is not an AdamW/AdaGrad method: it cannot join an ensemble")

    @property
    def stream(self) -> str:
        return self.members[0].stream

    @property
    def seed(self) -> int:
        return self.members[0].seed

    @property
    def threads(self) -> int:
        return self.members[0].threads


def ensemble_eligible(task: online.RunTask) -> bool:
    method = online.METHODS[task.method]
    return method.optimizer in ENSEMBLE_OPTIMIZERS and method.update == online.GRADIENT


def _group_key(task: online.RunTask) -> Tuple[Any, ...]:
    return (task.stream, task.seed, task.samples, task.eval_samples, task.image_size, task.threads, task.device,
            task.bundles)


def group_ensembles(tasks: Sequence[online.RunTask], *, graph: bool = False
                    ) -> Tuple[List[EnsembleTask], List[online.RunTask]]:
    """The AdamW/AdaGrad tasks grouped into one ensemble per (stream, seed, sizes, device), and the other tasks;
    ``graph``: the ensembles capture their steps as CUDA graphs.

    A group of a single task is returned among the other tasks (it runs on its own, like without ``--ensemble``).
    Within an ensemble, members keep the order of ``tasks``.
    """
    groups: Dict[Tuple[Any, ...], List[online.RunTask]] = {}
    others: List[online.RunTask] = []
    for task in tasks:
        if ensemble_eligible(task):
            groups.setdefault(_group_key(task), []).append(task)
        else:
            others.append(task)
    ensembles = []
    for members in groups.values():
        if len(members) == 1:
            others.append(members[0])
        else:
            ensembles.append(EnsembleTask(tuple(members), graph=graph))
    return ensembles, others


# ------------------------------------------------------------------------------------------------- stacked updates


def _per_member(value: Any, members: int, name: str) -> Tuple[float, ...]:
    """A hyperparameter given once or per member, as ``members`` floats."""
    if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.dim() == 0):
        return (float(value),) * members
    values = tuple(float(v) for v in value)
    if len(values) != members:
        raise ValueError(f"{name}: {len(values)} values for {members} members")
    return values


class _StackedOptimizer:
    """Shared machinery of the stacked updates.

    The state is one flat ``(E, N)`` tensor ``param``: row ``e`` holds member ``e``'s N coordinates (all of its
    trainable parameters, flattened and concatenated; the caller keeps its parameters as views of it). The update
    is a handful of elementwise ops on ``(E, N)`` tensors, however many parameters there are, with no host
    synchronisation (so it can be captured in a CUDA graph). Per-member hyperparameters broadcast along dim 0.

    ``sizes`` splits the N coordinates into segments (one per parameter) and ``hparams[i][name]`` holds the E values
    of hyperparameter ``name`` for segment ``i`` (one value: the same for every member). A torch parameter group is
    a set of segments sharing one column of values. The per-step coefficients are computed per distinct column in
    float64 (as the Python floats of torch's single-tensor implementation), then cast to the parameter dtype and
    spread over the coordinates.

    A member whose gradient has a NaN/inf entry skips the step (parameters, state and step count unchanged), as the
    library factories' optimizers do (``skip_nonfinite``, their guard); members are independent.
    """

    NAMES: Tuple[str, ...] = ()

    def __init__(self, param: Tensor, hparams: Sequence[Mapping[str, Any]], sizes: Optional[Sequence[int]] = None, *,
                 skip_nonfinite: bool = True):
        if param.dim() != 2:
            raise ValueError(f"param must be (members, coordinates), got shape {tuple(param.shape)}")
        self.param = param.detach()
        self.members, coordinates = self.param.shape
        sizes = [coordinates] if sizes is None else [int(n) for n in sizes]
        if sum(sizes) != coordinates or len(hparams) != len(sizes):
            raise ValueError(f"{len(hparams)} hyperparameter sets and segments of {sum(sizes)} coordinates for "
                             f"{len(sizes)} segments of {coordinates} coordinates")
        device = self.param.device
        self.skip_nonfinite = skip_nonfinite
        columns: Dict[Tuple[Tuple[float, ...], ...], int] = {}
        column_of = []
        for hp in hparams:
            key = tuple(_per_member(hp[name], self.members, name) for name in self.NAMES)
            column_of.append(columns.setdefault(key, len(columns)))
        keys = list(columns)
        #: per hyperparameter, (E, C): member e's value in column c (float64)
        self.values = {name: torch.tensor([[key[j][e] for key in keys] for e in range(self.members)],
                                          dtype=torch.float64, device=device) for j, name in enumerate(self.NAMES)}
        self._decays = any(v != 0 for key in keys for v in key[self.NAMES.index("weight_decay")])  # host-side
        self._index = None if len(keys) == 1 else torch.repeat_interleave(
            torch.tensor(column_of), torch.tensor(sizes)).to(device)
        #: completed steps per member (float64, like torch's step tensors); a skipped step does not count
        self.step_count = torch.zeros(self.members, dtype=torch.float64, device=device)
        self.state: Dict[str, Tensor] = self._init_state()

    @classmethod
    def from_groups(cls, param: Tensor, sizes: Sequence[int], groups: Sequence[Sequence[Mapping[str, Any]]], *,
                    skip_nonfinite: bool = True) -> "_StackedOptimizer":
        """``groups[e][i]``: the torch parameter group (its hyperparameters) of segment ``i`` in member ``e``."""
        per_segment = []
        for i in range(len(sizes)):
            values = [cls.group_hparams(member[i]) for member in groups]
            per_segment.append({name: [v[name] for v in values] for name in cls.NAMES})
        return cls(param, hparams=per_segment, sizes=sizes, skip_nonfinite=skip_nonfinite)

    def spread(self, values: Tensor) -> Tensor:
        """``(E, C)`` float64 -> the parameter dtype, ``(E, 1)`` (one column) or ``(E, N)``."""
        values = values.to(self.param.dtype)
        return values if self._index is None else values.index_select(1, self._index)

    # subclasses
    @staticmethod
    def group_hparams(group: Mapping[str, Any]) -> Dict[str, float]:
        raise NotImplementedError

    def _init_state(self) -> Dict[str, Tensor]:
        raise NotImplementedError

    def _update(self, g: Tensor, step: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """New values of the parameter and of the state (out of place); ``step`` is (E, 1) float64."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, grad: Tensor) -> None:
        """One step of every member from ``grad``, shaped like ``param``."""
        if grad.shape != self.param.shape:
            raise ValueError(f"grad of shape {tuple(grad.shape)} for param of shape {tuple(self.param.shape)}")
        grad = grad.detach()
        ok: Optional[Tensor] = None
        if self.skip_nonfinite:
            ok = torch.isfinite(grad).all(1)  # per member: max |g| is finite, the library guard's test
        step = self.step_count + (1.0 if ok is None else ok.to(torch.float64))
        new_param, new_state = self._update(grad, step.unsqueeze(1))
        if ok is None:
            self.param.copy_(new_param)
            for key, value in new_state.items():
                self.state[key].copy_(value)
        else:
            keep = ok.unsqueeze(1)
            self.param.copy_(torch.where(keep, new_param, self.param))
            for key, value in new_state.items():
                self.state[key].copy_(torch.where(keep, value, self.state[key]))
        self.step_count.copy_(step)


class StackedAdamW(_StackedOptimizer):
    """``torch.optim.AdamW`` (``amsgrad=False``, ``maximize=False``) of E members at once.

    Per member and coordinate, as torch's single-tensor AdamW: ``p *= 1 - lr wd``; ``m = lerp(m, g, 1 - beta1)``;
    ``v = beta2 v + (1 - beta2) g²``; ``p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)``.

    ``lr``, ``betas``, ``eps`` and ``weight_decay``: one value, or one per member (``betas``: a pair, or one pair
    per member), for every coordinate. :meth:`from_groups` takes them per segment from torch parameter groups.
    """

    NAMES = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __init__(self, param: Tensor, lr: Any = None, betas: Any = (0.9, 0.999), eps: Any = 1e-8,
                 weight_decay: Any = 0.0, *, hparams: Optional[Sequence[Mapping[str, Any]]] = None,
                 sizes: Optional[Sequence[int]] = None, skip_nonfinite: bool = True):
        if hparams is None:
            if lr is None:
                raise ValueError("StackedAdamW needs lr (one value or one per member)")
            pairs = isinstance(betas[0], (tuple, list))
            hparams = [{"lr": lr, "beta1": [b[0] for b in betas] if pairs else betas[0],
                        "beta2": [b[1] for b in betas] if pairs else betas[1], "eps": eps,
                        "weight_decay": weight_decay}]
        super().__init__(param, hparams, sizes, skip_nonfinite=skip_nonfinite)

    @staticmethod
    def group_hparams(group: Mapping[str, Any]) -> Dict[str, float]:
        for flag in ("amsgrad", "maximize"):
            if group.get(flag):
                raise ValueError(f"the ensemble's AdamW does not implement {flag}=True")
        if not group.get("decoupled_weight_decay", True):
            raise ValueError("the ensemble's AdamW implements decoupled weight decay only")
        beta1, beta2 = group["betas"]
        return {"lr": float(group["lr"]), "beta1": float(beta1), "beta2": float(beta2), "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"])}

    def _init_state(self) -> Dict[str, Tensor]:
        return {"exp_avg": torch.zeros_like(self.param), "exp_avg_sq": torch.zeros_like(self.param)}

    def _update(self, g, step):
        h = self.values
        lr, beta1, beta2 = h["lr"], h["beta1"], h["beta2"]
        neg_step_size = -(lr / (1 - beta1 ** step))
        bias_correction2_sqrt = (1 - beta2 ** step).sqrt()
        p = self.param * self.spread(1 - lr * h["weight_decay"]) if self._decays else self.param
        exp_avg = torch.lerp(self.state["exp_avg"], g, self.spread(1 - beta1))
        exp_avg_sq = self.state["exp_avg_sq"] * self.spread(beta2) + self.spread(1 - beta2) * g * g
        denom = exp_avg_sq.sqrt() / self.spread(bias_correction2_sqrt) + self.spread(h["eps"])
        return p + self.spread(neg_step_size) * exp_avg / denom, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class StackedAdagrad(_StackedOptimizer):
    """``torch.optim.Adagrad`` (``maximize=False``, dense gradients) of E members at once.

    Per member and coordinate, as torch's single-tensor Adagrad: ``g += wd p``; ``s += g²``;
    ``p -= lr / (1 + (t - 1) lr_decay) * g / (sqrt(s) + eps)``, ``s`` starting at ``initial_accumulator_value``.
    """

    NAMES = ("lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value")

    def __init__(self, param: Tensor, lr: Any = None, lr_decay: Any = 0.0, eps: Any = 1e-10,
                 weight_decay: Any = 0.0, initial_accumulator_value: Any = 0.0, *,
                 hparams: Optional[Sequence[Mapping[str, Any]]] = None, sizes: Optional[Sequence[int]] = None,
                 skip_nonfinite: bool = True):
        if hparams is None:
            if lr is None:
                raise ValueError("StackedAdagrad needs lr (one value or one per member)")
            hparams = [{"lr": lr, "lr_decay": lr_decay, "eps": eps, "weight_decay": weight_decay,
                        "initial_accumulator_value": initial_accumulator_value}]
        super().__init__(param, hparams, sizes, skip_nonfinite=skip_nonfinite)

    @staticmethod
    def group_hparams(group: Mapping[str, Any]) -> Dict[str, float]:
        if group.get("maximize"):
            raise ValueError("the ensemble's Adagrad does not implement maximize=True")
        return {name: float(group[name]) for name in StackedAdagrad.NAMES}

    def _init_state(self) -> Dict[str, Tensor]:
        return {"sum": self.spread(self.values["initial_accumulator_value"]).expand_as(self.param).clone()}

    def _update(self, g, step):
        h = self.values
        neg_clr = -(h["lr"] / (1 + (step - 1) * h["lr_decay"]))
        if self._decays:
            g = g + self.spread(h["weight_decay"]) * self.param
        total = self.state["sum"] + g * g
        std = total.sqrt() + self.spread(h["eps"])
        return self.param + self.spread(neg_clr) * g / std, {"sum": total}


def stack_parameters(params: Sequence[Tensor], members: int) -> Tuple[Tensor, List[Tensor]]:
    """``members`` copies of ``params`` as one flat ``(members, N)`` tensor and, per parameter, a leaf view of it
    shaped ``(members, *shape)`` that requires grad (what ``functional_call`` gets). Writing the flat tensor (the
    stacked update) writes the views."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise ValueError(f"the stacked parameters must share one dtype, got {sorted(map(str, dtypes))}")
    flat = torch.cat([p.detach().reshape(1, -1) for p in params], 1).expand(members, -1).clone()
    views, offset = [], 0
    for p in params:
        views.append(flat[:, offset:offset + p.numel()].view(members, *p.shape).requires_grad_())
        offset += p.numel()
    return flat, views


# ------------------------------------------------------------------------------------------------- members as a batch
#
# torch.vmap runs the members' forward and backward with batched kernels where torch has a batching rule; where it
# has none (convolution_backward, batch-norm backward), it loops over the members, one kernel launch each, and its
# dispatch adds host time to every op. On EfficientNet-Lite0 at batch 1 that made a 14-member step cost 86 ms on an
# H200 and 193 ms on one CPU core, against 26 ms and 14 ms for one plain step (benchmarks/notes/loko.md). When every
# trainable parameter is the weight or bias of a plain Linear or Conv2d (LoRA factors and a Linear head: every
# model of the online streams), the members can instead be the batch: the sample is repeated E times, every frozen
# layer runs once on the batch of E, and only the layers that own trainable parameters apply member e's weights
# to row e (one batched matmul or grouped convolution). That is exact as long as each row of the batch is computed
# independently of the others: eval-mode models (batch norm on its running statistics) and batch-1 samples.

_BATCHED_TYPES = (nn.Linear, nn.Conv2d)


def members_as_batch_refusal(model: nn.Module, names: Sequence[str]) -> Optional[str]:
    """Why the members of ``model`` (trainable parameters ``names``) cannot run as a batch, or None if they can."""
    modules = dict(model.named_modules())
    training = [n or "the model" for n, m in modules.items() if m.training]
    if training:
        return f"modules in training mode (rows of a batch would interact): {training[:3]}"
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = modules.get(owner)
        if type(module) not in _BATCHED_TYPES or attr not in ("weight", "bias"):
            return f"{name} is not the weight or bias of a plain nn.Linear / nn.Conv2d"
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            return f"{owner} pads with {module.padding_mode!r}"
    return None


def _member_linear(module: nn.Linear, weight: Tensor, bias: Optional[Tensor]):
    """Row e of the input through member e's Linear. ``weight``: (E, out, in) or shared (out, in); ``bias``:
    (E, out), shared (out,) or None."""

    def forward(x: Tensor) -> Tensor:  # (E, ..., in) -> (E, ..., out)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        y = torch.matmul(rows, weight.transpose(-1, -2))  # (E, L, out)
        if bias is not None:
            y = y + (bias.unsqueeze(1) if bias.dim() == 2 else bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    return forward


def _member_conv2d(module: nn.Conv2d, weight: Tensor, bias: Optional[Tensor]):
    """Row e of the input through member e's Conv2d. ``weight``: (E, out, in/groups, kh, kw) or shared; ``bias``:
    (E, out), shared (out,) or None. A pointwise convolution is a batched matmul; any other is one grouped
    convolution over the E rows stacked as channels."""
    pointwise = (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1
                 and module.padding in ((0, 0), "valid", "same"))

    def forward(x: Tensor) -> Tensor:  # (E, C, H, W) -> (E, O, H', W')
        members, channels, height, width = x.shape
        w = weight if weight.dim() == 5 else weight.expand(members, *weight.shape)
        b = None if bias is None else (bias if bias.dim() == 2 else bias.expand(members, -1))
        if pointwise:
            y = torch.matmul(w.flatten(2), x.reshape(members, channels, height * width))  # (E, O, HW)
            if b is not None:
                y = y + b.unsqueeze(-1)
            return y.view(members, -1, height, width)
        y = F.conv2d(x.reshape(1, members * channels, height, width), w.reshape(-1, *w.shape[2:]),
                     None if b is None else b.reshape(-1), module.stride, module.padding, module.dilation,
                     members * module.groups)
        return y.view(members, -1, *y.shape[-2:])

    return forward


class members_as_batch:
    """Context manager: while open, the modules that own the trainable parameters ``names`` of ``model`` apply the
    stacked ``values`` (``(E, *shape)`` per name, in the order of ``names``) row by row, so ``model(batch of E)``
    is the E members' outputs. :func:`members_as_batch_refusal` says whether that is exact for ``model``."""

    def __init__(self, model: nn.Module, names: Sequence[str], values: Sequence[Tensor]):
        reason = members_as_batch_refusal(model, names)
        if reason is not None:
            raise EnsembleUnsupportedError(f"the members cannot run as a batch: {reason}")
        modules = dict(model.named_modules())
        stacked = dict(zip(names, values))
        self.patched: List[nn.Module] = []
        self.forwards = []
        for owner in dict.fromkeys(name.rpartition(".")[0] for name in names):
            module = modules[owner]
            weight = stacked.get(owner + ".weight", module.weight)
            bias = stacked.get(owner + ".bias", module.bias)
            build = _member_linear if isinstance(module, nn.Linear) else _member_conv2d
            self.patched.append(module)
            self.forwards.append(build(module, weight, bias))

    def __enter__(self) -> "members_as_batch":
        for module, forward in zip(self.patched, self.forwards):
            module.forward = forward  # an instance attribute: nn.Module.__call__ (and its hooks) call it
        return self

    def __exit__(self, *exc) -> None:
        for module in self.patched:
            del module.forward


def repeat_sample(x: Any, members: int) -> Any:
    """A batch-1 sample (a tensor, or a dict of them as a tokenizer returns) repeated ``members`` times along dim 0."""
    if isinstance(x, Mapping):
        return {k: repeat_sample(v, members) for k, v in x.items()}
    if not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] != 1:
        raise EnsembleUnsupportedError("the members run as a batch only on batch-1 tensor samples")
    return x.expand(members, *x.shape[1:]).contiguous()


def _check_members_as_batch(batched_logits: Tensor, batched_grads: Sequence[Tensor], wrapper: nn.Module,
                            keys: Sequence[str], stacked: Sequence[Tensor], x: Any, label: Tensor) -> Optional[str]:
    """Compare the batch path's logits and gradients on the first sample with E separate forward/backward passes
    (``functional_call`` per member, no vmap); the mismatch as text, or None. Catches what the module check cannot
    see, e.g. a trainable weight that the model also reads outside its owner's forward."""
    from torch.func import functional_call

    tol = 1e-9 if stacked[0].dtype == torch.float64 else 2e-3
    for e in range(stacked[0].shape[0]):
        values = {k: s.detach()[e].clone().requires_grad_() for k, s in zip(keys, stacked)}
        logits = functional_call(wrapper, values, (x,))
        grads = torch.autograd.grad(F.cross_entropy(logits, label, reduction="sum"), list(values.values()),
                                    allow_unused=True)
        pairs = [("logits", batched_logits[e], logits.detach().reshape(batched_logits[e].shape))]
        pairs += [(k, g_batch[e], torch.zeros_like(g_batch[e]) if g is None else g)
                  for k, g_batch, g in zip(keys, batched_grads, grads)]
        for name, actual, expected in pairs:
            scale = float(expected.abs().max())
            gap = float((actual - expected).abs().max())
            if not gap <= tol * scale + 1e-12:
                return f"member {e}, {name}: |difference| {gap:.3g} against a scale of {scale:.3g}"
    return None


# ------------------------------------------------------------------------------------------------- CUDA graphs
#
# A batch-1 step is launch-bound on a GPU: the host spends more time issuing the forward, backward and update
# kernels than the device spends running them. The ensemble's step has no host synchronisation (the stacked updates
# keep everything on the device), so it can be captured once as a CUDA graph and replayed per sample.


def _clone_sample(x: Any) -> Any:
    return {k: v.clone() for k, v in x.items()} if isinstance(x, Mapping) else x.clone()


def _copy_sample(into: Any, x: Any) -> None:
    if isinstance(into, Mapping):
        for k, v in into.items():
            v.copy_(x[k])
    else:
        into.copy_(x)


def _shape_key(x: Any) -> Tuple[Any, ...]:
    if isinstance(x, Mapping):
        return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(x.items()))
    return (tuple(x.shape), x.dtype)


class GraphedSteps:
    """``step(x, label) -> logits`` replayed from CUDA graphs, one per input shape (token lengths vary).

    ``step`` must run entirely on the device (no host synchronisation) and leave its effects in tensors only;
    ``state`` lists every tensor it changes in place (stacked parameters, optimizer state and step counts). A new
    shape is captured on first sight: three warm-up steps on a side stream (as torch's capture recipe asks), the
    ``state`` restored to its value before them, then the capture, which records without running. So the replayed
    trajectory is the eager one. Each graph keeps its own memory pool, because graphs of different shapes replay in
    data order, not in capture order. The returned logits live in the graph's pool: read them before the next call.
    """

    WARMUP = 3

    def __init__(self, step: Any, state: Sequence[Tensor]):
        self.step = step
        self.state = list(state)
        self.graphs: Dict[Tuple[Any, ...], Tuple[Any, Tensor, Any, Tensor]] = {}
        #: why capture failed (the steps then run eagerly), or None
        self.failure: Optional[str] = None

    def __call__(self, x: Any, label: Tensor) -> Tensor:
        if self.failure is not None:
            return self.step(x, label)
        entry = self.graphs.get(_shape_key(x))
        if entry is None:
            try:
                entry = self.graphs[_shape_key(x)] = self._capture(x, label)
            except RuntimeError as error:  # an op that cannot be captured: the eager step, with a warning
                self.failure = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
                warnings.warn(f"--graph: the ensemble step could not be captured ({self.failure}); running it "
                              "eagerly", RuntimeWarning, stacklevel=2)
                return self.step(x, label)
        static_x, static_label, graph, logits = entry
        _copy_sample(static_x, x)
        static_label.copy_(label)
        graph.replay()
        return logits

    def _capture(self, x: Any, label: Tensor):
        saved = [t.detach().clone() for t in self.state]
        static_x, static_label = _clone_sample(x), label.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                for _ in range(self.WARMUP):
                    self.step(static_x, static_label)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.step(static_x, static_label)
        finally:
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                for t, value in zip(self.state, saved):
                    t.copy_(value)
        return static_x, static_label, graph, logits


# ------------------------------------------------------------------------------------------------- the ensemble run

_TORCH_CLASSES = {"adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}
_STACKED = {"adamw": StackedAdamW, "adagrad": StackedAdagrad}


class EnsembleOptimizer:
    """The update of every member. ``flat`` is the ``(E, N)`` tensor behind ``views`` (:func:`stack_parameters`);
    ``parts`` are (member range, stacked optimizer over ``flat[range]``) pairs, one per algorithm. :meth:`step`
    gathers the views' ``.grad`` into one ``(E, N)`` gradient and steps every part."""

    def __init__(self, flat: Tensor, views: Sequence[Tensor], parts: Sequence[Tuple[slice, _StackedOptimizer]]):
        self.flat = flat
        self.views = list(views)
        self.parts = list(parts)

    def tensors(self) -> List[Tensor]:
        """Every tensor a step changes in place: the stacked parameters, each part's state and step counts."""
        out = [self.flat]
        for _, optimizer in self.parts:
            out += list(optimizer.state.values()) + [optimizer.step_count]
        return out

    def step(self) -> None:
        if any(v.grad is None for v in self.views):
            raise EnsembleUnsupportedError("--ensemble: a trainable parameter got no gradient from this sample; the "
                                           "ensemble updates every trainable parameter at every step: drop --ensemble")
        grad = torch.cat([v.grad.reshape(self.flat.shape[0], -1) for v in self.views], 1)
        for members, optimizer in self.parts:
            optimizer.step(grad[members])

@dataclass
class _Member:
    task: online.RunTask
    kind: str  # "adamw" or "adagrad"
    groups: List[Mapping[str, Any]]  # the torch parameter group of each trainable parameter
    defaults: Dict[str, Any]
    skip_nonfinite: bool


def _member(model: nn.Module, params: Sequence[Tensor], names: Sequence[str], task: online.RunTask,
            num_classes: int) -> _Member:
    """Build the member's real optimizer (as ``run_one`` does) and read what the stacked update needs from it."""
    method = online.METHODS[task.method]
    kwargs = online._optimizer_kwargs(method, method.grid[task.grid_index], num_classes, task.seed)
    optimizer = create_optimizer(method.optimizer, model, **kwargs)
    expected = _TORCH_CLASSES[method.optimizer]
    if not isinstance(optimizer, expected):
        raise TypeError(f"--ensemble reproduces {expected.__name__}, but create_optimizer({method.optimizer!r}) "
                        f"built a {type(optimizer).__name__}: drop --ensemble")
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in zip(names, params) if id(p) not in group_of]
    if missing or len(group_of) != len(params):
        raise ValueError(f"--ensemble: the {method.optimizer} optimizer of {task.method} does not hold exactly the "
                         f"model's trainable parameters (missing: {missing[:3]}); drop --ensemble")
    return _Member(task, method.optimizer, [group_of[id(p)] for p in params], online.optimizer_defaults(optimizer),
                   bool(getattr(optimizer, "skip_nonfinite", False)))


class _Forward(nn.Module):
    """``adapter.forward`` as a module holding the model, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, forward: Any):
        super().__init__()
        self.model = model
        object.__setattr__(self, "_call", forward)  # not a submodule (it may be the model itself)

    def forward(self, x: Any) -> Tensor:
        return self._call(x)


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EnsembleOutcome:
    """What :func:`ensemble_pass` returns: the members' records and their final trainable parameters (``(E, ...)``
    per parameter name, members in the order of the task)."""

    records: List[Dict[str, Any]]
    params: Dict[str, Tensor]


def run_ensemble(task: EnsembleTask) -> List[Dict[str, Any]]:
    """Run the members of ``task`` as one ensemble; their records, in the order of ``task.members``."""
    return ensemble_pass(task).records


ENSEMBLE_PATHS = ("auto", "batch", "vmap")


def ensemble_pass(task: EnsembleTask, *, math_attention: bool = True, path: str = "auto") -> EnsembleOutcome:
    """One stream pass of every member of ``task`` (the module docstring).

    ``path``: how the members' forward and backward run. ``"batch"``: the members as the batch
    (:class:`members_as_batch`); ``"vmap"``: ``torch.vmap`` over the stacked parameters; ``"auto"`` (default):
    the batch where :func:`members_as_batch_refusal` allows it and it passes the first-sample check against
    separate passes, otherwise vmap (with a warning when the check failed). ``math_attention``: run attention on
    the math kernel inside ``vmap``. The records say which path ran (``ensemble_path``).
    """
    if path not in ENSEMBLE_PATHS:
        raise ValueError(f"path must be one of {ENSEMBLE_PATHS}, got {path!r}")
    first = task.members[0]
    if first.threads:
        set_cpu_threads(first.threads)
    data = online.load_stream(first.stream, first.eval_samples)
    stream, phase_starts = online.stream_for_seed(data, first.samples, first.seed)
    adapter = online.build_model(data.spec.model, data.num_classes, first.seed, first.image_size, first.device,
                                 first.bundles)
    model = adapter.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    # Members grouped by algorithm (contiguous ranges of the stacked dim); ``order[k]``: task index of member k.
    order = sorted(range(len(task.members)),
                   key=lambda k: ENSEMBLE_OPTIMIZERS.index(online.METHODS[task.members[k].method].optimizer))
    members = [_member(model, params, names, task.members[k], data.num_classes) for k in order]
    size = len(members)
    flat, stacked = stack_parameters(params, size)
    parts = []
    for kind in ENSEMBLE_OPTIMIZERS:
        indices = [k for k, m in enumerate(members) if m.kind == kind]
        if not indices:
            continue
        skip = {members[k].skip_nonfinite for k in indices}
        if len(skip) > 1:
            raise ValueError(f"--ensemble: the {kind} members disagree on skip_nonfinite")
        span = slice(indices[0], indices[-1] + 1)
        parts.append((span, _STACKED[kind].from_groups(flat[span], [p.numel() for p in params],
                                                        [members[k].groups for k in indices],
                                                        skip_nonfinite=skip.pop())))
    optimizer = EnsembleOptimizer(flat, stacked, parts)

    from torch.func import functional_call, vmap

    wrapper = _Forward(model, adapter.forward)
    keys = ["model." + n for n in names]

    def member_logits(values: Dict[str, Tensor], x: Any) -> Tensor:
        return functional_call(wrapper, values, (x,))

    vmapped = vmap(member_logits, in_dims=(0, None))
    inputs = adapter.encode(stream.inputs)
    labels = stream.labels.to(first.device)

    def vmap_logits(x: Any) -> Tensor:
        return vmapped(dict(zip(keys, stacked)), x)  # (E, 1, m)

    patches: List[members_as_batch] = []  # built once, on first use (the module walk is not free per sample)

    def batch_logits(x: Any) -> Tensor:
        if not patches:
            patches.append(members_as_batch(model, names, stacked))
        with patches[0]:
            return wrapper(repeat_sample(x, size)).reshape(size, 1, -1)  # (E, 1, m)

    def forward_backward(logits_of: Any, x: Any, label: Tensor) -> Tensor:
        logits = logits_of(x)
        # Summed over members: each member's gradient is that of its own cross-entropy (batch of one: mean = sum).
        loss = F.cross_entropy(logits.flatten(0, 1), label.expand(size), reduction="sum")
        for s in stacked:
            s.grad = None
        loss.backward()
        return logits.detach()

    chosen = path
    if path != "vmap":
        refusal = reason = members_as_batch_refusal(model, names)
        if refusal is None and inputs:
            try:
                logits = forward_backward(batch_logits, inputs[0], labels[:1])
                reason = _check_members_as_batch(logits, [s.grad for s in stacked], wrapper, keys, stacked,
                                                 inputs[0], labels[:1])
            except (RuntimeError, EnsembleUnsupportedError) as error:
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        if reason is not None:
            if path == "batch":
                raise EnsembleUnsupportedError(f"--ensemble: the members of the {data.spec.model} model cannot run "
                                               f"as a batch: {reason}")
            if refusal is None:  # eligible, but it failed on the first sample: say so
                warnings.warn(f"--ensemble: the members-as-batch pass of the {data.spec.model} model failed its "
                              f"first-sample check against separate passes ({reason}); running the members under "
                              "torch.vmap instead", RuntimeWarning, stacklevel=2)
            chosen = "vmap"
        else:
            chosen = "batch"
    logits_of = batch_logits if chosen == "batch" else vmap_logits

    def eager_step(x: Any, label: Tensor) -> Tensor:
        detached = forward_backward(logits_of, x, label)
        optimizer.step()
        return detached

    step = eager_step
    if task.graph:
        if torch.device(first.device).type != "cuda" or chosen != "batch":
            warnings.warn(f"--graph: CUDA graphs need a CUDA device and the members-as-batch path (here: "
                          f"{first.device}, {chosen}); running the steps eagerly", RuntimeWarning, stacklevel=2)
        else:
            step = GraphedSteps(eager_step, optimizer.tensors())
            chosen = "batch+graph"

    predictions = torch.empty(len(inputs), size, dtype=torch.long, device=first.device)
    nonfinite = torch.zeros(size, dtype=torch.long, device=first.device)

    def learn(i: int, x: Any) -> None:
        detached = step(x, labels[i:i + 1])
        predictions[i] = detached.argmax(-1)[:, 0]  # scored before the update: prequential
        nonfinite.add_(~torch.isfinite(detached).flatten(1).all(1))

    with attention_for_vmap(math_attention and chosen == "vmap"):
        start = time.perf_counter()
        for i, x in enumerate(inputs):
            if i == 0 and chosen == "vmap":
                try:
                    learn(i, x)
                except (torch.OutOfMemoryError, EnsembleUnsupportedError):
                    raise
                except (RuntimeError, NotImplementedError) as error:
                    raise EnsembleUnsupportedError(
                        f"--ensemble: the {data.spec.model} model of stream {first.stream!r} cannot run under "
                        f"torch.vmap ({type(error).__name__}: {str(error).splitlines()[0][:300]}); drop --ensemble "
                        "to run the AdamW/AdaGrad grid points one at a time") from error
            else:
                learn(i, x)
        _synchronize(first.device)
        elapsed = time.perf_counter() - start
    correct = (predictions.cpu() == stream.labels.cpu().unsqueeze(1)).numpy()
    nonfinite_counts = nonfinite.cpu().tolist()
    per_sample = elapsed / max(1, len(inputs))

    records: List[Optional[Dict[str, Any]]] = [None] * size
    for k, member in enumerate(members):
        with torch.no_grad():
            for p, s in zip(params, stacked):
                p.copy_(s[k])
        start = time.perf_counter()
        held_out = {name: float((adapter.predict(pool.inputs) == pool.labels).float().mean())
                    for name, pool in data.held_out.items()}
        eval_seconds = time.perf_counter() - start
        records[order[k]] = {
            "seed": first.seed,
            "device": first.device,
            "correct": "".join("1" if c else "0" for c in correct[:, k]),
            "held_out_acc": held_out,
            "final_acc": held_out[next(iter(held_out))],
            "sec_per_sample": per_sample / size,
            "ensemble_size": size,
            "ensemble_sec_per_sample": per_sample,
            "ensemble_path": chosen if not (isinstance(step, GraphedSteps) and step.failure) else "batch",
            "eval_seconds": eval_seconds,
            "phase_starts": phase_starts,
            "nonfinite_logits": int(nonfinite_counts[k]),
            "optimizer_defaults": jsonable(member.defaults),
            "lora": jsonable(adapter.lora),
            "trainable_parameters": sum(p.numel() for p in params),
        }
    inverse = torch.tensor([order.index(j) for j in range(size)])
    final = {n: s.detach()[inverse.to(s.device)].cpu() for n, s in zip(names, stacked)}
    return EnsembleOutcome([r for r in records if r is not None], final)
