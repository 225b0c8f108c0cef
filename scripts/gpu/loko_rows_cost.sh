#!/usr/bin/env bash
# Issue 10 §1-2 on one GPU, from the repository root with OUT set and one model bundle carried (BUNDLE):
#   1. LoKO's step cost per Jacobian path against fused AdamW (loraopt_bench.loko_jacobian_cost, configs ONLY);
#   2. a short online stream (STREAM, SAMPLES samples, seed 0, one run at a time) of METHODS, for the per-sample
#      cost of each method on the GPU with the current runner.
# Everything comes back in $OUT (jac/ and online/, plus logs).
set -u
: "${OUT:?set OUT}" "${BUNDLE:?set BUNDLE}"
export PYTHONPATH=$PWD/src:/tmp/loraopt-pyext PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORAOPT_DATA_DIR=$PWD/$BUNDLE/data LORAOPT_FASHION_MNIST_DIR=$PWD/$BUNDLE/data/fashion-mnist
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /tmp/loraopt-pyext .whl/*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ -n "${ONLY:-}" ]; then
  python -m loraopt_bench.loko_jacobian_cost --out "$OUT/jac" --assets .gpu_assets --only "$ONLY" \
    --methods "${JAC_METHODS:-adamw-fused,loko-batch,loko-func,loko-replicate,loko-auto}" --budget "${BUDGET:-8}" \
    2>&1 | tee "$OUT/jac.log" | grep -v Warning
fi
if [ -n "${STREAM:-}" ]; then
  python -m loraopt.cli bench online --streams "$STREAM" --samples "${SAMPLES:-300}" --eval-samples 100 \
    --seeds-list 0 --device cuda --bundle "$PWD/$BUNDLE" --jobs "${JOBS:-1}" --no-progress \
    --methods ${METHODS:-loko loko-scalar psi-lora-default scaled-psi-lora adamw} ${EXTRA:-} \
    --out "$OUT/online" 2>&1 | tee "$OUT/online.log" | grep -v Warning
fi
