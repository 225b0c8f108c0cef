"""What every loraopt optimizer shares: argument validation, dtype-preserving and validated checkpoints, a counter of
skipped steps and named parameter groups (the collective operations, FSDP2 helpers and sharding checks:
:mod:`.distributed`)."""

from __future__ import annotations

import math
import warnings
import weakref
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

# Re-exported: the optimizers import the distributed helpers from here.
from .distributed import (
    DistributedContext,
    all_ranks_true,
    full_tensor,
    is_dtensor,
    require_unsharded_model,
    write_full_,
)

__all__ = [
    "LoRAOptimizer",
    "StateDictError",
    "SkippedStepCounter",
    "DeferredHostRead",
    "CheckedStateDict",
    "check_nonnegative",
    "check_positive",
    "check_range",
    "check_int",
    "check_betas",
    "check_group_hyperparameters",
    "named_trainable_parameters",
    "DistributedContext",
    "is_dtensor",
    "full_tensor",
    "write_full_",
    "all_ranks_true",
    "require_unsharded_model",
]


# ------------------------------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if torch.is_tensor(value):
        return value.numel() == 1 and (value.is_floating_point() or not value.is_complex())
    return isinstance(value, (int, float))


def check_positive(name: str, value: float) -> None:
    if not _is_number(value) or not math.isfinite(float(value)) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    if not _is_number(value) or not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_range(name: str, value: float, low: float, high: float, *, high_inclusive: bool = False) -> None:
    ok = _is_number(value) and math.isfinite(float(value)) and low <= value
    ok = ok and (value <= high if high_inclusive else value < high)
    if not ok:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"{name} must be in [{low}, {high}{bracket}, got {value!r}")


def check_int(name: str, value: int, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def check_betas(name: str, betas: Any) -> None:
    """``betas`` must be a pair of numbers in ``[0, 1)``."""
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"{name} must be a pair (beta1, beta2) with values in [0, 1), e.g. (0.9, 0.999); got {betas!r}")
    check_range(f"{name}[0]", betas[0], 0.0, 1.0)
    check_range(f"{name}[1]", betas[1], 0.0, 1.0)


def check_group_hyperparameters(group: Dict[str, Any], where: str = "param group") -> None:
    """Validate the hyperparameters every optimizer family shares, wherever a group carries them: ``lr``,
    ``weight_decay``, ``momentum``, ``betas`` and ``eps``.  Per-group overrides (the factories' ``other_lr``,
    ``other_weight_decay``, a group passed to ``add_param_group``, a loaded checkpoint) go through here, so a NaN or
    negative value is refused where it enters instead of silently freezing or reversing a group."""
    checks: Dict[str, Callable[[str, Any], None]] = {
        "lr": check_nonnegative,
        "weight_decay": check_nonnegative,
        "momentum": lambda n, v: check_range(n, v, 0.0, 1.0),
        "betas": check_betas,
        "eps": check_nonnegative,
    }
    for key, check in checks.items():
        if key in group:
            try:
                check(key, group[key])
            except ValueError as error:
                raise ValueError(
                    f"{where}: {error}; pass a valid {key} for this group (the factories' other_lr / "
                    "other_weight_decay set the second group's)"
                ) from None


def named_trainable_parameters(model: nn.Module) -> List[tuple]:
    """``[(name, param)]`` for every parameter with ``requires_grad``, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _group_label(group: Dict[str, Any], index: int) -> str:
    name = group.get("name")
    return f"param group {index}" + (f" ({name!r})" if isinstance(name, str) else "")


# ------------------------------------------------------------------------------------------------- host reads


class DeferredHostRead:
    """Read a device value on the host without waiting for the device.

    ``start(value)`` copies ``value`` into pinned host memory with a non-blocking copy and records a CUDA event behind
    it; ``poll()`` returns the host copy once that event has completed (``None`` before), so the caller picks the value
    up at a later step instead of stalling the launch queue now.  Values on the CPU are ready at once (there is no
    device to wait for); on other devices (no events to poll) ``start`` reads at once, which synchronises.  One copy is
    in flight at a time: ``start`` while one is pending does nothing (``pending`` tells).
    """

    def __init__(self) -> None:
        self._buffer: Optional[Tensor] = None
        self._event: Optional[Any] = None
        self._ready: Optional[Tensor] = None

    @property
    def pending(self) -> bool:
        return self._event is not None

    def start(self, value: Tensor) -> None:
        if self._event is not None:
            return
        value = value.detach()
        if value.device.type == "cuda":
            if self._buffer is None or self._buffer.shape != value.shape or self._buffer.dtype != value.dtype:
                self._buffer = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self._buffer.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
            return
        self._ready = value.clone() if value.device.type == "cpu" else value.to("cpu")

    def poll(self) -> Optional[Tensor]:
        """The host value of the last completed copy (once; ``None`` while it is in flight or when there is none)."""
        if self._event is not None and self._event.query():
            self._event = None
            self._ready = self._buffer.clone()
        ready, self._ready = self._ready, None
        return ready

    def wait(self) -> Optional[Tensor]:
        """The host value of the copy in flight, waiting for it (a synchronisation); ``None`` when there is none."""
        if self._event is not None:
            self._event.synchronize()
        return self.poll()


# ------------------------------------------------------------------------------------------------- skipped steps


class SkippedStepCounter:
    """Counts the steps an optimizer skipped (left parameters and state unchanged) and warns, rate-limited.

    An optimizer calls ``self._record_skipped(count, reason)`` once per ``step()`` that skipped something:
    ``count`` is an ``int`` or a 0-dim tensor (a bool or integer flag computed on the device). Device tensors are
    accumulated on the device with no host synchronisation. Every ``skip_check_interval`` calls a non-blocking copy
    of the accumulated counts to pinned host memory is started (:class:`DeferredHostRead`); every call picks up a
    copy that has completed by then (an event query, no wait). So ``step()`` never waits for the device, and a skip
    on a GPU is warned about at the first call after the copy that saw it has landed: at most about
    ``skip_check_interval`` steps late (usually the very next call after the interval), or at once when
    ``skipped_steps`` is read (which waits for the device). Host integers and CPU tensors are read at once (no
    device to wait for), so on the CPU the warning comes during the step that skipped.

    A ``RuntimeWarning`` is issued at the first skip and again when the total reaches 10, 100, 1000, ...; it names
    the reasons and their counts. ``skipped_steps`` is the total since the optimizer was built (it is not part of
    ``state_dict()``); ``skipped_steps_by_reason`` splits it by reason.
    """

    skip_check_interval: ClassVar[int] = 32
    #: CPU tensors are read at once (there is no device to wait for). ``False`` treats them like device counters
    #: (deferred, non-blocking reads): the tests check the accelerator path's absence of synchronisation that way.
    read_cpu_counts_at_once: ClassVar[bool] = True

    def _skip_init(self) -> None:
        self._skips_host: Dict[str, int] = {}
        self._skips_device: Dict[Tuple[str, str], Tensor] = {}
        self._skips_device_seen: Dict[Tuple[str, str], int] = {}
        self._skips_readers: Dict[Tuple[str, str], DeferredHostRead] = {}
        self._skip_calls = 0
        self._skip_next_warning = 1

    def _skip_ready(self) -> None:
        if "_skips_host" not in self.__dict__:
            self._skip_init()

    def _record_skipped(self, count: Union[int, bool, Tensor], reason: str) -> None:
        """Count ``count`` skipped steps (0 is allowed and does nothing) for ``reason`` (a short phrase such as
        ``"non-finite gradient"``)."""
        self._skip_ready()
        reason = str(reason) or "unspecified"
        if torch.is_tensor(count):
            if count.numel() != 1:
                raise ValueError(f"_record_skipped takes an int or a 0-dim tensor, got shape {tuple(count.shape)}")
            if count.device.type != "cpu" or not self.read_cpu_counts_at_once:
                flag = count.detach().reshape(()).to(torch.int64)
                key = (reason, str(count.device))
                acc = self._skips_device.get(key)
                self._skips_device[key] = flag.clone() if acc is None else acc.add_(flag)
                self._skip_calls += 1
                if self._skip_calls % self.skip_check_interval == 0:
                    self._sync_device_skips()
                if self._adopt_host_copies():
                    self._maybe_warn_skipped()
                return
            count = int(count.detach().reshape(()).item())
        count = int(count)
        if count < 0:
            raise ValueError(f"skipped-step count must be >= 0, got {count}")
        if count:
            self._skips_host[reason] = self._skips_host.get(reason, 0) + count
            self._maybe_warn_skipped()

    def _sync_device_skips(self) -> None:
        """Start a non-blocking copy of every device counter to the host (read by :meth:`_adopt_host_copies` once it
        has landed; at once for devices without events)."""
        for key, acc in self._skips_device.items():
            reader = self._skips_readers.get(key)
            if reader is None:
                reader = self._skips_readers[key] = DeferredHostRead()
            reader.start(acc)

    def _adopt_host_copies(self, wait: bool = False) -> bool:
        """Take the counts of the copies that have completed (all of them, waiting, with ``wait``); whether any
        count grew. Reads host memory only (the pinned copies), never the device."""
        grew = False
        for key, reader in self._skips_readers.items():
            value = reader.wait() if wait else reader.poll()
            if value is not None:
                n = int(value)
                if n > self._skips_device_seen.get(key, 0):
                    self._skips_device_seen[key] = n
                    grew = True
        return grew

    def _read_device_skips_now(self) -> None:
        """Read every device counter, waiting for the device (``skipped_steps``)."""
        self._adopt_host_copies(wait=True)
        for key, acc in self._skips_device.items():
            n = int(acc.item())
            self._skips_device_seen[key] = max(n, self._skips_device_seen.get(key, 0))

    def _known_skips(self) -> Dict[str, int]:
        out = dict(self._skips_host)
        for (reason, _), n in self._skips_device_seen.items():
            out[reason] = out.get(reason, 0) + n
        return {k: v for k, v in out.items() if v}

    def _maybe_warn_skipped(self) -> None:
        by_reason = self._known_skips()
        total = sum(by_reason.values())
        if total < self._skip_next_warning:
            return
        while self._skip_next_warning <= total:
            self._skip_next_warning *= 10
        reasons = "; ".join(f"{reason}: {n}" for reason, n in sorted(by_reason.items(), key=lambda kv: -kv[1]))
        warnings.warn(
            f"{type(self).__name__} has skipped {total} step(s) so far ({reasons}); each skipped step left the "
            "parameters and the optimizer state unchanged. Check the loss, the inputs and the learning-rate schedule "
            "(a NaN/inf gradient, loss or lr). `optimizer.skipped_steps` has the count; this warning repeats at "
            f"{self._skip_next_warning} skips.",
            RuntimeWarning,
            stacklevel=4,
        )

    @property
    def skipped_steps(self) -> int:
        """Steps skipped since this optimizer was built (reading it synchronises with the device)."""
        self._skip_ready()
        self._read_device_skips_now()
        self._maybe_warn_skipped()
        return sum(self._known_skips().values())

    @property
    def skipped_steps_by_reason(self) -> Dict[str, int]:
        """``{reason: count}`` of the skipped steps (synchronises with the device)."""
        self._skip_ready()
        self._read_device_skips_now()
        return self._known_skips()

    def _check_step_lrs(self) -> bool:
        """Step-time check of every group's lr (a scheduler may have produced it): ``False`` and one counted skip
        when an lr is NaN or infinite (the caller then leaves everything unchanged), ``ValueError`` when an lr is
        negative, ``True`` otherwise."""
        for i, group in enumerate(self.param_groups):  # type: ignore[attr-defined]
            lr = group.get("lr", 0.0)
            value = float(lr)
            if not math.isfinite(value):
                self._record_skipped(1, "non-finite lr (check the learning-rate scheduler)")
                return False
            if value < 0:
                raise ValueError(
                    f"{_group_label(group, i)} has lr={value!r} < 0 at step time; nothing was changed. A learning "
                    "rate must be >= 0: check the learning-rate scheduler (or what set group['lr'])"
                )
        return True


# ------------------------------------------------------------------------------------------------- checkpoints


class StateDictError(ValueError):
    """A ``state_dict`` this optimizer cannot use; the optimizer was left unchanged."""


_TAG_KEY = "loraopt_optimizer"
_SHAPES_KEY = "loraopt_param_shapes"
_REFUSE = "The optimizer was left unchanged."


class CheckedStateDict:
    """Validation of ``load_state_dict`` before torch changes anything (one generic mechanism, subclass hooks).

    ``state_dict()`` records, in every saved parameter group, the optimizer type (``"loraopt_optimizer"``) and the
    shapes of the group's parameters (``"loraopt_param_shapes"``); both are plain lists and strings, so
    ``torch.load(..., weights_only=True)`` and DCP keep them, and both are removed again on load.
    ``load_state_dict`` then raises :class:`StateDictError` (a ``ValueError``), naming the problem and the fix and
    leaving the optimizer unchanged, for:

    * something that is not an optimizer state dict (e.g. a model's ``state_dict()``);
    * state saved by another optimizer type (the tag), or groups missing hyperparameters this optimizer needs
      (``_required_group_keys``; keys in ``_optional_group_keys`` are filled from the current group instead);
    * a different number or size of parameter groups, parameters whose saved shape differs (another model, other
      LoRA ranks), per-parameter state keyed by a parameter this optimizer does not have;
    * per-parameter state tensors of the wrong shape (``_expected_state_shapes``, a subclass hook);
    * NaN/inf in floating-point state or invalid group hyperparameters (``check_group_hyperparameters``).

    Checkpoints without the tag (older loraopt versions, plain torch) get every check but the type tag.
    """

    #: the tag written into saved groups (default: the class name)
    state_tag: ClassVar[Optional[str]] = None
    #: hyperparameters an old checkpoint may lack: filled from the current group on load
    _optional_group_keys: ClassVar[FrozenSet[str]] = frozenset()

    def _install_state_checks(self) -> None:
        self.register_load_state_dict_pre_hook(CheckedStateDict._validate_state_dict_hook)  # type: ignore
        self.register_state_dict_post_hook(CheckedStateDict._tag_state_dict_hook)  # type: ignore

    def _state_tag(self) -> str:
        return self.state_tag or type(self).__name__

    def _required_group_keys(self, group: Dict[str, Any]) -> FrozenSet[str]:
        """Hyperparameters a saved group must carry (default: every key of ``defaults``)."""
        # Only keys the live group carries: torch adds bookkeeping keys (``differentiable``) to ``defaults`` after
        # the groups were built, so they are in no group and in no saved state_dict.
        present = frozenset(k for k in self.defaults if k in group)  # type: ignore[attr-defined]
        return present - self._optional_group_keys  # type: ignore[attr-defined]

    def _expected_state_shapes(self, param: Tensor, group: Dict[str, Any]) -> Dict[str, Tuple[int, ...]]:
        """``{state key: shape}`` that per-parameter state of ``param`` must have when present (default: none
        checked). Subclasses return the shapes of their state, e.g. ``{"exp_avg": tuple(param.shape)}``."""
        return {}

    @staticmethod
    def _tag_state_dict_hook(optimizer: Any, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        tag = optimizer._state_tag()
        for packed, group in zip(state_dict["param_groups"], optimizer.param_groups):
            packed[_TAG_KEY] = tag
            packed[_SHAPES_KEY] = [list(p.shape) for p in group["params"]]
        return state_dict

    @staticmethod
    def _validate_state_dict_hook(optimizer: Any, state_dict: Dict[str, Any]) -> Dict[str, Any]:
        rebind = getattr(optimizer, "_rebind_if_swapped", None)
        if rebind is not None:  # shapes are checked against the parameters the optimizer trains now
            rebind()
        return optimizer._validated_state_dict(state_dict)

    def _validated_state_dict(self, state_dict: Any) -> Dict[str, Any]:
        name = type(self).__name__
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            keys = list(state_dict)[:4] if isinstance(state_dict, dict) else type(state_dict).__name__
            raise StateDictError(
                f"{name}.load_state_dict expects an optimizer state_dict with 'state' and 'param_groups', got {keys}: "
                f"pass what optimizer.state_dict() returned (not the model's state_dict). {_REFUSE}"
            )
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, dict):
            raise StateDictError(f"{name}: 'param_groups' must be a list and 'state' a dict. {_REFUSE}")
        groups = self.param_groups  # type: ignore[attr-defined]
        mine = self._state_tag()
        fix = (
            f"Load it into the optimizer type and model it was saved from, or skip load_state_dict to start {name} "
            "fresh."
        )
        for g in saved_groups:
            tag = g.get(_TAG_KEY) if isinstance(g, dict) else None
            if tag is not None and tag != mine:
                raise StateDictError(
                    f"this state_dict was saved by {tag}, not {mine}: its state means something else here. {fix} "
                    f"{_REFUSE}"
                )
        if len(saved_groups) != len(groups):
            raise StateDictError(
                f"the state_dict has {len(saved_groups)} parameter group(s), {name} has {len(groups)}: it was saved "
                f"for another model or another group layout. {fix} {_REFUSE}"
            )
        cleaned_groups = []
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            label = _group_label(group, i)
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
                raise StateDictError(f"{label} of the state_dict is not a parameter group. {fix} {_REFUSE}")
            if len(saved["params"]) != len(group["params"]):
                raise StateDictError(
                    f"{label} has {len(saved['params'])} parameters in the state_dict but {len(group['params'])} here: "
                    f"it was saved for another model or LoRA config. {fix} {_REFUSE}"
                )
            if not saved["params"] and not group["params"]:
                # An empty group (PEFT's LoRA+ keeps one for embeddings) holds no state. torch.distributed
                # checkpoint's set_state_dict (torch 2.13) hands it over without its hyperparameters unless it is the
                # last group; the current group's values stand in for any it lacks.
                saved = {**{k: v for k, v in group.items() if k != "params"}, **saved}
            missing = sorted(k for k in self._required_group_keys(group) if k not in saved)
            if missing:
                raise StateDictError(
                    f"{label} of the state_dict lacks the hyperparameter(s) {', '.join(missing)} that {name} needs: "
                    f"it was saved by another optimizer type. {fix} {_REFUSE}"
                )
            shapes = saved.get(_SHAPES_KEY)
            names = group.get("param_names") or [""] * len(group["params"])
            if shapes is not None:
                for p, shape, pname in zip(group["params"], shapes, names):
                    if tuple(shape) != tuple(p.shape):
                        raise StateDictError(
                            f"parameter {pname or '#?'} had shape {tuple(shape)} when this state_dict was saved and "
                            f"has {tuple(p.shape)} here: the checkpoint comes from a model with other LoRA ranks or "
                            f"layers. {fix} {_REFUSE}"
                        )
            clean = {k: v for k, v in saved.items() if k not in (_TAG_KEY, _SHAPES_KEY)}
            for key in self._optional_group_keys:
                if key not in clean and key in group:
                    clean[key] = group[key]
            check_group_hyperparameters(clean, f"{label} of the state_dict")
            cleaned_groups.append(clean)
        # Per-parameter state: keyed by the saved indices, matched to parameters in group order (as torch does).
        owner: Dict[Any, Tuple[Tensor, Dict[str, Any], str]] = {}
        for group, saved in zip(groups, cleaned_groups):
            names = group.get("param_names") or [""] * len(group["params"])
            for pid, p, pname in zip(saved["params"], group["params"], names):
                owner[pid] = (p, group, pname)
        for pid, per_param in saved_state.items():
            if pid not in owner:
                raise StateDictError(
                    f"the state_dict holds state for parameter index {pid!r}, which none of its parameter groups "
                    f"lists. {fix} {_REFUSE}"
                )
            p, group, pname = owner[pid]
            where = f"state of parameter {pname or pid!r}"
            if not isinstance(per_param, dict):
                raise StateDictError(f"{where} is a {type(per_param).__name__}, not a dict. {fix} {_REFUSE}")
            expected = self._expected_state_shapes(p, group)
            for key, value in per_param.items():
                if not torch.is_tensor(value):
                    continue
                if key in expected and tuple(value.shape) != tuple(expected[key]):
                    raise StateDictError(
                        f"{where}: {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key])}: the "
                        f"checkpoint was saved for a model with other shapes (LoRA ranks, layer sizes, number of "
                        f"outputs) or was edited. {fix} {_REFUSE}"
                    )
                if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
                    raise StateDictError(
                        f"{where}: {key!r} holds NaN or inf values; resuming from it would make every later step "
                        f"non-finite. Load an earlier checkpoint, or skip load_state_dict to start {name} fresh. "
                        f"{_REFUSE}"
                    )
        out = dict(state_dict)
        out["param_groups"] = cleaned_groups
        return out


# ------------------------------------------------------------------------------------------------- base class


class LoRAOptimizer(SkippedStepCounter, CheckedStateDict, Optimizer):
    """``torch.optim.Optimizer`` with the library's rules.

    * Checkpoints: state keeps the dtype it was saved with (torch casts it to the parameter dtype, which would
      silently turn fp32 statistics of bf16 adapters into bf16 on resume), and ``load_state_dict`` validates what it
      loads before changing anything (:class:`CheckedStateDict`; subclasses declare their state shapes in
      ``_expected_state_shapes(param, group) -> {key: shape}``).
    * Skipped steps: ``_record_skipped(count, reason)`` counts steps left undone (all-or-nothing steps) and warns,
      rate-limited; ``skipped_steps`` reads the total (:class:`SkippedStepCounter`). ``_check_step_lrs()`` turns a
      NaN/inf scheduler lr into a counted skip and a negative one into an error.
    * Hyperparameters of every group (``lr``, ``weight_decay``, ``momentum``, ``betas``, ``eps``) are validated when
      the group is added, so per-group overrides (``other_lr``) are checked like constructor arguments.
    """

    #: whether the subclass handles DTensor (FSDP2) parameters: it gathers what it needs with :func:`full_tensor`,
    #: computes the same update on every rank and writes each rank's shard back with :func:`write_full_`
    supports_dtensor: ClassVar[bool] = False

    def __init__(self, params: Iterable, defaults: Dict[str, Any]):
        self._skip_init()
        super().__init__(params, defaults)
        if not self.supports_dtensor and any(is_dtensor(p) for g in self.param_groups for p in g["params"]):
            # Sharded parameters would be updated from local shards of statistics that need the whole layer.
            raise NotImplementedError(
                f"{type(self).__name__} does not support FSDP2 / DTensor (sharded) parameters in this version: train "
                "with DDP or a single process, or use a baseline optimizer (adamw, lora-plus) under FSDP"
            )
        # Weak references: a parameter replaced in param_groups is seen as replaced even once it is freed.
        self._bound = [weakref.ref(p) for g in self.param_groups for p in g["params"]]
        self._stashed_state: Optional[Dict[int, Dict[str, Tensor]]] = None
        self._install_state_checks()  # first: nothing is stashed from a state_dict that is refused
        self.register_load_state_dict_pre_hook(LoRAOptimizer._stash_float_state)
        self.register_load_state_dict_post_hook(LoRAOptimizer._restore_float_state)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            check_group_hyperparameters(param_group, _group_label(param_group, len(self.param_groups)))
        super().add_param_group(param_group)
        if "_bound" in self.__dict__:
            self._bound += [weakref.ref(p) for p in self.param_groups[-1]["params"]]

    # ------------------------------------------------------------------------------- parameters swapped after build

    def _rebind_if_swapped(self) -> None:
        """Follow parameters that were replaced in ``param_groups`` after this optimizer was built.

        accelerate's FSDP2 path (and so HF Trainer with FSDP2) builds the optimizer on the unsharded model, shards
        the model with ``fully_shard`` (new DTensor parameter objects) and then swaps the entries of
        ``param_groups`` for the sharded parameters. The optimizers that keep their own references (the LoRA layer
        pairs, the hooks' bookkeeping) would otherwise go on looking at the old tensors. Called at every
        ``step()`` and before ``load_state_dict``: same positions, new objects -> the per-parameter state moves to
        the new parameter and :meth:`_parameters_swapped` lets the subclass update its references."""
        bound = self.__dict__.get("_bound")
        current = [p for g in self.param_groups for p in g["params"]]
        if bound is None or (len(bound) == len(current) and all(ref() is p for ref, p in zip(bound, current))):
            return
        if len(bound) != len(current):
            raise RuntimeError(
                f"{type(self).__name__}: the parameter groups changed size after the optimizer was built "
                f"({len(bound)} -> {len(current)} parameters) other than through add_param_group; build the "
                "optimizer again over the model as it is now"
            )
        olds = [ref() for ref in bound]
        mapping = {id(old): new for old, new in zip(olds, current) if old is not None and old is not new}
        for key in list(self.state.keys()):
            new = mapping.get(id(key))
            if new is not None:
                self.state[new] = self.state.pop(key)
        self._bound = [weakref.ref(p) for p in current]
        if not self.supports_dtensor and any(is_dtensor(p) for p in current):
            raise NotImplementedError(
                f"{type(self).__name__} does not support FSDP2 / DTensor (sharded) parameters in this version (its "
                "parameters were swapped for sharded ones after it was built, as accelerate's FSDP2 preparation "
                "does): train with DDP or a single process"
            )
        self._parameters_swapped(mapping)

    def _parameters_swapped(self, mapping: Dict[int, Tensor]) -> None:
        """Subclass hook: ``mapping`` is ``{id(old parameter): new parameter}`` for every replaced parameter."""

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
    def _evaluate_closure(closure: Optional[Callable[[], Any]]) -> Any:
        """``closure()`` with autograd enabled (``step`` runs under ``no_grad``), or ``None`` without a closure."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    @staticmethod
    def _require_names(groups: List[Dict[str, Any]], factory: str) -> None:
        for group in groups:
            names = group.get("param_names")
            if names is None or len(names) != len(group["params"]):
                raise ValueError(
                    "this optimizer pairs LoRA factors by parameter name: pass `model.named_parameters()` (or groups "
                    f"with 'param_names'), or build it with `{factory}(model, ...)`"
                )
