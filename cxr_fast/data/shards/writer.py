"""`cxr-fast shard`: one or more data sets (`inputs.py`) → WebDataset shards, the one artefact every later stage
reads.

Layout: `<out>/{train,val,test}/shard-NNNNNN.tar`, a DALI index (`.idx`, wds2idx format v1.2) beside each tar, and
`<out>/manifest.json`. A sample holds:
  <key>.png|jpg|raw  the image (png: lossless, pixel-identical to the source in gray; jpg: GPU-decodable, a JPEG
                     source's own bytes; raw: uint8)
  <key>.shape        raw only: int32 (height, width, 1), so DALI can reshape the bytes
  <key>.labels       uint8 per class of the manifest, 1 positive: fixed size, read by DALI directly
  <key>.mask         uint8 per class, 1 where the label is stated (0: uncertain under `ignore`, blank under
                     `--blank masked`, or a class its data set does not have); format 3 on
  <key>.id           the key as 64 NUL-padded ASCII bytes: fixed size, so DALI batches carry image names
  <key>.json         image_index, patient_id, dataset, finding_labels (the table's text), labels, mask, split,
                     age, sex, view, follow_up, height, width

Writing is parallel, each shard goes to a temporary name and is renamed when complete, and the state of finished
shards is kept in `<out>/.progress.json`, so re-running an interrupted command redoes only unfinished shards. Samples
are shuffled before they are cut into shards, because DALI's reader shuffles only within a buffer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr_fast import __version__
from cxr_fast import constants as C
from cxr_fast.config import ShardConfig
from cxr_fast.data.datasets import SampleTable, describe
from cxr_fast.data.datasets.base import count_dropped
from cxr_fast.data.shards.inputs import ShardInput, read_inputs
from cxr_fast.data.shards.manifest import SHARD_FORMAT_VERSION
from cxr_fast.data.shards.sample import EXTENSIONS, encode_id, encode_image
from cxr_fast.data.shards.folder import ShardFolder
from cxr_fast.data.images.source import read_gray
from cxr_fast.data.datasets.split import split_summary
from cxr_fast.data.shards.tars import add_member, dali_index
from cxr_fast.files import sha256_file
from cxr_fast.errors import BadInput, CxrFastError
from cxr_fast.files import folder_lock

log = logging.getLogger(__name__)


def _write_shard(job: dict) -> dict:
    """Worker: write one shard (tar + index) under temporary names, then rename. Returns its manifest record."""
    config = ShardConfig(**job["config"])
    tar_path, idx_path = Path(job["tar"]), Path(job["idx"])
    tmp_tar, tmp_idx = tar_path.with_suffix(".tar.tmp"), idx_path.with_suffix(".idx.tmp")
    skipped, keys, patients, image_names, demographics = [], [], [], [], {"age": [], "sex": [], "view": [],
                                                                   "dataset": []}
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in job["samples"]:
                try:
                    source = read_gray(Path(sample["path"]), config.max_pixels)
                except BadInput as bad:
                    if config.on_error == "fail":
                        raise
                    skipped.append({"file": bad.path, "reason": bad.reason})
                    continue
                gray = source.gray
                if config.resize:
                    gray = cv2.resize(gray, (config.resize, config.resize), interpolation=cv2.INTER_AREA)
                # A source already in the stored encoding (an 8-bit gray PNG; a JPEG without EXIF turns) keeps its
                # bytes: no re-encoding, and for JPEG no second lossy generation.
                if not config.resize and source.stored_as == config.encoding:
                    components = {EXTENSIONS[config.encoding]: source.data}
                else:
                    components = encode_image(gray, config.encoding, config.jpeg_quality)
                key = sample["key"]
                meta = dict(sample["meta"], height=int(gray.shape[0]), width=int(gray.shape[1]))
                components["labels"] = np.asarray(sample["meta"]["labels"], np.uint8).tobytes()
                components["mask"] = np.asarray(sample["meta"]["mask"], np.uint8).tobytes()
                components["id"] = encode_id(key)
                components["json"] = json.dumps(meta).encode()
                for ext in sorted(components):
                    add_member(tar, f"{key}.{ext}", components[ext])
                keys.append(key)
                patients.append(meta["patient_id"])
                image_names.append(meta["image_index"])
                for field, values in demographics.items():
                    values.append(meta[field])
        if not keys:
            raise BadInput(job["tar"], "no sample of this shard could be read")
        tmp_idx.write_text(dali_index(tmp_tar))
        digest = sha256_file(tmp_tar)
        os.replace(tmp_idx, idx_path)
        os.replace(tmp_tar, tar_path)  # the tar last: a complete tar always has its index
    finally:
        for tmp in (tmp_tar, tmp_idx):
            tmp.unlink(missing_ok=True)
    return {"name": job["name"], "sha256": digest, "samples": len(keys), "keys": keys, "patients": patients,
            "image_index": image_names, **demographics, "skipped": skipped, "digest": job["digest"]}


# ----------------------------------------------------------------------------------------------------- planning
def _digest(config: ShardConfig, samples: list[dict]) -> str:
    content = {k: v for k, v in asdict(config).items() if k not in ("out", "workers")}
    blob = json.dumps({"config": content | {"on_error": None, "max_pixels": None},  # policy, not content
                       "samples": [(s["key"], s["meta"]["labels"], s["meta"]["mask"], s["size"]) for s in samples]})
    return hashlib.sha256(blob.encode()).hexdigest()


def _whole(value) -> int | None:
    return None if value is None or not np.isfinite(value) else int(value)


def _samples(table: SampleTable, rows: np.ndarray) -> list[dict]:
    """The shard samples of `rows`, column by column (no per-row lookups: 377,000 rows plan in seconds)."""
    frame, labels = table.frame.iloc[rows], table.labels[rows]
    files = frame["file"].map(str).tolist()
    columns = zip(frame["key"], files, frame["image"], frame["patient"].map(str), frame["dataset"],
                  frame["finding_labels"], np.nan_to_num(labels, nan=0.0).astype(int).tolist(),
                  np.isfinite(labels).astype(int).tolist(), frame["final_split"], map(_whole, frame["age"]),
                  frame["sex"], frame["view"], map(_whole, frame["follow_up"]), map(os.path.getsize, files))
    return [{"key": key, "path": file, "size": size,
             "meta": {"image_index": image, "patient_id": patient, "dataset": dataset, "finding_labels": text,
                      "labels": label, "mask": mask, "split": split, "age": age, "sex": sex, "view": view,
                      "follow_up": follow_up}}
            for (key, file, image, patient, dataset, text, label, mask, split, age, sex, view, follow_up, size)
            in columns]


def plan_shards(table: SampleTable, config: ShardConfig, out: Path) -> list[dict]:
    """Shard jobs per split, with samples shuffled (seeded) before they are cut into shards."""
    rng = np.random.default_rng(config.seed)
    jobs, content = [], asdict(config)
    for split_name in C.SPLITS:
        rows = np.flatnonzero((table.frame["final_split"] == split_name).to_numpy())
        samples = _samples(table, rows[rng.permutation(len(rows))])
        for number, start in enumerate(range(0, len(samples), config.shard_size)):
            chunk = samples[start:start + config.shard_size]
            name = f"{split_name}/shard-{number:06d}"
            jobs.append({"name": f"{name}.tar", "tar": str(out / f"{name}.tar"), "idx": str(out / f"{name}.idx"),
                         "config": content, "samples": chunk, "digest": _digest(config, chunk)})
    return jobs


@dataclass
class ManifestInput:
    """What a shard set is made from: the merged sample table (rows that have an image and a split; its `dropped`
    the others) and the inputs it was read from."""

    table: SampleTable
    inputs: list


def write_shards(inputs: ShardInput | list[ShardInput], config: ShardConfig = ShardConfig(),
                 overwrite: bool = False) -> dict:
    """The `cxr-fast shard` command: shards of one or more data sets in `config.out`. Returns the manifest."""
    inputs = [inputs] if isinstance(inputs, ShardInput) else list(inputs)
    out = Path(config.out)
    table, skipped = read_inputs(inputs, config)
    config = replace(config, encoding=resolve_encoding(config.encoding, table.frame["file"]))
    jobs = plan_shards(table, config, out)
    with folder_lock(out, "shards"):
        folder = ShardFolder(out, overwrite)
        folder.claim()
        done = _run_jobs(jobs, folder, config.workers)
        for record in done.values():
            skipped += record["skipped"]
        manifest = _manifest(ManifestInput(table, inputs), jobs, done, config, skipped)
        folder.finish(manifest)
    return manifest


def resolve_encoding(encoding: str, files: pd.Series) -> str:
    """auto: jpeg when every source is a JPEG (stored as it is, decoded on the GPU), else png (lossless)."""
    if encoding != "auto":
        return encoding
    suffixes = files.map(lambda f: Path(f).suffix.lower())
    return "jpeg" if len(files) and suffixes.isin([".jpg", ".jpeg"]).all() else "png"


def _run_jobs(jobs: list[dict], folder: ShardFolder, workers: int) -> dict:
    """Write the shards not already complete and correct, in parallel; their records by name."""
    done = folder.prepare(jobs)
    todo = [job for job in jobs if job["name"] not in done]
    if done:
        log.info("resuming: %d of %d shard(s) already complete and correct", len(done), len(jobs))
    progress = tqdm(total=sum(len(j["samples"]) for j in jobs), desc="shard", unit="img",
                    initial=sum(len(j["samples"]) for j in jobs if j["name"] in done))
    existed = {path for job in todo for path in (job["tar"], job["idx"]) if Path(path).exists()}
    written = set()
    try:
        with multiprocessing.get_context("spawn").Pool(max(1, min(workers, len(todo) or 1))) as pool:
            for record in pool.imap_unordered(_write_shard, todo):
                done[record["name"]] = record
                written.add(record["name"])
                folder.save_progress(done)
                progress.update(len(record["keys"]) + len(record["skipped"]))
    except BadInput as bad:  # the pool is terminated by now: no worker can still be writing
        folder.undo(todo, existed, written)
        raise CxrFastError(f"{bad.path}: {bad.reason}. The shards this run wrote were removed; fix or remove the "
                           "file, or use --on-error skip to leave such inputs out") from None
    except BaseException:  # anything else (a full disk, Ctrl-C): what this run wrote goes too, then it goes on
        folder.undo(todo, existed, written)
        raise
    finally:
        progress.close()
    return done


def _manifest(sources: ManifestInput, jobs: list[dict], done: dict, config: ShardConfig, skipped: list[dict]) -> dict:
    table = sources.table
    written = {key for record in done.values() for key in record["keys"]}
    kept = table.subset(table.frame["key"].isin(written).to_numpy())
    unreadable = table.frame.loc[~table.frame["key"].isin(written), "image"]
    kept.dropped = count_dropped(table.dropped, "unreadable image", unreadable)
    summary = split_summary(kept, kept.frame["final_split"])
    shards = {}
    for job in jobs:
        record = dict(done[job["name"]])
        record["index"] = job["name"][:-4] + ".idx"
        shards[job["name"]] = record
    for split_name in C.SPLITS:
        summary[split_name]["shards"] = [j["name"] for j in jobs if j["name"].startswith(split_name + "/")]
    first = sources.inputs[0]
    return {
        "format_version": SHARD_FORMAT_VERSION,
        "cxr_fast_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(config) | {"images": str(first.images), "labels": str(first.labels)},
        "datasets": [_dataset_record(i, applied) for i, applied in zip(sources.inputs, table.applied["per_dataset"])],
        "image_ext": EXTENSIONS[config.encoding],
        "classes": list(table.classes),
        "splits": summary,
        "shards": shards,
        "table_rows": kept.table_rows,
        "dropped": kept.dropped,
        "unknown_values": table.unknown_values,
        "skipped": skipped,
    }


def _dataset_record(source: ShardInput, applied: dict) -> dict:
    """One input of the manifest: where it was read from, what was applied (policies, views, the split lists read,
    the class map) and where its labels come from."""
    return {"dataset": source.dataset, "images": str(source.images), "labels": str(source.labels),
            "spec": str(source.spec) if source.spec else None,
            "split_lists": applied.get("split_lists", [None, None]),
            "applied": {k: v for k, v in applied.items() if k != "split_lists"},
            "label_source": describe(source.dataset).LABEL_SOURCE}
