"""Planning shards at MIMIC-CXR-JPG's scale: a sample table of 377,110 images of 65,379 patients with the official
split marked (as `mimic.read` gives it), planned by `plan_shards` (samples column by column) and, side by side in
the same run, by the per-row `.loc` lookups it replaced. The files are 1,000 small files named cyclically, so each
sample's size is a warm `stat` (as on a resume, which plans again); the time to read the tables is not counted.

    .venv/bin/python benchmarks/plan_shards.py --out benchmarks/results/cpu-2core-plan-shards.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.bench.machine import machine, write_json
from cxr_fast.config import ShardConfig
from cxr_fast.data.datasets import SampleTable, mimic
from cxr_fast.data.shards.writer import _whole, plan_shards

IMAGES, PATIENTS = 377_110, 65_379


def mimic_like(folder: Path, rows: int) -> SampleTable:
    """A MIMIC-sized sample table: labels as the CheXpert labeler gives them after the default policy, the official
    split by patient, keys and files set as `read_inputs` sets them."""
    rng = np.random.default_rng(0)
    files = [folder / f"{i:04d}.jpg" for i in range(1000)]
    for path in files:
        path.write_bytes(b"\xff\xd8" + bytes(100))
    numbers = np.sort(rng.integers(0, PATIENTS, rows))
    patients = numbers.astype(str)
    split = pd.Series(np.select([numbers % 100 < 97, numbers % 100 < 98], ["train", "val"], "test"))  # MIMIC's shares
    frame = pd.DataFrame({"image": [f"{i:040x}" for i in range(rows)], "path": None, "patient": patients,
                          "age": rng.integers(18, 90, rows).astype(float), "sex": rng.choice(["M", "F"], rows),
                          "view": rng.choice(["PA", "AP"], rows), "follow_up": np.nan, "split": split,
                          "finding_labels": "", "source": "mimic-cxr-2.0.0-chexpert.csv.gz"})
    frame["file"] = [files[i % len(files)] for i in range(rows)]
    frame["key"], frame["dataset"], frame["final_split"] = frame["image"], "mimic-cxr-jpg", split
    labels = (rng.random((rows, len(mimic.CLASSES))) < 0.1).astype(np.float32)
    labels[rng.random(labels.shape) < 0.05] = np.nan
    return SampleTable(frame, labels, mimic.CLASSES, mimic.NAME)


def per_row(table: SampleTable, rows: np.ndarray) -> list[dict]:
    """The planning as it was: one `frame.loc` lookup per sample."""
    samples = []
    for row in rows:
        entry, labels = table.frame.loc[row], table.labels[row]
        samples.append({"key": entry["key"], "path": str(entry["file"]), "size": Path(entry["file"]).stat().st_size,
                        "meta": {"image_index": entry["image"], "patient_id": str(entry["patient"]),
                                 "labels": np.nan_to_num(labels, nan=0.0).astype(int).tolist(),
                                 "mask": np.isfinite(labels).astype(int).tolist(), "age": _whole(entry["age"])}})
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rows", type=int, default=IMAGES)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        table = mimic_like(Path(folder), args.rows)
        started = time.perf_counter()
        jobs = plan_shards(table, ShardConfig(), Path(folder) / "shards")
        planned = time.perf_counter() - started
        started = time.perf_counter()
        per_row(table, np.arange(len(table.frame)))
        looked_up = time.perf_counter() - started
    result = {"machine": machine(), "rows": args.rows, "shards": len(jobs),
              "samples": sum(len(j["samples"]) for j in jobs), "plan_shards_seconds": round(planned, 2),
              "per_row_lookup_seconds": round(looked_up, 2), "speedup": round(looked_up / planned, 1)}
    write_json(result, args.out)


if __name__ == "__main__":
    main()
