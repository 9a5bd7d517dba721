#!/usr/bin/env bash
# Reference experiment on a GPU machine with Hugging Face Hub access:
#   1. SFT of the teacher (gpt2-large) and of the student (gpt2-medium) on Dolly train (rows 0-13999);
#   2. PromptKD distillation of the SFT student with 7 settings per seed: baseline, entropy_weighted,
#      soft_blend, dynamic_blend, and ta_filter with (top-k, top-p) = (200, 0.9), (100, 0.95), (0, 0.98);
#   3. greedy evaluation (32 new tokens) of the teacher, the SFT student and the 7 students on Dolly test
#      (rows 14500-14999), once per seed;
#   4. mean ± sample standard deviation over the seeds (scripts/aggregate_results.py).
#
#   bash scripts/reproduce_gpu.sh                      # all of it, seeds 1 2 3
#   DRY_RUN=1 bash scripts/reproduce_gpu.sh            # print the commands only
#
# Running it again skips completed runs and resumes the others from their last checkpoint.
# docs/deployment.md gives the expected GPU hours (an estimate) and the disk space needed.
#
# Environment variables, with their defaults in brackets:
#   SEEDS ["1 2 3"]   distillation and evaluation seeds. The two SFT runs use SFT_SEED [1] once.
#   PREFIX [gpu-ref]  prefix of the run folder names.
#   OUTPUT_DIR [$PROMPTKD_HOME/runs, i.e. checkpoints/runs]  folder of the run folders.
#   LAUNCH [python]   launcher of the SFT and distillation runs, for example
#       "accelerate launch --config_file configs/accelerate/multi_gpu.yaml --num_processes 4".
#       The batch sizes are per process, so N processes train with N times the reference batch.
#   SFT_BATCH [8], SFT_ACCUM [4], DISTILL_BATCH [16], DISTILL_STEPS [1000]: batch and step counts.
#   ALLOW_CPU [unset] set to 1 to run without a CUDA GPU, for a smoke run with smaller sizes only.
set -euo pipefail
cd "$(dirname "$0")/.."

SEEDS="${SEEDS:-1 2 3}"
SFT_SEED="${SFT_SEED:-1}"
PREFIX="${PREFIX:-gpu-ref}"
OUTPUT_DIR="${OUTPUT_DIR:-${PROMPTKD_HOME:-checkpoints}/runs}"
read -r -a LAUNCH_CMD <<< "${LAUNCH:-python}"
SFT_BATCH="${SFT_BATCH:-8}"
SFT_ACCUM="${SFT_ACCUM:-4}"
DISTILL_BATCH="${DISTILL_BATCH:-16}"
DISTILL_STEPS="${DISTILL_STEPS:-1000}"

DATASET="databricks/databricks-dolly-15k"
COMMON=(--dataset "$DATASET" --template dolly --max-length 512 --mixed-precision bf16)
SFT_ARGS=(
  --num-epochs 3 --per-device-batch-size "$SFT_BATCH" --gradient-accumulation-steps "$SFT_ACCUM"
  --learning-rate 5e-5 --warmup-ratio 0.05 --max-grad-norm 1.0 --eval-limit 500 --save-every 500
)
DISTILL_ARGS=(
  --max-steps "$DISTILL_STEPS" --per-device-batch-size "$DISTILL_BATCH" --gradient-accumulation-steps 1
  --learning-rate 1e-5 --prompt-learning-rate 1e-4 --warmup-ratio 0.05 --kl-direction forward --kl-scale 0.5
  --max-new-tokens 32 --save-every 250 --probe-every 50
)
# label, strategy, ta_filter top-k, ta_filter top-p ("-": not a ta_filter run)
METHODS=(
  "baseline baseline - -"
  "entropy_weighted entropy_weighted - -"
  "soft_blend soft_blend - -"
  "dynamic_blend dynamic_blend - -"
  "ta_filter-k200-p0.9 ta_filter 200 0.9"
  "ta_filter-k100-p0.95 ta_filter 100 0.95"
  "ta_filter-k0-p0.98 ta_filter 0 0.98"
)

run() {
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

run_state() {
  # Print the "state" field of <OUTPUT_DIR>/<name>/status.json, or "missing" when there is none.
  local status="$OUTPUT_DIR/$1/status.json"
  local state=""
  if [ -f "$status" ]; then
    state="$(sed -n 's/.*"state": *"\([a-z]*\)".*/\1/p' "$status" | head -n 1)"
  fi
  echo "${state:-missing}"
}

stage() {
  # stage NAME COMMAND...: skip a completed run, resume a run folder that exists, start the others.
  local name="$1"
  shift
  local state
  state="$(run_state "$name")"
  if [ "$state" = completed ]; then
    echo "== $name: completed, skipped" >&2
    return
  fi
  local resume=()
  if [ "$state" != missing ]; then
    resume=(--resume)
  fi
  echo "== $name (state: $state)" >&2
  run "$@" --output-dir "$OUTPUT_DIR" --run-name "$name" ${resume[@]+"${resume[@]}"}
}

if [ -z "${DRY_RUN:-}" ] && [ -z "${ALLOW_CPU:-}" ]; then
  if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU is visible to torch. Run this on a GPU machine, or set ALLOW_CPU=1 for a smoke run." >&2
    exit 1
  fi
fi

TEACHER="${PREFIX}-sft-teacher"
STUDENT="${PREFIX}-sft-student"
stage "$TEACHER" "${LAUNCH_CMD[@]}" -m promptkd sft --model gpt2-large "${COMMON[@]}" "${SFT_ARGS[@]}" --seed "$SFT_SEED"
stage "$STUDENT" "${LAUNCH_CMD[@]}" -m promptkd sft --model gpt2-medium "${COMMON[@]}" "${SFT_ARGS[@]}" --seed "$SFT_SEED"

EVALUATIONS=()
for seed in $SEEDS; do
  models=("teacher=$OUTPUT_DIR/$TEACHER" "SFT student=$OUTPUT_DIR/$STUDENT")
  for method in "${METHODS[@]}"; do
    read -r label strategy top_k top_p <<< "$method"
    filter=()
    if [ "$top_k" != - ]; then
      filter=(--top-k "$top_k" --top-p "$top_p")
    fi
    name="${PREFIX}-seed${seed}-${label}"
    stage "$name" "${LAUNCH_CMD[@]}" -m promptkd distill \
      --teacher "$OUTPUT_DIR/$TEACHER" --student "$OUTPUT_DIR/$STUDENT" --strategy "$strategy" \
      ${filter[@]+"${filter[@]}"} "${COMMON[@]}" "${DISTILL_ARGS[@]}" --seed "$seed"
    models+=("$label=$OUTPUT_DIR/$name")
  done
  # Evaluation runs in one process: promptkd's evaluation does not split the prompts across processes.
  stage "${PREFIX}-seed${seed}-eval" python -m promptkd evaluate --models "${models[@]}" --split test \
    --max-new-tokens 32 --batch-size 32 --bertscore-model auto --calibration "${COMMON[@]}" --seed "$seed"
  EVALUATIONS+=("$OUTPUT_DIR/${PREFIX}-seed${seed}-eval")
done

if [ -n "${DRY_RUN:-}" ]; then
  run python scripts/aggregate_results.py "${EVALUATIONS[@]}"
else
  python scripts/aggregate_results.py "${EVALUATIONS[@]}" | tee "$OUTPUT_DIR/${PREFIX}-table.md"
  echo "Table written to $OUTPUT_DIR/${PREFIX}-table.md" >&2
fi
