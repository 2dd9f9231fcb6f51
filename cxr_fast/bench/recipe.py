"""`cxr-fast bench recipe`: what a full training recipe costs on this machine, from measured rates.

It runs the shipped loop (`engine.train_one_epoch` with the trainer's model, optimizer and compile setting) for a
few steps at every side of the recipe's schedule, on on-device batches, plus one evaluation pass at the full side,
and projects the wall time of the recipe: per epoch, its training images at the measured rate of its side plus, on
validated epochs, the validation images at the measured evaluation rate, plus the compile (warm-up) seconds once per
side. Several GPUs are projected at linear scaling (stated, not measured), with the images each GPU must receive
from its loader per second at the smallest side, where the demand peaks.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from cxr_fast.bench.flops import training_flops_per_image
from cxr_fast.bench.machine import device_peak, machine
from cxr_fast.bench.train import trainer
from cxr_fast.config import BenchRecipeConfig, RunConfig, replace
from cxr_fast.data.loader import LoaderSpec, SyntheticLoader
from cxr_fast.training.compiled import resolve_compile
from cxr_fast.training.engine import evaluate, synchronize, train_one_epoch
from cxr_fast.training.resolution import flops_ratio, side_schedule
from cxr_fast.training.setup import EVAL_BATCH_FACTOR, validated_epochs


def recipe_run_config(config: BenchRecipeConfig) -> RunConfig:
    """The run the recipe describes, as `cxr-fast train` would set it up."""
    return replace(RunConfig(), **{
        "model.name": config.model, "model.pretrained": False, "model.compile": config.compile,
        "model.compile_mode": config.compile_mode, "data.image_size": config.image_size,
        "optim.batch_size": config.batch_size, "optim.accum": config.effective_batch // config.batch_size,
        "optim.effective_batch": config.effective_batch, "optim.epochs": config.epochs,
        "optim.progressive": config.progressive, "optim.progressive_final_epochs": config.progressive_final_epochs,
        "val_every": config.val_every, "amp": config.amp})


def _measure_side(state, run: RunConfig, side: int, config: BenchRecipeConfig) -> dict:
    """The shipped loop at one side: `warmup` optimizer steps (compilation, autotuning), then `steps` timed."""
    data = replace(run.data, image_size=side)
    accum = run.optim.accum
    batches = (config.warmup + config.steps) * accum
    loader = SyntheticLoader(LoaderSpec("", "train", data, batch_size=run.optim.batch_size, device=state.device),
                             batches, len(state.classes))
    state.batch_in_epoch = 0  # each side is an epoch of its own
    stats = train_one_epoch(state, loader, batches, show_progress=False, warmup_steps=config.warmup)
    rate = stats.timed_images / stats.timed_seconds
    warmup_images = stats.images - stats.timed_images
    return {"side": side, "images_per_second": rate, "images": stats.timed_images, "seconds": stats.timed_seconds,
            "steps": config.steps, "warmup_steps": config.warmup, "micro_batch": run.optim.batch_size,
            "accum": accum, "warmup_seconds": stats.seconds - stats.timed_seconds,
            "compile_seconds": max(0.0, stats.seconds - stats.timed_seconds - warmup_images / rate)}


def _measure_eval(state, run: RunConfig, config: BenchRecipeConfig) -> dict:
    """One evaluation pass at the full side with the trainer's evaluation batch (the first batch warms it up)."""
    batch = run.optim.batch_size * EVAL_BATCH_FACTOR
    spec = LoaderSpec("", "val", run.data, batch_size=batch, device=state.device)
    evaluate(state.model, SyntheticLoader(spec, 1, len(state.classes)), state.loss_fn, state.amp_dtype, False)
    synchronize(state.device)
    loader = SyntheticLoader(spec, config.eval_batches, len(state.classes))
    started = time.perf_counter()
    result = evaluate(state.model, loader, state.loss_fn, state.amp_dtype, False)
    seconds = time.perf_counter() - started  # evaluate ends with the transfer of its results: the device is done
    images = len(result["keys"])
    return {"images_per_second": images / seconds, "images": images, "seconds": seconds, "batch_size": batch}


def _projection(sides: list[int], rows: dict, evaluation: dict, config: BenchRecipeConfig, validated: set) -> dict:
    train = sum(config.images / rows[side]["images_per_second"] for side in sides)
    val = len(validated) * config.val_images / evaluation["images_per_second"]
    compile_seconds = sum(rows[side]["compile_seconds"] for side in set(sides))
    return {"train_seconds": train, "validation_seconds": val, "compile_seconds": compile_seconds,
            "total_seconds": train + val + compile_seconds, "total_hours": (train + val + compile_seconds) / 3600}


def measured_sides(sides: list[int], count: int) -> list[int]:
    """The sides to measure: all, or `count` of them evenly spaced, the smallest and the largest included."""
    distinct = sorted(set(sides))
    if count == 0 or count >= len(distinct):
        return distinct
    if count == 1:
        return [distinct[-1]]
    return sorted({distinct[round(i * (len(distinct) - 1) / (count - 1))] for i in range(count)})


def estimate_side(rows: dict, side: int) -> dict:
    """An unmeasured side's rate from the measured ones: seconds per image = a + b x side^2 (compute grows with the
    side squared; `a` is what does not), fitted by least squares; its compile seconds the measured mean."""
    measured = sorted(rows)
    x = np.array([s * s for s in measured], dtype=float)
    t = np.array([1.0 / rows[s]["images_per_second"] for s in measured])
    b, a = np.polyfit(x, t, 1) if len(measured) > 1 else (t[0] / x[0], 0.0)
    return {"side": side, "estimated": True, "images_per_second": 1.0 / (a + b * side * side),
            "compile_seconds": float(np.mean([rows[s]["compile_seconds"] for s in measured]))}


def bench_recipe(config: BenchRecipeConfig = BenchRecipeConfig()) -> dict:
    """Images/s and MFU at each side of the schedule, one evaluation pass, and the projected wall time of the recipe
    (progressive as given, and fixed at the full side) on one GPU and on `gpus` at linear scaling."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = recipe_run_config(config)
    sides = side_schedule(config.image_size, config.epochs, config.progressive, config.progressive_final_epochs)
    state, model = trainer(run, device)
    gpu, peak = device_peak(device, config.peak_tflops)
    rows = {}
    for side in measured_sides(sides, config.measure_sides):
        rows[side] = _measure_side(state, run, side, config)
    rows |= {side: estimate_side(rows, side) for side in set(sides) - set(rows)}
    for side, row in rows.items():
        flops = training_flops_per_image(model, run.data.in_chans, side, device)["flops_per_image"]
        row |= {"flops_per_image": flops, "mfu": row["images_per_second"] * flops / peak if peak else None}
    evaluation = _measure_eval(state, run, config)
    validated = validated_epochs(config.epochs, config.val_every)
    full = config.image_size
    progressive = _projection(sides, rows, evaluation, config, validated)
    fixed = _projection([full] * config.epochs, rows, evaluation, config, validated)
    demand = max(row["images_per_second"] for row in rows.values())
    return {"kind": "recipe", "model": config.model, "image_size": full, "epochs": config.epochs,
            "images_per_epoch": config.images, "val_images": config.val_images, "val_every": config.val_every,
            "schedule": sides, "flops_ratio": flops_ratio(sides, full), "compiled": resolve_compile(run.model, device),
            "compile_mode": config.compile_mode, "sides": [rows[side] for side in sorted(rows)],
            "evaluation": evaluation,
            "projection": {"progressive": progressive, "fixed": fixed},
            "gpus": config.gpus, "projection_gpus_linear": {
                "progressive_hours": progressive["total_hours"] / config.gpus,
                "fixed_hours": fixed["total_hours"] / config.gpus},
            "loader_images_per_second_per_gpu": demand, "loader_images_per_second_all_gpus": demand * config.gpus,
            "gpu": gpu, "peak_flops": peak, "device": str(device), "machine": machine()}
