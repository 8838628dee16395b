#!/usr/bin/env bash
# The demo: starts a Tansu broker and `projector registry` on loopback, produces a
# stream of orders with Confluent's Python client, and runs a worker that folds them
# into `order_summary`. Ctrl-C stops everything it started.
# DEMO_SECONDS=N stops it after N seconds (for scripted runs).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${PROJECTOR_BIN:?run through make demo}" "${TANSU_BIN:?}" "${PROJECTOR_PYTHON:?}"
BROKER_PORT=${BROKER_PORT:-19092}
REGISTRY_PORT=${REGISTRY_PORT:-18081}
HTTP_PORT=${HTTP_PORT:-8080}
work=$(mktemp -d "${TMPDIR:-/tmp}/projector-demo.XXXXXX")
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "demo stopped; logs and data were in $work"
}
trap stop EXIT

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on 127.0.0.1:$1; see $work/*.log" >&2
  return 1
}

"$TANSU_BIN" broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" --storage-engine memory://tansu/ \
  >"$work/tansu.log" 2>&1 &
pids+=($!)
"$PROJECTOR_BIN" registry --listen "127.0.0.1:$REGISTRY_PORT" >"$work/registry.log" 2>&1 &
pids+=($!)
wait_port "$BROKER_PORT"
wait_port "$REGISTRY_PORT"
"$TANSU_BIN" topic create --broker "tcp://127.0.0.1:$BROKER_PORT" --partitions 4 \
  --config retention.ms=-1 orders >/dev/null

export PROJECTOR__KAFKA__BROKERS="127.0.0.1:$BROKER_PORT"
export PROJECTOR__REGISTRY__URL="http://127.0.0.1:$REGISTRY_PORT"
export PROJECTOR__HTTP__LISTEN="127.0.0.1:$HTTP_PORT"
export PROJECTOR__STORE__PATH="$work/data"
"$PROJECTOR_BIN" run --config config/demo.toml >"$work/worker.log" 2>&1 &
pids+=($!)
wait_port "$HTTP_PORT"

"$PROJECTOR_PYTHON" tests/python/demo_events.py --orders 2000 >"$work/events.jsonl"
"$PROJECTOR_PYTHON" tests/python/produce.py --brokers "127.0.0.1:$BROKER_PORT" \
  --registry "http://127.0.0.1:$REGISTRY_PORT" --schemas schemas --events "$work/events.jsonl" \
  --rate 2000 >"$work/producer.log" 2>&1 &
pids+=($!)

api="http://127.0.0.1:$HTTP_PORT"
cat <<MSG
Projector demo running (logs in $work).
  broker   127.0.0.1:$BROKER_PORT    registry http://127.0.0.1:$REGISTRY_PORT    API $api
Try:
  curl -s $api/projections
  curl -s $api/projections/order_summary/state/order-000042
  curl -s $api/metrics | grep ^projector_
Ctrl-C stops the demo.
MSG
deadline=$(( SECONDS + ${DEMO_SECONDS:-31536000} ))
while (( SECONDS < deadline )); do
  applied=$(curl -s "$api/projections/order_summary" | "$PROJECTOR_PYTHON" -c \
    'import json,sys; print(sum(json.load(sys.stdin)["offsets"].values()))' 2>/dev/null || echo "?")
  printf '\r  order_summary: %s events applied ' "$applied"
  sleep 1
done
echo
