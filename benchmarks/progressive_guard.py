"""Accuracy guard for progressive resolution, on this machine: the synthetic set (a validation split of at least 300
images), convnext_atto from scratch, a fixed-side run and a progressive run at equal epochs, two seeds each; the
validation macro AUROC of each (best validated epoch and last) and their difference. It cannot prove the real-data
claim; it catches a schedule that breaks learning.

    .venv/bin/python benchmarks/progressive_guard.py --out benchmarks/results/cpu-2core-progressive.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cxr_fast.bench.machine import machine
from cxr_fast.config import RunConfig, ShardConfig, SynthConfig, replace
from cxr_fast.data.synth import write_synthetic_dataset
from cxr_fast.data.shards.writer import ShardInput, write_shards
from cxr_fast.training.resolution import flops_ratio, side_schedule
from cxr_fast.training.run import run_training

RECIPE = {"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 128, "optim.batch_size": 16,
          "optim.accum": 1, "optim.epochs": 8, "optim.lr": 2e-3, "loader": "torch"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2800)
    parser.add_argument("--start", type=int, default=64)
    args = parser.parse_args()
    results = {"machine": machine(), "recipe": RECIPE, "progressive_start": args.start, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = write_synthetic_dataset(tmp / "synth", SynthConfig(n_images=args.images, source_size=256))
        manifest = write_shards(ShardInput(tmp / "synth", table), ShardConfig(out=str(tmp / "shards"), val_fraction=0.15))
        results["splits"] = {name: s["images"] for name, s in manifest["splits"].items()}
        assert results["splits"]["val"] >= 300, results["splits"]
        for seed in (0, 1):
            for start in (None, args.start):
                config = replace(RunConfig(), **RECIPE | {"seed": seed, "optim.progressive": start})
                sides = side_schedule(128, config.optim.epochs, start, config.optim.progressive_final_epochs)
                started = time.perf_counter()
                out = tmp / f"run-{seed}-{start}"
                run_training(config, tmp / "shards", out, show_progress=False)
                records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                row = {"seed": seed, "progressive": start, "sides": sides, "flops_ratio": flops_ratio(sides, 128),
                       "val_macro_auc_best": max(r["val_macro_auc"] for r in records),
                       "val_macro_auc_last": records[-1]["val_macro_auc"],
                       "wall_seconds": time.perf_counter() - started}
                print(json.dumps(row), flush=True)
                results["runs"].append(row)
    for seed in (0, 1):
        fixed, prog = (r for r in results["runs"] if r["seed"] == seed)
        results.setdefault("differences", []).append(
            {"seed": seed, "best": prog["val_macro_auc_best"] - fixed["val_macro_auc_best"],
             "last": prog["val_macro_auc_last"] - fixed["val_macro_auc_last"]})
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
