#!/usr/bin/env bash
# A/B on one GPU machine, in one call: the same benchmark rows for a baseline tree and for this checkout, interleaved
# (A, B, A, B) so that host-speed drift hits both. Usage: scripts/gpu-ab.sh BASELINE_DIR [rounds]
# BASELINE_DIR holds an older `kvxfer/` package (e.g. `git archive <commit> kvxfer | tar -x -C .device/baseline`).
# Writes $OUT/ab_<tree>_<round>_<row>.json and prints one summary line per row and tree.
set -u
cd "$(dirname "$0")/.."
baseline=$(cd "$1" && pwd); rounds=${2:-2}; out=${OUT:-gpu-out}; mkdir -p "$out"
gpus=$(python3 -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
peer=$(( gpus > 1 ? 1 : 0 ))
row() {  # row TREE ROUND NAME ARGS...
  local tree=$1 round=$2 name=$3; shift 3
  local dir=$PWD; [ "$tree" = base ] && dir=$baseline
  (cd /tmp && PYTHONPATH="$dir${PYTHONPATH:+:$PYTHONPATH}" timeout 240 python3 -m "$@" --json "$out/ab_${tree}_${round}_${name}.json" \
     >"$out/ab_${tree}_${round}_${name}.log" 2>&1)
  echo "$tree round $round $name rc=$? $(tail -n 3 "$out/ab_${tree}_${round}_${name}.log" | tr '\n' ' ' | cut -c1-300)"
}
for round in $(seq "$rounds"); do
  for tree in base new; do
    row $tree $round kernels kvxfer.bench.kernels --quick
    row $tree $round ipc kvxfer.bench.cli ipc --target $peer --repeats 20
    row $tree $round kv kvxfer.bench.cli kv --model llama-3.1-8b --tokens 4096 --block-size 16 --p-tp 1 --d-tp 2 --d-gpu $peer
    row $tree $round kv-retile kvxfer.bench.cli kv --model llama-3.1-8b --tokens 4096 --block-size 16 --d-block-size 32 --d-layout NHD --p-tp 2 --d-tp 1 --d-gpu $peer
  done
done
