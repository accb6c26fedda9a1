#!/usr/bin/env bash
# The GPU check (issue 26): insect itself, through Ray, on one CUDA machine, in one call:
# `insect train --gpu` (full fine-tune and frozen trunk, each with CPU and GPU decoding),
# `insect classify --gpu` with CPU and with GPU JPEG decoding (and batches of 128 if time
# is left), `insect evaluate --gpu`, the model alone (the ceilings), the
# device decoder against the CPU path, with each phase's CPU cores, GPU utilisation and
# GPU memory. Everything lands in $OUT/gpu-check.json (commit it as
# bench/results/gpu_check.json) and $OUT/gpu-check.log.
#
# Here, once (builds .whl/, 46 MiB: Ray without jars and rllib, and what the GPU machine
# lacks; copies the insect test photos, 8 MiB, into .gpu-check/):
#   bash bench/gpu_check.sh --stage
# Then, on the lent H200, one call of the device tool's `run`:
#   command: bash bench/gpu_check.sh
#   carry:   [".whl", ".gpu-check"]
#   timeout_s: 590
# By hand on any CUDA machine: OUT=/tmp/gpu-check bash bench/gpu_check.sh (with Ray
# installed, set WHEELS= to skip the install). INSECT_GPU_CHECK_CPU=1: the same steps on the
# CPU with tiny sizes, to try the script without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}
SITE=${SITE:-/tmp/site}
OUT=${OUT:-/tmp/gpu-check-out}
WORK=${WORK:-/tmp/gpu-check-work}
BUDGET=${BUDGET:-420}  # seconds; optional steps are skipped past it
SLOW=${SLOW:-1}  # a factor on every step's time limit (a dry run on a small machine: 5)
PHOTOS=.gpu-check/insects

if [ "${1:-}" = "--stage" ]; then
  "$PYTHON" bench/slim_ray_wheel.py || exit 1
  rm -rf "$PHOTOS" && mkdir -p "$PHOTOS"
  cp -r "${INSECT_PHOTOS:-../shared/data/insects/test}/." "$PHOTOS/" || exit 1
  du -sh .whl "$PHOTOS"
  exit 0
fi

STARTED=$(date +%s)
mkdir -p "$OUT" && rm -rf "$WORK" && mkdir -p "$WORK/runs"
LOG=$OUT/gpu-check.log
if [ -n "$WHEELS" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1 || { echo "wheel install failed"; tail "$LOG"; exit 1; }
  export PATH=$SITE/bin:$PATH
fi
export PYTHONPATH=$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
INSECT=("$PYTHON" -m insectlib.cli.main)
BENCH=("$PYTHON" bench/gpu_bench.py)

if [ -n "${INSECT_GPU_CHECK_CPU:-}" ]; then  # a dry run: tiny, on the CPU
  GPU=() DECODE=(--decode device) DATA=(--distinct 90 --size 320x240 --inputs 600)
  TRAIN=(--image-size 32 --batch-size 9 --arch resnet18)  # 81 training images: no batch of 1
  MODEL=(--steps 1 --image-size 32 --arch resnet18 --no-compile) AGREE=30
  PARTS=(--rows-per-file 50)  # the steady-state rate needs 3 Parquet parts or more
else
  GPU=(--gpu) DECODE=() DATA=(--distinct 3000 --size 1024x768 --inputs 20000)
  TRAIN=() MODEL=() AGREE=1500 PARTS=()
fi

step() {  # step NAME TIMEOUT [optional] -- COMMAND...: run, time and record one step
  local name=$1 limit=$2 optional=$3; shift 4
  local now=$(($(date +%s) - STARTED))
  if [ "$optional" = optional ] && [ "$now" -gt "$BUDGET" ]; then
    echo "{\"step\": \"$name\", \"skipped\": \"past the budget at ${now} s\"}" >>"$WORK/steps.jsonl"
    echo "[$now s] $name: skipped (budget)"; return
  fi
  echo "=== $name: $*" >>"$LOG"
  "${BENCH[@]}" phase --work "$WORK" "$name" start
  local t0=$(date +%s)
  timeout $((limit * SLOW)) "$@" >>"$LOG" 2>&1
  local rc=$? seconds=$(($(date +%s) - t0))
  "${BENCH[@]}" phase --work "$WORK" "$name" end
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $seconds}" >>"$WORK/steps.jsonl"
  echo "[$(($(date +%s) - STARTED)) s] $name: rc $rc in $seconds s"
  [ "$rc" = 0 ] || tail -n 5 "$LOG" | cut -c1-300
  # The result so far, so that a call stopped at its time limit still brings one back.
  "${BENCH[@]}" report --work "$WORK" --out "$OUT/gpu-check.json" >/dev/null 2>>"$LOG"
  return "$rc"
}

"$PYTHON" -c "import ray, torch, torchvision; print('ray', ray.__version__, 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
nvidia-smi >>"$LOG" 2>&1
"${BENCH[@]}" sample --work "$WORK" >>"$LOG" 2>&1 &
SAMPLER=$!

step data 120 required -- "${BENCH[@]}" data --work "$WORK" "${DATA[@]}"
# One Ray head for every command, started the product's way (token authentication on);
# without it (RAY_HEAD=0, or a failed start) each command starts a local Ray of its own.
ADDRESS=()
GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ "${RAY_HEAD:-1}" = 1 ] && step ray_start 90 required -- bash cluster/start-head.sh --num-gpus "$GPUS"; then
  export RAY_AUTH_MODE=token
  ADDRESS=(--address auto)
fi
COMMON=(--overwrite "${GPU[@]}" "${ADDRESS[@]}")
CLASSIFY=(classify "$WORK/inputs" "${PARTS[@]}")
RUNS=$WORK/runs LABELLED=$WORK/labelled
TRAIN_ARGS=(train "$LABELLED" --workers 1 --epochs 2 --weights random --storage "$WORK/ray_results" "${TRAIN[@]}" "${COMMON[@]}")

step train_full 150 required -- "${INSECT[@]}" "${TRAIN_ARGS[@]}" --freeze none --output "$RUNS/train_full"
step train_full_gpu_decode 150 required -- "${INSECT[@]}" "${TRAIN_ARGS[@]}" --freeze none --decode device --output "$RUNS/train_full_gpu_decode"
MODEL_DIR=$RUNS/train_full
step classify_gpu_decode 120 required -- "${INSECT[@]}" "${CLASSIFY[@]}" --model "$MODEL_DIR" --output "$RUNS/classify_gpu_decode" --decode device "${COMMON[@]}"
step classify_cpu_decode 120 required -- "${INSECT[@]}" "${CLASSIFY[@]}" --model "$MODEL_DIR" --output "$RUNS/classify_cpu_decode" --decode cpu "${COMMON[@]}"
step model_alone 120 required -- "${BENCH[@]}" model --work "$WORK" --model "$MODEL_DIR" "${MODEL[@]}"
step decode_check 120 required -- "${BENCH[@]}" decode --work "$WORK" --model "$MODEL_DIR" --photos "$PHOTOS" --agreement-images "$AGREE"
step train_frozen 120 optional -- "${INSECT[@]}" "${TRAIN_ARGS[@]}" --freeze trunk --output "$RUNS/train_frozen"
step train_frozen_gpu_decode 120 optional -- "${INSECT[@]}" "${TRAIN_ARGS[@]}" --freeze trunk --decode device --output "$RUNS/train_frozen_gpu_decode"
step evaluate_gpu 90 optional -- "${INSECT[@]}" evaluate "$LABELLED" --model "$MODEL_DIR" --output "$RUNS/evaluate_gpu" "${DECODE[@]}" "${COMMON[@]}"
step classify_gpu_decode_batch_128 100 optional -- "${INSECT[@]}" "${CLASSIFY[@]}" --model "$MODEL_DIR" --output "$RUNS/classify_gpu_decode_batch_128" --decode device --batch-size 128 "${COMMON[@]}"

kill "$SAMPLER" 2>/dev/null
# `ray stop` ends every Ray process of this user: right on the lent machine, not on a shared one.
[ "${#ADDRESS[@]}" = 0 ] || ray stop --force >>"$LOG" 2>&1
"${BENCH[@]}" report --work "$WORK" --out "$OUT/gpu-check.json" 2>>"$LOG"
echo "total $(($(date +%s) - STARTED)) s; result in $OUT/gpu-check.json, log in $LOG"
