"""Hugging Face ``Trainer`` integration (``docs/specs/integration.md`` §4).

Three ways to train with a loraopt optimizer:

1. ``optimizer_cls_and_kwargs`` with a factory class (the supported path; also accepted under FSDP, where
   ``optimizers=`` is refused)::

       LoRAOptTrainer(model=peft_model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=(PSILoRAFactory, {"lr": 0.1, "max_grad_norm": 1.0}))

   Trainer treats a class that is not a ``torch.optim.Optimizer`` as a factory and calls ``cls()(model, **kwargs)``
   (transformers >= 5; ``transformers.trainer_optimizer.is_optimizer_factory``).  Any registry name works through
   ``LoRAOptFactory.for_optimizer("lora-plus")`` or ``(LoRAOptFactory, {"optimizer_name": "lora-plus", ...})``.

2. ``optimizers=(optimizer, None)`` with an optimizer built beforehand (``loraopt.create_optimizer`` or a factory
   instance); add ``TrainerClippingWarningCallback()`` to ``callbacks`` yourself on this path.

3. LoKO: ``LoKOTrainer`` (observes the model outputs; no backward) or ``LoKOScalarTrainer`` (LoKO-scalar: observes
   the loss next to the ordinary backward), each with ``optimizer_cls_and_kwargs=(LoKOFactory, {...})``.

Trainer's own clipping (``TrainingArguments.max_grad_norm``, default 1.0) rescales ``.grad`` only; PSI-LoRA and
Scaled PSI-LoRA never read the LoRA ``.grad`` and clip internally instead.  ``LoRAOptTrainer`` (a ``Trainer`` with
``LoRAOptTrainerMixin``; the LoKO trainers include it) registers ``TrainerClippingWarningCallback``, which warns at
``on_train_begin`` when the two would conflict; with a plain ``Trainer`` pass the callback in ``callbacks``.

Checkpoints: Trainer saves ``optimizer.state_dict()`` and reloads it with ``torch.load(..., weights_only=True)``;
loraopt state is tensor-only, so ``trainer.train(resume_from_checkpoint=...)`` restores the optimizer exactly.

FSDP2 (accelerate's FSDP plugin with ``fsdp_version: 2``): use the factory path. Trainer builds the optimizer on the
unsharded model and accelerate then swaps the sharded (DTensor) parameters into it; the loraopt optimizers follow
that swap at their next ``step()``. Sharded checkpoints (``SHARDED_STATE_DICT``) go through
``torch.distributed.checkpoint``. See ``examples/fsdp2_trainer.py`` and ``benchmarks/notes/distributed.md`` for
which optimizers run under FSDP2.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Dict, Optional, Tuple, Type

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from .._optional import require

from ..optim.registry import create_optimizer, load_optimizer
from ._common import trainer_clipping_conflict, unwrap_optimizer

__all__ = [
    "LoRAOptFactory",
    "PSILoRAFactory",
    "ScaledPSILoRAFactory",
    "LoKOFactory",
    "RPLoRAFactory",
    "TrainerClippingWarningCallback",
    "LoRAOptTrainerMixin",
    "LoRAOptTrainer",
    "LoKOTrainer",
    "LoKOScalarMixin",
    "LoKOScalarTrainer",
    "unwrap_optimizer",
]

_transformers = require("transformers", "hf", "loraopt.integrations.hf")
Trainer, TrainerCallback = _transformers.Trainer, _transformers.TrainerCallback

IGNORE_INDEX = -100  # the label value transformers' losses skip

# model -> the last hook-based optimizer a factory built for it (see `_retire_previous_hooks`).  The optimizer is
# held strongly on purpose: its hooks stay on the model even after the optimizer itself is dropped, so it must stay
# reachable to be detached.  It does not reference the root model, so the model can still be collected.
_HOOKED_OPTIMIZER_OF: "weakref.WeakKeyDictionary[nn.Module, Optimizer]" = weakref.WeakKeyDictionary()


# ------------------------------------------------------------------------------------------------- callback


class TrainerClippingWarningCallback(TrainerCallback):
    """Warns at ``on_train_begin`` when ``TrainingArguments.max_grad_norm > 0`` would clip gradients that the
    optimizer does not use as Trainer assumes (PSI-LoRA, Scaled PSI-LoRA, SVDLoRA, LoKO-scalar; see
    ``loraopt.integrations._common.trainer_clipping_conflict``).  Other optimizers pass silently.

    Factories called by Trainer add it automatically; with ``optimizers=(opt, None)`` pass it in ``callbacks``.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None or not args.max_grad_norm or args.max_grad_norm <= 0:
            return
        reason = trainer_clipping_conflict(optimizer)
        if reason is not None:
            warnings.warn(
                f"TrainingArguments(max_grad_norm={args.max_grad_norm:g}) clips .grad, but {reason} "
                "Set TrainingArguments(max_grad_norm=0).",
                UserWarning,
                stacklevel=2,
            )


def _ensure_clipping_check(trainer: Trainer) -> None:
    if not any(isinstance(cb, TrainerClippingWarningCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(TrainerClippingWarningCallback())


class LoRAOptTrainerMixin:
    """Trainer mixin for loraopt optimizers: registers :class:`TrainerClippingWarningCallback` (once), which warns at
    ``on_train_begin`` when ``TrainingArguments.max_grad_norm`` would clip ``.grad`` that the optimizer does not use.

    Use as ``class MyTrainer(LoRAOptTrainerMixin, Trainer)`` or take :class:`LoRAOptTrainer`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _ensure_clipping_check(self)


class LoRAOptTrainer(LoRAOptTrainerMixin, Trainer):
    """``Trainer`` with :class:`LoRAOptTrainerMixin`: the Trainer to pair with the factories below."""


def _retire_previous_hooks(model: nn.Module, optimizer: Optimizer) -> None:
    """Detach the hooks of an earlier hook-based optimizer built by a factory for the same model.

    PSI-LoRA / Scaled PSI-LoRA / SVDLoRA hook the LoRA layers and keep what they capture until their own ``step``.
    A second Trainer on the same model (re-running a notebook cell, resuming into a new Trainer) would leave the
    first optimizer's hooks recording every backward with nobody stepping it, even once that optimizer is garbage:
    memory grows until its row budget raises from inside a backward.
    """
    previous = _HOOKED_OPTIMIZER_OF.get(model)
    if previous is not None and previous is not optimizer:
        previous.remove_hooks()
        warnings.warn(
            f"detached the hooks of an earlier {type(previous).__name__} built for this model: one hook-based "
            "optimizer per model at a time (the earlier one can no longer step)",
            UserWarning,
            stacklevel=3,
        )
    if callable(getattr(optimizer, "remove_hooks", None)):
        _HOOKED_OPTIMIZER_OF[model] = optimizer
    elif previous is not None:
        del _HOOKED_OPTIMIZER_OF[model]


# ------------------------------------------------------------------------------------------------- factories


class LoRAOptFactory:
    """Builds a loraopt optimizer when called as ``factory(model, **hyperparameters)``.

    Trainer instantiates the class without arguments and calls the instance, so the class itself goes into
    ``optimizer_cls_and_kwargs``:

    * a named subclass: ``(PSILoRAFactory, {"lr": 0.1})``;
    * any registry name: ``(LoRAOptFactory.for_optimizer("lora-plus"), {"lr": 2e-4})``, or
      ``(LoRAOptFactory, {"optimizer_name": "lora-plus", "lr": 2e-4})``.

    Hyperparameters are those of ``loraopt.create_optimizer(name, model, ...)``; unknown ones raise a
    ``ValueError`` that lists the valid ones.  A factory has no handle on the Trainer that calls it: train with
    :class:`LoRAOptTrainer` (or :class:`LoRAOptTrainerMixin`), which registers ``TrainerClippingWarningCallback``,
    or pass ``callbacks=[TrainerClippingWarningCallback()]`` to a plain ``Trainer``.
    """

    optimizer_name: Optional[str] = None

    def __init__(self, optimizer_name: Optional[str] = None, *args: Any, **kwargs: Any):
        if args or kwargs or not (optimizer_name is None or isinstance(optimizer_name, str)):
            # What a Trainer without factory support does: it calls the class like an Optimizer class.
            raise TypeError(
                f"{type(self).__name__} was called like an optimizer class (parameters and hyperparameters). "
                "Trainer calls factories as cls()(model, **kwargs) only in transformers versions that have "
                "transformers.trainer_optimizer.is_optimizer_factory; with an older one pass "
                f"optimizers=({type(self).__name__}()(model, ...), None) instead"
            )
        if optimizer_name is not None:
            load_optimizer(optimizer_name)  # an unknown name fails here, listing the known ones
            self.optimizer_name = optimizer_name

    @classmethod
    def for_optimizer(cls, optimizer_name: str) -> Type["LoRAOptFactory"]:
        """A factory class bound to ``optimizer_name``, to pass as the class in ``optimizer_cls_and_kwargs``."""
        load_optimizer(optimizer_name)
        return type(
            f"{cls.__name__}[{optimizer_name}]", (cls,), {"optimizer_name": optimizer_name, "__module__": __name__}
        )

    def build(self, model: nn.Module, **hyperparameters: Any) -> Optimizer:
        """Create the optimizer (override in subclasses whose factory is not a registry entry)."""
        name = hyperparameters.pop("optimizer_name", None) or self.optimizer_name
        if name is None:
            raise TypeError(
                "LoRAOptFactory needs an optimizer name: pass optimizer_cls_and_kwargs=(LoRAOptFactory, "
                "{'optimizer_name': 'psi-lora', ...}), use LoRAOptFactory.for_optimizer('psi-lora'), or a named "
                "factory such as PSILoRAFactory"
            )
        return create_optimizer(name, model, **hyperparameters)

    def __call__(self, model: nn.Module, **hyperparameters: Any) -> Optimizer:
        optimizer = self.build(model, **hyperparameters)
        _retire_previous_hooks(model, optimizer)
        return optimizer

    def __repr__(self) -> str:
        return f"{type(self).__name__}(optimizer_name={self.optimizer_name!r})"


class PSILoRAFactory(LoRAOptFactory):
    """``create_psi_lora_optimizer(model, **kwargs)`` for Trainer.  It clips internally (``max_grad_norm``, default
    0 = off): set ``TrainingArguments(max_grad_norm=0)``."""

    optimizer_name = "psi-lora"


class ScaledPSILoRAFactory(LoRAOptFactory):
    """``create_scaled_psi_lora_optimizer(model, **kwargs)`` for Trainer.  It clips internally (``max_grad_norm``,
    default 1.0): set ``TrainingArguments(max_grad_norm=0)``."""

    optimizer_name = "scaled-psi-lora"


class LoKOFactory(LoRAOptFactory):
    """``create_loko_optimizer(model, **kwargs)`` for ``LoKOTrainer`` (``num_outputs`` = number of classes) or
    ``LoKOScalarTrainer`` (``observation="loss"``, no ``num_outputs``)."""

    optimizer_name = "loko"

    def build(self, model: nn.Module, **hyperparameters: Any) -> Optimizer:
        from ..optim.loko import create_loko_optimizer

        observation = hyperparameters.get("observation", "softmax")
        if observation == "loss":
            hyperparameters.setdefault("num_outputs", None)
        elif hyperparameters.get("num_outputs") is None:
            labels = getattr(getattr(model, "config", None), "num_labels", None)
            hint = f" (this model's config.num_labels is {labels})" if labels is not None else ""
            raise ValueError(
                f"LoKOFactory (observation={observation!r}) needs num_outputs, the number of classes or outputs{hint}: "
                "pass optimizer_cls_and_kwargs=(LoKOFactory, {'num_outputs': ...})"
            )
        return create_loko_optimizer(model, **hyperparameters)


class RPLoRAFactory(LoRAOptFactory):
    """``create_rplora_optimizer(model, optimizer_cls, **kwargs)`` (Riemannian-preconditioned LoRA) for Trainer;
    ``optimizer_cls`` is a keyword here (``"sgd"`` by default, ``"adamw"`` or an ``Optimizer`` subclass)."""

    optimizer_name = "rplora"

    def build(self, model: nn.Module, **hyperparameters: Any) -> Optimizer:
        from ..optim.baselines import create_rplora_optimizer

        optimizer_cls = hyperparameters.pop("optimizer_cls", "sgd")
        return create_rplora_optimizer(model, optimizer_cls, **hyperparameters)


# ------------------------------------------------------------------------------------------------- LoKO trainers


def _logits_of(outputs: Any) -> Tensor:
    logits = getattr(outputs, "logits", None)
    if logits is None and isinstance(outputs, dict):
        logits = outputs.get("logits")
    if logits is None:
        raise ValueError(
            "LoKOTrainer observes the model's logits: the model must return a ModelOutput (or dict) with 'logits' "
            "(keep return_dict=True)"
        )
    return logits


def _is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` predicts token t+1 at position t (transformers shifts the labels inside its loss)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    inner = model
    for _ in range(4):  # DDP -> PeftModel -> LoraModel -> the transformers model
        if hasattr(inner, "module") and isinstance(inner.module, nn.Module):
            inner = inner.module
        elif hasattr(inner, "get_base_model"):
            inner = inner.get_base_model()
        else:
            break
    return inner._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()


def _require_loko(trainer: Trainer, *, scalar: bool):
    from ..optim.loko import LoKO

    optimizer = unwrap_optimizer(trainer.optimizer)
    which = "LoKOScalarTrainer" if scalar else "LoKOTrainer"
    if not isinstance(optimizer, LoKO):
        observation = "'loss'" if scalar else "'softmax'"
        raise TypeError(
            f"{which} needs a LoKO optimizer, got {type(optimizer).__name__}: pass optimizer_cls_and_kwargs="
            f"(LoKOFactory, {{'observation': {observation}, ...}})"
        )
    observation = optimizer.param_groups[0]["observation"]
    if scalar and observation != "loss":
        raise ValueError(
            f"LoKOScalarTrainer observes the loss, but the optimizer has observation={observation!r}: build it with "
            "observation='loss', or use LoKOTrainer to observe the outputs"
        )
    if not scalar and observation == "loss":
        raise ValueError(
            "the optimizer has observation='loss' (LoKO-scalar), which needs the loss and a backward: use "
            "LoKOScalarTrainer, or build the optimizer with observation='softmax'/'regression' for LoKOTrainer"
        )
    return optimizer


class LoKOTrainer(LoRAOptTrainerMixin, Trainer):
    """``Trainer`` for LoKO with output observations (``observation="softmax"`` or ``"regression"``).

    Each training step runs the forward, hands ``(logits, labels)`` to ``optimizer.observe`` and returns the
    detached loss (for logging only): there is no backward, LoKO builds its Jacobian from the live graph.  Trainer's
    ``optimizer.step()`` then applies the update.

    * One update per batch: ``gradient_accumulation_steps`` must be 1 (a larger ``per_device_train_batch_size`` is
      the way to observe more samples per update).  FSDP and DeepSpeed are refused; DDP works (LoKO gathers every
      rank's rows).
    * A batch of ``b > 1`` samples is one joint observation when the optimizer's ``batch_mode`` is ``"joint"`` (the
      default; warned once, as the paper's protocol is batch 1).  With ``batch_mode="sequential"`` the trainer
      re-runs the forward per sample so each update sees the parameters left by the previous one.
    * ``per_sample_jacobian=True`` builds the joint Jacobian rows from one-sample forwards: the same update, much
      cheaper for deep models and ``b > 1`` (see ``LoKO``'s docstring).
    * Token-level outputs (``(batch, seq, vocab)`` logits) are observed per token, positions labelled -100 dropped
      and causal-LM labels shifted; this costs ``(tokens * vocab)`` Jacobian rows per step, so it is only practical
      for tiny vocabularies.  Override :meth:`loko_observation` for other heads.
    """

    def __init__(self, *args: Any, per_sample_jacobian: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.per_sample_jacobian = per_sample_jacobian
        self._warned_joint = False
        self._check_loko_setup()

    def _check_loko_setup(self) -> None:
        if self.args.gradient_accumulation_steps > 1:
            raise ValueError(
                f"LoKOTrainer updates once per batch from the model outputs, so there is nothing to accumulate: set "
                f"gradient_accumulation_steps=1 (got {self.args.gradient_accumulation_steps}) and raise "
                "per_device_train_batch_size to observe more samples per update"
            )
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            raise NotImplementedError(
                "LoKOTrainer does not support FSDP or DeepSpeed (sharded or flattened parameters): its output "
                "observations need per-output Jacobian rows of the whole parameters. Use DDP or a single process, or "
                "LoKOScalarTrainer (observation='loss'), which runs under FSDP2"
            )

    def loko_observation(self, model: nn.Module, logits: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """``(outputs, targets)`` for ``optimizer.observe`` from the model's logits and the batch labels."""
        if labels.is_floating_point():  # regression targets or class probabilities: observed as they are
            return logits, labels
        if logits.dim() > 2 and logits.dim() == labels.dim() + 1:  # one class distribution per token
            if _is_causal_lm(model):
                logits, labels = logits[..., :-1, :], labels[..., 1:]
            keep = labels != IGNORE_INDEX
            return logits[keep], labels[keep]
        return logits, labels

    def _sample_forward(self, model: nn.Module, inputs: Dict[str, Any], labels: Tensor) -> Callable[[int], Tensor]:
        batch_size = labels.shape[0]
        model_inputs = {k: v for k, v in inputs.items() if k not in self.label_names}

        def forward(i: int) -> Tensor:
            sample = {
                k: v[i : i + 1] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == batch_size else v
                for k, v in model_inputs.items()
            }
            with self.compute_loss_context_manager():
                logits = _logits_of(model(**sample))
            return self.loko_observation(model, logits, labels[i : i + 1])[0]

        return forward

    def training_step(
        self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Optional[Any] = None
    ) -> Tensor:
        self._check_loko_setup()
        optimizer = _require_loko(self, scalar=False)
        model.train()
        inputs = self._prepare_inputs(inputs)
        label_key = self.label_names[0] if len(self.label_names) == 1 else "labels"
        if label_key not in inputs:
            raise ValueError(
                f"LoKOTrainer observes the targets: each batch needs a {label_key!r} entry (check the data collator "
                "and TrainingArguments.label_names)"
            )
        labels = inputs[label_key]
        with self.compute_loss_context_manager():
            # A copy: compute_loss pops 'labels' when label smoothing or compute_loss_func is set.
            loss, outputs = self.compute_loss(
                model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        observed, targets = self.loko_observation(model, _logits_of(outputs), labels)

        batch_mode = optimizer.param_groups[0]["batch_mode"]
        batch_size = labels.shape[0]
        forward = None
        if batch_size > 1 and (batch_mode == "sequential" or self.per_sample_jacobian):
            if observed.shape[0] != batch_size or observed.dim() != 2:
                raise ValueError(
                    "per-sample forwards (batch_mode='sequential' or per_sample_jacobian=True) need one output row "
                    f"per sample, got outputs of shape {tuple(observed.shape)} for {batch_size} samples: use "
                    "batch_mode='joint' (token-level outputs), or per_device_train_batch_size=1"
                )
            forward = self._sample_forward(model, inputs, labels)
        if batch_size > 1 and batch_mode == "joint" and not self._warned_joint:
            self._warned_joint = True
            warnings.warn(
                f"LoKOTrainer: each batch of {batch_size} samples is observed jointly (one update linearised at the "
                "current parameters, batch_mode='joint'); the paper's protocol is per_device_train_batch_size=1, "
                "and batch_mode='sequential' updates sample by sample",
                UserWarning,
                stacklevel=2,
            )
        optimizer.observe(observed, targets, forward=forward)
        return loss.detach()


class LoKOScalarMixin(LoRAOptTrainerMixin):
    """Trainer mixin for LoKO-scalar (``LoKOFactory`` with ``observation="loss"``): the ordinary forward and
    backward run unchanged, and the detached loss of each optimizer step is handed to ``optimizer.observe`` before
    Trainer's ``optimizer.step()``.  A callback cannot do this: callbacks never see the loss.

    The observed value is the loss that ``training_step`` backpropagated (already divided for gradient
    accumulation), summed over the micro-batches of the step, i.e. exactly the scalar whose gradient Trainer
    accumulated in ``.grad``; gradient accumulation therefore works.  It is taken from ``training_step``'s return
    value rather than inside ``compute_loss`` because Trainer applies the accumulation scaling after
    ``compute_loss``, by rules that depend on the model and the transformers version.

    Use as ``class MyTrainer(LoKOScalarMixin, Trainer)`` or take :class:`LoKOScalarTrainer`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._loko_loss_sum: Optional[Tensor] = None

    def training_step(
        self, model: nn.Module, inputs: Dict[str, Any], num_items_in_batch: Optional[Any] = None
    ) -> Tensor:
        optimizer = _require_loko(self, scalar=True)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # No pending observation means step() (or zero_grad) consumed it: this micro-batch starts a new step.
        if not optimizer.has_pending_observation:
            self._loko_loss_sum = None
        total = loss.detach() if self._loko_loss_sum is None else self._loko_loss_sum + loss.detach()
        optimizer.clear_observation()  # observe() accepts one observation per step: replace it with the sum
        optimizer.observe(total)
        self._loko_loss_sum = total
        return loss


class LoKOScalarTrainer(LoKOScalarMixin, Trainer):
    """``Trainer`` with :class:`LoKOScalarMixin` (LoKO-scalar, ``observation="loss"``)."""
