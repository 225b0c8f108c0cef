"""Toy PEFT models and batches shared by the tests (the conformance matrix of specs/integration.md §9)."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

N_CLASSES = 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class PointwiseConvNet(nn.Module):
    def __init__(self, kernel=1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel, padding=kernel // 2)
        self.conv2 = nn.Conv2d(8, 8, kernel, padding=kernel // 2)
        self.head = nn.Linear(8, N_CLASSES)

    def forward(self, x):
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return self.head(h.mean(dim=(2, 3)))


class GPT2Style(nn.Module):
    """GPT-2 keeps its projections as ``Conv1D`` with the weight stored (in, out)."""

    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(16, 12)
        self.c_proj = Conv1D(16, 16)
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.c_proj(torch.tanh(self.c_fc(x)))).mean(1))


class EmbeddingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.fc1 = nn.Linear(12, 16)
        self.head = nn.Linear(16, N_CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.fc1(self.emb(x))).mean(1))


SUPPORTED = ("mlp", "conv", "gpt2")
UNSUPPORTED = ("embedding", "dora", "conv3x3")


def make_model(kind: str = "mlp", seed: int = 0, r: int = 4, **lora_kwargs) -> nn.Module:
    torch.manual_seed(seed)
    cfg = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, modules_to_save=["head"])
    if kind in ("mlp", "dora"):
        base, cfg["target_modules"] = MLP(), ["fc1", "fc2"]
        cfg["use_dora"] = kind == "dora"
    elif kind in ("conv", "conv3x3"):
        base, cfg["target_modules"] = PointwiseConvNet(1 if kind == "conv" else 3), ["conv1", "conv2"]
    elif kind == "gpt2":
        base, cfg["target_modules"], cfg["fan_in_fan_out"] = GPT2Style(), ["c_fc", "c_proj"], True
    elif kind == "embedding":
        base, cfg["target_modules"] = EmbeddingNet(), ["emb", "fc1"]
    else:
        raise ValueError(kind)
    cfg.update(lora_kwargs)
    model = get_peft_model(base, LoraConfig(**cfg))
    # PEFT initialises B = 0; give B a random start so every factor moves and every test sees non-trivial G.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.1)
    return model


def one_lora_linear(seed: int = 0, r: int = 4, d_in: int = 12, d_out: int = 10, dtype=torch.float32) -> nn.Module:
    """One LoRA Linear(d_in, d_out) with s = 1 and a non-zero B (so every term of a PSI step is exercised)."""
    torch.manual_seed(seed)
    model = get_peft_model(nn.Sequential(nn.Linear(d_in, d_out)), LoraConfig(r=r, lora_alpha=r, target_modules=["0"]))
    model = model.to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return model


def make_batch(kind: str = "mlp", n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    if kind in ("mlp", "dora"):
        x = torch.randn(n, 12, generator=g)
    elif kind in ("conv", "conv3x3"):
        x = torch.randn(n, 3, 4, 4, generator=g)
    elif kind == "gpt2":
        x = torch.randn(n, 5, 12, generator=g)
    elif kind == "embedding":
        x = torch.randint(0, 20, (n, 5), generator=g)
    else:
        raise ValueError(kind)
    return x, y


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def params_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def tiny_bert_classifier(seed: int = 0, *, vocab: int = 64, num_labels: int = 3) -> nn.Module:
    """A randomly initialised 2-layer, 32-wide BERT classifier with LoRA r = 4 on query/value (Trainer and Lightning
    tests)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], lora_dropout=0.0, task_type="SEQ_CLS")
    return get_peft_model(BertForSequenceClassification(config), lora)


def sharding_wrapper(name: str, inner: nn.Module, monkeypatch) -> nn.Module:
    """A stand-in for a model wrapped by FSDP1 (``"FullyShardedDataParallel"``) or DeepSpeed (``"DeepSpeedEngine"``)
    that passes the optimizers' ``isinstance`` checks: a subclass of torch's real FSDP class with ``nn.Module``'s
    lookups (FSDP's own need a process group), or the class of a stand-in ``deepspeed`` module (DeepSpeed is not
    installed here). ``inner`` is registered as its ``module``."""
    import sys
    import types

    if name == "DeepSpeedEngine":
        deepspeed = types.ModuleType("deepspeed")
        deepspeed.DeepSpeedEngine = type(name, (nn.Module,), {})
        monkeypatch.setitem(sys.modules, "deepspeed", deepspeed)
        cls = deepspeed.DeepSpeedEngine
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        cls = type(name, (FullyShardedDataParallel,), {"__getattr__": nn.Module.__getattr__,
                                                       "named_parameters": nn.Module.named_parameters})
    wrapper = cls.__new__(cls)
    nn.Module.__init__(wrapper)
    nn.Module.__setattr__(wrapper, "module", inner)
    return wrapper
