"""Lightning integration (specs/integration.md §6): automatic optimization with PSI-LoRA, Scaled PSI-LoRA, RPLoRA and
LoKO-scalar; manual optimization with LoKO through `loko_step`; the gradient-clipping warning."""

from __future__ import annotations

import warnings

import pytest
import torch

L = pytest.importorskip("lightning.pytorch")


import loraopt  # noqa: E402
from loraopt.integrations.lightning import LightningClippingWarningCallback, loko_step  # noqa: E402
from toys import tiny_bert_classifier  # noqa: E402

VOCAB, SEQ_LEN, NUM_LABELS = 64, 8, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_bert(seed: int = 0):
    return tiny_bert_classifier(seed, vocab=VOCAB, num_labels=NUM_LABELS)


def loader(batch_size: int = 4, n: int = 32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(VOCAB, (n, SEQ_LEN), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ_LEN, dtype=torch.long),
             "labels": ids[i, 0] % NUM_LABELS} for i in range(n)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


class AutomaticModule(L.LightningModule):
    def __init__(self, optimizer_name: str, **hyperparameters):
        super().__init__()
        self.model = tiny_bert()
        self.optimizer_name, self.hyperparameters = optimizer_name, hyperparameters

    def configure_optimizers(self):
        return loraopt.create_optimizer(self.optimizer_name, self.model, **self.hyperparameters)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss


class LoKOManualModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_bert()
        self.automatic_optimization = False

    def configure_optimizers(self):
        return loraopt.create_loko_optimizer(self.model, num_outputs=NUM_LABELS, p_init="score")

    def training_step(self, batch, batch_idx):
        outputs = self.model(**batch)
        loko_step(self.optimizers(), outputs.logits, batch["labels"])
        return outputs.loss.detach()


def fit(module, steps: int = 3, **trainer_kwargs):
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    trainer.fit(module, loader())
    after = {n: p.detach() for n, p in module.model.named_parameters() if p.requires_grad}
    return trainer, before, after


@pytest.mark.parametrize(
    "name,hyperparameters",
    [
        ("psi-lora", {"lr": 0.1, "momentum": 0.9}),
        ("scaled-psi-lora", {"lr": 0.1}),
        ("riemannian-sgd", {"lr": 0.1}),
        ("loko", {"num_outputs": None, "observation": "loss"}),
    ],
    ids=["psi-lora", "scaled-psi-lora", "rplora", "loko-scalar"],
)
def test_automatic_optimization_runs_the_closure_and_steps(name, hyperparameters):
    trainer, before, after = fit(AutomaticModule(name, **hyperparameters))
    assert trainer.global_step == 3
    lora_b = [n for n in before if ".lora_B." in n]
    assert lora_b and all(not torch.equal(before[n], after[n]) for n in lora_b)
    assert all(torch.isfinite(p).all() for p in after.values())


def test_loko_manual_optimization_through_loko_step():
    trainer, before, after = fit(LoKOManualModule())
    assert trainer.global_step == 3  # the step went through LightningOptimizer, so Lightning counted it
    assert all(not torch.equal(before[n], after[n]) for n in before if ".lora_B." in n)


def test_loko_step_rejects_other_optimizers_and_missing_targets():
    model = tiny_bert()
    with pytest.raises(TypeError, match="needs a LoKO optimizer"):
        loko_step(torch.optim.SGD(model.parameters(), lr=0.1), torch.zeros(1, NUM_LABELS), torch.zeros(1))
    loko = loraopt.create_loko_optimizer(model, num_outputs=NUM_LABELS)
    with pytest.raises(ValueError, match="loko_step\\(optimizer, logits, labels\\)"):
        loko_step(loko, torch.zeros(1, NUM_LABELS))


@pytest.mark.parametrize("clip,expect_warning", [(1.0, True), (None, False)])
def test_clipping_warning_callback(clip, expect_warning):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(AutomaticModule("scaled-psi-lora", lr=0.1), steps=1, gradient_clip_val=clip,
            callbacks=[LightningClippingWarningCallback()])
    messages = [str(w.message) for w in caught if "clips .grad" in str(w.message)]
    assert bool(messages) == expect_warning
    if expect_warning:
        assert "ScaledPSILoRA" in messages[0] and "gradient_clip_val=None" in messages[0]
