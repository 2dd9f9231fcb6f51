"""The bench command group: loader, train (and the recipe projection)."""

from __future__ import annotations

from pathlib import Path

import click

from cxr_fast.bench.loader import bench_loader
from cxr_fast.bench.machine import write_json
from cxr_fast.bench.recipe import bench_recipe
from cxr_fast.bench.train import bench_train
from cxr_fast.cli.options import build_config, config_file_option, config_option, config_options
from cxr_fast.config import BenchLoaderConfig, BenchRecipeConfig, BenchTrainConfig

SHARDS = click.Path(exists=True, file_okay=False, path_type=Path)
# The run's own flags that both `bench train` and `bench recipe` take: what `train` calls them, what it means there.
RUN_FLAGS = ("run.model.name", "run.data.image_size", "run.optim.batch_size", "run.amp", "run.model.compile",
             "run.model.compile_mode", "run.model.fast_norm", "run.cudnn_benchmark")
JSON_FILE = click.Path(dir_okay=False, path_type=Path)


@click.group()
def bench() -> None:
    """Throughput of the loaders and the trainer, and the projected cost of a recipe (JSON with the machine and
    settings; see benchmarks/)."""


def report(result: dict, json_path: Path | None) -> None:
    write_json(result, json_path)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "machine"}
    click.echo(json_path and f"{shown} -> {json_path}" or shown)


@bench.command("loader")
@click.option("--shards", type=SHARDS, required=True)
@config_options(BenchLoaderConfig, "split", "loader", "dali_cpu", "batch_size", "batches", "seconds", "warmup",
                "image_size", "workers", "augment", "decode")
@config_file_option(BenchLoaderConfig)
@click.option("--json", "json_path", type=JSON_FILE)
def bench_loader_command(shards, json_path, **settings) -> None:
    """Steady-state images/s and CPU core-ms per image of one loader doing decode → resize → CLAHE → augment →
    normalised channels-last batches."""
    report(bench_loader(shards, build_config(BenchLoaderConfig, settings)), json_path)


@bench.command("train")
@click.option("--shards", type=SHARDS, help="Needed with --data auto, dali or torch.")
@config_options(BenchTrainConfig, *RUN_FLAGS, "run.optim.accum", "run.data.in_chans", "run.data.workers", "steps",
                "warmup", "data", "peak_tflops")
@config_option(BenchTrainConfig, "run.model.channels_last", "--channels-last/--no-channels-last")
@config_file_option(BenchTrainConfig)
@click.option("--json", "json_path", type=JSON_FILE)
def bench_train_command(shards, json_path, **settings) -> None:
    """Training images/s, data-wait share and MFU of the trainer's own loop (FLOPs counted with the
    grouped-convolution backward right)."""
    config = build_config(BenchTrainConfig, settings)
    if config.data != "synthetic" and shards is None:
        raise click.UsageError("--data with a loader needs --shards")
    report(bench_train(shards, config), json_path)


@bench.command("recipe")
@config_options(BenchRecipeConfig, *RUN_FLAGS, "run.optim.progressive", "run.optim.epochs",
                "run.optim.effective_batch", "run.val_every", "images", "val_images", "steps", "warmup",
                "eval_batches", "measure_sides", "loader_build_seconds", "gpus", "peak_tflops")
@config_option(BenchRecipeConfig, "run.optim.progressive_final_epochs", "--final-epochs",
               help="Epochs at the full side at the end of the progressive schedule.")
@config_file_option(BenchRecipeConfig)
@click.option("--json", "json_path", type=JSON_FILE)
def bench_recipe_command(json_path, **settings) -> None:
    """What a full training recipe costs on this machine: the shipped loop for a few steps at every side of its
    schedule (compiled where the run would be) and one evaluation pass, then images/s and MFU per side and the
    projected wall time, progressive and fixed, on one GPU and on --gpus (linear scaling)."""
    result = bench_recipe(build_config(BenchRecipeConfig, settings))
    write_json(result, json_path)
    for row in result["sides"]:
        mfu = f", MFU {100 * row['mfu']:.1f}%" if row["mfu"] else ""
        how = "fitted to the measured sides" if row.get("estimated") else \
            f"{row['images']} images in {row['seconds']:.2f} s after {row['warmup_steps']} warm-up steps"
        click.echo(f"side {row['side']}: {row['images_per_second']:.1f} images/s{mfu} ({how})")
    click.echo(f"evaluation: {result['evaluation']['images_per_second']:.1f} images/s; one last.pt: "
               f"{result['checkpoint_seconds']:.1f} s; start-up: {result['startup_seconds']:.1f} s")
    for name, p in result["projection"].items():
        terms = ", ".join(f"{key[:-len('_seconds')].replace('_', ' ')} {p[key] / 60:.1f}" for key in p
                          if key.endswith("_seconds") and key not in ("total_seconds", "total_seconds_gpus"))
        click.echo(f"{name}: {p['total_seconds'] / 60:.1f} min on one device ({terms} min); "
                   f"{p['total_seconds_gpus'] / 60:.1f} min on {p['gpus']} (training and validation divided, "
                   "linear scaling)")
    click.echo(f"each device needs {result['loader_images_per_second_per_gpu']:.0f} images/s from its loader at the "
               f"smallest side{f' -> {json_path}' if json_path else ''}")


COMMANDS = (bench,)
