#!/usr/bin/env bash
# Set-up on a fresh machine: creates .venv/ in the project root and installs cxr-fast into it. Safe to re-run.
#
# GPU nodes: if the Python that runs this (PYTHON, default python3) already has a CUDA build of torch, the venv is
# made with --system-site-packages and that torch is used as it is; nothing here replaces it. Elsewhere the CPU-tested
# pair in requirements/torch-cpu.txt is installed. CXR_FAST_SYSTEM_TORCH=1 forces reuse of the base torch. NVIDIA DALI
# is installed last, as the build that matches torch's CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  if [ "${CXR_FAST_SYSTEM_TORCH:-0}" = 1 ] || \
     "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "setup: reusing the base environment's torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
.venv/bin/python -m pip install -q --upgrade pip

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing torch (requirements/torch-cpu.txt)"
  .venv/bin/python -m pip install -q -r requirements/torch-cpu.txt
elif ! .venv/bin/python -c "import torchvision" >/dev/null 2>&1; then
  echo "setup: torch $(.venv/bin/python -c 'import torch; print(torch.__version__)') is present but torchvision" \
       "is not; install the torchvision release built for it (see pytorch.org), then re-run." >&2
  exit 1
fi
.venv/bin/python -m pip install -q -e ".[dev]"

# DALI: the build for the CUDA major version torch was built with (12 or 13; a CPU-only torch gets the CUDA 12 build,
# whose CPU operators need no GPU), and never two builds in one environment.
CUDA_MAJOR=$(.venv/bin/python -c "import torch; print((torch.version.cuda or '12').split('.')[0])")
case "$CUDA_MAJOR" in
  13) DALI=nvidia-dali-cuda130 ;;
  *) DALI=nvidia-dali-cuda120 ;;
esac
for other in $(.venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -o '^nvidia-dali-cuda[0-9]*' || true); do
  [ "$other" != "$DALI" ] && .venv/bin/python -m pip uninstall -q -y "$other"
done
.venv/bin/python -m pip install -q "$DALI>=1.40"
echo "setup: done ($DALI for CUDA $CUDA_MAJOR); the CLI is .venv/bin/cxr-fast"
