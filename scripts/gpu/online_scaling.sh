#!/usr/bin/env bash
# How the online runner's throughput scales with processes sharing one GPU (sizing the 10,000-sample streams,
# benchmarks/notes/loko.md). Fashion-MNIST / EfficientNet-Lite0, SAMPLES (default 300) samples, seed 0..k-1, the
# AdamW/AdaGrad ensemble: 14 members alone, 7 members alone, 3 and 6 concurrent 7-member ensembles on the GPU, and
# one 7-member ensemble on the host CPU with 1 and 4 threads. Run from the repository root with OUT set and
# BUNDLE=.gpu_assets/effnet-fashion-mnist carried; writes $OUT/scaling/<phase>/ and prints each phase's ms/sample.
set -u
: "${OUT:?set OUT}" "${BUNDLE:?set BUNDLE}"
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1
export LORAOPT_FASHION_MNIST_DIR=$PWD/$BUNDLE/data/fashion-mnist
N=${SAMPLES:-300}
one() {  # one <phase> <seed> <device> <threads> <methods...>
  local phase=$1 seed=$2 device=$3 threads=$4; shift 4
  python -m loraopt.cli bench online --streams fashion --methods "$@" --samples $N --eval-samples 10 \
    --seeds-list $seed --device $device --threads $threads --bundle "$PWD/$BUNDLE" --ensemble --no-progress \
    --out $OUT/scaling/$phase/s$seed > $OUT/scaling/$phase-s$seed.log 2>&1
}
report() {  # the ensemble's whole time per sample, per process of a phase
  python - "$OUT/scaling/$1" <<'P'
import json, sys, pathlib
for f in sorted(pathlib.Path(sys.argv[1]).glob("s*/fashion.json")):
    runs = json.load(open(f))["runs"].values()
    r = next(iter(runs))
    print(sys.argv[1].rsplit("/", 1)[-1], f.parent.name, "members", len(runs), "ensemble ms/sample",
          round(1000 * r["sec_per_sample"] * len(runs), 1))
P
}
mkdir -p $OUT/scaling
one gpu-14-alone 0 cuda 1 adamw-wide adagrad-wide; report gpu-14-alone
one gpu-7-alone 0 cuda 1 adamw-wide; report gpu-7-alone
for s in 0 1 2; do one gpu-7-x3 $s cuda 1 adamw-wide & done; wait; report gpu-7-x3
for s in 0 1 2 3 4 5; do one gpu-7-x6 $s cuda 1 adamw-wide & done; wait; report gpu-7-x6
one cpu-7-t1 0 cpu 1 adamw-wide; report cpu-7-t1
one cpu-7-t4 0 cpu 4 adamw-wide; report cpu-7-t4
