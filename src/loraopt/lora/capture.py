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
  computed at step time.  Needed for K >= 1 alternating rounds.  With ``dense="auto"`` a layer whose dense
  gradient is smaller than its rows (``d_in d_out <= N (d_in + d_out)``, i.e. almost always at LLM batch sizes)
  keeps ``G = sum_m S_m^T X_m`` instead (fp32, accumulated as micro-batches arrive) and releases the rows at once:
  the same information, a fraction of the memory, and every later product costs ``r d_in d_out`` instead of
  ``r N (d_in + d_out)``.
* ``stream``: fold each pair into fixed projections as it arrives (``probes``: ``[B~ | M_B]^T G`` and
  ``G [A~ | M_A]^T``), so nothing of size N is kept.  The probes are pushed into the capture by their owner (the
  optimizer: at construction, after every step and after ``load_state_dict``) and the hooks only read them: nothing
  is computed for them, and no optimizer state is touched, during backward.  Enough for the Jacobi (K = 0) round.  With ``dense="auto"``
  the projections come from the micro-batch's dense ``G_m`` (then dropped) when that is cheaper than projecting
  the rows, which is always the case when the gradient norm or Shampoo statistics are needed (both need
  ``G_m`` or an ``N x N`` Gram matrix).

Precision of the dense product: when the rows carry 16-bit values (the frozen layer computes in bf16/fp16 and
LoRA dropout is off: PEFT upcasts the bf16 input for fp32 adapters, and the output gradient is the upcast bf16
gradient) the product ``g^T x`` runs in TF32 on CUDA, which is exact for such operands (their 8- or 11-bit
significands fit TF32's, the products are exact and accumulate in fp32): the result equals the fp32 product up to
summation order, at the tensor-core rate.  Other rows use fp32.

Optional per-step statistics, computed as pairs arrive: sums of squared input/output rows (diagonal K-FAC), the
diagonal Shampoo sums ``diag(G^T G)``, ``diag(G G^T)``, and the gradient norm (exact in ``rows`` mode at step time;
in ``stream`` mode the sum over micro-batches of per-micro-batch norms, an upper bound that is exact for one).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..functional.lorsum import lowrank_sq_norm
from .layers import LoRALayer
from .observation import LayerObservation, RowBudgetExceeded

__all__ = ["LayerObservation", "GradientCapture", "RowBudgetExceeded"]

Probes = Union[Callable[[LoRALayer], Tuple[Tensor, Tensor]], Mapping[int, Tuple[Tensor, Tensor]]]


def _add(acc: Optional[Tensor], value: Tensor) -> Tensor:
    return value if acc is None else acc.add_(value)


# Tensor-core TF32 over fp32 SIMT, as a conservative planning ratio for choosing the dense product (H100: ~8x).
_TF32_SPEEDUP = 6.0


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)`` without a dispatcher call when it is already that dtype (this runs per layer per backward)."""
    return t if t.dtype == dtype else t.to(dtype)


class _TF32:
    """Allow TF32 for the products inside the block only (restored afterwards, whatever it was)."""

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev
        return False


_PLAIN = (Tensor, torch.nn.Parameter)


def _identity(layer: LoRALayer) -> tuple:
    return (id(layer.A), id(layer.B))


def _local_version(t: Tensor) -> Optional[int]:
    """The in-place version counter of ``t``'s storage: a plain tensor's own, a sharded (DTensor) factor's local
    shard's (an in-place load of a sharded checkpoint writes there); ``None`` for anything else."""
    if type(t) in _PLAIN:
        return t._version
    to_local = getattr(t, "to_local", None)
    if callable(to_local):
        with torch.no_grad():
            return to_local()._version  # a view of the local shard: it shares the shard's counter
    return None


def _stamp(layer: LoRALayer) -> Optional[tuple]:
    """``(id(A), A's version, id(B), B's version)``: host-side, no dispatcher call for plain tensors; for sharded
    factors the versions of their local shards; ``None`` when a version cannot be read."""
    a, b = layer.A, layer.B
    va, vb = _local_version(a), _local_version(b)
    if va is None or vb is None:
        return None
    return (id(a), va, id(b), vb)


def _sixteen_bit_rows(layer: LoRALayer) -> bool:
    """True when the rows the hooks see hold 16-bit values: the frozen layer computes in bf16/fp16 (so its input,
    upcast for fp32 adapters, and its output gradient are 16-bit values) and LoRA dropout is off (a dropout mask
    scaled by 1/(1-p) would leave the 16-bit grid).  Anything unrecognised answers False (fp32 products)."""
    base = getattr(layer.module, "base_layer", None)
    weight = getattr(base, "weight", None)
    if not isinstance(weight, Tensor) or weight.dtype not in (torch.bfloat16, torch.float16):
        return False
    dropout = getattr(layer.module, "lora_dropout", None)
    if dropout is not None:
        try:
            drop = dropout[layer.adapter] if layer.adapter is not None else dropout
        except (KeyError, TypeError):
            return False
        if isinstance(drop, torch.nn.Dropout):
            return drop.p == 0
        return isinstance(drop, torch.nn.Identity)
    return True


class GradientCapture:
    """Hooks on a set of LoRA layers that record ``(X, S)`` pairs per step.

    Args:
        layers: the layers to observe (kind ``linear`` or ``pointwise_conv``).
        mode: ``"rows"`` or ``"stream"`` (see the module docstring).
        probes: stream mode only: the fixed matrices the gradient is projected on, ``(L: (d_out, k_l),
            R: (d_in, k_r))`` per layer, as a mapping ``{layer.index: (L, R)}`` or a function ``probes(layer)``
            evaluated once per layer here.  Either may be left out and pushed later with :meth:`push_probes`; the
            hooks only read what was pushed (a layer without probes is an error when its gradient arrives).
        kfac_stats, shampoo_stats, grad_norm: which per-step statistics to accumulate.
        row_budget: rows mode only: an error once a layer holds more rows than this in one step.
        dense: ``"never"`` (keep rows / project rows, the reference) or ``"auto"`` (hold or project the dense
            micro-batch gradient where it is the smaller or cheaper form; see the module docstring).
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
        dense: str = "never",
    ):
        if mode not in ("rows", "stream"):
            raise ValueError(f"capture mode must be 'rows' or 'stream', got {mode!r}")
        if mode != "stream" and probes is not None:
            raise ValueError("`probes` are for stream mode only")
        self.layers = list(layers)
        self.mode = mode
        # Stream mode: layer index -> (L, R), set by the owner between backwards; the hooks only read it.
        self._probes: Dict[int, Tuple[Tensor, Tensor]] = {}
        # layer index -> identity and in-place version of A and B when its probes were pushed (plain tensors only).
        self._probe_stamps: Dict[int, Optional[tuple]] = {}
        self.kfac_stats = kfac_stats
        self.shampoo_stats = shampoo_stats
        self.grad_norm = grad_norm
        self.row_budget = row_budget
        if dense not in ("never", "auto"):
            raise ValueError(f"dense must be 'never' or 'auto', got {dense!r}")
        self.dense = dense
        self._sixteen: Dict[int, bool] = {}
        self.observations: Dict[int, LayerObservation] = {layer.index: LayerObservation() for layer in self.layers}
        self._pending_input: Dict[int, Optional[Tensor]] = {}
        self._handles: List[RemovableHandle] = []
        if probes is not None:
            if callable(probes):
                probes = {layer.index: probes(layer) for layer in self.layers}
            self.push_probes(probes)
        self.attach()

    # ------------------------------------------------------------------------------------------------ probes

    def push_probes(self, probes: Mapping[int, Tuple[Tensor, Tensor]]) -> None:
        """Set the stream-mode probes ``{layer.index: (L, R)}`` of some layers (others keep theirs).  Call it
        between backwards, never from one: the hooks read these as they are."""
        by_index = {layer.index: layer for layer in self.layers}
        for index, (left, right) in probes.items():
            layer = by_index[index]
            self._probes[index] = (left, right)
            self._probe_stamps[index] = _stamp(layer)

    def set_probes(self, index: int, left: Tensor, right: Tensor) -> None:
        """``push_probes({index: (left, right)})``."""
        self.push_probes({index: (left, right)})

    def clear_probes(self) -> None:
        self._probes.clear()
        self._probe_stamps.clear()

    def probes_of(self, layer: LoRALayer) -> Optional[Tuple[Tensor, Tensor]]:
        """The probes pushed for ``layer`` (``None``: none)."""
        return self._probes.get(layer.index)

    def probes_stale(self, layer: LoRALayer) -> bool:
        """Whether ``layer``'s factors (the same tensors) were changed in place since its probes were pushed (for a
        sharded (DTensor) factor: its local shard).  A factor replaced by another tensor object with the same values
        (accelerate's FSDP2 preparation) is not stale."""
        pushed = self._probe_stamps.get(layer.index)
        return pushed is not None and pushed[::2] == _identity(layer) and pushed != _stamp(layer)

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
                f"{layer.describe()}: fp16 gradients reached the LoRA hooks of a loraopt optimizer, which does not "
                "support fp16 training, with or without a GradScaler (without one fp16 gradients underflow; with "
                "one they carry the loss scale, which the optimizer never sees). Train in bf16 "
                "(torch.autocast(dtype=torch.bfloat16)) or fp32."
            )
        obs = self.observations[layer.index]
        obs.pairs += 1
        scaling = layer.scaling
        obs.scaling = scaling
        # Each tensor op costs tens of microseconds of host time and this runs for every layer in every backward:
        # detach only when a graph could be recorded (create_graph), reshape only what is not already rows.
        if torch.is_grad_enabled():
            x, g = x.detach(), g.detach()
        x_rows = x if x.dim() == 2 and layer.kind == "linear" else layer.to_rows(x)
        g_rows = g if g.dim() == 2 and layer.kind == "linear" else layer.to_rows(g)
        n = x_rows.shape[0]
        if n != g_rows.shape[0]:
            raise RuntimeError(
                f"{layer.describe()}: {n} input rows but {g_rows.shape[0]} output-gradient rows; the layer's lora_A "
                "and lora_B were not called once each per forward"
            )
        obs.n_rows += n
        s_inv = 1.0 / scaling
        if self.mode == "rows":
            # Shampoo statistics are computed once at step time from the whole step's G (exact under
            # accumulation, see observation()).
            if self._dense_rows(layer, obs) and obs.G is not None:
                self._gram(layer, g_rows, x_rows, s_inv, out=obs.G)  # accumulate in place: one launch
            elif self._dense_rows(layer, obs):
                gm = self._gram(layer, g_rows, x_rows, s_inv)
                if obs.x_rows:  # earlier micro-batches were kept as rows: fold them in, keep one representation
                    for xr, gr in zip(obs.x_rows, obs.g_rows):
                        gm = gm.add_(self._gram(layer, gr, xr, s_inv))
                    obs.x_rows.clear()
                    obs.g_rows.clear()
                obs.G = _add(obs.G, gm)
            else:
                if self.row_budget is not None and obs.n_rows > self.row_budget:
                    raise RowBudgetExceeded(
                        f"{layer.describe()}: {obs.n_rows} rows captured in one optimizer step, more than row_budget="
                        f"{self.row_budget}. Use inner_iters=0 (streaming Jacobi mode keeps no rows) or raise "
                        "row_budget."
                    )
                obs.x_rows.append(x_rows)
                obs.g_rows.append(g_rows)
        else:
            left, right = self._stream_probes(layer)
            if self._dense_stream(layer, n, left.shape[-1] + right.shape[-1]):
                gm = self._gram(layer, g_rows, x_rows, s_inv, left.dtype)  # products in the probes' dtype
                if obs.left is None:
                    obs.left, obs.right = left.mT @ gm, gm @ right
                else:
                    obs.left.addmm_(left.mT, gm)
                    obs.right.addmm_(gm, right)
                if self.grad_norm:
                    obs.grad_norm_bound = _add(obs.grad_norm_bound, torch.linalg.vector_norm(gm))
                if self.shampoo_stats:
                    self._shampoo_from_dense(obs, gm)
            else:
                xf, gf = _as(x_rows, left.dtype), _as(g_rows, left.dtype)
                # 1/s is applied to the small products, not to the (N, d_out) rows: no row-sized copy.
                obs.left = _add(obs.left, ((gf @ left).mT @ xf).mul_(s_inv))
                obs.right = _add(obs.right, (gf.mT @ (xf @ right)).mul_(s_inv))
                if self.grad_norm:
                    obs.grad_norm_bound = _add(obs.grad_norm_bound, lowrank_sq_norm(gf.mT, xf).sqrt() * s_inv)
                if self.shampoo_stats:
                    self._shampoo_from_rows(obs, g_rows, x_rows, s_inv)
        if self.kfac_stats:
            # One read of each row block (a norm reduction), instead of squaring into a row-sized temporary.
            x_sq = torch.linalg.vector_norm(_as(x_rows, torch.float32), dim=0).square_()
            s_sq = torch.linalg.vector_norm(_as(g_rows, torch.float32), dim=0).mul_(s_inv).square_()
            obs.x_sq = _add(obs.x_sq, x_sq)
            obs.s_sq = _add(obs.s_sq, s_sq)

    def _stream_probes(self, layer: LoRALayer) -> Tuple[Tensor, Tensor]:
        """The pushed probes of ``layer``, read as they are: an error, never a recomputation, when there are none or
        when the factors were edited in place after they were pushed."""
        probes = self._probes.get(layer.index)
        if probes is None:
            raise RuntimeError(
                f"{layer.describe()}: a gradient arrived in stream capture mode but no probes were pushed for this "
                "layer. The optimizer pushes them when it is built, after every step() and after load_state_dict(); "
                "if the capture is used on its own, call capture.push_probes({layer.index: (L, R)}) before backward."
            )
        if self.probes_stale(layer):
            raise RuntimeError(
                f"{layer.describe()}: the LoRA factors were changed in place after the optimizer computed the "
                "projections the gradient is captured on (at construction, the last step() or load_state_dict()), "
                "so this backward would project on the old factors. Call optimizer.zero_grad() after changing the "
                "factors and before backward: it refreshes the projections."
            )
        return probes

    # ------------------------------------------------------------------------------------------------ dense G

    def _is_sixteen(self, layer: LoRALayer) -> bool:
        flag = self._sixteen.get(layer.index)
        if flag is None:
            flag = self._sixteen[layer.index] = _sixteen_bit_rows(layer)
        return flag

    def _gram(
        self,
        layer: LoRALayer,
        g_rows: Tensor,
        x_rows: Tensor,
        s_inv: float,
        dtype: Optional[torch.dtype] = None,
        out: Optional[Tensor] = None,
    ) -> Tensor:
        """``S_m^T X_m = g^T x / s`` in ``dtype`` (default: the rows' dtype, at least fp32), on CUDA in TF32 when
        that is exact for the rows (see the module docstring).  With ``out``, added into it in place."""
        if dtype is None:
            dtype = out.dtype if out is not None else torch.promote_types(
                torch.promote_types(g_rows.dtype, x_rows.dtype), torch.float32
            )
        gf, xf = _as(g_rows, dtype), _as(x_rows, dtype)
        tf32 = (gf.is_cuda and dtype == torch.float32 and g_rows.dtype == torch.float32
                and x_rows.dtype == torch.float32 and self._is_sixteen(layer))
        with _TF32() if tf32 else contextlib.nullcontext():
            if out is not None:
                return out.addmm_(gf.mT, xf, alpha=s_inv)
            gm = gf.mT @ xf
        return gm.mul_(s_inv) if s_inv != 1.0 else gm

    def _tf32_ratio(self, layer: LoRALayer, x_rows_cuda: bool) -> float:
        return _TF32_SPEEDUP if x_rows_cuda and self._is_sixteen(layer) else 1.0

    def _dense_rows(self, layer: LoRALayer, obs: LayerObservation) -> bool:
        """Rows mode: hold ``G`` when it is smaller than the rows held so far (this micro-batch included)."""
        if self.dense != "auto":
            return False
        if obs.G is not None:
            return True
        return layer.d_in * layer.d_out <= obs.n_rows * (layer.d_in + layer.d_out)

    def _dense_stream(self, layer: LoRALayer, n: int, k: int) -> bool:
        """Stream mode: project the dense ``G_m`` when that costs fewer (rate-weighted) flops than projecting the
        ``n`` rows on ``k`` probe columns, counting the norm and Shampoo statistics each route needs.

        The flop model, not the size of ``G_m``, decides: choosing the dense product whenever ``G_m`` is smaller
        than the rows made PSI-LoRA K = 0 slower on the H100 (``benchmarks/notes/cost.md``, run 3), because the
        dense product grows with ``d_in d_out`` while the projections grow with ``k (d_in + d_out)``."""
        if self.dense != "auto":
            return False
        di, do = layer.d_in, layer.d_out
        speed = self._tf32_ratio(layer, layer.A.is_cuda)
        dense = 2.0 * n * di * do / speed + 2.0 * k * di * do
        rows = 4.0 * n * k * (di + do)
        if self.grad_norm:
            rows += 2.0 * min(n * n * (di + do), n * di * do)
        if self.shampoo_stats:
            rows += 4.0 * n * n * (di + do)
        return dense < rows

    def _shampoo_from_dense(self, obs: LayerObservation, gm: Tensor) -> None:
        sq = gm.square()
        obs.shampoo_in = _add(obs.shampoo_in, sq.sum(0))  # diag(G_m^T G_m)
        obs.shampoo_out = _add(obs.shampoo_out, sq.sum(1))  # diag(G_m G_m^T)

    def _shampoo_from_rows(self, obs: LayerObservation, g_rows: Tensor, x_rows: Tensor, s_inv: float) -> None:
        dtype = torch.promote_types(x_rows.dtype, torch.float32)
        xf, sf = x_rows.to(dtype), g_rows.to(dtype) * s_inv
        obs.shampoo_in = _add(obs.shampoo_in, (xf * ((sf @ sf.mT) @ xf)).sum(0))
        obs.shampoo_out = _add(obs.shampoo_out, (sf * ((xf @ xf.mT) @ sf)).sum(0))

    # ------------------------------------------------------------------------------------------------ access

    def observation(self, layer: LoRALayer) -> LayerObservation:
        """What ``layer`` recorded since the last clear.  In rows mode the Shampoo statistics are computed here,
        from the whole step's gradient: ``diag(G^T G)`` of the accumulated ``G``, exact under gradient accumulation
        (stream mode can only sum per-micro-batch statistics)."""
        obs = self.observations[layer.index]
        if self.mode == "rows" and self.shampoo_stats and not obs.empty and obs.shampoo_in is None:
            self._finish_shampoo(obs)
        return obs

    def observations_of(self, layers: Sequence[LoRALayer]) -> List[LayerObservation]:
        """``[observation(layer) for layer in layers]``, with the rows-mode Shampoo statistics of layers that share
        a shape (and row count) computed in one batched product per group instead of a few operations per layer:
        the same arithmetic on stacked operands."""
        observations = [self.observations[layer.index] for layer in layers]
        if self.mode != "rows" or not self.shampoo_stats:
            return observations
        groups: Dict[tuple, List[LayerObservation]] = {}
        for obs in observations:
            if obs.empty or obs.shampoo_in is not None:
                continue
            if obs.G is not None:
                key: tuple = ("dense", tuple(obs.G.shape), obs.G.dtype, obs.G.device)
            elif len(obs.x_rows) == 1:
                x, g = obs.x_rows[0], obs.g_rows[0]
                key = ("rows", obs.n_rows, x.shape[-1], g.shape[-1], x.dtype, g.dtype, obs.scaling, x.device)
            else:
                key = ("one", id(obs))
            groups.setdefault(key, []).append(obs)
        for key, group in groups.items():
            if len(group) == 1 or key[0] == "one":
                for layer_obs in group:
                    self._finish_shampoo(layer_obs)
                continue
            if key[0] == "dense":
                sq = torch.stack([obs.G for obs in group]).square()
                ins, outs = sq.sum(-2), sq.sum(-1)  # diag(G^T G), diag(G G^T) per layer
            else:
                g = torch.stack([obs.g_rows[0] for obs in group])
                s = g.to(torch.promote_types(g.dtype, torch.float32)) / group[0].scaling  # LayerObservation.rows
                x = torch.stack([obs.x_rows[0] for obs in group])
                dtype = torch.promote_types(x.dtype, torch.float32)
                xf, sf = _as(x, dtype), _as(s, dtype)
                ins = (xf * ((sf @ sf.mT) @ xf)).sum(-2)
                outs = (sf * ((xf @ xf.mT) @ sf)).sum(-2)
            for obs, v_in, v_out in zip(group, ins.unbind(0), outs.unbind(0)):
                obs.shampoo_in, obs.shampoo_out = v_in, v_out
        return observations

    def _finish_shampoo(self, obs: LayerObservation) -> None:
        if obs.G is not None:
            self._shampoo_from_dense(obs, obs.G)
        else:
            x, s = obs.rows()
            self._shampoo_from_rows(obs, s, x, 1.0)

    def clear(self) -> None:
        """Drop everything recorded (after a step, or on ``zero_grad``)."""
        for key in self.observations:
            self.observations[key] = LayerObservation()
