#!/usr/bin/env bash
# The GPU figures issues 9 and 10 ask for, in one command on a GPU machine, in parts that each
# fit one device call (a session is lent 15 minutes in all):
#   deploy/gpu-check.sh small OUT    SmolLM2 shape: issue 10 (offline 512x128/256 and 1000x256/128,
#                                    with and without async scheduling, the same 1000 through HTTP,
#                                    host prepare time) and issue 9's
#                                    SmolLM2 row with transformers beside it (~5 min on an H100)
#   deploy/gpu-check.sh 8b OUT       the Llama-3-8B-shaped workloads of issue 9, both backends
#                                    eager and Triton with graphs (~8 min, most of it the 8B build)
# Models are random-weight, built on the machine into $MODELS (SmolLM2's tokenizer files from
# $TOKENIZER, default the embedded model's folder). DEVICE=cpu SHAPE=tiny NUM=8 KV_GIB=0.1 runs
# a miniature of `small` on a CPU, which is how this script is checked.
set -euo pipefail
PART=${1:?usage: deploy/gpu-check.sh small|8b OUT_DIR}
OUT=${2:-gpu-results}
PY=${PY:-python}
DEVICE=${DEVICE:-cuda}
MODELS=${MODELS:-/tmp/iterserve-gpu-models}
PORT=${PORT:-8123}
mkdir -p "$OUT"
bench=("$PY" -m engine.gpu_bench --device "$DEVICE" --model-dir "$MODELS")
[ -n "${TOKENIZER:-}" ] && bench+=(--tokenizer "$TOKENIZER")
[ -n "${SHAPE:-}" ] && bench+=(--shape "$SHAPE")
[ -n "${NUM:-}" ] && bench+=(--num-requests "$NUM")
[ -n "${KV_GIB:-}" ] && bench+=(--kv-cache-gib "$KV_GIB")
# On a CPU the Triton kernels would run under the interpreter (minutes for a miniature): the
# miniature takes the torch reference path instead; it checks the script, not the kernels.
BACKEND=triton
[ "$DEVICE" = cpu ] && BACKEND=torch
eager=()
[ "$DEVICE" = cpu ] && eager=(--backends torch)
graphs=(--backends "$BACKEND")
[ "$DEVICE" = cuda ] && graphs+=(--cuda-graphs)

case "$PART" in
small)
  "${bench[@]}" --workloads smollm2-512x128x256 "${eager[@]}" --hf --out "$OUT/smollm2-eager.json"
  "${bench[@]}" --workloads smollm2-512x128x256,smollm2-1000x256x128 "${graphs[@]}" --out "$OUT/smollm2-graphs.json"
  # Async scheduling is the CUDA default: the same run without it, for what it buys.
  "${bench[@]}" --workloads smollm2-512x128x256 "${graphs[@]}" --async-scheduling off --out "$OUT/smollm2-graphs-sync.json"
  "$PY" -m engine.prepare_bench --device "$DEVICE" --out "$OUT/prepare.json"
  # The same build through HTTP, with the same random model and 1000 x 256 in / 128 out at once.
  model="$MODELS/${SHAPE:-smollm2}"
  serve=("$PY" -m server.cli serve --model "$model" --dtype bfloat16 --device "$DEVICE" --port "$PORT"
         --served-model-name smollm2 --max-num-seqs 256 --attention-backend "$BACKEND" --log-level warning)
  [ "$DEVICE" = cuda ] && serve+=(--cuda-graphs)
  "${serve[@]}" > "$OUT/serve.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 300); do
    "$PY" -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" \
      2> /dev/null && break
    kill -0 $server 2>/dev/null || { cat "$OUT/serve.log"; exit 1; }
    sleep 1
  done
  "$PY" -m server.cli bench --base-url "http://127.0.0.1:$PORT" --dataset random --num-prompts "${NUM:-1000}" \
    --input-len 256 --output-len 128 --request-rate inf --tokenizer "$model" --no-plot --no-progress \
    --out "$OUT/http-1000x256x128.json"
  kill -TERM $server
  wait $server || true
  ;;
8b)
  "${bench[@]}" --workloads 8b-512x512x256,8b-64x1024x256,8b-256x2048x64 "${eager[@]}" --out "$OUT/8b-eager.json"
  "${bench[@]}" --workloads 8b-512x512x256,8b-64x1024x256,8b-256x2048x64 "${graphs[@]}" --out "$OUT/8b-graphs.json"
  ;;
*)
  echo "unknown part $PART: small or 8b" >&2
  exit 2
  ;;
esac
echo "results in $OUT"
