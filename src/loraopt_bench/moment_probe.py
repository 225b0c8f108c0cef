"""How far is Adafactor's rank-one second moment from Adam's, on a real fine-tuning run?  (issue 9)

PSI-LoRA's and Proj. PSI-LoRA's default step divides each entry of a layer's full-weight gradient ``G`` by the root
of a rank-one estimate of its second moment (``normalize="factored"``: ``V^_ij = r_i c_j / mean(r)`` from row and
column EMAs).  ``normalize="full"`` keeps Adam's per-entry EMA ``V`` instead.  On the one-epoch LM suite the full one
closed most of the gap to AdamW, on SST-2 and vision it changed little (``benchmarks/notes/psi.md`` §13).  This
probe trains with ``normalize="full"`` and, at the end, compares ``V`` with the rank-one estimate built from it.
Because every EMA is linear, the row and column means of ``V`` are exactly the factored step's row and column EMAs
over the same gradients, so ``V^`` is what the factored step would have used at this point.

For every adapted layer it reports, grouped by module name (``q_proj``, ``v_proj``, ...):

* ``rel_error``: ``|V - V^|_F / |V|_F``;
* ``weight`` quantiles: ``sqrt(V / V^)`` per entry, how much larger an entry's factored step is than Adam's (1 where
  the rank-one model holds; the 1 % and 99 % quantiles show its tails).

    python -m loraopt_bench.moment_probe --model smollm2 --task tinyshakespeare --steps 150 \
        --out benchmarks/results/moment_probe/lm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor

QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def rank_one_estimate(V: Tensor) -> Tensor:
    """``(d_out, d_in)``: Adafactor's estimate ``r_i c_j / mean(r)`` from the row means ``r`` and column means ``c``
    of the second moments ``V`` (exact when ``V`` has rank one)."""
    r, c = V.mean(dim=1), V.mean(dim=0)
    return torch.outer(r, c) / r.mean()


def compare_moments(V: Tensor) -> Dict[str, Any]:
    """The rank-one estimate's relative Frobenius error and the quantiles of ``sqrt(V / V^)`` (float64)."""
    V = V.detach().to("cpu", torch.float64).clamp_min(0.0)  # quantile's q must share the input's device
    est = rank_one_estimate(V)
    tiny = torch.finfo(torch.float64).tiny
    weight = ((V + tiny) / (est + tiny)).sqrt().flatten()
    q = torch.quantile(weight, torch.tensor(QUANTILES, dtype=torch.float64)) if weight.numel() <= 2 ** 24 else \
        torch.quantile(weight[torch.randperm(weight.numel())[: 2 ** 24]], torch.tensor(QUANTILES, dtype=torch.float64))
    return {"rel_error": float((V - est).norm() / V.norm().clamp_min(tiny)),
            "weight_quantiles": {f"{p:g}": float(v) for p, v in zip(QUANTILES, q)}}


def _module_kind(name: str) -> str:
    """``...layers.3.self_attn.q_proj.lora_A.default.weight`` -> ``q_proj``."""
    parts = name.split(".")
    return parts[parts.index("lora_A") - 1] if "lora_A" in parts else name


def probe(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> Dict[str, Any]:
    """Per module kind: the mean and worst ``rel_error`` over layers and the median of each weight quantile."""
    names = {p: n for n, p in model.named_parameters()}
    per_kind: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for param, state in optimizer.state.items():
        V = state.get("grad_entry_sq_avg") if isinstance(state, dict) else None
        if V is None:
            continue
        per_kind[_module_kind(names.get(param, "?"))].append(compare_moments(V))
    if not per_kind:
        raise ValueError("no layer holds a full second moment: train with normalize='full' (PSI-LoRA or Proj. "
                         "PSI-LoRA)")
    out: Dict[str, Any] = {}
    for kind, rows in sorted(per_kind.items()):
        errors = torch.tensor([r["rel_error"] for r in rows])
        out[kind] = {
            "layers": len(rows),
            "rel_error_mean": float(errors.mean()),
            "rel_error_max": float(errors.max()),
            "weight_quantiles_median": {p: float(torch.tensor([r["weight_quantiles"][p] for r in rows]).median())
                                        for p in rows[0]["weight_quantiles"]},
        }
    return out


def _markdown(result: Dict[str, Any], header: str) -> str:
    cols = list(QUANTILES)
    lines = [header, "", "| module | layers | rel. error mean (max) | " + " | ".join(f"q{p:g}" for p in cols) + " |",
             "| :--- | ---: | ---: | " + " | ".join("---:" for _ in cols) + " |"]
    for kind, row in result.items():
        qs = row["weight_quantiles_median"]
        lines.append(f"| {kind} | {row['layers']} | {row['rel_error_mean']:.2f} ({row['rel_error_max']:.2f}) | "
                     + " | ".join(f"{qs[f'{p:g}']:.2f}" for p in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .finetune import FinetuneConfig, run_finetune

    parser = argparse.ArgumentParser(prog="python -m loraopt_bench.moment_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--optimizer", default="proj-psi-lora", choices=("psi-lora", "proj-psi-lora"))
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", required=True, help="writes OUT.json and OUT.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = FinetuneConfig(
        model=args.model, task=args.task, optimizer=args.optimizer, lr=args.lr, steps=args.steps,
        batch_size=args.batch_size, block_size=args.block_size, max_length=args.max_length,
        image_size=args.image_size, eval_every=0, eval_limit=8, seed=args.seed, data_dir=args.data_dir,
        hp={"normalize": "full", "max_grad_norm": 0.0}, save_adapter=False, progress=False, device=args.device)
    start = time.perf_counter()
    result = run_finetune(config)
    seconds = time.perf_counter() - start
    report = probe(result.optimizer, result.model)
    record = {"command": "python -m loraopt_bench.moment_probe " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {k: getattr(args, k) for k in ("model", "task", "optimizer", "lr", "steps", "batch_size",
                                                      "block_size", "max_length", "image_size", "seed")},
              "seconds": seconds, "final_metric": result.metrics["final"], "modules": report}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump(record, fh, indent=2)
    text = _markdown(report, f"`{record['command']}` ({seconds:.0f} s): `sqrt(V / V^)` quantiles, median over layers")
    with open(args.out + ".md", "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
