#!/usr/bin/env bash
# Pack the real model (SmolLM2-135M-Instruct GGUF) and the Wikipedia sample so that they ride along with the
# vLLM staging calls to the lent GPU machine (scripts/device/README.md). Run it HERE, from the repo root, after
# `bash ../shared/device/make_stage.sh` (which rebuilds .stage/ and so deletes the folders written here):
#
#     bash scripts/device/pack_model.sh           # build .stage/m1 .. .stage/mN, .whl/gguf-*.whl, print the plan
#     bash scripts/device/pack_model.sh --check   # only recompute and print the plan for what is there now
#
# What it does
#   1. fetches the checked GGUF (98 MB, tq_vllm.assets.fetch_smollm2_gguf) and the Wikipedia dump (1.7 MB,
#      fetch_wikipedia_dump) into tq_vllm's cache (PyPI only), tars both and compresses them with xz (~92 MB;
#      cached in $TQ_STAGE_CACHE/model, default ~/.cache/tq-stage/model);
#   2. splits that archive into parts sized to the room each device call has left under the 64 MiB carry limit
#      (working tree + carried paths, minus a safety margin): .stage/m1 rides with .stage/p1, m2 with p2, m3 with
#      p3 (+ .whl), and m4.. each make an extra call (each such call <= TQ_PACK_EXTRA_MAX bytes in all);
#      every mK folder holds its part plus model.nparts and model.sha256 (all parts and the whole archive);
#   3. downloads the pure-python `gguf` wheel (the one thing the device's transformers 5.17 lacks to read GGUF;
#      numpy, pyyaml, requests, tqdm, tokenizers and accelerate are in the device image) into the ignored .whl/;
#   4. prints the carry plan: which folders go with which call, and each call's size against the limit.
# On the device, scripts/device/setup.sh (via collect_parts.sh) joins the parts once all have arrived.
#
# Knobs: TQ_PACK_MARGIN (bytes kept free in every call, default 786432 = 768 KiB: the tree may grow a little
# between packing and the session), TQ_PACK_EXTRA_MAX (the most an extra call carries in all, default 60000000),
# TQ_STAGE_CACHE, PYTHON (default .venv/bin/python, else python3).
set -euo pipefail
ROOT=$(git rev-parse --show-toplevel)
cd "$ROOT"
CHECK_ONLY=0
[ "${1:-}" = "--check" ] && CHECK_ONLY=1
PY=${PYTHON:-}
if [ -z "$PY" ]; then if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi; fi
LIMIT=67108864                                # 64 MiB per call: working tree + carried paths
MARGIN=${TQ_PACK_MARGIN:-786432}
EXTRA_MAX=${TQ_PACK_EXTRA_MAX:-60000000}
GGUF_WHEEL_REQ=${TQ_GGUF_WHEEL:-gguf==0.19.0}
CACHE=${TQ_STAGE_CACHE:-$HOME/.cache/tq-stage}/model

for d in .stage/p1 .stage/p2 .stage/p3 .stage/bin; do
  [ -d "$d" ] || { echo "pack_model: $d is missing: run \`bash ../shared/device/make_stage.sh\` first" >&2; exit 1; }
done
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.stage/' .git/info/exclude 2>/dev/null || grep -qx '/.stage/' .gitignore || echo '/.stage/' >> .git/info/exclude

if [ "$CHECK_ONLY" = 0 ]; then
  # ---- the gguf wheel (pure python; its requirements numpy/pyyaml/requests/tqdm are in the device image)
  mkdir -p .whl
  if ! ls .whl/gguf-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$GGUF_WHEEL_REQ"
  fi
  [ "$(ls .whl/gguf-*.whl | wc -l)" = 1 ] || { echo "pack_model: keep exactly one gguf wheel in .whl/" >&2; exit 1; }

  # ---- the assets (checked against the sha256 in tq_vllm/assets.py) and the compressed archive
  mapfile -t ASSETS < <("$PY" -c "
from tq_vllm import assets
print(assets.fetch_smollm2_gguf()); print(assets.fetch_wikipedia_dump())
print(assets.SMOLLM2_GGUF_SHA256 + assets.WIKI_DUMP_SHA256)")
  KEY=$(printf '%s' "${ASSETS[2]}" | sha256sum | cut -c1-16)
  mkdir -p "$CACHE"
  BLOB=$CACHE/model-$KEY.tar.xz
  if [ ! -s "$BLOB" ]; then
    echo "pack_model: compressing the GGUF and the Wikipedia dump (xz -6, ~30 s)"
    rm -f "$CACHE"/model-*.tar.xz
    tar cf - --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$(dirname "${ASSETS[0]}")" \
        "$(basename "${ASSETS[0]}")" "$(basename "${ASSETS[1]}")" | xz -6 -T0 > "$BLOB.tmp"
    mv "$BLOB.tmp" "$BLOB"
  fi

  # ---- split into the room of each call
  rm -rf .stage/m[0-9]*
  "$PY" - "$BLOB" "$LIMIT" "$MARGIN" "$EXTRA_MAX" <<'EOF'
import hashlib, os, sys
blob, limit, margin, extra_max = sys.argv[1], *map(int, sys.argv[2:])
sys.path.insert(0, "scripts/device")
from sizes import du, tree_bytes

tree = tree_bytes()
manifest_room = 4096  # model.nparts + model.sha256 in every folder
base = tree + du(".stage/bin") + margin + manifest_room
caps = [limit - base - du(".stage/p1"), limit - base - du(".stage/p2"),
        limit - base - du(".stage/p3") - du(".whl")]
size = os.path.getsize(blob)
parts, left = [], size
for i in range(64):
    cap = caps[i] if i < len(caps) else min(extra_max, limit - margin) - (base - margin)
    if cap <= 0:
        raise SystemExit(f"pack_model: no room in call {i + 1} (cap {cap}); free some space")
    take = min(cap, left)
    parts.append(take)
    left -= take
    if left == 0:
        break
n = len(parts)
hashes = []
with open(blob, "rb") as f:
    for i, take in enumerate(parts):
        d = f".stage/m{i + 1}"
        os.makedirs(d)
        data = f.read(take)
        name = f"model.tar.xz.part-{i:02d}"
        with open(os.path.join(d, name), "wb") as out:
            out.write(data)
        hashes.append((hashlib.sha256(data).hexdigest(), name))
h = hashlib.sha256()
with open(blob, "rb") as f:
    while b := f.read(1 << 20):
        h.update(b)
hashes.append((h.hexdigest(), "model.tar.xz"))
for i in range(n):
    d = f".stage/m{i + 1}"
    with open(os.path.join(d, "model.nparts"), "w") as f:
        f.write(str(n))
    with open(os.path.join(d, "model.sha256"), "w") as f:
        f.writelines(f"{hx}  {name}\n" for hx, name in hashes)
print(f"pack_model: {size:,} B archive -> {n} parts: " + ", ".join(f"m{i + 1} {p:,}" for i, p in enumerate(parts)))
EOF
fi

# ---- the plan (recomputed from what is on disk now)
"$PY" - "$LIMIT" <<'EOF'
import glob, os, sys
limit = int(sys.argv[1])
sys.path.insert(0, "scripts/device")
from sizes import du, tree_bytes

tree = tree_bytes()
ms = sorted(glob.glob(".stage/m[0-9]*"), key=lambda p: int(p.rsplit("m", 1)[1]))
if not ms:
    print("pack_model: no .stage/m* folders: run without --check to build them")
calls = [[".stage/p1", ".stage/bin"], [".stage/p2", ".stage/bin"], [".stage/p3", ".stage/bin", ".whl"]]
for i, m in enumerate(ms):
    if i < 3:
        calls[i].append(m)
    else:
        calls.append([m, ".stage/bin"])
cmds = ["bash .stage/bin/stage.sh; bash scripts/device/collect_parts.sh",
        "bash .stage/bin/stage.sh; bash scripts/device/collect_parts.sh",
        "source .stage/bin/stage.sh && source scripts/device/setup.sh"]
last = "source .stage/bin/stage.sh && source scripts/device/setup.sh && bash scripts/device/user_path.sh"
print(f"working tree that travels with every call (tracked + untracked-not-ignored): {tree:,} B")
print(f"carry plan (limit {limit:,} B per call):")
ok = True
for i, carry in enumerate(calls):
    total = tree + sum(du(p) for p in carry if os.path.exists(p))
    missing = [p for p in carry if not os.path.exists(p)]
    ok &= total <= limit and not missing
    cmd = cmds[i] if i < 3 else "source .stage/bin/stage.sh && source scripts/device/setup.sh"
    if i == len(calls) - 1:
        cmd = last
    print(f"  call {i + 1}: carry {carry}")
    print(f"          {total:,} B = {100 * total / limit:.1f} % of the limit, {limit - total:,} B free"
          + (f"  MISSING {missing}" if missing else "") + ("  OVER THE LIMIT" if total > limit else ""))
    print(f"          command: {cmd}")
print("plan OK" if ok else "plan NOT OK (see above)")
sys.exit(0 if ok else 1)
EOF
