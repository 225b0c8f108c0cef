"""What the capture hooks hand the optimizer for one LoRA layer: :class:`LayerObservation` (its rows, or their
streamed products and statistics) and :class:`RowBudgetExceeded` (rows mode kept more rows than allowed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..functional.lorsum import lowrank_sq_norm

__all__ = ["LayerObservation", "RowBudgetExceeded"]


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
    pairs: int = 0  # (input, output-gradient) pairs recorded, including empty ones (a zero-size batch)
    x_rows: List[Tensor] = field(default_factory=list)
    g_rows: List[Tensor] = field(default_factory=list)
    left: Optional[Tensor] = None  # (k_left, d_in):  L^T G for the left probes L (d_out, k_left)
    right: Optional[Tensor] = None  # (d_out, k_right): G R for the right probes R (d_in, k_right)
    x_sq: Optional[Tensor] = None  # (d_in,)  sum over rows of x~^2
    s_sq: Optional[Tensor] = None  # (d_out,) sum over rows of S^2
    shampoo_in: Optional[Tensor] = None  # (d_in,)  sum over micro-batches of diag(G_m^T G_m)
    shampoo_out: Optional[Tensor] = None  # (d_out,) sum over micro-batches of diag(G_m G_m^T)
    grad_norm_bound: Optional[Tensor] = None  # sum over micro-batches of |G_m|_F (stream mode)
    G: Optional[Tensor] = None  # (d_out, d_in) fp32 sum of S_m^T X_m: rows mode when dense is the smaller form

    @property
    def empty(self) -> bool:
        return self.n_rows == 0

    def rows(self) -> Tuple[Tensor, Tensor]:
        """``(X: (N, d_in), S: (N, d_out))`` of every recorded pair, concatenated; ``S`` in fp32 (fp64 rows stay
        fp64)."""
        x = self.x_rows[0] if len(self.x_rows) == 1 else torch.cat(self.x_rows)
        g = self.g_rows[0] if len(self.g_rows) == 1 else torch.cat(self.g_rows)
        return x, g.to(torch.promote_types(g.dtype, torch.float32)) / self.scaling

    def grad_sq_norm(self) -> Tensor:
        """``|G|_F^2`` exactly (rows mode) or the square of the per-micro-batch bound (stream mode)."""
        if self.G is not None:
            return self.G.square().sum()
        if self.x_rows:
            x, s = self.rows()
            return lowrank_sq_norm(s.mT, x.to(s.dtype))
        return self.grad_norm_bound.square()
