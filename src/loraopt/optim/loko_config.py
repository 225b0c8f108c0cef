"""LoKO's settings: the validated filter configuration, the per-group values and the checks of a saved state.

Defaults (how they were chosen, ``benchmarks/notes/loko.md``, measured with ``loraopt bench online``, batch 1, one
pass of 1,000 samples, 2 seeds, on EfficientNet-Lite0 x MNIST and MiniLM x SST-2, 1 seed on EfficientNet-Lite0 x
Fashion-MNIST):

* ``p_init``: the spec's ``U(1e-4, 1e-2)`` is one decade too small for pretrained models with a fresh head (MiniLM
  did not learn at all: 0.51 dev accuracy); ``U(1e-3, 1e-1)`` was the best or within noise of the best held-out
  accuracy on every stream for the softmax observation, while ``U(1e-2, 1)`` broke down on MNIST (held-out 0.37
  against 0.84). The scalar-loss observation takes ``U(1e-2, 1)``: its step tends to the bounded Polyak-type step
  ``L p g / sum(p g^2)`` as ``p`` grows, and ``U(1e-2, 1)`` and ``U(0.1, 10)`` were equal and better than
  ``U(1e-3, 1e-1)`` there. Regression was not measured and takes the softmax bounds.
* ``r0`` of the scalar-loss observation: ``"first-loss"``, ``R_0 = max(0.1, L_1^2)`` set from the first observed
  loss. With ``R_0 = 0.1`` and the default P0, a causal LM (SmolLM2-135M, loss ~4.6 nats) blew up in 4 steps
  (validation loss 4.6 -> 14.3): the gain ``sum(p g^2) / (sum(p g^2) + R)`` was 0.65 then 0.93, i.e. near-Polyak
  steps that try to bring a loss with a floor of ~3-4 nats to 0 (first step 0.3x the adapter norm, all of it in
  ``lora_B``). The ``R`` EMA (residual form) tends to about ``L^2`` when the loss cannot fall much, but takes tens of
  steps to get there from 0.1; starting it there keeps the first steps small (LM: no blow-up, and better than the
  former ``"score"`` at 30 steps) and left the classifier streams where they were (the notes). P0 itself is not the
  lever: in the near-Polyak regime the step ``L p g / sum(p g^2)`` does not depend on P0's scale, and a data-scaled
  P0 small enough for the LM (``"score"``) was far worse on the classifier streams (MNIST held-out 0.26-0.46
  against 0.76-0.83).
* ``beta = 0.95``, ``r0 = 0.1`` (the spec's, softmax): checked one factor at a time (``beta`` 0.9 / 0.99, ``r0`` 0.01 / 1)
  around the new ``p_init``; see the notes for the numbers.
* Why P0 matters this much: with ~10^5 filtered coordinates, a 1,000-sample pass shrinks the mean of ``p`` by only
  ~1%, so the filter acts as a fixed diagonal preconditioner (the P0 draw) normalised by ``S``, and the scale of P0
  plays the role of a learning rate. For the same reason ``q > 0`` does little on short streams.

``p_init="score"`` (our design; it replaces the gradient-magnitude mapping sketched in ``docs/specs/loko.md`` §5,
which gives ``p_low`` to every ``lora_A`` entry because their gradient is exactly 0 at the standard ``B = 0`` init):
P0 is the seeded uniform draw on ``(1e-4, 1e-2)`` rescaled, at the first update that sees the parameter, by one
scalar ``c`` chosen so that the prior predictive variance of the observed outputs is a tenth of the noise,
``mean_k (H P0 H^T)_kk = 0.1 r0``. The first observation then moves the outputs by about ``0.1 / 1.1`` of its
innovation, whatever the model size or parameterisation, so the overall scale of P0 comes from the data instead of
per-model bounds; coordinates the first observation does not see (``lora_A`` while ``B = 0``) get the same scale.
The first observation is not spent on calibration (no extra pass). On the two toy streams of
``benchmarks/notes/loko.md`` and on EfficientNet x MNIST it matched the best hand-tuned bounds, but on MiniLM x
SST-2 it was clearly worse (dev accuracy 0.63 against 0.76), so it is not the default.

``p_init="score-layer"`` (our design, for issue 10 §3): the same calibration per parameter tensor, each of the T
tensors getting ``0.1 r0 / T`` of the prior predictive variance. Why: on MiniLM the first observation's Jacobian is
dominated by the fresh classifier head, so the single scale of ``"score"`` is set by the head and is too small for
the LoRA factors; per tensor, no block sets the scale of another. A LoRA ``A`` has no signal at the first update
(``B = 0``), so each tensor gets a second chance at the second update (``B`` has moved by then). Not measured on
the realistic streams yet; an option, not the default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..functional.ekf import NOISE_FLOORS, EKFConfig
from ..functional.observations import OBSERVATIONS, Observation, make_observation
from .checks import check_nonnegative, check_positive, check_range

__all__ = ["LoKOConfig", "GroupSettings", "DEFAULT_P_INIT", "DEFAULT_R0", "DEFAULT_R_MIN", "DEFAULT_NOISE_FLOOR", "FIRST_LOSS", "JACOBIAN_PATHS", "SCORE_SNR"]

# Where observe() takes the Jacobian rows from (see LoKO.observe); "auto" picks per observation.
JACOBIAN_PATHS = ("auto", "func", "replicate", "per-sample", "batch")
BATCH_MODES = ("joint", "sequential")
# Default P0 bounds per observation (see the module docstring).
DEFAULT_P_INIT = {name: cls.default_p_init for name, cls in OBSERVATIONS.items()}
# p_init="score": target prior-predictive variance of the observed outputs, as a fraction of r0 (a signal-to-noise
# ratio). 1.0 lets the first observation move the outputs by half their innovation, which over-trusts the
# linearisation: on the digits stream (benchmarks/notes/loko.md) it diverged for one seed in three at b = 8, while
# 0.1 was the best or tied-best P0 on both toy streams measured; 0.01 learns too slowly.
SCORE_SNR = 0.1
# The data-scaled P0s: "score" (one scale for every coordinate) and "score-layer" (one scale per parameter tensor,
# each tensor getting an equal share of SCORE_SNR * r0, calibrated at the first of the first two updates in which
# its Jacobian block is non-zero; see loraopt.optim.loko_step).
SCORE_P_INITS = ("score", "score-layer")
# r0="first-loss": R_0 = max(R0_FLOOR, L_1^2), the square of the first observed loss (observation="loss" only; see
# the module docstring). The default r0 per observation (r0=None resolves to it; explicit values win).
FIRST_LOSS = "first-loss"
R0_FLOOR = 0.1
DEFAULT_R0: Dict[str, Union[float, str]] = {"softmax": 0.1, "regression": 0.1, "loss": FIRST_LOSS}
# The floor of R per observation (r_min=None / noise_floor=None resolve to these; explicit values win). Softmax: every
# eigenvalue clamped at 1e-2. On 10,000-sample streams the EMA drives R towards 0 along directions of confident
# predictions; one outsized step then saturates the softmax, whose Jacobian vanishes, and the filter stops learning
# for good (benchmarks/notes/loko.md, "LoKO at its defaults collapses on the long EfficientNet stream"). The clamp
# bounds the gain in every direction the update sees; on SST-2 (2 classes) it never bound. The other observations keep
# their own floor (the smallest eigenvalue at 1e-4). A group saved before these defaults (noise_floor None, r_min
# 1e-4) keeps its floor when loaded.
DEFAULT_R_MIN: Dict[str, float] = {"softmax": 1e-2, "regression": 1e-4, "loss": 1e-4}
DEFAULT_NOISE_FLOOR: Dict[str, Optional[str]] = {"softmax": "clamp", "regression": None, "loss": None}
# Hyperparameters of the one filter over all groups (one R, one S); they must agree across parameter groups.
# Filter keys a state dict saved before they existed may lack (read with their default, None).
OPTIONAL_KEYS = ("top_k", "noise_floor")
FILTER_KEYS = (
    "num_outputs", "observation", "beta", "r0", "r_min", "jitter", "batch_mode", "reduce_simplex", "seed", "exact_residual",
    "top_k", "noise_floor",
)
# The hyperparameters every LoKO parameter group carries (checked when a state dict is loaded).
GROUP_KEYS = ("lr", "q", "p_init", "p_floor")

PInit = Union[Tuple[float, float], float, str]


@dataclass(frozen=True)
class LoKOConfig:
    """The filter-level settings of LoKO, validated on construction (one filter over all parameter groups).

    ``observation``: an :class:`~loraopt.functional.observations.Observation`; ``beta``: EMA forgetting factor of
    ``R`` in ``[0, 1]``; ``r0``: ``R_0 = r0 I``; ``r_min``: floor of ``R``; ``jitter``: relative diagonal shift of
    ``S``; ``batch_mode``: ``"joint"`` or ``"sequential"``; ``seed``: seed of the P0 draw; ``exact_residual``: feed
    ``R`` with the residual re-evaluated at the updated parameters."""

    observation: Observation
    beta: float = 0.95
    r0: float = 0.1
    r_min: float = 1e-4
    jitter: float = 1e-6
    batch_mode: str = "joint"
    seed: int = 0
    exact_residual: bool = False
    r0_from_loss: bool = False
    #: the floor of ``R`` (``loraopt.functional.ekf.apply_noise_floor``); None: the observation's own
    noise_floor: Optional[str] = None

    def __post_init__(self) -> None:
        if not isinstance(self.observation, Observation):
            raise TypeError(f"observation must be an Observation, got {type(self.observation).__name__}")
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be 'joint' or 'sequential', got {self.batch_mode!r}")
        if not isinstance(self.exact_residual, bool):
            raise ValueError(f"exact_residual must be True or False, got {self.exact_residual!r}")
        if self.exact_residual and not self.observation.uses_outputs:
            raise ValueError(
                "exact_residual=True applies to the softmax and regression observations; with observation='loss' the "
                "residual is the loss itself (use exact_residual=False)"
            )
        if self.r0_from_loss and self.observation.uses_outputs:
            raise ValueError(
                f"r0={FIRST_LOSS!r} applies to observation='loss' only (it sets R_0 from the first observed loss); "
                f"give observation={self.observation.name!r} a positive float r0"
            )
        check_range("beta", self.beta, 0.0, 1.0, high_inclusive=True)
        check_positive("r0", self.r0)
        check_positive("r_min", self.r_min)
        if self.noise_floor is not None and self.noise_floor not in NOISE_FLOORS:
            raise ValueError(f"noise_floor must be None (the observation's own) or one of {NOISE_FLOORS}, got "
                             f"{self.noise_floor!r}")
        check_nonnegative("jitter", self.jitter)
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")

    @classmethod
    def from_group(cls, group: Mapping) -> "LoKOConfig":
        """The configuration stored in a parameter group (its ``FILTER_KEYS``)."""
        obs = make_observation(group["observation"], group["num_outputs"], group["reduce_simplex"],
                               group.get("top_k"))
        if getattr(obs, "top_k", None) is not None and group["exact_residual"]:
            raise ValueError("exact_residual=True re-evaluates every observed output after the update, and top_k "
                             "picks the observed classes from the outputs before it: use one of the two")
        r0 = group["r0"]
        from_loss = isinstance(r0, str)
        if from_loss and r0 != FIRST_LOSS:
            raise ValueError(f"r0 must be a positive float or {FIRST_LOSS!r}, got {r0!r}")
        return cls(obs, group["beta"], R0_FLOOR if from_loss else r0, group["r_min"], group["jitter"],
                   group["batch_mode"], group["seed"], group["exact_residual"], from_loss, group.get("noise_floor"))

    def ekf_config(self, lr: Any, q: Any, p_floor: Any, dtype: torch.dtype) -> EKFConfig:
        """The :class:`~loraopt.functional.ekf.EKFConfig` of one step (``lr``, ``q``, ``p_floor``: per group)."""
        return EKFConfig(
            lr=lr, q=q, beta=self.beta, r_min=self.r_min, noise_floor=self.noise_floor or self.observation.noise_floor,
            jitter=self.jitter, jitter_abs=1e-12 if self.jitter > 0 else 0.0, p_floor=p_floor, dtype=dtype,
        )


@dataclass(frozen=True)
class GroupSettings:
    """The per-group values, validated: ``lr`` (scales the mean update), ``q`` (process noise), ``p_init`` (P0:
    ``(low, high)``, a positive float, ``"score"`` or ``"score-layer"``) and ``p_floor`` (lower clamp of ``p``)."""

    lr: float
    q: float
    p_init: PInit
    p_floor: float

    def __post_init__(self) -> None:
        check_nonnegative("lr", float(self.lr))
        check_nonnegative("q", self.q)
        check_positive("p_floor", self.p_floor)
        p_init = self.p_init
        if isinstance(p_init, str):
            if p_init not in SCORE_P_INITS:
                raise ValueError(f"p_init must be (low, high), a positive float, 'score' or 'score-layer', got "
                                 f"{p_init!r}")
        elif isinstance(p_init, (int, float)) and not isinstance(p_init, bool):
            check_positive("p_init", p_init)
        elif isinstance(p_init, tuple) and len(p_init) == 2:
            low, high = p_init
            check_positive("p_init low", low)
            check_positive("p_init high", high)
            if low > high:
                raise ValueError(f"p_init bounds must satisfy low <= high, got {p_init!r}")
        else:
            raise ValueError(f"p_init must be (low, high), a positive float, 'score' or 'score-layer', got "
                             f"{p_init!r}")


def check_same_filter(first: Mapping, group: Mapping, hint: str = "") -> None:
    """``ValueError`` unless ``group`` has ``first``'s filter-level settings (``FILTER_KEYS``): LoKO runs one filter
    over all groups.  ``hint`` ends the message."""
    for key in FILTER_KEYS:
        if group.get(key) != first.get(key):
            raise ValueError(
                f"{key} must be the same in every parameter group (LoKO runs one filter over all groups), got "
                f"{first.get(key)!r} and {group.get(key)!r}{hint}"
            )


def expand_observation(values: Dict[str, Any]) -> None:
    """An :class:`Observation` instance under ``"observation"`` becomes the stored string options (in place):
    ``observation`` (its name), ``num_outputs`` and ``reduce_simplex``. A ``num_outputs`` that disagrees raises."""
    obs = values.get("observation")
    if not isinstance(obs, Observation):
        return
    given = values.get("num_outputs")
    if given is not None and obs.uses_outputs and given != obs.num_outputs:
        raise ValueError(
            f"num_outputs={given!r} disagrees with observation={obs!r}: give the number of outputs once (in the "
            "observation, or leave num_outputs out)"
        )
    values["observation"] = obs.name
    values["num_outputs"] = obs.num_outputs if obs.uses_outputs else given
    values["reduce_simplex"] = bool(obs.reduce_simplex)
    values["top_k"] = getattr(obs, "top_k", None)


def resolve_p_init(p_init: Any, observation: Any) -> Any:
    """``None`` -> the default bounds of the observation; lists -> tuples (so groups compare and print alike)."""
    if p_init is None:
        # An unknown observation is reported by validate_group; any bounds will do until then.
        name = observation.name if isinstance(observation, Observation) else observation
        return DEFAULT_P_INIT.get(name, DEFAULT_P_INIT["softmax"])
    return tuple(p_init) if isinstance(p_init, list) else p_init


def resolve_noise_floor(r_min: Any, noise_floor: Any, observation: Any) -> Tuple[Any, Any]:
    """``(r_min, noise_floor)`` with each ``None`` replaced by the observation's default (``DEFAULT_R_MIN``,
    ``DEFAULT_NOISE_FLOOR``); explicit values are kept (validated later)."""
    name = observation.name if isinstance(observation, Observation) else observation
    if r_min is None:
        r_min = DEFAULT_R_MIN.get(name, DEFAULT_R_MIN["softmax"])
    if noise_floor is None:
        noise_floor = DEFAULT_NOISE_FLOOR.get(name)
    return r_min, noise_floor


def resolve_r0(r0: Any, observation: Any) -> Any:
    """``None`` -> the default ``r0`` of the observation (``DEFAULT_R0``); anything else is kept (validated later)."""
    if r0 is None:
        name = observation.name if isinstance(observation, Observation) else observation
        return DEFAULT_R0.get(name, DEFAULT_R0["softmax"])
    return r0


def validate_group(group: Mapping) -> LoKOConfig:
    """Validate a parameter group's filter-level and per-group values; returns its :class:`LoKOConfig`."""
    config = LoKOConfig.from_group(group)
    GroupSettings(group["lr"], group["q"], group["p_init"], group["p_floor"])
    return config


def check_state_dict(state_dict: Any, param_groups: Sequence[Dict[str, Any]]) -> None:
    """Raise ``ValueError`` unless ``state_dict`` is a usable LoKO state for ``param_groups`` (type, hyperparameter
    keys, group sizes, state shapes, finiteness)."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"cannot load this LoKO state dict: {msg}; the optimizer was left unchanged")

    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise bad("expected optimizer.state_dict() output, a dict with 'state' and 'param_groups'")
    groups, state = state_dict["param_groups"], state_dict["state"]
    for i, saved in enumerate(groups):
        missing = [k for k in FILTER_KEYS + GROUP_KEYS if k not in saved and k not in OPTIONAL_KEYS]
        if missing:
            found = sorted({k for st in state.values() for k in st}) if state else []
            raise bad(
                f"parameter group {i} lacks LoKO's hyperparameters {missing} (state keys {found}): it was saved "
                "by another optimizer type; load it into that optimizer, or start LoKO afresh"
            )
    if len(groups) != len(param_groups):
        raise bad(f"it has {len(groups)} parameter groups, this optimizer has {len(param_groups)}")
    ids: List[Any] = []
    for i, (saved, mine) in enumerate(zip(groups, param_groups)):
        if len(saved["params"]) != len(mine["params"]):
            raise bad(
                f"parameter group {i} holds {len(saved['params'])} parameters, this optimizer's holds "
                f"{len(mine['params'])} (a different model or LoRA configuration)"
            )
        group = dict(saved)
        group["p_init"] = tuple(group["p_init"]) if isinstance(group["p_init"], list) else group["p_init"]
        try:
            validate_group(group)
        except ValueError as exc:
            raise bad(f"parameter group {i}: {exc}") from None
        for key in ("num_outputs", "observation", "reduce_simplex", "top_k"):
            if saved.get(key) != mine.get(key):
                raise bad(
                    f"it was saved with {key}={saved.get(key)!r}, this optimizer has {key}={mine.get(key)!r} "
                    "(a different task or head)"
                )
        for key in FILTER_KEYS:
            if saved.get(key) != groups[0].get(key):
                raise bad(f"{key} differs between parameter groups 0 and {i}")
        ids += list(saved["params"])
    params = [p for g in param_groups for p in g["params"]]
    names = [n for g in param_groups for n in (g.get("param_names") or [None] * len(g["params"]))]
    by_id = {pid: (param, name) for pid, param, name in zip(ids, params, names)}
    k = LoKOConfig.from_group(groups[0]).observation.dim
    for pid, st in state.items():
        if pid not in by_id:
            raise bad(f"state for parameter id {pid!r}, which no parameter group lists")
        param, name = by_id[pid]
        label = f"parameter {name or pid!r}"
        anchor = pid == ids[0]
        allowed = {"p", "step"} | ({"R", "skipped"} if anchor else set())
        extra = sorted(set(st) - allowed - {"scored"})  # "scored": p_init="score-layer" only
        if extra:
            raise bad(f"{label} has state {extra}, which LoKO does not keep (state of another optimizer type?)")
        needed = sorted(allowed - set(st))
        if needed:
            raise bad(f"{label} lacks state {needed}")
        p = st["p"]
        if not torch.is_tensor(p) or not p.is_floating_point() or tuple(p.shape) != tuple(param.shape):
            got = tuple(p.shape) if torch.is_tensor(p) else type(p).__name__
            raise bad(
                f"{label}: covariance p has shape {got}, the parameter has {tuple(param.shape)} (a model with "
                "other ranks or layers)"
            )
        if not bool(torch.isfinite(p).all()) or not bool((p > 0).all()):
            raise bad(f"{label}: covariance p holds non-finite or non-positive values")
        step = st["step"]
        if not torch.is_tensor(step) or step.numel() != 1 or not math.isfinite(float(step)) or float(step) < 0:
            raise bad(f"{label}: step must be a finite number >= 0, got {step!r}")
        if anchor:
            R, skipped = st["R"], st["skipped"]
            if not torch.is_tensor(R) or not R.is_floating_point() or tuple(R.shape) != (k, k):
                got = tuple(R.shape) if torch.is_tensor(R) else type(R).__name__
                raise bad(f"the noise estimate R has shape {got}, expected {(k, k)} for these settings")
            if not bool(torch.isfinite(R).all()):
                raise bad(
                    "the noise estimate R holds non-finite values (every later step would be skipped); resume "
                    "from an earlier checkpoint, or start LoKO afresh"
                )
            if (not torch.is_tensor(skipped) or skipped.numel() != 1 or not math.isfinite(float(skipped))
                    or float(skipped) < 0):
                raise bad(f"the skipped-step count must be an integer >= 0, got {skipped!r}")
