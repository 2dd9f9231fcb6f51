"""The `cxr-fast` command line: parses options and calls the module that owns the work, nothing else."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from cxr_fast.errors import CxrFastError

log = logging.getLogger("cxr_fast")


class _Group(click.Group):
    """Turns a `CxrFastError` (bad input the user can fix) into 'Error: …' and exit code 2, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CxrFastError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Fast, honest training and auditing of NIH ChestX-ray14 classifiers.

    \b
    Workflow:  synth (or an NIH download) → shard → train → analyze, plus eda, verify, preview, bench.
    The demo runs all of it on a synthetic data set:  cxr-fast demo --out outputs/demo
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--n-images", default=800, show_default=True, help="Number of images.")
@click.option("--image-size", default=1024, show_default=True, help="Side of the square PNGs (NIH: 1024).")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=2, show_default=True, help="Processes drawing images.")
def synth(out: Path, n_images: int, image_size: int, seed: int, workers: int) -> None:
    """Write a synthetic data set in the NIH layout (PNGs, Data_Entry_2017.csv, split lists).

    Each finding draws a pattern of its own, so a small CNN can learn it: the demo and the tests use this.
    """
    from cxr_fast.synth import SynthSpec, write_synthetic_dataset

    table = write_synthetic_dataset(out, SynthSpec(n_images=n_images, image_size=image_size, seed=seed), workers)
    click.echo(f"labels: {table}\nimages: {table.parent}")


@cli.command()
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Folder searched recursively for the images (NIH: images_001/images/...).")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Data_Entry_2017.csv (or .csv.gz).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("shards"), show_default=True)
@click.option("--test-list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Official test_list.txt (default: the one beside --labels, if any).")
@click.option("--train-val-list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Official train_val_list.txt (default: the one beside --labels, if any).")
@click.option("--val-fraction", default=0.1, show_default=True, help="Validation share (of train_val with lists).")
@click.option("--test-fraction", default=0.2, show_default=True, help="Test share, used only without split lists.")
@click.option("--shard-size", default=1000, show_default=True, help="Samples per tar.")
@click.option("--encoding", type=click.Choice(["png", "jpeg", "raw"]), default="png", show_default=True,
              help="png: lossless, pixel-identical; jpeg: decodes on the GPU; raw: uint8, no decoding.")
@click.option("--jpeg-quality", default=95, show_default=True)
@click.option("--resize", type=int, default=None, help="Store images resized to N x N (INTER_AREA).")
@click.option("--workers", default=2, show_default=True, help="Parallel shard writers.")
@click.option("--seed", default=0, show_default=True, help="Seed of the split and of the sample shuffle.")
@click.option("--on-error", type=click.Choice(["fail", "skip"]), default="fail", show_default=True,
              help="fail: stop at a bad input, remove this run's shards; skip: leave it out, list it in the manifest.")
def shard(images, labels, out, test_list, train_val_list, val_fraction, test_fraction, shard_size, encoding,
          jpeg_quality, resize, workers, seed, on_error) -> None:
    """Pack images into WebDataset shards with a patient-level split, DALI indexes and manifest.json.

    Re-running the same command skips shards that are already complete and correct.
    """
    from cxr_fast.shards import ShardSpec, write_shards

    spec = ShardSpec(encoding=encoding, jpeg_quality=jpeg_quality, resize=resize, shard_size=shard_size, seed=seed,
                     val_fraction=val_fraction, test_fraction=test_fraction, on_error=on_error)
    manifest = write_shards(images, labels, out, spec, workers, test_list, train_val_list)
    counts = ", ".join(f"{name} {s['images']} images / {s['patients']} patients"
                       for name, s in manifest["splits"].items())
    click.echo(f"{out}: {counts}; {len(manifest['skipped'])} skipped; "
               f"{manifest['rows_without_image']} table rows had no image")


@cli.command("verify")
@click.argument("shards_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--deep", is_flag=True, help="Also decode every sample and check its labels.")
def verify_command(shards_dir: Path, deep: bool) -> None:
    """Check every shard against manifest.json (sha256, DALI index; --deep: every sample)."""
    from cxr_fast.shards import verify

    problems = verify(shards_dir, deep=deep)
    for problem in problems:
        click.echo(f"FAIL {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{shards_dir}: all shards match the manifest")


@cli.command()
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def eda(labels: Path, out: Path) -> None:
    """Exploratory report of a label table: prevalence, co-occurrence, demographics."""
    from cxr_fast.labels import read_label_table
    from cxr_fast.report import write_eda_report

    path = write_eda_report(read_label_table(labels), out, str(labels))
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@click.option("--loader", "backend", type=click.Choice(["dali", "torch"]), default="dali", show_default=True)
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--n", default=16, show_default=True, help="Number of images.")
@click.option("--image-size", default=512, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def preview(shards, split, backend, augment, n, image_size, seed, out) -> None:
    """Write processed images (after CLAHE and augmentation, before normalisation) as OUT/<image_index>.

    With augmentation a contact sheet is written too. Compare --loader dali with --loader torch --no-augment.
    """
    from cxr_fast.config import DataConfig
    from cxr_fast.loader import write_preview

    paths = write_preview(shards, split, backend, DataConfig(image_size=image_size), n, out, augment, seed)
    click.echo(f"wrote {len(paths)} file(s) to {out}")


def _overrides(ctx: click.Context, mapping: dict[str, str]) -> dict:
    """Options the user typed (not defaults), as dotted config paths: they win over --config."""
    from click.core import ParameterSource

    return {path: ctx.params[name] for name, path in mapping.items()
            if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}


_TRAIN_OPTIONS = {
    "model": "model.name", "pretrained": "model.pretrained", "weights": "model.weights",
    "compile": "model.compile", "image_size": "data.image_size", "in_chans": "data.in_chans",
    "workers": "data.num_threads", "batch_size": "optim.batch_size", "accum": "optim.accum",
    "epochs": "optim.epochs", "lr": "optim.lr", "ema": "optim.ema_decay", "device": "device", "loader": "loader",
    "amp": "amp", "seed": "seed", "max_steps": "max_steps",
}


@cli.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML with any subset of the run config (see config.yaml of a run); flags override it.")
@click.option("--model", default="convnext_large", show_default=True, help="Any timm model name.")
@click.option("--pretrained/--no-pretrained", default=True, show_default=True, help="ImageNet weights (timm hub).")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), help="Local ImageNet checkpoint instead.")
@click.option("--image-size", default=512, show_default=True)
@click.option("--in-chans", type=click.Choice(["1", "3"]), default="1", show_default=True,
              callback=lambda _c, _p, v: int(v), help="1: gray stem (folded weights); 3: gray replicated.")
@click.option("--batch-size", default=4, show_default=True, help="Per device and micro-step.")
@click.option("--accum", default=8, show_default=True, help="Micro-steps per optimizer step.")
@click.option("--epochs", default=25, show_default=True)
@click.option("--lr", default=1e-4, show_default=True, help="Peak AdamW learning rate (warm-up, then cosine).")
@click.option("--ema", default=0.0, show_default=True, help="EMA decay of the weights (0: off).")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--loader", type=click.Choice(["dali", "torch"]), default="dali", show_default=True)
@click.option("--workers", type=int, default=None,
              help="DALI threads or DataLoader workers per rank (default: the cores shared among local ranks).")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto", show_default=True)
@click.option("--compile/--no-compile", default=False, show_default=True, help="torch.compile the model.")
@click.option("--seed", default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt with its config.")
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (the schedule is kept).")
@click.pass_context
def train(ctx, shards, out, config_file, resume, **_options) -> None:
    """Train a classifier on shards; writes OUT/checkpoints/{best,last}.pt, metrics.jsonl and config.yaml.

    \b
    Defaults are the seed's recipe: ConvNeXt-Large at 512, batch 4 x 8, 25 epochs, lr 1e-4 cosine, focal gamma 2.
    Multi-GPU:  torchrun --nproc_per_node=8 -m cxr_fast train --shards shards --out outputs/run
    """
    from cxr_fast.config import RunConfig, load_yaml, replace
    from cxr_fast.train import run_training

    config = load_yaml(config_file) if config_file else RunConfig()
    config = replace(config, **_overrides(ctx, _TRAIN_OPTIONS))
    record = run_training(config, shards, out, resume=resume)
    if record and "val_macro_auc" in record:
        click.echo(f"epoch {record['epoch']}: val macro AUC {record['val_macro_auc']:.4f}; checkpoints in "
                   f"{out / 'checkpoints'}")


@cli.command()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="best.pt or last.pt of a run (holds the validation thresholds).")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--split", default="test", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--loader", type=click.Choice(["dali", "torch"]), default="dali", show_default=True)
@click.option("--top-k", default=3, show_default=True, help="False positives and negatives shown per class.")
@click.option("--bbox", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="NIH BBox_List_2017.csv: adds localisation scores (IoBB, pointing game).")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--bootstrap", default=500, show_default=True, help="Patient-level bootstrap resamples for AUROC CIs.")
def analyze(checkpoint, shards, split, out, device, loader, top_k, bbox, batch_size, bootstrap) -> None:
    """Per-class metrics at validation thresholds, ROC/PR curves, Grad-CAM++ of the worst errors, report.md.

    Writes OUT/report.md, predictions.csv, metrics.json, curves/ and visualizations/{fp,fn}/.
    """
    from cxr_fast.analyze import run_analysis

    metrics = run_analysis(checkpoint, shards, out, split, device, loader, top_k, bbox, batch_size, bootstrap)
    click.echo(f"{split}: macro AUROC {metrics['macro']['auroc']:.4f}; report {out / 'report.md'}")


@cli.group()
def bench() -> None:
    """Throughput of the loaders and the trainer (JSON with the machine and settings; see benchmarks/)."""


def _report(result: dict, json_path) -> None:
    from cxr_fast.bench import write_json

    write_json(result, json_path)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "machine"}
    click.echo(json_path and f"{shown} -> {json_path}" or shown)


@bench.command("loader")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--split", default="train", show_default=True)
@click.option("--loader", "backend", type=click.Choice(["dali-gpu", "dali-cpu", "torch"]), required=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--batches", default=20, show_default=True, help="Measured batches, after --warmup.")
@click.option("--warmup", default=5, show_default=True)
@click.option("--image-size", default=512, show_default=True)
@click.option("--workers", type=int, default=None, help="DALI threads / DataLoader workers (default: all cores).")
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--decode", is_flag=True, help="Also measure decode alone per core (the decode-bound limit).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def bench_loader_command(shards, split, backend, batch_size, batches, warmup, image_size, workers, augment, decode,
                         json_path) -> None:
    """Images/s of one loader doing decode → resize → CLAHE → augment → normalised channels-last batches."""
    from cxr_fast.bench import bench_decode, bench_loader

    result = bench_loader(shards, split, backend, batch_size, batches, warmup, image_size, workers, augment)
    if decode:
        result["decode"] = bench_decode(shards, split)
    _report(result, json_path)


@bench.command("train")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Needed with --data dali or torch.")
@click.option("--model", default="convnext_large", show_default=True)
@click.option("--image-size", default=512, show_default=True)
@click.option("--batch-size", default=4, show_default=True)
@click.option("--steps", default=20, show_default=True)
@click.option("--warmup", default=3, show_default=True)
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto", show_default=True)
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--compile/--no-compile", default=False, show_default=True)
@click.option("--in-chans", type=click.Choice(["1", "3"]), default="1", callback=lambda _c, _p, v: int(v))
@click.option("--data", type=click.Choice(["synthetic", "dali", "torch"]), default="synthetic", show_default=True,
              help="synthetic: on-device tensors (the compute ceiling); dali/torch: the real loader.")
@click.option("--workers", type=int, default=None)
@click.option("--peak-tflops", type=float, default=None, help="Device peak for MFU where it is not known.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def bench_train_command(shards, model, image_size, batch_size, steps, warmup, amp, channels_last, compile, in_chans,
                        data, workers, peak_tflops, json_path) -> None:
    """Training images/s, data-wait share and MFU (counted FLOPs against the device peak)."""
    from cxr_fast.bench import bench_train

    if data != "synthetic" and shards is None:
        raise click.UsageError("--data dali/torch needs --shards")
    _report(bench_train(shards, model, image_size, batch_size, steps, warmup, amp, channels_last, compile, in_chans,
                        data, workers, peak_tflops), json_path)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs/demo"),
              show_default=True)
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A real NIH image folder (with --labels); default: synthetic data.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Data_Entry_2017.csv of that download.")
@click.option("--n-images", default=800, show_default=True, help="Synthetic images.")
@click.option("--epochs", type=int, default=None, help="Override the recipe's epochs (CPU 8, GPU 3).")
@click.option("--seed", default=0, show_default=True)
def demo(out, images, labels, n_images, epochs, seed) -> None:
    """The whole workflow end to end: data → shards → EDA → training → analysis → loader benchmark.

    On a 2-core CPU it takes a few minutes (tiny ConvNeXt at 128 px); with a GPU it trains ConvNeXt-Large at 512.
    """
    from cxr_fast.demo import DemoSpec, run_demo

    artefacts = run_demo(DemoSpec(out=out, images=images, labels=labels, n_images=n_images, epochs=epochs, seed=seed))
    click.echo("\nDemo finished. Artefacts:")
    for name, path in artefacts.items():
        click.echo(f"  {name:<11} {path}")


def main() -> None:
    cli(prog_name="cxr-fast")
