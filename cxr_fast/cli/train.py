"""The train command."""

from __future__ import annotations

from pathlib import Path

import click

from cxr_fast.cli.options import build_config, config_options, typed_settings
from cxr_fast.config import RunConfig
from cxr_fast.training.run import run_training

TRAIN_SETTINGS = ("model.name", "model.pretrained", "model.weights", "model.compile", "model.compile_mode",
                  "model.compile_cache", "model.fast_norm", "data.image_size", "data.fit", "data.in_chans",
                  "data.workers", "optim.batch_size", "optim.accum", "optim.epochs", "optim.lr", "optim.ema_decay",
                  "optim.effective_batch", "optim.progressive", "val_every", "device", "loader", "amp", "seed",
                  "max_steps", "tensorboard", "cudnn_benchmark")


@click.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML with any subset of the run config (see config.yaml of a run); flags override it.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt with its config.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in OUT (its checkpoints and metrics).")
@config_options(RunConfig, *TRAIN_SETTINGS)
@click.pass_context
def train(ctx, shards, out, config_file, resume, overwrite, **_settings) -> None:
    """Train a classifier on shards; writes OUT/checkpoints/{best,last}.pt, metrics.jsonl and config.yaml.

    \b
    Defaults are the seed's recipe: ConvNeXt-Large at 512, 32 images per optimizer step (the largest micro-batch that
    fits, x accumulation), 25 epochs, lr 1e-4 cosine, focal gamma 2; compiled on a GPU.
    The GPU recipe (see the README):  --progressive 256 --val-every 2
    Multi-GPU:  torchrun --nproc_per_node=8 -m cxr_fast train --shards shards --out outputs/run
    """
    changes = typed_settings(ctx, RunConfig)  # what the user typed wins over --config
    if resume:  # the run's own config, with the changes a resume may make (checked there)
        if config_file:
            raise click.UsageError("--config sets up a new run; --resume continues the one in --out with its config")
        record = run_training(RunConfig(), shards, out, resume=changes)
    else:
        record = run_training(build_config(RunConfig, {"config_file": config_file}), shards, out, overwrite=overwrite)
    if record and "val_macro_auc" in record:
        click.echo(f"epoch {record['epoch']}: val macro AUC {record['val_macro_auc']:.4f}; checkpoints in "
                   f"{out / 'checkpoints'}")


COMMANDS = (train,)
