"""The `cxr-fast` command line: parses options and calls the module that owns the work, nothing else.

Options that are settings take their default, help text and valid range from `config.py`; a bad value ends with
`Error: …` naming the option, before any work starts.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from cxr_fast.config import RunConfig, ShardConfig, SynthConfig, describe
from cxr_fast.errors import CxrFastError

log = logging.getLogger("cxr_fast")
LOADERS = ("auto", "dali", "torch")


class _Group(click.Group):
    """Turns a `CxrFastError` (bad input the user can fix) into 'Error: …' and exit code 2, without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CxrFastError as error:
            click.echo(f"Error: {error}", err=True)
            sys.exit(2)
        except OSError as error:  # a full disk, a read-only folder, a file where a folder should be, ...
            where = f": {error.filename}" if error.filename else ""
            click.echo(f"Error: {error.strerror or error}{where}", err=True)
            sys.exit(2)


def setting(cls: type, path: str, *decls: str, **kwargs):
    """A click option for the config field at `path` below `cls`: its flag, default, help and choices."""
    default, f = describe(cls, path)
    rule = f.metadata
    flag = rule["flag"]
    kwargs.setdefault("default", default)
    kwargs.setdefault("show_default", default is not None)
    kwargs.setdefault("help", rule["help"])
    if isinstance(default, bool):
        decls = decls or (f"{flag}/--no-{flag[2:]}",)
    elif rule["choices"] is not None:
        kwargs.setdefault("type", click.Choice([str(c) for c in rule["choices"]]))
        if all(isinstance(c, int) for c in rule["choices"]):
            kwargs.setdefault("callback", lambda _c, _p, v: None if v is None else int(v))
            kwargs["default"] = str(default)
    elif str(f.type) == "int | str":
        kwargs.setdefault("metavar", "auto|N")
    elif "type" not in kwargs and str(f.type).endswith("| None"):
        kwargs["type"] = {"int | None": int, "float | None": float, "str | None": str}[str(f.type)]
    return click.option(*(decls or (flag,)), **kwargs)


def loader_option(**kwargs):
    return setting(RunConfig, "loader", "--loader", "backend", **kwargs)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Fast, honest training and auditing of NIH ChestX-ray14 classifiers.

    \b
    Workflow:  synth (or an NIH download) → shard → train → analyze → predict / export, plus eda, verify,
    preview, bench.
    The demo runs all of it on a synthetic data set:  cxr-fast demo --out outputs/demo
    """
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(message)s")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@setting(SynthConfig, "n_images")
@setting(SynthConfig, "source_size")
@setting(SynthConfig, "seed")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Processes drawing images.")
def synth(out: Path, n_images: int, source_size: int, seed: int, workers: int) -> None:
    """Write a synthetic data set in the NIH layout (PNGs, Data_Entry_2017.csv, split lists).

    Each finding draws a pattern of its own, so a small CNN can learn it: the demo and the tests use this.
    """
    from cxr_fast.data.synth import write_synthetic_dataset

    table = write_synthetic_dataset(out, SynthConfig(n_images=n_images, source_size=source_size, seed=seed), workers)
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
@setting(ShardConfig, "val_fraction")
@setting(ShardConfig, "test_fraction")
@setting(ShardConfig, "shard_size")
@setting(ShardConfig, "encoding")
@setting(ShardConfig, "jpeg_quality")
@setting(ShardConfig, "resize")
@setting(ShardConfig, "seed")
@setting(ShardConfig, "on_error")
@setting(ShardConfig, "max_pixels")
@click.option("--workers", type=click.IntRange(min=1), default=2, show_default=True, help="Parallel shard writers.")
@click.option("--overwrite", is_flag=True, help="Replace a complete shard set in --out made with other settings.")
def shard(images, labels, out, test_list, train_val_list, workers, overwrite, **settings) -> None:
    """Pack images into WebDataset shards with a patient-level split, DALI indexes and manifest.json.

    Re-running the same command skips shards that are already complete and correct.
    """
    from cxr_fast.data.writer import write_shards

    manifest = write_shards(images, labels, out, ShardConfig(**settings), workers, test_list, train_val_list,
                            overwrite)
    counts = ", ".join(f"{name} {s['images']} images / {s['patients']} patients"
                       for name, s in manifest["splits"].items())
    click.echo(f"{out}: {counts}; {len(manifest['skipped'])} skipped; "
               f"{manifest['rows_without_image']} table rows had no image")


@cli.command("verify")
@click.argument("shards_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--deep", is_flag=True, help="Also decode every sample and check its labels.")
def verify_command(shards_dir: Path, deep: bool) -> None:
    """Check every shard against manifest.json (sha256, DALI index; --deep: every sample)."""
    from cxr_fast.data.verify import verify

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
    from cxr_fast.data.eda import write_eda_report
    from cxr_fast.data.labels import read_label_table

    path = write_eda_report(read_label_table(labels), out, str(labels))
    click.echo(f"wrote {path}")


@cli.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="train", show_default=True)
@loader_option()
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--n", type=click.IntRange(min=1), default=16, show_default=True, help="Number of images.")
@setting(RunConfig, "data.image_size")
@setting(RunConfig, "seed")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
def preview(shards, split, backend, augment, n, image_size, seed, out) -> None:
    """Write processed images (after CLAHE and augmentation, before normalisation) as OUT/<image_index>.

    With augmentation a contact sheet is written too. Compare --loader dali with --loader torch --no-augment.
    """
    from cxr_fast.config import DataConfig
    from cxr_fast.data.preview import write_preview

    paths = write_preview(shards, split, backend, DataConfig(image_size=image_size), n, out, augment, seed)
    click.echo(f"wrote {len(paths)} file(s) to {out}")


_TRAIN_SETTINGS = ("model.name", "model.pretrained", "model.weights", "model.compile", "data.image_size",
                   "data.in_chans", "data.workers", "optim.batch_size", "optim.accum", "optim.epochs", "optim.lr",
                   "optim.ema_decay", "optim.effective_batch", "device", "loader", "amp", "seed", "max_steps",
                   "tensorboard", "cudnn_benchmark")


def _train_options(command):
    for path in reversed(_TRAIN_SETTINGS):
        command = setting(RunConfig, path)(command)
    return command


def _overrides(ctx: click.Context) -> dict:
    """Settings the user typed (not defaults), as dotted config paths: they win over --config."""
    from click.core import ParameterSource

    by_name = {p.name: p for p in ctx.command.params}
    chosen = {}
    for path in _TRAIN_SETTINGS:
        name = describe(RunConfig, path)[1].metadata["flag"].lstrip("-").replace("-", "_")
        if by_name.get(name) and ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            chosen[path] = ctx.params[name]
    return chosen


@cli.command()
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Run folder.")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML with any subset of the run config (see config.yaml of a run); flags override it.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoints/last.pt with its config.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in OUT (its checkpoints and metrics).")
@_train_options
@click.pass_context
def train(ctx, shards, out, config_file, resume, overwrite, **_settings) -> None:
    """Train a classifier on shards; writes OUT/checkpoints/{best,last}.pt, metrics.jsonl and config.yaml.

    \b
    Defaults are the seed's recipe: ConvNeXt-Large at 512, 32 images per optimizer step (the largest micro-batch that
    fits, x accumulation), 25 epochs, lr 1e-4 cosine, focal gamma 2.
    Multi-GPU:  torchrun --nproc_per_node=8 -m cxr_fast train --shards shards --out outputs/run
    """
    from cxr_fast.config import load_yaml, replace
    from cxr_fast.training.run import run_training

    changes = _overrides(ctx)
    if resume:  # the run's own config, with the changes a resume may make (checked there)
        if config_file:
            raise click.UsageError("--config sets up a new run; --resume continues the one in --out with its config")
        record = run_training(RunConfig(), shards, out, resume=True, changes=changes)
    else:
        config = load_yaml(config_file) if config_file else RunConfig()
        record = run_training(replace(config, **changes), shards, out, overwrite=overwrite)
    if record and "val_macro_auc" in record:
        click.echo(f"epoch {record['epoch']}: val macro AUC {record['val_macro_auc']:.4f}; checkpoints in "
                   f"{out / 'checkpoints'}")


@cli.command()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="best.pt or last.pt of a run (holds the validation thresholds).")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True)
@click.option("--split", default="test", show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@setting(RunConfig, "device")
@loader_option()
@click.option("--top-k", type=click.IntRange(min=0), default=3, show_default=True,
              help="False positives and negatives shown per class.")
@click.option("--bbox", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="NIH BBox_List_2017.csv: adds localisation scores (IoBB, pointing game).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--bootstrap", type=click.IntRange(min=0), default=500, show_default=True,
              help="Patient-level bootstrap resamples for AUROC CIs (0: none).")
def analyze(checkpoint, shards, split, out, device, backend, top_k, bbox, batch_size, bootstrap) -> None:
    """Per-class metrics at validation thresholds, ROC/PR curves, Grad-CAM++ of the worst errors, report.md.

    Writes OUT/report.md, predictions.csv, metrics.json, curves/ and visualizations/{fp,fn}/.
    """
    from cxr_fast.evaluation.analyze import run_analysis

    metrics = run_analysis(checkpoint, shards, out, split, device, backend, top_k, bbox, batch_size, bootstrap)
    click.echo(f"{split}: macro AUROC {metrics['macro']['auroc']:.4f}; report {out / 'report.md'}")


@cli.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="best.pt of a run, or model.onnx written by `cxr-fast export` (with its model.json).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for predictions.csv (and cam/).")
@setting(RunConfig, "device")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Threads reading and processing images (default: all cores).")
@click.option("--cam", is_flag=True, help="Write a Grad-CAM++ overlay per positive finding to OUT/cam/.")
@setting(ShardConfig, "max_pixels")
def predict_command(inputs, checkpoint, out, device, batch_size, workers, cam, max_pixels) -> None:
    """Score new images: PNG, JPEG or DICOM files, or folders of them (searched recursively).

    Writes OUT/predictions.csv: image, prob_<Class> (the model's output), calibrated_<Class> (where the checkpoint
    carries a calibration), findings (the classes at or above the validation thresholds, or No Finding) and error.
    Exits with code 1 when some input could not be scored (its row says why); the others are still scored.
    """
    from cxr_fast.evaluation.predict import predict, write_summary
    from cxr_fast.training.engine import resolve_device

    table = predict(checkpoint, list(inputs), out, resolve_device(device), batch_size, workers, cam, max_pixels)
    click.echo(f"{write_summary(table)}; predictions in {out / 'predictions.csv'}")
    if table["error"].astype(bool).any():
        sys.exit(1)


@cli.command("export")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="best.pt of a run.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for model.onnx and model.json.")
def export_command(checkpoint, out) -> None:
    """Export a checkpoint to ONNX (input: normalised N x C x H x W float, output: 14 logits, any batch size),
    with model.json beside it (classes, thresholds, calibration, preprocessing). The export checks that ONNX Runtime
    and PyTorch agree within 1e-3 before it reports success."""
    from cxr_fast.evaluation.export import export_onnx

    meta = export_onnx(checkpoint, out)
    click.echo(f"{out / 'model.onnx'}: probabilities within {meta['parity_max_abs_difference']:.1e} of PyTorch; "
               f"score with `cxr-fast predict --checkpoint {out / 'model.onnx'} --out DIR IMAGES`")


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
@loader_option()
@click.option("--dali-cpu", is_flag=True, help="Keep the DALI pipeline on the CPU even where a GPU is present.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--batches", type=click.IntRange(min=1), default=50, show_default=True,
              help="Measured batches, after --warmup (epochs repeat as needed).")
@click.option("--warmup", type=click.IntRange(min=0), default=10, show_default=True,
              help="Batches before timing starts (prefetch fill).")
@setting(RunConfig, "data.image_size")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DALI threads / DataLoader workers (default: all cores).")
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--decode", is_flag=True, help="Also measure decode alone per core (the decode-bound limit).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def bench_loader_command(shards, split, backend, dali_cpu, batch_size, batches, warmup, image_size, workers, augment,
                         decode, json_path) -> None:
    """Steady-state images/s and CPU core-ms per image of one loader doing decode → resize → CLAHE → augment →
    normalised channels-last batches."""
    from cxr_fast.bench import bench_decode, bench_loader

    result = bench_loader(shards, split, backend, batch_size, batches, warmup, image_size, workers, augment, dali_cpu)
    if decode:
        result["decode"] = bench_decode(shards, split)
    _report(result, json_path)


@bench.command("train")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Needed with --data auto, dali or torch.")
@setting(RunConfig, "model.name")
@setting(RunConfig, "data.image_size")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Micro-batch.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@setting(RunConfig, "amp")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@setting(RunConfig, "model.compile")
@setting(RunConfig, "data.in_chans")
@click.option("--data", type=click.Choice(["synthetic", *LOADERS]), default="synthetic", show_default=True,
              help="synthetic: on-device tensors (the compute ceiling); a loader name: that loader on --shards.")
@click.option("--workers", type=click.IntRange(min=0), default=None)
@click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Device peak for MFU where it is not known.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
def bench_train_command(shards, model, image_size, batch_size, steps, warmup, amp, channels_last, compile, in_chans,
                        data, workers, peak_tflops, json_path) -> None:
    """Training images/s, data-wait share and MFU (FLOPs counted with the grouped-convolution backward right)."""
    from cxr_fast.bench import bench_train

    if data != "synthetic" and shards is None:
        raise click.UsageError("--data with a loader needs --shards")
    _report(bench_train(shards, model, image_size, batch_size, steps, warmup, amp, channels_last, compile, in_chans,
                        data, workers, peak_tflops), json_path)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("outputs/demo"),
              show_default=True)
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A real NIH image folder (with --labels); default: synthetic data.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Data_Entry_2017.csv of that download.")
@setting(SynthConfig, "n_images", help="Synthetic images.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's epochs (CPU 8, GPU 3).")
@setting(SynthConfig, "seed")
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
