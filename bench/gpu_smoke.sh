#!/usr/bin/env bash
# GPU smoke run of placement, tensor-parallel and colocated rollout and NCCL learners: a few GRPO steps of the
# tiny preset (random-initialised models built in-process, synthetic data) in each mode the GPUs allow, then
# the mean step time and the peak memory per GPU of each mode.
#
#   bench/gpu_smoke.sh                 # on one GPU or one 8-GPU node
#   bench/gpu_smoke.sh --dry-run       # print the commands only (NUM_GPUS=8 to see every mode without GPUs)
#   bench/gpu_smoke.sh --steps 5
#
# Modes (a mode that needs more GPUs than found is skipped with a message):
#   separate-1gpu   1 GPU : learner 0.4, rollout 0.3, reward 0.3 of it (one rank, one engine, one reward worker)
#   colocated-1gpu  1 GPU : learner rank and vLLM share the GPU (vLLM sleeps during the update); reward on CPU
#   colocated-tp2   3 GPUs: 2 learner ranks (NCCL) + one vLLM engine with TP=2 on their 2 GPUs; 2 reward x 0.5
#   separate-tp2    5 GPUs: 2 learner ranks (NCCL), one vLLM engine with TP=2 on 2 more, 2 reward workers x 0.5
# Environment: PYTHON (default .venv/bin/python), NUM_GPUS (default: nvidia-smi -L), OUT (default bench/out/gpu_smoke).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
STEPS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --steps) STEPS="$2"; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_smoke: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ -z "${NUM_GPUS:-}" ]; then
  NUM_GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
OUT="${OUT:-bench/out/gpu_smoke}"
DATA="$OUT/data"
echo "gpu_smoke: $NUM_GPUS GPU(s), $STEPS GRPO steps per mode, output in $OUT"
if [ "$DRY" = 0 ] && [ "$NUM_GPUS" -lt 1 ]; then
  echo "gpu_smoke: no GPU found (nvidia-smi -L); nothing to run" >&2
  exit 1
fi

run() {  # prints the command; runs it unless --dry-run
  echo "+ $*"
  if [ "$DRY" = 0 ]; then "$@"; fi
}

COMMON=(model.policy=tiny "data.path=$DATA" "run.output_dir=$OUT/runs" run.steps="$STEPS" run.sft_steps=0
        run.eval_every=0 run.save_every=0 rollout.engine=vllm cluster.mode=local cluster.placement_timeout_s=120
        learner.micro_batch_size=8 data.batch_size=4 rollout.group_size=8)

declare -A MODE_ARGS MODE_GPUS
MODE_GPUS[separate-1gpu]=1
MODE_ARGS[separate-1gpu]="cluster.learner_workers=1 cluster.learner_gpus=0.4 cluster.rollout_workers=1
  cluster.rollout_gpus_per_worker=0.3 rollout.gpu_memory_utilization=0.25 cluster.reward_workers=1
  cluster.reward_gpus_per_worker=0.3"
MODE_GPUS[colocated-1gpu]=1
MODE_ARGS[colocated-1gpu]="cluster.colocate=true cluster.learner_workers=1 cluster.learner_gpus=1
  cluster.rollout_workers=1 cluster.rollout_gpus_per_worker=1 rollout.gpu_memory_utilization=0.4
  cluster.reward_workers=1 cluster.reward_gpus_per_worker=0"
MODE_GPUS[colocated-tp2]=3
MODE_ARGS[colocated-tp2]="cluster.colocate=true cluster.learner_workers=2 cluster.learner_gpus=1
  cluster.rollout_workers=1 rollout.tensor_parallel_size=2 cluster.rollout_gpus_per_worker=2
  rollout.gpu_memory_utilization=0.4 cluster.reward_workers=2 cluster.reward_gpus_per_worker=0.5"
MODE_GPUS[separate-tp2]=5
MODE_ARGS[separate-tp2]="cluster.learner_workers=2 cluster.learner_gpus=1 cluster.rollout_workers=1
  rollout.tensor_parallel_size=2 cluster.rollout_gpus_per_worker=2 rollout.gpu_memory_utilization=0.5
  cluster.reward_workers=2 cluster.reward_gpus_per_worker=0.5"
MODES=(separate-1gpu colocated-1gpu colocated-tp2 separate-tp2)

run "$PY" -m coreseg.deploy.cli data synth --config tiny_cpu "data.path=$DATA"

SUMMARY=()
for mode in "${MODES[@]}"; do
  need=${MODE_GPUS[$mode]}
  if [ "$NUM_GPUS" -lt "$need" ]; then
    echo "gpu_smoke: skipped $mode: needs $need GPUs, found $NUM_GPUS"
    SUMMARY+=("$mode: skipped (needs $need GPUs)")
    continue
  fi
  run_dir="$OUT/runs/$mode"
  # shellcheck disable=SC2206  # the mode's overrides are whitespace-separated words
  args=(${MODE_ARGS[$mode]})
  mem_log="$OUT/$mode.mem.csv"
  if [ "$DRY" = 0 ]; then
    rm -rf "$run_dir"
    mkdir -p "$OUT"
    # memory used per GPU every second while the mode runs (the peak is reported)
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -l 1 > "$mem_log" &
    mem_pid=$!
  fi
  status=0
  run "$PY" -m coreseg.deploy.cli train --config tiny_cpu --run-dir "$run_dir" --no-sft "${COMMON[@]}" "${args[@]}" \
    || status=$?
  if [ "$DRY" = 0 ]; then
    kill "$mem_pid" 2>/dev/null || true
    wait "$mem_pid" 2>/dev/null || true
    if [ "$status" != 0 ]; then
      SUMMARY+=("$mode: FAILED (exit $status)")
      continue
    fi
    SUMMARY+=("$("$PY" - "$run_dir/metrics.jsonl" "$mem_log" "$mode" <<'EOF'
import json, sys
from collections import defaultdict

metrics, mem_log, mode = sys.argv[1:]
steps = [r for r in map(json.loads, open(metrics)) if r.get("phase") == "grpo" and "time/step" in r]
times = [r["time/step"] for r in steps[1:]] or [r["time/step"] for r in steps]  # the first step warms up
peak = defaultdict(float)
for line in open(mem_log):
    parts = [p.strip() for p in line.split(",")]
    if len(parts) == 2 and parts[0].isdigit():
        peak[int(parts[0])] = max(peak[int(parts[0])], float(parts[1]))
mem = ", ".join(f"GPU{i} {peak[i] / 1024:.1f} GiB" for i in sorted(peak))
print(f"{mode}: {len(steps)} steps, mean step {sum(times) / max(1, len(times)):.2f} s; peak memory {mem}")
EOF
)")
  fi
done

echo
echo "gpu_smoke summary:"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
