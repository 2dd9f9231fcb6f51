"""`cxr-fast bench loader`: one loader in steady state (images/s and CPU core-ms per image), and the decode-bound
limit of an encoding."""

from __future__ import annotations

import os
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from cxr_fast.bench.machine import cpu_busy_seconds, machine
from cxr_fast.config import BenchLoaderConfig, DataConfig
from cxr_fast.data.loaders.loader import LoaderSpec, create_loader, resolve_loader
from cxr_fast.data.shards.manifest import load_manifest, split_shards
from cxr_fast.data.shards.sample import decode_image, image_component
from cxr_fast.data.shards.tars import walk_tar
from cxr_fast.errors import CxrFastError
from cxr_fast.training.engine import synchronize


class Forever:
    """The batches of one loader object, epoch after epoch (DALI's iterator resets, DataLoader workers persist),
    with the loader's device: a stream for measurements longer than an epoch. `full_batches` leaves out each epoch's
    short last batch (a shape of its own)."""

    def __init__(self, loader, full_batches: bool = False):
        self.loader, self.device, self.full_batches = loader, getattr(loader, "device", None), full_batches
        self.batch_size = None

    def __iter__(self):
        while True:
            produced = False
            for batch in self.loader:
                self.batch_size = self.batch_size or len(batch.keys)
                if self.full_batches and len(batch.keys) < self.batch_size:
                    continue
                produced = True
                yield batch
            if not produced:
                raise CxrFastError("the loader produced no full batch" if self.full_batches else
                                   "the loader produced no batch")


def bench_loader(shards_dir: str | Path, config: BenchLoaderConfig = BenchLoaderConfig()) -> dict:
    """Steady-state images/s of one loader doing the full work (decode → resize → CLAHE → augment → normalised
    channels-last batches on the target device) and the CPU time it costs per image (all cores of the machine).

    One loader object serves every epoch; its build and the first `warmup` batches (prefetch fill, every worker's
    first wave) are outside the timed window, which lasts at least `batches` batches and `seconds` seconds."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = resolve_loader(config.loader, device)
    workers = config.workers or os.cpu_count()
    warmup = config.warmup if config.warmup is not None else max(10, 2 * workers)
    data = DataConfig(image_size=config.image_size, workers=workers)
    started = time.perf_counter()
    loader = create_loader(LoaderSpec(shards_dir, config.split, data, batch_size=config.batch_size,
                                      train=config.augment, loader=resolved, device=device, dali_cpu=config.dali_cpu))
    stream = iter(Forever(loader))
    for _ in range(warmup):
        next(stream)
    synchronize(device)
    build_seconds = time.perf_counter() - started
    busy, started = cpu_busy_seconds(), time.perf_counter()
    images = batches = 0
    while batches < config.batches or time.perf_counter() - started < config.seconds:
        images += len(next(stream).keys)
        batches += 1
    synchronize(device)
    seconds = time.perf_counter() - started
    cpu_seconds = cpu_busy_seconds() - busy
    manifest = load_manifest(shards_dir)
    on = "cpu" if resolved == "torch" or config.dali_cpu or device.type != "cuda" else "gpu"
    result = {"kind": "loader", "loader": config.loader,
              "resolved": f"{resolved}-{on}" if resolved == "dali" else resolved,
              "images_per_second": images / seconds, "cpu_core_ms_per_image": 1000 * cpu_seconds / images,
              "cpu_cores_busy": cpu_seconds / seconds, "images": images, "seconds": seconds,
              "batches": batches, "warmup_batches": warmup, "build_and_warmup_seconds": build_seconds,
              "batch_size": config.batch_size, "workers": workers, "image_size": config.image_size,
              "augment": config.augment, "split": config.split, "split_batches": len(loader),
              "encoding": manifest["config"]["encoding"], "stored_size": manifest["config"]["resize"],
              "device": str(device), "machine": machine()}
    if config.decode:
        result["decode"] = bench_decode(shards_dir, config.split)
    return result


def bench_decode(shards_dir: str | Path, split: str, samples: int = 64) -> dict:
    """The decode-bound limit of an encoding: images/s of decoding alone on one core (OpenCV, one thread)."""
    payloads = []
    for tar in split_shards(shards_dir, split):
        for _key, sample in walk_tar(tar):
            payloads.append(sample)
            if len(payloads) == samples:
                break
        if len(payloads) == samples:
            break
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        decode_image(payloads[0])
        started = time.perf_counter()
        for sample in payloads:
            decode_image(sample)
        seconds = time.perf_counter() - started
    finally:
        cv2.setNumThreads(threads)
    sizes = [len(image_component(sample)[1]) for sample in payloads]
    return {"kind": "decode", "images_per_second_per_core": len(payloads) / seconds,
            "decode_bound_images_per_second": len(payloads) / seconds * os.cpu_count(),
            "bytes_per_image": float(np.mean(sizes)), "images": len(payloads), "seconds": seconds,
            "machine": machine()}
