"""PSI-LoRA, Proj. PSI-LoRA and Scaled PSI-LoRA (arXiv 2602.16456; reference code github.com/zeligism/PSI-LoRA).

All three replace the LoRA step on the factors by a LoRSum projection of the *full-weight* step back to rank r,
where ``G = S^T X`` is captured per layer by hooks and never formed.  The update rule itself lives in one pure
function, :func:`loraopt.functional.psi.psi_step` (batched over layers of one shape).  Around it:
:mod:`.psi_base` discovers the layers, hooks them and holds the state; :mod:`.psi_step` gathers the tensors, calls
the functional step and writes the results back (with :mod:`.psi_gather` and :mod:`.psi_checks`).  This module
holds the three configurations and their factories:

* PSI-LoRA: ``Delta W <- LoRSum(Delta W - lr ((1 - d) c G + mu M))`` with a low-rank heavy-ball momentum
  ``M = M_B M_A <- LoRSum(mu M + (1 - d) c G)``, kept in balanced SVD form.
* Proj. PSI-LoRA: a momentum-free LoRSum of the weights, heavy ball in factor space (preconditioned factor
  gradients, transported to the new factors each step).
* Scaled PSI-LoRA: the LoRSum in a diagonal fractional-power K-FAC or Shampoo metric, with an EMA momentum.

Which to use (one epoch of SST-2 on MiniLM-L6, r = 8, 3 seeds, H200; ``benchmarks/notes/psi.md``): at the
factories' LoRA settings (with the head at 1e-3) PSI-LoRA reached 85.6 ± 0.2 % dev accuracy, Proj. PSI-LoRA
85.9 ± 0.4 % and Scaled PSI-LoRA 85.1 ± 0.4 %, against 86.6 ± 0.5 % for AdamW at its best lr: still slightly behind
AdamW, but far less sensitive to the lr (PSI-LoRA within 0.8 points over lr 0.01-0.1, where AdamW spans 20 points
over 3e-4-1e-2).

Implementation notes:
* K = 0 is the Jacobi round (the Riemannian-preconditioned / ScaledGD step), never a no-op.  At K = 0 the hooks of
  PSI-LoRA and Scaled PSI-LoRA stream the projections ``[B~ | M_B]^T G`` and ``G [A~ | M_A]^T`` and keep no rows
  (``capture="auto"``).
* Under ``torch.distributed`` every rank-local quantity is averaged (projections, statistics) so all ranks compute
  the update of the concatenated batch.  Under FSDP2 (``fully_shard``, DTensor factors) each step gathers the
  whole r x d factors it needs, computes that same update on every rank and writes back each rank's shard; build
  the optimizer after sharding, or let accelerate swap the sharded parameters in (followed at the next step).
* A step is all or nothing: a non-finite gradient, lr, loss or result anywhere leaves every parameter and every
  state tensor as it was, and is counted (``optimizer.skipped_steps``) and warned about.  A step with lr = 0
  allocates the state and changes nothing.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from ..functional.metrics import stack_or_scalar
from ..functional.psi import MetricInput
from ..lora.layers import NoLoRALayersError, split_lora_parameters
from .checks import check_nonnegative, check_positive, check_range
from .distributed import require_unsharded_model
from .psi_gather import compute_dtype
from .psi_step import _ProjectedSubspaceOptimizer

__all__ = [
    "PSILoRA",
    "ProjPSILoRA",
    "ScaledPSILoRA",
    "create_psi_lora_optimizer",
    "create_proj_psi_lora_optimizer",
    "create_scaled_psi_lora_optimizer",
]

_SCALED_LAM_FLOOR = 1e-5


_ARGS_DOC = r"""
    Args:
        params: ``model.named_parameters()`` (or groups with ``param_names``); ``None`` takes every trainable
            parameter of ``model``.  LoRA factors are paired by name; everything else is an "other" parameter.
        model: the (PEFT) model whose LoRA layers are hooked.
        lr: step size on Delta W (independent of alpha, r and rsLoRA: the math runs on the effective factors).
        inner_iters: K, alternating LoRSum rounds; 0 is the Jacobi (Riemannian-preconditioned) round.
        lmbd: proximal weight; lambda = lr * lmbd follows the learning-rate schedule.
        lmbd_momentum: proximal weight of the momentum LoRSum (default: ``lmbd``).
        rank_mult: momentum rank r_m = round(r * rank_mult).
        weight_decay: decoupled decay on Delta W (anchor coefficient 1 - lr * wd) and on other parameters.
        max_grad_norm: clip the full gradient (captured G of every layer plus other parameters' .grad) to this
            norm inside the optimizer; 0 disables.  Disable the trainer's own clipping: it never sees G.
        jitter: added to the diagonal of every r x r system.
        momentum_balance: ``"gram"`` (default) keeps the low-rank momentum in balanced SVD form after each update
            (``M_B = U sqrt(S)``, ``M_A = sqrt(S) V^T``; the product is unchanged), which keeps its solves well
            conditioned, reached from r_m x r_m Grams, Cholesky factors and an SVD in float64 without a QR of the
            tall factors (``functional.psi.balance_gram``: on CUDA a tall QR is one library call per matrix; on an
            H200 this cut the step's kernel launches 3-4.6x and PSI-LoRA K = 1's end-to-end time on SmolLM2-shaped
            layers from 1.66x to 1.29x fused AdamW, ``benchmarks/notes/cost.md``); ``"svd"`` reaches it with two
            thin QRs (the earlier default; equal up to the signs of the singular pairs, and rank-deficient factors,
            see ``balance_gram``); ``"polar"`` reaches a balanced pair (the same singular values, up to a rotation
            the step does not see) from batched products alone, with no host synchronisation, for CUDA-graph
            capture (``balance_polar``; about 150 more small kernels per step than ``"gram"`` when not captured);
            ``"norm"`` only equalises the factor norms; ``"none"`` is the reference code.
        normalize: ``None`` (the class's default: the paper's step), ``"factored"`` (the factories' default) or
            ``"layer"``: divide the captured full-weight gradient ``G`` by a running estimate of the root of its
            second moment, so that the step's entries have RMS about ``lr`` whatever the gradient's (and the
            loss's) scale, as in Adam; ``lr`` is then ~1000x smaller than without, and ``max_grad_norm=0`` goes with
            it (clipping would bring the scale back).  ``"factored"`` divides each entry ``G_ij`` by the root of
            ``r_i c_j / mean(r)``, where ``r`` and ``c`` are bias-corrected EMAs (rate ``normalize_beta2``) of the
            mean squared entry of each row and column of ``G`` (Adafactor's factored second moment: ``d_out + d_in``
            numbers of state per layer; ``G`` is formed once per step from the rows to get them).  ``"layer"``
            keeps one such number per layer.  ``"full"`` keeps Adam's second moment of every entry of ``G``
            (``d_out x d_in`` numbers per layer, more than the adapter, and the step takes the dense ``G``): more
            state than the factored one, so opt-in.  With Proj. PSI-LoRA at lr 5e-5 it was the best PSI-family
            setting on the one-epoch LM suite (3.277 +- 0.002 against 3.290 factored and AdamW's 3.271 +- 0.006;
            ``benchmarks/notes/psi.md`` §13); on vision it did no better than the factored step.  On SST-2, at lr
            1e-4 with a 6 % linear warm-up in the scheduler, it reached 87.3 +- 0.2 % against AdamW's 86.6 +- 0.5 %
            (§14).  All need
            the rows (no streaming capture); under data parallelism their statistics are the ranks' means of their
            local ones (a second moment at the per-rank batch).
            Measured (one-epoch H200 suites, ``benchmarks/notes/psi.md`` §10-11; AdamW 86.6 % / 3.271 / 92.1 %):
            Proj. PSI-LoRA factored at 3e-5 reached SST-2 86.4 ± 0.3 %, LM validation loss 3.290 ± 0.002, vision
            91.1 % (1e-4: 91.7 ± 0.2 %); layer-normalised at 3e-5 86.2 ± 0.8 %, 3.321 ± 0.024, 90.7 %; the plain
            step at lr 0.03 85.9 ± 0.4 %, 3.367, 90.5 ± 0.2 %.  In the 100-step EfficientNet demo at batch 16 (CPU)
            factored 3e-5 reached 82-85 %, layer 31-79 %, plain 84-86 %.  Too large an lr blows up while staying
            finite: factored 3e-4 reached an LM validation loss of 6.6 (PSI-LoRA).
        normalize_beta2: EMA rate of the step normalisations' second moments.
        reference_compat: reproduce the reference code where it differs from the paper, which is only at K = 0
            (its unscaled LoRSum is a no-op there: plain PSI-LoRA does not move and no momentum updates).  For
            comparisons with published runs; it changes nothing at K >= 1.
        capture: ``"auto"`` (stream at K = 0, rows otherwise), ``"rows"`` or ``"stream"``.
        row_budget: rows mode: error when a layer captures more rows than this in one step.
        seed: seeds the momentum subspace M_A per layer (identical on every rank).
        strict: a layer with a gradient but no captured activations is an error (else one warning, skipped).
        process_group: the group to average rank-local data over (default: the world, when initialised).
        foreach: update all layers of one shape with batched products and batched r x r solves (the fast path,
            default); ``False`` runs the per-layer reference loop (same math, tested equal in float64).
        dense: ``"auto"`` holds a layer's gradient as the dense ``d_out x d_in`` matrix instead of its rows when
            that is smaller (rows mode), and projects the dense micro-batch gradient when that is cheaper (stream
            mode); ``"never"`` keeps the row forms.  Same math either way.
        compile: run the batched step through ``torch.compile`` (``True``), eagerly (``False``, the default), or
            ``"auto"`` (compiled on CUDA, eager elsewhere).  Off by default because it did not pay on an H200
            (``benchmarks/notes/cost.md``): about 20 s of compilation at the first step, end-to-end ratios to fused
            AdamW within run-to-run noise of the eager step on SmolLM2-shaped runs, and Scaled PSI-LoRA 43x slower
            than eager there (it recompiled).  Each bucket shape compiles at its first step; if the compiler fails,
            one warning and the eager step from then on (same math; ``foreach=False`` and distributed runs always
            step eagerly).
        cuda_graph: capture each bucket's functional step in a CUDA graph at its first step and replay it after
            (``functional.psi.GraphedPSIStep``): one launch instead of hundreds, for the launch-bound step.  Needs
            fixed shapes (a new batch shape or row count is a new capture) and takes its lr and other changing
            hyperparameters from device scalars, so schedulers work.  CUDA only (eager elsewhere), not with
            ``compile`` or ``foreach=False``; distributed runs and any capture failure (one warning) step eagerly.
            The capture uses cuSOLVER for its r x r solves (MAGMA's batched solve cannot be captured).  Off by
            default: on an H200 it cut SmolLM2-shaped PSI-LoRA K = 1's isolated step from 45-88 ms to 28 ms, but
            not its end-to-end time beyond run-to-run noise (1.55-1.74x fused AdamW; the row capture in forward and
            backward now costs more than the step, ``benchmarks/notes/cost.md``).
"""


class PSILoRA(_ProjectedSubspaceOptimizer):
    __doc__ = (
        """PSI-LoRA: proximal subspace iteration with a low-rank heavy-ball momentum.

    Per LoRA layer: ``Delta W <- LoRSum_r(Delta W - lr ((1 - dampening) c G + momentum * M))`` and
    ``M <- LoRSum_{r_m}(momentum * M + (1 - dampening) c G)``.  Other trainable parameters: SGD with momentum or
    AdamW (``other_optimizer``).  Build it with ``loraopt.create_optimizer("psi-lora", model)``: the factory's
    defaults are the recommended settings (``normalize="factored"`` at lr 3e-5, no clipping, K = 1, momentum 0.9,
    an AdamW head at 3e-3); this class's own defaults are the paper's (the plain step, no momentum, no clipping,
    SGD for the other parameters).
"""
        + _ARGS_DOC
        + """        momentum, dampening: heavy-ball coefficients (torch.optim.SGD convention).
        other_optimizer: the rule for parameters that are not LoRA factors: ``"sgd"`` (SGD with this group's
            momentum, the reference) or ``"adam"`` (AdamW with ``adam_betas``, ``adam_eps``).
    """
    )

    _factory_name = "create_psi_lora_optimizer"

    def __init__(
        self,
        params: Optional[Iterable] = None,
        *,
        model: nn.Module,
        lr: float,
        inner_iters: int = 1,
        lmbd: float = 1e-2,
        lmbd_momentum: Optional[float] = None,
        momentum: float = 0.0,
        dampening: float = 0.0,
        rank_mult: float = 1.0,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        jitter: float = 1e-6,
        momentum_balance: str = "gram",
        momentum_prox: Optional[float] = None,
        normalize: Optional[str] = None,
        normalize_beta2: float = 0.999,
        other_optimizer: str = "sgd",
        adam_betas: Tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        reference_compat: bool = False,
        capture: str = "auto",
        row_budget: Optional[int] = 1 << 20,
        seed: int = 0,
        strict: bool = True,
        process_group: Optional[Any] = None,
        foreach: bool = True,
        dense: str = "auto",
        compile: Union[bool, str] = False,
        cuda_graph: bool = False,
    ):
        # The shared hyperparameters are checked by the base class (check_shared_hyperparameters).
        check_range("momentum", momentum, 0.0, 1.0)
        check_range("dampening", dampening, 0.0, 1.0)
        if other_optimizer not in ("sgd", "adam"):
            raise ValueError(f"other_optimizer must be 'sgd' or 'adam', got {other_optimizer!r}")
        defaults = dict(
            lr=lr, inner_iters=inner_iters, lmbd=lmbd, lmbd_momentum=lmbd if lmbd_momentum is None else lmbd_momentum,
            momentum=momentum, dampening=dampening, rank_mult=rank_mult, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, jitter=jitter, momentum_balance=momentum_balance, momentum_prox=momentum_prox,
            other_optimizer=other_optimizer, adam_betas=adam_betas, adam_eps=adam_eps,
            reference_compat=reference_compat, normalize=normalize, normalize_beta2=normalize_beta2,
        )
        super().__init__(
            params, model, defaults, capture=capture, row_budget=row_budget, seed=seed, strict=strict,
            process_group=process_group, foreach=foreach, dense=dense, compile=compile, cuda_graph=cuda_graph,
        )

    def _coefficients(self, group):
        return 1.0 - group["dampening"], group["momentum"]


class ProjPSILoRA(PSILoRA):
    __doc__ = (
        """Proj. PSI-LoRA: a momentum-free LoRSum step with heavy-ball momentum kept in factor space.

    Per LoRA layer: ``Delta W <- LoRSum_r(Delta W - lr (1 - dampening) c G)``; then, at the new factors, the
    preconditioned factor gradients ``g_A = (B^T B + lam I)^-1 B^T G``, ``g_B = G A^T (A A^T + lam I)^-1``, the old
    buffers transported to the new factors (``T_A = (B^T B + lam I)^-1 B^T B_prev buf_A``, likewise ``T_B``),
    ``buf <- momentum T + (1 - dampening) c g`` and ``A -= lr momentum T_A``, ``B -= lr momentum T_B``
    (docs/specs/psi-lora.md §3b; the variant the paper's authors ran on GLUE).  The momentum costs two factor-shaped
    buffers per factor and no extra LoRSum.  Other trainable parameters: SGD with momentum.
    Build it with :func:`create_proj_psi_lora_optimizer` or ``loraopt.create_optimizer("proj-psi-lora", model)``.
"""
        + _ARGS_DOC
        + """        momentum, dampening: heavy-ball coefficients (torch.optim.SGD convention).
        (``rank_mult``, ``lmbd_momentum`` and ``momentum_balance`` do not apply: the buffers have the factors'
        shapes.)  The gradient is held as rows or as the dense ``G`` (never streamed), since it is projected on
        the new factors.
    """
    )

    _factory_name = "create_proj_psi_lora_optimizer"
    _variant = "proj"


class ScaledPSILoRA(_ProjectedSubspaceOptimizer):
    __doc__ = (
        """Scaled PSI-LoRA: LoRSum in a diagonal, fractional-power K-FAC or Shampoo metric.

    Per LoRA layer: ``v_in, v_out <- EMA_beta2(stat(X, S))``, ``P = (v + damping)^power``, then the weighted LoRSum
    of ``Delta W - lr P_out^-1 ((1 - beta1) c G + beta1 M) P_in^-1`` and ``M <- LoRSum(beta1 M + (1 - beta1) c G)``.
    At K = 0 (default) this is damped diagonal K-FAC with power p applied to each factor.  Other trainable
    parameters: Adam (bias-corrected, decoupled weight decay) with their group's lr.
    Build it with ``loraopt.create_optimizer("scaled-psi-lora", model)``: the factory's defaults are the recommended
    settings (``normalize="factored"`` at lr 3e-4 without clipping, ``metric_scale="relative"``, bias correction,
    damping 1e-2, ``momentum_prox=1e-2``, head at 3e-3); this class's own defaults are the paper's plain step and
    metric, which collapsed above lr 0.06 on MiniLM / SST-2.
"""
        + _ARGS_DOC
        + """        betas: (beta1, beta2): momentum EMA and metric EMA (no bias correction).
        damping, power: P = (v + damping) ** power.
        metric: ``"kfac"`` (EMA of squared input / output rows) or ``"shampoo"`` (diag(G^T G), diag(G G^T)).
        loss_reduction: ``"mean"`` or ``"sum"``: how the loss reduces over rows (undoes 1/N inside S for the metric).
        adam_betas, adam_eps: Adam for the other parameters.
        bias_correction: use the metric EMA with its unit start removed (``(v - beta2^t) / (1 - beta2^t)``).
        metric_scale: ``"absolute"`` (the paper: ``P = (v + damping)^power``) or ``"relative"`` (damping relative
            to mean(v) and ``P`` normalised to mean 1 per layer: the metric redistributes the step, the lr sets its
            size, whatever the loss's scale).
    """
    )

    _factory_name = "create_scaled_psi_lora_optimizer"
    _scaled = True

    def __init__(
        self,
        params: Optional[Iterable] = None,
        *,
        model: nn.Module,
        lr: float,
        inner_iters: int = 0,
        lmbd: float = 1e-2,
        lmbd_momentum: Optional[float] = None,
        betas: Tuple[float, float] = (0.9, 0.99),
        damping: float = 1e-5,
        power: float = 0.5,
        metric: str = "kfac",
        loss_reduction: str = "mean",
        rank_mult: float = 1.0,
        weight_decay: float = 0.0,
        max_grad_norm: float = 1.0,
        adam_betas: Tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        bias_correction: bool = False,
        metric_scale: str = "absolute",
        jitter: float = 1e-6,
        momentum_balance: str = "gram",
        momentum_prox: Optional[float] = None,
        normalize: Optional[str] = None,
        normalize_beta2: float = 0.999,
        reference_compat: bool = False,
        capture: str = "auto",
        row_budget: Optional[int] = 1 << 20,
        seed: int = 0,
        strict: bool = True,
        process_group: Optional[Any] = None,
        foreach: bool = True,
        dense: str = "auto",
        compile: Union[bool, str] = False,
        cuda_graph: bool = False,
    ):
        # The shared hyperparameters are checked by the base class (check_shared_hyperparameters).
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        check_range("betas[0]", betas[0], 0.0, 1.0)
        check_range("betas[1]", betas[1], 0.0, 1.0)
        check_positive("damping", damping)
        check_range("power", power, 0.0, 1.0, high_inclusive=True)
        if metric not in ("kfac", "shampoo"):
            raise ValueError(f"metric must be 'kfac' or 'shampoo', got {metric!r}")
        if metric_scale not in ("absolute", "relative"):
            raise ValueError(f"metric_scale must be 'absolute' or 'relative', got {metric_scale!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        defaults = dict(
            lr=lr, inner_iters=inner_iters, lmbd=lmbd, lmbd_momentum=lmbd if lmbd_momentum is None else lmbd_momentum,
            betas=tuple(betas), damping=damping, power=power, metric=metric, loss_reduction=loss_reduction,
            rank_mult=rank_mult, weight_decay=weight_decay, max_grad_norm=max_grad_norm, adam_betas=adam_betas,
            adam_eps=adam_eps, bias_correction=bool(bias_correction), metric_scale=metric_scale, jitter=jitter,
            other_optimizer="adam", momentum_balance=momentum_balance, momentum_prox=momentum_prox,
            reference_compat=reference_compat, normalize=normalize, normalize_beta2=normalize_beta2,
        )
        self._loss_reduction = loss_reduction
        super().__init__(
            params, model, defaults, capture=capture, row_budget=row_budget, seed=seed, strict=strict,
            process_group=process_group, foreach=foreach, dense=dense, compile=compile, cuda_graph=cuda_graph,
        )

    def _coefficients(self, group):
        beta1 = group["betas"][0]
        return 1.0 - beta1, beta1

    def _lam(self, group):
        return max(group["lr"] * group["lmbd"], _SCALED_LAM_FLOOR)

    def _mean_loss(self, obs):
        return self._loss_reduction == "mean"

    def _init_metric_state(self, layer):
        # The reference starts the EMA at one; a bias-corrected EMA starts at zero (functional.metrics.debias).
        group = self.param_groups[self._group_index(layer)]
        start = torch.zeros if group.get("bias_correction", False) else torch.ones
        dtype = compute_dtype(layer)
        self.state[layer.A]["metric_in"] = start(layer.d_in, device=layer.A.device, dtype=dtype)
        self.state[layer.B]["metric_out"] = start(layer.d_out, device=layer.B.device, dtype=dtype)

    def _metric_input(self, group, layers, reds) -> MetricInput:
        """The stacked metric EMAs and this step's statistics (``(L, d_in)``, ``(L, d_out)``)."""
        beta2 = group["betas"][1]
        device = layers[0].A.device
        v_in = torch.stack([self.state[layer.A]["metric_in"] for layer in layers])
        v_out = torch.stack([self.state[layer.B]["metric_out"] for layer in layers])
        if group["metric"] == "kfac":
            n = stack_or_scalar([red["n_rows"] for red in reds], device)
            stat_in = torch.stack([red["x_sq"] for red in reds]) / n
            k2 = stack_or_scalar([red["s_sq_scale"] for red in reds], device)
            stat_out = torch.stack([red["s_sq"] for red in reds]) * (k2 / n)
        else:
            k2 = stack_or_scalar([red["shampoo_scale"] for red in reds], device)
            stat_in = torch.stack([red["shampoo_in"] for red in reds]) * k2
            stat_out = torch.stack([red["shampoo_out"] for red in reds]) * k2
        # The step counter is a CPU tensor: its value is a host number (no device sync).
        step = float(self.state[layers[0].A]["step"]) + 1.0
        return MetricInput(v_in, v_out, stat_in, stat_out, beta2=beta2, damping=group["damping"],
                           power=group["power"], step=step, bias_correction=group.get("bias_correction", False),
                           relative=group.get("metric_scale", "absolute") == "relative")


# ------------------------------------------------------------------------------------------------- factories


def _groups(
    model: nn.Module, other_lr: float, other_momentum: Optional[float] = None, other_weight_decay: Optional[float] = None
) -> List[Dict[str, Any]]:
    """The factories' two parameter groups: the paired LoRA factors, and every other trainable parameter with the
    ``other_*`` values that are given (``None``: the LoRA group's)."""
    check_nonnegative("other_lr", other_lr)
    require_unsharded_model(model, "PSI-LoRA")
    split = split_lora_parameters(model)
    if not split.layers:
        raise NoLoRALayersError(
            "no trainable LoRA layer found: wrap the model with peft.get_peft_model(model, LoraConfig(...)) first"
        )
    lora = split.lora_named_parameters()
    groups = [dict(params=[p for _, p in lora], param_names=[n for n, _ in lora])]
    if split.other:
        overrides = dict(lr=other_lr, momentum=other_momentum, weight_decay=other_weight_decay)
        groups.append(dict(params=[p for _, p in split.other], param_names=[n for n, _ in split.other],
                           **{k: v for k, v in overrides.items() if v is not None}))
    return groups


# The recommended settings (the factories' defaults): the factored step normalisation (Adafactor's second moment of
# the full-weight gradient, no clipping) at lr 3e-5, from the one-epoch H200 suites (benchmarks/notes/psi.md §11):
# against the plain step at its best default (lr 0.03, clipping at 1) it gained on all three (Proj. PSI-LoRA: SST-2
# 86.4 +- 0.3 % against 85.9 +- 0.4, LM validation loss 3.290 +- 0.002 against 3.367, vision 91.1 % (1 seed) against
# 90.5 +- 0.2; PSI-LoRA: 86.0 / 3.303 / 90.5 against 85.6 / 3.363 / 90.0, 1 seed each) and in 60 steps of SST-2
# (77 % against 54 %, CPU), and lost 0.4 points in `loraopt demo` (100 steps of batch 16, EfficientNet: 85.8 / 83.6 %
# against 86.2 / 84.0 %, CPU). The AdamW head at 3e-3 learns much faster than at 1e-3.
PSI_DEFAULTS = dict(lr=3e-5, inner_iters=1, lmbd=1e-2, momentum=0.9, max_grad_norm=0.0, normalize="factored",
                    other_optimizer="adam")
# The plain step of the paper (SGD on the full weight, clipped), the defaults before the factored normalisation:
# create_optimizer("psi-lora", model, **PSI_PLAIN_SETTINGS). lr 0.03 was its best on SST-2 (3 seeds); 0.1, better for
# 60-step text runs, was unstable on EfficientNet (100 steps: 62-66 % against 83-87 % at 0.03).
PSI_PLAIN_SETTINGS = dict(lr=3e-2, max_grad_norm=1.0, normalize=None)
# The per-layer normalised step at its best lr (benchmarks/notes/psi.md §10), superseded by the factored default:
# one second-moment number per layer instead of one per row and column; better than the plain step on the three
# one-epoch suites, behind the factored one on each (SST-2 86.1 / 86.2 %, LM 3.311 / 3.321, vision 90.4 / 90.7 %),
# and too large a step for the 100-step, batch-16 EfficientNet demo (79 / 31 %).
PSI_NORMALIZED_SETTINGS = dict(lr=3e-5, max_grad_norm=0.0, normalize="layer")
OTHER_ADAM_LR = 3e-3
# Scaled PSI-LoRA's defaults since benchmarks/notes/psi.md §12: the factored step normalisation (as PSI-LoRA's) at lr
# 3e-4, no clipping, on top of the scale-free metric. Against the plain step at lr 0.3 (SCALED_PLAIN_SETTINGS, the
# defaults before) it was ahead on every one-epoch suite (H200, 3 seeds for the factored step: SST-2 85.9 +- 0.2
# against 85.1 +- 0.4 %, LM 3.324 +- 0.027 against 3.383, vision 90.5 +- 0.0 against 89.6 %; 3e-4 was its best lr on
# each, notes/psi.md §13), after 60 CPU steps of SST-2 (77.0 against 52.1 %) and in the
# 100-step EfficientNet demo (85.2 against 81.0 %). Its window above is narrow: at 1e-3 the demo collapsed (8.6 %)
# and SST-2 lost 3 points (82.8 %); 1e-4 gave 83.4 % in the demo.
SCALED_DEFAULTS = dict(lr=3e-4, normalize="factored", max_grad_norm=0.0, metric_scale="relative",
                       bias_correction=True, damping=1e-2, momentum_prox=1e-2, other_lr=OTHER_ADAM_LR)
# The plain step (the gradient clipped at 1.0, not normalised) at lr 0.3: Scaled PSI-LoRA's defaults before
# notes/psi.md §12, restored by create_optimizer("scaled-psi-lora", model, **SCALED_PLAIN_SETTINGS).
SCALED_PLAIN_SETTINGS = dict(lr=0.3, normalize=None, max_grad_norm=1.0)


def _heavy_ball_factory(cls: type, name: str, doc: str):
    """The factory of PSI-LoRA or Proj. PSI-LoRA (``cls``): both take these arguments, with these defaults."""

    def factory(
        model: nn.Module,
        *,
        lr: float = PSI_DEFAULTS["lr"],
        inner_iters: int = PSI_DEFAULTS["inner_iters"],
        lmbd: float = PSI_DEFAULTS["lmbd"],
        momentum: float = PSI_DEFAULTS["momentum"],
        max_grad_norm: float = PSI_DEFAULTS["max_grad_norm"],
        normalize: Optional[str] = PSI_DEFAULTS["normalize"],
        other_optimizer: str = PSI_DEFAULTS["other_optimizer"],
        other_lr: Optional[float] = None,
        other_momentum: Optional[float] = None,
        other_weight_decay: Optional[float] = None,
        **kwargs: Any,
    ):
        if other_lr is None:
            # Adam on a head wants an Adam learning rate, not the LoRA step on Delta W; SGD follows the LoRA group.
            other_lr = OTHER_ADAM_LR if other_optimizer == "adam" else lr
        groups = _groups(model, other_lr, other_momentum, other_weight_decay)
        return cls(groups, model=model, lr=lr, inner_iters=inner_iters, lmbd=lmbd, momentum=momentum,
                   max_grad_norm=max_grad_norm, normalize=normalize, other_optimizer=other_optimizer, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__annotations__["return"] = cls
    factory.forwards_to = cls  # type: ignore[attr-defined]  (the registry lists cls's keywords too)
    return factory


create_psi_lora_optimizer = _heavy_ball_factory(
    PSILoRA,
    "create_psi_lora_optimizer",
    """PSI-LoRA (arXiv 2602.16456) over a PEFT LoRA model, with the recommended settings as defaults.

    Two parameter groups: ``lora`` (paired factors) and ``other`` (every other trainable parameter).  The other
    parameters take AdamW at ``other_lr`` (default 3e-3) or, with ``other_optimizer="sgd"`` (the reference), SGD
    with momentum at ``other_lr`` / ``other_momentum`` (default: ``lr`` / ``momentum``).  Defaults: the factored
    step normalisation (``normalize="factored"``: each entry of the full-weight gradient divided by the root of
    Adafactor's rank-one estimate of its second moment) at lr 3e-5, no clipping, K = 1, heavy-ball momentum 0.9
    (kept in balanced SVD form), the other parameters' AdamW at 3e-3 (``benchmarks/notes/psi.md`` §11).
    ``**PSI_PLAIN_SETTINGS`` (lr 0.03, clipping at 1.0, ``normalize=None``) is the paper's plain step, the earlier
    defaults.  Remaining keyword arguments are :class:`PSILoRA` arguments.
    """,
)

create_proj_psi_lora_optimizer = _heavy_ball_factory(
    ProjPSILoRA,
    "create_proj_psi_lora_optimizer",
    """Proj. PSI-LoRA (arXiv 2602.16456, factor-space momentum) over a PEFT LoRA model, with the recommended
    settings as defaults (as :func:`create_psi_lora_optimizer`).  Remaining keyword arguments are
    :class:`ProjPSILoRA` arguments.
    """,
)


def create_scaled_psi_lora_optimizer(
    model: nn.Module,
    *,
    lr: float = SCALED_DEFAULTS["lr"],
    normalize: Optional[str] = SCALED_DEFAULTS["normalize"],
    max_grad_norm: float = SCALED_DEFAULTS["max_grad_norm"],
    metric_scale: str = SCALED_DEFAULTS["metric_scale"],
    bias_correction: bool = SCALED_DEFAULTS["bias_correction"],
    damping: float = SCALED_DEFAULTS["damping"],
    momentum_prox: Optional[float] = SCALED_DEFAULTS["momentum_prox"],
    other_lr: float = SCALED_DEFAULTS["other_lr"],
    other_weight_decay: Optional[float] = None,
    **kwargs: Any,
) -> ScaledPSILoRA:
    """Scaled PSI-LoRA (arXiv 2602.16456) over a PEFT LoRA model, with the recommended settings as defaults.

    Two parameter groups: ``lora`` and ``other`` (Adam at ``other_lr``; a scheduler scales both groups, so the
    other parameters follow the LoRA schedule).  Defaults: the factored step normalisation
    (``normalize="factored"``, as PSI-LoRA's) at lr 3e-4 without clipping, the scale-free metric
    (``metric_scale="relative"``, bias-corrected, damping 1e-2 relative to the metric's mean) and a momentum whose
    proximal weight follows its own scale (``momentum_prox=1e-2``) (``benchmarks/notes/psi.md`` §12).  Keep the lr
    at or below 3e-4: 1e-3 collapsed in the EfficientNet demo.  ``**SCALED_PLAIN_SETTINGS`` (lr 0.3, clipping at
    1.0, ``normalize=None``) is the plain step, the earlier defaults.  The paper's settings are
    ``metric_scale="absolute", bias_correction=False, damping=1e-5, momentum_prox=None`` (lr 0.2 there; on MiniLM /
    SST-2 they collapse above lr 0.06).  Remaining keyword arguments are :class:`ScaledPSILoRA` arguments.
    """
    groups = _groups(model, other_lr, other_weight_decay=other_weight_decay)
    return ScaledPSILoRA(groups, model=model, lr=lr, normalize=normalize, max_grad_norm=max_grad_norm,
                         metric_scale=metric_scale, bias_correction=bias_correction, damping=damping,
                         momentum_prox=momentum_prox, **kwargs)


create_scaled_psi_lora_optimizer.forwards_to = ScaledPSILoRA  # type: ignore[attr-defined]
