"""LoKO micro-benchmarks (CPU): Jacobian construction, joint vs sequential batches, P0 initialisation.

    python -m loraopt_bench.loko_jacobian            # everything (a few minutes on 2 cores)
    python -m loraopt_bench.loko_jacobian --only jacobian,cost,quality,p0 --seeds 3 --threads 1

Prints markdown tables; ``benchmarks/notes/loko.md`` records one run and its reading.

* ``jacobian``: the m-row Jacobian of softmax outputs for one sample, built with one vmapped backward
  (``output_jacobian``, ``autograd.grad(..., is_grads_batched=True)``) vs m separate ``autograd.grad`` calls, and
  against one ordinary loss backward (what AdamW pays).
* ``cost``: wall time per sample of ``observe`` + ``step`` in joint and sequential mode, b in {1, 8, 32}, m = 10.
* ``quality``: prequential ("online") accuracy and held-out accuracy on one-pass streams (scikit-learn digits,
  m = 10; ``make_classification``, m = 5) with a LoRA MLP, joint vs sequential at b in {1, 8, 32} for three P0
  choices, and AdamW at batch 1 for reference.
* ``p0``: the same streams at b = 1 with different P0 choices.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from loraopt.optim.loko import create_loko_optimizer, output_jacobian

from .common import feed, set_cpu_threads


# ------------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: int, m: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, m)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def lora_mlp(d_in: int, hidden: int, m: int, r: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return get_peft_model(MLP(d_in, hidden, m), LoraConfig(target_modules=["fc1", "fc2"], r=r, lora_alpha=2 * r,
                                                             modules_to_save=["head"]))


def lora_bert_tiny(m: int, seed: int) -> nn.Module:
    """A randomly initialised 2-layer BERT (hidden 128) with LoRA on query/value and a trained classifier."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512, num_labels=m, max_position_embeddings=128)
    model = BertForSequenceClassification(cfg)
    return get_peft_model(model, LoraConfig(target_modules=["query", "value"], r=8, lora_alpha=16,
                                            modules_to_save=["classifier"]))


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def best_time(fn: Callable[[], None], repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


# ------------------------------------------------------------------------------------------------- jacobian


def bench_jacobian(args) -> None:
    print("\n## Jacobian of the softmax outputs, one sample (ms, best of 5)\n")
    print("| model | n (trainable) | m | batched VJP | m x autograd.grad | loop / batched | one loss backward | "
          "batched / backward |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("mlp-512", "bert-tiny-seq64"):
        for m in (2, 10, 100):
            if name == "mlp-512":
                model = lora_mlp(512, 512, m, 8, 0)
                inputs = {"x": torch.randn(1, 512)}
                fwd = lambda: model(inputs["x"])
            else:
                model = lora_bert_tiny(m, 0)
                ids = torch.randint(1000, (1, 64))
                fwd = lambda: model(input_ids=ids).logits
            params = [p for p in model.parameters() if p.requires_grad]

            def batched():
                h = torch.softmax(fwd(), -1)
                output_jacobian(h, params, retain_graph=False)

            def loop():
                h = torch.softmax(fwd(), -1).reshape(-1)
                for k in range(m):
                    torch.autograd.grad(h[k], params, retain_graph=k < m - 1, allow_unused=True)

            def backward():
                loss = nn.functional.cross_entropy(fwd(), torch.zeros(1, dtype=torch.long))
                torch.autograd.grad(loss, params, allow_unused=True)

            def forward_only():
                fwd()

            tf = best_time(forward_only)
            tb = best_time(batched) - tf
            tl = best_time(loop) - tf
            tg = best_time(backward) - tf
            print(f"| {name} | {n_trainable(model):,} | {m} | {tb * 1e3:.2f} | {tl * 1e3:.2f} | {tl / tb:.1f}x | "
                  f"{tg * 1e3:.2f} | {tb / tg:.1f}x |")
    print("\n(times exclude the forward pass, measured separately and subtracted)")


# ------------------------------------------------------------------------------------------------- cost


def bench_cost(args) -> None:
    print("\n## observe + step wall time per sample, m = 10 (ms, best of 3)\n")
    print("| model | n | b | joint (batch-graph rows) | joint (forward=, per-sample rows) | sequential | "
          "joint / sequential | joint forward= / sequential |")
    print("|---|---|---|---|---|---|---|---|")
    m = 10
    for name in ("mlp-64-128", "bert-tiny-seq32"):
        for b in (1, 8, 32):
            res = {}
            for mode in ("joint", "joint-fwd", "sequential"):
                if name == "mlp-64-128":
                    model = lora_mlp(64, 128, m, 4, 0)
                    x = torch.randn(b, 64)
                    fwd = lambda sl=slice(None): model(x[sl])
                else:
                    model = lora_bert_tiny(m, 0)
                    ids = torch.randint(1000, (b, 32))
                    fwd = lambda sl=slice(None): model(input_ids=ids[sl]).logits
                y = torch.randint(m, (b,))
                opt = create_loko_optimizer(model, num_outputs=m, batch_mode=mode.split("-")[0])

                def one():
                    kw = {"forward": lambda i: fwd(slice(i, i + 1))} if (mode != "joint" and b > 1) else {}
                    opt.observe(fwd(), y, **kw)
                    opt.step()

                res[mode] = best_time(one, repeats=3) / b
            print(f"| {name} | {n_trainable(model):,} | {b} | {res['joint'] * 1e3:.2f} | "
                  f"{res['joint-fwd'] * 1e3:.2f} | "
                  f"{res['sequential'] * 1e3:.2f} | {res['joint'] / res['sequential']:.2f} | "
                  f"{res['joint-fwd'] / res['sequential']:.2f} |")


# ------------------------------------------------------------------------------------------------- quality


def digits_stream(seed: int):
    """scikit-learn digits (m = 10), shuffled once by ``seed``: 1347 stream samples, 450 held out."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(y)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    X, y = X[perm], y[perm]
    n_train = 1347
    mu, sd = X[:n_train].mean(0), X[:n_train].std(0) + 1e-3
    X = (X - mu) / sd
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


def synthetic_stream(seed: int):
    """scikit-learn ``make_classification`` (m = 5, 20 features, 2 clusters per class): 1500 stream, 500 held out."""
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=2000, n_features=20, n_informative=10, n_classes=5, n_clusters_per_class=2,
                               class_sep=1.5, random_state=seed)
    X, y = torch.tensor(X, dtype=torch.float32), torch.tensor(y)
    return X[:1500], y[:1500], X[1500:], y[1500:]


TASKS = {
    "digits": (digits_stream, dict(d_in=64, hidden=128, m=10)),
    "synthetic": (synthetic_stream, dict(d_in=20, hidden=64, m=5)),
}


def run_stream(seed: int, b: int, make_opt: Callable, kind: str = "loko", task: str = "digits") -> Dict[str, float]:
    load, shape = TASKS[task]
    Xtr, ytr, Xte, yte = load(seed)
    model = lora_mlp(shape["d_in"], shape["hidden"], shape["m"], 4, seed)
    opt = make_opt(model)
    correct = 0
    t0 = time.perf_counter()
    for start in range(0, len(ytr), b):
        x, y = Xtr[start : start + b], ytr[start : start + b]
        logits = model(x)
        correct += int((logits.argmax(-1) == y).sum())  # predicted before the update (prequential)
        seq = kind == "loko" and opt.param_groups[0]["batch_mode"] == "sequential" and len(y) > 1
        opt.zero_grad(set_to_none=True)
        feed(opt, logits, y, **({"forward": lambda i: model(x[i : i + 1])} if seq else {}))
        opt.step()
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        test = float((model(Xte).argmax(-1) == yte).float().mean())
    return {"online": correct / len(ytr), "test": test, "sec": elapsed}


def summarise(runs: List[Dict[str, float]]) -> str:
    def ms(key):
        vals = [r[key] for r in runs]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

    return f"{ms('online')} | {ms('test')} | {statistics.mean(r['sec'] for r in runs):.1f}"


def _label(p_init) -> str:
    return f"U{p_init}" if isinstance(p_init, tuple) else repr(p_init)


def bench_quality(args) -> None:
    seeds = list(range(args.seeds))
    for task in ("digits", "synthetic"):
        m = TASKS[task][1]["m"]
        print(f"\n## joint vs sequential, {task} stream (one pass, prequential), LoRA MLP r = 4; {len(seeds)} seeds\n")
        print("| method | b | online acc | held-out acc | sec / pass |")
        print("|---|---|---|---|---|")
        for p_init in ((1e-4, 1e-2), 0.1, "score"):
            for b in (1, 8, 32):
                for mode in ("joint", "sequential"):
                    if b == 1 and mode == "sequential":
                        continue  # identical to joint at b = 1 (tested)
                    runs = [run_stream(s, b, lambda mdl, s=s: create_loko_optimizer(
                        mdl, num_outputs=m, batch_mode=mode, seed=s, p_init=p_init), task=task) for s in seeds]
                    print(f"| LoKO {mode}, p_init={_label(p_init)} | {b} | {summarise(runs)} |")
        for lr in (1e-3, 3e-3, 1e-2):
            runs = [run_stream(s, 1, lambda mdl: torch.optim.AdamW(
                [p for p in mdl.parameters() if p.requires_grad], lr=lr), kind="adamw", task=task) for s in seeds]
            print(f"| AdamW lr={lr:g} | 1 | {summarise(runs)} |")


def bench_p0(args) -> None:
    seeds = list(range(args.seeds))
    for task in ("digits", "synthetic"):
        m = TASKS[task][1]["m"]
        print(f"\n## P0 choices, {task} stream, b = 1, {len(seeds)} seeds\n")
        print("| p_init | online acc | held-out acc | sec / pass |")
        print("|---|---|---|---|")
        choices = [(1e-5, 1e-3), (1e-4, 1e-2), (1e-3, 1e-1), (1e-2, 1.0), 1e-3, 1e-2, 1e-1, "score"]
        for p_init in choices:
            runs = [run_stream(s, 1, lambda mdl, s=s: create_loko_optimizer(mdl, num_outputs=m, p_init=p_init, seed=s),
                               task=task) for s in seeds]
            print(f"| {_label(p_init)} | {summarise(runs)} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="jacobian,cost,quality,p0")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable timings on shared CPUs)")
    args = ap.parse_args()
    set_cpu_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    sections = {"jacobian": bench_jacobian, "cost": bench_cost, "quality": bench_quality, "p0": bench_p0}
    for name in args.only.split(","):
        sections[name.strip()](args)


if __name__ == "__main__":
    main()
