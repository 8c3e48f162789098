#!/usr/bin/env bash
# Issue 14 item 10: run the UCX fault tests again and again under CPU load, counting passes, failures and crashes.
#   tests/faults/stress.sh ROUNDS [pytest -k expression]
# Load: one stress-ng CPU hog (niced) beside the test; on this 2-core machine other jobs add their own.
set -u
cd "$(dirname "$0")/../.."
rounds=${1:-10}
select=${2:-"cancel_after or shm-staged and (stopped_peer_times_out or default_deadline)"}
python=${PYTHON:-/work/main/.venv/bin/python}
log=${LOG:-/tmp/ucx_stress.log}
hog=""
if command -v stress-ng >/dev/null; then
  nice -n 5 stress-ng --cpu 1 --cpu-load 90 --timeout 0 >/dev/null 2>&1 &
  hog=$!
fi
trap '[ -n "$hog" ] && kill "$hog" 2>/dev/null' EXIT
passed=0 failed=0 crashed=0
for round in $(seq 1 "$rounds"); do
  out=$(KVXFER_REQUIRE_UCX=1 "$python" -X faulthandler -m pytest -q -p no:cacheprovider tests/backends/ucx/test_faults.py \
        -k "$select" 2>&1)
  rc=$?
  summary=$(echo "$out" | tail -1)
  if echo "$out" | grep -q "Fatal Python error\|Segmentation fault\|core dumped\|Aborted"; then
    crashed=$((crashed + 1)); echo "$out" > "$log.crash.$round"
  elif [ $rc -ne 0 ]; then
    failed=$((failed + 1)); echo "$out" > "$log.fail.$round"
  else
    passed=$((passed + 1))
  fi
  echo "round $round rc=$rc: $summary" | tee -a "$log"
done
echo "rounds=$rounds passed=$passed failed=$failed crashed=$crashed" | tee -a "$log"
