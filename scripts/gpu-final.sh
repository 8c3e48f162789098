#!/usr/bin/env bash
# One GPU call that does what a session must check at the end, each stage under its own time limit so the summary
# always comes back: GPU tests, baseline-vs-checkout benchmark rows (scripts/gpu-ab.sh), serving on the GPU.
# Usage: OUT=dir scripts/gpu-final.sh [tests_s] [ab_s] [serve_s]   (.device/wheels, .device/baseline, .device/cache)
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; site=${TMPDIR:-/tmp}/kvxfer-site
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl >"$out/pip.log" 2>&1
export PYTHONPATH="$site:$PWD"
summary="$out/summary.txt"; nvidia-smi -L >"$summary" 2>&1
stage() { local name=$1 limit=$2; shift 2; local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1; local rc=$?
  printf '%-8s rc=%-3s %4ss %s\n' "$name" "$rc" "$((SECONDS - start))" "$(grep -E 'passed|failed' "$out/$name.log" | tail -n 1)" >>"$summary"; }
stage tests "${1:-240}" python3 -m pytest -q -m "gpu or multi_gpu" -p no:cacheprovider --timeout 120 -x tests
stage ab "${2:-170}" bash scripts/gpu-ab.sh .device/baseline 1
stage serve "${3:-150}" env KVXFER_CACHE_DIR="$PWD/.device/cache" python3 bench/serve_compare.py --model smollm2 \
  --random-weights --dtype bfloat16 --layouts 1p1d,2agg --mixes 2000:200,500:100 --concurrency 1,8 --requests 16 \
  --slo-ttft-ms 300 --slo-itl-ms 30 --startup-timeout 60 --log-dir "$out" --json "$out/serve_gpu.json"
grep -hE "^(base|new) " "$out/ab.log" >>"$summary" 2>/dev/null
tail -n 30 "$out/serve.log" >>"$summary"; grep -E "FAILED|Error" "$out/tests.log" | head -n 20 >>"$summary"
cat "$summary"
