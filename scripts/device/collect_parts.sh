#!/usr/bin/env bash
# Device side of pack_model.sh: run (or source) it from the repo root in every call that carries a .stage/mK
# folder. Each call copies the parts it was carried into $TQ_PARTS_DIR (default /tmp/tq_parts, which outlives
# the call while the machine stays warm), and once all parts named in model.nparts are there it checks their
# sha256, joins them, unpacks the GGUF and the Wikipedia dump into $TQ_VLLM_CACHE/downloads (default
# /tmp/tq_cache/downloads), where tq_vllm.assets finds them without any network. Idempotent; never fails the
# caller: it prints what it has and returns 0 (the status is in $TQ_PARTS_DIR/model.done or model.failed).
_tq_collect() {
  local P=${TQ_PARTS_DIR:-/tmp/tq_parts}
  local C=${TQ_VLLM_CACHE:-/tmp/tq_cache}
  mkdir -p "$P" "$C/downloads"
  local f b n have
  shopt -s nullglob
  for f in .stage/m[0-9]*/*; do
    b=$(basename "$f")
    [ -f "$P/$b" ] && [ "$b" != model.sha256 ] && [ "$b" != model.nparts ] && continue
    cp "$f" "$P/$b.tmp" && mv "$P/$b.tmp" "$P/$b"
  done
  if [ -f "$P/model.done" ]; then
    echo "collect_parts: model assets already unpacked in $C/downloads"
    shopt -u nullglob
    return 0
  fi
  if [ ! -f "$P/model.nparts" ]; then
    echo "collect_parts: no model parts carried yet (.stage/m*)"
    shopt -u nullglob
    return 0
  fi
  n=$(cat "$P/model.nparts")
  local parts=("$P"/model.tar.xz.part-[0-9][0-9])
  have=${#parts[@]}
  if [ "$have" -lt "$n" ]; then
    echo "collect_parts: have $have of $n model parts: waiting for more"
    shopt -u nullglob
    return 0
  fi
  shopt -u nullglob
  if ! (cd "$P" && grep 'part-' model.sha256 | sha256sum -c --quiet); then
    echo "collect_parts: CHECKSUM FAILED for a model part (re-carry it)" >&2
    (cd "$P" && grep 'part-' model.sha256 | sha256sum -c 2>&1 | grep -v ': OK$') >&2
    touch "$P/model.failed"
    return 0
  fi
  cat "${parts[@]}" > "$P/model.tar.xz"
  if ! (cd "$P" && grep ' model.tar.xz$' model.sha256 | sha256sum -c --quiet); then
    echo "collect_parts: CHECKSUM FAILED for the joined archive" >&2
    touch "$P/model.failed"
    return 0
  fi
  if xz -dc "$P/model.tar.xz" | tar x -C "$C/downloads"; then
    rm -f "$P/model.tar.xz" "$P/model.failed"
    touch "$P/model.done"
    echo "collect_parts: unpacked into $C/downloads: $(cd "$C/downloads" && ls | tr '\n' ' ')"
  else
    echo "collect_parts: unpacking failed" >&2
    touch "$P/model.failed"
  fi
  return 0
}
_tq_collect
