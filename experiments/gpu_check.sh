#!/usr/bin/env bash
# The project's one prepared GPU check: GPU tests, bench rows a-c (seed000's CNN6 and resnet18), packing
# 1/4/16 trials per GPU with and without MPS, a shortened seed-000 workflow (search + retrain), then
# bench_gpu.{json,md}. Every step runs under its own `timeout`, cut to what is left of a shared deadline
# (default 470 s: under the 8 minutes a device command gets, with room to copy results back); each step
# writes its results under $OUT as it goes, so what ran comes back even if the command is cut off.
#
# On the GPU machine, from the project root (Ray's wheels from `bash ../shared/gpu/device-wheels.sh`
# travel in .whl/ and are installed here when Ray is missing):
#     bash experiments/gpu_check.sh
# Dry run on a CPU machine (tiny sizes, device cpu, the same steps and files):
#     GPU_CHECK_DRY=1 OUT=/tmp/gpu-check bash experiments/gpu_check.sh
# Then commit $OUT/bench_gpu.json and $OUT/bench_gpu.md as experiments/results/bench_gpu.{json,md}.
set -uo pipefail

OUT=${OUT:-/tmp/gpu-check}
DRY=${GPU_CHECK_DRY:-0}
# a dry run exercises the same code paths on a (possibly shared, slow) CPU: its limits are 4x longer
SCALE=1
[ "$DRY" = 1 ] && SCALE=4
BUDGET_S=${GPU_CHECK_BUDGET_S:-$((470 * SCALE))}
ONLY=${GPU_CHECK_ONLY:-}  # e.g. env,rows: run only these steps (the others are recorded as not selected)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
AGGREGATE_S=15  # kept back for the summary at the end
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\tlimit_s\n' > "$STEPS"

export RAY_DISABLE_USAGE_STATS=1 PYTHONUNBUFFERED=1 CIFAR_TUNE_DATA=${CIFAR_TUNE_DATA:-/tmp/cifar-tune-data}
if ! "$PY" -c 'import ray' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# step NAME LIMIT_S CMD...: runs CMD under `timeout`, at most LIMIT_S and never past the deadline; logs to
# $OUT/NAME.log, records status and seconds in steps.tsv. A failed or cut step does not stop the rest.
step() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        printf '%s\tnot selected\t0\t0\n' "$name" >> "$STEPS"
        return
    fi
    local left=$((DEADLINE - AGGREGATE_S - $(date +%s)))
    if ((left < 10)); then
        printf '%s\tskipped (deadline)\t0\t0\n' "$name" >> "$STEPS"
        echo "[$(($(date +%s) - START))s] $name: skipped, deadline reached"
        return
    fi
    ((limit > left)) && limit=$left
    local t0 rc status
    t0=$(date +%s)
    echo "[$((t0 - START))s] $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timeout" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "$limit" >> "$STEPS"
    echo "[$(($(date +%s) - START))s] $name: $status"
    tail -n 3 "$OUT/$name.log"
    [ "$status" = ok ] || free_gpu "$name"
}

# A cut step can leave Ray workers running (Ray starts its processes in their own sessions, out of
# timeout's reach) that would hold GPU memory and compute through the next steps. This script holds no
# CUDA context itself, so every process on the GPU between steps is such a leftover: ended by its pid.
free_gpu() {
    command -v nvidia-smi > /dev/null || return 0
    local pids
    pids=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2> /dev/null | tr -d ' ')
    [ -z "$pids" ] && return 0
    echo "after $1: ending leftover GPU processes $(echo $pids)" | tee -a "$OUT/$1.log"
    for pid in $pids; do kill "$pid" 2> /dev/null; done
    sleep 3
    for pid in $pids; do kill -9 "$pid" 2> /dev/null; done
}

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    ROWS=(--model seed000 --batch-size 32 --epoch-images 64 --rounds 1 --threads 1)
    PACK=(--pack-model lenet --pack-epochs 2 --pack-batch-size 32 --images 1000)
    PACK_OFF=(--pack 1,2) PACK_MPS=(--pack 2)
    WORKFLOW=(--workflow --workflow-trials 2 --workflow-epochs 1 --images 1000)
else
    DEVICE=cuda
    ROWS=(--model seed000,resnet18 --batch-size 128 --epoch-images 8192 --rounds 3)
    PACK=(--pack-epochs 2 --pack-batch-size 128 --images 12000)
    PACK_OFF=(--pack 1,4,16) PACK_MPS=(--pack 4,16)
    WORKFLOW=(--workflow --workflow-trials 8 --workflow-epochs 2 --images 10000)
fi

step env 20 "$PY" experiments/gpu_check.py env --out "$OUT/env.json" --device "$DEVICE"
# every search and retrain here runs without Ray's dashboard (the GPU image lacks its packages)
step gpu_tests 150 "$PY" -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"
step rows 80 "$PY" -m cifar_tune bench --device "$DEVICE" --no-search "${ROWS[@]}" --json "$OUT/bench_rows.json"
# packing in two steps, each writing its own file: a cut MPS step keeps the rows without MPS
step packing 75 "$PY" -m cifar_tune bench --device "$DEVICE" --no-throughput "${PACK[@]}" "${PACK_OFF[@]}" --mps off \
    --json "$OUT/bench_pack.json"
step packing_mps 55 "$PY" -m cifar_tune bench --device "$DEVICE" --no-throughput "${PACK[@]}" "${PACK_MPS[@]}" --mps on \
    --json "$OUT/bench_pack_mps.json"
step workflow 75 "$PY" -m cifar_tune bench --device "$DEVICE" --no-throughput "${WORKFLOW[@]}" --json "$OUT/bench_workflow.json"

# the summary always runs (seconds on the GPU machine; importing torch on a loaded CPU takes longer)
AGGREGATE_LIMIT=$((DEADLINE - $(date +%s)))
((AGGREGATE_LIMIT < 60)) && AGGREGATE_LIMIT=60
timeout "$AGGREGATE_LIMIT" "$PY" experiments/gpu_check.py aggregate --out "$OUT" --dry "$DRY" --total-s "$(($(date +%s) - START))"
echo "[$(($(date +%s) - START))s] done: $OUT/bench_gpu.json, $OUT/bench_gpu.md"
