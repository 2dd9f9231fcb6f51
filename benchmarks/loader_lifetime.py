"""Loaders that live across epochs against a loader built every epoch, in one script run on this machine: the demo's
CPU recipe (its synthetic data, convnext_atto at 128 px, batch 16, the torch loader with 2 workers) trained twice,
once as `cxr-fast train` does (the DataLoader's workers kept, re-seeded each epoch) and once with a new loader each
epoch (as before the loaders lived for the run). Each epoch's `loader_build` and `loader_start` seconds, its wall time
and the ratio of the later epochs' loader start to the first's come from the runs' own metrics.jsonl.

    .venv/bin/python benchmarks/loader_lifetime.py --out benchmarks/results/cpu-2core-loader-lifetime.json
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
from cxr_fast.pipelines.demo import CPU_RECIPE
from cxr_fast.training import feed
from cxr_fast.training import run as run_module
from cxr_fast.training.run import run_training


class RebuiltEachEpoch(feed.RunLoaders):
    """The loaders as they were: a new train loader (workers spawned anew) for every epoch."""

    def train(self, epoch: int, side: int):
        started = time.perf_counter()
        self.current = None
        self.current = self._build(epoch, side)
        return self.current.loader, time.perf_counter() - started


def _run(shards: Path, out: Path, config: RunConfig) -> dict:
    started = time.perf_counter()
    run_training(config, shards, out, show_progress=False)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [{"epoch": r["epoch"], "epoch_seconds": r["epoch_seconds"], **{k: r["seconds"][k] for k in
               ("loader_build", "loader_start", "timed", "validation", "checkpoint")},
               "train_images_per_second": r["train_images_per_second"]} for r in records]
    first = epochs[0]["loader_build"] + epochs[0]["loader_start"]
    later = [e["loader_build"] + e["loader_start"] for e in epochs[1:]]
    return {"wall_seconds": wall, "epochs": epochs, "first_epoch_loader_seconds": first,
            "later_epochs_loader_seconds_mean": sum(later) / len(later),
            "later_to_first_ratio": sum(later) / len(later) / first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    config = replace(RunConfig(), **(CPU_RECIPE | {"optim.epochs": args.epochs, "loader": "torch",
                                                   "data.workers": 2}))
    results = {"machine": machine(), "recipe": CPU_RECIPE | {"optim.epochs": args.epochs, "data.workers": 2}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        table = write_synthetic_dataset(tmp / "synth", SynthConfig(n_images=800, source_size=512))
        write_shards(ShardInput(tmp / "synth", table), ShardConfig(out=str(tmp / "shards")))
        results["kept"] = _run(tmp / "shards", tmp / "kept", config)
        run_module.RunLoaders = RebuiltEachEpoch
        try:
            results["rebuilt"] = _run(tmp / "shards", tmp / "rebuilt", config)
        finally:
            run_module.RunLoaders = feed.RunLoaders
    args.out.write_text(json.dumps(results, indent=1))
    for name in ("kept", "rebuilt"):
        r = results[name]
        print(f"{name}: first epoch's loader {r['first_epoch_loader_seconds']:.2f} s, later epochs "
              f"{r['later_epochs_loader_seconds_mean']:.2f} s (ratio {r['later_to_first_ratio']:.3f}); "
              f"wall {r['wall_seconds']:.1f} s")


if __name__ == "__main__":
    main()
