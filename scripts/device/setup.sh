# Device-side set-up of this repo, to be SOURCED from the repo root after the vLLM stage:
#
#     source .stage/bin/stage.sh && source scripts/device/setup.sh [&& bash scripts/device/user_path.sh]
#
# Idempotent and quick on a warm machine (every step leaves a marker in $TQ_SETUP_DIR, default /tmp/tq_setup).
# It never exits the calling shell; a step that fails is reported and the rest goes on. Steps:
#   1. environment: offline Hugging Face, TQ_VLLM_CACHE=/tmp/tq_cache (tq_vllm.assets' cache), logs in
#      $TQ_LOGS (/tmp/tq_logs);
#   2. the wheels of .whl/ (gguf; any other wheel only if the device lacks that package, unless TQ_WHL_FORCE=1)
#      with `pip install --no-index --no-deps --target $TQ_PYT` (/tmp/pyt), which goes on PYTHONPATH;
#   3. this package, unless vLLM already sees its entry point: `pip install --no-deps --no-build-isolation
#      --no-index -e .`; whatever happens, the repo
#      root goes on PYTHONPATH, and if vLLM still cannot see the `vllm.general_plugins` entry point (the pip step
#      failed) a metadata-only tq_vllm dist-info with that entry point is written into $TQ_PYT, so vLLM's
#      spawned engine processes load the plugin (attention_backend="CUSTOM") all the same;
#   4. scripts/device/collect_parts.sh: the model parts carried so far (.stage/m*), joined once all are there;
#   5. once they are: tq_vllm.assets.fetch_smollm2() converts the GGUF into the bf16 directory (seconds) and
#      fetch_wikipedia() builds the text sample, both offline; exports TQ_MODEL and TQ_TEXT.
_tq_setup() {
  local t0=$SECONDS
  export TQ_CALL_T0=${TQ_CALL_T0:-$(date +%s)}  # lib.sh keeps later scripts of this call inside its time limit
  export TQ_VLLM_CACHE=${TQ_VLLM_CACHE:-/tmp/tq_cache}
  export TQ_PYT=${TQ_PYT:-/tmp/pyt}
  export TQ_LOGS=${TQ_LOGS:-/tmp/tq_logs}
  export TQ_SETUP_DIR=${TQ_SETUP_DIR:-/tmp/tq_setup}
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
  export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TOKENIZERS_PARALLELISM=false
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  mkdir -p "$TQ_VLLM_CACHE" "$TQ_PYT" "$TQ_LOGS" "$TQ_SETUP_DIR"
  local LOG=$TQ_LOGS/setup.log
  _say() { echo "setup: $*" | tee -a "$LOG"; }
  _say "---- $(date -u +%FT%TZ) in $PWD"
  if [ ! -f pyproject.toml ] || [ ! -d tq_vllm ]; then
    _say "ERROR: not the repo root ($PWD)"
    return 1
  fi
  local PY=${TQ_PYTHON:-python3}
  case ":${PYTHONPATH:-}:" in *":$TQ_PYT:"*) ;; *) export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$TQ_PYT ;; esac
  case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH=$PWD:$PYTHONPATH ;; esac

  # ---- 2. wheels
  local w name todo=()
  shopt -s nullglob
  for w in .whl/*.whl; do
    name=$(basename "$w"); name=${name%%-*}
    if [ "${TQ_WHL_FORCE:-0}" != 1 ] && "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" \
         "$name" 2>/dev/null; then
      _say "wheel $(basename "$w"): skipped, the device has $name $("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")"
      continue
    fi
    todo+=("$w")
  done
  shopt -u nullglob
  if [ ${#todo[@]} -gt 0 ]; then
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
         --target "$TQ_PYT" "${todo[@]}" >>"$LOG" 2>&1; then
      _say "installed into $TQ_PYT: ${todo[*]}"
    else
      _say "pip install --target $TQ_PYT failed for ${todo[*]} (see $LOG): unzipping them there instead"
      for w in "${todo[@]}"; do "$PY" -m zipfile -e "$w" "$TQ_PYT" >>"$LOG" 2>&1 || _say "ERROR: could not unpack $w"; done
    fi
  fi

  # ---- 3. this package
  local ep_check='import importlib.metadata as m; print(any(e.name == "tq_vllm" for e in m.entry_points(group="vllm.general_plugins")))'
  if [ "$("$PY" -c "$ep_check" 2>/dev/null)" != True ]; then
    if timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$LOG" 2>&1; then
      echo "$PWD" > "$TQ_SETUP_DIR/pip_e.done"
      _say "pip install -e . done"
    else
      _say "pip install -e . FAILED (see $LOG); using PYTHONPATH=$PWD"
    fi
    if [ "$("$PY" -c "$ep_check" 2>/dev/null)" != True ]; then
      local di=$TQ_PYT/tq_vllm-0.1.0.dist-info
      mkdir -p "$di"
      printf 'Metadata-Version: 2.1\nName: tq-vllm\nVersion: 0.1.0\n' > "$di/METADATA"
      printf '[console_scripts]\ntq-vllm = tq_vllm.cli:main\n\n[vllm.general_plugins]\ntq_vllm = tq_vllm._vllm_plugin:register\n' \
        > "$di/entry_points.txt"
      printf 'tq_vllm\n' > "$di/top_level.txt"
      _say "wrote the entry-point shim $di"
    fi
  fi
  _say "tq_vllm: $("$PY" -c 'import tq_vllm, os; print(os.path.dirname(tq_vllm.__file__))' 2>&1 | tail -1);" \
       "vllm.general_plugins has tq_vllm: $("$PY" -c "$ep_check" 2>&1 | tail -1)"

  # ---- 4. model parts
  source scripts/device/collect_parts.sh 2>&1 | tee -a "$LOG"

  # ---- 5. the bf16 model directory and the text sample (offline)
  if [ -f "${TQ_PARTS_DIR:-/tmp/tq_parts}/model.done" ]; then
    local out
    out=$(PIP_NO_INDEX=1 timeout 240 "$PY" -c "
from tq_vllm import assets
print('TQ_MODEL=' + str(assets.fetch_smollm2()))
print('TQ_TEXT=' + str(assets.fetch_wikipedia()))" 2>>"$LOG")
    echo "$out" >> "$LOG"
    local m t
    m=$(echo "$out" | sed -n 's/^TQ_MODEL=//p'); t=$(echo "$out" | sed -n 's/^TQ_TEXT=//p')
    if [ -n "$m" ] && [ -f "$m/config.json" ]; then
      export TQ_MODEL=$m
      _say "model: TQ_MODEL=$TQ_MODEL"
    else
      _say "ERROR: the SmolLM2 conversion failed (see $LOG)"
      tail -5 "$LOG"
    fi
    if [ -n "$t" ] && [ -f "$t" ]; then
      export TQ_TEXT=$t
      _say "text: TQ_TEXT=$TQ_TEXT"
    else
      _say "ERROR: the Wikipedia sample failed (see $LOG)"
    fi
  else
    _say "model: not all parts here yet (no TQ_MODEL)"
  fi
  _say "done in $((SECONDS - t0)) s; PYTHONPATH=$PYTHONPATH"
  return 0
}
_tq_setup
