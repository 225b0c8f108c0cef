"""How fast can the capture form a layer's dense gradient ``G_m = S^T X`` on this device?  (issue 12)

On SmolLM2 (8 x 2048 tokens, 210 adapted layers) the PSI capture forms each layer's ``G_m`` in backward: a product
with a long inner dimension (N = 16,384 rows) and a small output (576 x 576 and smaller), which keeps few output
tiles in flight.  This probe times the candidate ways of forming it, each on the layer shapes of one transformer
block, and prints the per-step total for the whole model:

* ``fp32``: plain fp32 (TF32 off);
* ``tf32``: what the capture does today for 16-bit rows;
* ``bf16->fp32``: bf16 operands (exact for 16-bit rows), fp32 accumulation and output (``out_dtype``), when the
  installed torch has it on this device;
* ``tf32-splitK{k}`` / ``bf16-splitK{k}``: the N rows cut into k chunks, one batched product, then a sum over the
  chunks (more output tiles in flight);
* ``cast``: the cost of casting one layer's fp32 rows to bf16 (the bf16 routes pay it).

Every variant is checked against a float64 product of the same bf16-valued operands (relative max error).

    python -m loraopt_bench.gram_probe --out benchmarks/results/cost/gram_probe
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

# SmolLM2-135M: hidden 576, kv 192, intermediate 1536; (d_out, d_in) of q, k, v, o, gate, up, down.
SMOL_BLOCK: List[Tuple[str, int, int]] = [
    ("q", 576, 576), ("k", 192, 576), ("v", 192, 576), ("o", 576, 576),
    ("gate", 1536, 576), ("up", 1536, 576), ("down", 576, 1536),
]


def _bf16_mm_fp32(a: Tensor, b: Tensor) -> Optional[Tensor]:
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return None


def _bf16_bmm_fp32(a: Tensor, b: Tensor) -> Optional[Tensor]:
    try:
        return torch.bmm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return None


def variants(split: List[int]) -> Dict[str, Callable[[Tensor, Tensor], Optional[Tensor]]]:
    """name -> f(g_rows fp32 (N, d_out), x_rows fp32 (N, d_in)) -> (d_out, d_in) fp32, or None if unsupported."""
    out: Dict[str, Callable[[Tensor, Tensor], Optional[Tensor]]] = {
        "fp32": lambda g, x: g.mT @ x,
        "tf32": lambda g, x: g.mT @ x,  # run under allow_tf32 (see _run)
        "bf16->fp32": lambda g, x: _bf16_mm_fp32(g.to(torch.bfloat16).mT, x.to(torch.bfloat16)),
    }
    for k in split:
        def tf32_split(g, x, k=k):
            n = g.shape[0] // k * k
            return torch.bmm(g[:n].reshape(k, -1, g.shape[1]).mT, x[:n].reshape(k, -1, x.shape[1])).sum(0)

        def bf16_split(g, x, k=k):
            n = g.shape[0] // k * k
            part = _bf16_bmm_fp32(g[:n].to(torch.bfloat16).reshape(k, -1, g.shape[1]).mT,
                                  x[:n].to(torch.bfloat16).reshape(k, -1, x.shape[1]))
            return None if part is None else part.sum(0)

        out[f"tf32-splitK{k}"] = tf32_split
        out[f"bf16-splitK{k}"] = bf16_split
    return out


def _time(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e3 / reps


def run(rows: int, blocks: int, split: List[int], reps: int, device: torch.device) -> Dict[str, object]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    table: Dict[str, Dict[str, float]] = {}
    errors: Dict[str, float] = {}
    flops_block = sum(2.0 * rows * do * di for _, do, di in SMOL_BLOCK)
    cast_ms = 0.0
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, do, di in SMOL_BLOCK:
            # bf16-valued fp32 rows, as the capture sees them for a bf16 base layer without dropout.
            g = torch.randn(rows, do, generator=gen).bfloat16().float().to(device)
            x = torch.randn(rows, di, generator=gen).bfloat16().float().to(device)
            exact = (g.double().mT @ x.double())
            cast_ms += _time(lambda: (g.to(torch.bfloat16), x.to(torch.bfloat16)), device, reps)
            for vname, fn in variants(split).items():
                torch.backends.cuda.matmul.allow_tf32 = vname.startswith("tf32")
                res = fn(g, x)
                if res is None:
                    table.setdefault(vname, {})["unsupported"] = 1.0
                    continue
                err = ((res.double() - exact).abs().max() / exact.abs().max()).item()
                errors[vname] = max(errors.get(vname, 0.0), err)
                ms = _time(lambda: fn(g, x), device, reps)
                table.setdefault(vname, {})[name] = ms
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    summary = {}
    for vname, per in table.items():
        if "unsupported" in per:
            summary[vname] = dict(unsupported=True)
            continue
        block_ms = sum(per.values())
        summary[vname] = dict(per_layer_ms=per, block_ms=block_ms, step_ms=block_ms * blocks,
                              tflops=flops_block / (block_ms * 1e-3) / 1e12, rel_max_err=errors[vname])
    return dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", torch=torch.__version__,
                rows=rows, blocks=blocks, cast_block_ms=cast_ms, variants=summary)


def main(argv: Optional[List[str]] = None) -> Dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16384, help="tokens per step (N)")
    p.add_argument("--blocks", type=int, default=30, help="transformer blocks (SmolLM2-135M: 30)")
    p.add_argument("--split", default="4,8,16", help="split-K chunk counts, comma separated")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="", help="folder for gram_probe.json")
    args = p.parse_args(argv)
    res = run(args.rows, args.blocks, [int(s) for s in args.split.split(",") if s], args.reps,
              torch.device(args.device))
    print(f"{res['device']}, torch {res['torch']}, N={res['rows']}, {res['blocks']} blocks; "
          f"bf16 casts of one block's rows: {res['cast_block_ms']:.3f} ms")
    print(f"{'variant':<16}{'block ms':>10}{'step ms':>10}{'TFLOP/s':>10}{'rel err':>10}")
    for vname, s in res["variants"].items():
        if s.get("unsupported"):
            print(f"{vname:<16}{'unsupported':>10}")
            continue
        print(f"{vname:<16}{s['block_ms']:>10.3f}{s['step_ms']:>10.2f}{s['tflops']:>10.1f}{s['rel_max_err']:>10.1e}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gram_probe.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
