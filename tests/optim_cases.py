"""The optimizer table that drives the conformance matrix (one row per optimizer configuration).

``train_step(case, model, optimizer, x, y, accumulate)`` is how a trainer drives each optimizer: the gradient-based
ones need a backward, LoKO needs the outputs (``observe``) instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch

import loraopt
from toys import loss_fn


@dataclass(frozen=True)
class Case:
    id: str
    name: str
    kwargs: Dict[str, Any] = field(default_factory=dict)
    structured: bool = False  # needs the LoRA layer structure (rejects DoRA, embedding and k x k conv adapters)
    streams: bool = False  # K = 0 streaming capture: clipping under accumulation is a bound, not exact
    observes_outputs: bool = False  # LoKO: driven by observe(logits, targets), not by backward
    # PEFT's Riemannian preconditioner only knows 2-D factors and raises on a model whose LoRA is all conv.
    kinds: tuple = ("mlp", "conv", "gpt2")
    observes_loss: bool = False  # LoKO-scalar: backward as usual, plus observe(loss)

    def build(self, model, **overrides):
        return loraopt.create_optimizer(self.name, model, **{**self.kwargs, **overrides})


CASES = [
    Case("adamw", "adamw", dict(lr=1e-2)),
    Case("sgd-momentum", "sgd", dict(lr=0.05, momentum=0.9)),
    Case("adagrad", "adagrad", dict(lr=0.05)),
    Case("lora-plus", "lora-plus", dict(lr=2e-3)),
    Case("riemannian-sgd", "riemannian-sgd", dict(lr=0.05), kinds=("mlp", "gpt2")),
    Case("riemannian-adamw", "riemannian-adamw", dict(lr=2e-3), kinds=("mlp", "gpt2")),
    Case("psi-k1-momentum", "psi-lora", dict(lr=0.1, inner_iters=1, momentum=0.9), structured=True),
    Case("psi-k0-stream", "psi-lora", dict(lr=0.1, inner_iters=0, momentum=0.9), structured=True, streams=True),
    Case("psi-k2-clip", "psi-lora", dict(lr=0.1, inner_iters=2, max_grad_norm=0.5, weight_decay=0.01), structured=True),
    Case("scaled-k0-kfac", "scaled-psi-lora", dict(lr=0.1, other_lr=1e-2), structured=True, streams=True),
    Case(
        "scaled-k1-shampoo", "scaled-psi-lora",
        dict(lr=0.1, other_lr=1e-2, inner_iters=1, metric="shampoo", power=0.25), structured=True,
    ),
    Case("svdlora-momentum", "svdlora", dict(lr=0.1, momentum=0.9), structured=True),
]

try:  # LoKO lives in its own module; the matrix includes it when present.
    import loraopt.optim.loko  # noqa: F401

    CASES += [
        Case("loko-softmax", "loko", dict(num_outputs=3), observes_outputs=True),
        Case("loko-loss", "loko", dict(num_outputs=3, observation="loss"), observes_loss=True),
    ]
except ImportError:  # pragma: no cover
    pass

CASE_IDS = [c.id for c in CASES]


def train_step(case: Case, model, optimizer, x, y, accumulate: int = 1):
    """One optimizer step on (x, y), split into ``accumulate`` micro-batches for gradient-based optimizers."""
    optimizer.zero_grad()
    if case.observes_outputs:
        optimizer.observe(model(x), y)
        optimizer.step()
        return
    if case.observes_loss:
        loss = loss_fn(model, x, y)
        optimizer.observe(loss)
        loss.backward()
        optimizer.step()
        return
    for xm, ym in zip(x.chunk(accumulate), y.chunk(accumulate)):
        (loss_fn(model, xm, ym) / accumulate).backward()
    optimizer.step()


def evaluate(model, x, y) -> float:
    with torch.no_grad():
        return loss_fn(model, x, y).item()
