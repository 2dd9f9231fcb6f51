"""Shard-encoding and loader benchmark on the real NIH sample (../shared/data), side by side in one run.

For each encoding (png lossless, jpeg q95, raw uint8), stored at source size (1024) and pre-resized (512):
sharding images/s, shard bytes per image, decode-alone images/s per core, loader images/s for every backend this
machine has (dali-gpu, dali-cpu, torch with one worker per core), and fidelity: mean absolute difference of the
processed 512 image (after CLAHE, no augmentation) against the lossless source path.

    .venv/bin/python benchmarks/encodings.py --out benchmarks/results/cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_fast.bench.loader import bench_decode, bench_loader
from cxr_fast.bench.machine import machine
from cxr_fast.config import BenchLoaderConfig, DataConfig, ShardConfig
from cxr_fast.data.loaders.loader import LoaderSpec, create_loader
from cxr_fast.data.shards.manifest import load_manifest
from cxr_fast.data.shards.writer import ShardInput, write_shards

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
LOADERS = {"dali-gpu": ("dali", False), "dali-cpu": ("dali", True), "torch": ("torch", False)}  # (loader, dali_cpu)
VARIANTS = [("png", None), ("png", 512), ("jpeg", None), ("jpeg", 512), ("raw", None), ("raw", 512)]


def processed(shards: Path) -> dict[str, np.ndarray]:
    loader = create_loader(LoaderSpec(shards, "val", DataConfig(image_size=512, workers=0), batch_size=16,
                                      train=False, normalize=False, loader="torch"))
    return {k: img[0].numpy().astype(float) for b in loader for k, img in zip(b.keys, b.images)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if not (DATA / "nih-sample/images").is_dir():
        sys.exit("needs ../shared/data/nih-sample (the real NIH sample)")
    loaders = (["dali-gpu"] if torch.cuda.is_available() else []) + ["dali-cpu", "torch"]
    results = {"machine": machine(), "variants": [], "sharding": []}
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for encoding, resize in VARIANTS:
            out = Path(tmp) / f"{encoding}-{resize or 'src'}"
            started = time.perf_counter()
            write_shards(ShardInput(DATA / "nih-sample/images", DATA / "meta/Data_Entry_2017_v2020.csv.gz"),
                         ShardConfig(out=str(out), workers=2, encoding=encoding, resize=resize, shard_size=100))
            shard_rate = 400 / (time.perf_counter() - started)
            manifest = load_manifest(out)
            tar_bytes = sum((out / name).stat().st_size for name in manifest["shards"])
            images = processed(out)
            reference = reference or images
            row = {"encoding": encoding, "stored_size": resize or 1024, "shard_images_per_second_2_workers": shard_rate,
                   "bytes_per_image": tar_bytes / 400,
                   "fidelity_mad_vs_lossless": float(np.mean([np.abs(images[k] - reference[k]).mean()
                                                              for k in reference])),
                   "decode": bench_decode(out, "train"), "loaders": {}}
            for name in loaders:
                loader, dali_cpu = LOADERS[name]
                row["loaders"][name] = bench_loader(out, BenchLoaderConfig(
                    loader=loader, batch_size=args.batch_size, batches=args.batches, warmup=3, dali_cpu=dali_cpu))
            print(json.dumps({k: v for k, v in row.items() if k not in ("decode", "loaders")}),
                  {b: round(r["images_per_second"], 1) for b, r in row["loaders"].items()}, flush=True)
            results["variants"].append(row)
        for workers in (1, 2):
            out = Path(tmp) / f"shard-{workers}"
            started = time.perf_counter()
            write_shards(ShardInput(DATA / "nih-sample/images", DATA / "meta/Data_Entry_2017_v2020.csv.gz"),
                         ShardConfig(out=str(out), workers=workers, shard_size=50))
            results["sharding"].append({"workers": workers, "encoding": "png",
                                        "images_per_second": 400 / (time.perf_counter() - started)})
            print(results["sharding"][-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
