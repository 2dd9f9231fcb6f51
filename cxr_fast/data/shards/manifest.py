"""Reading a shard set: its manifest (checked for its format version), the tars of a split, their samples, and the
key -> image/patient table the analysis joins predictions with."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cxr_fast.errors import CxrFastError

MANIFEST = "manifest.json"
SHARD_FORMAT_VERSION = 3  # 3: a mask of stated labels per sample, the data set of each; 2: age, sex, view
READABLE_FORMATS = (2, 3)  # format 2 reads as every label stated


def load_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrFastError(f"no {MANIFEST} in {shards_dir}: is this a folder written by `cxr-fast shard`?") from None
    except (OSError, ValueError) as error:
        raise CxrFastError(f"cannot read {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") not in READABLE_FORMATS:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CxrFastError(f"{path}: shard format {version}, this version reads {' and '.join(map(str, READABLE_FORMATS))}"
                           " (2 adds each sample's age, sex and view for the subgroup audit); re-run `cxr-fast shard`")
    return manifest


def has_mask(manifest: dict) -> bool:
    """Whether samples carry a `.mask` component (format 3 on); without one every label is stated."""
    return manifest["format_version"] >= 3


def split_shards(shards_dir: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    """The tar files of a split, in manifest order; a clear error when the split is missing or empty."""
    manifest = manifest or load_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise CxrFastError(f"unknown split {split!r}; the manifest has {', '.join(manifest['splits'])}")
    names = manifest["splits"][split]["shards"]
    if not names:
        raise CxrFastError(f"split {split!r} in {shards_dir} has no shards (0 images)")
    check_unique_keys(manifest, split, shards_dir)
    return [Path(shards_dir) / name for name in names]


def check_unique_keys(manifest: dict, split: str, shards_dir: str | Path) -> None:
    """Every sample key of a split once (a shard listed twice, or a sample copied into another shard, would be scored
    twice and misalign the analysis): an error naming the key otherwise."""
    seen: dict[str, str] = {}
    for name in manifest["splits"][split]["shards"]:
        record = manifest["shards"].get(name)
        if record is None:
            raise CxrFastError(f"{Path(shards_dir) / MANIFEST}: split {split!r} lists {name}, which it does not "
                               "describe; run `cxr-fast verify`")
        for key in record["keys"]:
            if key in seen:
                raise CxrFastError(f"{Path(shards_dir) / MANIFEST}: sample {key!r} is listed twice in split {split!r} "
                                   f"({seen[key]} and {name}); the shard set is damaged: run `cxr-fast verify --deep` "
                                   "or re-shard")
            seen[key] = name


def sample_table(manifest: dict, split: str) -> pd.DataFrame:
    """One row per sample of a split, indexed by key: image_index, patient_id, age, sex, view, dataset; from the
    manifest (format 2 names no data set: its samples are NIH's)."""
    rows = []
    for name in manifest["splits"][split]["shards"]:
        record = manifest["shards"][name]
        datasets = record.get("dataset") or ["nih"] * len(record["keys"])
        rows += zip(record["keys"], record["image_index"], record["patients"], record["age"], record["sex"],
                    record["view"], datasets)
    return pd.DataFrame(rows, columns=["key", "image_index", "patient_id", "age", "sex", "view", "dataset"]
                        ).set_index("key")
