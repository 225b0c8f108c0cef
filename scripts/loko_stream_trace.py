"""Trace LoKO's filter state along one online stream of ``loraopt bench online`` (benchmarks/notes/loko.md, "LoKO on
the 10,000-sample streams").

Runs the same pass as ``loraopt_bench.online.run_one`` (same stream order, model, optimizer and prequential
scoring) and records, every ``--every`` samples: the prequential accuracy of the last ``--every`` samples, the
noise estimate ``R`` (trace, smallest and largest eigenvalue, overall and in the directions orthogonal to the
all-ones vector, the only ones a softmax update sees), the covariance ``p`` (mean, max), the size of the
last update (max |delta theta|) and the largest trainable parameter. Writes one JSON file.

    python scripts/loko_stream_trace.py --stream fashion --seed 1 --samples 9000 \\
        --bundle .gpu_assets/effnet-fashion-mnist --out benchmarks/results/online/loko_trace/fashion-s1.json
    python scripts/loko_stream_trace.py ... --set r_min=1e-2 --set noise_floor=...   # LoKO keyword overrides

(``LORAOPT_FASHION_MNIST_DIR`` / ``LORAOPT_DATA_DIR`` as for ``loraopt bench online --bundle``.)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from loraopt.optim.registry import create_optimizer  # noqa: E402
from loraopt_bench import online  # noqa: E402
from loraopt_bench.common import set_cpu_threads  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", default="fashion")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bundle", nargs="*", default=())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a LoKO keyword argument (Python literal), e.g. r_min=1e-2 or beta=0.99")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    set_cpu_threads(args.threads)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    method = online.METHODS["loko"]
    eval_samples = args.eval_samples if args.eval_samples is not None else online.STREAMS[args.stream].eval_samples
    data = online.load_stream(args.stream, eval_samples)
    stream, phase_starts = online.stream_for_seed(data, args.samples, args.seed)
    adapter = online.build_model(data.spec.model, data.num_classes, args.seed, device=args.device,
                                 bundles=tuple(args.bundle))
    kwargs = {**online._optimizer_kwargs(method, method.grid[0], data.num_classes, args.seed), **overrides}
    optimizer = create_optimizer("loko", adapter.model, **kwargs)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    inputs = adapter.encode(stream.inputs)
    labels = stream.labels.to(args.device)
    trace, correct, largest_step = [], 0, 0.0
    start = time.perf_counter()
    for i, x in enumerate(inputs):
        logits = adapter.forward(x)
        correct += int(int(logits.detach().argmax(-1)) == int(labels[i]))
        before = torch.cat([p.detach().reshape(-1) for p in params])
        online._learn(method.update, optimizer, logits, labels[i:i + 1], inputs=x, model=adapter.model)
        step = float((torch.cat([p.detach().reshape(-1) for p in params]) - before).abs().max())
        largest_step = max(largest_step, step)
        if (i + 1) % args.every == 0 or i + 1 == len(inputs):
            R = optimizer.state[optimizer.anchor]["R"].double()
            R = 0.5 * (R + R.T)
            eig = torch.linalg.eigvalsh(R)
            # The directions the softmax update sees: orthogonal to the all-ones vector (its own floor is r_min).
            m = R.shape[0]
            tangent = torch.eye(m, dtype=R.dtype) - 1.0 / m
            tangent_eig = torch.linalg.eigvalsh(tangent @ R @ tangent)[1:] if m > 1 else eig
            p = torch.cat([optimizer.state[q]["p"].reshape(-1) for q in params]).double()
            trace.append({
                "samples": i + 1, "window_acc": correct / args.every, "R_trace": float(R.trace()),
                "R_eig_min": float(eig[0]), "R_eig_max": float(eig[-1]),
                "R_tangent_eig_min": float(tangent_eig[0]), "R_tangent_eig_max": float(tangent_eig[-1]),
                "p_mean": float(p.mean()),
                "p_max": float(p.max()), "max_abs_step": largest_step,
                "max_abs_param": max(float(q.detach().abs().max()) for q in params),
                "skipped": int(optimizer.state[optimizer.anchor]["skipped"]),
            })
            print(json.dumps(trace[-1]), flush=True)
            correct, largest_step = 0, 0.0
    held_out = {name: float((adapter.predict(pool.inputs) == pool.labels).float().mean())
                for name, pool in data.held_out.items()}
    out = {"stream": args.stream, "seed": args.seed, "samples": args.samples, "overrides": overrides,
           "optimizer_defaults": online.optimizer_defaults(optimizer), "held_out_acc": held_out,
           "seconds": time.perf_counter() - start, "command": " ".join(sys.argv), "trace": trace}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(online.jsonable(out), f, indent=1)
    print(f"held-out {held_out}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
