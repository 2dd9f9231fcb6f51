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
    write_synthetic_dataset(out, SynthConfig(n_images=96, source_size=256, seed=3, workers=2))
    return out


@pytest.fixture(scope="session")
def chexpert_dir(tmp_path_factory) -> Path:
    """A synthetic CheXpert-v1.0-small layout: train.csv, valid.csv and the JPEG folders."""
    from cxr_fast.config import SynthConfig
    from cxr_fast.data.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("chexpert")
    write_synthetic_dataset(out, SynthConfig(layout="chexpert", n_images=72, source_size=96, seed=5, workers=2))
    return out


@pytest.fixture(scope="session")
def mimic_dir(tmp_path_factory) -> Path:
    """A synthetic MIMIC-CXR-JPG layout: files/ and the chexpert, metadata, split and patients tables."""
    from cxr_fast.config import SynthConfig
    from cxr_fast.data.synth import write_synthetic_dataset

    out = tmp_path_factory.mktemp("mimic")
    write_synthetic_dataset(out, SynthConfig(layout="mimic-cxr-jpg", n_images=60, source_size=96, seed=6, workers=2))
    return out


@pytest.fixture(scope="session")
def synth_shards(synth_dir, tmp_path_factory) -> Path:
    from cxr_fast.config import ShardConfig
    from cxr_fast.data.shards.writer import ShardInput, write_shards

    out = tmp_path_factory.mktemp("synth_shards")
    write_shards(ShardInput(synth_dir / "images_001", synth_dir / "Data_Entry_2017.csv"),
                 ShardConfig(out=str(out), workers=2, shard_size=16, val_fraction=0.25))
    return out


@pytest.fixture(scope="session")
def real_shards(tmp_path_factory) -> Path:
    if not REAL_IMAGES.is_dir():
        pytest.skip("../shared/data (real NIH sample) not present")
    from cxr_fast.config import ShardConfig
    from cxr_fast.data.shards.writer import ShardInput, write_shards

    out = tmp_path_factory.mktemp("real_shards")
    write_shards(ShardInput(REAL_IMAGES, REAL_TABLE), ShardConfig(out=str(out), workers=2, shard_size=50))
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_shards, tmp_path_factory) -> Path:
    """A one-epoch convnext_atto run on the synthetic shards (its checkpoints feed the analysis tests)."""
    from cxr_fast.config import RunConfig, replace
    from cxr_fast.training.run import run_training

    out = tmp_path_factory.mktemp("tiny_run")
    config = replace(RunConfig(), **{"model.name": "convnext_atto", "model.pretrained": False, "data.image_size": 64,
                                  "optim.batch_size": 4, "optim.accum": 2, "optim.epochs": 1, "optim.lr": 1e-3})
    run_training(config, synth_shards, out, show_progress=False)
    return out


def write_dicom(path, pixels, photometric="MONOCHROME2", bits=8, window=None, rle=False, frames=1,
                jpeg_bytes=None):
    """A minimal DX DICOM file (pydicom) holding `pixels`: what a hospital export of a radiograph looks like."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage, for presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if jpeg_bytes else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "test"
    colour = pixels.ndim == 3 and pixels.shape[-1] == 3
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else photometric
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if jpeg_bytes:
        ds.PixelData = encapsulate([jpeg_bytes])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
    if rle:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return path


def assert_same_run(whole_record, resumed_record, whole_dir, resumed_dir):
    """A resumed run ended exactly where the uninterrupted one did: the same metrics and the same weights."""
    import torch

    from cxr_fast.training.checkpoint import load_checkpoint

    for key in ("val_macro_auc", "val_loss", "train_loss", "step", "epoch"):
        assert resumed_record[key] == whole_record[key], key
    a = load_checkpoint(whole_dir / "checkpoints/last.pt")["model"]
    b = load_checkpoint(resumed_dir / "checkpoints/last.pt")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
