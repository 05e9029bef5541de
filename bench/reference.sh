#!/usr/bin/env bash
# sglmesh beside the reference (NVIDIA Dynamo, Rust frontend + mocker) on the shared anchor
# harness: both stacks in one run on this machine, each cell interleaved (reference rep 1,
# sglmesh rep 1, ...), round-robin and KV routing, N=1 (both connection modes, c=1/16/64) and
# N=4 (c=64). Prints the side-by-side table; JSON in bench/results/reference.json.
#   ANCHOR_DIR     the harness (default: ../shared/anchor beside the checkout)
#   DYNAMO_PYTHON  a Python with ai-dynamo 1.6.1 installed (see the harness's README)
#   CLIENT_PYTHON  a Python with aiohttp, tokenizers, orjson, uvloop (the load generator's)
#   REPEATS (3)    PHASES ("rr-main rr-n4 kv-main kv-n4")
#   SGLMESH_SIM_TIMESLICE_MS (0.5)  sglmesh's simulator runs sub-millisecond steps back to back
#                  for this long, so a stream item carries several tokens; 0 = one token per
#                  item, as the reference's mocker streams (the like-for-like cost per token)
#   RESULT (reference)  the JSON's name in bench/results/
#   CONNS, CONCURRENCY  only these cells of every phase (connection modes; c among 1, 16, 64),
#                  e.g. CONNS=per-request CONCURRENCY=64
#                  for a quick look at the closest cells, with a RESULT of its own so the
#                  full run's JSON stays (default: each phase's own cells)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ANCHOR="${ANCHOR_DIR:-$ROOT/../shared/anchor}"
if [ ! -f "$ANCHOR/driver.py" ] || [ -z "${DYNAMO_PYTHON:-}" ] || [ -z "${CLIENT_PYTHON:-}" ] \
   || ! "$DYNAMO_PYTHON" -c 'import dynamo.frontend, dynamo.mocker' 2>/dev/null; then
  cat >&2 <<MSG
bench-reference needs the anchor harness and an installed reference:
  ANCHOR_DIR=$ANCHOR (driver.py, loadgen.py, tiny-model/)
  python3 -m venv dynvenv && dynvenv/bin/pip install ai-dynamo-runtime==1.6.1
  dynvenv/bin/pip download --no-deps ai-dynamo==1.6.1 -d wheels && dynvenv/bin/pip install --no-deps wheels/ai_dynamo-1.6.1-*.whl
  (then the other dependencies the harness's README lists), and a client venv:
  python3 -m venv clientvenv && clientvenv/bin/pip install aiohttp tokenizers orjson uvloop
  make bench-reference DYNAMO_PYTHON=dynvenv/bin/python CLIENT_PYTHON=clientvenv/bin/python
MSG
  exit 2
fi
MODEL_DIR="$ANCHOR/tiny-model"
RUN_DIR="$(mktemp -d -t sglmesh-reference-XXXXXX)"
trap 'rm -rf "$RUN_DIR"' EXIT
# The harness's load generator leaves a temp JSON per run: keep them in the run directory.
export TMPDIR="$RUN_DIR"
RESULT="${RESULT:-reference}"
OUT="$ROOT/bench/results/$RESULT.jsonl"
export SGLMESH_SIM_TIMESLICE_MS="${SGLMESH_SIM_TIMESLICE_MS:-0.5}"
: > "$OUT"
export MODEL_DIR DYNAMO_PYTHON CLIENT_PYTHON
export SGLMESH_BIN="$ROOT/.venv/bin/sglmesh" ETCD_BIN="$ROOT/.venv/bin/etcd" NATS_BIN="$ROOT/.venv/bin/nats-server"
# The harness's processor command line names no --model-root; the tiny model lives beside it.
export SGLMESH_MODEL_ROOT="$ANCHOR"
REPEATS="${REPEATS:-3}"
DRIVER=(python3 "$ANCHOR/driver.py" --results "$OUT" --run-dir "$RUN_DIR" --repeats "$REPEATS")
for phase in ${PHASES:-rr-main rr-n4 kv-main kv-n4}; do
  mode=round-robin; [ "${phase%%-*}" = kv ] && mode=kv
  case "${phase#*-}" in
    main) cells=(--workers 1 --conns per-request,keepalive --concurrency 1,16,64 --n 1:300,16:1000,64:1920) ;;
    n4)   cells=(--workers 4 --conns per-request,keepalive --concurrency 64 --n 1:300,16:1000,64:1920) ;;
    *) echo "unknown phase $phase" >&2; exit 2 ;;
  esac
  [ -n "${CONNS:-}" ] && cells+=(--conns "$CONNS")
  [ -n "${CONCURRENCY:-}" ] && cells+=(--concurrency "$CONCURRENCY")
  "${DRIVER[@]}" --tag "$phase" --dynamo-router-mode "$mode" --sglmesh-router-mode "$mode" "${cells[@]}"
done
"$ROOT/.venv/bin/python" "$ROOT/bench/reference_summary.py" "$OUT" --json "$ROOT/bench/results/$RESULT.json" \
  --sim-timeslice-ms "$SGLMESH_SIM_TIMESLICE_MS" --commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
