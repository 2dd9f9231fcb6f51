#!/usr/bin/env bash
# The prepared GPU check for a lent machine (see the `device` tool's README): one short run, results under $OUT.
#
#   Rehearse on the CPU first:  OUT=/tmp/gpucheck bash tools/gpu_check.sh --rehearse
#
# What it measures (each step is skipped, not failed, where its requirement is missing):
#   1. ConvNeXt-Large at 512 training throughput, bf16, channels-last, synthetic on-device inputs: eager and compiled;
#      MFU from counted FLOPs (torch.utils.flop_counter) against the device peak; 1- vs 3-channel stem.
#   2. The torch DataLoader baseline with 16 workers on the real NIH sample shards (png and jpeg).
#   3. With DALI importable (carry wheels in .whl/, see the device README): the DALI GPU loader on the same shards,
#      and GPU-CLAHE fidelity (DALI GPU vs the OpenCV reference and vs the torch backend).
# torch and timm are on the device machine; the rest of the Python deps travel as wheels where missing.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpucheck}
mkdir -p "$OUT"
REHEARSE=${1:-}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
PY=${PY:-python3}
[ -x .venv/bin/python ] && [ "$REHEARSE" = --rehearse ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
run() { echo "== $*"; timeout 240 "$@" || echo "   (step failed or timed out: $?)"; }

if [ "$REHEARSE" = --rehearse ]; then MODEL=convnext_atto; SIZE=128; STEPS=2; else MODEL=convnext_large; SIZE=512; STEPS=20; fi
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

for compile in --no-compile --compile; do
  run $PY -m cxr_fast bench train --model $MODEL --image-size $SIZE --batch-size 32 --steps $STEPS --amp bf16 \
      $compile --json "$OUT/train${compile}.json"
done
run $PY -m cxr_fast bench train --model $MODEL --image-size $SIZE --batch-size 32 --steps $STEPS --amp bf16 \
    --in-chans 3 --json "$OUT/train-3ch.json"

# ../shared/data does not travel to the device machine (and is larger than one carry): use it where present,
# else 400 synthetic 1024 px images, which cost the same to decode and process.
DATA=../shared/data
if [ -d "$DATA/nih-sample/images" ]; then
  IMAGES=$DATA/nih-sample/images; LABELS=$DATA/meta/Data_Entry_2017_v2020.csv.gz
else
  $PY -m cxr_fast synth --out /tmp/gpucheck-synth --n-images 400 --image-size 1024 --workers 8 >/dev/null 2>&1
  IMAGES=/tmp/gpucheck-synth; LABELS=/tmp/gpucheck-synth/Data_Entry_2017.csv
fi
WORKERS=16; [ "$REHEARSE" = --rehearse ] && WORKERS=2
for enc in png jpeg; do
  $PY -m cxr_fast shard --images $IMAGES --labels $LABELS --out /tmp/gpucheck-$enc --encoding $enc \
      --shard-size 100 --workers 8 >/dev/null 2>&1
  run $PY -m cxr_fast bench loader --shards /tmp/gpucheck-$enc --loader torch --workers $WORKERS --batch-size 32 \
      --batches 10 --json "$OUT/loader-torch-$enc.json"
  if $PY -c "import nvidia.dali, torch; assert torch.cuda.is_available()" 2>/dev/null; then
    run $PY -m cxr_fast bench loader --shards /tmp/gpucheck-$enc --loader dali-gpu --workers 8 --batch-size 32 \
        --batches 40 --json "$OUT/loader-dali-gpu-$enc.json"
  fi
done
if [ -d "$DATA/nih-sample/images" ] && $PY -c "import nvidia.dali, torch; assert torch.cuda.is_available()" 2>/dev/null
then  # GPU CLAHE fidelity: the loader test with the DALI pipeline on the GPU
  CXR_FAST_TEST_DEVICE=cuda run $PY -m pytest -q tests/test_loader.py -k opencv_reference -s -p no:cacheprovider \
      2>&1 | tee "$OUT/clahe-fidelity.txt"
fi
ls -l "$OUT"
