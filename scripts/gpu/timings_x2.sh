#!/usr/bin/env bash
# One GPU job on two H200s (nvidia-h200-x2), run from the repository root with OUT set; the timing benchmarks,
# one after the other so that nothing else shares the machine while each measures:
#   1. the FSDP2 parity tests that failed on GPUs in the first run (SVDLoRA, AdaGrad with swapped-in parameters);
#   2. scripts/fsdp_bench.py on both GPUs: the 1b config (FSDP2 and DDP, every optimizer) and 8b (the memory saving);
#   3. the optimizer-cost benchmark on GPU 0 ($COST_CMD, loraopt_bench.cost).
# Carry .gpu_assets/wheels-test (pytest). Everything comes back as one archive, $OUT/timings.tgz.
set -u
: "${OUT:?set OUT}"
SRC=${SRC:-src}
export PYTHONPATH=$PWD/$SRC:/tmp/loraopt-pyext
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
WORK=/tmp/timings
mkdir -p $WORK/fsdp $WORK/cost
python -m pytest --version >/dev/null 2>&1 || pip install -q --no-deps --target /tmp/loraopt-pyext .gpu_assets/wheels-test/*.whl
ROOT=${SRC%/src}
( cd "$ROOT" && LORAOPT_TEST_DEVICE=cuda timeout ${FSDP_TEST_TIMEOUT:-150} python -m pytest tests/test_fsdp.py -q -p no:xdist \
    -p no:cacheprovider -o addopts="" -ra -k "${FSDP_TESTS:-svdlora or adagrad}" > $WORK/fsdp/pytest_cuda_rerun.txt 2>&1;
  echo "rc=$?" >> $WORK/fsdp/pytest_cuda_rerun.txt )
timeout ${FSDP_1B_TIMEOUT:-150} torchrun --nproc_per_node 2 "$ROOT/scripts/fsdp_bench.py" --config 1b \
  --out $WORK/fsdp/fsdp_1b.json > $WORK/fsdp/fsdp_1b.log 2>&1
timeout ${FSDP_8B_TIMEOUT:-120} torchrun --nproc_per_node 2 "$ROOT/scripts/fsdp_bench.py" --config 8b \
  --optimizers adamw-fused psi-k1 scaled-psi --steps 5 --warmup 2 --out $WORK/fsdp/fsdp_8b.json > $WORK/fsdp/fsdp_8b.log 2>&1
if [ -n "${COST_CMD:-}" ]; then
  CUDA_VISIBLE_DEVICES=0 timeout ${COST_TIMEOUT:-280} bash -c "$COST_CMD --out $WORK/cost" > $WORK/cost/cost.log 2>&1
  echo "rc=$?" >> $WORK/cost/cost.log
fi
tail -n 25 $WORK/fsdp/*.log $WORK/fsdp/pytest_cuda_rerun.txt $WORK/cost/cost.log
tar czf "$OUT/timings.tgz" -C $WORK .
