"""Step time and peak memory per GPU of loraopt optimizers under FSDP2 vs DDP (issue 13's benchmark).

    torchrun --nproc_per_node 2 scripts/fsdp_bench.py --config 1b --out benchmarks/results/fsdp_1b.json
    torchrun --nproc_per_node 2 scripts/fsdp_bench.py --config 8b --modes fsdp2 ddp --out benchmarks/results/fsdp_8b.json
    torchrun --nproc_per_node 2 scripts/fsdp_bench.py --config 70b --modes fsdp2 --out benchmarks/results/fsdp_70b.json
    torchrun --nproc_per_node 2 scripts/fsdp_bench.py --smoke --out /tmp/fsdp_smoke.json     # CPU, gloo, tiny model

Random-weight Llama-shaped models in bf16 with fp32 LoRA adapters (r, targets and tokens as in
``benchmarks/cost.py``): ``1b`` = Llama-3.2-1B shapes (cost.py's 1b config), ``8b`` = Llama-3.1-8B shapes, ``70b``
= Llama-3.1-70B shapes (141 GB of bf16 weights: more than one H200 holds, so DDP cannot run it; FSDP2 over two
cards holds half each). Causal-LM loss on random tokens, ``--batch`` sequences of ``--seq`` tokens per rank.

Under FSDP2 every decoder layer and then the root are ``fully_shard``-ed (the models are built on the meta device
and materialised shard by shard, so the whole model never exists on one card); under DDP the whole model is on each
card. Per optimizer: median step time (forward + backward + optimizer step, CUDA events), the optimizer step
alone, and peak allocated memory per rank (max over ranks). Each loraopt optimizer is also reported as a ratio to
fused AdamW under the same mode. A configuration that fails (out of memory, an optimizer refusing FSDP2) is
recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Dict, List

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

OPTIMIZERS: List[tuple] = [
    ("adamw-fused", "adamw", dict(lr=1e-4, fused=True), "grad"),
    ("lora-plus", "lora-plus", dict(lr=1e-4), "grad"),
    # The plain step (clipped), the factories' default when results/fsdp was measured; the default is now
    # normalize="factored", which also keeps rows at K = 0 (no streaming capture).
    ("psi-k0", "psi-lora", dict(lr=1e-2, inner_iters=0, normalize=None, max_grad_norm=1.0), "grad"),
    ("psi-k1", "psi-lora", dict(lr=1e-2, inner_iters=1, normalize=None, max_grad_norm=1.0), "grad"),
    ("proj-psi-k0", "proj-psi-lora", dict(lr=1e-2, inner_iters=0, normalize=None, max_grad_norm=1.0), "grad"),
    ("scaled-psi", "scaled-psi-lora", dict(lr=0.2, normalize=None, max_grad_norm=1.0), "grad"),
    ("loko-scalar", "loko", dict(num_outputs=None, observation="loss", lr=1e-3), "loss"),
    ("svdlora", "svdlora", dict(lr=1e-2), "grad"),  # dense d_out x d_in step + SVD per layer: a reference only
]


def llama_config(name: str):
    from transformers import LlamaConfig

    common = dict(max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu", pad_token_id=0)
    if name == "smoke":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True, **common)
    if name == "1b":  # = benchmarks/cost.py's 1b (meta-llama/Llama-3.2-1B shapes)
        return LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                           rope_theta=500000.0, **common)
    if name == "8b":  # meta-llama/Llama-3.1-8B shapes
        return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                           **common)
    if name == "70b":  # meta-llama/Llama-3.1-70B shapes
        return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                           num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                           **common)
    raise ValueError(name)


def build(config: str, r: int, mode: str, device: torch.device):
    """The PEFT model, on ``device``: sharded with FSDP2 (materialised per shard) or whole (DDP)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    cfg = llama_config(config)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            base = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGET_MODULES),
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lcfg)  # fp32 adapters on the bf16 base (autocast_adapter_dtype)
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02, generator=gen)
    inner = model.base_model.model.model  # the rotary buffers were made on the meta device: rebuild them
    inner.rotary_emb = type(inner.rotary_emb)(config=cfg).to(device)
    model.train()
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return model, DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, model


def measure(args, config: str, mode: str, spec: tuple, device: torch.device) -> Dict[str, Any]:
    import loraopt

    label, name, hp, kind = spec
    res: Dict[str, Any] = dict(config=config, mode=mode, optimizer=label, world=dist.get_world_size(), r=args.r,
                               seq=args.seq, batch=args.batch)
    model = wrapped = opt = None
    try:
        model, wrapped = build(config, args.r, mode, device)
        hp = dict(hp)
        if device.type != "cuda":
            hp.pop("fused", None)
        opt = loraopt.create_optimizer(name, wrapped, **hp)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(1 + dist.get_rank())
        x = torch.randint(1, vocab, (args.batch, args.seq), generator=gen).to(device)

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        def one_step():
            sync()
            t0 = time.perf_counter()
            loss = wrapped(input_ids=x, labels=x).loss
            loss.backward()
            if kind == "loss":
                opt.observe(loss.detach())
            sync()
            t1 = time.perf_counter()
            opt.step()
            sync()
            t2 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            return (t2 - t0) * 1e3, (t2 - t1) * 1e3

        for _ in range(args.warmup):
            one_step()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = [one_step() for _ in range(args.steps)]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        stats = torch.tensor([statistics.median(t for t, _ in times), statistics.median(s for _, s in times),
                              float(peak)], dtype=torch.float64, device=device)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank and the fullest card
        res.update(e2e_ms=stats[0].item(), step_ms=stats[1].item(), peak_gib=stats[2].item() / 2**30)
    except Exception as exc:  # an OOM or a refusal must not lose the rest of the run
        res["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        if dist.get_rank() == 0:
            traceback.print_exc()
    finally:
        if opt is not None and hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
        del model, wrapped, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def ratios(results: List[Dict[str, Any]]) -> None:
    base = {(r["config"], r["mode"]): r for r in results if r["optimizer"] == "adamw-fused" and "error" not in r}
    for r in results:
        ref = base.get((r["config"], r["mode"]))
        if ref is not None and "error" not in r:
            r["e2e_vs_adamw"] = r["e2e_ms"] / ref["e2e_ms"]
            r["peak_vs_adamw"] = r["peak_gib"] / ref["peak_gib"] if ref["peak_gib"] else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="1b", choices=["1b", "8b", "70b", "smoke"])
    parser.add_argument("--modes", nargs="+", default=["fsdp2", "ddp"], choices=["fsdp2", "ddp"])
    parser.add_argument("--optimizers", nargs="+", default=None, help="labels (default: all but svdlora)")
    parser.add_argument("--r", type=int, default=64)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank (2 x 2048 x 2 ranks = cost.py's 8k)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny model, short sequences, CPU/gloo if no GPU")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.smoke:
        args.config, args.r, args.seq, args.batch, args.steps, args.warmup = "smoke", 4, 16, 2, 2, 1
    cuda = torch.cuda.is_available() and not (args.smoke and os.environ.get("FSDP_BENCH_CPU"))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    wanted = args.optimizers or [label for label, *_ in OPTIMIZERS if label != "svdlora"]
    specs = [spec for spec in OPTIMIZERS if spec[0] in wanted]
    results = []
    for mode in args.modes:
        for spec in specs:
            res = measure(args, args.config, mode, spec, device)
            results.append(res)
            if rank == 0:
                shown = res.get("error") or (f"{res['e2e_ms']:.1f} ms/step, step {res['step_ms']:.1f} ms, "
                                             f"peak {res['peak_gib']:.2f} GiB")
                print(f"[{args.config} {mode}] {spec[0]}: {shown}", flush=True)
    ratios(results)
    if rank == 0 and args.out:
        meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name(device) if cuda else "cpu",
                    world=dist.get_world_size())
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
