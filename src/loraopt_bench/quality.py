"""``loraopt bench quality``: optimizer quality on real models, with a learning-rate sweep and several seeds.

Suites (every method gets the same step budget, batch and data order per seed):

- ``sst2``: GLUE SST-2 / MiniLM-L6, LoRA r = 8 on query, value + classifier (docs/specs/psi-lora.md §7.4 stand-in);
  train on ``sst2/train.tsv``, dev accuracy.
- ``lm``: causal LM / SmolLM2-135M on tiny-shakespeare (90/10 contiguous split), LoRA r = 8 on q/k/v/o
  (§7.6); validation loss and perplexity. LoKO observes the loss there (reported as LoKO-scalar).
- ``vision``: EfficientNet-Lite0 on Fashion-MNIST at 64 px, LoRA on the pointwise convs + head; test accuracy.

    loraopt bench quality --suite sst2 --workers 12 --device cuda --model .gpu_assets/minilm-sst2
    loraopt bench quality --suite lm --steps 30 --seeds 0 --lrs adamw=1e-3,3e-3 ...
    loraopt bench quality --suite vision --quick          # a smoke run

Each (method, lr, seed) is one ``loraopt finetune`` run with its own run directory under ``--runs-dir``; the best
seed of each method's best lr is copied to ``<runs-dir>/best/<method>/`` (``--pack-best FILE`` also tars those,
for machines where only a few files come back). Outputs under ``--out`` (default ``benchmarks/results/<suite>``):
``results.json`` (per method and lr: per-seed curves with step, seconds, metric, and the final metric),
``<suite>.png`` and ``summary.md`` (the tables).

Reporting follows §7.4: per (method, lr), the final metric (and the best over evaluations, "peak") averaged over
seeds; each method's best lr is the one with the best mean final metric; the spread across the sweep shows
robustness. Runs execute in ``--workers`` processes, so the measured seconds include contention; ``--timing-steps``
re-times each method alone for a clean seconds-per-step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .common import mean_std, set_cpu_threads
from .data import project_root
from .report import markdown_table

__all__ = ["MethodSpec", "SuiteSpec", "SUITES", "METHODS", "plan_runs", "run_suite", "aggregate", "main"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered optimizer with fixed extra hyperparameters and the lr grid it is swept over; ``config`` holds
    run settings other than the optimizer's (``FinetuneConfig`` fields, e.g. ``warmup_steps``).
    ``recorded_defaults``: hyperparameters that were the factory's defaults when earlier runs of this key were
    recorded (so their stored ``hp`` leaves them out); such runs still match the method when merged or resumed."""

    key: str
    optimizer: str
    label: str
    lrs: Tuple[float, ...]
    hp: Mapping[str, Any] = field(default_factory=dict)
    config: Mapping[str, Any] = field(default_factory=dict)
    recorded_defaults: Mapping[str, Any] = field(default_factory=dict)

    def same_hp(self, stored: Mapping[str, Any]) -> bool:
        """Whether a stored run's ``hp`` are this method's (reading ``recorded_defaults`` into both)."""
        return {**self.recorded_defaults, **stored} == {**self.recorded_defaults, **self.hp}


# Five half-decade values (100x) around where each rule usually works for LoRA fine-tuning:
# - AdamW / Riemannian AdamW around 1e-3 (assets.md reference point: AdamW 1e-3 on SST-2);
# - LoRA+ a decade lower, since lora_B runs at 16x the base lr;
# - PSI-LoRA is SGD with heavy-ball momentum 0.9 on the full weight (the spec's MNIST/CIFAR setting), so its lr is
#   a plain SGD step size;
# - Scaled PSI-LoRA centred on the spec's GLUE choice 0.2 (grid {0.1, 0.2, 0.5} in §7.4); its non-LoRA parameters
#   (the fresh classifier head) take Adam at other_lr = 1e-3 instead of the spec's 1e-4, which suits 3-epoch runs
#   but leaves the head nearly untrained in a few hundred steps (measured: dev accuracy stuck at the majority class
#   for 4 of 5 lrs at 200 steps);
# - LoKO: lr scales the Kalman mean update (1 = the filter's own step); P0 is the library default per observation
#   (chosen on the online benchmark, benchmarks/notes/loko.md). The LM suite's "loko" is LoKO-scalar with the
#   data-scaled P0 ("score") that its committed runs used (results/lm_epoch/; kept under that key so that merging
#   them keeps them); "loko-scalar" is LoKO-scalar at the library defaults, whose noise now starts at the first loss
#   squared (r0="first-loss"), which notes/loko.md measured better than "score" on a 30-step LM check.
# PLAIN pins the plain step (gradient clipped at 1.0, not normalised): the defaults of the PSI family when the keys
# that carry it ran (PSI-LoRA / Proj. PSI-LoRA until notes/psi.md §11, Scaled PSI-LoRA until §12). Runs recorded
# before it was pinned have no normalize / max_grad_norm in their hp, which recorded_defaults reads as PLAIN.
PLAIN = {"normalize": None, "max_grad_norm": 1.0}
_PLAIN_THEN = dict(recorded_defaults=PLAIN)
ADAMW_LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
METHODS: Dict[str, MethodSpec] = {
    m.key: m
    for m in (
        MethodSpec("adamw", "adamw", "AdamW", ADAMW_LRS),
        MethodSpec("lora-plus", "lora-plus", "LoRA+", (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)),
        MethodSpec("riemannian-adamw", "riemannian-adamw", "Riemannian AdamW", ADAMW_LRS),
        MethodSpec("psi-lora", "psi-lora", "PSI-LoRA", (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
                   {"momentum": 0.9, "max_grad_norm": 1.0, "normalize": None, "other_optimizer": "adam",
                    "other_lr": 1e-3}, recorded_defaults={"normalize": None}),
        MethodSpec("proj-psi-lora", "proj-psi-lora", "Proj. PSI-LoRA", (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
                   {"momentum": 0.9, "max_grad_norm": 1.0, "normalize": None, "other_optimizer": "adam",
                    "other_lr": 1e-3}, recorded_defaults={"normalize": None}),
        MethodSpec("scaled-psi-lora", "scaled-psi-lora", "Scaled PSI-LoRA", (0.02, 0.06, 0.2, 0.6, 2.0),
                   {"other_lr": 1e-3, **PLAIN}, **_PLAIN_THEN),
        MethodSpec("scaled-psi-lora-relprox", "scaled-psi-lora", "Scaled PSI-LoRA (relative momentum prox)",
                   (0.06, 0.2, 0.6, 2.0), {"other_lr": 1e-3, "momentum_prox": 1e-2, **PLAIN}, **_PLAIN_THEN),
        MethodSpec("scaled-psi-lora-rel", "scaled-psi-lora", "Scaled PSI-LoRA (relative metric)",
                   (0.1, 0.3, 1.0, 3.0), {"other_lr": 1e-3, "metric_scale": "relative", "bias_correction": True,
                                          "damping": 1e-2, "momentum_prox": 1e-2, **PLAIN}, **_PLAIN_THEN),
        MethodSpec("scaled-psi-lora-default", "scaled-psi-lora", "Scaled PSI-LoRA (plain-step defaults)", (0.3,),
                   PLAIN, **_PLAIN_THEN),
        MethodSpec("scaled-psi-lora-rel-lrprox", "scaled-psi-lora", "Scaled PSI-LoRA (relative metric, lr prox)",
                   (0.3, 1.0), {"other_lr": 1e-3, "metric_scale": "relative", "bias_correction": True,
                                "damping": 1e-2, **PLAIN}, **_PLAIN_THEN),
        MethodSpec("loko", "loko", "LoKO", (0.01, 0.03, 0.1, 0.3, 1.0)),
    )
}
# One-epoch SST-2 ablations of the PSI family (issue 9 §4): each changes one knob of the library defaults (no hp
# beyond the knob) at the default lr. Warm-up: linear over the first 6 % of the steps (126 of the one-epoch 2,105), a
# common fine-tuning choice; ``warmup_fraction`` is turned into ``FinetuneConfig.warmup_steps`` per run.
# The PSI-LoRA / Proj. PSI-LoRA ablations vary the plain step, the factories' defaults when they ran (PLAIN pins it;
# runs recorded before it was pinned have no normalize / max_grad_norm in their hp, which recorded_defaults reads as
# PLAIN).
ABLATIONS: Tuple[MethodSpec, ...] = (
    MethodSpec("psi-lora-default", "psi-lora", "PSI-LoRA (plain-step defaults)", (0.03,), PLAIN, **_PLAIN_THEN),
    MethodSpec("proj-psi-lora-default", "proj-psi-lora", "Proj. PSI-LoRA (plain-step defaults)", (0.03,), PLAIN,
               **_PLAIN_THEN),
    MethodSpec("psi-lora-k0", "psi-lora", "PSI-LoRA, K = 0", (0.03,), {**PLAIN, "inner_iters": 0}, **_PLAIN_THEN),
    MethodSpec("psi-lora-k2", "psi-lora", "PSI-LoRA, K = 2", (0.03,), {**PLAIN, "inner_iters": 2}, **_PLAIN_THEN),
    MethodSpec("psi-lora-rank2", "psi-lora", "PSI-LoRA, momentum rank 2r", (0.03,), {**PLAIN, "rank_mult": 2.0},
               **_PLAIN_THEN),
    MethodSpec("psi-lora-warmup", "psi-lora", "PSI-LoRA, warm-up over 6 % of the steps", (0.03,), PLAIN,
               config={"warmup_fraction": 0.06}, **_PLAIN_THEN),
    MethodSpec("proj-psi-lora-k2", "proj-psi-lora", "Proj. PSI-LoRA, K = 2", (0.03,), {**PLAIN, "inner_iters": 2},
               **_PLAIN_THEN),
    MethodSpec("proj-psi-lora-warmup", "proj-psi-lora", "Proj. PSI-LoRA, warm-up over 6 % of the steps", (0.03,),
               PLAIN, config={"warmup_fraction": 0.06}, **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora-k1", "scaled-psi-lora", "Scaled PSI-LoRA, K = 1", (0.3,), {**PLAIN, "inner_iters": 1},
               **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora-shampoo", "scaled-psi-lora", "Scaled PSI-LoRA, Shampoo-diagonal metric", (0.3,),
               {**PLAIN, "metric": "shampoo"}, **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora-p025", "scaled-psi-lora", "Scaled PSI-LoRA, power 0.25", (0.3,),
               {**PLAIN, "power": 0.25}, **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora-p1", "scaled-psi-lora", "Scaled PSI-LoRA, power 1", (0.3,), {**PLAIN, "power": 1.0},
               **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora-beta999", "scaled-psi-lora", "Scaled PSI-LoRA, beta2 0.999", (0.3,),
               {**PLAIN, "betas": (0.9, 0.999)}, **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora-damp1e-3", "scaled-psi-lora", "Scaled PSI-LoRA, damping 1e-3", (0.3,),
               {**PLAIN, "damping": 1e-3}, **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora-nobc", "scaled-psi-lora", "Scaled PSI-LoRA, no bias correction", (0.3,),
               {**PLAIN, "bias_correction": False}, **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora-warmup", "scaled-psi-lora", "Scaled PSI-LoRA, warm-up over 6 % of the steps", (0.3,),
               PLAIN, config={"warmup_fraction": 0.06}, **_PLAIN_THEN),
)
METHODS.update({m.key: m for m in ABLATIONS})
# The per-layer step normalisation (normalize="layer", benchmarks/notes/psi.md §7): the lr is then about the RMS of a
# step's entries, hence grids ~3 decades below the plain steps'. Clipping off (it would bring the gradient's scale back).
# (psi.md §10: 3e-5 is the best normalised lr of PSI-LoRA and Proj. PSI-LoRA on all three suites; opt-in, see
# loraopt.optim.psi.PSI_NORMALIZED_SETTINGS.)
NORMALIZED: Tuple[MethodSpec, ...] = (
    MethodSpec("psi-lora-norm", "psi-lora", "PSI-LoRA, normalize='layer'", (1e-5, 3e-5, 1e-4, 3e-4),
               {"normalize": "layer", "max_grad_norm": 0.0}),
    MethodSpec("proj-psi-lora-norm", "proj-psi-lora", "Proj. PSI-LoRA, normalize='layer'", (1e-5, 3e-5, 1e-4, 3e-4),
               {"normalize": "layer", "max_grad_norm": 0.0}),
    MethodSpec("scaled-psi-lora-norm", "scaled-psi-lora", "Scaled PSI-LoRA, normalize='layer'",
               (1e-4, 3e-4, 1e-3, 3e-3), {"normalize": "layer", "max_grad_norm": 0.0}),
)
METHODS.update({m.key: m for m in NORMALIZED})
# Adafactor's factored second moment on the full-weight gradient (normalize="factored"): each entry of G divided by
# the root of its rank-one second-moment estimate, so the lr is a per-entry step size as in Adam (a heavy-ball
# momentum of 0.9 sums ~10 steps, hence a decade below AdamW's lrs). Clipping off, as for the per-layer one.
FACTORED: Tuple[MethodSpec, ...] = (
    MethodSpec("psi-lora-fact", "psi-lora", "PSI-LoRA, normalize='factored'", (1e-5, 3e-5, 1e-4, 3e-4),
               {"normalize": "factored", "max_grad_norm": 0.0}),
    MethodSpec("proj-psi-lora-fact", "proj-psi-lora", "Proj. PSI-LoRA, normalize='factored'",
               (1e-5, 3e-5, 1e-4, 3e-4), {"normalize": "factored", "max_grad_norm": 0.0}),
    # Scaled PSI-LoRA's momentum is an EMA (1 - beta1 = 0.1 on the gradient), hence lrs 10x those of the heavy ball.
    MethodSpec("scaled-psi-lora-fact", "scaled-psi-lora", "Scaled PSI-LoRA, normalize='factored'",
               (1e-4, 3e-4, 1e-3, 3e-3), {"normalize": "factored", "max_grad_norm": 0.0}),
)
METHODS.update({m.key: m for m in FACTORED})
# normalize="full": Adam's second moment of every entry of G (d_out x d_in per layer), to measure what the factored
# estimate leaves out (notes/psi.md §12: the LM gap to AdamW); the factored keys' lr grids.
FULL_SECOND_MOMENT: Tuple[MethodSpec, ...] = (
    MethodSpec("psi-lora-full", "psi-lora", "PSI-LoRA, normalize='full'", (1e-5, 3e-5, 1e-4, 3e-4),
               {"normalize": "full", "max_grad_norm": 0.0}),
    MethodSpec("proj-psi-lora-full", "proj-psi-lora", "Proj. PSI-LoRA, normalize='full'",
               (1e-5, 3e-5, 5e-5, 1e-4, 3e-4), {"normalize": "full", "max_grad_norm": 0.0}),
    # notes/psi.md §13: at 1e-4 one LM seed of three failed in the first 100 steps (full and factored alike), where a
    # schedule that starts at its peak lr is most exposed; the same steps with the suites' 6 % linear warm-up.
    MethodSpec("proj-psi-lora-full-warmup", "proj-psi-lora", "Proj. PSI-LoRA, normalize='full', 6 % warm-up",
               (5e-5, 1e-4, 3e-4), {"normalize": "full", "max_grad_norm": 0.0}, config={"warmup_fraction": 0.06}),
    MethodSpec("proj-psi-lora-fact-warmup", "proj-psi-lora", "Proj. PSI-LoRA, normalize='factored', 6 % warm-up",
               (3e-5, 1e-4, 3e-4), {"normalize": "factored", "max_grad_norm": 0.0}, config={"warmup_fraction": 0.06}),
)
METHODS.update({m.key: m for m in FULL_SECOND_MOMENT})
LOKO_SCALAR = replace(METHODS["loko"], label="LoKO-scalar (p_init='score')",
                      hp={"p_init": "score", "observation": "loss"})

# The realistic suites after the defaults were settled (vision first): every method at its library defaults (no hp
# override), with an lr grid of >= 4 values over >= 30x that holds the library default lr, so that "default" is one
# point of the sweep. Keys are the optimizers' names; a suite's methods are looked up per suite. PLAIN pins the plain
# step of the PSI family, its defaults when these keys' committed runs were made; their defaults are now the
# factored step (the *-fact keys, DEFAULT_METHOD_KEYS below).
LIBRARY_DEFAULT_METHODS: Tuple[MethodSpec, ...] = (
    MethodSpec("adamw", "adamw", "AdamW", (3e-4, 1e-3, 3e-3, 1e-2)),
    MethodSpec("lora-plus", "lora-plus", "LoRA+", (3e-5, 1e-4, 3e-4, 1e-3)),
    MethodSpec("psi-lora", "psi-lora", "PSI-LoRA", (3e-3, 1e-2, 3e-2, 1e-1), PLAIN,
               **_PLAIN_THEN),
    MethodSpec("proj-psi-lora", "proj-psi-lora", "Proj. PSI-LoRA", (3e-3, 1e-2, 3e-2, 1e-1), PLAIN,
               **_PLAIN_THEN),
    MethodSpec("scaled-psi-lora", "scaled-psi-lora", "Scaled PSI-LoRA (plain-step defaults)", (0.03, 0.1, 0.3, 1.0),
               PLAIN, **_PLAIN_THEN),
    MethodSpec("loko", "loko", "LoKO", (0.1, 0.3, 1.0, 3.0)),
)
LM_METHODS: Tuple[MethodSpec, ...] = tuple(
    [m for m in LIBRARY_DEFAULT_METHODS if m.key != "loko"]
    + [MethodSpec("riemannian-adamw", "riemannian-adamw", "Riemannian AdamW", (3e-4, 1e-3, 3e-3, 1e-2)),
       replace(LOKO_SCALAR, lrs=(0.1, 0.3, 1.0, 3.0)),
       MethodSpec("loko-scalar", "loko", "LoKO-scalar (library defaults)", (0.1, 0.3, 1.0, 3.0),
                  {"observation": "loss"})]
    + list(NORMALIZED) + list(FACTORED) + list(FULL_SECOND_MOMENT))
# Which method key holds each optimizer's library defaults, and the default lr there (keyed by method key). Since
# the factored normalisation became the PSI family's default (notes/psi.md §11 for PSI-LoRA and Proj. PSI-LoRA, §12
# for Scaled PSI-LoRA), their defaults are the *-fact keys; the keys psi-lora / proj-psi-lora / scaled-psi-lora keep
# the plain step their committed runs used.
DEFAULT_METHOD_KEYS = {"adamw": "adamw", "lora-plus": "lora-plus", "psi-lora": "psi-lora-fact",
                       "proj-psi-lora": "proj-psi-lora-fact", "scaled-psi-lora": "scaled-psi-lora-fact", "loko": "loko"}
LIBRARY_DEFAULT_LRS = {"adamw": 3e-3, "lora-plus": 3e-4, "psi-lora-fact": 3e-5, "proj-psi-lora-fact": 3e-5,
                       "scaled-psi-lora-fact": 3e-4, "loko": 1.0}


@dataclass(frozen=True)
class SuiteSpec:
    name: str
    title: str
    model: str
    task: str
    methods: Tuple[MethodSpec, ...]
    protocol: Mapping[str, Any]
    seeds: Tuple[int, ...] = (0, 1, 2)
    notes: Tuple[str, ...] = ()


_ALL = tuple(METHODS.values())
SUITES: Dict[str, SuiteSpec] = {
    "sst2": SuiteSpec(
        "sst2", "GLUE SST-2 / MiniLM-L6 (dev accuracy)", "minilm", "sst2", _ALL,
        dict(steps=300, batch_size=32, max_length=64, eval_every=50, eval_limit=None, eval_batch_size=128),
    ),
    "lm": SuiteSpec(
        "lm", "Causal LM / SmolLM2-135M on tiny-shakespeare, 3 epochs (validation loss)", "smollm2",
        "tinyshakespeare", LM_METHODS,
        # tiny-shakespeare's train split is 305k SmolLM2 tokens: 149 steps of 8 x 256 per epoch, 3 epochs (the
        # spec's budget where Jane Austen's novels are absent); every validation block every 100 steps.
        dict(steps=447, batch_size=8, block_size=256, eval_every=100, eval_limit=None, eval_batch_size=32),
        notes=("LoKO observes the mean loss (observation='loss', docs/specs/loko.md §9): a softmax observation over "
               "49,152 tokens is out of reach, so it is reported as LoKO-scalar.",
               "Every method at its library defaults; only the lr is swept (the grid holds the default lr).",),
    ),
    "vision": SuiteSpec(
        "vision", "EfficientNet-Lite0 on Fashion-MNIST, 64 px, one epoch (test accuracy)", "effnet-lite0",
        "fashion-mnist", LIBRARY_DEFAULT_METHODS + NORMALIZED + FACTORED + FULL_SECOND_MOMENT,
        dict(steps=1875, batch_size=32, image_size=64, eval_every=500, eval_limit=None, eval_batch_size=500),
        notes=("Riemannian AdamW is left out: PEFT's create_riemannian_optimizer preconditions only 2-D "
               "lora_A/lora_B and finds no pair among EfficientNet's 1x1-conv adapters (4-D weights).",
               "Every method runs at its library defaults; only the lr is swept, and the grid holds the library "
               "default lr (AdamW 3e-3, LoRA+ 3e-4, PSI-LoRA and Proj. PSI-LoRA 0.03 with the plain step, their "
               "defaults then, and since notes/psi.md §11 the factored step at 3e-5, the *-fact keys; Scaled "
               "PSI-LoRA 0.3 with the plain step, and since notes/psi.md §12 the factored step at 3e-4; LoKO "
               "1.0).",),
    ),
}
QUICK = dict(steps=4, eval_every=2, eval_limit=32, seeds=(0,))


# ---------------------------------------------------------------------------------------------------------------
# Planning and running
# ---------------------------------------------------------------------------------------------------------------

def _lr_key(lr: float) -> str:
    return f"{lr:g}"


def _with_hp_overrides(methods: Sequence[MethodSpec], items: Sequence[str]) -> List[MethodSpec]:
    """``--hp METHOD:KEY=VALUE``: add or replace one optimizer keyword of a method (e.g. ``psi-lora:compile=False``).
    The run's settings change, so its results are not merged with runs without the override."""
    from .finetune import parse_hyperparameters

    extra: Dict[str, Dict[str, Any]] = {}
    keys = {m.key for m in methods}
    for item in items:
        key, sep, setting = item.partition(":")
        if not sep or key not in keys:
            raise ValueError(f"--hp expects METHOD:KEY=VALUE with a method of this run ({', '.join(sorted(keys))}), "
                             f"got {item!r}")
        extra.setdefault(key, {}).update(parse_hyperparameters([setting]))
    return [replace(m, hp={**m.hp, **extra[m.key]}) if m.key in extra else m for m in methods]


def plan_runs(suite: SuiteSpec, methods: Sequence[MethodSpec], seeds: Sequence[int],
              method_seeds: Optional[Mapping[str, Sequence[int]]] = None,
              done: Optional[Mapping[Tuple[str, str, int], Any]] = None) -> List[Tuple[MethodSpec, float, int]]:
    """Seed-major order, so a run cut short by ``--time-budget`` still has every (method, lr) at the first seeds;
    within a seed the slow LoKO runs go first, which packs the worker pool better. ``method_seeds`` restricts a
    method's seeds; runs in ``done`` are left out."""
    method_seeds = method_seeds or {}
    done = done or {}
    plan = [(m, lr, s) for s in seeds for m in methods for lr in m.lrs
            if s in method_seeds.get(m.key, seeds) and (m.key, _lr_key(lr), s) not in done]
    return sorted(plan, key=lambda item: (seeds.index(item[2]), item[0].optimizer != "loko"))


def _finetune_config(suite: SuiteSpec, protocol: Mapping[str, Any], method: MethodSpec, lr: float, seed: int,
                     run_dir: Path, args: argparse.Namespace):
    from .finetune import FinetuneConfig

    settings = {**protocol, **method.config}
    fraction = settings.pop("warmup_fraction", None)
    if fraction is not None:
        settings["warmup_steps"] = int(round(fraction * settings["steps"]))
    return FinetuneConfig(
        model=args.model or suite.model, task=suite.task, optimizer=method.optimizer, lr=lr, hp=dict(method.hp),
        seed=seed, out=str(run_dir), overwrite=True, progress=False, device=args.device, data_dir=args.data_dir,
        loko_jacobian=args.loko_jacobian, rank=args.rank, **settings,
    )


_TASK_CACHE: Dict[Tuple[Any, ...], Any] = {}


def _worker_init(threads: int) -> None:
    set_cpu_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    from transformers.utils import logging as hf_logging

    # Hundreds of runs: per-run notices (weight-loading bars, deprecations) would bury the progress lines.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


def _run_one(config_dict: Dict[str, Any]) -> Dict[str, Any]:
    """One fine-tuning run in a worker process; the task data is loaded once per worker and reused."""
    import traceback

    from .finetune import FinetuneConfig, load_task, run_finetune

    config = FinetuneConfig(**config_dict)
    try:
        key = (config.task, config.train_limit, config.eval_limit, config.data_dir, config.seed
               if config.train_limit else None)
        if key not in _TASK_CACHE:
            _TASK_CACHE[key] = load_task(config.task, seed=config.seed, train_limit=config.train_limit,
                                         eval_limit=config.eval_limit, data_dir=config.data_dir)
        result = run_finetune(config, task_data=_TASK_CACHE[key], command="loraopt bench quality")
    except Exception as error:  # one broken run must not take the sweep down; it is reported instead
        return {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    metrics = result.metrics
    name = metrics["metric"]
    return {
        "metric": name,
        "higher_is_better": metrics["higher_is_better"],
        "curve": [{"step": row["step"], "seconds": row["seconds"], "metric": row[name],
                   **({"perplexity": row["perplexity"]} if "perplexity" in row else {}),
                   **({"eval_loss": row["eval_loss"]} if name != "eval_loss" else {})}
                  for row in metrics["history"]],
        "final": metrics["final"][name],
        "final_perplexity": metrics["final"].get("perplexity"),
        "peak": metrics["best"][name],
        "seconds_per_step": metrics["seconds_per_step"],
        "median_step_seconds": metrics["median_step_seconds"],
        "diverged_at_step": metrics["diverged_at_step"],
        "device": result.config["resolved"]["device"],
        "trainable_parameters": result.config["resolved"]["trainable_parameters"],
        "run_dir": str(result.run_dir),
    }


def run_suite(suite: SuiteSpec, protocol: Mapping[str, Any], methods: Sequence[MethodSpec], seeds: Sequence[int],
              args: argparse.Namespace, on_record=None,
              ) -> Tuple[Dict[Tuple[str, str, int], Dict[str, Any]], List[str]]:
    """Run the plan in a process pool; returns ``{(method, lr, seed): record}`` and the runs left out.

    No run starts after ``args.time_budget`` seconds; at ``args.deadline`` seconds the pool is terminated and the
    runs still going are reported as left out, so a job with a hard wall-clock limit always gets its results.
    ``on_record(records)`` is called after every finished run (to write partial results).
    """
    import queue as queue_module

    runs_dir = Path(args.runs_dir)
    plan = plan_runs(suite, methods, seeds, args.method_seeds, args.previous)
    configs = {
        (m.key, _lr_key(lr), s): asdict(_finetune_config(suite, protocol, m, lr, s,
                                                        runs_dir / m.key / f"lr{_lr_key(lr)}" / f"seed{s}", args))
        for m, lr, s in plan
    }
    order = [(m.key, _lr_key(lr), s) for m, lr, s in plan]
    records: Dict[Tuple[str, str, int], Dict[str, Any]] = dict(args.previous or {})
    started = time.perf_counter()
    total = len(order) + len(records)
    print(f"[{suite.name}] {total} runs on {args.workers} worker(s), {args.threads} thread(s) each", flush=True)

    def elapsed() -> float:
        return time.perf_counter() - started

    def finish(key, record):
        records[key] = record
        status = record.get("error") or f"final {record['final']:.4f} ({record['seconds_per_step']:.3f} s/step)"
        print(f"[{suite.name}] {len(records)}/{total} {elapsed():7.1f}s  {key[0]} lr={key[1]} seed={key[2]}: "
              f"{status}", flush=True)
        if on_record is not None:
            on_record(records)

    def budget_left() -> bool:
        return not args.time_budget or elapsed() < args.time_budget

    if args.workers <= 1:
        _worker_init(args.threads)
        for key in order:
            if not budget_left():
                break
            finish(key, _run_one(configs[key]))
        return records, ["/".join(map(str, k)) for k in order if k not in records]

    done: "queue_module.Queue" = queue_module.Queue()
    waiting = list(order)
    running = set()
    pool = get_context("spawn").Pool(args.workers, initializer=_worker_init, initargs=(args.threads,))
    try:
        while waiting or running:
            while waiting and len(running) < args.workers and budget_left():
                key = waiting.pop(0)
                running.add(key)
                pool.apply_async(_run_one, (configs[key],),
                                 callback=lambda record, key=key: done.put((key, record)),
                                 error_callback=lambda error, key=key: done.put(
                                     (key, {"error": f"worker failed: {type(error).__name__}: {error}"})))
            if not budget_left():
                waiting.clear()
            if not running:
                break
            if args.deadline and elapsed() > args.deadline:
                print(f"[{suite.name}] deadline of {args.deadline:.0f} s reached: stopping {len(running)} runs",
                      flush=True)
                break
            try:
                key, record = done.get(timeout=2.0)
            except queue_module.Empty:
                continue
            running.discard(key)
            finish(key, record)
    finally:
        pool.terminate()  # ends only this pool's worker processes (those still running past the deadline)
        pool.join()
    return records, ["/".join(map(str, k)) for k in order if k not in records]


def time_methods(suite: SuiteSpec, protocol: Mapping[str, Any], methods: Sequence[MethodSpec],
                 best_lrs: Mapping[str, float], args: argparse.Namespace,
                 stop_at: Optional[float] = None) -> Dict[str, Dict[str, Any]]:
    """Seconds per step of each method alone in this process (no other run competing for the device or cores)."""
    from .finetune import run_finetune

    _worker_init(args.threads_timing)
    timings = {}
    short = {**protocol, "steps": args.timing_steps, "eval_every": 0, "eval_limit": 16}
    for method in methods:
        if stop_at is not None and time.perf_counter() > stop_at:
            break
        lr = best_lrs.get(method.key, method.lrs[len(method.lrs) // 2])
        config = _finetune_config(suite, short, method, lr, 0, Path(args.runs_dir) / "timing" / method.key, args)
        config.save_adapter = False
        try:
            metrics = run_finetune(config, command="loraopt bench quality (timing)").metrics
        except Exception as error:
            timings[method.key] = {"error": f"{type(error).__name__}: {error}"}
            continue
        timings[method.key] = {"median_step_seconds": metrics["median_step_seconds"], "steps": metrics["steps"],
                               "threads": args.threads_timing}
        print(f"[{suite.name}] timing {method.label}: {metrics['median_step_seconds']:.4f} s/step (median of "
              f"{metrics['steps']})", flush=True)
    return timings


# ---------------------------------------------------------------------------------------------------------------
# Aggregation and reporting
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_METHOD = "adamw"  # speed to target is measured against this method's best lr


def steps_to_target(curves: Sequence[Sequence[Mapping[str, Any]]], target: float, higher: bool) -> Optional[int]:
    """The first evaluation step at which the seed-mean curve reaches ``target`` (``>=`` when higher is better,
    ``<=`` otherwise), or ``None`` if it never does. ``curves``: one list of ``{"step", "metric"}`` per seed; the
    mean is taken at the steps every seed evaluated (a seed cut short limits the curve)."""
    if not curves:
        return None
    by_seed = [{int(point["step"]): float(point["metric"]) for point in curve} for curve in curves]
    steps = sorted(set.intersection(*(set(c) for c in by_seed)))
    # An exact tie counts as reaching it: accuracies are counts over one eval set, whose means can tie exactly and
    # differ only by the rounding of the float sums.
    slack = 1e-9 * max(1.0, abs(target))
    for step in steps:
        mean = float(np.mean([c[step] for c in by_seed]))
        if (mean >= target - slack) if higher else (mean <= target + slack):
            return step
    return None


def _speed_to_target(out: Dict[str, Any], higher: bool) -> None:
    """Adds ``speed_to_target`` to each method of an :func:`aggregate` result: the steps its best lr's seed-mean
    curve takes to reach the reference method's best mean final metric, and the ratio reference steps / its
    steps (> 1: it gets there sooner). Nothing is added without a finite reference."""
    reference = out.get(REFERENCE_METHOD)
    if not reference or not reference["best"] or not math.isfinite(reference["best"]["final_mean"]):
        return
    target = reference["best"]["final_mean"]

    def curves(method: Mapping[str, Any]) -> List[Any]:
        seeds = method["lrs"][_lr_key(method["best_lr"])]["seeds"].values()
        return [r["curve"] for r in seeds if "error" not in r and r.get("curve")]

    reference_steps = steps_to_target(curves(reference), target, higher)
    for method in out.values():
        if not method["best"]:
            continue
        steps = steps_to_target(curves(method), target, higher)
        method["speed_to_target"] = {
            "reference": REFERENCE_METHOD, "target": target, "steps": steps, "reference_steps": reference_steps,
            "ratio": reference_steps / steps if steps and reference_steps else None,
        }


def aggregate(suite: SuiteSpec, methods: Sequence[MethodSpec], records: Mapping[Tuple[str, str, int], Dict[str, Any]],
              ) -> Dict[str, Any]:
    """Per method and lr: seeds, mean ± std of the final and peak metric; then the best lr, the sweep spread and the
    speed to target against AdamW (:func:`steps_to_target`).

    A diverged or failed seed makes its (method, lr) mean nan, which never wins and counts as the worst in the spread.
    """
    higher = next((r["higher_is_better"] for r in records.values() if "higher_is_better" in r), True)
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    out: Dict[str, Any] = {}
    for method in methods:
        per_lr: Dict[str, Any] = {}
        for lr in method.lrs:
            seeds = {s: r for (k, l, s), r in sorted(records.items()) if k == method.key and l == _lr_key(lr)}
            if not seeds:
                continue
            good = {s: r for s, r in seeds.items() if "error" not in r}
            finals = [r["final"] for r in good.values()] + [float("nan")] * (len(seeds) - len(good))
            peaks = [r["peak"] for r in good.values()] + [float("nan")] * (len(seeds) - len(good))
            final_mean, final_std = mean_std(finals)
            peak_mean, peak_std = mean_std(peaks)
            entry = {
                "lr": lr,
                "seeds": {str(s): r for s, r in seeds.items()},
                "final_mean": final_mean, "final_std": final_std,
                "peak_mean": peak_mean, "peak_std": peak_std,
                "n_seeds": len(seeds),
                "seconds_per_step": float(np.mean([r["seconds_per_step"] for r in good.values()])) if good else None,
                "errors": {str(s): r["error"] for s, r in seeds.items() if "error" in r},
            }
            if good and all(r.get("final_perplexity") is not None for r in good.values()):
                entry["final_perplexity_mean"], entry["final_perplexity_std"] = mean_std(
                    [r["final_perplexity"] for r in good.values()])
            per_lr[_lr_key(lr)] = entry
        if not per_lr:
            continue
        best_key = None
        for key, entry in per_lr.items():
            value = entry["final_mean"]
            if math.isfinite(value) and (best_key is None or better(value, per_lr[best_key]["final_mean"])):
                best_key = key
        finals = [e["final_mean"] for e in per_lr.values()]
        finite = [v for v in finals if math.isfinite(v)]
        worst = (min(finite) if higher else max(finite)) if len(finite) == len(finals) and finite else float("nan")
        out[method.key] = {
            "label": method.label,
            "optimizer": method.optimizer,
            "hp": dict(method.hp),
            **({"config": dict(method.config)} if method.config else {}),
            "lrs": per_lr,
            "best_lr": per_lr[best_key]["lr"] if best_key else None,
            "best": {k: v for k, v in per_lr[best_key].items() if k != "seeds"} if best_key else None,
            "sweep": {
                "final_mean_by_lr": {k: e["final_mean"] for k, e in per_lr.items()},
                "worst_final_mean": worst,
                "median_final_mean": float(np.median(finals)) if finite and len(finite) == len(finals) else
                float("nan"),
                "spread": abs(per_lr[best_key]["final_mean"] - worst) if best_key and math.isfinite(worst) else
                float("nan"),
                "diverged_lrs": [k for k, e in per_lr.items() if not math.isfinite(e["final_mean"])],
            },
        }
    _speed_to_target(out, higher)
    return out


def _fmt(mean: float, std: float, scale: float, digits: int, n: int = 2) -> str:
    if not math.isfinite(mean):
        return "diverged"
    if n < 2:  # one seed has no spread to show
        return f"{mean * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def summary_tables(suite: SuiteSpec, methods: Mapping[str, Any], timings: Mapping[str, Any], metric: str) -> str:
    """Markdown: best lr per method (mean ± std) and each method's spread over its lr sweep."""
    accuracy = metric == "accuracy"
    scale, digits, unit = (100.0, 1, " (%)") if accuracy else (1.0, 3, "")
    best_rows, sweep_rows = [], []
    contended = False
    for key, m in methods.items():
        best = m["best"]
        timing = timings.get(key, {}).get("median_step_seconds")
        timing_text = f"{timing:.3f}" if timing else "—"
        if not timing and best is not None:
            in_sweep = [r["median_step_seconds"] for r in m["lrs"][_lr_key(m["best_lr"])]["seeds"].values()
                        if r.get("median_step_seconds")]
            if in_sweep:
                timing_text = f"{float(np.mean(in_sweep)):.3f}*"
                contended = True
        speed = m.get("speed_to_target")
        if speed is None:
            speed_text = "—"
        elif speed["steps"] is None:
            speed_text = "not reached"
        elif speed["ratio"] is None:
            speed_text = f"step {speed['steps']}"
        else:
            speed_text = f"{speed['ratio']:.2f} ({speed['steps']} vs {speed['reference_steps']})"
        if best is None:
            best_rows.append([m["label"], "—", "all diverged", "—", "—", "—", "—"])
        else:
            n = best["n_seeds"]
            extra = (_fmt(best["final_perplexity_mean"], best["final_perplexity_std"], 1.0, 2, n)
                     if "final_perplexity_mean" in best else _fmt(best["peak_mean"], best["peak_std"], scale, digits, n))
            best_rows.append([
                m["label"], f"{m['best_lr']:g}", _fmt(best["final_mean"], best["final_std"], scale, digits, n), extra,
                speed_text, timing_text, str(best["n_seeds"]),
            ])
        cells = []
        for lr_key, value in m["sweep"]["final_mean_by_lr"].items():
            # A run that raised is not a run that diverged: say which (the error is in results.json).
            entry = m["lrs"].get(lr_key, {})
            failed = len(entry.get("errors") or {})
            cells.append(f"{lr_key}: " + (f"{value * scale:.{digits}f}" if math.isfinite(value)
                                          else f"error ({failed} of {entry.get('n_seeds')} seeds)" if failed
                                          else "div."))
        spread = m["sweep"]["spread"]
        sweep_rows.append([m["label"], "; ".join(cells),
                           f"{m['sweep']['worst_final_mean'] * scale:.{digits}f}"
                           if math.isfinite(m["sweep"]["worst_final_mean"]) else "diverged",
                           f"{spread * scale:.{digits}f}" if math.isfinite(spread) else "—"])
    second = "final perplexity" if metric == "eval_loss" else f"peak over evals{unit}"
    name = {"sst2": "final dev accuracy", "vision": "final test accuracy"}.get(suite.name, "final validation loss")
    lines = [
        f"### {suite.title}: best learning rate per method\n",
        markdown_table(["method", "best lr", f"{name}{unit}", second, "speed to target", "s/step", "seeds"],
                       best_rows),
        "\ns/step: median over steps of one run alone" + (
            "; \\* measured inside the parallel sweep (processes competing for the device)" if contended else "")
        + ". Mean ± sample std over seeds (no ± with one seed). Speed to target: AdamW's evaluation steps to reach "
        "its own best mean final metric divided by the method's (its best lr's seed-mean curve; > 1 is sooner), "
        "on the suite's evaluation grid, so coarse; \"not reached\": the curve never gets there.\n",
        f"\n### {suite.title}: learning-rate sweep (mean final metric per lr; robustness)\n",
        markdown_table(["method", f"final {'accuracy' if accuracy else 'val. loss'} by lr{unit}",
                        f"worst lr{unit}", f"spread best-worst{unit}"], sweep_rows, align="llrr"),
    ]
    return "\n".join(lines)


def plot_suite(suite: SuiteSpec, methods: Mapping[str, Any], metric: str, path: Path,
               timings: Mapping[str, Any]) -> Path:
    """Three panels: best-lr curves (mean ± std over seeds) against steps and against seconds; final metric vs lr."""
    import matplotlib

    matplotlib.use("Agg")  # headless machines
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ylabel = {"accuracy": "accuracy", "eval_loss": "validation loss"}.get(metric, metric)
    for key, m in methods.items():
        if m["best_lr"] is None:
            continue
        entry = m["lrs"][_lr_key(m["best_lr"])]
        curves = [r["curve"] for r in entry["seeds"].values() if "curve" in r]
        length = min(len(c) for c in curves)
        steps = np.array([row["step"] for row in curves[0][:length]])
        values = np.array([[row["metric"] for row in c[:length]] for c in curves], dtype=float)
        seconds = np.array([[row["seconds"] for row in c[:length]] for c in curves], dtype=float).mean(0)
        timing = timings.get(key, {}).get("median_step_seconds")
        x_time = steps * timing if timing else seconds
        mean, std = values.mean(0), values.std(0)
        label = f"{m['label']} (lr {m['best_lr']:g})"
        (line,) = axes[0].plot(steps, mean, marker="o", markersize=3, label=label)
        axes[0].fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        axes[1].plot(x_time, mean, marker="o", markersize=3, color=line.get_color(), label=label)
        axes[1].fill_between(x_time, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        lrs = [e["lr"] for e in m["lrs"].values()]
        finals = [e["final_mean"] for e in m["lrs"].values()]
        errs = [e["final_std"] for e in m["lrs"].values()]
        lr_scale = 1.0 / m["best_lr"]  # lr relative to the method's best: grids live on different scales
        axes[2].errorbar(np.array(lrs) * lr_scale, finals, yerr=errs, marker="o", capsize=3, color=line.get_color(),
                         label=m["label"])
    any_timing = any(t.get("median_step_seconds") for t in timings.values())
    axes[0].set(xlabel="step", ylabel=ylabel, title="best lr per method, mean ± std over seeds")
    axes[1].set(xlabel="seconds (steps x s/step measured alone)" if any_timing else "training seconds (measured)",
                ylabel=ylabel, title="against wall-clock")
    axes[2].set(xscale="log", xlabel="lr / best lr of the method", ylabel=f"final {ylabel}",
                title="lr sweep (robustness)")
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks collide on short grids
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[2].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(suite.title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _copy_best(methods: Mapping[str, Any], runs_dir: Path, higher: bool) -> Dict[str, str]:
    """Copy the best seed's run directory at each method's best lr to ``<runs_dir>/best/<method>``."""
    copied = {}
    for key, m in methods.items():
        if m["best_lr"] is None:
            continue
        # Runs resumed from another machine have no run directory here.
        seeds = [r for r in m["lrs"][_lr_key(m["best_lr"])]["seeds"].values()
                 if "error" not in r and Path(r["run_dir"]).is_dir()]
        if not seeds:
            continue
        pick = max if higher else min
        best = pick(seeds, key=lambda r: r["final"] if math.isfinite(r["final"]) else (-math.inf if higher else
                                                                                        math.inf))
        target = runs_dir / "best" / key
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(best["run_dir"], target)
        copied[key] = str(target)
    return copied


def _pack(folders: Mapping[str, str], path: Path) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for key, folder in folders.items():
            archive.add(folder, arcname=key)


def load_previous(paths: Sequence[str], methods: Sequence[MethodSpec]) -> Dict[Tuple[str, str, int], Dict[str, Any]]:
    """Records of earlier results.json files whose method has the same optimizer and extra hyperparameters now
    and whose lr is in the current grid; runs that failed are not kept (they are run again)."""
    wanted = {m.key: m for m in methods}
    kept: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
    for path in paths:
        payload = json.loads(Path(path).read_text())
        for key, m in payload["methods"].items():
            method = wanted.get(key)
            if (method is None or m["optimizer"] != method.optimizer or not method.same_hp(m["hp"])
                    or m.get("config", {}) != dict(method.config)):
                continue
            grid = {_lr_key(lr) for lr in method.lrs}
            for lr_key, entry in m["lrs"].items():
                if lr_key not in grid:
                    continue
                for seed, record in entry["seeds"].items():
                    if "error" not in record:
                        kept[(key, lr_key, int(seed))] = record
    return kept


def merge_results(suite: SuiteSpec, paths: Sequence[str]) -> Dict[str, Any]:
    """One results payload from the runs of several ``results.json`` files of ``suite`` (a sweep spread over
    several jobs): every successful (method, lr, seed) record is kept (the later file wins a duplicate), grouped
    by the suite's methods with their grids extended to every lr that ran."""
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    ran: Dict[str, set] = {}
    for payload in payloads:
        for key, m in payload["methods"].items():
            ran.setdefault(key, set()).update(entry["lr"] for entry in m["lrs"].values())
    methods = [replace(m, lrs=tuple(sorted(set(m.lrs) | ran.get(m.key, set())))) for m in suite.methods]
    records = load_previous(list(paths), methods)
    last = payloads[-1]
    merged = {k: v for k, v in last.items() if k not in ("methods", "command", "runs_done", "skipped_runs",
                                                              "sweep_wall_seconds", "resumed_from")}
    merged["commands"] = [p["command"] for p in payloads]
    merged["sweep_wall_seconds"] = sum(p.get("sweep_wall_seconds") or 0 for p in payloads)
    merged["merged_from"] = [str(p) for p in paths]
    # A payload whose runs all ended early knows only the device it was asked for ("cuda"); one that ran names it.
    merged["device"] = next((p["device"] for p in reversed(payloads) if p.get("runs_done")), last.get("device"))
    merged["notes"] = sorted({n for p in payloads for n in p.get("notes", [])})
    merged["runs_done"] = len(records)
    merged["skipped_runs"] = []
    merged["methods"] = aggregate(suite, [m for m in methods if m.key in ran], records)
    for key, m in merged["methods"].items():
        m["timing"] = next((p["methods"][key].get("timing") for p in payloads if p["methods"].get(key, {}).get("timing")),
                           None)
    return merged


def _parse_lr_overrides(items: Sequence[str]) -> Dict[str, Tuple[float, ...]]:
    overrides = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--lrs expects METHOD=lr1,lr2,... (e.g. adamw=1e-3,3e-3), got {item!r}")
        try:
            overrides[key] = tuple(float(v) for v in values.split(","))
        except ValueError as error:
            raise ValueError(f"--lrs {item}: learning rates must be numbers") from error
        if any(not (math.isfinite(v) and v > 0) for v in overrides[key]):
            raise ValueError(f"--lrs {item}: learning rates must be > 0")
    return overrides


def build_parser() -> argparse.ArgumentParser:
    from .finetune import LOKO_JACOBIAN_MODES

    parser = argparse.ArgumentParser(prog="loraopt bench quality", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the suite's methods (keys)")
    parser.add_argument("--lrs", nargs="+", default=[], metavar="METHOD=LR,LR",
                        help="replace a method's lr grid, e.g. adamw=1e-3,3e-3")
    parser.add_argument("--hp", nargs="+", default=[], metavar="METHOD:KEY=VALUE",
                        help="an extra optimizer keyword for one method, e.g. psi-lora:compile=False")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-limit", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--block-size", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--train-limit", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--model", default=None, help="override the suite's model (e.g. a GPU bundle folder)")
    parser.add_argument("--data-dir", default=None, help="data folder (a GPU bundle's data/)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--loko-jacobian", choices=LOKO_JACOBIAN_MODES, default="per-sample",
                        help="per-sample (default here: cheap per process, so many workers share a GPU well)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--time-budget", type=float, default=0, help="seconds after which no new run starts "
                        "(0: none); runs left out are listed in results.json")
    parser.add_argument("--deadline", type=float, default=0, help="seconds after which runs still going are "
                        "stopped and the results written (0: none)")
    parser.add_argument("--timing-reserve", type=float, default=60, help="the timing pass (run first) stops this "
                        "many seconds before --deadline")
    parser.add_argument("--resume", nargs="+", default=[], help="results.json files of earlier runs of this suite: "
                        "their runs with the same method settings are kept and not run again")
    parser.add_argument("--method-seeds", nargs="+", default=[], metavar="METHOD=S,S",
                        help="run a method on these seeds only, e.g. loko=0")
    parser.add_argument("--merge", nargs="+", default=None, metavar="RESULTS_JSON",
                        help="combine the runs of several results.json files of this suite into --out (no runs)")
    parser.add_argument("--render", default=None, help="only redraw the plot and tables from this results.json")
    parser.add_argument("--timing-steps", type=int, default=0, help="before the sweep, time each method alone for "
                        "N steps (clean seconds per step for the wall-clock comparison)")
    parser.add_argument("--timing-methods", nargs="+", default=None, help="time only these methods")
    parser.add_argument("--threads-timing", type=int, default=None, help="threads for the timing pass "
                        "(default: all cores)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/<suite>")
    parser.add_argument("--runs-dir", default=None, help="default runs/quality/<suite> (git-ignored)")
    parser.add_argument("--pack-best", default=None, help="also write the best run directories to this .tar.gz")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 steps, 1 seed, 2 lrs per method")
    parser.add_argument("--note", action="append", default=[], help="a line recorded in results.json")
    return parser


def _payload(suite: SuiteSpec, args: argparse.Namespace, protocol: Mapping[str, Any], seeds: Sequence[int],
             methods: Sequence[MethodSpec], records: Mapping[Tuple[str, str, int], Dict[str, Any]],
             timings: Mapping[str, Any], skipped: Sequence[str], command: str, wall: float) -> Dict[str, Any]:
    aggregated = aggregate(suite, methods, records)
    previous_timings = getattr(args, "previous_timings", {})
    for key, m in aggregated.items():
        m["timing"] = timings.get(key) or previous_timings.get(key)
    metric = next((r["metric"] for r in records.values() if "metric" in r), "accuracy")
    device = next((r["device"] for r in records.values() if "device" in r), args.device)
    return {
        "suite": suite.name,
        "title": suite.title,
        "model": args.model or suite.model,
        "task": suite.task,
        "metric": metric,
        "higher_is_better": metric != "eval_loss",
        "protocol": {**protocol, "rank": args.rank, "seeds": list(seeds), "loko_jacobian": args.loko_jacobian},
        "device": device,
        "workers": args.workers,
        "threads_per_worker": args.threads,
        "command": command,
        "sweep_wall_seconds": round(wall, 1),
        "runs_done": len(records),
        "skipped_runs": list(skipped),
        "notes": list(suite.notes) + list(args.note),
        "resumed_from": [str(p) for p in getattr(args, "resume", [])],
        "methods": aggregated,
    }


def render(payload: Mapping[str, Any], out: Path) -> str:
    """``<suite>.png`` and ``summary.md`` from a results payload (also usable on a results.json copied back)."""
    suite = SUITES[payload["suite"]]
    methods = payload["methods"]
    timings = {k: m.get("timing") or {} for k, m in methods.items()}
    plot_suite(suite, methods, payload["metric"], out / f"{suite.name}.png", timings)
    tables = summary_tables(suite, methods, timings, payload["metric"])
    commands = payload.get("commands") or [payload["command"]]
    shown = "; ".join(f"`{c}`" for c in commands)
    header = (f"Device: {payload['device']}; {payload['workers']} worker process(es). "
              f"Command{'s (runs merged with --merge)' if len(commands) > 1 else ''}: {shown}. "
              f"Sweep wall time {payload['sweep_wall_seconds']:.0f} s; {payload['runs_done']} runs"
              + (f", {len(payload['skipped_runs'])} not run (time budget)" if payload.get("skipped_runs") else "")
              + ".\n\n")
    (out / "summary.md").write_text(header + tables)
    return tables


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    suite = SUITES[args.suite]
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        out = Path(args.out) if args.out else Path(args.render).parent
        print(render(payload, out))
        return 0
    if args.merge:
        if not args.out:
            print("loraopt bench quality: error: --merge needs --out", file=sys.stderr)
            return 2
        payload = merge_results(suite, args.merge)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(render(payload, out))
        return 0
    try:
        overrides = _parse_lr_overrides(args.lrs)
        methods = list(suite.methods)
        if args.methods:
            known = {m.key: m for m in suite.methods}
            unknown = [k for k in args.methods if k not in known]
            if unknown:
                raise ValueError(f"suite {suite.name} has no method {unknown}; choose from {', '.join(known)}")
            methods = [known[k] for k in args.methods]
        unknown = sorted(set(overrides) - {m.key for m in methods})
        if unknown:
            raise ValueError(f"--lrs names methods not in this run: {unknown}")
        methods = [replace(m, lrs=overrides.get(m.key, m.lrs)) for m in methods]
        methods = _with_hp_overrides(methods, args.hp)
        protocol = dict(suite.protocol)
        for name in ("steps", "batch_size", "eval_every", "eval_limit", "max_length", "block_size", "image_size",
                     "train_limit"):
            if getattr(args, name) is not None:
                protocol[name] = getattr(args, name)
        seeds = tuple(args.seeds) if args.seeds is not None else suite.seeds
        if args.quick:
            protocol.update(steps=QUICK["steps"], eval_every=QUICK["eval_every"], eval_limit=QUICK["eval_limit"])
            seeds = QUICK["seeds"] if args.seeds is None else seeds
            methods = [replace(m, lrs=m.lrs[1:4:2]) if m.key not in overrides else m for m in methods]
        method_seeds: Dict[str, Tuple[int, ...]] = {}
        for item in args.method_seeds:
            key, sep, values = item.partition("=")
            if not sep or key not in {m.key for m in methods}:
                raise ValueError(f"--method-seeds expects METHOD=S,S with a method of this run, got {item!r}")
            method_seeds[key] = tuple(int(v) for v in values.split(","))
        args.method_seeds = method_seeds
        args.previous = load_previous(args.resume, methods)
        args.previous_timings = {}
        for path in args.resume:
            for key, m in json.loads(Path(path).read_text())["methods"].items():
                if m.get("timing") and key not in args.previous_timings:
                    args.previous_timings[key] = m["timing"]
        for key in ("max_length", "block_size", "image_size"):  # only the suite's own size applies to its model kind
            if key not in suite.protocol and key in protocol:
                raise ValueError(f"--{key.replace('_', '-')} does not apply to the {suite.name} suite")
    except ValueError as error:
        print(f"loraopt bench quality: error: {error}", file=sys.stderr)
        return 2
    args.out = Path(args.out or project_root() / "benchmarks" / "results" / suite.name)
    args.runs_dir = Path(args.runs_dir or project_root() / "runs" / "quality" / suite.name)
    args.threads_timing = args.threads_timing or os.cpu_count() or 1
    args.out.mkdir(parents=True, exist_ok=True)
    command = "loraopt bench quality " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()

    def write_partial(records):
        payload = _payload(suite, args, protocol, seeds, methods, records, timings, [], command,
                           time.perf_counter() - started)
        (args.out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")

    timings: Dict[str, Any] = {}
    if args.timing_steps:
        # First, so a sweep cut short by the deadline still has clean step times (the lr does not change them).
        stop_at = started + args.deadline - args.timing_reserve if args.deadline else None
        timed = [m for m in methods if not args.timing_methods or m.key in args.timing_methods]
        timings = time_methods(suite, protocol, timed, {}, args, stop_at=stop_at)
    spent = time.perf_counter() - started
    if args.time_budget:
        args.time_budget = max(1.0, args.time_budget - spent)
    if args.deadline:
        args.deadline = max(1.0, args.deadline - spent)
    records, skipped = run_suite(suite, protocol, methods, seeds, args, on_record=write_partial)
    sweep_seconds = time.perf_counter() - started - spent
    payload = _payload(suite, args, protocol, seeds, methods, records, timings, skipped, command, sweep_seconds)
    (args.out / "results.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")
    if payload["methods"]:
        print(render(payload, args.out))
        copied = _copy_best(payload["methods"], args.runs_dir, payload["higher_is_better"])
        if args.pack_best and copied:
            _pack(copied, Path(args.pack_best))
    if skipped:
        print(f"[{suite.name}] {len(skipped)} runs not run (time budget / deadline; listed in results.json)")
    print(f"[{suite.name}] done in {time.perf_counter() - started:.0f} s; results in {args.out}")
    return 0
