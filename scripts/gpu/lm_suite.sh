#!/usr/bin/env bash
# The one-epoch-scale LM suite (SmolLM2-135M, tiny-shakespeare 3 epochs at 8 x 256 tokens; loraopt_bench.quality
# --suite lm) on two H200s (nvidia-h200-x2), run from the repository root with OUT set. SmolLM2's GGUF (94 MiB) is
# over one job's 64 MiB, so it travels in two parts (scripts/prepare_gpu_assets.py smollm2-parts), in two jobs on
# the same warm machine (a machine goes back after 30 s idle: start the second job at once):
#   PART=1: carry .gpu_assets/smollm2-part1 (first 48 MiB of the GGUF + tiny-shakespeare); it is stashed in
#           $STASH, then EXTRA_CMD (optional: other work that needs no carried assets) runs;
#   PART=2: carry .gpu_assets/smollm2-part2 and .whl (the gguf wheel); the GGUF is put together (SHA-256 checked),
#           converted (~20 s), and the suite runs on both GPUs: every method's lr sweep at seed 0 and its default
#           lr at seeds 1 and 2, eight processes per GPU (16 of the 32 cores: oversubscribed cores slow every
#           launch-bound process, benchmarks/notes/psi.md §4). Everything comes back as one archive, $OUT/lm.tgz.
set -u
: "${OUT:?set OUT}" "${PART:?set PART=1 or 2}"
SRC=${SRC:-src}
STASH=${STASH:-/tmp/loraopt-stash}
export PYTHONPATH=$PWD/$SRC:/tmp/loraopt-pyext
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$STASH"
if [ "$PART" = 1 ]; then
  cp -r .gpu_assets/smollm2-part1 "$STASH/" && ls -la "$STASH/smollm2-part1/model"
  [ -n "${EXTRA_CMD:-}" ] && bash -c "$EXTRA_CMD"
  exit 0
fi
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /tmp/loraopt-pyext .whl/gguf-*.whl
PART1=$STASH/smollm2-part1
[ -d "$PART1" ] || PART1=.gpu_assets/smollm2-part1   # kept in the checkout too while the machine stayed warm
python -c "from loraopt_bench.assets import assemble_smollm2_bundle as a; print(a(['$PART1', '.gpu_assets/smollm2-part2'], '/tmp/smollm2-135m'))" || exit 1
DEADLINE=${DEADLINE:-480}
WORK=/tmp/lm
mkdir -p $WORK
quality() {  # gpu name workers args...
  local gpu=$1 name=$2 workers=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu python -m loraopt.cli bench quality --suite lm --model /tmp/smollm2-135m \
    --data-dir "$PART1/data" --device cuda --workers "$workers" --deadline "$DEADLINE" \
    --out "$WORK/$name" --runs-dir "/tmp/lm-runs/$name" "$@" > "$WORK/$name.log" 2>&1
}
quality 0 sweep-a 5 --methods adamw lora-plus riemannian-adamw loko --seeds 0 &
quality 0 defaults-a 3 --methods adamw lora-plus riemannian-adamw loko \
  --lrs adamw=3e-3 lora-plus=3e-4 riemannian-adamw=3e-3 loko=1.0 --seeds 1 2 &
quality 1 sweep-b 5 --methods psi-lora proj-psi-lora scaled-psi-lora --seeds 0 &
quality 1 defaults-b 3 --methods psi-lora proj-psi-lora scaled-psi-lora \
  --lrs psi-lora=0.03 proj-psi-lora=0.03 scaled-psi-lora=0.3 --seeds 1 2 &
wait
tail -n 25 $WORK/*.log
tar czf "$OUT/lm.tgz" -C $WORK --exclude='*.png' .
