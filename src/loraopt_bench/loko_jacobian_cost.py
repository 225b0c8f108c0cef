"""LoKO's step cost for every Jacobian path against fused AdamW, on the models of issue 10 (one command).

    python -m loraopt_bench.loko_jacobian_cost --out DIR              # CUDA: the full set
    python -m loraopt_bench.loko_jacobian_cost --out DIR --quick      # CPU: small shapes, minutes

Configurations (``--only`` takes a comma-separated subset of the ids):

* ``effnet-b32``: EfficientNet-Lite0 at 32 px (the online suite's size), LoRA r = 8, alpha = 16 on the pointwise
  convs plus the fresh 10-class head, eval mode (BatchNorm on running statistics), batch 32, random images.
* ``minilm-b32``: MiniLM-L6, LoRA r = 8, alpha = 16 on query/value plus the 2-class head, eval mode, batch 32 of
  64 random tokens with an all-ones attention mask. ``minilm-b32-padded``: the same with lengths 16-64 padded to
  64 (a mask with zeros: Hugging Face's mask check cannot run under ``vmap``, so ``auto`` falls back to
  one-sample graphs and ``func`` records an error).
* ``cls-b1``, ``cls-b8``: the 10-class Llama-shaped classifier of ``loraopt_bench/cost.py`` (SmolLM2-135M shapes, bf16
  base, fp32 LoRA r = 8 on q/k/v/o/gate/up/down), sequence 512, batch 1 and 8.
* ``--quick`` (CPU): the same models at small shapes (images 32 px batch 4, 16 tokens batch 4, the cost.py smoke
  Llama at batch 1 and 4), plus two stand-ins that need no model package (``bert-tiny-b8``, ``conv-tiny-b8``).

Models load as in ``loraopt_bench/cost.py`` and ``loraopt_bench.assets``: from a carried bundle under ``--assets``
(``load_gpu_bundle``; default ``.gpu_assets``) when it is there, else from the installed packages. A missing
model, an OOM or any other failure is recorded in that row (``error``) and the run goes on.

Methods per configuration: ``adamw-fused`` (forward, cross-entropy, backward, ``step``; fused on CUDA) and LoKO
with the softmax observation through each Jacobian path: ``loko-batch`` (rows from the batch graph),
``loko-per-sample`` (one-sample graphs from ``inputs=``), ``loko-func`` (``torch.func``, attention forced to the
math kernel), ``loko-func-fused-attn`` (``torch.func`` with the default attention kernels; attention models
only), ``loko-replicate`` (each sample repeated once per row, one plain backward, per-layer per-sample gradients)
and ``loko-auto`` (the default choice); ``loko-func-top2`` / ``loko-func-top3`` run the reduced observation
(``top_k``) through ``torch.func``. A LoKO step is forward + ``observe`` + ``step`` (no backward).

Per method: ``warmup`` steps, then up to ``steps`` timed steps (fewer when a step is slow, ``--budget`` seconds per
method); CUDA events (host clock on CPU) around the whole step and around ``step()``; medians. The ratio is
against ``adamw-fused`` of the same configuration in the same run. A check compares each path's Jacobian rows with
those of the batch graph on one observation (relative max difference). Outputs: ``DIR/loko_jacobian_cost.json``
and ``DIR/loko_jacobian_cost.md`` (written after every row).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

import loraopt

from .common import feed, set_cpu_threads, versions
from .cost import Timer, build_model
from .data import project_root

# Targets of issue 10 (e2e step time against fused AdamW).
TARGETS = {"cls-b8": 3.0, "cls-b1": 1.5, "effnet-b32": 5.0}
LOKO_PATHS = ("batch", "per-sample", "func", "func-fused-attn", "replicate", "auto")
# The reduced observation (``top_k``: the target and the k - 1 most probable other classes) through torch.func:
# k of the m rows per sample.
LOKO_TOPK = ("func-top2", "func-top3")


# ------------------------------------------------------------------------------------------------- models


class Config(dict):
    """id, family, batch and shape fields; ``build(device) -> (model, inputs, targets, num_classes, info)``."""


def _bundle(args, name: str) -> Optional[Path]:
    path = Path(args.assets) / name
    return path if (path / "bundle.json").is_file() else None


def _effnet(args, batch: int, device: torch.device, image_size: int = 32):
    from loraopt_bench import assets

    bundle = _bundle(args, assets.EFFNET_BUNDLE)
    if bundle is not None:
        spec = assets.load_gpu_bundle(bundle, num_labels=10, image_size=image_size, seed=0)
    else:
        spec = assets.load_effnet_lite0(10, image_size=image_size, seed=0)
    torch.manual_seed(0)
    model = spec.peft_model(r=8, lora_alpha=16, lora_dropout=0.0).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, x, y, 10, {"source": str(bundle or "installed package")}


def _minilm(args, batch: int, seq: int, padded: bool, device: torch.device):
    from loraopt_bench import assets

    bundle = _bundle(args, assets.MINILM_BUNDLE)
    if bundle is not None:
        spec = assets.load_gpu_bundle(bundle, num_labels=2, seed=0)
    else:
        spec = assets.load_minilm(2, seed=0)
    torch.manual_seed(0)
    model = spec.peft_model(r=8, lora_alpha=16, lora_dropout=0.0).to(device).eval()
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if padded:
        lengths = torch.randint(seq // 4, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask  # pad id 0
    x = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    return model, x, y, 2, {"source": str(bundle or "installed package"), "seq": seq}


def _cls(args, batch: int, seq: int, device: torch.device):
    model = build_model("cls", 8, device, smoke=args.quick)
    g = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(1, model.config.vocab_size, (batch, seq), generator=g).to(device)}
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, x, y, 10, {"seq": seq, "base_dtype": "bfloat16"}


def _bert_tiny(args, batch: int, device: torch.device):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512, num_labels=10, max_position_embeddings=128)
    model = get_peft_model(BertForSequenceClassification(cfg), LoraConfig(
        target_modules=["query", "value"], r=8, lora_alpha=16, lora_dropout=0.0, modules_to_save=["classifier"]))
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(0, 1000, (batch, 32), generator=g).to(device)}
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, x, y, 10, {"seq": 32}


class _ConvTiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pw1 = nn.Conv2d(16, 32, 1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.pw2 = nn.Conv2d(32, 32, 1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.stem(x)))
        h = torch.relu(self.pw2(torch.relu(self.dw(self.pw1(h)))))
        return self.head(h.mean((2, 3)))


def _conv_tiny(args, batch: int, device: torch.device):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_ConvTiny(), LoraConfig(target_modules=["pw1", "pw2"], r=4, lora_alpha=8,
                                                   modules_to_save=["head"]))
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 16, 16, generator=g).to(device)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return model, x, y, 10, {"image": 16}


def configs(args) -> List[Config]:
    if args.quick:
        out = [
            Config(id="effnet-b32", batch=4, build=lambda a, d: _effnet(a, 4, d)),
            Config(id="minilm-b32", batch=4, build=lambda a, d: _minilm(a, 4, 16, False, d)),
            Config(id="minilm-b32-padded", batch=4, build=lambda a, d: _minilm(a, 4, 16, True, d)),
            Config(id="cls-b1", batch=1, build=lambda a, d: _cls(a, 1, 32, d)),
            Config(id="cls-b8", batch=4, build=lambda a, d: _cls(a, 4, 32, d)),
            Config(id="bert-tiny-b8", batch=8, build=lambda a, d: _bert_tiny(a, 8, d)),
            Config(id="conv-tiny-b8", batch=8, build=lambda a, d: _conv_tiny(a, 8, d)),
        ]
    else:
        out = [
            Config(id="effnet-b32", batch=32, build=lambda a, d: _effnet(a, 32, d, 64)),
            Config(id="minilm-b32", batch=32, build=lambda a, d: _minilm(a, 32, 64, False, d)),
            Config(id="minilm-b32-padded", batch=32, build=lambda a, d: _minilm(a, 32, 64, True, d)),
            Config(id="cls-b1", batch=1, build=lambda a, d: _cls(a, 1, 512, d)),
            Config(id="cls-b8", batch=8, build=lambda a, d: _cls(a, 8, 512, d)),
        ]
    if args.only:
        keep = set(args.only.split(","))
        out = [c for c in out if c["id"] in keep]
    return out


# ------------------------------------------------------------------------------------------------- one run


def _logits(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.logits


def _call(model: nn.Module, x: Any) -> Any:
    return model(**x) if isinstance(x, dict) else model(x)


def _make_optimizer(method: str, model: nn.Module, m: int, device: torch.device):
    if method == "adamw-fused":
        return loraopt.create_optimizer("adamw", model, lr=1e-4, fused=device.type == "cuda")
    path = method[len("loko-"):]
    path, _, top = path.partition("-top")
    jac = "func" if path.startswith("func") else path
    opt = loraopt.create_optimizer("loko", model, num_outputs=m, jacobian=jac, top_k=int(top) if top else None)
    if path == "func-fused-attn":
        opt._func_math_attention = False
    return opt


def _step_fn(method: str, model: nn.Module, opt, x: Any, y: torch.Tensor, timer: Timer) -> Callable:
    def one_step():
        t0 = timer.mark()
        logits = _logits(_call(model, x))
        feed(opt, logits.float() if method == "adamw-fused" else logits, y,
             **({"inputs": x} if method.startswith("loko-") and method != "loko-batch" else {}))
        t1 = timer.mark()
        opt.step()
        t2 = timer.mark()
        opt.zero_grad(set_to_none=True)
        return t0, t1, t2

    return one_step


def run_method(cfg: Config, method: str, model: nn.Module, x: Any, y: torch.Tensor, m: int, args,
               device: torch.device) -> Dict[str, Any]:
    res: Dict[str, Any] = dict(config=cfg["id"], method=method, batch=cfg["batch"])
    if method == "loko-func-fused-attn" and not isinstance(x, dict):
        res["skipped"] = "no attention in this model"
        return res
    top = method.partition("-top")[2]
    if top and int(top) > m:
        res["skipped"] = f"top_k={top} needs more than the {m} classes of this model"
        return res
    opt = None
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    try:
        opt = _make_optimizer(method, model, m, device)
        timer = Timer(device)
        one_step = _step_fn(method, model, opt, x, y, timer)
        t = time.perf_counter()
        for _ in range(args.warmup):
            one_step()
        timer.sync()
        per_step = (time.perf_counter() - t) / max(args.warmup, 1)
        steps = max(2, min(args.steps, int(args.budget / max(per_step, 1e-6))))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        marks = [one_step() for _ in range(steps)]
        timer.sync()
        e2e = [timer.elapsed_ms(a, c) for a, _, c in marks]
        rows = [timer.elapsed_ms(a, b) for a, b, _ in marks]
        st = [timer.elapsed_ms(b, c) for _, b, c in marks]
        res.update(steps=steps, e2e_ms=statistics.median(e2e), e2e_min_ms=min(e2e),
                   fwd_rows_ms=statistics.median(rows), step_ms=statistics.median(st),
                   peak_bytes=torch.cuda.max_memory_allocated() if device.type == "cuda" else 0)
        if method.startswith("loko-"):
            res["path_used"] = opt.last_jacobian_path
            res["skipped_steps"] = opt.skipped_steps
    except Exception as exc:  # one failing method must not lose the rest of the run
        res["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        traceback.print_exc()
    finally:
        with torch.no_grad():  # the next method starts from the same parameters
            for n, p in model.named_parameters():
                if n in state:
                    p.copy_(state[n])
        del opt, state
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return res


def check_rows(model: nn.Module, x: Any, y: torch.Tensor, m: int, device: torch.device) -> Dict[str, Any]:
    """Relative max difference of each path's rows to the batch graph's, on one observation."""
    out: Dict[str, Any] = {}
    ref = None
    for path in ("batch", "per-sample", "func", "replicate"):
        try:
            opt = loraopt.create_optimizer("loko", model, num_outputs=m, jacobian=path)
            logits = _logits(_call(model, x))
            opt.observe(logits, y, **({} if path == "batch" else {"inputs": x}))
            H = opt._pending.H
            opt.clear_observation()
            if ref is None:
                ref = H
                out["rows"] = list(H.shape)
            else:
                out[path] = float((H - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            del opt, H
        except Exception as exc:
            out[path] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
    del ref
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------- report


def markdown(data: Dict[str, Any]) -> str:
    info = data["info"]
    lines = [
        f"Device: **{info.get('gpu', info['device'])}**, torch {info['torch']}, transformers "
        f"{info.get('transformers')}, peft {info.get('peft')}{', quick shapes' if info.get('quick') else ''}.",
        "",
        "e2e = one training step (LoKO: forward + observe + step; AdamW: forward + backward + step), median ms; "
        "x AdamW = e2e / fused AdamW's e2e in the same configuration (best step's ratio in parentheses).",
        "",
        "| config | method | path used | e2e ms | x AdamW | target | fwd+rows ms | step ms | peak GiB | steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in data["configs"]:
        base = next((r for r in cfg["runs"] if r["method"] == "adamw-fused" and "e2e_ms" in r), None)
        if "error" in cfg:
            lines.append(f"| {cfg['id']} | (model) | error: {cfg['error'][:160]} |" + " |" * 7)
            continue
        for r in cfg["runs"]:
            if "skipped" in r:
                continue
            if "error" in r:
                lines.append(f"| {cfg['id']} | {r['method']} | error: {r['error'][:160]} |" + " |" * 7)
                continue
            ratio = best = float("nan")
            if base is not None:
                ratio, best = r["e2e_ms"] / base["e2e_ms"], r["e2e_min_ms"] / base["e2e_min_ms"]
            target = TARGETS.get(cfg["id"])
            tcell = "" if target is None or r["method"] == "adamw-fused" else (
                f"<= {target:g}: {'met' if ratio <= target else 'missed'}")
            lines.append(
                f"| {cfg['id']} | {r['method']} | {r.get('path_used', '-')} | {r['e2e_ms']:.2f} | {ratio:.2f} "
                f"({best:.2f}) | {tcell} | {r['fwd_rows_ms']:.2f} | {r['step_ms']:.2f} | "
                f"{r['peak_bytes'] / 2**30:.2f} | {r['steps']} |"
            )
    lines += ["", "Jacobian rows against the batch graph's (relative max difference, one observation):", "",
              "| config | rows x n | per-sample | func | replicate |", "|---|---|---|---|---|"]
    for cfg in data["configs"]:
        c = cfg.get("check")
        if not c:
            continue
        fmt = lambda v: v if isinstance(v, str) else f"{v:.1e}"  # noqa: E731
        shape = "x".join(str(v) for v in c.get("rows", []))
        lines.append(f"| {cfg['id']} | {shape} | {fmt(c.get('per-sample', '-'))} | {fmt(c.get('func', '-'))} | "
                     f"{fmt(c.get('replicate', '-'))} |")
    return "\n".join(lines) + "\n"


def write(data: Dict[str, Any], out: Path) -> None:
    (out / "loko_jacobian_cost.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "loko_jacobian_cost.md").write_text(markdown(data))


# ------------------------------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (JSON + markdown)")
    ap.add_argument("--quick", action="store_true", help="small shapes, for a CPU check")
    ap.add_argument("--device", default="", help="cuda or cpu (default: cuda when available, cpu with --quick)")
    ap.add_argument("--only", default="", help="comma-separated configuration ids")
    ap.add_argument("--methods", default="", help="comma-separated methods (default: all)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timed steps per method at most")
    ap.add_argument("--assets", default=str(project_root() / ".gpu_assets"), help="folder of carried model bundles")
    ap.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    ap.add_argument("--no-check", action="store_true", help="skip the rows-equality check")
    args = ap.parse_args(argv)
    if args.threads:
        set_cpu_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info: Dict[str, Any] = dict(torch=torch.__version__, device=str(device), quick=args.quick,
                                threads=torch.get_num_threads(), argv=sys.argv[1:])
    info.update(versions())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        torch.backends.cuda.matmul.allow_tf32 = False  # the library's setting (fp32 filter math)
    print(json.dumps(info), flush=True)
    methods = ["adamw-fused"] + [f"loko-{p}" for p in LOKO_PATHS + LOKO_TOPK]
    if args.methods:
        methods = [m for m in methods if m in args.methods.split(",")]
    data: Dict[str, Any] = dict(info=info, targets=TARGETS, configs=[])
    t_start = time.perf_counter()
    for cfg in configs(args):
        entry: Dict[str, Any] = dict(id=cfg["id"], batch=cfg["batch"], runs=[])
        data["configs"].append(entry)
        model = None
        try:
            model, x, y, m, extra = cfg["build"](args, device)
            entry.update(extra, num_classes=m,
                         trainable=sum(p.numel() for p in model.parameters() if p.requires_grad))
            for method in methods:
                res = run_method(cfg, method, model, x, y, m, args, device)
                entry["runs"].append(res)
                shown = res.get("error") or res.get("skipped") or (
                    f"e2e {res['e2e_ms']:.2f} ms, step {res['step_ms']:.2f} ms, path {res.get('path_used', '-')}")
                print(f"{cfg['id']:>18} {method:>20}  {shown}  [{time.perf_counter() - t_start:.0f}s]", flush=True)
                write(data, out)
            if not args.no_check:
                entry["check"] = check_rows(model, x, y, m, device)
                print(f"{cfg['id']:>18} rows check {entry['check']}", flush=True)
        except Exception as exc:
            entry["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
            traceback.print_exc()
            print(f"{cfg['id']:>18} ERROR {entry['error'][:200]}", flush=True)
        finally:
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        write(data, out)
    print()
    print(markdown(data))


if __name__ == "__main__":
    main()
