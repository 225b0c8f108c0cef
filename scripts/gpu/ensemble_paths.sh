#!/usr/bin/env bash
# The online ensemble's paths on one GPU (members as a batch, replayed from CUDA graphs or eager; torch.vmap): ms
# per stream sample of a 14-member AdamW/AdaGrad ensemble, alone, and whether they agree; first the GPU-only tests of
# the graphed ensemble where pytest is installed. BUNDLE=.gpu_assets/effnet-fashion-mnist (carried), STREAM=fashion,
# SAMPLES=200, PATHS="graph batch vmap"; from the repository root.
set -u
: "${BUNDLE:?set BUNDLE}"
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 LORAOPT_DATA_DIR=$PWD/$BUNDLE/data
export LORAOPT_FASHION_MNIST_DIR=$PWD/$BUNDLE/data/fashion-mnist
python -c "import pytest" 2>/dev/null && python -m pytest -q -p no:cacheprovider tests/test_online_ensemble.py -k "graph" 2>&1 | tail -5
python - "$PWD/$BUNDLE" "${STREAM:-fashion}" "${SAMPLES:-200}" "${PATHS:-graph batch vmap}" <<'P' 2>&1 | grep -v -i warn
import sys, torch
from loraopt_bench import online, online_ensemble as ens
bundle, stream, samples, paths = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split()
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # as bench online runs
tasks = [online.RunTask(stream, m, i, 0, samples, 100, 32, 1, "cuda", (bundle,))
         for m in ("adamw-wide", "adagrad-wide") for i in range(7)]
out = {}
for path in paths:
    graph = path == "graph"  # the batch path with its steps replayed from CUDA graphs
    o = out[path] = ens.ensemble_pass(ens.EnsembleTask(tuple(tasks), graph=graph), path="batch" if graph else path)
    print(stream, path, o.records[0]["ensemble_path"], "ensemble ms/sample",
          round(1000 * o.records[0]["ensemble_sec_per_sample"], 1), flush=True)
names = list(out)
for other in names[1:]:
    a, b = out[names[0]], out[other]
    print(names[0], "vs", other, "prequential flags that differ",
          sum(x["correct"] != y["correct"] for x, y in zip(a.records, b.records)),
          "held-out that differ", sum(x["final_acc"] != y["final_acc"] for x, y in zip(a.records, b.records)))
P
