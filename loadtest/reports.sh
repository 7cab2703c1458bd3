#!/usr/bin/env bash
# Reproduces the load-test reports of BENCHMARKS.md: one server at a time on this machine,
# driven by `iterserve bench` over HTTP. Nothing else should run meanwhile (2 shared cores).
#
#   loadtest/reports.sh batching   static vs dynamic vs continuous on chat-poisson
#   loadtest/reports.sh chunked    chunked prefill off / on, token budget and long-prefill threshold sweep
#   loadtest/reports.sh peer       iterserve vs vLLM CPU: chat-poisson, offline-256, a request-rate sweep
#   loadtest/reports.sh tenants    tenant-spike under each scheduling policy, per-tenant TTFT over time
#                                  (POLICIES="slo priority" AGING=300 BUDGET=512: policies, aging, token budget)
#   loadtest/reports.sh all
#
# Results go to $OUT (default bench-results/load) as JSON and PNG. The peer runs need
# `../shared/peers/vllm-cpu.sh setup` first.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/load}
WORKLOADS=${WORKLOADS:-../shared/workloads}
ITERSERVE=${ITERSERVE:-.venv/bin/iterserve}
PEER=${PEER:-../shared/peers/vllm-cpu.sh}
PEER_MODEL=${PEER_MODEL:-/tmp/peer-vllm/smollm2-135m-instruct}
PORT=8000
PEER_PORT=8100
# The SLO that goodput counts: first token within 2 s, then a token at least every 100 ms.
SLO=(--slo-ttft-ms 2000 --slo-tpot-ms 100)
SWEEP_RATES=${SWEEP_RATES:-1,2,4,8,16}
mkdir -p "$OUT"

server_pid=
wait_ready() {  # url
  for _ in $(seq 600); do
    curl -sf "$1/health" >/dev/null 2>&1 && return 0
    kill -0 "$server_pid" 2>/dev/null || { echo "server exited during start-up" >&2; return 1; }
    sleep 1
  done
  echo "server not ready after 600 s" >&2
  return 1
}
stop_server() {
  [ -n "$server_pid" ] || return 0
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}
trap stop_server EXIT

serve_iterserve() {  # extra serve args...
  "$ITERSERVE" serve --host 127.0.0.1 --port "$PORT" --log-level warning "$@" &
  server_pid=$!
  wait_ready "http://127.0.0.1:$PORT"
}
serve_vllm() {
  bash "$PEER" serve "$PEER_PORT" --dtype bfloat16 >"$OUT/vllm-server.log" 2>&1 &
  server_pid=$!
  wait_ready "http://127.0.0.1:$PEER_PORT"
}
bench() {  # name, then bench args
  local name=$1; shift
  echo "== $name ($(date -u +%H:%M:%S))"
  "$ITERSERVE" bench --no-progress --label "$name" --out "$OUT/$name.json" "${SLO[@]}" "$@"
}

batching() {
  for mode in static dynamic continuous; do
    serve_iterserve --batching "$mode" --static-batch-size 16 --batch-timeout-s 1
    bench "batching-$mode" --trace "$WORKLOADS/chat-poisson.jsonl" --deadline-s 1200
    # Padding waste is counted by the server, not the client.
    curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^iterserve_(padding|generation)_tokens_total' \
      >"$OUT/batching-$mode.metrics.txt"
    stop_server
  done
}

chunked() {
  local -a runs=(
    "off:--no-enable-chunked-prefill"
    "on-2048:--max-num-batched-tokens 2048"
    "on-512:--max-num-batched-tokens 512"
    "on-2048-t256:--max-num-batched-tokens 2048 --long-prefill-token-threshold 256"
    "on-512-t128:--max-num-batched-tokens 512 --long-prefill-token-threshold 128"
  )
  for run in "${runs[@]}"; do
    # shellcheck disable=SC2086  # the flags are meant to split
    serve_iterserve ${run#*:}
    bench "chunked-${run%%:*}" --trace "$WORKLOADS/mixed-long-short.jsonl" --deadline-s 900
    stop_server
  done
}

peer() {
  local -a sweep=(--dataset sharegpt-like --num-prompts 64 --sweep-rates "$SWEEP_RATES" --deadline-s 600)
  serve_iterserve
  bench "peer-iterserve-chat" --trace "$WORKLOADS/chat-poisson.jsonl"
  bench "peer-iterserve-offline" --trace "$WORKLOADS/offline-256.jsonl" --deadline-s 1200
  bench "peer-iterserve-sweep" "${sweep[@]}"
  stop_server
  serve_vllm
  local -a vllm=(--base-url "http://127.0.0.1:$PEER_PORT" --model smollm2 --tokenizer "$PEER_MODEL" --no-send-priority)
  bench "peer-vllm-chat" "${vllm[@]}" --trace "$WORKLOADS/chat-poisson.jsonl"
  bench "peer-vllm-offline" "${vllm[@]}" --trace "$WORKLOADS/offline-256.jsonl" --deadline-s 1200
  bench "peer-vllm-sweep" "${vllm[@]}" "${sweep[@]}"
  stop_server
  "$ITERSERVE" bench plot "$OUT/peer-iterserve-sweep.json" "$OUT/peer-vllm-sweep.json" \
    --labels "iterserve (bfloat16),vLLM CPU 0.32 (bfloat16)" --out "$OUT/peer-sweep.png"
}

tenants() {  # AGING=S runs with --priority-aging-s S (its results named tenants-POLICY-agingS);
             # BUDGET=N with --max-num-batched-tokens N (named ...-budgetN)
  local policies=${POLICIES:-fcfs priority sjf fair slo}
  local -a aging=() suffix=""
  if [ -n "${AGING:-}" ]; then aging=(--priority-aging-s "$AGING"); suffix="-aging$AGING"; fi
  if [ -n "${BUDGET:-}" ]; then aging+=(--max-num-batched-tokens "$BUDGET"); suffix="$suffix-budget$BUDGET"; fi
  for policy in $policies; do
    serve_iterserve --scheduling-policy "$policy" --tenants deploy/tenants.toml "${aging[@]}"
    bench "tenants-$policy$suffix" --trace "$WORKLOADS/tenant-spike.jsonl" --deadline-s 1200
    curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^iterserve_(tenant_requests_(within_slo|rejected)|cost_model|step_token)' \
      >"$OUT/tenants-$policy$suffix.metrics.txt" || true
    stop_server
  done
}

case "${1:-all}" in
  batching) batching ;;
  chunked) chunked ;;
  peer) peer ;;
  tenants) tenants ;;
  all) batching; chunked; peer; tenants ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
