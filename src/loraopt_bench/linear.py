"""``loraopt bench linear``: the synthetic linear task of the PSI-LoRA paper (``docs/specs/psi-lora.md`` §7.1).

A rank-8 LoRA adapter on a zeroed, frozen ``nn.Linear(200, 600, bias=False)`` fits ``W★ᵀ`` with
``W★ = randn(200, 600)``; the inputs are the rows of ``I_200`` and the loss is ``Σ ‖ŷ − y‖²``.  The rank-8 optimum
leaves ``f★ = Σ_{i>8} σ_i(W★)²``, so the metric is the full-set excess loss ``loss − f★`` (0 at the optimum).
Two modes: *deterministic* (full batch, no momentum) and *stochastic* (batch 64, momentum 0.75), each with the
spec's learning rates.  SVDLoRA is the oracle ``Π_8(W − ηG)``; PSI-LoRA ×K should approach it as K grows.

    loraopt bench linear                      # full run: both modes, 5 seeds, 100 epochs
    loraopt bench linear --quick              # a CI-sized smoke run
    loraopt bench linear --modes deterministic --methods svdlora psi-x1 psi-x8 --seeds 2

Outputs (``--out``, default ``benchmarks/results/linear``): ``results.json`` (``results[mode][method]`` with
``epoch``, ``excess_loss_mean``, ``excess_loss_std``, ``lr``, ``seconds`` and per-seed detail), one log-scale PNG
per mode, and ``summary.md``.

Scaled PSI-LoRA has no learning rate for this task in the spec.  Unless ``--scaled-lr`` is given, each mode
selects its (lr, β1, internal clipping) from a small grid on held-out seeds (``TUNING_SEEDS``, never the reported
ones) by its final level (mean log10 excess loss over the last tenth of the epochs); the grid and the choice are
recorded in the results.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from loraopt.optim.registry import create_optimizer
from .common import drive, jsonable, mean_std, torch_threads
from .report import CurveBand, format_number, markdown_table, plot_curve_bands

__all__ = [
    "D_IN",
    "D_OUT",
    "RANK",
    "MODES",
    "PROTOCOLS",
    "DEFAULT_METHODS",
    "TUNING_SEEDS",
    "ModeProtocol",
    "ScaledSetting",
    "LinearTask",
    "make_task",
    "build_lora_model",
    "method_config",
    "train_seed",
    "tune_scaled_psi",
    "run_linear",
    "write_outputs",
    "main",
]

D_IN, D_OUT, RANK = 200, 600, 8
MODES = ("deterministic", "stochastic")
DEFAULT_EPOCHS = 100
DEFAULT_SEEDS = 5
# Scaled PSI-LoRA is tuned on seeds that are never reported, so its curves are not selected on their own test data.
TUNING_SEEDS = (100, 101)
PSI_LMBD = 1e-3  # "small tasks" in spec §6 and the reference linear config
RPLORA_REG = 1e-3  # the reference's preconditioned-LoRA baseline uses the same fixed lmbd as its damping here
ADAMW = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)


@dataclass(frozen=True)
class ModeProtocol:
    """One mode of spec §7.1: batch size, momentum μ, whether batches are shuffled, and lr per method family."""

    batch_size: int
    momentum: float
    shuffle: bool
    lrs: Mapping[str, float]


PROTOCOLS: Dict[str, ModeProtocol] = {
    # Full batch; with η = 0.5 the full step lands exactly on W★ᵀ.  Row order is irrelevant for a full batch.
    "deterministic": ModeProtocol(
        batch_size=D_IN, momentum=0.0, shuffle=False,
        lrs={"svdlora": 0.5, "lora-sgd": 0.01, "lora-adamw": 0.5, "rplora-sgd": 0.48, "rplora-adamw": 0.5, "psi": 0.5},
    ),
    # Batches of 64/64/64/8 rows per epoch (shuffle=True, drop_last=False).
    "stochastic": ModeProtocol(
        batch_size=64, momentum=0.75, shuffle=True,
        lrs={
            "svdlora": 0.1, "lora-sgd": 0.002, "lora-adamw": 0.05, "rplora-sgd": 0.1, "rplora-adamw": 0.05, "psi": 0.1
        },
    ),
}

_BASELINES = ("svdlora", "lora-sgd", "lora-adamw", "rplora-sgd", "rplora-adamw")
DEFAULT_METHODS: Dict[str, Tuple[str, ...]] = {
    # The spec runs K up to 128 in the deterministic mode only.
    "deterministic": _BASELINES + ("psi-x1", "psi-x2", "psi-x8", "psi-x32", "psi-x128", "scaled-psi"),
    "stochastic": _BASELINES + ("psi-x1", "psi-x2", "psi-x8", "scaled-psi"),
}

_LABELS = {
    "svdlora": "SVDLoRA",
    "lora-sgd": "LoRA-SGD",
    "lora-adamw": "LoRA-AdamW",
    "rplora-sgd": "RPLoRA-SGD",
    "rplora-adamw": "RPLoRA-AdamW",
    "scaled-psi": "Scaled PSI-LoRA",
}


@dataclass(frozen=True)
class ScaledSetting:
    """What the Scaled PSI-LoRA sweep chooses; everything else stays at the library defaults (K = 0, β2 = 0.99,
    δ = 1e-5, p = 0.5, K-FAC metric), with ``loss_reduction="sum"`` because this task's loss is a sum."""

    lr: float
    beta1: float = 0.9
    max_grad_norm: float = 1.0


# Used by --quick (no sweep): what the full sweep picks in the deterministic mode.
QUICK_SCALED = ScaledSetting(lr=0.3, beta1=0.0, max_grad_norm=0.0)
SCALED_LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
# The paper's metric (the library's defaults are the scale-free metric, chosen on the realistic suites).
SCALED_PAPER_SETTINGS = dict(metric_scale="absolute", bias_correction=False, damping=1e-5, momentum_prox=None)
SCALED_BETA1_GRID = (0.9, 0.0)  # library default, and no momentum (the deterministic protocol's μ = 0)
SCALED_CLIP_GRID = (1.0, 0.0)  # library default internal clipping, and none (no other method here clips)


# ------------------------------------------------------------------------------------------------- task and model


@dataclass
class LinearTask:
    """Data of one seed: ``inputs = I_200``, ``targets = W★`` (row i is the target of input e_i), ``f_star``."""

    seed: int
    inputs: torch.Tensor  # (200, 200)
    targets: torch.Tensor  # (200, 600)
    f_star: float
    singular_values: torch.Tensor  # σ(W★), descending


def make_task(seed: int, dtype: torch.dtype = torch.float64) -> LinearTask:
    """``torch.manual_seed(seed)`` then ``W★ = torch.randn(200, 600)`` (drawn in fp32 as in the spec, then cast)."""
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        w_star = torch.randn(D_IN, D_OUT)
    w_star = w_star.to(dtype)
    sigma = torch.linalg.svdvals(w_star.double())
    f_star = float(sigma[RANK:].square().sum())
    return LinearTask(seed, torch.eye(D_IN, dtype=dtype), w_star, f_star, sigma)


class LinearRegressor(nn.Module):
    """``nn.Linear(200, 600, bias=False)`` under a name PEFT can target."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def build_lora_model(seed: int, dtype: torch.dtype = torch.float64) -> nn.Module:
    """The PEFT model of spec §7.1 for one seed.

    ``torch.manual_seed(seed)`` then a default-initialised ``nn.Linear(200, 600, bias=False)`` gives ``W_init``;
    with ``U, Σ, Vᵀ = svd(W_init)`` truncated to 8, ``A = Σ^½ Vᵀ`` and ``B = U Σ^½``.  The base weight is zeroed
    and frozen and ``lora_alpha = r`` so ``s = 1`` and ``ΔW = B A`` is the whole weight.
    """
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(D_IN, D_OUT, bias=False)
        w_init = linear.weight.detach().to(torch.float64)
        u, sigma, vh = torch.linalg.svd(w_init, full_matrices=False)
        root = sigma[:RANK].sqrt()
        factor_b = u[:, :RANK] * root
        factor_a = root.unsqueeze(-1) * vh[:RANK]
        with torch.no_grad():
            linear.weight.zero_()
        # PEFT initialises its own factors from the global RNG; fork_rng keeps that draw local as well.
        model = get_peft_model(LinearRegressor(linear), LoraConfig(target_modules=["linear"], r=RANK, lora_alpha=RANK))
    model = model.to(dtype)
    layer = model.base_model.model.linear
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(factor_a)
        layer.lora_B["default"].weight.copy_(factor_b)
    return model


# ------------------------------------------------------------------------------------------------- methods


def method_label(method: str) -> str:
    if method in _LABELS:
        return _LABELS[method]
    iters, rank_mult = _parse_psi(method)
    label = f"PSI-LoRA ×{iters}"
    return label if rank_mult == 1 else f"{label} (r_m = {rank_mult:g}r)"


def _parse_psi(method: str) -> Tuple[int, float]:
    """``psi-xK`` or ``psi-xK-rmM`` (momentum rank M·r, the spec's rank ablation) -> ``(K, M)``."""
    parts = method.split("-")
    try:
        if parts[0] != "psi" or not parts[1].startswith("x") or len(parts) > 3:
            raise ValueError
        iters = int(parts[1][1:])
        rank_mult = float(parts[2][2:]) if len(parts) == 3 and parts[2].startswith("rm") else 1.0
        if len(parts) == 3 and not parts[2].startswith("rm"):
            raise ValueError
    except (ValueError, IndexError):
        raise ValueError(
            f"unknown method {method!r}: choose from {', '.join(_LABELS)}, psi-xK (K inner rounds) or psi-xK-rmM "
            "(momentum rank M·r)"
        ) from None
    return iters, rank_mult


def method_config(
    method: str, mode: str, *, dtype: torch.dtype = torch.float64, scaled: Optional[ScaledSetting] = None, seed: int = 0
) -> Tuple[str, Dict[str, Any]]:
    """``(registry name, hyperparameters)`` of ``method`` under ``mode``'s protocol."""
    protocol = PROTOCOLS[mode]
    mu = protocol.momentum
    lrs = protocol.lrs
    if method == "svdlora":
        # The oracle's dense step and SVD run in the task dtype, so in fp64 it lands on Π_8 to machine precision.
        return "svdlora", dict(lr=lrs["svdlora"], momentum=mu, compute_dtype=dtype)
    if method == "lora-sgd":
        return "sgd", dict(lr=lrs["lora-sgd"], momentum=mu)
    if method == "lora-adamw":
        return "adamw", dict(lr=lrs["lora-adamw"], **ADAMW)
    if method == "rplora-sgd":
        return "riemannian-sgd", dict(lr=lrs["rplora-sgd"], reg=RPLORA_REG, momentum=mu)
    if method == "rplora-adamw":
        adamw = dict(ADAMW)
        adamw.pop("eps")  # the factory's default eps is already 1e-8
        return "riemannian-adamw", dict(lr=lrs["rplora-adamw"], reg=RPLORA_REG, **adamw)
    if method == "scaled-psi":
        setting = scaled or QUICK_SCALED
        return "scaled-psi-lora", dict(
            lr=setting.lr, betas=(setting.beta1, 0.99), max_grad_norm=setting.max_grad_norm, loss_reduction="sum",
            seed=seed, normalize=None, **SCALED_PAPER_SETTINGS,  # the paper's plain step (the factory normalises)
        )
    iters, rank_mult = _parse_psi(method)
    return "psi-lora", dict(
        lr=lrs["psi"], inner_iters=iters, lmbd=PSI_LMBD, momentum=mu, rank_mult=rank_mult, seed=seed,
        max_grad_norm=0.0, normalize=None,  # the paper's plain step (the factory normalises by default)
    )


# ------------------------------------------------------------------------------------------------- training


def _sum_of_squares(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (predictions - targets).square().sum()


def _excess_loss(model: nn.Module, task: LinearTask) -> float:
    with torch.no_grad():  # the optimizers' capture hooks record nothing without grad
        loss = (model(task.inputs) - task.targets).square().sum()
    return float(loss) - task.f_star


def train_seed(
    method: str,
    mode: str,
    task: LinearTask,
    epochs: int,
    *,
    dtype: torch.dtype = torch.float64,
    scaled: Optional[ScaledSetting] = None,
) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Train one (method, mode, seed) for ``epochs`` epochs.  Returns the excess loss at epochs 0..epochs (length
    ``epochs + 1``) and ``{"optimizer", "hyperparameters"[, "momentum_factor_sv"]}``."""
    protocol = PROTOCOLS[mode]
    model = build_lora_model(task.seed, dtype)
    name, hyperparameters = method_config(method, mode, dtype=dtype, scaled=scaled, seed=task.seed)
    optimizer = create_optimizer(name, model, **hyperparameters)
    # One generator per seed, so every method sees the same batch order (a paired comparison).
    shuffle = torch.Generator().manual_seed(task.seed)
    curve = [_excess_loss(model, task)]
    for _ in range(epochs):
        order = torch.randperm(D_IN, generator=shuffle) if protocol.shuffle else torch.arange(D_IN)
        for rows in order.split(protocol.batch_size):
            drive(optimizer, model, (task.inputs[rows], task.targets[rows]), _sum_of_squares)
        curve.append(_excess_loss(model, task))
    info: Dict[str, Any] = {"optimizer": name, "hyperparameters": hyperparameters}
    momentum = _momentum_factor_singular_values(model, optimizer)
    if momentum is not None:
        info["momentum_factor_sv"] = momentum
    return np.asarray(curve, dtype=np.float64), info


def _momentum_factor_singular_values(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> Optional[Dict[str, List[float]]]:
    """``{"M_A": [σ_max, σ_min], "M_B": [σ_max, σ_min]}`` of a low-rank momentum (PSI / Scaled PSI-LoRA), else
    ``None``.  LoRSum leaves the split of M = M_B M_A between its factors free; these values show whether the
    optimizer's rebalancing keeps the two factors at comparable scales (see summary.md)."""
    layer = model.base_model.model.linear
    state_a = optimizer.state.get(layer.lora_A["default"].weight, {})
    state_b = optimizer.state.get(layer.lora_B["default"].weight, {})
    if "momentum_A" not in state_a or "momentum_B" not in state_b:
        return None
    out = {}
    for key, matrix in (("M_A", state_a["momentum_A"]), ("M_B", state_b["momentum_B"])):
        sigma = torch.linalg.svdvals(matrix.double())
        out[key] = [float(sigma[0]), float(sigma[-1])]
    return out


def _final_level_score(curve: np.ndarray, floor: float) -> float:
    """Mean log10 excess loss over the last tenth of the epochs (the final level, robust to one noisy epoch);
    inf if the run produced a non-finite loss anywhere."""
    if not np.all(np.isfinite(curve)):
        return math.inf
    window = max(1, (len(curve) - 1) // 10)
    return float(np.mean(np.log10(np.maximum(curve[-window:], floor))))


def _floor(tasks: Iterable[LinearTask], dtype: torch.dtype) -> float:
    """The resolution of ``loss − f★``: one ulp-scale error of a loss of size f★ in ``dtype``."""
    return max(t.f_star for t in tasks) * torch.finfo(dtype).eps


def tune_scaled_psi(
    mode: str,
    *,
    epochs: int,
    seeds: Sequence[int] = TUNING_SEEDS,
    lrs: Sequence[float] = SCALED_LR_GRID,
    beta1s: Sequence[float] = SCALED_BETA1_GRID,
    clips: Sequence[float] = SCALED_CLIP_GRID,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
) -> Dict[str, Any]:
    """Grid search of Scaled PSI-LoRA's (lr, β1, max_grad_norm) on ``seeds``: the lowest final level (mean log10
    excess loss over the last tenth of the epochs, averaged over seeds) wins.  Returns the grid with scores and
    the chosen setting."""
    from tqdm.auto import tqdm

    tasks = [make_task(s, dtype) for s in seeds]
    floor = _floor(tasks, dtype)
    grid = [ScaledSetting(lr, b1, clip) for clip in clips for b1 in beta1s for lr in lrs]
    rows = []
    bar = tqdm(total=len(grid) * len(tasks), desc=f"tune scaled-psi ({mode})", unit="run", disable=not progress)
    for setting in grid:
        curves = []
        for task in tasks:
            curve, _ = train_seed("scaled-psi", mode, task, epochs, dtype=dtype, scaled=setting)
            curves.append(curve)
            bar.update()
        curves = np.stack(curves)
        score = float(np.mean([_final_level_score(c, floor) for c in curves]))
        final = float(curves[:, -1].mean())
        rows.append(dict(asdict(setting), score=score, final_excess_mean=final))
    bar.close()
    best = min(rows, key=lambda r: r["score"])
    chosen = ScaledSetting(best["lr"], best["beta1"], best["max_grad_norm"])
    return {
        "seeds": list(seeds),
        "epochs": epochs,
        "criterion": "mean over the last tenth of the epochs and over the tuning seeds of "
        "log10(max(excess loss, floor)); a non-finite loss anywhere scores inf",
        "grid": rows,
        "chosen": asdict(chosen),
        "chosen_at_grid_edge": chosen.lr in (min(lrs), max(lrs)),
    }


def run_linear(
    modes: Sequence[str] = MODES,
    methods: Optional[Sequence[str]] = None,
    seeds: Sequence[int] = tuple(range(DEFAULT_SEEDS)),
    epochs: int = DEFAULT_EPOCHS,
    *,
    dtype: torch.dtype = torch.float64,
    scaled: Optional[Mapping[str, ScaledSetting]] = None,
    tune_scaled: bool = True,
    threads: Optional[int] = 1,
    progress: bool = True,
) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Run the task and return ``results[mode][method]`` (no files written).

    Each record: ``epoch`` (0..epochs), ``excess_loss_mean`` / ``excess_loss_std`` over seeds, ``lr``,
    ``seconds`` (wall time of all its seeds), plus ``label``, ``optimizer``, ``hyperparameters``, ``seeds``,
    ``f_star`` and ``excess_loss_per_seed``; runs with a low-rank momentum add ``momentum_factor_sv`` (per seed,
    the largest and smallest singular values of M_A and M_B at the end); the Scaled PSI-LoRA record also carries
    its ``tuning`` grid.

    Args:
        methods: method ids (see ``DEFAULT_METHODS``; ``psi-xK`` for any K); default: the per-mode defaults.
        scaled: a fixed Scaled PSI-LoRA setting per mode; modes without one are tuned when ``tune_scaled``,
            else use ``QUICK_SCALED``.
        dtype: the model, data and loss dtype.  float64 resolves the excess loss down to ~f★·1e-16; float32
            cannot see below ~f★·1e-7, where SVDLoRA sits after one step.
        threads: torch intra-op threads during the run (``None``: leave as is).
    """
    from tqdm.auto import tqdm

    for mode in modes:
        if mode not in PROTOCOLS:
            raise ValueError(f"unknown mode {mode!r}: choose from {', '.join(PROTOCOLS)}")
    plan = {mode: list(methods) if methods else list(DEFAULT_METHODS[mode]) for mode in modes}
    for mode_methods in plan.values():
        for method in mode_methods:
            method_label(method)  # reject unknown names before any work
    results: Dict[str, Dict[str, Dict[str, Any]]] = {}
    with torch_threads(threads):
        tasks = [make_task(seed, dtype) for seed in seeds]
        settings: Dict[str, ScaledSetting] = dict(scaled or {})
        tuning: Dict[str, Dict[str, Any]] = {}
        for mode in modes:
            if "scaled-psi" in plan[mode] and mode not in settings:
                if tune_scaled:
                    tuning[mode] = tune_scaled_psi(mode, epochs=epochs, dtype=dtype, progress=progress)
                    settings[mode] = ScaledSetting(**tuning[mode]["chosen"])
                else:
                    settings[mode] = QUICK_SCALED
        total = sum(len(m) for m in plan.values()) * len(tasks)
        bar = tqdm(total=total, desc="bench linear", unit="run", disable=not progress)
        for mode in modes:
            results[mode] = {}
            for method in plan[mode]:
                curves, seconds, config, momentum_sv = [], 0.0, {}, []
                for task in tasks:
                    bar.set_postfix_str(f"{mode} {method} seed {task.seed}")
                    start = time.perf_counter()
                    curve, config = train_seed(method, mode, task, epochs, dtype=dtype, scaled=settings.get(mode))
                    seconds += time.perf_counter() - start
                    curves.append(curve)
                    if "momentum_factor_sv" in config:
                        momentum_sv.append(config["momentum_factor_sv"])
                    bar.update()
                curves = np.stack(curves)
                mean, std = mean_std(curves)
                record = {
                    "epoch": list(range(epochs + 1)),
                    "excess_loss_mean": mean.tolist(),
                    "excess_loss_std": std.tolist(),
                    "lr": config["hyperparameters"]["lr"],
                    "seconds": seconds,
                    "label": method_label(method),
                    "optimizer": config["optimizer"],
                    "hyperparameters": {k: v for k, v in config["hyperparameters"].items() if k != "seed"},
                    "seeds": [t.seed for t in tasks],
                    "f_star": [t.f_star for t in tasks],
                    "excess_loss_per_seed": curves.tolist(),
                }
                if momentum_sv:
                    record["momentum_factor_sv"] = momentum_sv
                if method == "scaled-psi" and mode in tuning:
                    record["tuning"] = tuning[mode]
                results[mode][method] = jsonable(record)
        bar.close()
    return results


# ------------------------------------------------------------------------------------------------- analysis and report


def _curves(record: Mapping[str, Any]) -> np.ndarray:
    return np.asarray([[np.nan if v is None else v for v in c] for c in record["excess_loss_per_seed"]], dtype=float)


def _checkpoints(epochs: int) -> List[int]:
    return sorted({e for e in (1, 10, epochs) if 1 <= e <= epochs})


def _psi_methods(records: Mapping[str, Any]) -> List[Tuple[int, str]]:
    """``[(K, method)]`` of the PSI-LoRA runs with momentum rank multiplier 1, by K."""
    out = []
    for method in records:
        if method.startswith("psi-"):
            iters, rank_mult = _parse_psi(method)
            if rank_mult == 1:
                out.append((iters, method))
    return sorted(out)


def compare_to_oracle(records: Mapping[str, Any], floor: float) -> Dict[str, Any]:
    """PSI-LoRA ×K against SVDLoRA in one mode: per K the largest gap over epochs 1.. (relative gap of the excess
    loss of the mean curves, and relative gap of the full loss ``excess + f★`` per seed), and per checkpoint
    epoch and pair of consecutive K the number of seeds where the larger K has the lower or equal excess loss."""
    oracle = records["svdlora"]
    oracle_curves = _curves(oracle)
    f_star = np.asarray(oracle["f_star"], dtype=float)[:, None]
    oracle_mean = np.nanmean(oracle_curves, axis=0)
    gaps = {}
    for iters, method in _psi_methods(records):
        curves = _curves(records[method])
        mean = np.nanmean(curves, axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            excess_gap = np.abs(mean[1:] - oracle_mean[1:]) / np.maximum(np.abs(oracle_mean[1:]), floor)
            loss_gap = (curves[:, 1:] - oracle_curves[:, 1:]) / (oracle_curves[:, 1:] + f_star)
        worst = int(np.nanargmax(np.nanmax(loss_gap, axis=0))) + 1
        gaps[method] = {
            "K": iters,
            "max_relative_excess_gap": float(np.nanmax(excess_gap)),
            "max_relative_loss_gap": float(np.nanmax(loss_gap)),
            "epoch_of_max_loss_gap": worst,
        }
    return {"gaps": gaps, "monotone": monotone_in_k(records)}


def monotone_in_k(records: Mapping[str, Any]) -> Dict[Tuple[int, int], Dict[int, Tuple[int, Optional[int], int]]]:
    """``{(K_small, K_large): {epoch: (lower, closer, seeds)}}`` for consecutive K of the PSI-LoRA runs at epochs
    1, 10 and the last: ``lower`` counts seeds where excess(K_large) <= excess(K_small) (the spec §11 check),
    ``closer`` seeds where |excess(K) − excess(SVDLoRA)| does not grow with K (``None`` without an SVDLoRA run).
    The two differ when PSI-LoRA ends below the oracle, as it can with momentum."""
    psi = _psi_methods(records)
    if not psi:
        return {}
    epochs = len(records[psi[0][1]]["epoch"]) - 1
    oracle = _curves(records["svdlora"]) if "svdlora" in records else None
    out: Dict[Tuple[int, int], Dict[int, Tuple[int, Optional[int], int]]] = {}
    for (k_small, small), (k_large, large) in zip(psi, psi[1:]):
        a, b = _curves(records[small]), _curves(records[large])
        by_epoch = {}
        for e in _checkpoints(epochs):
            lower = int(np.sum(b[:, e] <= a[:, e]))
            closer = None
            if oracle is not None:
                closer = int(np.sum(np.abs(b[:, e] - oracle[:, e]) <= np.abs(a[:, e] - oracle[:, e])))
            by_epoch[e] = (lower, closer, a.shape[0])
        out[(k_small, k_large)] = by_epoch
    return out


def _rounds_table(records: Mapping[str, Any]) -> Optional[str]:
    """Deterministic mode at η = 0.5: every step's full-step target is W★ᵀ itself, so PSI ×K after t epochs has
    run K·t rounds of warm-started subspace iteration on the same matrix.  Tabulate the mean excess loss by the
    total number of rounds to show the curves collapse onto one function of K·t."""
    psi = _psi_methods(records)
    if len(psi) < 2:
        return None
    epochs = len(records[psi[0][1]]["epoch"]) - 1
    totals = sorted({k * t for k, _ in psi for t in range(1, epochs + 1)})
    shared = [n for n in totals if sum(1 for k, _ in psi if n % k == 0 and 1 <= n // k <= epochs) >= 3]
    shared = [n for n in shared if n in (8, 16, 32, 64, 128, 256, 512, 800)] or shared[:6]
    if not shared:
        return None
    rows = []
    for n in shared:
        row = [str(n)]
        for k, method in psi:
            t = n // k
            ok = n % k == 0 and 1 <= t <= epochs
            row.append(f"{format_number(records[method]['excess_loss_mean'][t])} (t={t})" if ok else "—")
        rows.append(row)
    return markdown_table(["rounds K·t"] + [method_label(m) for _, m in psi], rows)


def _mode_table(records: Mapping[str, Any]) -> str:
    epochs = len(next(iter(records.values()))["epoch"]) - 1
    checkpoints = _checkpoints(epochs)
    headers = ["method", "optimizer", "lr", "epoch 0"] + [f"epoch {e}" for e in checkpoints]
    headers += ["final / f★", "lowest mean (epoch)", "seconds"]
    rows = []
    for method, rec in records.items():
        mean, std = rec["excess_loss_mean"], rec["excess_loss_std"]
        cells = [rec["label"], f"`{rec['optimizer']}`", f"{rec['lr']:g}", format_number(mean[0])]
        for e in checkpoints:
            cells.append(f"{format_number(mean[e])} ± {format_number(std[e], 2)}")
        final = _curves(rec)[:, -1] / np.asarray(rec["f_star"])
        mean_curve = np.asarray([np.nan if v is None else v for v in mean], dtype=float)
        best = int(np.argmin(np.where(np.isfinite(mean_curve), mean_curve, np.inf)))
        cells += [
            format_number(float(np.mean(final))), f"{format_number(mean_curve[best])} ({best})",
            f"{rec['seconds']:.1f}",
        ]
        rows.append(cells)
    return markdown_table(headers, rows, align="lll" + "r" * (len(headers) - 3))


def _tuning_table(tuning: Mapping[str, Any]) -> str:
    rows = []
    for row in sorted(tuning["grid"], key=lambda r: (r["max_grad_norm"], -r["beta1"], r["lr"])):
        chosen = all(row[k] == v for k, v in tuning["chosen"].items())
        rows.append([
            f"{row['lr']:g}", f"{row['beta1']:g}", f"{row['max_grad_norm']:g}",
            "diverged" if row["score"] in (None, math.inf) else f"{row['score']:.2f}",
            format_number(row["final_excess_mean"]), "**chosen**" if chosen else "",
        ])
    return markdown_table(["lr", "β1", "max_grad_norm", "score", "final excess (mean)", ""], rows, align="rrrrrl")


def summary_markdown(
    results: Mapping[str, Mapping[str, Any]],
    *,
    command: str,
    wall_seconds: float,
    dtype: torch.dtype,
    threads: Optional[int],
    figures: Mapping[str, str],
) -> str:
    """The markdown report of a run: settings, one table per mode, the PSI-vs-oracle checks and the Scaled
    PSI-LoRA sweep.  Every number is computed from ``results``."""
    first = next(iter(next(iter(results.values())).values()))
    seeds, epochs = first["seeds"], len(first["epoch"]) - 1
    tasks = [make_task(s, dtype) for s in seeds]
    floor = _floor(tasks, dtype)
    ratios = [float(t.singular_values[RANK] / t.singular_values[RANK - 1]) for t in tasks]
    out = [
        "# Synthetic linear task (spec §7.1)\n",
        f"Command: `{command}`  \nWall time: {wall_seconds:.0f} s ({wall_seconds / 60:.1f} min) on "
        f"{torch.get_num_threads() if threads is None else threads} torch thread(s); seeds {seeds}; {epochs} epochs; "
        f"model, data and loss in {str(dtype).replace('torch.', '')}.\n",
        "Metric: full-set excess loss `Σ‖ŷ−y‖² − f★` with `f★ = Σ_{i>8} σ_i(W★)²` (mean ± sample std over seeds), "
        "after each epoch and at epoch 0 (the shared SVD initialisation).  `seconds` is the wall time of all seeds "
        f"of a method.  Values below {format_number(floor, 2)} (f★ × machine epsilon: the resolution of `loss − f★`) "
        "are at numerical zero and are drawn at that floor.\n",
        "Settings: spec §7.1 learning rates; PSI-LoRA `lmbd = 1e-3` (λ = η·lmbd), RPLoRA damping `reg = 1e-3` "
        "(fixed; PEFT's Riemannian optimizer), AdamW β = (0.9, 0.999), wd 1e-4; SVDLoRA's step and SVD in the "
        "task dtype.  PSI-LoRA's LoRSum always computes in fp32 (library rule), which sets its floor.\n",
    ]
    for mode, records in results.items():
        out.append(f"## {mode.capitalize()} mode\n")
        protocol = PROTOCOLS[mode]
        out.append(
            f"Batch {protocol.batch_size}, momentum μ = {protocol.momentum:g}, "
            f"{'shuffled' if protocol.shuffle else 'full batch'}.  Figure: `{figures.get(mode, '')}`.\n"
        )
        out.append(_mode_table(records))
        rising = []
        for rec in records.values():
            mean_curve = np.asarray([np.nan if v is None else v for v in rec["excess_loss_mean"]], dtype=float)
            lowest = int(np.nanargmin(mean_curve))
            if mean_curve[-1] > 2 * max(mean_curve[lowest], 0.0) and mean_curve[lowest] > 0:
                rising.append(f"{rec['label']} (lowest {format_number(mean_curve[lowest])} at epoch {lowest}, "
                              f"final {format_number(mean_curve[-1])})")
        if rising:
            out.append(
                "Rising again after their lowest point (final mean > 2× the lowest): " + "; ".join(rising) + ".\n"
            )
        if "svdlora" in records and len(_psi_methods(records)) >= 1:
            comparison = compare_to_oracle(records, floor)
            out.append("PSI-LoRA ×K against SVDLoRA (largest gap over epochs 1..E):\n")
            rows = [
                [method_label(m), format_number(g["max_relative_excess_gap"]),
                 f"{100 * g['max_relative_loss_gap']:.3f}% (epoch {g['epoch_of_max_loss_gap']})",
                 "yes" if g["max_relative_loss_gap"] <= 0.01 else "no"]
                for m, g in comparison["gaps"].items()
            ]
            out.append(markdown_table(
                ["method", "relative gap of excess loss (mean curves)", "relative gap of loss (worst seed)",
                 "loss within 1%"], rows, align="lrrl",
            ))
            if comparison["monotone"]:
                out.append(
                    "Does a larger K help?  Per pair of consecutive K and epoch, the seeds where the larger K has "
                    "the lower (or equal) excess loss (spec §11's check) / is at least as close to SVDLoRA's "
                    "excess loss (|excess_K − excess_SVD|):\n"
                )
                epochs_checked = list(next(iter(comparison["monotone"].values())))
                out.append(markdown_table(
                    ["pair"] + [f"epoch {e}: lower / closer" for e in epochs_checked],
                    [
                        [f"×{k_large} vs ×{k_small}"]
                        + [f"{lower}/{n} / {closer}/{n}" for lower, closer, n in by_epoch.values()]
                        for (k_small, k_large), by_epoch in comparison["monotone"].items()
                    ],
                ))
        if mode == "deterministic":
            table = _rounds_table(records)
            if table:
                out.append(
                    "At η = 0.5 the full step lands on W★ᵀ from any W, so each PSI step is K more rounds of "
                    "warm-started subspace iteration on the same target: the excess loss depends on K·t, not on K "
                    "and t separately.\n"
                )
                out.append(table)
        momentum_rows = [
            [rec["label"]] + [
                f"{format_number(float(np.median([sv[key][i] for sv in rec['momentum_factor_sv']])))}"
                for key in ("M_A", "M_B") for i in (0, 1)
            ]
            for rec in records.values() if rec.get("momentum_factor_sv")
        ]
        if momentum_rows:
            out.append(
                "Low-rank momentum factors at the end of the run (median over seeds).  LoRSum fixes only the "
                "product M = M_B·M_A; with an anchor coefficient μ < 1 one factor shrinks by about μ per step "
                "while the other absorbs the new gradient, so unchecked the split drifts geometrically until "
                "σ(M_A)² falls below λ = η·lmbd plus the jitter and the momentum stops tracking μM + G.  The "
                "optimizer therefore rescales the momentum factors to equal norms after every step (the product "
                "is unchanged); comparable magnitudes of M_A and M_B below show it holding.\n"
            )
            out.append(markdown_table(["method", "σ_max(M_A)", "σ_min(M_A)", "σ_max(M_B)", "σ_min(M_B)"],
                                      momentum_rows))
        if "scaled-psi" in records:
            tuning = records["scaled-psi"].get("tuning")
            if tuning:
                chosen = tuning["chosen"]
                out.append(
                    f"Scaled PSI-LoRA ({mode}): lr = {chosen['lr']:g}, β1 = {chosen['beta1']:g}, "
                    f"max_grad_norm = {chosen['max_grad_norm']:g}, chosen on held-out seeds {tuning['seeds']} by "
                    f"{tuning['criterion']}.  Other settings: library defaults (K = 0, β2 = 0.99, δ = 1e-5, p = 0.5, "
                    "K-FAC), `loss_reduction=\"sum\"`."
                    + ("  The chosen lr is at the edge of the grid." if tuning.get("chosen_at_grid_edge") else "")
                    + "\n"
                )
                out.append(_tuning_table(tuning))
            else:
                h = records["scaled-psi"]["hyperparameters"]
                out.append(f"Scaled PSI-LoRA ({mode}): fixed setting {h} (not tuned in this run).\n")
    out.append("## Notes\n")
    energy = [1.0 - t.f_star / float(t.singular_values.square().sum()) for t in tasks]
    spread = [float(t.singular_values[0] / t.singular_values[-1]) for t in tasks]
    residual_norm = [2.0 * math.sqrt(t.f_star) for t in tasks]
    out.append(
        f"- Spectral gap at the rank cut: σ9/σ8 of W★ = {', '.join(f'{r:.4f}' for r in ratios)} (per seed).  "
        "Subspace iteration resolves the 8th direction at a rate of about (σ9/σ8)² per round, so with a spectrum "
        "this flat no small K lands on Π_8(W★ᵀ) in one step, while SVDLoRA does so by construction.\n"
    )
    out.append(
        "- Relative gaps of the *excess* loss against SVDLoRA are meaningless after epoch 0 in the deterministic "
        "mode: SVDLoRA's excess is at numerical zero from the first step, so any positive excess is a gap of many "
        "orders of magnitude.  The *loss* gap (`(loss_PSI − loss_SVD)/loss_SVD`) is the meaningful \"within 1%\" "
        "reading.\n"
    )
    out.append(
        f"- The gradient `2(W − W★ᵀ)` is full rank with a flat spectrum: σ1/σ200 of W★ = "
        f"{min(spread):.1f}–{max(spread):.1f}, and its best rank-8 approximation holds only "
        f"{100 * min(energy):.1f}–{100 * max(energy):.1f}% of ‖W★‖².  A rank-r momentum (PSI-LoRA with μ > 0, Scaled "
        "PSI-LoRA with β1 > 0) therefore keeps a small part of the accumulated gradient.  With a sum loss the "
        f"gradient norm at the optimum is 2√f★ = {min(residual_norm):.0f}–{max(residual_norm):.0f}, all of it the "
        "irreducible residual, so Scaled PSI-LoRA's default internal clipping at norm 1 divides its step by about "
        "that much.\n"
    )
    out.append(
        "- Runs use one torch thread (`--threads`).  The matrices are at most 600×200, so OpenMP fork/join costs "
        "more than it saves; profiled during development on the shared 2-core machine (other jobs running), one "
        "32-round LoRSum on these shapes took ~20 ms with 1 thread and 165–870 ms with 2, the time going to "
        "`linalg_solve_ex`, `cholesky_solve` and small matmuls waiting on threads rather than to arithmetic.\n"
    )
    # Blocks are separated by a blank line: markdown needs one before a table.
    return "\n".join(out)


_BASELINE_STYLES = {
    "svdlora": {"color": "black", "linewidth": 2, "linestyle": "--"},
    "lora-sgd": {"color": "tab:gray"},
    "lora-adamw": {"color": "tab:brown"},
    "rplora-sgd": {"color": "tab:green"},
    "rplora-adamw": {"color": "tab:olive"},
    "scaled-psi": {"color": "tab:cyan", "linestyle": "-."},
}


def _plot_styles(records: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """Line styles by label: the oracle black and dashed, PSI-LoRA ×K along one colormap (darker for larger K)
    so the K trend reads at a glance, baselines in colours outside that map."""
    import matplotlib

    styles = {method_label(m): dict(style) for m, style in _BASELINE_STYLES.items() if m in records}
    psi = sorted((m for m in records if m.startswith("psi-")), key=_parse_psi)
    colormap = matplotlib.colormaps["plasma"]
    for i, method in enumerate(psi):
        styles[method_label(method)] = {"color": colormap(0.75 - 0.7 * i / max(1, len(psi) - 1))}
    return styles


def write_outputs(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: Path,
    *,
    command: str,
    wall_seconds: float,
    dtype: torch.dtype = torch.float64,
    threads: Optional[int] = 1,
) -> Dict[str, Path]:
    """Write ``results.json``, ``excess_loss_<mode>.png`` per mode and ``summary.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / "results.json"}
    with open(paths["results"], "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    first = next(iter(next(iter(results.values())).values()))
    floor = _floor([make_task(s, dtype) for s in first["seeds"]], dtype)
    figures = {}
    for mode, records in results.items():
        curves = {
            rec["label"]: CurveBand(
                rec["epoch"],
                [np.nan if v is None else v for v in rec["excess_loss_mean"]],
                [np.nan if v is None else v for v in rec["excess_loss_std"]],
            )
            for rec in records.values()
        }
        styles = _plot_styles(records)
        path = out_dir / f"excess_loss_{mode}.png"
        plot_curve_bands(
            curves, path, title=f"Synthetic linear task, {mode} (mean ± std over {len(first['seeds'])} seeds)",
            xlabel="epoch", ylabel="excess loss  Σ‖ŷ−y‖² − f★", floor=floor, floor_label="numerical zero",
            styles=styles,
        )
        figures[mode] = path.name
        paths[f"figure_{mode}"] = path
    paths["summary"] = out_dir / "summary.md"
    paths["summary"].write_text(
        summary_markdown(results, command=command, wall_seconds=wall_seconds, dtype=dtype, threads=threads,
                         figures=figures)
    )
    return paths


# ------------------------------------------------------------------------------------------------- CLI


def _split_list(values: Optional[Sequence[str]]) -> Optional[List[str]]:
    if not values:
        return None
    return [v for item in values for v in item.split(",") if v]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="loraopt bench linear", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--modes", nargs="+", metavar="MODE", help=f"any of {', '.join(MODES)} (default: both)")
    parser.add_argument(
        "--methods", nargs="+", metavar="METHOD",
        help="method ids (default per mode: " + "; ".join(f"{m}: {' '.join(v)}" for m, v in DEFAULT_METHODS.items())
        + "); psi-xK for any K, psi-xK-rmM for momentum rank M·r",
    )
    parser.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help="run seeds 0..N-1 (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="default %(default)s")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/linear"), help="default %(default)s")
    parser.add_argument("--quick", action="store_true", help="CI-sized: 1 seed, 3 epochs, Scaled PSI-LoRA not tuned")
    parser.add_argument("--scaled-lr", type=float, help="fix Scaled PSI-LoRA's lr instead of tuning it")
    parser.add_argument("--scaled-beta1", type=float, default=0.9, help="with --scaled-lr (default %(default)s)")
    parser.add_argument(
        "--scaled-max-grad-norm", type=float, default=1.0, help="with --scaled-lr (default %(default)s; 0 = off)"
    )
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="default %(default)s")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    modes = _split_list(args.modes) or list(MODES)
    methods = _split_list(args.methods)
    seeds = list(range(1 if args.quick else args.seeds))
    epochs = 3 if args.quick else args.epochs
    if not seeds or epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    dtype = getattr(torch, args.dtype)
    scaled = None
    if args.scaled_lr is not None:
        scaled = {m: ScaledSetting(args.scaled_lr, args.scaled_beta1, args.scaled_max_grad_norm) for m in modes}
    try:
        start = time.perf_counter()
        results = run_linear(
            modes, methods, seeds, epochs, dtype=dtype, scaled=scaled, tune_scaled=not args.quick,
            threads=args.threads, progress=not args.no_progress,
        )
        wall = time.perf_counter() - start
    except ValueError as err:
        parser.error(str(err))
    command = "loraopt bench linear" + ("" if not argv else " " + " ".join(shlex.quote(a) for a in argv))
    paths = write_outputs(results, args.out, command=command, wall_seconds=wall, dtype=dtype, threads=args.threads)
    for mode, records in results.items():
        for method, rec in records.items():
            print(f"{mode:13s} {rec['label']:26s} final excess {format_number(rec['excess_loss_mean'][-1])}"
                  f" ± {format_number(rec['excess_loss_std'][-1], 2)}  ({rec['seconds']:.1f} s)")
    print(f"wall time {wall:.0f} s; wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
