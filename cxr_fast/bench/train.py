"""`cxr-fast bench train`: the trainer's own loop (`engine.train_one_epoch`, its optimizer step, its one sync per
step, its loss) for a few steps after a warm-up, fed by on-device batches (the compute ceiling) or a real loader."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from cxr_fast.bench.flops import training_flops_per_image
from cxr_fast.bench.loader import Forever
from cxr_fast.bench.machine import device_peak, machine
from cxr_fast.config import BenchTrainConfig, RunConfig, replace
from cxr_fast.data.loader import LoaderSpec, SyntheticLoader, create_loader
from cxr_fast.errors import CxrFastError
from cxr_fast.training.compiled import resolve_compile
from cxr_fast.training.engine import train_one_epoch
from cxr_fast.training.losses import FocalLoss
from cxr_fast.training.setup import Env, Plan, build_model, build_state


def bench_run_config(config: BenchTrainConfig) -> RunConfig:
    """The run settings the benchmark trains with: the trainer's defaults, with the benchmark's model and shapes."""
    return replace(RunConfig(), **{
        "model.name": config.model, "model.pretrained": False, "model.channels_last": config.channels_last,
        "model.compile": config.compile, "model.compile_mode": config.compile_mode,
        "data.image_size": config.image_size, "data.in_chans": config.in_chans, "data.workers": config.workers,
        "optim.batch_size": config.batch_size, "optim.accum": config.accum,
        "optim.effective_batch": config.batch_size * config.accum, "amp": config.amp,
        "cudnn_benchmark": config.cudnn_benchmark})


# The head measured: as many outputs as NIH's 14 findings (the speed does not depend on their names).
HEAD = tuple(f"class_{i}" for i in range(14))


def trainer(run: RunConfig, device: torch.device):
    """(TrainState, model) as `cxr-fast train` builds them: the model (compiled where the run would be, one graph per
    side of its schedule), fused AdamW on CUDA, cuDNN's autotuning as set, the schedule, the scaler, the focal loss."""
    env = Env(0, 1, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = run.cudnn_benchmark
    model, ema = build_model(run, env, None, len(HEAD))
    state = build_state(run, Plan(HEAD, run.optim.batch_size, 1_000_000, 1_000_000), env, model, ema,
                        FocalLoss(run.optim.focal_gamma))
    return state, model


def _batches(shards_dir, config: BenchTrainConfig, run: RunConfig, device: torch.device, count: int):
    if config.data == "synthetic":
        spec = LoaderSpec("", "train", run.data, batch_size=config.batch_size, device=device)
        return SyntheticLoader(spec, count, len(HEAD))
    if shards_dir is None:
        raise CxrFastError("--data with a loader needs --shards")
    data = replace(run.data, workers=config.workers or os.cpu_count())
    return Forever(create_loader(LoaderSpec(shards_dir, "train", data, batch_size=config.batch_size, train=True,
                                            loader=config.data, device=device)))


def bench_train(shards_dir: str | Path | None, config: BenchTrainConfig = BenchTrainConfig()) -> dict:
    """Training images/s over `steps` optimizer steps after `warmup` ones, the share of that time the device waited
    for input, and MFU from counted FLOPs against the device's peak."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = bench_run_config(config)
    state, model = trainer(run, device)
    flops = training_flops_per_image(model, config.in_chans, config.image_size, device)["flops_per_image"]
    batches = (config.warmup + config.steps) * config.accum
    loader = _batches(shards_dir, config, run, device, batches)
    stats = train_one_epoch(state, loader, batches, show_progress=False, warmup_steps=config.warmup)
    gpu, peak = device_peak(device, config.peak_tflops)
    rate = stats.timed_images / stats.timed_seconds
    return {"kind": "train", "model": config.model, "data": config.data, "images_per_second": rate,
            "images": stats.timed_images, "seconds": stats.timed_seconds, "steps": config.steps,
            "warmup_steps": config.warmup, "warmup_seconds": stats.seconds - stats.timed_seconds,
            "data_wait_fraction": stats.input_wait_seconds / stats.timed_seconds, "flops_per_image": flops,
            "mfu": rate * flops / peak if peak else None, "peak_flops": peak, "gpu": gpu,
            "batch_size": config.batch_size, "accum": config.accum, "image_size": config.image_size,
            "amp": str(state.amp_dtype), "channels_last": config.channels_last,
            "compiled": resolve_compile(run.model, device), "compile_mode": config.compile_mode,
            "compile_seconds": stats.warmup_overhead_seconds, "cudnn_benchmark": config.cudnn_benchmark,
            "in_chans": config.in_chans, "device": str(device), "machine": machine()}
