"""``loraopt bench digits``: a seconds-long CPU probe of optimizer stability (sklearn digits, LoRA MLP).

A 3-layer MLP (64 -> 64 -> 64 -> 10) with random frozen hidden weights, PEFT LoRA r = 4 on the two hidden layers and
a trainable head, batch 32.  It reproduces, in seconds, the failure modes seen on the realistic suites (the low-rank
momentum blowing up or dying), so stability fixes can be measured before a GPU run.  Per run it records the test
accuracy and, every ``--log-every`` steps, the norms of the LoRA factors and the momentum factors and the condition
number of ``M_A``.

    loraopt bench digits --optimizers psi-lora --lrs 0.03 0.1 --set momentum=0.9 --set momentum_balance=norm
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .common import drive, set_cpu_threads

__all__ = ["run_digits", "main"]


def _data(seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1234)  # one fixed split; the seed varies the model and the data order
    perm = torch.randperm(len(y), generator=g)
    test, train = perm[:360], perm[360:]
    return x[train], y[train], x[test], y[test]


def _model(seed: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    return get_peft_model(net, LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], modules_to_save=["4"]))


def _diagnostics(optimizer) -> Dict[str, float]:
    out: Dict[str, float] = {}
    layers = getattr(optimizer, "layers", [])
    if not layers:
        return out
    a = sum(float(layer.A.detach().norm()) for layer in layers) / len(layers)
    b = sum(float(layer.B.detach().norm()) for layer in layers) / len(layers)
    out.update(norm_A=a, norm_B=b)
    state_a, state_b = optimizer.state[layers[0].A], optimizer.state[layers[0].B]
    if "momentum_A" in state_a:
        ma, mb = state_a["momentum_A"], state_b["momentum_B"]
        s = torch.linalg.svdvals(ma)
        out.update(norm_MA=float(ma.norm()), norm_MB=float(mb.norm()), norm_M=float((mb @ ma).norm()),
                   cond_MA=float(s[0] / s[-1].clamp_min(1e-30)))
    return out


def run_digits(optimizer: str, lr: Optional[float], seed: int = 0, steps: int = 1500, batch: int = 32,
               hp: Optional[Dict[str, Any]] = None, log_every: int = 100) -> Dict[str, Any]:
    """One run; returns the final test accuracy, the loss/diagnostic log and whether it diverged."""
    import loraopt

    xtr, ytr, xte, yte = _data(seed)
    model = _model(seed)
    kwargs = dict(hp or {})
    if lr is not None:
        kwargs["lr"] = lr
    opt = loraopt.create_optimizer(optimizer, model, **kwargs)
    g = torch.Generator().manual_seed(seed)
    log: List[Dict[str, float]] = []
    order = torch.randperm(len(ytr), generator=g)
    pos, start = 0, time.perf_counter()
    for t in range(1, steps + 1):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(ytr), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = drive(opt, model, (xtr[idx], ytr[idx]))
        if t % log_every == 0 or t == steps:
            entry = dict(step=t, loss=float(loss.detach()))
            entry.update(_diagnostics(opt))
            log.append(entry)
    with torch.no_grad():
        logits = model(xte)
        acc = float((logits.argmax(-1) == yte).float().mean())
        test_loss = float(nn.functional.cross_entropy(logits, yte))
    finite = all(math.isfinite(v) for p in model.parameters() for v in [float(p.detach().abs().max())])
    return dict(optimizer=optimizer, lr=lr, seed=seed, hp=kwargs, accuracy=acc, test_loss=test_loss,
                finite=finite, seconds=time.perf_counter() - start, log=log)


def _parse_value(text: str) -> Any:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="loraopt bench digits", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--optimizers", nargs="+", default=["psi-lora"], help="registry names")
    parser.add_argument("--lrs", nargs="+", type=float, default=[None], help="learning rates (default: the library's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an optimizer hyperparameter (repeatable)")
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None, help="write every run as JSON here")
    parser.add_argument("--verbose", action="store_true", help="print the diagnostic log of each run")
    args = parser.parse_args(argv)
    hp = {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        hp[key] = _parse_value(value)
    set_cpu_threads(1)
    runs = []
    for name in args.optimizers:
        for lr in args.lrs:
            for seed in args.seeds:
                run = run_digits(name, lr, seed=seed, steps=args.steps, hp=hp, log_every=args.log_every)
                runs.append(run)
                last = run["log"][-1]
                extra = " ".join(f"{k}={v:.3g}" for k, v in last.items() if k not in ("step",))
                print(f"{name:16s} lr={lr!s:8s} seed={seed} acc={run['accuracy']:.3f} finite={run['finite']} {extra}")
                if args.verbose:
                    for entry in run["log"]:
                        print("   ", " ".join(f"{k}={v:.3g}" for k, v in entry.items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
