"""`cxr-fast verify`: every shard checked against the manifest (sha256, DALI index; deep: every sample decodes — sized
from its header first — and agrees with its JSON and with its manifest entry, says it belongs to the split whose
folder holds it, carries one label per manifest class, positives that its table's own text names under the
manifest's class map (swapped class names show), masks exactly when the format has them, every key once in its split
and once across splits, no patient in two splits — all read from the bytes in the tars, so a tampered manifest is
caught)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxr_fast.data.shards.sample import decode_id, decode_image
from cxr_fast.config import MAX_PIXELS
from cxr_fast.data.shards.manifest import has_mask, load_manifest
from cxr_fast.data.shards.tars import dali_index, walk_tar
from cxr_fast.files import sha256_file
from cxr_fast.errors import CxrFastError


def verify(shards_dir: str | Path, deep: bool = False) -> list[str]:
    """The problems found, each naming its shard; an empty list means all is well."""
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    problems = _check_counts(shards_dir, manifest)
    seen: dict = {"keys": {}, "patients": {}, "manifest": manifest, "maps": class_maps(manifest)}
    for name, record in tqdm(manifest["shards"].items(), desc="verify", unit="shard"):
        tar, idx = shards_dir / name, shards_dir / record["index"]
        if not tar.exists() or not idx.exists():
            problems.append(f"{name}: missing {'tar' if not tar.exists() else 'index'}")
            continue
        if sha256_file(tar) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (the file changed or is damaged)")
            continue
        try:
            index = dali_index(tar)
        except (CxrFastError, tarfile.TarError, OSError) as error:
            problems.append(f"{name}: unreadable tar ({error})")
            continue
        if idx.read_text() != index:
            problems.append(f"{name}: index {idx.name} does not match the tar")
        count = int(index.split(maxsplit=2)[1])  # "v1.2 N" heads the index
        if count != record["samples"]:
            problems.append(f"{name}: holds {count} samples, the manifest says {record['samples']}")
        if deep:
            problems += [f"{name}: {p}" for p in _check_samples(tar, record, seen, _split_of(manifest, name))]
    return problems


def _split_of(manifest: dict, shard: str) -> str | None:
    return next((split for split, summary in manifest["splits"].items() if shard in summary["shards"]), None)


def _check_counts(shards_dir: Path, manifest: dict) -> list[str]:
    """The manifest agrees with itself (split totals, key lists) and with the folders (no stray shard files)."""
    problems = []
    for split, summary in manifest["splits"].items():
        records = [manifest["shards"].get(name) for name in summary["shards"]]
        if None in records:
            problems.append(f"{split}: lists a shard the manifest does not describe")
            continue
        total = sum(record["samples"] for record in records)
        if total != summary["images"]:
            problems.append(f"{split}: the manifest claims {summary['images']} images, its shards hold {total}")
        for name, record in zip(summary["shards"], records):
            if len(record["keys"]) != record["samples"]:
                problems.append(f"{name}: {len(record['keys'])} keys listed for {record['samples']} samples")
        known = set(summary["shards"]) | {manifest["shards"][n]["index"] for n in summary["shards"]}
        folder = shards_dir / split
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if f"{split}/{path.name}" not in known:
                problems.append(f"{split}/{path.name}: stray file, not in the manifest")
    return problems


def _check_samples(tar: Path, record: dict, seen: dict, split: str | None) -> list[str]:
    """Each sample of a tar: decodes, agrees with its JSON and with its manifest entry; its key and patient are
    checked against those seen so far in other shards and splits."""
    problems, count = [], 0
    try:
        for index, (key, sample) in enumerate(walk_tar(tar)):
            count += 1
            try:
                image = decode_image(sample, seen["manifest"]["config"].get("max_pixels") or MAX_PIXELS)
                meta = json.loads(sample["json"])
                labels = np.frombuffer(sample["labels"], np.uint8).tolist()
                mask = np.frombuffer(sample["mask"], np.uint8).tolist() if "mask" in meta else None  # format 3 on
            except (ValueError, KeyError) as error:
                problems.append(f"sample {key}: {error}")
                continue
            problems += [f"sample {key}: {p}" for p in _against_itself(sample, meta, labels, split, seen)]
            if labels != meta["labels"] or mask != meta.get("mask") or decode_id(sample["id"]) != key:
                problems.append(f"sample {key}: labels, mask or id disagree with its json")
            if image.shape != (meta["height"], meta["width"]):
                problems.append(f"sample {key}: image is {image.shape}, json says {meta['height']}x{meta['width']}")
            problems += _against_manifest(key, meta, record, index) + _against_others(key, meta, seen, split, tar)
    except CxrFastError as error:
        return [str(error)]
    if count != record["samples"]:
        problems.append(f"{count} samples, manifest says {record['samples']}")
    return problems


def class_maps(manifest: dict) -> dict[str, dict]:
    """Per data set (by the name its samples carry), its source class names → manifest class (None: dropped)."""
    datasets = manifest.get("datasets") or [{"dataset": "nih"}]
    names = [d["dataset"] for d in datasets]
    return {(name if names.count(name) == 1 else f"{name}-{i}"): (d.get("applied") or {}).get("class_map") or {}
            for i, (name, d) in enumerate(zip(names, datasets))}


def _against_itself(sample: dict, meta: dict, labels: list, split: str | None, seen: dict) -> list[str]:
    """What a sample says about itself against the manifest and the folder: its split, its label count, its masks
    against the format, and its positives against its table's own text of the labels."""
    manifest, problems = seen["manifest"], []
    classes = manifest["classes"]
    if meta.get("split") != split:
        problems.append(f"says it belongs to {meta.get('split')}, but lies in {split}")
    if len(labels) != len(classes):
        problems.append(f"holds {len(labels)} labels, the manifest names {len(classes)} classes")
    if ("mask" in sample or "mask" in meta) != has_mask(manifest):
        problems.append(f"{'carries' if 'mask' in sample else 'lacks'} masks, but the manifest says format "
                        f"{manifest['format_version']}")
    mapping = seen["maps"].get(meta.get("dataset") or "nih", {})
    named = [(n.rstrip("?"), n.endswith("?")) for n in str(meta.get("finding_labels") or "").split("|") if n]
    sure = {mapping.get(n, n) for n, uncertain in named if not uncertain}
    said = sure | {mapping.get(n, n) for n, uncertain in named if uncertain}
    positive = {c for c, v in zip(classes, labels) if v}
    if positive - said or (sure & set(classes)) - positive:
        problems.append(f"labels name {sorted(positive)[:4]} positive, its table's text says "
                        f"{meta.get('finding_labels')!r} (class names swapped or relabelled?)")
    return problems


def _against_manifest(key: str, meta: dict, record: dict, index: int) -> list[str]:
    """The manifest's entry at the sample's position names the same key, image and patient as the sample itself."""
    listed = [record[field][index] if index < len(record[field]) else None
              for field in ("keys", "image_index", "patients")]
    found = [key, meta.get("image_index"), meta.get("patient_id")]
    if listed != found:
        return [f"sample {key}: the manifest lists {listed} at its place, the sample holds {found}"]
    return []


def _against_others(key: str, meta: dict, seen: dict, split: str | None, tar: Path) -> list[str]:
    problems = []
    if key in seen["keys"]:
        other_split, other = seen["keys"][key]
        where = "twice in its split" if other_split == split else f"in {other_split} too"
        problems.append(f"sample {key}: found {where} ({other.name})")
    seen["keys"][key] = (split, tar)
    patient = meta.get("patient_id")
    first = seen["patients"].setdefault(patient, split)
    if first != split:
        problems.append(f"sample {key}: patient {patient} is in {first} and {split} (a patient leak)")
    return problems
