"""`cxr-fast bench recipe`: what a full training recipe costs on this machine, from measured rates.

It runs the shipped loop (`engine.train_one_epoch` with the trainer's model, optimizer and compile setting) for a
few steps at every side of the recipe's schedule (or at some and fits the rest), on on-device batches, then one
evaluation pass at the full side, and times one save of the run's checkpoint. The projected wall time of the recipe
is the sum of terms, each listed in the JSON: start-up (building the model, measured), training (each epoch's
training images at the measured rate of its side), validation (the validation images of each validated epoch at the
measured evaluation rate), compilation (once per distinct side and once for evaluation, measured), loader builds
(once per distinct side and once for validation: the loaders live across epochs; `--loader-build-seconds`) and
checkpoints (last.pt every epoch, measured; best.pt is a hard link). Several GPUs are projected by dividing the
per-image terms (training and validation) alone, at linear scaling (stated, not measured); the rest stays as it is.
The batch-size probe is not part of it: the recipe names its micro-batch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_fast.bench.machine import machine
from cxr_fast.config import BenchRecipeConfig, RunConfig, replace
from cxr_fast.data.datasets import nih
from cxr_fast.data.loaders.loader import LoaderSpec, SyntheticLoader
from cxr_fast.training.checkpoint import save_checkpoint
from cxr_fast.training.compiled import resolve_compile
from cxr_fast.training.engine import evaluate, synchronize, train_one_epoch, unwrap
from cxr_fast.training.flops import device_peak, training_flops_per_image
from cxr_fast.training.resolution import flops_ratio
from cxr_fast.training.setup import EVAL_BATCH_FACTOR, build_trainer, epoch_sides, validated_epochs

PER_IMAGE_TERMS = ("train_seconds", "validation_seconds")  # what more GPUs divide
FIXED_TERMS = ("startup_seconds", "compile_seconds", "loader_build_seconds", "checkpoint_seconds")


def _measure_side(state, run: RunConfig, side: int, config: BenchRecipeConfig) -> dict:
    """The shipped loop at one side: `warmup` optimizer steps (compilation, autotuning), then `steps` timed."""
    data = replace(run.data, image_size=side)
    accum = state.accum  # resolved from the effective batch, as the run resolves it
    batches = (config.warmup + config.steps) * accum
    loader = SyntheticLoader(LoaderSpec("", "train", data, batch_size=run.optim.batch_size, device=state.device),
                             batches, len(state.classes))
    state.batch_in_epoch = 0  # each side is an epoch of its own
    stats = train_one_epoch(state, loader, batches, show_progress=False, warmup_steps=config.warmup)
    return {"side": side, "images_per_second": stats.timed_images / stats.timed_seconds, "images": stats.timed_images,
            "seconds": stats.timed_seconds, "steps": stats.timed_steps, "warmup_steps": config.warmup,
            "micro_batch": run.optim.batch_size, "accum": accum, "warmup_seconds": stats.warmup_seconds,
            "compile_seconds": stats.warmup_overhead_seconds}


def _measure_eval(state, run: RunConfig, config: BenchRecipeConfig) -> dict:
    """One evaluation pass at the full side with the trainer's evaluation batch, after a first batch that compiles
    the evaluation graph (its time beyond a steady batch is the evaluation's compile seconds)."""
    batch = run.optim.batch_size * EVAL_BATCH_FACTOR
    spec = LoaderSpec("", "val", run.data, batch_size=batch, device=state.device)
    synchronize(state.device)
    started = time.perf_counter()
    evaluate(state.model, SyntheticLoader(spec, 1, len(state.classes)), state.loss_fn, state.amp_dtype, False)
    first = time.perf_counter() - started
    loader = SyntheticLoader(spec, config.eval_batches, len(state.classes))
    started = time.perf_counter()
    result = evaluate(state.model, loader, state.loss_fn, state.amp_dtype, False)
    seconds = time.perf_counter() - started  # evaluate ends with the transfer of its results: the device is done
    images = len(result["keys"])
    return {"images_per_second": images / seconds, "images": images, "seconds": seconds, "batch_size": batch,
            "batches": config.eval_batches, "compile_seconds": max(0.0, first - seconds / config.eval_batches)}


def _time_checkpoint(state) -> float:
    """Seconds to write one last.pt of this model (weights and optimizer state, as a run writes each epoch)."""
    payload = {"model": unwrap(state.model).state_dict(), "optimizer": state.optimizer.state_dict(),
               "class_names": list(state.classes)}
    with tempfile.TemporaryDirectory(prefix="cxr-fast-recipe-") as folder:
        started = time.perf_counter()
        save_checkpoint(payload, Path(folder) / "last.pt")
        return time.perf_counter() - started


def projection(sides: list[int], rates: dict, config: BenchRecipeConfig, fixed_costs: dict) -> dict:
    """The recipe's wall time on one device and on `config.gpus`, term by term (see the module's docstring).
    `rates`: side → measured or fitted training row; `fixed_costs`: evaluation, startup and checkpoint seconds."""
    evaluation = fixed_costs["evaluation"]
    validated = validated_epochs(config.run.optim.epochs, config.run.val_every)
    terms = {
        "startup_seconds": fixed_costs["startup_seconds"],
        "train_seconds": sum(config.images / rates[side]["images_per_second"] for side in sides),
        "validation_seconds": len(validated) * config.val_images / evaluation["images_per_second"],
        "compile_seconds": sum(rates[side]["compile_seconds"] for side in set(sides)) + evaluation["compile_seconds"],
        "loader_build_seconds": (len(set(sides)) + 1) * config.loader_build_seconds,
        "checkpoint_seconds": len(sides) * fixed_costs["checkpoint_seconds"],
    }
    one = sum(terms.values())
    many = sum(terms[k] / config.gpus for k in PER_IMAGE_TERMS) + sum(terms[k] for k in FIXED_TERMS)
    return {**terms, "validated_epochs": len(validated), "total_seconds": one, "total_hours": one / 3600,
            "gpus": config.gpus, "total_seconds_gpus": many, "total_hours_gpus": many / 3600}


def measured_sides(sides: list[int], count: int) -> list[int]:
    """The sides to measure: all, or `count` (≥ 2) of them evenly spaced, the smallest and the largest included."""
    distinct = sorted(set(sides))
    if count == 0 or count >= len(distinct):
        return distinct
    return sorted({distinct[round(i * (len(distinct) - 1) / (count - 1))] for i in range(count)})


def estimate_side(rows: dict, side: int) -> dict:
    """An unmeasured side's rate from two or more measured ones: seconds per image = a + b x side^2 (compute grows
    with the side squared; `a` is what does not), fitted by least squares; its compile seconds the measured mean."""
    measured = sorted(rows)
    x = np.array([s * s for s in measured], dtype=float)
    t = np.array([1.0 / rows[s]["images_per_second"] for s in measured])
    b, a = np.polyfit(x, t, 1)
    return {"side": side, "estimated": True, "images_per_second": 1.0 / (a + b * side * side),
            "compile_seconds": float(np.mean([rows[s]["compile_seconds"] for s in measured]))}


def bench_recipe(config: BenchRecipeConfig = BenchRecipeConfig()) -> dict:
    """Images/s and MFU at each side of the schedule, one evaluation pass, one checkpoint save, and the projected
    wall time of the recipe (progressive as given, and fixed at the full side), term by term."""
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = config.run
    sides = epoch_sides(run)
    state, model = build_trainer(run, device, tuple(nih.CLASSES), config.images)
    synchronize(device)
    costs = {"startup_seconds": time.perf_counter() - started, "checkpoint_seconds": _time_checkpoint(state)}
    gpu, peak = device_peak(device, config.peak_tflops)
    rows = {side: _measure_side(state, run, side, config) for side in measured_sides(sides, config.measure_sides)}
    rows |= {side: estimate_side(rows, side) for side in set(sides) - set(rows)}
    for side, row in rows.items():
        flops = training_flops_per_image(model, run.data.in_chans, side, device)["flops_per_image"]
        row |= {"flops_per_image": flops, "mfu": row["images_per_second"] * flops / peak if peak else None}
    costs["evaluation"] = _measure_eval(state, run, config)
    full, epochs = run.data.image_size, run.optim.epochs
    return {"kind": "recipe", "model": run.model.name, "image_size": full, "epochs": epochs,
            "images_per_epoch": config.images, "val_images": config.val_images, "val_every": run.val_every,
            "loader_build_seconds": config.loader_build_seconds, "schedule": sides,
            "flops_ratio": flops_ratio(sides, full), "compiled": resolve_compile(run.model, device),
            "compile_mode": run.model.compile_mode, "fast_norm": run.model.fast_norm,
            "sides": [rows[side] for side in sorted(rows)], "evaluation": costs["evaluation"],
            "startup_seconds": costs["startup_seconds"], "checkpoint_seconds": costs["checkpoint_seconds"],
            "projection": {"progressive": projection(sides, rows, config, costs),
                           "fixed": projection([full] * epochs, rows, config, costs)},
            "gpus": config.gpus, "scaled_by_gpus": list(PER_IMAGE_TERMS),
            "loader_images_per_second_per_gpu": max(row["images_per_second"] for row in rows.values()),
            "gpu": gpu, "peak_flops": peak, "device": str(device), "machine": machine()}
