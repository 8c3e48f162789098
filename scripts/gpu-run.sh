#!/usr/bin/env bash
# One GPU call made of named stages, run in the order given, each under its own time limit, with a summary last.
# Usage: OUT=dir scripts/gpu-run.sh STAGE[:seconds] ...   stages: tests quick ab serve timing engine
# SERVE_REQUESTS (default 16): requests per serving load point.
# Needs .device/wheels (and .device/baseline for ab, .device/cache for serve); see scripts/gpu-final.sh.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}; mkdir -p "$out"; site=${TMPDIR:-/tmp}/kvxfer-site
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl >"$out/pip.log" 2>&1
export PYTHONPATH="$site:$PWD"
summary="$out/summary.txt"; nvidia-smi -L >"$summary" 2>&1
stage() { local name=$1 limit=$2; shift 2; local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1; local rc=$?
  printf '%-9s rc=%-3s %4ss %s\n' "$name" "$rc" "$((SECONDS - start))" "$(grep -E 'passed|failed' "$out/$name.log" | tail -n 1)" >>"$summary"; }
for item in "$@"; do
  name=${item%%:*}; limit=${item#*:}; [ "$limit" = "$item" ] && limit=200
  case $name in
    tests) stage tests "$limit" python3 -m pytest -q -m "gpu or multi_gpu" -p no:cacheprovider --timeout 120 -rfE tests ;;
    quick) stage quick "$limit" bash scripts/gpu-quick.sh "$((limit - 10))" ;;
    ab) stage ab "$limit" bash scripts/gpu-ab.sh .device/baseline 1; grep -hE "^(base|new) " "$out/ab.log" >>"$summary" ;;
    serve) stage serve "$limit" env KVXFER_CACHE_DIR="$PWD/.device/cache" python3 bench/serve_compare.py \
        --model smollm2 --random-weights --dtype bfloat16 --layouts 1p1d,2agg --mixes 2000:200,500:100 \
        --concurrency 1,8 --requests "${SERVE_REQUESTS:-16}" --slo-ttft-ms 300 --slo-itl-ms 30 --startup-timeout 60 --log-dir "$out" \
        --json "$out/serve_gpu.json"
      tail -n 30 "$out/serve.log" >>"$summary" ;;
    timing) stage timing "$limit" python3 scripts/pipe_timing.py --tokens 4096 128 --tp 1 2 --repeats 30 \
        --json "$out/pipe_timing.json"
      grep -E "median" "$out/timing.log" >>"$summary" ;;
    engine) stage engine "$limit" python3 bench/engine_gpu.py --rounds 3 --json "$out/engine_gpu.json"
      tail -n 25 "$out/engine.log" >>"$summary" ;;
    *) echo "unknown stage $name" >>"$summary" ;;
  esac
done
grep -hE "FAILED|ERROR" "$out"/tests.log "$out"/quick.log 2>/dev/null | head -n 20 >>"$summary"
cat "$summary"
