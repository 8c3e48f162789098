#!/usr/bin/env bash
# Start `kvxfer serve` with one prefill and one decode worker (1P1D), send a few requests, stop it cleanly.
#   examples/serve_1p1d.sh [MODEL]     (default: smollm2 = SmolLM2-135M-Instruct; tiny-random needs no download)
# Long prompts (above max_local_prefill_length in examples/policy.yaml) are prefilled on the prefill worker and their
# KV cache is pulled by the decode worker; short ones are prefilled by the decode worker itself.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-smollm2}"
PORT="${PORT:-8000}"
PY="${PYTHON:-python}"
LOG="$(mktemp -t kvxfer-serve.XXXXXX)"
"$PY" -m kvxfer.cli serve --model "$MODEL" --prefill 1 --decode 1 --port "$PORT" --policy examples/policy.yaml \
    >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER; rm -f "$LOG"' EXIT
for _ in $(seq 600); do                       # the first SmolLM2 run converts the model once (about a minute)
    grep -q "ready on" "$LOG" && break
    kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.5
done
grep "ready on" "$LOG"
URL="http://127.0.0.1:$PORT"
curl -s "$URL/v1/models"; echo
echo "--- a short question (local prefill on the decode worker), streamed through the openai client:"
"$PY" examples/chat.py --url "$URL/v1" --max-tokens 48 "What is the capital of France?"
echo "--- a long prompt (remote prefill, KV moved prefill -> decode):"
LONG=$(printf 'Summarize: the KV cache of a prompt is computed by the prefill worker and pulled by the decode worker. %.0s' $(seq 20))
"$PY" examples/chat.py --url "$URL/v1" --max-tokens 48 "$LONG"
echo "--- the same long prompt again (the decode worker has its prefix cached: fewer KV bytes move):"
"$PY" examples/chat.py --url "$URL/v1" --max-tokens 48 "$LONG"
echo "--- routing metrics:"
curl -s "$URL/metrics" | grep -E '^kvxfer_(disaggregation_decisions|kv_transfer_bytes|requests)_total'
