#!/usr/bin/env bash
# One run on a GPU machine without network: install carried wheels, run the GPU tests and benchmarks, write logs
# under $OUT (or ./gpu-out), print a short table last. Usage: scripts/gpu-check.sh [stage ...]
# Stages: info tests kernels ipc nixl pipe engine sweep ucx (default: all); also backends (the backends' GPU
# tests only) and ipc-late (ipc with notifications sent after completion, for comparison). Wheels come from .device/wheels.
set -u
cd "$(dirname "$0")/.."
final=${OUT:-gpu-out}; out=${TMPDIR:-/tmp}/kvxfer-gpu-out; rm -rf "$out"; mkdir -p "$out" "$final"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
site=${TMPDIR:-/tmp}/kvxfer-site
if ls .device/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl >"$out/pip.log" 2>&1 \
    || echo "wheel install failed: see pip.log"
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
stages=${*:-info tests kernels ipc nixl pipe engine sweep ucx}
# Second GPU for the cross-GPU rows; on a one-GPU machine both sides use GPU 0 (same-GPU IPC, other ceilings).
gpus=$(python3 -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
peer=$(( gpus > 1 ? 1 : 0 ))
summary="$out/summary.txt"; : >"$summary"
failed=0
run() {  # run NAME TIMEOUT CMD...: log to $out/NAME.log, keep the last line in the summary
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1; local rc=$?
  [ "$rc" -eq 0 ] || failed=1
  printf '%-10s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$(tail -n 1 "$out/$name.log")" >>"$summary"
}
for stage in $stages; do
  case $stage in
    info) run info 60 bash -c 'nvidia-smi -L; nvidia-smi topo -m; python3 -c "import sys,cupy,torch,numpy; print(sys.version.split()[0], \"cupy\", cupy.__version__, \"torch\", torch.__version__, \"numpy\", numpy.__version__, \"gpus\", cupy.cuda.runtime.getDeviceCount())"' ;;
    tests) run tests 420 python3 -m pytest -q -m "gpu or multi_gpu" -p no:cacheprovider --timeout 300 tests ;;
    backends) run backends 300 python3 -m pytest -q -m "gpu or multi_gpu" -p no:cacheprovider --timeout 200 tests/backends ;;
    ipc-late) run ipc-late 180 env KVXFER_CUDA_IPC_EARLY_NOTIFY=0 python3 -m kvxfer.bench.cli ipc --target $peer --json "$out/ipc_late.json" ;;
    kernels) run kernels 240 python3 -m kvxfer.bench.kernels --json "$out/kernels.json" ;;
    ipc) run ipc 180 python3 -m kvxfer.bench.cli ipc --target $peer --json "$out/ipc.json"
         run ipc-16k 180 python3 -m kvxfer.bench.cli ipc --target $peer --tokens 16384 --repeats 10 --json "$out/ipc_16k.json" ;;
    nixl) run nixl 180 python3 bench/nixl_gpu.py --target $peer --json "$out/nixl_gpu.json" ;;
    pipe) run pipe 120 python3 -m kvxfer.bench.cli kv --model llama-3.1-8b --tokens 4096 --block-size 16 --p-tp 1 --d-tp 2 --d-gpu $peer --profile --json "$out/kv.json"
          run pipe-retile 120 python3 -m kvxfer.bench.cli kv --model llama-3.1-8b --tokens 4096 --block-size 16 --d-block-size 32 --d-layout NHD --p-tp 2 --d-tp 1 --d-gpu $peer --json "$out/kv_retile.json"
          run pipe-70b 180 python3 -m kvxfer.bench.cli kv --model llama-3.1-70b --tokens 4096 --block-size 16 --p-tp 8 --d-tp 8 --only-rank 0 --d-gpu $peer --json "$out/kv_70b.json" ;;
    engine) run engine 240 python3 bench/engine_gpu.py --json "$out/engine.json" ;;
    sweep) run sweep 240 python3 -m kvxfer.bench.cli sweep --backend cuda_ipc,ucx --memory cuda:cuda --sizes 4K,32K,256K,2M,64M --batch 16 --repeats 5 --compare nixl --no-progress --json "$out/sweep_gpu.json" ;;
    ucx) run ucx 180 python3 bench/ucx_host.py --memory cuda --systems kvxfer nixl --skip-perftest --pingpongs 200 --out "$out/ucx_cuda.json" ;;
    *) echo "unknown stage $stage" >>"$summary"; failed=1 ;;
  esac
done
for log in "$out"/*.log; do echo "===== $log (tail)"; tail -n 25 "$log"; done
# Few files may come back from the device: everything travels as one archive beside the summary.
tar -czf "$final/bundle.tgz" -C "$out" . && cp "$summary" "$final/summary.txt"
echo "===== summary"; cat "$summary"
exit "$failed"  # non-zero when any stage failed (the summary says which)
