"""The gradient baselines of ``loraopt bench online`` run one at a time (``run_one``) and as one vmapped ensemble
(``--ensemble``): wall time per sample and how far the two agree (benchmarks/notes/loko.md, "Ensembled baselines
for the online sweep").

    python scripts/online_ensemble_check.py --stream fashion --samples 100 --eval-samples 200
    python scripts/online_ensemble_check.py --stream sst2 --samples 100 --eval-samples 200
    python scripts/online_ensemble_check.py --stream digits --samples 60           # no model package needed
    python scripts/online_ensemble_check.py --stream fashion --samples 100 --float64   # the ensemble's own error
    # on a GPU (PYTHONPATH=src, LORAOPT_DATA_DIR and LORAOPT_FASHION_MNIST_DIR set to the bundle's data):
    python scripts/online_ensemble_check.py --stream fashion --device cuda --bundle BUNDLE_DIR [--no-tf32]
    python scripts/online_ensemble_check.py --stream fashion --device cuda --bundle BUNDLE_DIR --parts

``--parts`` times the parts of one step instead (plain and vmapped forward/backward, torch's and the stacked update).

Prints one JSON object: the per-sample time of the separate runs (summed over the members: the time the sweep spends
per stream sample) and of the ensemble, the prequential flags that differ per member, the held-out accuracies that
differ, and the largest difference of the final trainable parameters (absolute, and relative to how far the
separate run moved them from the initial model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def step_parts(online, ens, args, sizes=(1, 4, 14), repeats: int = 30, warmup: int = 5):
    """Milliseconds per call of each part of a step on one stream sample (after ``warmup`` calls, synchronised)."""
    import torch.nn.functional as F
    from torch.func import functional_call, vmap

    from loraopt.functional.jacobian import attention_for_vmap

    spec = online.STREAMS[args.stream]
    adapter = online.build_model(spec.model, online.STREAM_CLASSES[args.stream], args.seed, device=args.device,
                                 bundles=args.bundle)
    data = online.load_stream(args.stream, args.eval_samples)
    x = adapter.encode(data.phases[0][1].take(torch.arange(1)).inputs)[0]
    y = data.phases[0][1].labels[:1].to(args.device)
    named = [(n, p) for n, p in adapter.model.named_parameters() if p.requires_grad]
    params, keys = [p for _, p in named], ["model." + n for n, _ in named]
    batched = vmap(lambda values, sample: functional_call(ens._Forward(adapter.model, adapter.forward), values,
                                                          (sample,)), in_dims=(0, None))

    def timed(fn):
        for _ in range(warmup):
            fn()
        ens._synchronize(args.device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        ens._synchronize(args.device)
        return 1e3 * (time.perf_counter() - start) / repeats

    def plain():
        loss = F.cross_entropy(adapter.forward(x), y)
        for p in params:
            p.grad = None
        loss.backward()

    plain()
    adamw = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    parts = {"plain_forward_ms": timed(lambda: adapter.forward(x)), "plain_forward_backward_ms": timed(plain),
             "torch_adamw_step_ms": timed(adamw.step)}
    with attention_for_vmap(not args.fused_attention):
        for size in sizes:
            flat, views = ens.stack_parameters(params, size)
            update = ens.StackedAdamW(flat, lr=[1e-4] * size)
            grad = torch.randn_like(flat)

            def vmapped():
                loss = F.cross_entropy(batched(dict(zip(keys, views)), x).flatten(0, 1), y.expand(size),
                                       reduction="sum")
                for v in views:
                    v.grad = None
                loss.backward()

            parts[f"E{size}"] = {"vmapped_forward_ms": timed(lambda: batched(dict(zip(keys, views)), x)),
                                 "vmapped_forward_backward_ms": timed(vmapped),
                                 "stacked_update_ms": timed(lambda: update.step(grad))}
    return {"stream": args.stream, "device": args.device, "torch": torch.__version__, **parts}


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from loraopt_bench import online
    from loraopt_bench import online_ensemble as ens

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stream", default="fashion", choices=sorted(online.STREAMS))
    parser.add_argument("--methods", nargs="+", default=["adamw-wide", "adagrad-wide"])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bundle", nargs="+", default=[], metavar="DIR",
                        help="GPU bundles to load the model from (as `loraopt bench online --bundle`)")
    parser.add_argument("--fused-attention", action="store_true",
                        help="leave attention on torch's default kernel inside vmap (default: the math kernel)")
    parser.add_argument("--skip-separate", action="store_true", help="time the ensemble only")
    parser.add_argument("--parts", action="store_true",
                        help="instead: time the parts of one step (plain forward/backward and torch AdamW step; "
                             "vmapped forward/backward and stacked update at E = 1, 4 and 14), synchronised")
    parser.add_argument("--no-tf32", action="store_true", help="CUDA: full float32 convolutions and matmuls (torch "
                        "lets cuDNN convolutions use TF32 by default)")
    parser.add_argument("--float64", action="store_true",
                        help="run both paths with the model in float64 (floating inputs cast on entry): separates the "
                             "ensemble's own error from float32 rounding")
    args = parser.parse_args(argv)
    online._worker_init(args.threads)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    if args.parts:
        print(json.dumps(step_parts(online, ens, args), indent=1))
        return 0
    tasks = [online.RunTask(args.stream, m, i, args.seed, args.samples, args.eval_samples, threads=args.threads,
                            device=args.device, bundles=tuple(args.bundle)) for m in args.methods for i in range(len(online.METHODS[m].grid))]
    adapters = []
    real_build = online.build_model

    def spy(*a, **k):
        adapter = real_build(*a, **k)
        if args.float64:
            adapter.model.double()
            adapter.model.register_forward_pre_hook(
                lambda module, inputs: tuple(x.double() if torch.is_floating_point(x) else x for x in inputs))
        adapters.append(adapter)
        return adapter

    online.build_model = spy
    online.load_stream(args.stream, args.eval_samples)  # data loading is not part of either timing
    start = time.perf_counter()
    outcome = ens.ensemble_pass(ens.EnsembleTask(tuple(tasks)), math_attention=not args.fused_attention)
    ensemble_wall = time.perf_counter() - start
    report = {"stream": args.stream, "model": online.STREAMS[args.stream].model, "members": len(tasks),
              "samples": args.samples, "threads": args.threads, "device": args.device,
              "math_attention": not args.fused_attention, "float64": args.float64,
              "tf32": torch.backends.cudnn.allow_tf32, "torch": torch.__version__,
              "ensemble_ms_per_sample": 1e3 * outcome.records[0]["ensemble_sec_per_sample"],
              "ensemble_wall_s_with_eval": ensemble_wall}
    if args.skip_separate:
        print(json.dumps(report, indent=1))
        return 0
    initial = {n: p.detach().clone() for n, p in
               real_build(online.STREAMS[args.stream].model, online.STREAM_CLASSES[args.stream], args.seed,
                          device=args.device, bundles=args.bundle).model.named_parameters() if p.requires_grad}
    members = []
    separate = 0.0
    for k, task in enumerate(tasks):
        record = online.run_one(task)
        separate += record["sec_per_sample"]
        member = outcome.records[k]
        flips = [i for i, (a, b) in enumerate(zip(record["correct"], member["correct"])) if a != b]
        gap, rel = 0.0, 0.0
        for name, p in adapters[-1].model.named_parameters():
            if p.requires_grad:
                diff = float((outcome.params[name][k] - p.detach().cpu()).abs().max())
                moved = float((p.detach().cpu() - initial[name].cpu()).abs().max())
                gap, rel = max(gap, diff), max(rel, diff / moved if moved else 0.0)
        members.append({"method": task.method, "lr": online.METHODS[task.method].grid[task.grid_index]["lr"],
                        "flag_mismatches": len(flips), "first_mismatch": flips[0] if flips else None,
                        "online_acc": [record["correct"].count("1") / args.samples,
                                       member["correct"].count("1") / args.samples],
                        "final_acc": [record["final_acc"], member["final_acc"]],
                        "nonfinite_logits": [record["nonfinite_logits"], member["nonfinite_logits"]],
                        "max_param_diff": gap, "max_param_diff_rel_to_move": rel})
    report.update(separate_ms_per_sample=1e3 * separate,
                  speedup=separate / outcome.records[0]["ensemble_sec_per_sample"],
                  flag_mismatches=sum(m["flag_mismatches"] for m in members),
                  final_acc_mismatches=sum(m["final_acc"][0] != m["final_acc"][1] for m in members),
                  max_param_diff=max(m["max_param_diff"] for m in members), per_member=members)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
