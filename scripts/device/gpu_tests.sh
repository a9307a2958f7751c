#!/usr/bin/env bash
# Device side (GPU): every GPU kernel test (marker `gpu`, not the engine tests) as N pytest processes sharing the one
# GPU (TQ_TEST_SHARD, tests/conftest.py: the tests spend their time compiling kernels, one CPU core each), all under
# the time left of a budget. No stage needed: the machine's torch and triton are enough.
#
#     PYTHONPATH=$PWD bash scripts/device/gpu_tests.sh [shards (8)] [pytest -k expression]
#     TQ_BUDGET_S=540 PYTHONPATH=$PWD bash scripts/device/gpu_tests.sh 8 "sweep"
#
# On 2026-11-29 the 35 fast GPU tests took 356 s in one process on a cold cache and the 24 sweep cases more than
# 330 s (18 ran): one process each is more than a call. $OUT: summary.txt (one line per test, then the failures'
# assertion lines) and logs.tar.gz (each shard's full log).
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
source scripts/device/lib.sh
N=${1:-8}
K=${2:-}
tq_init gpu_tests "${TQ_BUDGET_S:-540}"
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} ;; esac
export PYTHONHASHSEED=${PYTHONHASHSEED:-0}
FILES=(tests/test_kernels.py tests/test_kernels_prefill.py tests/test_kernels_compile.py tests/test_kernels_lut.py
       tests/test_slot_table.py tests/test_connector_units.py)
rm -f "$TQ_LOGS"/gpu_tests_*.log  # a second run on the same machine must not count the first one's shards
left=$(tq_left)
tq_note ">>> $N shards, ${left} s, -k '${K:-<all>}'"
for i in $(seq 0 $((N - 1))); do
  ( TQ_TEST_SHARD=$i/$N timeout "$left" "$TQ_PY" -m pytest "${FILES[@]}" -m gpu -v -p no:cacheprovider \
      ${K:+-k "$K"} > "$TQ_LOGS/gpu_tests_$i.log" 2>&1
    echo "shard $i rc=$?" >> "$TQ_LOGS/gpu_tests_$i.log" ) &
done
wait
res=$(cat "$TQ_LOGS"/gpu_tests_*.log | grep -E "^tests/.*::.* (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)" \
      | sed -E 's/ +\[ *[0-9]+%\]$//; s/ (SKIPPED|XFAIL|XPASS) \(.*$/ \1/' | sort)
echo "$res" | sed 's/^/      /' | tee -a "$TQ_SUMMARY"
for s in PASSED FAILED ERROR SKIPPED; do printf '%s %s  ' "$s" "$(echo "$res" | grep -c " $s$")"; done \
  | tee -a "$TQ_SUMMARY"; echo | tee -a "$TQ_SUMMARY"
grep -h "rc=" "$TQ_LOGS"/gpu_tests_*.log | tr '\n' ' ' | tee -a "$TQ_SUMMARY"; echo | tee -a "$TQ_SUMMARY"
grep -h -E "^E +(Assertion|assert)|^FAILED|^ERROR" "$TQ_LOGS"/gpu_tests_*.log | cut -c1-300 | head -40 \
  | tee -a "$TQ_SUMMARY"
tq_note "== gpu_tests done in $(( $(date +%s) - TQ_T0 )) s"
cp "$TQ_SUMMARY" "$TQ_LOGS/" 2>/dev/null
tq_bundle
exit 0
