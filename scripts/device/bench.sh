#!/usr/bin/env bash
# GPU benchmarks with the dummy-weight Llama-3.1-8B shape (no model files needed), fire-and-forget. On the device,
# after the stage (setup.sh is optional here: it only adds the model; PYTHONPATH=$PWD is enough for these):
#
#     source .stage/bin/stage.sh && source scripts/device/setup.sh && bash scripts/device/bench.sh connector
#     source .stage/bin/stage.sh && source scripts/device/setup.sh && bash scripts/device/bench.sh e2e tq4 auto
#
#   connector     benchmarks/bench_connector.py: --part micro (pinned copy bandwidth + the connector's copy engine,
#                 ~15 s), then --part engine --eager (TTFT of 32K-token prompts recomputed vs loaded from the CPU
#                 tier; two engines, one after the other)                           -> $OUT/connector.jsonl
#   e2e [KV ...]  benchmarks/bench_e2e.py, one format per process and per timeout (default: tq4 auto), the anchor
#                 workload (64 x (8K + 256), one 32K request; CUDA graphs on)      -> $OUT/e2e.jsonl
# Both append rows in the format of benchmarks/results/*.jsonl: copy them there afterwards. $OUT also gets
# summary.txt and logs.tar.gz. Knobs: TQ_BUDGET_S (default 540), TQ_T_KV (per-format timeout, default 330),
# TQ_E2E_ARGS (extra bench_e2e arguments, e.g. "--quick"), TQ_CONN_REPS (default 2), TQ_CONN_ARGS.
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
source scripts/device/lib.sh
what=${1:-}
shift || true
tq_init "bench_$what" "${TQ_BUDGET_S:-540}"
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} ;; esac
export PYTHONHASHSEED=${PYTHONHASHSEED:-0} VLLM_NO_USAGE_STATS=1
PY=$TQ_PY
case $what in
connector)
  read -r -a CARGS <<< "${TQ_CONN_ARGS:-}"
  tq_step conn_micro "${TQ_T_MICRO:-90}" "$TQ_LOGS/connector_micro.log" \
    "$PY" benchmarks/bench_connector.py --part micro --out "$OUT/connector.jsonl" "${CARGS[@]}"
  grep '^\[bench_connector\]' "$TQ_LOGS/connector_micro.log" | cut -c1-220 | sed 's/^/      /' | tee -a "$TQ_SUMMARY"
  left=$(tq_left)
  tq_step conn_engine "${TQ_T_CONN_ENGINE:-420}" "$TQ_LOGS/connector_engine.log" \
    "$PY" benchmarks/bench_connector.py --part engine --eager --reps "${TQ_CONN_REPS:-2}" \
    --timeout $(( left > 60 ? (left - 20) / 2 : 30 )) --out "$OUT/connector.jsonl" "${CARGS[@]}"
  grep '^\[bench_connector\]' "$TQ_LOGS/connector_engine.log" | cut -c1-220 | sed 's/^/      /' | tee -a "$TQ_SUMMARY"
  ;;
e2e)
  KVS=("$@")
  [ ${#KVS[@]} = 0 ] && KVS=(tq4 auto)
  read -r -a EARGS <<< "${TQ_E2E_ARGS:-}"
  for kv in "${KVS[@]}"; do
    tq_step "e2e_$kv" "${TQ_T_KV:-330}" "$TQ_LOGS/e2e_$kv.log" \
      "$PY" benchmarks/bench_e2e.py --kv "$kv" --out "$OUT/e2e.jsonl" "${EARGS[@]}"
    grep '^RESULT' "$TQ_LOGS/e2e_$kv.log" | cut -c8- | "$PY" -c "
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    keys = [k for k in r if k.startswith(('kv_tokens', 'total_s', 'tpot_ms', 'prefill', 'ttft', 'engine_start'))]
    print('      ' + r['kv'] + ': ' + ', '.join(f'{k} {r[k]}' for k in keys))" | tee -a "$TQ_SUMMARY"
  done
  [ -f "$OUT/e2e.jsonl" ] && "$PY" benchmarks/bench_e2e.py --print --out "$OUT/e2e.jsonl" | tee -a "$TQ_SUMMARY"
  ;;
*)
  echo "usage: bash scripts/device/bench.sh connector | e2e [KV ...]" >&2
  exit 2
  ;;
esac
tq_note "== bench $what done in $(( $(date +%s) - TQ_T0 )) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cp "$TQ_SUMMARY" "$TQ_LOGS/" 2>/dev/null
tq_bundle
exit 0
