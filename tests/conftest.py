"""Shared fixtures: a small synthetic NIH-format data set and shards of it, and the real NIH sample when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests run on 2 cores: keep BLAS and torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")

ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = ROOT.parent / "shared" / "data"
REAL_IMAGES = REAL_DATA / "nih-sample" / "images"
REAL_TABLE = REAL_DATA / "meta" / "Data_Entry_2017_v2020.csv.gz"
REAL_BOXES = REAL_DATA / "meta" / "BBox_List_2017.csv.gz"

needs_real_data = pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason="../shared/data (real NIH sample) not present")


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    from cxr_fast.config import SynthConfig
    from cxr_fast.data.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, SynthConfig(n_images=96, source_size=256, seed=3), workers=2)
    return out


@pytest.fixture(scope="session")
def synth_shards(synth_dir, tmp_path_factory) -> Path:
    from cxr_fast.config import ShardConfig
    from cxr_fast.data.writer import write_shards

    out = tmp_path_factory.mktemp("synth_shards")
    write_shards(synth_dir / "images_001", synth_dir / "Data_Entry_2017.csv", out,
                 ShardConfig(shard_size=16, val_fraction=0.25), workers=2)
    return out


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory) -> Path:
    if not REAL_IMAGES.is_dir():
        pytest.skip("../shared/data (real NIH sample) not present")
    from cxr_fast.config import ShardConfig
    from cxr_fast.data.writer import write_shards

    out = tmp_path_factory.mktemp("real_shards")
    write_shards(REAL_IMAGES, REAL_TABLE, out, ShardConfig(shard_size=50), workers=2)
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_shards, tmp_path_factory) -> Path:
    """A one-epoch convnext_atto run on the synthetic shards (its checkpoints feed the analysis tests)."""
    from cxr_fast.config import RunConfig, replace
    from cxr_fast.training.run import run_training

    out = tmp_path_factory.mktemp("tiny_run")
    cfg = replace(RunConfig(), **{"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 64,
                                  "optim.batch_size": 4, "optim.accum": 2, "optim.epochs": 1, "optim.lr": 1e-3})
    run_training(cfg, synth_shards, out, show_progress=False)
    return out
