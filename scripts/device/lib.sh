# Shared helpers of the device scripts (sourced by user_path.sh and bench.sh). Fire-and-forget: every step has its
# own timeout, shrunk to what is left of the script's budget; a step that fails or times out is logged and the
# script goes on; a step that no longer fits is skipped (and says so). Everything ends up under $OUT, which the
# device tool brings back (at most 8 files there: keep it so): summary.txt, the files the script names, and
# logs.tar.gz with every full log (refreshed after each step, so a killed run still brings back what it did).
#
#   tq_init NAME BUDGET_S       start the clock; OUT defaults to /tmp/tq_out/NAME when unset (runs here). The budget
#                               is cut to end TQ_CALL_LIMIT_S (570) after TQ_CALL_T0 (set by setup.sh at its start),
#                               so that set-up + script stay inside the device's 600 s per command
#   tq_step NAME TIMEOUT LOG CMD...   run CMD with stdout+stderr to LOG under min(TIMEOUT, time left)
#   tq_note TEXT                a line in summary.txt (and stdout)
#   tq_bundle                   refresh $OUT/logs.tar.gz from $TQ_LOGS
tq_init() {
  TQ_NAME=$1
  TQ_BUDGET=${2:-480}
  TQ_T0=$(date +%s)
  if [ -n "${TQ_CALL_T0:-}" ]; then  # setup.sh ran earlier in this device call: stay inside the call's limit too
    local call_left=$(( TQ_CALL_T0 + ${TQ_CALL_LIMIT_S:-570} - TQ_T0 ))
    [ "$call_left" -lt "$TQ_BUDGET" ] && TQ_BUDGET=$call_left
  fi
  export OUT=${OUT:-/tmp/tq_out/$TQ_NAME}
  export TQ_LOGS=${TQ_LOGS:-/tmp/tq_logs}
  export PYTHONUNBUFFERED=1
  mkdir -p "$OUT" "$TQ_LOGS"
  TQ_SUMMARY=$OUT/summary.txt
  TQ_PY=${TQ_PYTHON:-python3}
  TQ_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
  TQ_DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
  TQ_DEVICE=${TQ_DEVICE:-cpu}
  tq_note "== $TQ_NAME: $(date -u +%FT%TZ), budget ${TQ_BUDGET} s, device: $TQ_DEVICE"
  tq_note "   $("$TQ_PY" - 2>&1 <<'EOF' | tail -1
import importlib.metadata as m, importlib.util as u  # versions without importing anything heavy
v = {}
for name in ("torch", "triton", "transformers", "vllm", "gguf"):
    try:
        v[name] = m.version(name)
    except Exception as e:  # noqa: BLE001
        v[name] = f"missing ({type(e).__name__})"
spec = u.find_spec("tq_vllm")
v["tq_vllm"] = spec.submodule_search_locations[0] if spec else "missing"
print(", ".join(f"{k} {x}" for k, x in v.items()))
EOF
)"
  TQ_VLLM_VERSION=$("$TQ_PY" -c "import importlib.metadata as m; print(m.version('vllm'))" 2>/dev/null || echo none)
}

tq_note() {
  echo "$*" | tee -a "$TQ_SUMMARY"
}

tq_left() {
  echo $(( TQ_T0 + TQ_BUDGET - $(date +%s) ))
}

tq_bundle() {
  tar czf "$OUT/logs.tar.gz.tmp" -C "$TQ_LOGS" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

# tq_step NAME TIMEOUT LOG CMD... -> CMD's exit code (124/137: timed out; 200: skipped for lack of time)
tq_step() {
  local name=$1 t=$2 log=$3
  shift 3
  local left
  left=$(tq_left)
  if [ "$left" -lt "${TQ_MIN_STEP_S:-30}" ]; then
    tq_note "SKIP  $name: only ${left} s left of the ${TQ_BUDGET} s budget"
    return 200
  fi
  [ "$t" -gt "$left" ] && t=$left
  echo "---- $(date -u +%T) $name (timeout ${t} s): $*" | tee -a "$log" >/dev/null
  echo ">>> $name (timeout ${t} s, ${left} s left)"
  local s0 rc
  s0=$(date +%s)
  timeout -k 15 "$t" "$@" >>"$log" 2>&1 &
  local pid=$!
  wait "$pid"
  rc=$?
  # `timeout` leads its own process group: whatever the step left behind (an engine process orphaned by a
  # failed run, holding GPU memory) goes with it
  kill -KILL -- "-$pid" 2>/dev/null
  local dt=$(( $(date +%s) - s0 )) what=ok
  [ "$rc" != 0 ] && what="FAILED rc=$rc"
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && what="TIMED OUT after ${t} s"
  tq_note "$(printf '%-5s %-22s %4d s  %s' "$([ "$rc" = 0 ] && echo OK || echo FAIL)" "$name" "$dt" "$what; log $(basename "$log")")"
  if [ "$rc" != 0 ]; then  # the end of the log, for the output tail and the summary
    grep -v -E '^\s*$|^\(|INFO|WARNING|it/s\]|^----' "$log" | tail -4 \
      | sed 's/^/      | /' | cut -c1-300 | tee -a "$TQ_SUMMARY"
  fi
  # GPU memory of a killed engine comes back when its processes are gone
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && sleep "${TQ_KILL_GRACE_S:-3}"
  cp "$log" "$TQ_LOGS/" 2>/dev/null
  tq_bundle
  return $rc
}
