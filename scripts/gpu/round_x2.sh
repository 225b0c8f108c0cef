#!/usr/bin/env bash
# One warm two-H200 machine (nvidia-h200-x2), several consecutive calls, one STAGE each, run from the repository
# root with OUT set. The suites run in the background (setsid) from a snapshot of the committed code copied to
# /tmp, so they outlive each call and later calls only collect; every call must follow the last within the
# machine's 30 s idle window. Each model bundle is carried by the one call that stashes it in /tmp (one bundle fits
# a call's 64 MiB). At most ~30 worker processes on the 32 cores (benchmarks/notes/psi.md §4).
#   STAGE=lm1     carry .gpu_assets/smollm2-part1       snapshot + stash part 1; sets the common end time
#   STAGE=lm2     carry .gpu_assets/smollm2-part2 .whl  put SmolLM2 together; LM suite (12 workers, both GPUs)
#   STAGE=vision  carry .gpu_assets/effnet-fashion-mnist  vision PSI-family sweeps (9 workers)
#   STAGE=sst2    carry .gpu_assets/minilm-sst2         SST-2 defaults, baselines' seeds, ablations (8 workers)
#   STAGE=wait    sleep WAIT_S (or until every suite ended), then archive what is there: $OUT/round.tgz
#   STAGE=timing  wait for the suites' end, archive, then alone on the GPUs: the cost levers (GPU 0) and the online
#                 per-sample probe (GPU 1); $OUT/round.tgz and $OUT/timing.tgz. PLAN=2: carry .gpu_assets/wheels-test
#                 (pytest) to check the CUDA-graph step on the GPU first; GPU 1 times LoKO's top-k rows.
# RUN_S: seconds from STAGE=lm1 at which every suite's --deadline falls (default 1050).
# PLAN: which runs the lm2 / vision / sst2 / timing stages launch. PLAN=1 (default) is the round of 2026-11-30
# (results/lm_epoch, sst2_epoch call 5, cost/nvidia-h200.*); PLAN=2 is what that round left undone, sized by its
# lesson: with 14 processes per GPU every PSI-family run went 5-10x slower than alone (the GPU time-slices the
# small kernels of many processes), so PLAN=2 keeps at most ~5 PSI-family processes per GPU (benchmarks/notes/psi.md
# §5-6). PLAN=3 puts the per-layer normalised steps (normalize="layer") first and keeps PLAN=2's most needed runs;
# PLAN=4 is PLAN=3 cut to one H200 (run every stage with kind nvidia-h200). PLAN=5 (one H200, written after PLAN=4,
# ran 2026-12-01): the normalised steps at the lower lrs of notes/psi.md §8, and the graph rows with the scoped
# cuSOLVER. PLAN=6 (one H200, written after PLAN=5, not run): what notes/psi.md §10 left open (vision seeds of the
# normalised rows, Scaled PSI-LoRA's vision default and LM sweep, the normalised steps at 1e-5) and the smol cost
# rows three times over. PLAN=7 (one H200, written after PLAN=6, which did not run): the factored step normalisation
# (normalize="factored", notes/psi.md §11) at 3e-5 and 1e-4 on every suite, seed 0; Scaled PSI-LoRA's vision default;
# the timing stage times the normalised steps' cost rows on the smol configuration. PLAN=8 (one H200, written
# after PLAN=7 ran, not run): seeds 1-2 of the new defaults (factored, lr 3e-5) where they have one seed, the factored
# steps at 1e-5, Scaled PSI-LoRA's LM sweep and factored lrs, and the smol cost rows of the defaults three times.
# PLAN=9 (one H200, written 2026-12-01 in place of PLAN=8): PLAN=8's seeds and Scaled PSI-LoRA runs, and the rate
# of the factored second-moment EMA (normalize_beta2 0.99 / 0.95 against 0.999) on every suite: the LM gap to AdamW
# opens late, when an EMA over ~1,000 steps still remembers the large early gradients (notes/psi.md §12).
# PLAN=10 (one H200, written after PLAN=9 ran, not run): Scaled PSI-LoRA's new factored default (seeds 1-2 at 3e-4,
# and 1e-4 / 1e-3 where missing) on every suite, the full second moment (normalize="full", the diagnostic of notes/psi.md
# §12) against the factored one, and the defaults' smol cost rows with Scaled PSI-LoRA's factored step (ran
# 2026-12-01: notes/psi.md §13). PLAN=11 (one H200, written after PLAN=10 ran, not run): a 6 % warm-up for Proj.
# PSI-LoRA at 1e-4, full and factored (one LM seed in three failed early there, notes/psi.md §13), the full second
# moment at 5e-5 (its best LM lr) on vision and SST-2, and the cost of the full second moment (smol rows); a
# STAGE=wait call with PROBE=1 also runs loraopt_bench.moment_probe on each suite, beside the suites ($OUT/moment_probe).
set -u
PLAN=${PLAN:-1}
: "${OUT:?set OUT}" "${STAGE:?set STAGE}"
ROOT=/tmp/round
SNAP=$ROOT/snap
mkdir -p $ROOT/work $ROOT/stash
export PYTHONPATH=$SNAP/src:$ROOT/pyext
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCHDYNAMO_DISABLE=1
left() { echo $(( $(cat $ROOT/end_at) - $(date +%s) )); }
quality() {  # gpu suite name workers args...  (background, own session)
  local gpu=$1 suite=$2 name=$3 workers=$4; shift 4
  CUDA_VISIBLE_DEVICES=$gpu python -m loraopt.cli bench quality --suite "$suite" --device cuda --workers "$workers" \
    --deadline "$(left)" --timing-reserve 0 --out "$ROOT/work/$suite/$name" --runs-dir "/tmp/runs/$suite/$name" \
    "$@" > "$ROOT/work/$suite/$name.log" 2>&1
}
after() {  # suite name: wait until that quality run (if any) has ended, so chained runs share a GPU in turn
  while pgrep -f -- "--out $ROOT/work/$1/$2 " >/dev/null; do sleep 5; done
}
archive() { tar czf "$OUT/round.tgz" -C $ROOT/work --exclude='*.png' . ; ls -la "$OUT"; }
case "$STAGE" in
lm1)
  rm -rf $SNAP && cp -r .snap $SNAP
  echo $(( $(date +%s) + ${RUN_S:-1050} )) > $ROOT/end_at
  cp -r .gpu_assets/smollm2-part1 $ROOT/stash/ && nvidia-smi -L
  if [ "$PLAN" = 5 ]; then  # the G_m product variants, alone on the GPU before the suites start (seconds)
    PYTHONPATH=$PWD/src timeout 120 python -m loraopt_bench.gram_probe --out $OUT/gram_probe
  fi ;;
lm2)
  mkdir -p $ROOT/work/lm && pip install -q --no-deps --target $ROOT/pyext .whl/gguf-*.whl
  python -c "from loraopt_bench.assets import assemble_smollm2_bundle as a; print(a(['$ROOT/stash/smollm2-part1', '.gpu_assets/smollm2-part2'], '$ROOT/smollm2'))" || exit 1
  D="--model $ROOT/smollm2 --data-dir $ROOT/stash/smollm2-part1/data"
  export -f quality left after; export ROOT
  if [ "$PLAN" = 1 ]; then
  setsid nohup bash -c "quality 0 lm sweep-a 4 $D --methods adamw lora-plus riemannian-adamw loko --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm defaults-a 2 $D --methods adamw lora-plus riemannian-adamw loko --lrs adamw=3e-3 lora-plus=3e-4 riemannian-adamw=3e-3 loko=1.0 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 1 lm sweep-b 4 $D --methods psi-lora proj-psi-lora scaled-psi-lora --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 1 lm defaults-b 2 $D --methods psi-lora proj-psi-lora scaled-psi-lora --lrs psi-lora=0.03 proj-psi-lora=0.03 scaled-psi-lora=0.3 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 8 ]; then  # one H200: the defaults' missing seeds, then Scaled PSI-LoRA (notes/psi.md §11 "Not done")
  setsid nohup bash -c "quality 0 lm fact-default-seeds 5 $D --methods psi-lora-fact proj-psi-lora-fact scaled-psi-lora --lrs psi-lora-fact=3e-5 proj-psi-lora-fact=1e-5 scaled-psi-lora=0.1,1.0 --seeds 0 1 2 --method-seeds psi-lora-fact=1,2 proj-psi-lora-fact=0 scaled-psi-lora=0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 11 ]; then  # one H200: warm-up at 1e-4 for the full and factored steps (7 processes)
  setsid nohup bash -c "quality 0 lm warmup 6 $D --methods proj-psi-lora-full-warmup proj-psi-lora-fact-warmup --lrs proj-psi-lora-full-warmup=1e-4 proj-psi-lora-fact-warmup=1e-4 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm warmup-high 1 $D --methods proj-psi-lora-full-warmup --lrs proj-psi-lora-full-warmup=3e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 10 ]; then  # one H200: Scaled PSI-LoRA's factored default, and the full second moment (7 processes)
  setsid nohup bash -c "quality 0 lm scaled-fact 2 $D --methods scaled-psi-lora-fact --lrs scaled-psi-lora-fact=1e-4,1e-3 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm scaled-fact-seeds 2 $D --methods scaled-psi-lora-fact --lrs scaled-psi-lora-fact=3e-4 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm full 3 $D --methods proj-psi-lora-full psi-lora-full --lrs proj-psi-lora-full=3e-5,1e-4 psi-lora-full=1e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 9 ]; then  # one H200: PLAN=8's LM runs, and the factored EMA's beta2 (11 processes)
  setsid nohup bash -c "quality 0 lm fact-default-seeds 5 $D --methods psi-lora-fact proj-psi-lora-fact scaled-psi-lora --lrs psi-lora-fact=3e-5 proj-psi-lora-fact=1e-5 scaled-psi-lora=0.1,1.0 --seeds 0 1 2 --method-seeds psi-lora-fact=1,2 proj-psi-lora-fact=0 scaled-psi-lora=0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm beta99 3 $D --methods proj-psi-lora-fact --lrs proj-psi-lora-fact=3e-5 --hp proj-psi-lora-fact:normalize_beta2=0.99 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm beta99-more 2 $D --methods psi-lora-fact proj-psi-lora-fact --lrs psi-lora-fact=3e-5 proj-psi-lora-fact=1e-4 --hp psi-lora-fact:normalize_beta2=0.99 proj-psi-lora-fact:normalize_beta2=0.99 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm beta95 1 $D --methods proj-psi-lora-fact --lrs proj-psi-lora-fact=3e-5 --hp proj-psi-lora-fact:normalize_beta2=0.95 --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 7 ]; then  # one H200: the factored normalisation at the CPU screen's lrs (notes/psi.md §11)
  setsid nohup bash -c "quality 0 lm fact 5 $D --methods psi-lora-fact proj-psi-lora-fact scaled-psi-lora-fact --lrs psi-lora-fact=3e-5,1e-4 proj-psi-lora-fact=3e-5,1e-4 scaled-psi-lora-fact=3e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 6 ]; then  # one H200: Scaled PSI-LoRA's LM sweep; the normalised steps at the safer 1e-5 (psi.md §10)
  setsid nohup bash -c "quality 0 lm scaled-sweep 2 $D --methods scaled-psi-lora --lrs scaled-psi-lora=0.1,1.0 --seeds 0; quality 0 lm norm-1e-5 3 $D --methods psi-lora-norm proj-psi-lora-norm --lrs psi-lora-norm=1e-5 proj-psi-lora-norm=1e-5 --seeds 0 1 2 --method-seeds psi-lora-norm=1,2 proj-psi-lora-norm=0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 5 ]; then  # one H200: the normalised steps at the lrs SST-2 and the CPU LM check found (notes/psi.md §8)
  setsid nohup bash -c "quality 0 lm norm-low 5 $D --methods psi-lora-norm proj-psi-lora-norm scaled-psi-lora-norm --lrs psi-lora-norm=1e-5,3e-5 proj-psi-lora-norm=3e-5 scaled-psi-lora-norm=1e-4,3e-4 --seeds 0; quality 0 lm norm-seeds 4 $D --methods psi-lora-norm proj-psi-lora-norm --lrs psi-lora-norm=3e-5 proj-psi-lora-norm=1e-4 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 4 ]; then  # PLAN=3 cut to one H200 (nvidia-h200): everything on GPU 0, at most ~6 PSI-family runs
  setsid nohup bash -c "quality 0 lm norm 4 $D --methods psi-lora-norm scaled-psi-lora-norm --lrs psi-lora-norm=1e-4,3e-4 scaled-psi-lora-norm=1e-3,3e-3 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm riemannian 3 $D --methods riemannian-adamw --lrs riemannian-adamw=3e-3 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 3 ]; then
  # The per-layer normalised PSI steps first (GPU 0), PSI-LoRA / Proj. above the old grid's top after them;
  # Riemannian AdamW's sweep and seeds beside them (cheap steps); Scaled PSI-LoRA's sweep on GPU 1 next to vision.
  setsid nohup bash -c "quality 0 lm norm 6 $D --methods psi-lora-norm scaled-psi-lora-norm --lrs psi-lora-norm=3e-5,1e-4,3e-4 scaled-psi-lora-norm=3e-4,1e-3,3e-3 --seeds 0; quality 0 lm psi-high 2 $D --methods psi-lora proj-psi-lora --lrs psi-lora=0.3 proj-psi-lora=0.3 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm riemannian 3 $D --methods riemannian-adamw --lrs riemannian-adamw=1e-3,3e-3,1e-2 --seeds 0; quality 0 lm riemannian-seeds 2 $D --methods riemannian-adamw --lrs riemannian-adamw=3e-3 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 1 lm scaled 2 $D --methods scaled-psi-lora --lrs scaled-psi-lora=0.1,1.0 --seeds 0" >/dev/null 2>&1 < /dev/null &
  else
  # The PSI family above the grid's top (its best lr was 0.1), Scaled PSI-LoRA's sweep and missing default seeds,
  # Proj. seed 2; Riemannian AdamW and LoKO-scalar at the library defaults (new key), sweep + seeds.
  setsid nohup bash -c "quality 0 lm psi-high 2 $D --methods psi-lora proj-psi-lora --lrs psi-lora=0.3,1.0 proj-psi-lora=0.3,1.0 --seeds 0; quality 0 lm proj-seed 1 $D --methods proj-psi-lora --lrs proj-psi-lora=0.03 --seeds 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 lm baselines 3 $D --methods riemannian-adamw loko-scalar --seeds 0; quality 0 lm baseline-seeds 3 $D --methods riemannian-adamw loko-scalar --lrs riemannian-adamw=3e-3 loko-scalar=1.0 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 1 lm scaled 3 $D --methods scaled-psi-lora --lrs scaled-psi-lora=0.03,0.1,1.0 --seeds 0; quality 1 lm scaled-seeds 2 $D --methods scaled-psi-lora --lrs scaled-psi-lora=0.3 --seeds 0 2" >/dev/null 2>&1 < /dev/null &
  fi
  sleep 5; left ;;
vision)
  mkdir -p $ROOT/work/vision && cp -r .gpu_assets/effnet-fashion-mnist $ROOT/stash/
  B=$ROOT/stash/effnet-fashion-mnist
  export LORAOPT_FASHION_MNIST_DIR=$B/data/fashion-mnist
  D="--model $B --data-dir $B/data --loko-jacobian func"
  export -f quality left after; export ROOT
  # PLAN 1 ran nine PSI-family processes next to 20 others and finished none; PLAN 2 runs the same nine runs with
  # the GPUs less shared (PSI-LoRA and Proj. on GPU 0, Scaled on GPU 1; 4-5 processes each).
  if [ "$PLAN" = 11 ]; then  # warm-up at 1e-4 (factored), the full second moment at 5e-5 (5 processes)
  setsid nohup bash -c "quality 0 vision warmup 2 $D --methods proj-psi-lora-fact-warmup --lrs proj-psi-lora-fact-warmup=1e-4 --seeds 0 1" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 vision full-5e-5 3 $D --methods proj-psi-lora-full --lrs proj-psi-lora-full=5e-5 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  if [ "$PLAN" = 10 ]; then  # Scaled PSI-LoRA's factored default and the full second moment (5 processes)
  # (--method-seeds applies to every lr of a method: one command per (lrs, seeds), so that no finished run is repeated)
  setsid nohup bash -c "quality 0 vision scaled-fact-seeds 2 $D --methods scaled-psi-lora-fact --lrs scaled-psi-lora-fact=3e-4 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 vision scaled-fact 1 $D --methods scaled-psi-lora-fact --lrs scaled-psi-lora-fact=1e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 vision full 2 $D --methods proj-psi-lora-full --lrs proj-psi-lora-full=3e-5,1e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  if [ "$PLAN" = 9 ]; then  # PLAN=8's vision runs, and the factored EMA at beta2 0.99 (6 processes)
  setsid nohup bash -c "quality 0 vision fact-default-seeds 4 $D --methods psi-lora-fact proj-psi-lora-fact --lrs psi-lora-fact=3e-5 proj-psi-lora-fact=3e-5 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 vision scaled-fact 1 $D --methods scaled-psi-lora-fact --lrs scaled-psi-lora-fact=3e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 vision beta99 1 $D --methods proj-psi-lora-fact --lrs proj-psi-lora-fact=3e-5 --hp proj-psi-lora-fact:normalize_beta2=0.99 --seeds 0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  if [ "$PLAN" = 8 ]; then  # seeds 1-2 of the new defaults (factored, 3e-5) for both optimizers, and Scaled PSI-LoRA
  # factored at the lr it had on the LM and SST-2 (5 processes)
  setsid nohup bash -c "quality 0 vision fact-default-seeds 4 $D --methods psi-lora-fact proj-psi-lora-fact --lrs psi-lora-fact=3e-5 proj-psi-lora-fact=3e-5 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 0 vision scaled-fact 1 $D --methods scaled-psi-lora-fact --lrs scaled-psi-lora-fact=3e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  if [ "$PLAN" = 7 ]; then  # the factored normalisation, and Scaled PSI-LoRA's default (4 processes)
  setsid nohup bash -c "quality 0 vision fact 4 $D --methods psi-lora-fact proj-psi-lora-fact scaled-psi-lora --lrs psi-lora-fact=3e-5 proj-psi-lora-fact=3e-5,1e-4 scaled-psi-lora=0.3 --seeds 0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  if [ "$PLAN" = 6 ]; then  # seeds 1-2 of the normalised rows at 3e-5, and Scaled PSI-LoRA's default (5 processes)
  setsid nohup bash -c "quality 0 vision norm-seeds 5 $D --methods psi-lora-norm proj-psi-lora-norm scaled-psi-lora --lrs psi-lora-norm=3e-5 proj-psi-lora-norm=3e-5 scaled-psi-lora=0.3 --seeds 0 1 2 --method-seeds psi-lora-norm=1,2 proj-psi-lora-norm=1,2 scaled-psi-lora=0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  if [ "$PLAN" = 5 ]; then
  setsid nohup bash -c "quality 0 vision norm-low 3 $D --methods psi-lora-norm proj-psi-lora-norm --lrs psi-lora-norm=1e-5,3e-5 proj-psi-lora-norm=3e-5 --seeds 0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  if [ "$PLAN" = 4 ]; then
  setsid nohup bash -c "quality 0 vision norm 2 $D --methods psi-lora-norm scaled-psi-lora-norm --lrs psi-lora-norm=1e-4 scaled-psi-lora-norm=1e-3 --seeds 0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  if [ "$PLAN" = 3 ]; then  # GPU 1: the normalised steps and Scaled PSI-LoRA's default (5 processes)
  setsid nohup bash -c "quality 1 vision norm 5 $D --methods psi-lora-norm scaled-psi-lora-norm scaled-psi-lora --lrs psi-lora-norm=3e-5,1e-4 scaled-psi-lora-norm=3e-4,1e-3 scaled-psi-lora=0.3 --seeds 0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left; exit 0
  fi
  # GPU 0: PSI-LoRA and Proj. PSI-LoRA at 0.01 and 0.1 (0.03, the default, has 3 seeds), then seeds 1-2 at 0.1.
  setsid nohup bash -c "quality 0 vision psi-sweep 4 $D --methods psi-lora proj-psi-lora --lrs psi-lora=0.01,0.1 proj-psi-lora=0.01,0.1 --seeds 0; quality 0 vision psi-seeds 4 $D --methods psi-lora proj-psi-lora --lrs psi-lora=0.1 proj-psi-lora=0.1 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  # GPU 1: Scaled PSI-LoRA at its default 0.3 (3 seeds) and at 0.1 and 1.0.
  setsid nohup bash -c "quality 1 vision scaled-default 3 $D --methods scaled-psi-lora --lrs scaled-psi-lora=0.3 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 1 vision scaled-sweep 2 $D --methods scaled-psi-lora --lrs scaled-psi-lora=0.1,1.0 --seeds 0" >/dev/null 2>&1 < /dev/null &
  sleep 5; left ;;
sst2)
  mkdir -p $ROOT/work/sst2 && cp -r .gpu_assets/minilm-sst2 $ROOT/stash/
  B=$ROOT/stash/minilm-sst2
  D="--model $B --data-dir $B/data --steps 2105 --eval-every 500"
  export -f quality left after; export ROOT
  if [ "$PLAN" = 1 ]; then
  setsid nohup bash -c "quality 0 sst2 defaults 4 $D --methods psi-lora-default proj-psi-lora-default riemannian-adamw lora-plus --lrs riemannian-adamw=3e-3 lora-plus=3e-4 --seeds 0 1 2 --method-seeds lora-plus=1,2; quality 0 sst2 riemannian-sweep 4 $D --methods riemannian-adamw --lrs riemannian-adamw=1e-3,1e-2 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "quality 1 sst2 ablations 4 $D --methods psi-lora-k0 psi-lora-k2 psi-lora-rank2 psi-lora-warmup proj-psi-lora-k2 proj-psi-lora-warmup scaled-psi-lora-k1 scaled-psi-lora-shampoo scaled-psi-lora-p025 scaled-psi-lora-p1 scaled-psi-lora-beta999 scaled-psi-lora-damp1e-3 scaled-psi-lora-nobc scaled-psi-lora-warmup --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 11 ]; then  # after the LM runs: the full second moment at 5e-5, and with warm-up at 1e-4
  setsid nohup bash -c "after lm warmup; quality 0 sst2 full-5e-5 3 $D --methods proj-psi-lora-full --lrs proj-psi-lora-full=5e-5 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "after lm warmup; quality 0 sst2 warmup 3 $D --methods proj-psi-lora-full-warmup --lrs proj-psi-lora-full-warmup=1e-4 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 10 ]; then  # after the LM runs: Scaled PSI-LoRA's factored default, the full second moment
  setsid nohup bash -c "after lm scaled-fact-seeds; quality 0 sst2 scaled-fact-seeds 2 $D --methods scaled-psi-lora-fact --lrs scaled-psi-lora-fact=3e-4 --seeds 1 2; quality 0 sst2 scaled-fact 1 $D --methods scaled-psi-lora-fact --lrs scaled-psi-lora-fact=1e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "after lm full; quality 0 sst2 full 2 $D --methods proj-psi-lora-full --lrs proj-psi-lora-full=3e-5,1e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 9 ]; then  # after the LM runs: PLAN=8's SST-2 seeds and Scaled run, and beta2 0.99 (6 processes)
  setsid nohup bash -c "after lm fact-default-seeds; quality 0 sst2 fact-default-seeds 3 $D --methods psi-lora-fact scaled-psi-lora-fact --lrs psi-lora-fact=3e-5 scaled-psi-lora-fact=1e-3 --seeds 0 1 2 --method-seeds psi-lora-fact=1,2 scaled-psi-lora-fact=0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "after lm beta99; quality 0 sst2 beta99 3 $D --methods proj-psi-lora-fact --lrs proj-psi-lora-fact=3e-5 --hp proj-psi-lora-fact:normalize_beta2=0.99 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 8 ]; then
  # (--method-seeds applies to every lr of a method: two commands, so that no finished run is repeated)
  setsid nohup bash -c "after lm fact-default-seeds; quality 0 sst2 fact-default-seeds 2 $D --methods psi-lora-fact --lrs psi-lora-fact=3e-5 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "after lm fact-default-seeds; quality 0 sst2 fact-more 3 $D --methods psi-lora-fact proj-psi-lora-fact scaled-psi-lora-fact --lrs psi-lora-fact=1e-5 proj-psi-lora-fact=1e-5 scaled-psi-lora-fact=1e-3 --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 7 ]; then
  setsid nohup bash -c "after lm fact; quality 0 sst2 fact 5 $D --methods psi-lora-fact proj-psi-lora-fact scaled-psi-lora-fact --lrs psi-lora-fact=3e-5,1e-4 proj-psi-lora-fact=3e-5,1e-4 scaled-psi-lora-fact=3e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 6 ]; then
  setsid nohup bash -c "after lm scaled-sweep; quality 0 sst2 norm-1e-5 2 $D --methods psi-lora-norm proj-psi-lora-norm --lrs psi-lora-norm=1e-5 proj-psi-lora-norm=1e-5 --seeds 0" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 5 ]; then
  setsid nohup bash -c "after lm norm-low; quality 0 sst2 norm-seeds 2 $D --methods proj-psi-lora-norm --lrs proj-psi-lora-norm=3e-5 --seeds 1 2" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 4 ]; then
  setsid nohup bash -c "after lm norm; quality 0 sst2 norm 4 $D --methods psi-lora-norm proj-psi-lora-norm scaled-psi-lora-norm --lrs psi-lora-norm=3e-5,1e-4 proj-psi-lora-norm=3e-5 scaled-psi-lora-norm=3e-4 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "after lm riemannian; quality 0 sst2 riemannian 3 $D --methods riemannian-adamw --lrs riemannian-adamw=3e-3 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  elif [ "$PLAN" = 3 ]; then
  # After the LM chains of each GPU: the normalised steps and Riemannian AdamW's seeds (GPU 0); ablations (GPU 1).
  setsid nohup bash -c "after lm norm; sleep 3; after lm psi-high; quality 0 sst2 norm 6 $D --methods psi-lora-norm proj-psi-lora-norm scaled-psi-lora-norm --lrs psi-lora-norm=3e-5,1e-4 proj-psi-lora-norm=3e-5,1e-4 scaled-psi-lora-norm=3e-4,1e-3 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "after lm riemannian; sleep 3; after lm riemannian-seeds; quality 0 sst2 riemannian 3 $D --methods riemannian-adamw --lrs riemannian-adamw=3e-3 --seeds 0 1 2" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "after lm scaled; quality 1 sst2 ablations 3 $D --methods scaled-psi-lora-k1 scaled-psi-lora-shampoo scaled-psi-lora-p025 scaled-psi-lora-nobc proj-psi-lora-k2 proj-psi-lora-warmup --seeds 0" >/dev/null 2>&1 < /dev/null &
  else
  # What call 5 left: the third default seeds, Riemannian AdamW (3 seeds + sweep), the ten unfinished ablations;
  # each chain starts when the LM runs on its GPU have ended (at most ~5-8 PSI-family processes per GPU).
  setsid nohup bash -c "after lm psi-high; sleep 3; after lm proj-seed; quality 0 sst2 defaults 3 $D --methods psi-lora-default proj-psi-lora-default riemannian-adamw --lrs riemannian-adamw=3e-3 --seeds 0 1 2 --method-seeds psi-lora-default=2 proj-psi-lora-default=2; quality 0 sst2 riemannian-sweep 2 $D --methods riemannian-adamw --lrs riemannian-adamw=1e-3,1e-2 --seeds 0" >/dev/null 2>&1 < /dev/null &
  setsid nohup bash -c "after lm scaled; sleep 3; after lm scaled-seeds; quality 1 sst2 ablations 3 $D --methods proj-psi-lora-k2 proj-psi-lora-warmup scaled-psi-lora-k1 scaled-psi-lora-shampoo scaled-psi-lora-p025 scaled-psi-lora-p1 scaled-psi-lora-beta999 scaled-psi-lora-damp1e-3 scaled-psi-lora-nobc scaled-psi-lora-warmup --seeds 0" >/dev/null 2>&1 < /dev/null &
  fi
  sleep 5; left; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv ;;
wait)
  end=$(( $(date +%s) + ${WAIT_S:-540} ))
  if [ "$PLAN" = 11 ] && [ "${PROBE:-0}" = 1 ]; then  # the second-moment probe (notes/psi.md §14) beside the suites,
    P=$OUT/moment_probe; mkdir -p $P  # at each suite's batch and length, proj-psi-lora-full 5e-5, from the carried tree
    S=$ROOT/stash; export LORAOPT_FASHION_MNIST_DIR=$S/effnet-fashion-mnist/data/fashion-mnist
    M="env PYTHONPATH=$PWD/src:$ROOT/pyext python -m loraopt_bench.moment_probe --device cuda --lr 5e-5"
    # SST-2 and vision run a part of their epoch: beside ten suite processes a whole one took over 400 s
    timeout 420 $M --model $ROOT/smollm2 --task tinyshakespeare --data-dir $S/smollm2-part1/data --steps 447 \
      --batch-size 8 --block-size 256 --out $P/lm > $P/lm.log 2>&1 &
    timeout 420 $M --model $S/minilm-sst2 --task sst2 --data-dir $S/minilm-sst2/data --steps ${PROBE_STEPS:-700} \
      --batch-size 32 --max-length 64 --out $P/sst2 > $P/sst2.log 2>&1 &
    timeout 420 $M --model $S/effnet-fashion-mnist --task fashion-mnist --data-dir $S/effnet-fashion-mnist/data \
      --steps ${PROBE_STEPS:-700} --batch-size 32 --image-size 64 --out $P/vision > $P/vision.log 2>&1 &
    wait; tail -n 6 $P/*.log
  fi
  while [ "$(date +%s)" -lt $end ] && pgrep -f "bench quality" >/dev/null; do sleep 10; done
  tail -n 3 $ROOT/work/*/*.log; nvidia-smi --query-gpu=index,utilization.gpu --format=csv; archive ;;
timing)
  while pgrep -f "bench quality" >/dev/null && [ "$(left)" -gt -60 ]; do sleep 5; done
  pkill -f "bench quality"; sleep 2
  tail -n 3 $ROOT/work/*/*.log; archive
  T=$ROOT/timing; mkdir -p $T
  # PLAN=5 times the tree this call carried, not the snapshot (nothing runs in the background any more).
  if [ "$PLAN" -ge 5 ]; then export PYTHONPATH=$PWD/src:$ROOT/pyext; fi
  if [ "$PLAN" = 9 ] || [ "$PLAN" = 10 ] || [ "$PLAN" = 11 ]; then  # one GPU: the defaults' smol rows twice over
    OPTS=adamw-fused,psi-k0,psi-k1,proj-psi,scaled-psi,loko-scalar
    [ "$PLAN" = 11 ] && OPTS=adamw-fused,proj-psi,proj-psi-full,psi-k1  # what the full second moment costs
    for i in 1 2; do
      CUDA_VISIBLE_DEVICES=0 python -m loraopt_bench.cost levers --warmup 2 --steps 8 --budget-s 60 --only smol-r8-s2048 \
        --optimizers $OPTS --out $T/cost-$i > $T/cost-$i.log 2>&1
    done
    tail -n 8 $T/cost-*.log; tar czf "$OUT/timing.tgz" -C $T . ; ls -la "$OUT"; exit 0
  fi
  if [ "$PLAN" = 8 ]; then  # one GPU: the defaults' smol rows three times over (their run-to-run spread)
    for i in 1 2 3; do
      CUDA_VISIBLE_DEVICES=0 python -m loraopt_bench.cost levers --warmup 2 --steps 8 --budget-s 60 --only smol-r8-s2048 \
        --optimizers adamw-fused,psi-k1,psi-k1-graph,proj-psi,scaled-psi --out $T/cost-$i > $T/cost-$i.log 2>&1
    done
    tail -n 8 $T/cost-*.log; tar czf "$OUT/timing.tgz" -C $T . ; ls -la "$OUT"; exit 0
  fi
  if [ "$PLAN" = 7 ]; then  # one GPU: what the step normalisations cost against fused AdamW (smol, r 8, 2048 tokens)
    CUDA_VISIBLE_DEVICES=0 python -m loraopt_bench.cost levers --warmup 2 --steps 8 --budget-s ${COST_BUDGET_S:-90} \
      --only smol-r8-s2048 --optimizers adamw-fused,psi-k1,psi-k1-layer,psi-k1-factored,proj-psi,proj-psi-factored \
      --out $T/cost > $T/cost.log 2>&1
    tail -n 12 $T/cost.log; tar czf "$OUT/timing.tgz" -C $T . ; ls -la "$OUT"; exit 0
  fi
  if [ "$PLAN" = 1 ]; then  # the balancing rows were named by "gram", then opt-in (now the default)
    COST_OPTS=adamw-fused,psi-k0,psi-k1,proj-psi,scaled-psi,loko-scalar,psi-k0-gram,psi-k1-gram,scaled-psi-gram
  else  # today's names: the default is "gram"; -svd / -polar the other balancings; -graph the captured step
    COST_OPTS=adamw-fused,psi-k0,psi-k1,proj-psi,scaled-psi,loko-scalar,psi-k1-svd,psi-k1-polar,psi-k0-graph,psi-k1-graph,proj-psi-graph,scaled-psi-graph
  fi
  if [ "$PLAN" != 1 ] && ls .gpu_assets/wheels-test/*.whl >/dev/null 2>&1; then  # carry .gpu_assets/wheels-test
    pip install -q --no-deps --target $ROOT/pyext .gpu_assets/wheels-test/*.whl
    # The captured step against the eager one on the GPU, before it is timed (tests/test_graphed_step.py; the
    # image's pytest-timeout plugin does not load with the carried pytest, hence -p no:timeout).
    (cd $([ "$PLAN" = 5 ] && echo "$PWD" || echo $SNAP) && CUDA_VISIBLE_DEVICES=0 timeout 120 python -m pytest -q -p no:cacheprovider -p no:timeout tests/test_graphed_step.py \
      > $T/graph_tests.log 2>&1); tail -n 3 $T/graph_tests.log
  fi
  if [ "$PLAN" = 6 ]; then  # one GPU: the smol rows three times over (their run-to-run spread, notes/cost.md round 4)
    for i in 1 2 3; do
      CUDA_VISIBLE_DEVICES=0 python -m loraopt_bench.cost levers --warmup 2 --steps 8 --budget-s 60 --only smol-r8-s2048 \
        --optimizers adamw-fused,psi-k1,psi-k1-graph,proj-psi,scaled-psi --out $T/cost-$i > $T/cost-$i.log 2>&1
    done
    tail -n 8 $T/cost-*.log; tar czf "$OUT/timing.tgz" -C $T . ; ls -la "$OUT"; exit 0
  fi
  if [ "$PLAN" = 5 ]; then  # one GPU: after the graph test above, the graph rows with the scoped cuSOLVER capture,
    # then a profile of AdamW against PSI-LoRA K=1 (where the extra forward + backward time goes).
    CUDA_VISIBLE_DEVICES=0 python -m loraopt_bench.cost levers --warmup 2 --steps 6 --budget-s ${COST_BUDGET_S:-150} \
      --optimizers adamw-fused,psi-k1,psi-k1-graph,proj-psi-graph,scaled-psi-graph,psi-k1-polar --out $T/cost > $T/cost.log 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 120 python -m loraopt_bench.cost run --label profile --only smol-r8-s2048 \
      --optimizers adamw-fused,psi-k1 --profile-config smol-r8-s2048 --profile-opts adamw-fused,psi-k1 \
      --warmup 2 --steps 3 --check 0 --out $T/profile > $T/profile.log 2>&1
    tail -n 30 $T/cost.log; tail -n 4 $T/profile.log; tar czf "$OUT/timing.tgz" -C $T . ; ls -la "$OUT"; exit 0
  fi
  if [ "$PLAN" = 4 ]; then  # one GPU: the cost levers, then LoKO's top-k rows, one after the other
    CUDA_VISIBLE_DEVICES=0 python -m loraopt_bench.cost levers --warmup 2 --steps 6 --budget-s ${COST_BUDGET_S:-150} \
      --optimizers $COST_OPTS --out $T/cost > $T/cost.log 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 150 python -m loraopt_bench.loko_jacobian_cost --only effnet-b32,cls-b1,cls-b8 \
      --methods adamw-fused,loko-func,loko-func-top2,loko-func-top3 --assets $ROOT/stash \
      --out $T/loko_jacobian > $T/loko_jacobian.log 2>&1
    tail -n 40 $T/cost.log; tail -n 5 $T/*.log
    tar czf "$OUT/timing.tgz" -C $T . ; ls -la "$OUT"; exit 0
  fi
  ( CUDA_VISIBLE_DEVICES=0 python -m loraopt_bench.cost levers --warmup 2 --steps 6 --budget-s ${COST_BUDGET_S:-240} \
      --optimizers $COST_OPTS \
      --out $T/cost > $T/cost.log 2>&1
    CUDA_VISIBLE_DEVICES=0 timeout 90 python -m loraopt_bench.cost run --label profile --only smol-r8-s2048 \
      --optimizers adamw-fused,psi-k1,scaled-psi --profile-config smol-r8-s2048 --profile-opts psi-k1,scaled-psi \
      --warmup 2 --steps 3 --check 0 --out $T/profile > $T/profile.log 2>&1 ) &
  if [ "$PLAN" != 1 ]; then  # LoKO's reduced observation against the full one (issue 10 §1), on GPU 1
    ( CUDA_VISIBLE_DEVICES=1 timeout 300 python -m loraopt_bench.loko_jacobian_cost --only effnet-b32,cls-b1,cls-b8 \
        --methods adamw-fused,loko-func,loko-auto,loko-func-top2,loko-func-top3 --assets $ROOT/stash \
        --out $T/loko_jacobian > $T/loko_jacobian.log 2>&1 ) &
  else
  ( export LORAOPT_FASHION_MNIST_DIR=$ROOT/stash/effnet-fashion-mnist/data/fashion-mnist
    for s in fashion:effnet-fashion-mnist sst2:minilm-sst2; do
      CUDA_VISIBLE_DEVICES=1 timeout 130 python -m loraopt.cli bench online --streams ${s%%:*} --samples 300 \
        --eval-samples 100 --seeds-list 0 --device cuda --bundle $ROOT/stash/${s#*:} --jobs 1 --no-progress \
        --methods adamw adagrad loko loko-scalar psi-lora-default scaled-psi-lora --out $T/online-${s%%:*} \
        > $T/online-${s%%:*}.log 2>&1
    done ) &
  fi
  wait
  tail -n 40 $T/cost.log; tail -n 5 $T/*.log
  tar czf "$OUT/timing.tgz" -C $T . ; ls -la "$OUT" ;;
*) echo "unknown STAGE=$STAGE"; exit 2 ;;
esac
