#!/usr/bin/env bash
# The GPU measurements (benchmarks/RESULTS.md, GPU sections) in two calls of at most 9 minutes each on one H100 or
# H200: tools/gpu_probe.py runs the parts of the call asked for, most valuable first, prints each part's GPU estimate
# before it runs and skips a part that no longer fits; it writes one JSON line per measurement to $OUT/gpu.jsonl as it
# goes and keeps its work files (images, shards, checkpoints, compile caches) in a temporary folder outside $OUT.
# $OUT/log.txt has the rest of the output (its last 200 kB).
#
#   OUT=/tmp/gpucheck bash tools/gpu_check.sh --rehearse            # on the CPU: tiny model, a few images, all parts
#   OUT=/tmp/gpucheck bash tools/gpu_check.sh --call 1              # on the GPU node: profile, fastnorm, 4 x 8, loader
#   OUT=/tmp/gpucheck bash tools/gpu_check.sh --call 2              # on the GPU node: recipe, real run
#   OUT=/tmp/gpucheck bash tools/gpu_check.sh --only profile        # chosen parts (an unknown name is an error)
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
SITE=$(mktemp -d /tmp/cxr-fast-site-XXXX)
trap 'tail -c 200000 "$SITE.log" > "$OUT/log.txt"; rm -rf "$SITE" "$SITE.log"' EXIT
if [ "${1:-}" = --rehearse ]; then
  [ -x .venv/bin/python ] && PY=.venv/bin/python
  export PYTHONPATH=$PWD
elif [ -f .whl/dali-sm90-bundle.tar.xz ]; then
  $PY -c "import sys, tarfile; tarfile.open('.whl/dali-sm90-bundle.tar.xz').extractall(sys.argv[1])" "$SITE"
  export PYTHONPATH=$SITE:$PWD
  $PY -c "import nvidia.dali" 2>/dev/null || touch "$SITE/nvidia/__init__.py"  # namespace clash fallback
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
  $PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
  $PY -c "import nvidia.dali as d; print('dali', d.__version__)" 2>&1 | tail -1
  $PY tools/gpu_probe.py --out "$OUT/gpu.jsonl" "$@"
} 2>&1 | tee "$SITE.log"
