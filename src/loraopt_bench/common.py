"""What every benchmark and the fine-tuning harness share: how an optimizer is fed a batch, JSON-safe records,
mean ± std over seeds, and the CPU thread count.

:func:`drive` (and :func:`feed`, its half after the forward) is the one place that knows how each loraopt optimizer
learns from a batch:

* gradient optimizers (AdamW, PSI-LoRA, Scaled PSI-LoRA, SVDLoRA, LoRA+, ...): ``loss.backward()``;
* LoKO on the model outputs (``observation="softmax"`` or ``"regression"``): ``observe(outputs, targets)`` and no
  backward (the filter takes its own Jacobian rows);
* LoKO-scalar (``observation="loss"``): ``observe(loss)`` and ``loss.backward()`` (``.grad`` is the Jacobian of the
  observed loss).
"""

from __future__ import annotations

import math
import numbers
import os
import platform
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GRADIENT",
    "OUTPUTS",
    "LOSS",
    "learning_signal",
    "feed",
    "drive",
    "jsonable",
    "mean_std",
    "available_cores",
    "busy_cores",
    "set_cpu_threads",
    "torch_threads",
    "versions",
]

GRADIENT, OUTPUTS, LOSS = "gradient", "outputs", "loss"

LossFn = Callable[[Tensor, Tensor], Tensor]


# ------------------------------------------------------------------------------------------------- driving


def learning_signal(optimizer: Any) -> str:
    """What ``optimizer`` learns from: :data:`GRADIENT` (``.grad`` after a backward), :data:`OUTPUTS` (LoKO:
    ``observe(outputs, targets)``, no backward) or :data:`LOSS` (LoKO-scalar: ``observe(loss)`` plus a backward)."""
    if not callable(getattr(optimizer, "observe", None)):
        return GRADIENT
    observation = optimizer.param_groups[0].get("observation", "softmax")
    name = observation if isinstance(observation, str) else getattr(observation, "kind", type(observation).__name__)
    return LOSS if str(name).lower().startswith("loss") else OUTPUTS


def feed(
    optimizer: Any,
    outputs: Any,
    targets: Optional[Tensor],
    loss_fn: LossFn = F.cross_entropy,
    *,
    loss: Optional[Tensor] = None,
    before_step: Optional[Callable[[], None]] = None,
    **observe_kwargs: Any,
) -> Tensor:
    """Hand one batch's forward result to ``optimizer`` the way it learns (module docstring) and return the detached
    loss. Does not step.

    ``loss`` is the batch loss when the caller computed it already (e.g. a causal LM's own loss); otherwise it is
    ``loss_fn(outputs, targets)``. ``observe_kwargs`` (``forward=``, ``inputs=``, ``model=``) go to LoKO's
    ``observe`` on outputs. ``before_step`` runs after the backward of a gradient optimizer (e.g. gradient clipping).
    """
    signal = learning_signal(optimizer)
    if signal == OUTPUTS:
        optimizer.observe(outputs, targets, **observe_kwargs)
        if loss is not None:
            return loss.detach()
        logits = getattr(outputs, "logits", outputs)
        with torch.no_grad():
            return loss_fn(logits.detach().float(), targets)
    if loss is None:
        loss = loss_fn(getattr(outputs, "logits", outputs), targets)
    if signal == LOSS:
        optimizer.observe(loss.detach())
    loss.backward()
    if before_step is not None and signal == GRADIENT:
        before_step()
    return loss.detach()


def drive(
    optimizer: Any,
    model: Union[nn.Module, Callable[..., Any]],
    batch: Tuple[Any, Optional[Tensor]],
    loss_fn: LossFn = F.cross_entropy,
    *,
    step: bool = True,
    **feed_kwargs: Any,
) -> Tensor:
    """One training step on ``batch = (inputs, targets)``: ``zero_grad``, the forward ``model(inputs)``,
    :func:`feed`, ``step()`` (unless ``step=False``). Returns the detached loss."""
    inputs, targets = batch
    optimizer.zero_grad(set_to_none=True)
    outputs = model(inputs)
    loss = feed(optimizer, outputs, targets, loss_fn, **feed_kwargs)
    if step:
        optimizer.step()
    return loss


# ------------------------------------------------------------------------------------------------- records


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON: dict keys as strings, tuples and sets as lists, NaN/inf as ``null`` (a diverged run
    reads as null), dtypes by name (``"float32"``), numpy and 0-dim tensor scalars as numbers, anything else as its
    ``repr``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (str, bool)):
        return value
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return repr(value)


def mean_std(values: Any) -> Tuple[Any, Any]:
    """Mean and sample standard deviation over the seeds, axis 0 of ``values`` (``std`` is 0 for one seed).

    A scalar per seed gives two floats; a curve per seed gives two arrays. Where a seed's value is missing (``None``)
    or not finite, mean and std are NaN: an average over a diverged run is not a result.
    """
    array = np.asarray([np.nan if v is None else v for v in values] if isinstance(values, (list, tuple)) else values,
                       dtype=float)
    ddof = 1 if array.shape[0] > 1 else 0
    with np.errstate(invalid="ignore", over="ignore"):
        mean, std = array.mean(axis=0), array.std(axis=0, ddof=ddof)
    bad = ~np.isfinite(array).all(axis=0)
    mean, std = np.where(bad, np.nan, mean), np.where(bad, np.nan, std)
    if mean.ndim == 0:
        return float(mean), float(std)
    return mean, std


def versions() -> dict:
    """The versions a result depends on: loraopt, torch, transformers, peft, python."""
    import peft
    import transformers

    from loraopt import __version__ as loraopt_version

    return {"loraopt": loraopt_version, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------- threads


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_cores(interval: float = 0.2) -> Optional[float]:
    """How many cores other work keeps busy right now (from two reads of /proc/stat ``interval`` seconds apart;
    this process sleeps meanwhile). ``None`` where /proc/stat does not exist.

    The load average would do instead, but it trails by a minute: right after a pip install it still reports a full
    machine.
    """

    def sample() -> Tuple[int, int, int]:
        with open("/proc/stat", encoding="ascii") as handle:
            lines = handle.read().splitlines()
        values = [int(v) for v in lines[0].split()[1:]]
        cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle, cpus

    try:
        total0, idle0, cpus = sample()
        time.sleep(interval)
        total1, idle1, _ = sample()
    except (OSError, ValueError, IndexError):
        return None
    elapsed = total1 - total0
    if elapsed <= 0 or cpus <= 0:
        return None
    return cpus * (1.0 - (idle1 - idle0) / elapsed)


def set_cpu_threads(requested: Optional[int]) -> int:
    """Use ``requested`` torch threads; by default (``None`` or 0) one per core that other work leaves idle, at
    least 1. Returns the count in use.

    Idle cores are measured now (:func:`busy_cores`), not from the load average. On a machine whose cores are all
    busy with other jobs one thread is used: there every parallel region waits for a descheduled thread (measured on
    a shared 2-core machine, 2 threads ran EfficientNet and MiniLM steps about 10x slower than 1; the linear task's
    600x200 matrices ran 10-40x slower).
    """
    if requested:
        torch.set_num_threads(requested)
        return torch.get_num_threads()
    cores = available_cores()
    busy = busy_cores()
    free = cores if busy is None else cores - int(math.floor(min(busy, cores) + 0.5))
    torch.set_num_threads(max(1, free))
    return torch.get_num_threads()


@contextmanager
def torch_threads(count: Optional[int]) -> Iterator[None]:
    """:func:`set_cpu_threads` ``(count)`` for the ``with`` block, then the previous count again; ``None`` leaves the
    count as it is."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    set_cpu_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
