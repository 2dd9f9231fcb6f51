"""`cxr-fast demo`: the whole workflow on one default, end to end, with a summary of where each artefact is.

Without --images/--labels it makes a synthetic NIH-format data set. On the CPU it trains a tiny ConvNeXt
(convnext_atto, 128 px, from scratch) for a few minutes; with a GPU, ConvNeXt-Large at 512 for a few epochs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from cxr_fast.bench.loader import bench_loader
from cxr_fast.bench.machine import write_json
from cxr_fast.config import (AnalyzeConfig, BenchLoaderConfig, DemoConfig, RunConfig, ShardConfig, SynthConfig,
                             replace)
from cxr_fast.data.datasets.eda import write_eda_report
from cxr_fast.data.datasets import Request, read_dataset
from cxr_fast.data.synth import write_synthetic_dataset
from cxr_fast.data.shards.writer import ShardInput, write_shards
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluation.analyze import run_analysis
from cxr_fast.training.run import run_training

log = logging.getLogger(__name__)

CPU_RECIPE = {"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 128,
              "optim.batch_size": 16, "optim.accum": 1, "optim.epochs": 8, "optim.lr": 2e-3, "loader": "auto"}
GPU_RECIPE = {"model.name": "convnext_large", "data.image_size": 512, "optim.batch_size": "auto",
              "optim.epochs": 3, "optim.lr": 1e-4, "loader": "auto"}


def run_demo(config: DemoConfig) -> dict[str, Path]:
    """Run every stage into `config.out`; returns where each artefact is."""
    out = Path(config.out)
    if (config.images is None) != (config.labels is None):
        raise CxrFastError("give both --images and --labels (a real NIH download), or neither (synthetic data)")
    steps = 6
    if config.images is None:
        log.info("[1/%d] synthetic NIH-format data: %d images", steps, config.n_images)
        labels = write_synthetic_dataset(out / "data", SynthConfig(n_images=config.n_images,
                                                                   source_size=config.source_size, seed=config.seed))
        images = labels.parent
    else:
        log.info("[1/%d] real data: %s", steps, config.images)
        images, labels = Path(config.images), Path(config.labels)
    log.info("[2/%d] shards (patient-level split)", steps)
    write_shards(ShardInput(images, labels), ShardConfig(out=str(out / "shards"), val_fraction=0.15, shard_size=250,
                                             seed=config.seed))
    log.info("[3/%d] EDA of the label table", steps)
    write_eda_report(read_dataset("nih", Request(Path(images), Path(labels))), out / "eda", str(labels))

    gpu = torch.cuda.is_available()
    recipe = dict(GPU_RECIPE if gpu else CPU_RECIPE, seed=config.seed)
    if config.epochs:
        recipe["optim.epochs"] = config.epochs
    run_config = replace(RunConfig(), **recipe)
    log.info("[4/%d] training %s at %d px on %s", steps, run_config.model.name, run_config.data.image_size,
             "the GPU" if gpu else "the CPU")
    try:
        run_training(run_config, out / "shards", out / "run", overwrite=True)  # the demo owns its folder
    except CxrFastError as error:
        if not run_config.model.pretrained or "ImageNet weights" not in str(error):
            raise
        log.warning("%s\nThe demo goes on with random initial weights.", error)
        run_training(replace(run_config, **{"model.pretrained": False}), out / "shards", out / "run", overwrite=True)

    log.info("[5/%d] analysis of the test split with Grad-CAM++", steps)
    boxes = Path(labels).parent / "BBox_List_2017.csv"
    run_analysis(out / "run/checkpoints/best.pt", out / "shards", out / "analysis",
                 AnalyzeConfig(top_k=2, bbox=str(boxes) if boxes.exists() else None, bootstrap=200),
                 overwrite=True)  # the demo owns its folder
    log.info("[6/%d] loader benchmark", steps)
    write_json(bench_loader(out / "shards", BenchLoaderConfig(loader=run_config.loader, batch_size=16, batches=10,
                                                              warmup=2, image_size=run_config.data.image_size)),
               out / "bench-loader.json")
    return {"data": Path(images), "labels": Path(labels), "shards": out / "shards",
            "manifest": out / "shards/manifest.json",
            "eda": out / "eda/report.md", "checkpoint": out / "run/checkpoints/best.pt",
            "metrics": out / "run/metrics.jsonl", "report": out / "analysis/report.md",
            "gradcam": out / "analysis/visualizations", "benchmark": out / "bench-loader.json"}
