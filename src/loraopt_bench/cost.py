"""Cost of every optimizer on Llama-shaped models: step time, optimizer-step time, peak memory, state bytes.

    python -m loraopt_bench.cost run --label after --out DIR          # on a CUDA machine
    python -m loraopt_bench.cost run --smoke --out /tmp/cost            # CPU pipeline check, tiny model
    python -m loraopt_bench.cost report --runs before=B.json after=A.json --before before --json OUT.json --md OUT.md
    python -m loraopt_bench.cost levers --compare-eager --out DIR      # issue 12: one H200 command, < 4 minutes
    python -m loraopt_bench.cost levers --quick --compare-eager --out /tmp/levers   # CPU smoke of the same

What is measured (issue 5; ``benchmarks/notes/cost.md`` has the reading):

* Models with random weights, bf16 base weights, PEFT LoRA (fp32 adapters: ``get_peft_model``'s default
  ``autocast_adapter_dtype=True``) on q/k/v/o/gate/up/down, ``lora_alpha = 2 r``, no dropout, SDPA attention.
  ``smol`` is the SmolLM2-135M configuration, ``1b`` the Llama-3.2-1B configuration.  Causal-LM loss on random
  tokens.  ``cls`` is ``smol`` as ``LlamaForSequenceClassification`` with 10 labels (head in ``modules_to_save``).
* Per (configuration, optimizer): ``warmup`` steps, then ``steps`` timed steps, each with CUDA events around
  forward+backward (or forward+observe for LoKO-softmax) and around ``optimizer.step()``; medians are reported.
  The host time of ``step()`` is recorded too (a step whose host time exceeds its device time is launch-bound).
  Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps (weights included).  State bytes are the
  tensor bytes of ``optimizer.state_dict()["state"]`` per trainable parameter.
* Ceilings measured in the same run: device-to-device copy bandwidth (bytes read + written), and 8192^3 matrix
  products in bf16, fp32 (TF32 off, the library's setting) and TF32.
* For each optimizer's isolated step, a byte and flop count of what the step must touch (``_floor``), and the
  fraction of that floor reached.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import time
import traceback
from typing import Any, Dict, List, Optional

import torch

from .common import feed, versions

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# (name, hyperparameters, kind): kind "grad" = backward + step, "loss" = LoKO-scalar, "softmax" = LoKO observe.
OPTIMIZERS: List[tuple] = [
    ("adamw-fused", "adamw", dict(lr=1e-4, fused=True), "grad"),
    ("lora-plus", "lora-plus", dict(lr=1e-4), "grad"),
    ("riemannian-adamw", "riemannian-adamw", dict(lr=1e-4), "grad"),
    # The plain step (an SGD lr, clipped), as when this table was measured; the factories' default is now
    # normalize="factored" (the levers table below times the defaults).
    ("psi-k0", "psi-lora", dict(lr=1e-2, inner_iters=0, normalize=None, max_grad_norm=1.0), "grad"),
    ("psi-k1", "psi-lora", dict(lr=1e-2, inner_iters=1, normalize=None, max_grad_norm=1.0), "grad"),
    ("psi-k2", "psi-lora", dict(lr=1e-2, inner_iters=2, normalize=None, max_grad_norm=1.0), "grad"),
    ("scaled-psi", "scaled-psi-lora", dict(lr=0.2, normalize=None, max_grad_norm=1.0), "grad"),
    # The spec's default clips inside the optimizer (max_grad_norm=1), which needs the exact full-gradient norm;
    # without it the hooks keep only the r-column projections. Measured to price that default.
    ("scaled-psi-noclip", "scaled-psi-lora", dict(lr=0.2, normalize=None, max_grad_norm=0.0), "grad"),
    ("loko-scalar", "loko", dict(num_outputs=None, observation="loss", lr=1e-3), "loss"),
]
CLS_OPTIMIZERS: List[tuple] = [
    ("adamw-fused", "adamw", dict(lr=1e-4, fused=True), "grad"),
    ("loko-10class", "loko", dict(num_outputs=10, p_init=(1e-4, 1e-2)), "softmax"),
    # Rows from the batch graph: one backward with b*10 cotangents (vmapped) instead of b one-sample graphs.
    ("loko-10class-batchgraph", "loko", dict(num_outputs=10, p_init=(1e-4, 1e-2)), "softmax-batch"),
]


def model_config(name: str, smoke: bool):
    from transformers import LlamaConfig

    if smoke:
        return LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=True, max_position_embeddings=4096, pad_token_id=0,
        )
    if name in ("smol", "cls"):  # HuggingFaceTB/SmolLM2-135M
        return LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
            vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192, rms_norm_eps=1e-5,
            rope_theta=100000.0, hidden_act="silu", pad_token_id=0,
        )
    if name == "1b":  # meta-llama/Llama-3.2-1B shapes (no rope scaling: irrelevant to cost)
        return LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
            max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", pad_token_id=0,
        )
    raise ValueError(name)


def build_model(name: str, r: int, device: torch.device, smoke: bool, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = model_config(name, smoke)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if name == "cls":
                cfg.num_labels = 10
                base = LlamaForSequenceClassification(cfg)
            else:
                base = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    base.to(device=device, dtype=dtype)
    lcfg = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGET_MODULES),
        task_type="SEQ_CLS" if name == "cls" else "CAUSAL_LM",
    )
    model = get_peft_model(base, lcfg)  # autocast_adapter_dtype=True (default): fp32 adapters on a bf16 base
    model.train()
    return model


# ------------------------------------------------------------------------------------------------- timing


class Timer:
    """CUDA events on a GPU, host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        if self.cuda:
            return a.elapsed_time(b)
        return (b - a) * 1e3

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def state_bytes(opt) -> int:
    total = 0
    for st in opt.state_dict()["state"].values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def lora_shapes(model) -> List[tuple]:
    from loraopt.lora.layers import split_lora_parameters

    return [(layer.d_in, layer.d_out, layer.rank) for layer in split_lora_parameters(model).layers]


# ------------------------------------------------------------------------------------------------- floors


def floor_model(opt_name: str, shapes: List[tuple], tokens: int, n_other: int, cls_rows: int = 0,
                dense: bool = False) -> Dict[str, float]:
    """Bytes and flops an ideal implementation of the isolated ``step()`` must move / do (fp32 state).

    ``P`` trainable LoRA values, ``D = sum (d_in + d_out)``; ``N`` rows captured per layer (tokens).  The fp32 rate
    applies to the products of the PSI steps (the library computes them in fp32)."""
    P = sum(r * (di + do) for di, do, r in shapes) + n_other
    D = sum(di + do for di, do, r in shapes)
    N = tokens
    rsq = sum(r * r * (di + do) for di, do, r in shapes)
    if opt_name in ("adamw-fused", "lora-plus"):
        return dict(bytes=28.0 * P, flops=0.0, unit="hbm")  # p, m, v read+write, g read
    if opt_name == "riemannian-adamw":
        # Grams B^T B, A A^T and the preconditioned grads (read A, B, g; write g), then AdamW.
        return dict(bytes=12.0 * P + 28.0 * P, flops=4.0 * rsq, unit="fp32")
    if opt_name == "psi-k0":  # streamed projections in, factors read and written, r x r algebra
        return dict(bytes=4.0 * (P + 2 * P), flops=8.0 * rsq, unit="fp32")
    if opt_name in ("psi-k1", "psi-k2") and dense:
        # The capture holds G (d_out x d_in, fp32): read once per projection, two projections per round.
        K = 1 if opt_name == "psi-k1" else 2
        Dm = sum(di * do for di, do, r in shapes)
        rnd = sum(4.0 * r * di * do for di, do, r in shapes)
        return dict(bytes=K * 2 * 4.0 * Dm + 12.0 * P, flops=K * rnd + 8.0 * K * rsq, unit="fp32")
    if opt_name in ("psi-k1", "psi-k2"):
        # The rows (X: N x d_in, S: N x d_out, fp32 as captured) are read once per projection, two per round.
        K = 1 if opt_name == "psi-k1" else 2
        rnd = sum(4.0 * N * r * (di + do) for di, do, r in shapes)
        return dict(bytes=K * 2 * 4.0 * N * D + 12.0 * P, flops=K * rnd + 8.0 * K * rsq, unit="fp32")
    if opt_name in ("scaled-psi", "scaled-psi-noclip"):
        # projections on [B | M_B], [A | M_A] (2P), factors + momentum read/write (4P), metric stats + state (4D)
        return dict(bytes=4.0 * (2 * P + 4 * P + 4 * D), flops=20.0 * rsq, unit="fp32")
    if opt_name == "loko-scalar":  # two passes: S = sum p g^2, then the update (read theta, p, g; write theta, p)
        return dict(bytes=4.0 * (2 * P + 5 * P), flops=10.0 * P, unit="hbm")
    if opt_name in ("loko-10class", "loko-10class-batchgraph"):  # H: k x n read three times; S = H P H^T and S^-1 H: 4 k^2 n flops
        k = cls_rows
        return dict(bytes=3 * 4.0 * k * P + 4.0 * 5 * P, flops=4.0 * k * k * P + 6.0 * k * P, unit="fp32")
    return dict(bytes=float("nan"), flops=float("nan"), unit="hbm")


# ------------------------------------------------------------------------------------------------- ceilings


def measure_ceilings(device: torch.device) -> Dict[str, float]:
    if device.type != "cuda":
        return dict(hbm_GBps=float("nan"), bf16_TFLOPs=float("nan"), fp32_TFLOPs=float("nan"), tf32_TFLOPs=float("nan"))
    out = {}
    timer = Timer(device)
    n = 1 << 29  # 2 GiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(12):
        a = timer.mark()
        dst.copy_(src)
        b = timer.mark()
        timer.sync()
        if i >= 2:
            times.append(timer.elapsed_ms(a, b))
    out["hbm_GBps"] = 2 * n * 4 / (statistics.median(times) * 1e-3) / 1e9
    del src, dst
    torch.cuda.empty_cache()
    prev = torch.backends.cuda.matmul.allow_tf32
    for key, dtype, tf32 in (("bf16_TFLOPs", torch.bfloat16, False), ("fp32_TFLOPs", torch.float32, False),
                             ("tf32_TFLOPs", torch.float32, True)):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        m = 8192
        a_ = torch.randn(m, m, device=device, dtype=dtype)
        b_ = torch.randn(m, m, device=device, dtype=dtype)
        times = []
        for i in range(8):
            a = timer.mark()
            torch.mm(a_, b_)
            b = timer.mark()
            timer.sync()
            if i >= 2:
                times.append(timer.elapsed_ms(a, b))
        out[key] = 2 * m**3 / (statistics.median(times) * 1e-3) / 1e12
        del a_, b_
    torch.backends.cuda.matmul.allow_tf32 = prev
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------- one run


def _optimizer_on(model, reg_name: str, hp: Dict[str, Any], device: torch.device):
    """``(optimizer, trainable parameters, LoRA shapes, non-LoRA trainable parameters)`` for one row; fused AdamW
    only where it exists (CUDA)."""
    import loraopt

    hp = dict(hp)
    if device.type != "cuda" and hp.get("fused"):
        hp["fused"] = False
    opt = loraopt.create_optimizer(reg_name, model, **hp)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shapes = lora_shapes(model)
    return opt, trainable, shapes, trainable - sum(r * (di + do) for di, do, r in shapes)


def run_one(cfg: Dict[str, Any], opt_spec: tuple, args, device: torch.device, profile_to: Optional[str] = None):
    name, reg_name, hp, kind = opt_spec
    res: Dict[str, Any] = dict(config=cfg["id"], model=cfg["model"], r=cfg["r"], seq=cfg["seq"], batch=cfg["batch"],
                               tokens=cfg["seq"] * cfg["batch"], optimizer=name, kind=kind, hp={k: v for k, v in hp.items()})
    model = opt = None
    try:
        model = build_model(cfg["model"], cfg["r"], device, args.smoke)
        opt, trainable, shapes, n_other = _optimizer_on(model, reg_name, hp, device)
        vocab = model.config.vocab_size
        gen = torch.Generator(device="cpu").manual_seed(1)
        b, T = cfg["batch"], cfg["seq"]
        x = torch.randint(1, vocab, (b, T), generator=gen).to(device)
        y = torch.randint(0, 10, (b,), generator=gen).to(device) if cfg["model"] == "cls" else None
        timer = Timer(device)

        def one_step(record: bool):
            t0 = timer.mark()
            if kind in ("softmax", "softmax-batch"):
                logits = model(input_ids=x).logits
                fwd = (lambda i: model(input_ids=x[i : i + 1]).logits) if b > 1 and kind == "softmax" else None
                feed(opt, logits, y, forward=fwd)
            elif y is not None:
                feed(opt, model(input_ids=x).logits.float(), y)
            else:
                feed(opt, None, None, loss=model(input_ids=x, labels=x).loss)
            t1 = timer.mark()
            h0 = time.perf_counter()
            opt.step()
            h1 = time.perf_counter()
            t2 = timer.mark()
            opt.zero_grad(set_to_none=True)
            return t0, t1, t2, (h1 - h0) * 1e3

        for _ in range(args.warmup):
            one_step(False)
        timer.sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        marks = []
        wall0 = time.perf_counter()
        for _ in range(args.steps):
            marks.append(one_step(True))
        timer.sync()
        wall = (time.perf_counter() - wall0) * 1e3 / args.steps
        fb = [timer.elapsed_ms(a, b_) for a, b_, _, _ in marks]
        st = [timer.elapsed_ms(b_, c) for _, b_, c, _ in marks]
        e2e = [timer.elapsed_ms(a, c) for a, _, c, _ in marks]
        host = [h for *_, h in marks]
        res.update(
            e2e_ms=statistics.median(e2e), fwdbwd_ms=statistics.median(fb), step_ms=statistics.median(st),
            step_host_ms=statistics.median(host), wall_ms=wall, e2e_min_ms=min(e2e), e2e_max_ms=max(e2e),
            peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
            state_bytes=state_bytes(opt), trainable=trainable,
            state_bytes_per_param=state_bytes(opt) / trainable,
            floor=floor_model(name, shapes, cfg["seq"] * cfg["batch"] if not kind.startswith("softmax") else 0, n_other,
                              cls_rows=b * 10,
                              dense=getattr(getattr(opt, "_capture", None), "dense", "never") == "auto"),
        )
        if profile_to is not None and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(2):
                    one_step(True)
                timer.sync()
            with open(profile_to, "a") as f:
                f.write(f"\n\n===== {cfg['id']} {name}: e2e {res['e2e_ms']:.2f} ms, step {res['step_ms']:.2f} ms "
                        f"(host {res['step_host_ms']:.2f} ms), fwd+bwd {res['fwdbwd_ms']:.2f} ms =====\n")
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=28, max_name_column_width=70))
                f.write("\n-- by CPU time --\n")
                f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=70))
    except Exception as exc:  # an OOM or a failure in one configuration must not lose the rest of the run
        res["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        traceback.print_exc()
    finally:
        if opt is not None and hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
        del model, opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def check_fast_paths(device: torch.device, smoke: bool) -> List[Dict[str, Any]]:
    """On the real model and device: one step of the fast path (batched step, dense capture, TF32 products of
    16-bit rows) against the per-layer reference with row capture, from the same weights and batch."""
    import loraopt

    out = []
    for name, hp in (("psi-lora", dict(lr=1e-2, inner_iters=1)), ("psi-lora", dict(lr=1e-2, inner_iters=0)),
                     ("scaled-psi-lora", dict(lr=0.2, normalize=None, max_grad_norm=1.0))):
        finals = []
        for extra in ({}, dict(foreach=False, dense="never")):
            model = build_model("smol", 8, device, smoke)
            with torch.no_grad():  # B != 0 so that every term of the update is exercised
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)).to(p) * 1e-3)
            opt = loraopt.create_optimizer(name, model, **hp, **extra)
            gen = torch.Generator().manual_seed(7)
            x = torch.randint(1, model.config.vocab_size, (4, 64 if smoke else 512), generator=gen).to(device)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            finals.append(torch.cat([p.detach().float().reshape(-1) for n, p in model.named_parameters()
                                     if "lora_" in n]))
            opt.remove_hooks()
            del model, opt
        rel = ((finals[0] - finals[1]).norm() / finals[1].norm()).item()
        out.append(dict(optimizer=name, hp=hp, rel_diff=rel))
        print(f"fast path check {name} {hp}: relative difference of the LoRA factors after one step {rel:.2e}",
              flush=True)
    return out


def configs(args) -> List[Dict[str, Any]]:
    if args.smoke:
        return [dict(id="smoke-r8-s32", model="smol", r=8, seq=32, batch=2),
                dict(id="smoke-cls", model="cls", r=8, seq=32, batch=2)]
    out = []
    for r in (8, 64):
        for seq, batch in ((512, 32), (2048, 8)):  # 16k tokens per step
            out.append(dict(id=f"smol-r{r}-s{seq}", model="smol", r=r, seq=seq, batch=batch))
    out.append(dict(id="1b-r64-s2048", model="1b", r=64, seq=2048, batch=4))  # 8k tokens per step
    out.append(dict(id="cls-r8-s512-b1", model="cls", r=8, seq=512, batch=1))  # LoKO's protocol: batch 1
    out.append(dict(id="cls-r8-s512-b8", model="cls", r=8, seq=512, batch=8))
    out.append(dict(id="cls-r64-s512-b1", model="cls", r=64, seq=512, batch=1))
    return out


def cmd_run(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    os.makedirs(args.out, exist_ok=True)
    info: Dict[str, Any] = dict(label=args.label, torch=torch.__version__, device=str(device))
    info.update(versions())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    print(json.dumps(info), flush=True)
    ceilings = measure_ceilings(device)
    print("ceilings", json.dumps(ceilings), flush=True)
    checks = check_fast_paths(device, args.smoke) if args.check else []
    only = set(args.only.split(",")) if args.only else None
    if args.optimizers:  # a name no table holds would otherwise be skipped without a word
        known = {spec[0] for spec in OPTIMIZERS + CLS_OPTIMIZERS}
        unknown = [name for name in args.optimizers.split(",") if name not in known]
        if unknown:
            raise SystemExit(f"unknown --optimizers {unknown} for `cost run`; choose from {', '.join(sorted(known))} "
                             "(the lever rows such as -graph and -polar are `cost levers` rows)")
    profile_cfg = args.profile_config
    prof_path = os.path.join(args.out, f"profile_{args.label}.txt")
    runs = []
    t_start = time.perf_counter()
    for cfg in configs(args):
        if only and cfg["id"] not in only:
            continue
        table = CLS_OPTIMIZERS if cfg["model"] == "cls" else OPTIMIZERS
        for spec in table:
            if args.optimizers and spec[0] not in args.optimizers.split(","):
                continue
            res = run_one(cfg, spec, args, device,
                          profile_to=prof_path if (profile_cfg and cfg["id"] == profile_cfg and spec[0] in
                                                   args.profile_opts.split(",")) else None)
            runs.append(res)
            print(_line(res), f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
            with open(os.path.join(args.out, f"cost_{args.label}.json"), "w") as f:
                json.dump(dict(info=info, ceilings=ceilings, checks=checks, runs=runs), f, indent=1)
    print()
    print(markdown(dict(info=info, ceilings=ceilings, runs=runs), None))


def _line(res: Dict[str, Any]) -> str:
    if "error" in res:
        return f"{res['config']:>18} {res['optimizer']:>17}  ERROR {res['error'][:120]}"
    return (f"{res['config']:>18} {res['optimizer']:>17}  e2e {res['e2e_ms']:8.2f}  fb {res['fwdbwd_ms']:8.2f}  "
            f"step {res['step_ms']:7.2f} (host {res['step_host_ms']:7.2f})  peak {res['peak_bytes'] / 2**30:6.2f} GiB  "
            f"state {res['state_bytes_per_param']:.3f} B/p")


# ------------------------------------------------------------------------------------------------- report


def _ratio_table(data: Dict[str, Any]) -> Dict[tuple, Dict[str, float]]:
    """Per (config, optimizer): ratios to fused AdamW of the same configuration in the same run."""
    base = {(r.get("src", ""), r["config"]): r for r in data["runs"]
            if r["optimizer"] == "adamw-fused" and "error" not in r}
    out = {}
    for r in data["runs"]:
        if "error" in r or (r.get("src", ""), r["config"]) not in base:
            continue
        b = base[(r.get("src", ""), r["config"])]
        out[(r["config"], r["optimizer"] + r.get("src", ""))] = dict(
            e2e=r["e2e_ms"] / b["e2e_ms"], step=r["step_ms"] / max(b["step_ms"], 1e-9),
            peak=r["peak_bytes"] / b["peak_bytes"] if b["peak_bytes"] else float("nan"),
            fwdbwd=r["fwdbwd_ms"] / b["fwdbwd_ms"],
        )
    return out


def _floor_ms(r: Dict[str, Any], ceil: Dict[str, float]) -> float:
    f = r["floor"]
    t_bytes = f["bytes"] / (ceil["hbm_GBps"] * 1e9)
    rate = {"fp32": ceil["fp32_TFLOPs"], "hbm": ceil["fp32_TFLOPs"]}[f["unit"]] * 1e12
    return max(t_bytes, f["flops"] / rate) * 1e3


def markdown(data: Dict[str, Any], before: Optional[Dict[str, Any]]) -> str:
    info, ceil = data["info"], data["ceilings"]
    ratios = _ratio_table(data)
    bratios = _ratio_table(before) if before else {}
    lines = [
        f"GPU: **{info.get('gpu', info['device'])}**, torch {info['torch']}, transformers {info.get('transformers')}, "
        f"peft {info.get('peft')}. Measured ceilings: copy {ceil['hbm_GBps']:.0f} GB/s (read+write), "
        f"bf16 mm {ceil['bf16_TFLOPs']:.0f} TFLOP/s, fp32 mm {ceil['fp32_TFLOPs']:.1f} TFLOP/s, "
        f"tf32 mm {ceil['tf32_TFLOPs']:.0f} TFLOP/s.",
        "",
        "| config | optimizer | e2e ms | x AdamW | before | fwd+bwd ms | step ms (host) | step x | peak GiB | peak x |"
        " state B/param | step floor ms | roofline % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        key = (r["config"], r["optimizer"] + r.get("src", ""))
        if "error" in r:
            lines.append(f"| {r['config']} | {r['optimizer']} | error: {r['error'][:80]} |" + " |" * 10)
            continue
        q = ratios.get(key, {})
        bq = bratios.get(key)
        fl = _floor_ms(r, ceil) if not math.isnan(ceil["hbm_GBps"]) else float("nan")
        frac = 100.0 * fl / r["step_ms"] if r["step_ms"] > 0 else float("nan")
        before_cell = f"{bq['e2e']:.2f}" if bq else "-"
        lines.append(
            f"| {r['config']} | {r['optimizer'] + r.get('src', '')} | {r['e2e_ms']:.1f} | {q.get('e2e', float('nan')):.2f} | "
            f"{before_cell} | {r['fwdbwd_ms']:.1f} | {r['step_ms']:.2f} ({r['step_host_ms']:.1f}) | "
            f"{q.get('step', float('nan')):.1f} | {r['peak_bytes'] / 2**30:.2f} | {q.get('peak', float('nan')):.2f} | "
            f"{r['state_bytes_per_param']:.3f} | {fl:.3f} | {frac:.1f} |"
        )
    return "\n".join(lines)


REPORT_PREAMBLE = """\
Produced by `loraopt_bench/cost.py` (reading and profile: `benchmarks/notes/cost.md`). Random-weight Llama models in bf16
with fp32 PEFT LoRA adapters (`autocast_adapter_dtype=True`, PEFT's default) on q/k/v/o/gate/up/down, alpha = 2r, SDPA.
`smol` = SmolLM2-135M config, 16,384 tokens per step (32 x 512 or 8 x 2048); `1b` = Llama-3.2-1B shapes, 8,192
tokens (4 x 2048); `cls` = smol with a 10-class head, batch 1 or 8 x 512. Runs: `before` = the code before this
work; `after` = batched step + dense capture + LoKO write-back (full grid); `run3` = plus fewer host ops per hook and step
and a dense-whenever-smaller rule in stream mode (reverted: slower for PSI K=0); `confirm` = the final code (20 timed
steps); `run5` = the same code measured again later (20 timed steps), adding Scaled PSI-LoRA with
`max_grad_norm=0` and LoKO 10-class with rows from the batch graph; `run6`, `run6b` = LoKO's flat state built and
written back with single flatten / unflatten calls instead of per-parameter reshapes (two back-to-back runs). e2e = forward + backward + `optimizer.step()`, CUDA events, median of the timed steps; `step` = the
isolated `optimizer.step()` (its host time in parentheses); `step floor` = bytes / measured copy bandwidth or fp32
flops / measured fp32 rate of what the step must touch; roofline % = floor / measured step. The smol rows are
host-noisy (+-0.2 in ratio between runs of the same code); 1b reproduces to 1-3%."""

RATIO_TARGETS = [
    # (label, optimizer, metric, limit, configs: None = every LM configuration)
    ("Scaled PSI-LoRA e2e", "scaled-psi", "e2e", 1.10, None),
    ("Scaled PSI-LoRA, max_grad_norm=0, e2e", "scaled-psi-noclip", "e2e", 1.10, None),
    ("LoKO scalar e2e", "loko-scalar", "e2e", 1.10, None),
    ("PSI-LoRA K=1 e2e", "psi-k1", "e2e", 1.15, None),
    ("LoKO 10-class e2e", "loko-10class", "e2e", 3.0, None),
    ("LoKO 10-class, batch-graph rows, e2e", "loko-10class-batchgraph", "e2e", 3.0, None),
]


def _ratio(run: Dict[str, Any], config: str, optimizer: str, key: str) -> Optional[float]:
    base = [r for r in run["runs"] if r["config"] == config and r["optimizer"] == "adamw-fused" and "error" not in r]
    mine = [r for r in run["runs"] if r["config"] == config and r["optimizer"] == optimizer and "error" not in r]
    if not base or not mine:
        return None
    return mine[0][key] / base[0][key]


def targets_markdown(runs: Dict[str, Dict[str, Any]]) -> str:
    """Ratios to fused AdamW of the same run, per target, configuration and run: median (best of the timed steps)."""
    labels = list(runs)
    lines = ["| target | config | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    configs = list(dict.fromkeys(r["config"] for run in runs.values() for r in run["runs"]))
    for name, opt, _, limit, _ in RATIO_TARGETS:
        for cfg in configs:
            cells = []
            for run in runs.values():
                med, best = _ratio(run, cfg, opt, "e2e_ms"), _ratio(run, cfg, opt, "e2e_min_ms")
                cells.append("-" if med is None else f"{med:.2f} ({best:.2f})")
            if any(c != "-" for c in cells):
                lines.append(f"| {name} <= {limit:g}x | {cfg} | " + " | ".join(cells) + " |")
    for cfg in configs:  # peak memory at sequence length 2048 and state bytes, every loraopt optimizer
        if "s2048" not in cfg:
            continue
        for opt in ("psi-k0", "psi-k1", "psi-k2", "scaled-psi", "scaled-psi-noclip", "loko-scalar"):
            cells = []
            for run in runs.values():
                q = _ratio(run, cfg, opt, "peak_bytes")
                cells.append("-" if q is None else f"{q:.2f}")
            if any(c != "-" for c in cells):
                lines.append(f"| peak memory <= 1.10x | {cfg} {opt} | " + " | ".join(cells) + " |")
    for opt in ("psi-k0", "psi-k1", "scaled-psi", "loko-scalar", "loko-10class"):
        vals = sorted({f"{r['state_bytes_per_param']:.3f}" for run in runs.values() for r in run["runs"]
                       if r["optimizer"] == opt and "error" not in r})
        lines.append(f"| state <= 4.5 B/param | {opt} (every config and run) | " + ", ".join(vals) + " |"
                     + " |" * (len(labels) - 1))
    return "\n".join(lines)


def cmd_report(args) -> None:
    runs: Dict[str, Dict[str, Any]] = {}
    for item in args.runs:
        label, path = item.split("=", 1)
        with open(path) as f:
            runs[label] = json.load(f)
    before = runs.get(args.before) if args.before else None
    gpu = next(iter(runs.values()))["info"].get("gpu")
    parts = [f"# Optimizer cost on {gpu}", "", REPORT_PREAMBLE, "", "Ratios to fused AdamW measured in the same run: "
             "median e2e step (best step in parentheses).", "", targets_markdown(runs), ""]
    for label, run in runs.items():
        if label == args.before:
            continue
        parts += [f"## Run `{label}`", "", markdown(run, before), ""]
    if before is not None:
        parts += [f"## Run `{args.before}`", "", markdown(before, None), ""]
    md = "\n".join(parts)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(gpu=gpu, runs=runs), f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    print(md)


# ------------------------------------------------------------------------------------------------- levers (issue 12)

LEVER_CONFIGS = [
    dict(id="smol-r8-s2048", model="smol", r=8, seq=2048, batch=8),  # 16k tokens
    dict(id="1b-r64-s2048", model="1b", r=64, seq=2048, batch=4),  # 8k tokens
    dict(id="1b-r8-s512", model="1b", r=8, seq=512, batch=16),  # 8k tokens, short sequences
]
QUICK_CONFIGS = [dict(id="quick-r8-s64", model="smol", r=8, seq=64, batch=2)]
# (name, registry name, hyperparameters, kind): the library's defaults (factories), lr left at the factory default.
# Since benchmarks/notes/psi.md §11 PSI-LoRA's and Proj. PSI-LoRA's defaults are normalize="factored" (which keeps the
# rows at K = 0 too), and since §12 Scaled PSI-LoRA's; rows measured before then (results/cost/*round1-5*, and the
# scaled-psi rows of round 6) timed the plain step.
LEVER_OPTIMIZERS: List[tuple] = [
    ("adamw-fused", "adamw", dict(lr=1e-4, fused=True), "grad"),
    ("psi-k0", "psi-lora", dict(inner_iters=0), "grad"),
    ("psi-k1", "psi-lora", dict(inner_iters=1), "grad"),
    ("proj-psi", "proj-psi-lora", dict(), "grad"),
    ("scaled-psi", "scaled-psi-lora", dict(), "grad"),
    ("loko-scalar", "loko", dict(num_outputs=None, observation="loss", lr=1e-3), "loss"),
]
# Opt-in rows, measured only when named in --optimizers: the momentum balancing other than the default "gram"
# (notes/cost.md): "svd" (the earlier default, two tall QRs) and "polar" (no host synchronisation).
# "-graph": each bucket's functional step captured in a CUDA graph and replayed (cuda_graph=True).
LEVER_OPTIONAL: List[tuple] = [
    (f"{name}-{mode}", registry, dict(hp, momentum_balance=mode), "grad")
    for mode in ("svd", "polar")
    for name, registry, hp in (("psi-k0", "psi-lora", dict(inner_iters=0)), ("psi-k1", "psi-lora", dict(inner_iters=1)),
                               ("scaled-psi", "scaled-psi-lora", {}))
] + [
    (f"{name}-graph", registry, dict(hp, cuda_graph=True), "grad")
    for name, registry, hp in (("psi-k0", "psi-lora", dict(inner_iters=0)), ("psi-k1", "psi-lora", dict(inner_iters=1)),
                               ("proj-psi", "proj-psi-lora", {}), ("scaled-psi", "scaled-psi-lora", {}))
] + [
    # The step normalisations (normalize="layer" / "factored"; "factored" forms each layer's G once per step).
    (f"{name}-{mode}", registry, dict(hp, normalize=mode, max_grad_norm=0.0, lr=3e-5), "grad")
    for mode in ("layer", "factored")
    for name, registry, hp in (("psi-k1", "psi-lora", dict(inner_iters=1)), ("proj-psi", "proj-psi-lora", {}))
] + [
    # Adam's per-entry second moment (notes/psi.md §13: the best PSI-family LM setting, lr 5e-5): d_out x d_in state
    # per layer and the dense G every step.
    ("proj-psi-full", "proj-psi-lora", dict(normalize="full", max_grad_norm=0.0, lr=5e-5), "grad"),
]
# --compare-eager: the same optimizers with a lever switched off, measured in the same run.
#   ":compiled"  compile=True: lever 3 on (the library default is the eager step since the H200 run of
#                benchmarks/notes/cost.md);
#   ":per-layer" foreach=False, compile=False: levers 1-3 off (one functional step per layer, balancing SVD per
#                layer inside it: the readable reference path).
LEVER_VARIANTS = [(":compiled", dict(compile=True)), (":per-layer", dict(foreach=False, compile=False))]
LEVER_COMPARED = ("psi-k0", "psi-k1", "proj-psi", "scaled-psi")


def device_slug(info: Dict[str, Any]) -> str:
    name = info.get("gpu") or "cpu"
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _count_kernel_launches(step, device: torch.device) -> Optional[int]:
    """Kernel launches of one ``step()`` (CUDA, torch.profiler); ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    names = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    return int(sum(e.count for e in prof.key_averages() if e.key in names))


def _count_syncs(step, device: torch.device) -> Optional[int]:
    """Host synchronisations of one ``step()`` reported by CUDA's sync debug mode; ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    import warnings as _warnings

    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def _count_dispatched_ops(step) -> int:
    """Operators dispatched by one ``step()`` (every eager op is one dispatcher call; on a GPU most are launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        step()
    return Count.n


def lever_row(model, lora_init, cfg, spec, args, device) -> Dict[str, Any]:
    """One (configuration, optimizer) row on an already built model (its LoRA weights reset first)."""
    name, reg_name, hp, kind = spec
    res: Dict[str, Any] = dict(config=cfg["id"], optimizer=name, kind=kind, hp=dict(hp))
    opt = None
    try:
        with torch.no_grad():
            for p, v in zip(lora_init[0], lora_init[1]):
                p.copy_(v)
        opt, trainable, shapes, n_other = _optimizer_on(model, reg_name, hp, device)
        gen = torch.Generator(device="cpu").manual_seed(1)
        x = torch.randint(1, model.config.vocab_size, (cfg["batch"], cfg["seq"]), generator=gen).to(device)
        timer = Timer(device)

        def fwd_bwd():
            opt.zero_grad(set_to_none=True)
            feed(opt, None, None, loss=model(input_ids=x, labels=x).loss)

        def one_step():
            t0 = timer.mark()
            fwd_bwd()
            t1 = timer.mark()
            h0 = time.perf_counter()
            opt.step()
            h1 = time.perf_counter()
            t2 = timer.mark()
            return t0, t1, t2, (h1 - h0) * 1e3

        w0 = time.perf_counter()
        one_step()  # allocates state; compiles the step where compile is on
        timer.sync()
        res["first_step_s"] = time.perf_counter() - w0
        for _ in range(args.warmup - 1):
            one_step()
        timer.sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        marks = [one_step() for _ in range(args.steps)]
        timer.sync()
        e2e = [timer.elapsed_ms(a, c) for a, _, c, _ in marks]
        res.update(
            e2e_ms=statistics.median(e2e), e2e_min_ms=min(e2e),
            fwdbwd_ms=statistics.median(timer.elapsed_ms(a, b_) for a, b_, _, _ in marks),
            step_ms=statistics.median(timer.elapsed_ms(b_, c) for _, b_, c, _ in marks),
            step_host_ms=statistics.median(h for *_, h in marks),
            peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else 0,
            state_bytes_per_param=state_bytes(opt) / trainable,
        )
        # Per step, outside the timed steps: host synchronisations (CUDA sync debug mode), kernel launches
        # (profiler), and dispatcher calls of the eager path.
        fwd_bwd()
        res["syncs_per_step"] = _count_syncs(opt.step, device)
        fwd_bwd()
        res["launches_per_step"] = _count_kernel_launches(opt.step, device)
        if getattr(opt, "_compile", False) is False:
            fwd_bwd()
            res["dispatched_ops_per_step"] = _count_dispatched_ops(opt.step)
        step_fn = getattr(opt, "_step_fn", None)
        res["compiled"] = bool(getattr(opt, "_compile", False)) and not getattr(step_fn, "disabled", True)
        base = name.split(":")[0]
        floor_name = {"proj-psi": "psi-k1", "scaled-psi": "scaled-psi"}.get(base, base)
        res["floor"] = floor_model(floor_name, shapes, cfg["seq"] * cfg["batch"], n_other,
                                   dense=getattr(getattr(opt, "_capture", None), "dense", "never") == "auto")
    except Exception as exc:  # one failing row must not lose the others
        res["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        traceback.print_exc()
    finally:
        if opt is not None and hasattr(opt, "remove_hooks"):
            opt.remove_hooks()
        del opt
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def lever_markdown(data: Dict[str, Any]) -> str:
    info, ceil = data["info"], data["ceilings"]
    base = {r["config"]: r for r in data["runs"] if r["optimizer"] == "adamw-fused" and "error" not in r}
    lines = [
        f"# Optimizer cost, issue 12 levers: {info.get('gpu', info['device'])}",
        "",
        f"torch {info['torch']}, transformers {info.get('transformers')}, peft {info.get('peft')}; "
        f"{data['args']['warmup']} warm-up and {data['args']['steps']} timed steps per row, medians; wall "
        f"{data.get('wall_s', float('nan')):.0f} s. Ratios are to fused AdamW of the same configuration in this run. "
        "`:compiled` = torch.compile of the batched step on; `:per-layer` = the per-layer reference path (levers 1-3 off). syncs = host "
        "synchronisations of one step (CUDA sync debug mode); launches = kernel launches of one step (profiler); "
        "first step = seconds of the first step (state allocation and, where on, compilation).",
        "",
        "| config | optimizer | e2e ms | e2e x AdamW (best) | step ms (host) | step x AdamW | peak GiB | peak x |"
        " state B/param | syncs | launches | first step s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        if "error" in r or "skipped" in r:
            why = r.get("error") or r.get("skipped")
            lines.append(f"| {r['config']} | {r['optimizer']} | {why[:90]} |" + " |" * 9)
            continue
        b = base.get(r["config"])
        e2e_x = f"{r['e2e_ms'] / b['e2e_ms']:.2f} ({r['e2e_min_ms'] / b['e2e_min_ms']:.2f})" if b else "-"
        step_x = f"{r['step_ms'] / max(b['step_ms'], 1e-9):.1f}" if b else "-"
        peak_x = f"{r['peak_bytes'] / b['peak_bytes']:.2f}" if b and b["peak_bytes"] else "-"
        lines.append(
            f"| {r['config']} | {r['optimizer']} | {r['e2e_ms']:.1f} | {e2e_x} | {r['step_ms']:.2f} "
            f"({r['step_host_ms']:.1f}) | {step_x} | {r['peak_bytes'] / 2**30:.2f} | {peak_x} | "
            f"{r['state_bytes_per_param']:.3f} | {_fmt(r.get('syncs_per_step'))} | {_fmt(r.get('launches_per_step'))} | "
            f"{r.get('first_step_s', float('nan')):.1f} |"
        )
    floor_rows = [r for r in data["runs"] if r["config"] == "1b-r64-s2048" and "floor" in r and "error" not in r]
    if floor_rows and not math.isnan(ceil.get("hbm_GBps", float("nan"))):
        lines += [
            "",
            f"Isolated step floor at 1b-r64-s2048 (copy {ceil['hbm_GBps']:.0f} GB/s, fp32 {ceil['fp32_TFLOPs']:.1f} "
            "TFLOP/s, both measured in this run; `floor_model` counts what the step must read, write and compute):",
            "",
            "| optimizer | bytes | bytes / bandwidth ms | flops | flops / rate ms | floor ms | measured step ms | "
            "fraction of floor reached |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in floor_rows:
            f = r["floor"]
            t_b = f["bytes"] / (ceil["hbm_GBps"] * 1e9) * 1e3
            t_f = f["flops"] / (ceil["fp32_TFLOPs"] * 1e12) * 1e3
            fl = max(t_b, t_f)
            lines.append(f"| {r['optimizer']} | {f['bytes']:.3g} | {t_b:.3f} | {f['flops']:.3g} | {t_f:.3f} | "
                         f"{fl:.3f} | {r['step_ms']:.2f} | {100 * fl / max(r['step_ms'], 1e-9):.1f}% |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def cmd_levers(args) -> None:
    """Every lever row in one command under a wall-clock budget; writes ``<out>/<device-slug>.{json,md}``."""
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    os.makedirs(args.out, exist_ok=True)
    info: Dict[str, Any] = dict(torch=torch.__version__, device=str(device))
    info.update(versions())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    ceilings = measure_ceilings(device)
    print("ceilings", json.dumps(ceilings), flush=True)
    cfgs = QUICK_CONFIGS if args.quick else LEVER_CONFIGS
    if args.only:
        cfgs = [c for c in cfgs if c["id"] in args.only.split(",")]
    opts = LEVER_OPTIMIZERS
    if args.optimizers:
        wanted = args.optimizers.split(",")
        known = {o[0] for o in LEVER_OPTIMIZERS + LEVER_OPTIONAL}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise SystemExit(f"unknown --optimizers {unknown}; choose from {', '.join(sorted(known))}")
        opts = [o for o in LEVER_OPTIMIZERS + LEVER_OPTIONAL if o[0] in wanted]
    plan = [(c, o) for c in cfgs for o in opts]  # the library defaults first, every configuration
    if args.compare_eager:
        # Compilation is a CUDA lever (the library's compile="auto" is CUDA-only); on a CPU smoke it would only
        # spend minutes in the C++ compiler.
        variants = [(suffix, extra) for suffix, extra in LEVER_VARIANTS
                    if device.type == "cuda" or not extra.get("compile")]
        plan += [(c, (o[0] + suffix, o[1], {**o[2], **extra}, o[3])) for c in cfgs for suffix, extra in variants
                 for o in opts if o[0] in LEVER_COMPARED]
    slug = device_slug(info)
    runs: List[Dict[str, Any]] = []
    models: Dict[str, Any] = {}
    row_s: List[float] = []
    for cfg, spec in plan:
        elapsed = time.perf_counter() - t_start
        estimate = statistics.median(row_s) if row_s else 0.0
        if args.budget_s and elapsed + estimate > args.budget_s:
            runs.append(dict(config=cfg["id"], optimizer=spec[0], skipped=f"skipped: time budget {args.budget_s:.0f} s"))
            continue
        if cfg["id"] not in models:
            for key in list(models):  # one model on the device at a time
                del models[key]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            model = build_model(cfg["model"], cfg["r"], device, args.quick)
            lora = [p for n, p in model.named_parameters() if p.requires_grad]
            models[cfg["id"]] = (model, (lora, [p.detach().clone() for p in lora]))
        model, lora_init = models[cfg["id"]]
        r0 = time.perf_counter()
        res = lever_row(model, lora_init, cfg, spec, args, device)
        row_s.append(time.perf_counter() - r0)
        runs.append(res)
        print(_lever_line(res), f"[{time.perf_counter() - t_start:.0f}s]", flush=True)
        data = dict(info=info, ceilings=ceilings, args=dict(warmup=args.warmup, steps=args.steps), runs=runs,
                    wall_s=time.perf_counter() - t_start)
        with open(os.path.join(args.out, f"{slug}.json"), "w") as f:
            json.dump(data, f, indent=1)
    data = dict(info=info, ceilings=ceilings, args=dict(warmup=args.warmup, steps=args.steps), runs=runs,
                wall_s=time.perf_counter() - t_start)
    with open(os.path.join(args.out, f"{slug}.json"), "w") as f:
        json.dump(data, f, indent=1)
    md = lever_markdown(data)
    with open(os.path.join(args.out, f"{slug}.md"), "w") as f:
        f.write(md + "\n")
    print(md)


def _lever_line(res: Dict[str, Any]) -> str:
    if "error" in res:
        return f"{res['config']:>14} {res['optimizer']:>22}  ERROR {res['error'][:120]}"
    return (f"{res['config']:>14} {res['optimizer']:>22}  e2e {res['e2e_ms']:8.2f}  step {res['step_ms']:7.2f} "
            f"(host {res['step_host_ms']:7.2f})  syncs {_fmt(res.get('syncs_per_step'))}  launches "
            f"{_fmt(res.get('launches_per_step'))}  ops {_fmt(res.get('dispatched_ops_per_step'))}  first "
            f"{res.get('first_step_s', 0):.1f}s")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--label", default="run")
    r.add_argument("--out", default="runs/cost")
    r.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the pipeline, times nothing")
    r.add_argument("--warmup", type=int, default=4)
    r.add_argument("--steps", type=int, default=12)
    r.add_argument("--only", default="", help="comma-separated config ids")
    r.add_argument("--optimizers", default="", help="comma-separated optimizer names")
    r.add_argument("--profile-config", default="", help="config id to profile (torch.profiler, 2 steps)")
    r.add_argument("--profile-opts", default="adamw-fused,psi-k0,psi-k1,scaled-psi,loko-scalar,riemannian-adamw")
    r.add_argument("--check", type=int, default=1, help="compare fast and reference paths on the device first")
    v = sub.add_parser("levers", help="issue 12: every lever row in one command, <out>/<device-slug>.{json,md}")
    v.add_argument("--out", default="benchmarks/results/cost")
    v.add_argument("--quick", action="store_true", help="tiny model on the CPU (pipeline check, a test runs it)")
    v.add_argument("--compare-eager", action="store_true",
                   help="also the PSI optimizers with compile on (:compiled) and on the per-layer path (:per-layer)")
    v.add_argument("--warmup", type=int, default=3)
    v.add_argument("--steps", type=int, default=8)
    v.add_argument("--budget-s", type=float, default=225.0,
                   help="wall-clock budget: rows that would start past it are recorded as skipped")
    v.add_argument("--only", default="", help="comma-separated config ids")
    v.add_argument("--optimizers", default="", help="comma-separated optimizer names")
    q = sub.add_parser("report")
    q.add_argument("--runs", nargs="+", required=True, help="label=path of cost_<label>.json files, in order")
    q.add_argument("--before", default="", help="the label of the run taken before the optimizations")
    q.add_argument("--json", default="")
    q.add_argument("--md", default="")
    args = p.parse_args(argv)
    if args.cmd == "run":
        if args.smoke:
            args.warmup, args.steps = 1, 2
        cmd_run(args)
    elif args.cmd == "levers":
        if args.quick:
            args.warmup, args.steps = 1, 2
        cmd_levers(args)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
