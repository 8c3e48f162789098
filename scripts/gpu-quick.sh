#!/usr/bin/env bash
# The GPU tests alone, each file's result as it ends (for a call with little device time left).
# Usage: scripts/gpu-quick.sh [seconds]
set -u
cd "$(dirname "$0")/.."
site=${TMPDIR:-/tmp}/kvxfer-site
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .device/wheels/*.whl >/dev/null 2>&1
export PYTHONPATH="$site:$PWD"
nvidia-smi -L
timeout "${1:-150}" python3 -m pytest -q -m "gpu" -p no:cacheprovider --timeout 60 -rfE tests/kernels tests/pipe \
  tests/backends/test_cuda_ipc.py tests/backends/test_cuda_ipc_batch.py tests/engine/test_connector_gpu.py \
  tests/serve/test_worker_pd.py tests/faults tests/backends/ucx/test_gpu.py 2>&1 | tail -n 40
