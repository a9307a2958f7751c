#!/usr/bin/env bash
# Device side (GPU), after `source .stage/bin/stage.sh`: kernel correctness on the GPU, then the decode benchmark
# with the launch variants timed first on the same inputs (VARIANTS, PVARIANTS; STORE_VARIANTS adds bench_store.py).
# Everything lands in $OUT. Usage:
#   bash scripts/device/kernels.sh [seconds for the tests] [seconds for the benchmark]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T_TEST=${1:-150}; T_BENCH=${2:-330}
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/pyt:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "$T_TEST" python3 -m pytest tests/test_kernels_prefill.py tests/test_kernels.py tests/test_kernels_lut.py \
  -m "gpu and not slow" -x -q \
  -p no:cacheprovider -p no:timeout > "$OUT/kernel_tests.log" 2>&1; echo "kernel tests rc=$?" | tee -a "$OUT/kernel_tests.log"
tail -5 "$OUT/kernel_tests.log"
# launch variants timed first on the same inputs; --pick runs the grid with the fastest at 32 x 32K. Prefill:
# FlashAttention over dequantized pages vs the fused Triton kernel, and the workspace small enough for windows
VARIANTS=${VARIANTS:-"r128s2:DECODE_CFG=4/2 DECODE_MAXNREG=128"}
PVARIANTS=${PVARIANTS:-"fa:PREFILL=fa;triton:PREFILL=triton;fa_ws8k:PREFILL=fa PREFILL_WS_TOKENS=8192"}
timeout "$T_BENCH" python3 benchmarks/bench_decode.py --out "$OUT" --block-size 32 --variants "$VARIANTS" \
  --prefill-variants "$PVARIANTS" --pick ${BENCH_ARGS:---vllm-tq-quick} > "$OUT/bench_decode.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench_decode.log"
grep -v "^variant {" "$OUT/bench_decode.log" | tail -70
# store launch variants on the same inputs (bench_store.py), when asked: STORE_VARIANTS="new:;par16:STORE_PAR=1 ..."
if [ -n "${STORE_VARIANTS:-}" ]; then
  timeout "${T_STORE:-120}" python3 benchmarks/bench_store.py --preset tq4 tq3 --variants "$STORE_VARIANTS" \
    --out "$OUT/store.jsonl" > "$OUT/bench_store.log" 2>&1
  echo "store rc=$?" >> "$OUT/bench_store.log"
  tail -6 "$OUT/bench_store.log"
fi
