"""`cxr-fast bench train`: the trainer's own loop (`engine.train_one_epoch`, its optimizer step, its one sync per
step, its loss) for a few steps after a warm-up, fed by on-device batches (the compute ceiling) or a real loader."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cxr_fast.bench.loader import Forever
from cxr_fast.bench.machine import machine
from cxr_fast.config import NIH_TRAIN_IMAGES, BenchTrainConfig, replace
from cxr_fast.data.datasets import nih
from cxr_fast.data.loaders.loader import LoaderSpec, SyntheticLoader, create_loader
from cxr_fast.data.shards.manifest import load_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.training.compiled import resolve_compile
from cxr_fast.training.engine import train_one_epoch
from cxr_fast.training.flops import device_peak, training_flops_per_image
from cxr_fast.training.setup import build_trainer


def _classes_and_images(shards_dir, config: BenchTrainConfig) -> tuple[tuple[str, ...], int]:
    """The head and the epoch the schedule is planned over: the shards' own, or NIH's for synthetic inputs."""
    if config.data == "synthetic":
        return tuple(nih.CLASSES), NIH_TRAIN_IMAGES
    if shards_dir is None:
        raise CxrFastError("--data with a loader needs --shards")
    manifest = load_manifest(shards_dir)
    return tuple(manifest["classes"]), manifest["splits"]["train"]["images"]


def _batches(shards_dir, config: BenchTrainConfig, device: torch.device, count: int):
    run = config.run
    if config.data == "synthetic":
        spec = LoaderSpec("", "train", run.data, batch_size=run.optim.batch_size, device=device)
        return SyntheticLoader(spec, count, len(nih.CLASSES))
    data = replace(run.data, workers=run.data.workers or os.cpu_count())
    loader = create_loader(LoaderSpec(shards_dir, "train", data, batch_size=run.optim.batch_size, train=True,
                                      loader=config.data, device=device))
    # Full batches only: the split's short last batch is a new shape (autotuning or a recompile in the window).
    return Forever(loader, full_batches=True)


def bench_train(shards_dir: str | Path | None, config: BenchTrainConfig = BenchTrainConfig()) -> dict:
    """Training images/s over `steps` optimizer steps after `warmup` ones, the share of that time the device waited
    for input, and MFU from counted FLOPs against the device's peak."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = config.run
    classes, train_images = _classes_and_images(shards_dir, config)
    state, model = build_trainer(run, device, classes, train_images)
    flops = training_flops_per_image(model, run.data.in_chans, run.data.image_size, device)["flops_per_image"]
    batches = (config.warmup + config.steps) * run.optim.accum
    loader = _batches(shards_dir, config, device, batches)
    stats = train_one_epoch(state, loader, batches, show_progress=False, warmup_steps=config.warmup)
    gpu, peak = device_peak(device, config.peak_tflops)
    rate = stats.timed_images / stats.timed_seconds
    return {"kind": "train", "model": run.model.name, "data": config.data, "images_per_second": rate,
            "images": stats.timed_images, "seconds": stats.timed_seconds, "steps": stats.timed_steps,
            "warmup_steps": config.warmup, "warmup_seconds": stats.warmup_seconds,
            "loader_start_seconds": stats.loader_start_seconds, "loss": stats.loss,
            "data_wait_fraction": stats.input_wait_seconds / stats.timed_seconds, "flops_per_image": flops,
            "mfu": rate * flops / peak if peak else None, "peak_flops": peak, "gpu": gpu,
            "batch_size": run.optim.batch_size, "accum": run.optim.accum, "image_size": run.data.image_size,
            "amp": str(state.amp_dtype), "channels_last": run.model.channels_last, "fast_norm": run.model.fast_norm,
            "compiled": resolve_compile(run.model, device), "compile_mode": run.model.compile_mode,
            "compile_seconds": stats.warmup_overhead_seconds, "cudnn_benchmark": run.cudnn_benchmark,
            "in_chans": run.data.in_chans, "device": str(device), "machine": machine()}
