"""The data commands: synth, shard, verify, eda, preview."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cxr_fast.cli.options import build_config, config_file_option, config_option, config_options
from cxr_fast.config import DataConfig, PreviewConfig, RunConfig, ShardConfig, SynthConfig
from cxr_fast.data.datasets import DATASETS, Request, read_dataset
from cxr_fast.data.datasets.base import check_uncertain_names
from cxr_fast.data.datasets.eda import write_eda_report
from cxr_fast.data.datasets.vocabulary import read_relabel
from cxr_fast.data.loaders.preview import write_preview
from cxr_fast.data.synth import LAYOUTS, write_synthetic_dataset
from cxr_fast.data.shards.verify import verify
from cxr_fast.data.shards.inputs import NO_ROW
from cxr_fast.data.shards.writer import ShardInput, write_shards

EXISTING_FOLDER = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@config_option(SynthConfig, "layout", type=click.Choice(list(LAYOUTS)))
@config_options(SynthConfig, "n_images", "source_size", "seed", "workers")
@config_file_option(SynthConfig)
def synth(out: Path, **settings) -> None:
    """Write a synthetic data set in the layout of NIH (PNGs, Data_Entry_2017.csv, split lists), CheXpert
    (CheXpert-v1.0-small/ with train.csv, valid.csv and JPEGs) or MIMIC-CXR-JPG (files/pNN/..., the chexpert,
    metadata and split tables, patients.csv.gz).

    Each finding draws a pattern of its own, so a small CNN can learn it: the demo and the tests use this. The
    output says which --images and --labels to give `cxr-fast shard`.
    """
    config = build_config(SynthConfig, settings)
    labels = write_synthetic_dataset(out, config)
    click.echo(f"dataset: {config.layout}\nlabels: {labels}\nimages: {out}")


@click.command()
@click.option("--dataset", "datasets", type=click.Choice(list(DATASETS)), multiple=True,
              help="The data set's description (default nih); repeat, with --images and --labels for each in the "
                   "same order, to merge several on the union of their classes.")
@click.option("--images", type=EXISTING_FOLDER, required=True, multiple=True,
              help="NIH: the folder searched for the images; CheXpert: the one holding CheXpert-v1.0-small/; "
                   "MIMIC-CXR-JPG: the one holding files/; table: the one the image paths are relative to.")
@click.option("--labels", type=EXISTING_FILE, required=True, multiple=True,
              help="NIH: Data_Entry_2017.csv; CheXpert: train.csv (valid.csv beside it); MIMIC-CXR-JPG: "
                   "mimic-cxr-2.0.0-chexpert.csv.gz (metadata and split beside it); table: the table.")
@click.option("--spec", type=EXISTING_FILE, help="--dataset table: the YAML naming its columns (README).")
@config_option(ShardConfig, "out", type=click.Path(file_okay=False))
@click.option("--test-list", type=EXISTING_FILE,
              help="Official test_list.txt (default: the one beside --labels, if any).")
@click.option("--train-val-list", type=EXISTING_FILE,
              help="Official train_val_list.txt (default: the one beside --labels, if any).")
@config_options(ShardConfig, "uncertain", "blank", "views", "relabel", "classes", "val_fraction", "test_fraction",
                "shard_size", "encoding", "jpeg_quality", "resize", "seed", "on_error", "max_pixels", "workers")
@click.option("--overwrite", is_flag=True, help="Replace a complete shard set in --out made with other settings.")
@config_file_option(ShardConfig)
def shard(overwrite, **options) -> None:
    """Pack one or more data sets into WebDataset shards with a patient-level split, DALI indexes and
    manifest.json.

    Re-running the same command skips shards that are already complete and correct.
    """
    inputs = _shard_inputs(options)  # takes the input options; the rest are the ShardConfig settings
    config = build_config(ShardConfig, options)
    manifest = write_shards(inputs, config, overwrite)
    counts = ", ".join(f"{name} {s['images']} images / {s['patients']} patients"
                       for name, s in manifest["splits"].items())
    dropped = ", ".join(f"{reason} {entry['count']}" for reason, entry in manifest["dropped"].items()) or "none"
    orphans = sum(entry["reason"] == NO_ROW for entry in manifest["skipped"])
    click.echo(f"{config.out}: {counts}; of {manifest['table_rows']} table rows left out: {dropped}"
               + (f"; {orphans} image(s) without a table row skipped" if orphans else ""))


def _shard_inputs(options: dict) -> list[ShardInput]:
    """One ShardInput per --dataset, from (and out of) the command's options."""
    datasets = options.pop("datasets") or ("nih",)
    images, labels, spec = options.pop("images"), options.pop("labels"), options.pop("spec")
    lists = (options.pop("test_list"), options.pop("train_val_list"))
    if not len(datasets) == len(images) == len(labels):
        raise click.UsageError(f"give --images and --labels once per --dataset ({len(datasets)} data set(s), "
                               f"{len(images)} --images, {len(labels)} --labels)")
    return [ShardInput(folder, table, name, spec if name == "table" else None, lists if name == "nih" else (None, None))
            for name, folder, table in zip(datasets, images, labels)]


@click.command("verify")
@click.argument("shards_dir", type=EXISTING_FOLDER)
@click.option("--deep", is_flag=True, help="Also decode every sample and check its labels.")
def verify_command(shards_dir: Path, deep: bool) -> None:
    """Check every shard against manifest.json (sha256, DALI index; --deep: every sample)."""
    problems = verify(shards_dir, deep=deep)
    for problem in problems:
        click.echo(f"FAIL {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{shards_dir}: all shards match the manifest")


@click.command()
@click.option("--labels", type=EXISTING_FILE, required=True, help="The data set's label table (as for shard).")
@click.option("--dataset", type=click.Choice(list(DATASETS)), help="The description that reads it (default nih).")
@click.option("--spec", type=EXISTING_FILE, help="--dataset table: the YAML naming its columns.")
@config_options(ShardConfig, "uncertain", "blank", "views", "relabel")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def eda(labels: Path, dataset: str, spec: Path | None, out: Path, **settings) -> None:
    """Exploratory report of a data set's labels, per source table: positive, negative, uncertain and blank
    counts per class, prevalence under the same policies as shard, co-occurrence, demographics."""
    config = build_config(ShardConfig, settings)
    request = Request(labels.parent, labels, config.uncertain, config.blank, config.views, spec,
                      relabel=read_relabel(config.relabel and Path(config.relabel)))
    table = read_dataset(dataset or "nih", request)
    check_uncertain_names(config.uncertain, tuple(table.applied["class_map"]))
    path = write_eda_report(table, out, str(labels))
    click.echo(f"wrote {path}")


@click.command()
@click.option("--shards", type=EXISTING_FOLDER, required=True)
@config_options(PreviewConfig, "split", "loader", "augment", "n")
@config_file_option(PreviewConfig)
@config_options(RunConfig, "data.image_size", "data.fit", "seed")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def preview(shards, image_size, fit, seed, out, **settings) -> None:
    """Write processed images (after CLAHE and augmentation, before normalisation) as OUT/<key>.png.

    With augmentation a contact sheet is written too. Compare --loader dali with --loader torch --no-augment.
    """
    paths = write_preview(shards, DataConfig(image_size=image_size, fit=fit), build_config(PreviewConfig, settings),
                          out, seed)
    click.echo(f"wrote {len(paths)} file(s) to {out}")


COMMANDS = (synth, shard, verify_command, eda, preview)
