#!/usr/bin/env bash
# Trainer throughput on a CPU-only machine (tiny model: ConvNeXt-Large is for GPUs). Results: benchmarks/results/.
#   bash benchmarks/train_cpu.sh SHARDS   (SHARDS: real-sample shards, e.g. from benchmarks/encodings.py's set-up)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=$1
R=benchmarks/results
B=".venv/bin/cxr-fast bench train --model convnext_atto --image-size 256 --batch-size 8 --steps 6 --warmup 2"
$B --in-chans 1 --json $R/cpu-train-atto-1ch.json
$B --in-chans 3 --json $R/cpu-train-atto-3ch.json
$B --no-channels-last --json $R/cpu-train-atto-nchw.json
$B --data dali --shards "$SHARDS" --json $R/cpu-train-atto-dali.json
$B --data torch --shards "$SHARDS" --json $R/cpu-train-atto-torch.json
