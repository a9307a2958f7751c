#!/usr/bin/env bash
# Device side (GPU), after `source .stage/bin/stage.sh`: kernel correctness on the GPU, then the decode benchmark
# with the launch variants timed first on the same inputs. Everything lands in $OUT. Usage:
#   bash scripts/device/kernels.sh [seconds for the tests] [seconds for the benchmark]
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T_TEST=${1:-150}; T_BENCH=${2:-330}
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/pyt:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "$T_TEST" python3 -m pytest tests/test_kernels.py tests/test_kernels_lut.py -m "gpu and not slow" -x -q \
  -p no:cacheprovider -p no:timeout > "$OUT/kernel_tests.log" 2>&1; echo "kernel tests rc=$?" | tee -a "$OUT/kernel_tests.log"
tail -5 "$OUT/kernel_tests.log"
# launch variants timed first on the same inputs (round 2 of 2026-11-26: occupancy vs spills around the default
# 4 warps / 3 stages / 168 registers); --pick runs the grid with the fastest at 32 x 32K
VARIANTS=${VARIANTS:-"r168s3:DECODE_CFG=4/3 DECODE_MAXNREG=168;r128s2:DECODE_CFG=4/2 DECODE_MAXNREG=128;\
r168s2:DECODE_CFG=4/2 DECODE_MAXNREG=168;r128s3t64:DECODE_CFG=4/3 DECODE_MAXNREG=128 DECODE_TILE=64"}
PVARIANTS=${PVARIANTS:-"p64w4:PREFILL_CFG=4/1 PREFILL_ROWS=64;p32w4:PREFILL_CFG=4/1 PREFILL_ROWS=32"}
timeout "$T_BENCH" python3 benchmarks/bench_decode.py --out "$OUT" --block-size 32 --variants "$VARIANTS" \
  --prefill-variants "$PVARIANTS" --pick ${BENCH_ARGS:---vllm-tq-quick} > "$OUT/bench_decode.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench_decode.log"
grep -v "^variant {" "$OUT/bench_decode.log" | tail -70
