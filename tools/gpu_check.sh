#!/usr/bin/env bash
# The GPU measurements (benchmarks/RESULTS.md, GPU sections) in one run of under 9 minutes on one H100 or H200:
# tools/gpu_probe.py writes one JSON line per measurement to $OUT/gpu.jsonl as it goes, most valuable first
# (the 4 x 8 question, the kernel profile, the loader at the small side, the recipe, a real run); each compared
# setting runs in a process of its own. $OUT/log.txt has the rest of the output.
#
#   OUT=/tmp/gpucheck bash tools/gpu_check.sh --rehearse   # on the CPU: tiny model, a few images
#   OUT=/tmp/gpucheck bash tools/gpu_check.sh              # on the GPU node
#
# The node has torch, timm, OpenCV, pandas and the rest, but neither DALI nor webdataset: build their bundle first
# (`bash <shared>/gpu-node/build-dali-bundle.sh`, writes .whl/dali-sm90-bundle.tar.xz) and carry .whl with the run.
# Models start from random weights: the node is offline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpucheck}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=python3
if [ "${1:-}" = --rehearse ]; then
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  export PYTHONPATH=$PWD
elif [ -f .whl/dali-sm90-bundle.tar.xz ]; then
  $PY -c "import tarfile; tarfile.open('.whl/dali-sm90-bundle.tar.xz').extractall('/tmp/site')"
  export PYTHONPATH=/tmp/site:$PWD
  $PY -c "import nvidia.dali" 2>/dev/null || touch /tmp/site/nvidia/__init__.py  # namespace clash fallback
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import nvidia.dali as d, torch, timm; print('dali', d.__version__, 'torch', torch.__version__, 'timm', timm.__version__)"
  $PY tools/gpu_probe.py --out "$OUT/gpu.jsonl" --work "$OUT/work" "$@"
} 2>&1 | tee "$OUT/log.txt"
