#!/usr/bin/env bash
# The GPU benchmark as one prepared, time-bounded command, for a lent GPU machine (the device
# tool runs it in the repository root with $OUT set; its files come back from there):
#   0. scripts/bench_step_parts.py: the gpt2-medium bf16 LM step with and without the padded head
#      vocabulary (--head-vocab-multiple 64), and the head and the blocks alone: where the MFU goes;
#   1. scripts/bench_gpu.py: the gpt2-medium bf16 instruction step's MFU (cuDNN fused attention
#      and explicit attention) and the classification recipe with and without the trunk cache;
#   2. scripts/bench_recipes.py: the classification recipe end to end, jaxft's commands against
#      the reference's training loop on the same GPU (padded, and last-non-pad + buckets);
#   2b. the classification recipe cold (an empty compilation cache) and warm (again, another --lr):
#      metrics.json's timing of each (issue 21: compiles 0 when warm);
#   2c. scripts/bench_recipes.py --races pref: the gpt2-medium preference (DPO) race, the reference's
#      loop against jaxft finetune-preference (precomputed reference log-probabilities), whole
#      recipe (PREF_STEPS steps, default 30) and per step;
#   3. scripts/bench_gpu.py: the train steps against the reference (fp32 and bf16), with the time left.
# Each part has a deadline inside the whole one (TOTAL_S, default 480 s) and writes JSON and a log
# under $OUT as it goes. QUICK=1: tiny shapes, for checking the script on any machine.
set -u
OUT=${OUT:-/tmp/bench_gpu_session}
TOTAL_S=${TOTAL_S:-480}
PYTHON=${PYTHON:-python3}
QUICK=${QUICK:+--quick}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
left() { echo $((TOTAL_S - SECONDS)); }

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  $PYTHON -c "import jax, torch; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

part0=$(( $(left) * 25 / 100 ))
echo "== 0. the LM step's parts ($part0 s)"
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85} timeout -k 10 "$part0" \
  $PYTHON scripts/bench_step_parts.py ${QUICK:+--quick --size 64x2x2 --shape 4x64} --parts step,step-padded,head,head-padded,blocks \
  --budget-s $((part0 - 30)) --out "$OUT/step_parts.json" 2>&1 | tee "$OUT/step_parts.log"

part1=$(( $(left) * 40 / 100 ))
echo "== 1. MFU and the trunk cache ($part1 s)"
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85} timeout -k 10 "$part1" \
  $PYTHON scripts/bench_gpu.py $QUICK --sections mfu,trunk --mfu-shapes 16x1024 --budget-s $((part1 - 35)) \
  --out "$OUT/bench_gpu_mfu.json" 2>&1 | tee "$OUT/bench_gpu_mfu.log"

part2=$(( $(left) * 65 / 100 ))
echo "== 2. the classification race against the reference ($part2 s)"
timeout -k 10 "$part2" $PYTHON scripts/bench_recipes.py $QUICK --races cls,bucket --ref-device auto --quiet-reference \
  --work-dir /tmp/bench_recipes_gpu --out "$OUT/bench_recipes_gpu.json" 2>&1 | tee "$OUT/bench_recipes_gpu.log"

part2b=$(( $(left) * 45 / 100 ))
echo "== 2b. cold and warm: the classification recipe with an empty compilation cache, then again with another --lr ($part2b s)"
# (the model bench_recipes wrote; --quick: a few steps. The reference's time for the same work: part 2's JSON.)
CACHE=/tmp/jaxft_cold_warm_cache; rm -rf "$CACHE"
for pass in cold:5e-5 warm:1e-4; do
  name=${pass%%:*}; lr=${pass#*:}
  start=$SECONDS
  timeout -k 10 $(( part2b / 2 )) $PYTHON -m jaxft finetune-classifier --model /tmp/bench_recipes_gpu/base-model --init pretrained \
    --lr "$lr" --compile-cache "$CACHE" --out "/tmp/jaxft_$name" --overwrite --no-progress ${QUICK:+--epochs 1 --max-steps 4 --eval-freq 2 --eval-iter 1} \
    > "$OUT/cold_warm_$name.log" 2>&1
  echo "$name: exit $?, $((SECONDS - start)) s wall"
  $PYTHON -c "import json, sys; m = json.load(open('/tmp/jaxft_$name/metrics.json')); json.dump({'pass': '$name', 'lr': $lr, 'wall_s': $((SECONDS - start)), 'timing': m.get('timing'), 'test_accuracy': m.get('test_accuracy')}, sys.stdout, indent=1)" \
    > "$OUT/cold_warm_$name.json" 2>>"$OUT/cold_warm_$name.log" && cat "$OUT/cold_warm_$name.json" && echo
done
part2c=$(( $(left) * 60 / 100 ))
echo "== 2c. the gpt2-medium preference race against the reference ($part2c s)"
pref_size=gpt2-medium pref_steps=${PREF_STEPS:-30}; [ -n "$QUICK" ] && pref_size=64x2x2 pref_steps=4
timeout -k 10 "$part2c" $PYTHON scripts/bench_recipes.py $QUICK --races pref --size "$pref_size" \
  --max-steps "$pref_steps" --ref-device auto --quiet-reference \
  --work-dir /tmp/bench_recipes_gpu_pref --out "$OUT/bench_recipes_gpu_pref.json" 2>&1 | tee "$OUT/bench_recipes_gpu_pref.log"

part3=$(( $(left) - 5 ))
echo "== 3. train steps against the reference ($part3 s)"
if [ "$part3" -gt 40 ]; then
  timeout -k 10 "$part3" $PYTHON scripts/bench_gpu.py $QUICK --sections cls-train,lm-train --budget-s $((part3 - 30)) \
    --out "$OUT/bench_gpu_steps.json" 2>&1 | tee "$OUT/bench_gpu_steps.log"
fi
echo "== done in $SECONDS s"
