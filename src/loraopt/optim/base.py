"""What every loraopt optimizer shares: dtype-preserving and validated checkpoints (:class:`CheckedStateDict`) and
the base class :class:`LoRAOptimizer`.  Argument checks are in :mod:`.checks`, the skipped-step counter in
:mod:`.counters`, the collective operations, FSDP2 helpers and sharding checks in :mod:`.distributed`; their names
are importable from here too."""

from __future__ import annotations

import weakref
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .checks import (  # noqa: F401  (importable from here)
    check_betas,
    check_group_hyperparameters,
    check_int,
    check_nonnegative,
    check_positive,
    check_range,
    group_label,
    named_trainable_parameters,
)
from .counters import DeferredHostRead, SkippedStepCounter  # noqa: F401  (importable from here)
from .distributed import (  # noqa: F401  (importable from here)
    DistributedContext,
    all_ranks_true,
    full_tensor,
    is_dtensor,
    require_unsharded_model,
    write_full_,
)

__all__ = ["LoRAOptimizer", "StateDictError", "CheckedStateDict"]


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
      (``_required_group_keys``; keys in ``_optional_group_keys`` are filled from ``_legacy_group_values`` or else
      the current group instead);
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
    # Values of optional keys for a state dict saved before they existed, where that is not the current group's value
    # (a default that changed since).
    _legacy_group_values: ClassVar[Dict[str, Any]] = {}

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
            label = group_label(group, i)
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
                if key not in clean and key in self._legacy_group_values:
                    clean[key] = self._legacy_group_values[key]  # what a save from before the key existed ran with
                elif key not in clean and key in group:
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
            check_group_hyperparameters(param_group, group_label(param_group, len(self.param_groups)))
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
