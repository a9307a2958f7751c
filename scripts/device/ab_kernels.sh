#!/usr/bin/env bash
# Device side (GPU), after `source .stage/bin/stage.sh`: the kernel benchmarks of two trees in one call, for a
# change that no environment knob can switch (a page-format change): decode variants (tq4, tq3 at 32 x 32K,
# 8 x 8K, 1 x 1K), the FlashAttention prefill path (2K chunk over 32K) and the store cases, old tree first. Here:
#   mkdir -p .tmp/ab/old && git archive REF tq_vllm | tar -x -C .tmp/ab/old      # then carry .tmp/ab
# There:
#   bash scripts/device/ab_kernels.sh .tmp/ab/old [seconds per benchmark]
# Both trees run this tree's benchmark scripts (copied next to the old package, since they import the package
# beside them). Rows land in $OUT/{old,new}/variants.jsonl and $OUT/store_{old,new}.jsonl; the tables print.
set -u
OLD=${1:?usage: ab_kernels.sh OLD_TREE [seconds per benchmark]}
T=${2:-200}
NEW=$PWD
OLD=$(cd "$OLD" && pwd) || exit 2
if [ "$OLD" = "$NEW" ] || [ ! -d "$OLD/tq_vllm" ]; then
  echo "ab_kernels.sh: $OLD must be another tree holding tq_vllm/ (its benchmarks/ and tests/ are replaced)" >&2
  exit 2
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/pyt .whl/*.whl >/dev/null 2>&1
VARIANTS=${VARIANTS:-"default:"}
rm -rf "$OLD/benchmarks" "$OLD/tests" && cp -r benchmarks tests "$OLD/"
for side in old new; do
  if [ "$side" = old ]; then tree=$OLD; else tree=$NEW; fi
  cd "$tree" || exit 1
  python3 -c "import tq_vllm.quant.layout as m; print('== $side:', m.__file__, 'layout', m.LAYOUT_VERSION)"
  timeout "$T" python3 benchmarks/bench_decode.py --out "$OUT/$side" --block-size 32 --variants "$VARIANTS" \
    --variant-presets tq4,tq3 --prefill-variants "fa:PREFILL=fa" --variants-only > "$OUT/decode_$side.log" 2>&1
  echo "decode rc=$?"
  grep -v "^variant {" "$OUT/decode_$side.log" | tail -8
  timeout "$T" python3 benchmarks/bench_store.py --preset tq4 tq3 --out "$OUT/store_$side.jsonl" \
    > "$OUT/store_$side.log" 2>&1
  echo "store rc=$?"
  tail -8 "$OUT/store_$side.log"
done
cd "$NEW" || exit 1
