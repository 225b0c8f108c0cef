#!/usr/bin/env bash
# One GPU job on two H200s (device kind nvidia-h200-x2), run from the repository root with OUT set:
#   1. in the background, FSDP2 on two GPUs: the parity tests (tests/test_fsdp.py with NCCL) and the accelerate
#      FSDP2 Trainer example with a resume check;
#   2. the one-epoch vision suite (EfficientNet-Lite0 / Fashion-MNIST at 64 px, loraopt_bench.quality) on both
#      GPUs: every method's lr sweep at seed 0, and its library-default lr at seeds 1 and 2.
# Carry: .gpu_assets/effnet-fashion-mnist (scripts/prepare_gpu_assets.py) and .gpu_assets/wheels-test (pytest).
# SRC (default src) is the package source to run, e.g. a snapshot of a commit.
set -u
: "${OUT:?set OUT}"
SRC=${SRC:-src}
export PYTHONPATH=$PWD/$SRC:/tmp/loraopt-pyext
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BUNDLE=$PWD/.gpu_assets/effnet-fashion-mnist
export LORAOPT_FASHION_MNIST_DIR=$BUNDLE/data/fashion-mnist
DEADLINE=${DEADLINE:-530}
mkdir -p "$OUT/fsdp" "$OUT/vision"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
python -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" >> "$OUT/gpus.txt" 2>&1
python -m pytest --version >/dev/null 2>&1 || pip install -q --no-deps --target /tmp/loraopt-pyext .gpu_assets/wheels-test/*.whl >> "$OUT/fsdp/pip.log" 2>&1

(
  cd "${SRC%/src}" 2>/dev/null || true
  LORAOPT_TEST_DEVICE=cuda timeout 300 python -m pytest tests/test_fsdp.py -q -p no:xdist -p no:cacheprovider -o addopts="" -ra > "$OUT/fsdp/pytest_cuda.txt" 2>&1
  echo "rc=$?" >> "$OUT/fsdp/pytest_cuda.txt"
  for opt in psi-lora loko; do
    timeout 120 accelerate launch --config_file examples/accelerate_fsdp2.yaml examples/fsdp2_trainer.py \
      --optimizer $opt --resume-check --output-dir /tmp/fsdp2-example-$opt > "$OUT/fsdp/accelerate_$opt.txt" 2>&1
    echo "rc=$?" >> "$OUT/fsdp/accelerate_$opt.txt"
  done
) &

quality() {  # gpu name workers args...
  local gpu=$1 name=$2 workers=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu python -m loraopt.cli bench quality --suite vision --model "$BUNDLE" \
    --data-dir "$BUNDLE/data" --device cuda --loko-jacobian func --workers "$workers" --deadline "$DEADLINE" \
    --out "$OUT/vision/$name" --runs-dir "/tmp/vision-runs/$name" "$@" > "$OUT/vision/$name.log" 2>&1
}
quality 0 sweep-a 12 --methods loko adamw lora-plus --seeds 0 &
quality 0 defaults-a 6 --methods loko adamw lora-plus --lrs loko=1.0 adamw=3e-3 lora-plus=3e-4 --seeds 1 2 &
quality 1 sweep-b 12 --methods psi-lora proj-psi-lora scaled-psi-lora --seeds 0 &
quality 1 defaults-b 6 --methods psi-lora proj-psi-lora scaled-psi-lora \
  --lrs psi-lora=0.03 proj-psi-lora=0.03 scaled-psi-lora=0.3 --seeds 1 2 &
wait
ls -R "$OUT" | head -50
