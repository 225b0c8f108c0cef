"""Capturing what a full-weight update needs: layer inputs X and output-gradients S, paired at backward time.

For a LoRA layer ``y = W0 x + s B A x~`` the full-weight gradient is ``G = dL/dDeltaW = S^T X`` with ``X`` the rows
of ``x~`` (the input of ``lora_A`` after dropout) and ``S`` the rows of ``dL/dy``.  A forward hook on ``lora_A``
takes ``x~``; a forward hook on ``lora_B`` registers a tensor hook on its output, closed over that ``x~``.  The
tensor hook receives ``g = dL/d(lora_B output) = s S`` and records the pair.  Consequences, by construction:

* only forwards that actually receive a gradient contribute (no-grad evaluation, logging forwards and the
  no-grad first pass of reentrant checkpointing record nothing, and hold nothing once their graph is gone);
* recomputation under gradient checkpointing is not counted twice (the recomputed output never receives a
  gradient under non-reentrant checkpointing; under reentrant checkpointing only the recomputation does);
* micro-batches of gradient accumulation simply add up: ``sum_m S_m^T X_m = S^T X``, nothing is rescaled.

Two storage modes per step:

* ``rows``: keep ``(X, g)`` in the activation dtype (``N (d_in + d_out)`` values per layer); any product can be
  computed at step time.  Needed for K >= 1 alternating rounds.
* ``stream``: fold each pair into fixed projections as it arrives (``probes``: ``[B~ | M_B]^T G`` and
  ``G [A~ | M_A]^T``), so nothing of size N is kept.  Enough for the Jacobi (K = 0) round.

Optional per-step statistics, computed as pairs arrive: sums of squared input/output rows (diagonal K-FAC), the
diagonal Shampoo sums ``diag(G^T G)``, ``diag(G G^T)``, and the gradient norm (exact in ``rows`` mode at step time;
in ``stream`` mode the sum over micro-batches of per-micro-batch norms, an upper bound that is exact for one).
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..functional.lorsum import lowrank_sq_norm
from .layers import LoRALayer

__all__ = ["LayerObservation", "GradientCapture", "RowBudgetExceeded"]

Probes = Callable[[LoRALayer], Tuple[Tensor, Tensor]]


class RowBudgetExceeded(RuntimeError):
    pass


@dataclass(eq=False)
class LayerObservation:
    """What one layer saw since the last ``step()``/``zero_grad()`` on this process.

    ``g`` rows are ``dL/d(lora_B output) = s * S``; divide by ``scaling`` to get ``S``.  Every accumulated
    quantity below is already expressed in terms of ``S`` (fp32).
    """

    scaling: float = 1.0
    n_rows: int = 0
    x_rows: List[Tensor] = field(default_factory=list)
    g_rows: List[Tensor] = field(default_factory=list)
    left: Optional[Tensor] = None  # (k_left, d_in):  L^T G for the left probes L (d_out, k_left)
    right: Optional[Tensor] = None  # (d_out, k_right): G R for the right probes R (d_in, k_right)
    x_sq: Optional[Tensor] = None  # (d_in,)  sum over rows of x~^2
    s_sq: Optional[Tensor] = None  # (d_out,) sum over rows of S^2
    shampoo_in: Optional[Tensor] = None  # (d_in,)  sum over micro-batches of diag(G_m^T G_m)
    shampoo_out: Optional[Tensor] = None  # (d_out,) sum over micro-batches of diag(G_m G_m^T)
    grad_norm_bound: Optional[Tensor] = None  # sum over micro-batches of |G_m|_F (stream mode)

    @property
    def empty(self) -> bool:
        return self.n_rows == 0

    def rows(self) -> Tuple[Tensor, Tensor]:
        """``(X: (N, d_in), S: (N, d_out))`` of every recorded pair, concatenated; ``S`` in fp32."""
        x = self.x_rows[0] if len(self.x_rows) == 1 else torch.cat(self.x_rows)
        g = self.g_rows[0] if len(self.g_rows) == 1 else torch.cat(self.g_rows)
        return x, g.float() / self.scaling

    def grad_sq_norm(self) -> Tensor:
        """``|G|_F^2`` exactly (rows mode) or the square of the per-micro-batch bound (stream mode)."""
        if self.x_rows:
            x, s = self.rows()
            return lowrank_sq_norm(s.mT, x.float())
        return self.grad_norm_bound.square()


def _add(acc: Optional[Tensor], value: Tensor) -> Tensor:
    return value if acc is None else acc.add_(value)


class GradientCapture:
    """Hooks on a set of LoRA layers that record ``(X, S)`` pairs per step.

    Args:
        layers: the layers to observe (kind ``linear`` or ``pointwise_conv``).
        mode: ``"rows"`` or ``"stream"`` (see the module docstring).
        probes: stream mode only: ``probes(layer) -> (L: (d_out, k_l), R: (d_in, k_r))`` in fp32, the fixed
            matrices the gradient is projected on (read when a pair arrives, so they must only change in ``step``).
        kfac_stats, shampoo_stats, grad_norm: which per-step statistics to accumulate.
        row_budget: rows mode only: an error once a layer holds more rows than this in one step.
    """

    def __init__(
        self,
        layers: Sequence[LoRALayer],
        *,
        mode: str = "rows",
        probes: Optional[Probes] = None,
        kfac_stats: bool = False,
        shampoo_stats: bool = False,
        grad_norm: bool = False,
        row_budget: Optional[int] = None,
    ):
        if mode not in ("rows", "stream"):
            raise ValueError(f"capture mode must be 'rows' or 'stream', got {mode!r}")
        if mode == "stream" and probes is None:
            raise ValueError("stream mode needs `probes`")
        self.layers = list(layers)
        self.mode = mode
        # A bound method (an optimizer's) is held weakly: the model's hooks must not keep the optimizer alive.
        self._probes_ref = weakref.WeakMethod(probes) if inspect.ismethod(probes) else (lambda: probes)
        self.kfac_stats = kfac_stats
        self.shampoo_stats = shampoo_stats
        self.grad_norm = grad_norm
        self.row_budget = row_budget
        self.observations: Dict[int, LayerObservation] = {layer.index: LayerObservation() for layer in self.layers}
        self._pending_input: Dict[int, Optional[Tensor]] = {}
        self._handles: List[RemovableHandle] = []
        self.attach()

    # ------------------------------------------------------------------------------------------------ hooks

    def attach(self) -> None:
        if self._handles:
            return
        for layer in self.layers:
            self._handles.append(layer.a_module.register_forward_hook(self._input_hook(layer)))
            self._handles.append(layer.b_module.register_forward_hook(self._output_hook(layer)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._pending_input.clear()

    def _input_hook(self, layer: LoRALayer):
        def hook(module, args, output):
            # Only keep the input when a gradient could arrive; a no-grad forward holds nothing.
            self._pending_input[layer.index] = args[0] if torch.is_grad_enabled() else None

        return hook

    def _output_hook(self, layer: LoRALayer):
        def hook(module, args, output):
            x = self._pending_input.pop(layer.index, None)
            if x is None or not isinstance(output, Tensor) or not output.requires_grad:
                return
            output.register_hook(lambda g, x=x: self._record(layer, x, g))

        return hook

    # ------------------------------------------------------------------------------------------------ recording

    def _record(self, layer: LoRALayer, x: Tensor, g: Tensor) -> None:
        if g.dtype == torch.float16:
            raise RuntimeError(
                f"{layer.describe()}: fp16 gradients reached the LoRA hooks. With a GradScaler they carry the loss "
                "scale, which this optimizer cannot see. Train in bf16 or fp32 instead."
            )
        obs = self.observations[layer.index]
        scaling = layer.scaling
        obs.scaling = scaling
        x_rows, g_rows = layer.to_rows(x.detach()), layer.to_rows(g.detach())
        n = x_rows.shape[0]
        if n != g_rows.shape[0]:
            raise RuntimeError(
                f"{layer.describe()}: {n} input rows but {g_rows.shape[0]} output-gradient rows; the layer's lora_A "
                "and lora_B were not called once each per forward"
            )
        obs.n_rows += n
        need_fp32 = self.mode == "stream" or self.kfac_stats or self.shampoo_stats or (
            self.grad_norm and self.mode == "stream"
        )
        if need_fp32:
            xf = x_rows.float()
            sf = g_rows.float() / scaling
        if self.mode == "rows":
            if self.row_budget is not None and obs.n_rows > self.row_budget:
                raise RowBudgetExceeded(
                    f"{layer.describe()}: {obs.n_rows} rows captured in one optimizer step, more than row_budget="
                    f"{self.row_budget}. Use inner_iters=0 (streaming Jacobi mode keeps no rows) or raise row_budget."
                )
            obs.x_rows.append(x_rows)
            obs.g_rows.append(g_rows)
        else:
            probes = self._probes_ref()
            if probes is None:  # the optimizer that owned these hooks is gone
                self.remove()
                return
            left, right = probes(layer)
            obs.left = _add(obs.left, (sf @ left).mT @ xf)
            obs.right = _add(obs.right, sf.mT @ (xf @ right))
            if self.grad_norm:
                obs.grad_norm_bound = _add(obs.grad_norm_bound, lowrank_sq_norm(sf.mT, xf).sqrt())
        if self.kfac_stats:
            obs.x_sq = _add(obs.x_sq, xf.square().sum(0))
            obs.s_sq = _add(obs.s_sq, sf.square().sum(0))
        if self.shampoo_stats:
            obs.shampoo_in = _add(obs.shampoo_in, (xf * ((sf @ sf.mT) @ xf)).sum(0))
            obs.shampoo_out = _add(obs.shampoo_out, (sf * ((xf @ xf.mT) @ sf)).sum(0))

    # ------------------------------------------------------------------------------------------------ access

    def observation(self, layer: LoRALayer) -> LayerObservation:
        return self.observations[layer.index]

    def clear(self) -> None:
        """Drop everything recorded (after a step, or on ``zero_grad``)."""
        for key in self.observations:
            self.observations[key] = LayerObservation()
