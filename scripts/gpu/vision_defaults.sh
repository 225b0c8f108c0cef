#!/usr/bin/env bash
# One GPU job on two H200s (nvidia-h200-x2), run from the repository root with OUT set: the one-epoch vision suite
# (loraopt_bench.quality --suite vision) for the PSI family and LoKO at their library-default lr, 3 seeds (LoKO 1),
# five runs per GPU at most: more processes than that made every run several times slower (benchmarks/notes/psi.md).
# Carry .gpu_assets/effnet-fashion-mnist. Everything comes back as one archive, $OUT/vision_defaults.tgz.
# EXTRA is passed to every quality call (e.g. "--hp psi-lora:compile=False ...").
set -u
: "${OUT:?set OUT}"
SRC=${SRC:-src}
export PYTHONPATH=$PWD/$SRC
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BUNDLE=$PWD/.gpu_assets/effnet-fashion-mnist
export LORAOPT_FASHION_MNIST_DIR=$BUNDLE/data/fashion-mnist
DEADLINE=${DEADLINE:-500}
WORK=/tmp/vision_defaults
mkdir -p $WORK
quality() {  # gpu name args...
  local gpu=$1 name=$2; shift 2
  CUDA_VISIBLE_DEVICES=$gpu python -m loraopt.cli bench quality --suite vision --model "$BUNDLE" \
    --data-dir "$BUNDLE/data" --device cuda --loko-jacobian func --workers 5 --deadline "$DEADLINE" \
    --out "$WORK/$name" --runs-dir "/tmp/vision-runs/$name" ${EXTRA:-} "$@" > "$WORK/$name.log" 2>&1
}
quality 0 gpu0 --methods scaled-psi-lora proj-psi-lora loko --lrs scaled-psi-lora=0.3 proj-psi-lora=0.03 loko=1.0 \
  --seeds 0 1 2 --method-seeds proj-psi-lora=2 loko=0 &
quality 1 gpu1 --methods psi-lora proj-psi-lora --lrs psi-lora=0.03 proj-psi-lora=0.03 --seeds 0 1 2 \
  --method-seeds proj-psi-lora=0,1 &
wait
tail -n 30 $WORK/*.log
tar czf "$OUT/vision_defaults.tgz" -C $WORK --exclude='*.png' .
