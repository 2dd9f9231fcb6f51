"""`cxr-fast shard`: the label table and images → WebDataset shards, the one artefact every later stage reads.

Layout: `<out>/{train,val,test}/shard-NNNNNN.tar`, a DALI index (`.idx`, wds2idx format v1.2) beside each tar, and
`<out>/manifest.json`. A sample holds:
  <key>.png|jpg|raw  the image (png: lossless, pixel-identical to the source in gray; jpg: GPU-decodable; raw: uint8)
  <key>.shape        raw only: int32 (height, width, 1), so DALI can reshape the bytes
  <key>.labels       14 uint8, multi-hot in canonical order: fixed size, read by DALI directly
  <key>.id           the key as 64 NUL-padded ASCII bytes: fixed size, so DALI batches carry image names
  <key>.json         image_index, patient_id, finding_labels (the original string), labels, split, height, width

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
import re
import tarfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr_fast import __version__
from cxr_fast import constants as C
from cxr_fast.config import ShardConfig
from cxr_fast.data.sample import EXTENSIONS, ID_BYTES, encode_id, encode_image
from cxr_fast.data.source import IMAGE_SUFFIXES, image_files, read_gray
from cxr_fast.data.labels import (demographics, multi_hot, read_label_table, read_split_list,
                                  unusable_demographics)
from cxr_fast.data.reader import SHARD_FORMAT_VERSION
from cxr_fast.data.shard_folder import ShardFolder
from cxr_fast.data.split import plan_split, split_summary
from cxr_fast.data.tario import add_member, dali_index, sha256_file
from cxr_fast.errors import BadInput, CxrFastError
from cxr_fast.files import folder_lock

log = logging.getLogger(__name__)


def _write_shard(job: dict) -> dict:
    """Worker: write one shard (tar + index) under temporary names, then rename. Returns its manifest record."""
    config = ShardConfig(**job["config"])
    tar_path, idx_path = Path(job["tar"]), Path(job["idx"])
    tmp_tar, tmp_idx = tar_path.with_suffix(".tar.tmp"), idx_path.with_suffix(".idx.tmp")
    skipped, keys, patients, image_names, people = [], [], [], [], {"age": [], "sex": [], "view": []}
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
                # An 8-bit gray PNG source is already what the png encoding stores: copy its bytes, skip re-encoding.
                if config.encoding == "png" and not config.resize and source.is_gray_png:
                    components = {"png": source.data}
                else:
                    components = encode_image(gray, config.encoding, config.jpeg_quality)
                key = sample["key"]
                meta = dict(sample["meta"], height=int(gray.shape[0]), width=int(gray.shape[1]))
                components["labels"] = np.asarray(sample["meta"]["labels"], np.uint8).tobytes()
                components["id"] = encode_id(key)
                components["json"] = json.dumps(meta).encode()
                for ext in sorted(components):
                    add_member(tar, f"{key}.{ext}", components[ext])
                keys.append(key)
                patients.append(meta["patient_id"])
                image_names.append(meta["image_index"])
                for field, values in people.items():
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
            "image_index": image_names, **people, "skipped": skipped, "digest": job["digest"]}


# ----------------------------------------------------------------------------------------------------- planning
def find_images(images_dir: Path) -> dict[str, Path]:
    """Image file name -> path, searched recursively (NIH ships images_001/images/... folders); a name found twice
    is an error, since the table names images by file name."""
    found: dict[str, Path] = {}
    for path in image_files(images_dir):
        if path.name in found:
            raise CxrFastError(f"image name {path.name} occurs twice: {found[path.name]} and {path}")
        found[path.name] = path
    return found


def match_images(names: pd.Series, found: dict[str, Path]) -> dict[str, Path]:
    """Table name -> file: the same name, or for DICOM the name with `.dcm` added or taken off (a hospital export
    names files by their table entry, with or without the suffix)."""
    matched = {}
    for name in names:
        for candidate in (name, f"{name}.dcm", name[:-4] if name.lower().endswith(".dcm") else None):
            if candidate in found:
                matched[name] = found[candidate]
                break
    return matched


def sample_key(image_name: str) -> str:
    """The shard key of an image: its name without the image suffix, with any character other than letters,
    digits, '-' and '_' made '_' (DICOM files are often named by UIDs full of dots, which a key may not hold)."""
    stem = image_name[: -len(suffix)] if (suffix := Path(image_name).suffix).lower() in IMAGE_SUFFIXES else image_name
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _split_lists(labels_path: Path, test_list: Path | None, train_val_list: Path | None):
    """Official lists from flags, else from beside the table, else None (then fractions are used)."""
    if test_list is None and (labels_path.parent / "test_list.txt").exists():
        test_list = labels_path.parent / "test_list.txt"
        if train_val_list is None and (labels_path.parent / "train_val_list.txt").exists():
            train_val_list = labels_path.parent / "train_val_list.txt"
    if test_list is None:
        if train_val_list is not None:
            raise CxrFastError("--train-val-list needs --test-list")
        return None, None, None
    return read_split_list(test_list), (read_split_list(train_val_list) if train_val_list else None), test_list


def _digest(config: ShardConfig, samples: list[dict]) -> str:
    content = {k: v for k, v in asdict(config).items() if k not in ("out", "workers")}
    blob = json.dumps({"config": content | {"on_error": None, "max_pixels": None},  # policy, not content
                       "samples": [(s["key"], s["meta"]["labels"], s["size"]) for s in samples]})
    return hashlib.sha256(blob.encode()).hexdigest()


def _whole(value) -> int | None:
    return None if value is None or not np.isfinite(value) else int(value)


def plan_shards(table: pd.DataFrame, split: pd.Series, found: dict[str, Path], config: ShardConfig, out: Path):
    """Shard jobs per split, with samples shuffled (seeded) before they are cut into shards."""
    labels, people = multi_hot(table), demographics(table)
    rng = np.random.default_rng(config.seed)
    jobs, keys = [], {}
    for split_name in C.SPLITS:
        rows = np.flatnonzero((split == split_name).to_numpy())
        rows = rows[rng.permutation(len(rows))]
        samples = []
        for row in rows:
            image = table.at[row, C.COL_IMAGE]
            key = sample_key(image)
            if len(key) > ID_BYTES:
                raise CxrFastError(f"image name {image!r}: a sample key may hold at most {ID_BYTES} characters")
            if key in keys:
                raise CxrFastError(f"image names {keys[key]!r} and {image!r} give the same sample key {key!r}")
            keys[key] = image
            path = found[image]
            samples.append({
                "key": key, "path": str(path), "size": path.stat().st_size,
                "meta": {"image_index": image, "patient_id": str(table.at[row, C.COL_PATIENT]),
                         "finding_labels": table.at[row, C.COL_LABELS], "labels": labels[row].tolist(),
                         "split": split_name, "age": _whole(people.at[row, "age"]), "sex": people.at[row, "sex"],
                         "view": people.at[row, "view"], "follow_up": _whole(people.at[row, "follow_up"])},
            })
        for number, start in enumerate(range(0, len(samples), config.shard_size)):
            chunk = samples[start:start + config.shard_size]
            name = f"{split_name}/shard-{number:06d}"
            jobs.append({"name": f"{name}.tar", "tar": str(out / f"{name}.tar"), "idx": str(out / f"{name}.idx"),
                         "config": asdict(config), "samples": chunk, "digest": _digest(config, chunk)})
    return jobs


@dataclass
class Sources:
    """What a shard set is made from: the table rows that have an image, their split, and where they came from."""

    table: pd.DataFrame
    split: pd.Series
    images_dir: Path
    labels_path: Path
    list_source: Path | None
    rows_without_image: int


def write_shards(images_dir: str | Path, labels_path: str | Path, config: ShardConfig = ShardConfig(),
                 split_lists: tuple = (None, None), overwrite: bool = False) -> dict:
    """The `cxr-fast shard` command: shards in `config.out`. `split_lists` are the official (test, train_val) lists
    (default: those beside the table, if any). Returns the manifest."""
    images_dir, labels_path, out = Path(images_dir), Path(labels_path), Path(config.out)
    table, found, skipped, rows_without_image = _inputs(images_dir, labels_path, config)
    test_list, train_val_list = split_lists
    tests, train_vals, list_source = _split_lists(labels_path, test_list and Path(test_list),
                                                   train_val_list and Path(train_val_list))
    split = plan_split(table, config.val_fraction, config.test_fraction, config.seed, tests, train_vals)
    not_listed = int((split == "").sum())
    if not_listed:
        log.warning("%d image(s) are in neither split list and are left out", not_listed)
        skipped += [{"file": str(found[n]), "reason": "in neither official split list"}
                    for n in table.loc[split == "", C.COL_IMAGE]]
    sources = Sources(table, split, images_dir, labels_path, list_source, rows_without_image)
    jobs = plan_shards(table, split, found, config, out)
    with folder_lock(out, "shards"):
        folder = ShardFolder(out, overwrite)
        folder.claim()
        done = _run_jobs(jobs, folder, config.workers)
        for record in done.values():
            skipped += record["skipped"]
        manifest = _manifest(sources, jobs, done, config, skipped)
        folder.finish(manifest)
    return manifest


def _inputs(images_dir: Path, labels_path: Path, config: ShardConfig):
    """The table rows that have an image, the images found, the skipped inputs and the count of rows without one."""
    table = read_label_table(labels_path)
    files = find_images(images_dir)
    if not files:
        raise CxrFastError(f"no PNG, JPEG or DICOM images found below {images_dir}")
    found = match_images(table[C.COL_IMAGE], files)
    orphans = sorted(set(files) - {path.name for path in found.values()})
    skipped = []
    if orphans:
        if config.on_error == "fail":
            raise CxrFastError(f"{files[orphans[0]]}: image has no row in {labels_path} "
                               f"({len(orphans)} such image(s)); use --on-error skip to leave them out")
        skipped += [{"file": str(files[n]), "reason": "no row in the label table"} for n in orphans]
    present = table[C.COL_IMAGE].isin(set(found))
    rows_without_image = int((~present).sum())
    if rows_without_image:
        log.info("%d of %d table rows have no image below %s (a partial download is fine)",
                 rows_without_image, len(table), images_dir)
    return table[present].reset_index(drop=True), found, skipped, rows_without_image


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


def _manifest(sources: Sources, jobs: list[dict], done: dict, config: ShardConfig, skipped: list[dict]) -> dict:
    table, split = sources.table, sources.split
    written = {key for record in done.values() for key in record["keys"]}
    kept = table[C.COL_IMAGE].map(sample_key).isin(written)
    summary = split_summary(table[kept].reset_index(drop=True), split[kept].reset_index(drop=True))
    shards = {}
    for job in jobs:
        record = dict(done[job["name"]])
        record["index"] = job["name"][:-4] + ".idx"
        shards[job["name"]] = record
    for split_name in C.SPLITS:
        summary[split_name]["shards"] = [j["name"] for j in jobs if j["name"].startswith(split_name + "/")]
    return {
        "format_version": SHARD_FORMAT_VERSION,
        "cxr_fast_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(config) | {"images": str(sources.images_dir), "labels": str(sources.labels_path),
                                    "split_lists": str(sources.list_source) if sources.list_source else None},
        "image_ext": EXTENSIONS[config.encoding],
        "classes": list(C.CLASS_NAMES),
        "splits": summary,
        "shards": shards,
        "rows_without_image": sources.rows_without_image,
        "unknown_values": unusable_demographics(table, demographics(table)),
        "skipped": skipped,
    }
