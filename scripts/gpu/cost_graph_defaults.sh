#!/usr/bin/env bash
# The CUDA-graph lever (cuda_graph=True) with the factored defaults of PSI-LoRA, Proj. PSI-LoRA and Scaled PSI-LoRA
# against their eager steps and fused AdamW (issue 12; benchmarks/notes/cost.md "Round 9"). One H200, alone; run from
# the repository root with OUT set. smol r8 s2048 twice (its rows move by up to 0.4x between runs), 1b r8 s512 once.
set -u
: "${OUT:?set OUT}"
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 TORCHDYNAMO_DISABLE=1
nvidia-smi -L
W=/tmp/graph_defaults; mkdir -p $W  # archived as $OUT/graph.tgz (a call returns few files)
SMOL=adamw-fused,psi-k1,psi-k1-graph,proj-psi,proj-psi-graph,scaled-psi,scaled-psi-graph
for i in 1 2; do
  python -m loraopt_bench.cost levers --warmup 2 --steps 8 --budget-s 90 --only smol-r8-s2048 --optimizers $SMOL \
    --out $W/smol-$i > $W/smol-$i.log 2>&1
done
python -m loraopt_bench.cost levers --warmup 2 --steps 8 --budget-s 90 --only 1b-r8-s512 \
  --optimizers adamw-fused,psi-k1,psi-k1-graph,proj-psi,proj-psi-graph --out $W/1b-r8-s512 > $W/1b-r8-s512.log 2>&1
tail -n 12 $W/*.log
tar czf $OUT/graph.tgz -C $W .
