#!/usr/bin/env bash
# The user's path on the GPU with the real SmolLM2-135M-Instruct model, most important results first. Run it on
# the device after the stage and setup.sh (which export TQ_MODEL / TQ_TEXT):
#
#     source .stage/bin/stage.sh && source scripts/device/setup.sh && bash scripts/device/user_path.sh [STEP ...]
#
# STEPs (default: all, in this order; each under its own timeout, cut to the time left of TQ_BUDGET_S, default
# 480 s, so the whole call stays inside the device's 600 s per command with setup included):
#   examples   examples/offline_minimal.py, offline_connector.py (CPU + disk tier), offline_long_context.py
#              (6K-token needle), each with --model $TQ_MODEL --eager          -> $OUT/examples_*.log
#   check      tq-vllm check recipes/*.yaml (vLLM 0.26's own parser) and tq-vllm store verify of the disk tier
#   ppl        tq-vllm eval ppl --engine vllm: bf16, tq4, tq3 (our backend); 6 windows x 2048 tokens of the
#              Wikipedia sample, 128-token prefill chunks                      -> $OUT/quality_gpu.jsonl
#   niah       tq-vllm eval niah: bf16 (the baseline: vLLM's own attention), tq4, tq3 at 2048 / 4096 / 7168
#              tokens, depths 0.1/0.5/0.9                                      -> $OUT/niah_gpu.jsonl
#   ppl_vllm   the same perplexity with vLLM's own kv_cache_dtype: bf16, fp8, turboquant_4bit_nc,
#              turboquant_3bit_nc (vLLM's TurboQuant Triton kernels compile for minutes on a cold machine: last)
#                                                                              -> $OUT/quality_gpu.jsonl
# $OUT gets: summary.txt (steps, times, key lines), examples_{minimal,connector,long_context}.log,
# quality_gpu.jsonl, niah_gpu.jsonl, logs.tar.gz (every log, setup's included). Without TQ_MODEL (the model parts
# did not all arrive) the examples run on a random-weight tiny Llama (--tiny) and the quality steps are skipped.
# Knobs: TQ_BUDGET_S, TQ_PPL_WINDOWS (6), TQ_PPL_TOKENS (2048), TQ_PPL_CHUNK (128), TQ_NIAH_CONTEXTS
# ("2048 4096 7168"), TQ_EXAMPLE_ARGS (extra arguments for every example, e.g. "--max-tokens 16").
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
source scripts/device/lib.sh
tq_init user_path "${TQ_BUDGET_S:-480}"
STEPS=("$@")
[ ${#STEPS[@]} = 0 ] && STEPS=(examples check ppl niah ppl_vllm)
PY=$TQ_PY
TQV=("$PY" -m tq_vllm.cli)  # `tq-vllm`, whether or not its console script is on PATH

MODEL=${TQ_MODEL:-}
TEXT=${TQ_TEXT:-}
if [ -z "$MODEL" ]; then  # setup.sh not sourced in this shell: whatever the cache already holds (offline)
  MODEL=$(PIP_NO_INDEX=1 timeout 300 "$PY" -c "from tq_vllm import assets; print(assets.fetch_smollm2())" \
            2>>"$TQ_LOGS/user_path_model.log" | tail -1)
  [ -f "$MODEL/config.json" ] || MODEL=
fi
if [ -n "$MODEL" ] && [ -z "$TEXT" ]; then
  TEXT=$(PIP_NO_INDEX=1 timeout 120 "$PY" -c "from tq_vllm import assets; print(assets.fetch_wikipedia())" \
           2>>"$TQ_LOGS/user_path_model.log" | tail -1)
  [ -f "$TEXT" ] || TEXT=
fi
if [ -n "$MODEL" ]; then
  MODEL_ARGS=(--model "$MODEL")
  tq_note "model: $MODEL; text: ${TEXT:-none}"
else
  MODEL_ARGS=(--tiny)
  tq_note "NO REAL MODEL (the .stage/m* parts did not all arrive?): examples on --tiny, quality steps skipped"
fi
read -r -a EXTRA <<< "${TQ_EXAMPLE_ARGS:-}"
META=(device="$TQ_DEVICE" vllm="$TQ_VLLM_VERSION")

keylines() {  # the lines of an example's log that say what happened
  grep -E "^'|^document|^connector totals|^disk tier|^KV cache|^prompt |^answer|^Traceback|Error" "$1" \
    | grep -v -E "^\(|INFO|WARNING" | head -12 | cut -c1-240 | sed 's/^/      /' | tee -a "$TQ_SUMMARY"
}

for step in "${STEPS[@]}"; do
  case $step in
  examples)
    tq_step ex_minimal "${TQ_T_EXAMPLE:-150}" "$OUT/examples_minimal.log" \
      "$PY" examples/offline_minimal.py "${MODEL_ARGS[@]}" --eager "${EXTRA[@]}"
    keylines "$OUT/examples_minimal.log"
    rm -rf /tmp/tqkv_example
    tq_step ex_connector "${TQ_T_EXAMPLE:-180}" "$OUT/examples_connector.log" \
      "$PY" examples/offline_connector.py "${MODEL_ARGS[@]}" --eager --disk-dir /tmp/tqkv_example "${EXTRA[@]}"
    keylines "$OUT/examples_connector.log"
    tq_step ex_long_context "${TQ_T_EXAMPLE:-180}" "$OUT/examples_long_context.log" \
      "$PY" examples/offline_long_context.py "${MODEL_ARGS[@]}" --eager ${TQ_LONG_CONTEXT:+--context $TQ_LONG_CONTEXT} "${EXTRA[@]}"
    keylines "$OUT/examples_long_context.log"
    ;;
  check)
    tq_step check_recipes 120 "$TQ_LOGS/check_recipes.log" "${TQV[@]}" check recipes/*.yaml
    grep -E "^tq-vllm check|^OK|^FAIL|^ERROR|error" "$TQ_LOGS/check_recipes.log" | grep -v -E "^\(|INFO" \
      | head -20 | cut -c1-200 | sed 's/^/      /' | tee -a "$TQ_SUMMARY"
    if [ -d /tmp/tqkv_example ]; then
      tq_step store_verify 60 "$TQ_LOGS/store_verify.log" "${TQV[@]}" store verify /tmp/tqkv_example
      tail -3 "$TQ_LOGS/store_verify.log" | cut -c1-200 | sed 's/^/      /' | tee -a "$TQ_SUMMARY"
    fi
    ;;
  ppl|ppl_vllm)
    if [ -z "$MODEL" ] || [ -z "$TEXT" ]; then tq_note "SKIP  $step: no model/text"; continue; fi
    if [ "$step" = ppl ]; then SPECS=(--preset tq4 --preset tq3); T=${TQ_T_PPL:-300}
    else SPECS=(--preset fp8 --preset turboquant_4bit_nc --preset turboquant_3bit_nc); T=${TQ_T_PPL_VLLM:-420}; fi
    tq_step "$step" "$T" "$TQ_LOGS/$step.log" "${TQV[@]}" eval ppl --engine vllm --model "$MODEL" --text "$TEXT" \
      "${SPECS[@]}" --tokens "${TQ_PPL_TOKENS:-2048}" --windows "${TQ_PPL_WINDOWS:-6}" \
      --chunk "${TQ_PPL_CHUNK:-128}" --json --no-progress
    "$PY" scripts/device/jsonl.py "$TQ_LOGS/$step.log" "$OUT/quality_gpu.jsonl" "${META[@]}" step="$step" \
      | tee -a "$TQ_SUMMARY"
    ;;
  niah)
    if [ -z "$MODEL" ] || [ -z "$TEXT" ]; then tq_note "SKIP  niah: no model/text"; continue; fi
    read -r -a CTX <<< "${TQ_NIAH_CONTEXTS:-2048 4096 7168}"
    tq_step niah "${TQ_T_NIAH:-240}" "$TQ_LOGS/niah.log" "${TQV[@]}" eval niah --model "$MODEL" --text "$TEXT" \
      --preset bf16 --preset tq4 --preset tq3 --context "${CTX[@]}" --json --no-progress
    "$PY" scripts/device/jsonl.py "$TQ_LOGS/niah.log" "$OUT/niah_gpu.jsonl" "${META[@]}" step=niah \
      | tee -a "$TQ_SUMMARY"
    ;;
  *)
    tq_note "unknown step $step (examples check ppl niah ppl_vllm)"
    ;;
  esac
done
tq_note "== user_path done in $(( $(date +%s) - TQ_T0 )) s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cp "$TQ_SUMMARY" "$TQ_LOGS/" 2>/dev/null
tq_bundle
exit 0
