"""LoKO's observation models as types (``docs/specs/loko.md`` §2, §9): what the filter observes of a model.

Each type owns, for ``N`` samples of ``m`` model outputs:

* ``num_outputs`` (``m``) and ``dim`` (``k``, the rows observed per sample; ``R`` is ``k x k``);
* :meth:`~Observation.predict`, ``h``; :meth:`~Observation.encode_targets`, ``y``; the innovation ``e = y - h``;
* :meth:`~Observation.initial_noise`, ``R_0``, and ``noise_floor``, the floor of ``R`` the filter applies;
* ``default_p_init``, the P0 bounds used when none are given;
* the validation of outputs and targets (errors say what to pass instead);
* the Jacobian rows of ``h`` (:meth:`~Observation.rows` from a graph, :meth:`~Observation.observe_one` for
  :func:`loraopt.functional.jacobian.func_jacobian`).

:class:`SoftmaxObservation` (classification, the default), :class:`RegressionObservation` (real outputs) and
:class:`LossObservation` (the scalar loss, "LoKO-scalar": ``h = L``, target 0, ``H = .grad``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .ekf import LossGradient, OutputRows
from .jacobian import output_jacobian

__all__ = [
    "Observation",
    "SoftmaxObservation",
    "RegressionObservation",
    "LossObservation",
    "OBSERVATIONS",
    "make_observation",
]


def _check_count(name: str, m: object, low: int, what: str) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m < low:
        raise ValueError(f"num_outputs must be an integer >= {low} for observation={name!r} (the number of {what}), "
                         f"got {m!r}")


class Observation:
    """Base of the observation types (frozen dataclasses; equal when their settings are equal)."""

    name: ClassVar[str] = ""
    noise_floor: ClassVar[str] = "eig"  # see loraopt.functional.ekf.apply_noise_floor
    default_p_init: ClassVar[Tuple[float, float]] = (1e-3, 1e-1)
    uses_outputs: ClassVar[bool] = True  # False: observes a loss and .grad, not the model outputs
    num_outputs: Optional[int]
    reduce_simplex: bool = False

    @property
    def dim(self) -> int:
        """``k``: observed rows per sample (``R`` is ``k x k``)."""
        return self.num_outputs

    def initial_noise(self, r0: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``R_0: (k, k)`` = ``r0 I``."""
        return r0 * torch.eye(self.dim, dtype=dtype, device=device)

    def outputs_matrix(self, outputs: Tensor, dtype: torch.dtype) -> Tensor:
        """``(N, m)`` view of ``outputs: (..., m)`` in ``dtype``, graph kept; leading dims are samples."""
        m = self.num_outputs
        if outputs.dim() == 0 or outputs.shape[-1] != m:
            got = outputs.shape[-1] if outputs.dim() else "no"
            raise ValueError(
                f"outputs have {got} entries in the last dimension but num_outputs={m}: pass (batch, {m}) outputs "
                f"or build the optimizer with num_outputs={outputs.shape[-1] if outputs.dim() else '...'}"
            )
        return outputs.reshape(-1, m).to(dtype)

    def predict(self, z: Tensor) -> Tensor:
        """``h: (N, m)`` from the model outputs ``z: (N, m)``."""
        return z

    def encode_targets(self, targets: Tensor, N: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``y: (N, m)`` in ``dtype`` on ``device``, validated."""
        raise NotImplementedError

    def observe_one(self, out: Tensor) -> Tensor:
        """``h[:k]: (k,)`` of one sample's outputs ``out`` (``m`` values, any shape); used under ``vmap``."""
        self._check_sample(out)
        m = self.num_outputs
        return self.predict(out.reshape(1, m)).reshape(m)[: self.dim]

    def _check_sample(self, out: Tensor) -> None:
        m = self.num_outputs
        if out.numel() != m:
            raise ValueError(
                f"the model returned {out.numel()} values for one sample, expected num_outputs={m}; pass inputs "
                "whose dim 0 indexes the samples"
            )

    def innovation(self, y: Tensor, h: Tensor) -> Tensor:
        """``e: (N, k)``: the observed columns of ``y - h`` (both ``(N, m)``; ``h`` detached by the caller)."""
        return (y - h)[:, : self.dim]

    def rows(
        self, h: Tensor, y: Tensor, samples: Iterable[int], params: Sequence[Tensor], dtype: torch.dtype
    ) -> OutputRows:
        """Jacobian rows and innovations of the given samples from the live graph of ``h: (N, m)``.

        Returns :class:`~loraopt.functional.ekf.OutputRows` with ``H: (len(samples) k, n)`` and
        ``e: (len(samples), k)``."""
        m = h.shape[1]
        idx = torch.as_tensor(list(samples), dtype=torch.long, device=h.device)
        cols = torch.arange(self.dim, device=h.device)
        flat_rows = (idx[:, None] * m + cols[None, :]).reshape(-1)
        H = output_jacobian(h, params, rows=flat_rows, dtype=dtype)
        e = self.innovation(y.index_select(0, idx), h.detach().index_select(0, idx))
        return OutputRows(H, e)


@dataclass(frozen=True)
class SoftmaxObservation(Observation):
    """``h = softmax(logits)``, ``y`` one-hot or soft targets, ``m`` classes.

    ``R``'s all-ones direction is floored (innovations and rows are orthogonal to it, so the EMA would shrink it to
    a singular ``S``). ``reduce_simplex=True`` observes the first ``m - 1`` classes (exact and cheaper): ``R`` is
    ``(m-1) x (m-1)``, started at the ``1``-orthogonal part of ``r0 I`` so both forms give the same updates, and no
    floor is needed.

    ``top_k=k`` (a reduced observation, not the paper's): per sample only ``k`` of the ``m`` probabilities are
    observed, in slots: slot 0 is the target class (the most probable one under soft targets), slots ``1..k-1``
    the other classes the model finds most probable now, in decreasing order. The Jacobian rows, their cost and
    ``S`` shrink by ``k / m``; ``R`` is ``k x k`` over the slots (its smallest eigenvalue floored, as for
    regression). The classes left out carry the smallest innovations ``0 - p_c``. With ``k = m`` the first update
    equals the full observation's (the slots are a permutation of the classes and ``R_0 = r0 I``); later ones
    differ only through ``R``, whose EMA runs over slots instead of classes."""

    num_outputs: int
    reduce_simplex: bool = False
    top_k: Optional[int] = None
    name: ClassVar[str] = "softmax"

    def __post_init__(self) -> None:
        _check_count(self.name, self.num_outputs, 2, "classes")
        if not isinstance(self.reduce_simplex, bool):
            raise ValueError(f"reduce_simplex must be True or False, got {self.reduce_simplex!r}")
        k = self.top_k
        if k is not None:
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.num_outputs:
                raise ValueError(f"top_k must be an integer in [1, num_outputs={self.num_outputs}] (or None: every "
                                 f"class), got {k!r}")
            if self.reduce_simplex:
                raise ValueError("top_k and reduce_simplex=True are two different reductions: choose one")

    @property
    def noise_floor(self) -> str:  # type: ignore[override]
        if self.top_k is not None:
            return "eig"
        return "none" if self.reduce_simplex else "ones"

    @property
    def dim(self) -> int:
        if self.top_k is not None:
            return self.top_k
        return self.num_outputs - 1 if self.reduce_simplex else self.num_outputs

    def select(self, p: Tensor, y: Tensor) -> Tensor:
        """``(N, k)`` class index per slot (``top_k`` only): the target class, then the ``k - 1`` other classes
        of largest probability ``p: (N, m)`` (detached), in decreasing order; ``y: (N, m)`` encoded targets."""
        target = y.argmax(-1, keepdim=True)
        if self.top_k == 1:
            return target
        others = p.detach().scatter(-1, target, float("-inf"))
        return torch.cat([target, others.topk(self.top_k - 1, dim=-1).indices], dim=-1)

    def innovation(self, y: Tensor, h: Tensor) -> Tensor:
        if self.top_k is None:
            return super().innovation(y, h)
        return (y - h).gather(-1, self.select(h, y))

    def observe_one(self, out: Tensor, slots: Optional[Tensor] = None) -> Tensor:
        """As for the base; with ``top_k``, ``h`` at this sample's observed classes ``slots: (k,)``."""
        if self.top_k is None:
            return super().observe_one(out)
        if slots is None:
            raise ValueError("top_k: observe_one(out, slots) needs the classes this sample observes (select())")
        self._check_sample(out)
        return torch.softmax(out.reshape(self.num_outputs), dim=-1).index_select(0, slots)

    def rows(
        self, h: Tensor, y: Tensor, samples: Iterable[int], params: Sequence[Tensor], dtype: torch.dtype
    ) -> OutputRows:
        if self.top_k is None:
            return super().rows(h, y, samples, params, dtype)
        m = h.shape[1]
        idx = torch.as_tensor(list(samples), dtype=torch.long, device=h.device)
        slots = self.select(h.detach().index_select(0, idx), y.index_select(0, idx))
        H = output_jacobian(h, params, rows=(idx[:, None] * m + slots).reshape(-1), dtype=dtype)
        e = (y.index_select(0, idx) - h.detach().index_select(0, idx)).gather(-1, slots)
        return OutputRows(H, e)

    def initial_noise(self, r0: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        R = r0 * torch.eye(self.dim, dtype=dtype, device=device)
        if self.reduce_simplex:
            # The (m-1)-coordinate view of the 1-orthogonal part of r0 I_m: this start makes the reduced filter
            # give exactly the updates of the full one (whose 1-direction never enters delta or p).
            R = R - r0 / self.num_outputs
        return R

    def predict(self, z: Tensor) -> Tensor:
        return torch.softmax(z, dim=-1)

    def encode_targets(self, targets: Tensor, N: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Class indices ``(N,)`` (one-hot encoded) or probabilities ``(N, m)`` (finite, >= 0, summing to 1)."""
        m = self.num_outputs
        if not torch.is_tensor(targets):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        if targets.is_floating_point():
            if targets.numel() != N * m:
                raise ValueError(
                    f"float targets must be class probabilities of shape (batch, {m}); got {tuple(targets.shape)}; "
                    "pass integer class indices instead"
                )
            y = targets.reshape(N, m).to(device=device, dtype=dtype)
            # One host read for all checks (a probability vector per sample: finite, >= 0, sums to 1).
            tol = 1e-6 if dtype == torch.float64 else 1e-4
            sums = y.sum(-1)
            bad = ~torch.isfinite(y).all(-1) | (y < 0).any(-1) | ((sums - 1).abs() > tol * m)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                raise ValueError(
                    f"soft targets must be probabilities that sum to 1 per sample (finite, >= 0); sample {i} has "
                    f"sum {float(sums[i]):.6g} and min {float(y[i].min()):.6g}: normalise them (e.g. "
                    "targets / targets.sum(-1, keepdim=True)) or pass integer class indices"
                )
            return y
        if targets.numel() != N:
            raise ValueError(
                f"got {targets.numel()} targets for {N} samples: pass one class index per sample "
                "(drop ignored positions such as -100 before observe())"
            )
        t = targets.reshape(N).long()
        if bool(((t < 0) | (t >= m)).any()):
            raise ValueError(
                f"class targets must be in [0, {m}): drop ignored labels (e.g. -100) before observe(), or set "
                "num_outputs to the number of classes"
            )
        return torch.nn.functional.one_hot(t.to(device), m).to(dtype)


@dataclass(frozen=True)
class RegressionObservation(Observation):
    """``h`` = the model outputs, ``y`` real-valued, ``m`` outputs; ``R``'s smallest eigenvalue is floored."""

    num_outputs: int
    name: ClassVar[str] = "regression"

    def __post_init__(self) -> None:
        _check_count(self.name, self.num_outputs, 1, "outputs")

    def outputs_matrix(self, outputs: Tensor, dtype: torch.dtype) -> Tensor:
        """As for the base; with ``m = 1``, ``(b,)`` outputs are ``b`` samples."""
        if self.num_outputs == 1 and (outputs.dim() == 1 or outputs.shape[-1] != 1):
            outputs = outputs.unsqueeze(-1)
        return super().outputs_matrix(outputs, dtype)

    def encode_targets(self, targets: Tensor, N: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``N m`` real targets in any shape (e.g. ``(N, m)``, or ``(N,)`` when ``m = 1``)."""
        m = self.num_outputs
        if not torch.is_tensor(targets):
            raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
        if targets.numel() != N * m:
            raise ValueError(
                f"regression targets must have the outputs' {N * m} entries, got shape {tuple(targets.shape)}"
            )
        return targets.reshape(N, m).to(device=device, dtype=dtype)


@dataclass(frozen=True)
class LossObservation(Observation):
    """The scalar-loss variant (``docs/specs/loko.md`` §9, not the paper's method): ``h = L(x; theta)`` (the mean
    loss), target 0, ``H = grad L``, one row per step, ``O(n)`` like AdamW. ``num_outputs`` is ignored.

    Default P0 bounds one decade above the output observations: the step tends to the bounded Polyak-type step
    ``L p g / sum(p g^2)`` as ``p`` grows, so it tolerates, and gains from, larger ``p``.  That step aims at a
    loss of 0, so ``LoKO`` starts this observation's noise at the first loss squared (``r0="first-loss"``,
    ``loraopt.optim.loko_config``) rather than at ``0.1``, which kept a language model's first steps small."""

    num_outputs: Optional[int] = None
    name: ClassVar[str] = "loss"
    default_p_init: ClassVar[Tuple[float, float]] = (1e-2, 1.0)
    uses_outputs: ClassVar[bool] = False

    @property
    def dim(self) -> int:
        return 1

    def loss_value(self, loss: Tensor, dtype: torch.dtype) -> Tensor:
        """The detached 0-dim loss in ``dtype``; refuses anything but one value."""
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise ValueError("observation='loss' needs the scalar (mean) loss: call observe(loss) with a 0-dim tensor")
        return loss.detach().reshape(()).to(dtype)

    def gradient_row(self, grads: Sequence[Tensor], loss: Tensor, dtype: torch.dtype) -> LossGradient:
        """:class:`~loraopt.functional.ekf.LossGradient` from the gradient blocks (flattened, concatenated, cast)."""
        return LossGradient(torch.cat([g.reshape(-1) for g in grads]).to(dtype), loss)


OBSERVATIONS = {cls.name: cls for cls in (SoftmaxObservation, RegressionObservation, LossObservation)}


def make_observation(observation: object, num_outputs: Optional[int], reduce_simplex: bool = False,
                     top_k: Optional[int] = None) -> Observation:
    """The observation type for the string options of ``LoKO`` (``"softmax"``, ``"regression"``, ``"loss"``)."""
    if observation not in OBSERVATIONS:
        raise ValueError(f"observation must be one of {tuple(OBSERVATIONS)}, got {observation!r}")
    if observation == "softmax":
        return SoftmaxObservation(num_outputs, reduce_simplex, top_k)  # type: ignore[arg-type]
    made = OBSERVATIONS[observation](num_outputs)  # type: ignore[abstract]
    if reduce_simplex:
        raise ValueError("reduce_simplex=True only applies to observation='softmax'")
    if top_k is not None:
        raise ValueError("top_k only applies to observation='softmax'")
    return made
