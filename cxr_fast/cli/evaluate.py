"""The evaluation commands: analyze, predict, export."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cxr_fast.cli.options import build_config, config_file_option, config_option, config_options
from cxr_fast.config import AnalyzeConfig, PredictConfig
from cxr_fast.data.datasets import DATASETS
from cxr_fast.evaluation.analyze import run_analysis
from cxr_fast.evaluation.export import export_onnx
from cxr_fast.evaluation.external import run_external_analysis
from cxr_fast.evaluation.predict import predict, write_summary

OUT_FOLDER = click.Path(file_okay=False, path_type=Path)


@click.command()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="best.pt or last.pt of a run (holds the validation thresholds).")
@click.option("--shards", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The shard set whose --split is scored (or --predictions with --labels).")
@click.option("--predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="predictions.csv made elsewhere (`cxr-fast predict` on an external test set), scored against "
                   "--labels instead of a shard split.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --predictions: the label table of those images (in the layout --dataset names).")
@config_option(AnalyzeConfig, "dataset", type=click.Choice(list(DATASETS)))
@config_option(AnalyzeConfig, "split")
@click.option("--out", type=OUT_FOLDER, required=True)
@config_options(AnalyzeConfig, "device", "loader", "top_k")
@config_option(AnalyzeConfig, "bbox", type=click.Path(exists=True, dir_okay=False))
@config_options(AnalyzeConfig, "batch_size", "bootstrap")
@click.option("--overwrite", is_flag=True, help="Replace this command's earlier results in --out.")
@config_file_option(AnalyzeConfig)
def analyze(checkpoint, shards, predictions, labels, out, overwrite, **settings) -> None:
    """Per-class metrics at validation thresholds, ROC/PR curves, Grad-CAM++ of the worst errors, report.md.

    Writes OUT/report.md, predictions.csv, metrics.json, curves/ and visualizations/{fp,fn}/. With --predictions and
    --labels, an external test set is scored the same way (no Grad-CAM++: the images are not read).
    """
    config = build_config(AnalyzeConfig, settings)
    if (shards is None) == (predictions is None) or (predictions is None) != (labels is None):
        raise click.UsageError("give --shards, or --predictions with --labels")
    if predictions is not None:
        metrics = run_external_analysis(checkpoint, predictions, labels, out, config, overwrite)
    else:
        metrics = run_analysis(checkpoint, shards, out, config, overwrite)
    click.echo(f"{metrics['split']}: macro AUROC {metrics['macro']['auroc']:.4f}; report {out / 'report.md'}")


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="best.pt of a run, or model.onnx written by `cxr-fast export` (with its model.json).")
@click.option("--out", type=OUT_FOLDER, required=True, help="Folder for predictions.csv (and cam/).")
@config_options(PredictConfig, "device", "batch_size", "workers")
@config_option(PredictConfig, "cam", "--cam", is_flag=True)
@config_option(PredictConfig, "any_modality", "--any-modality", is_flag=True)
@config_options(PredictConfig, "max_pixels", "operating_point")
@click.option("--overwrite", is_flag=True, help="Replace this command's earlier results in --out.")
@config_file_option(PredictConfig)
def predict_command(inputs, checkpoint, out, overwrite, **settings) -> None:
    """Score new images: PNG, JPEG or DICOM files, or folders of them (searched recursively).

    Writes OUT/predictions.csv: image, prob_<Class> (the model's output), calibrated_<Class> (where the checkpoint
    carries a calibration), findings (the findings at or above the thresholds of --operating-point, chosen on
    validation; empty when none), no_finding_called (the No Finding output where the model has one, else no
    finding called), error, operating_point, warning and, for DICOM, the SOP and Study Instance UIDs and the view
    position. Exits with code 1 when some input could not be scored (its row says why); the others are
    still scored.
    """
    table = predict(checkpoint, list(inputs), out, build_config(PredictConfig, settings), overwrite)
    click.echo(f"{write_summary(table)}; predictions in {out / 'predictions.csv'}")
    if table["error"].astype(bool).any():
        sys.exit(1)


@click.command("export")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="best.pt of a run.")
@click.option("--out", type=OUT_FOLDER, required=True, help="Folder for model.onnx and model.json.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out.")
def export_command(checkpoint, out, overwrite) -> None:
    """Export a checkpoint to ONNX (input: normalised N x C x H x W float, output: the class logits, any batch size),
    with model.json beside it (classes, thresholds, calibration, preprocessing). The export checks that ONNX Runtime
    and PyTorch agree within 1e-3 before it reports success."""
    meta = export_onnx(checkpoint, out, overwrite)
    click.echo(f"{out / 'model.onnx'}: probabilities within {meta['parity_max_abs_difference']:.1e} of PyTorch; "
               f"score with `cxr-fast predict --checkpoint {out / 'model.onnx'} --out DIR IMAGES`")


COMMANDS = (analyze, predict_command, export_command)
