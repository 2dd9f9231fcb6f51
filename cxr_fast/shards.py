"""Writing and verifying the WebDataset shards: the one artefact every later stage reads.

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
import io
import json
import logging
import multiprocessing
import os
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
from cxr_fast.errors import CxrFastError
from cxr_fast.labels import multi_hot, read_label_table, read_split_list
from cxr_fast.split import plan_split, split_summary

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
IMAGE_EXT = {"png": "png", "jpeg": "jpg", "raw": "raw"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
ID_BYTES = 64
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardSpec:
    """What decides the content of the shards (and so is part of each shard's digest)."""

    encoding: str = "png"
    jpeg_quality: int = 95
    resize: int | None = None
    shard_size: int = 1000
    seed: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    on_error: str = "fail"

    def check(self) -> None:
        if self.encoding not in IMAGE_EXT:
            raise CxrFastError(f"--encoding must be one of {', '.join(IMAGE_EXT)}, got {self.encoding!r}")
        if self.on_error not in ("fail", "skip"):
            raise CxrFastError(f"--on-error must be fail or skip, got {self.on_error!r}")
        if self.shard_size < 1:
            raise CxrFastError("--shard-size must be at least 1")
        if self.resize is not None and self.resize < 16:
            raise CxrFastError("--resize must be at least 16 pixels")
        if not 1 <= self.jpeg_quality <= 100:
            raise CxrFastError("--jpeg-quality must be in 1..100")


class BadInput(Exception):
    """An input image that cannot be sharded; carries the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason

    def __reduce__(self):  # exceptions cross the process pool by pickle; the default would lose `reason`
        return BadInput, (self.path, self.reason)


# ----------------------------------------------------------------------------------------------- image conversion
def to_gray8(image: np.ndarray, path: Path | str = "") -> np.ndarray:
    """The documented rule for non-gray inputs.

    16-bit: keep the high byte (a linear rescale; NIH ships 8-bit, other exports may not). 3 or 4 channels: drop the
    alpha channel (NIH's RGBA PNGs are fully opaque) and take ITU-R BT.601 luma (OpenCV's BGR2GRAY, the same as
    `cv2.imread(..., IMREAD_GRAYSCALE)`); for NIH's RGBA files R = G = B, so the result is exactly that channel.
    """
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise BadInput(path, f"unsupported pixel type {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        image = cv2.cvtColor(image[:, :, :3], cv2.COLOR_BGR2GRAY)
    elif image.ndim != 2:
        raise BadInput(path, f"unsupported image shape {image.shape}")
    return image


def read_gray(path: Path) -> tuple[np.ndarray, bytes, bool]:
    """Decode a source image. Returns (gray uint8, file bytes, whether the file already is an 8-bit gray PNG)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadInput(path, f"unreadable ({error.strerror})") from None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    if image is None:
        raise BadInput(path, "not a decodable image (truncated or not an image file)")
    is_gray_png = data[:8] == b"\x89PNG\r\n\x1a\n" and image.dtype == np.uint8 and image.ndim == 2
    return to_gray8(image, path), data, is_gray_png


def encode_image(gray: np.ndarray, spec: ShardSpec) -> dict[str, bytes]:
    """The image component(s) of a sample."""
    if spec.encoding == "png":
        ok, buf = cv2.imencode(".png", gray, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        return {"png": buf.tobytes()}
    if spec.encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, spec.jpeg_quality])
        return {"jpg": buf.tobytes()}
    shape = np.array([gray.shape[0], gray.shape[1], 1], dtype=np.int32)
    return {"raw": np.ascontiguousarray(gray).tobytes(), "shape": shape.tobytes()}


def decode_image(sample: dict) -> np.ndarray:
    """The gray uint8 image of a sample as read back from a shard (dict of extension -> bytes)."""
    if "raw" in sample:
        height, width, _ = np.frombuffer(sample["shape"], np.int32)
        return np.frombuffer(sample["raw"], np.uint8).reshape(height, width)
    payload = sample.get("png") or sample.get("jpg")
    if payload is None:
        raise ValueError(f"sample {sample.get('__key__')} has no image component")
    image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"sample {sample.get('__key__')}: image does not decode")
    return image


def encode_id(key: str) -> bytes:
    raw = key.encode("ascii")
    if len(raw) > ID_BYTES:
        raise ValueError(f"key {key!r} is longer than {ID_BYTES} bytes")
    return raw.ljust(ID_BYTES, b"\0")


def decode_id(raw: np.ndarray | bytes) -> str:
    return bytes(raw).rstrip(b"\0").decode("ascii")


# ------------------------------------------------------------------------------------------------- tar and index
def dali_index(tar_path: Path) -> str:
    """The DALI webdataset index (format v1.2, as `wds2idx` writes it) of a tar: one line per sample with
    `ext offset size name` per component, offsets pointing at the data after each 512-byte header."""
    samples: list[list[str]] = []
    last = None
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            entry = f"{ext} {member.offset_data} {member.size} {member.name}"
            if key != last:
                samples.append([entry])
                last = key
            else:
                samples[-1].append(entry)
    return f"v1.2 {len(samples)}\n" + "".join(" ".join(s) + "\n" for s in samples)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes: the same plan gives the same sha256
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(job: dict) -> dict:
    """Worker: write one shard (tar + index) under temporary names, then rename. Returns its manifest record."""
    spec = ShardSpec(**job["spec"])
    tar_path, idx_path = Path(job["tar"]), Path(job["idx"])
    tmp_tar, tmp_idx = tar_path.with_suffix(".tar.tmp"), idx_path.with_suffix(".idx.tmp")
    skipped, keys, patients, image_names = [], [], [], []
    try:
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in job["samples"]:
                try:
                    gray, data, is_gray_png = read_gray(Path(sample["path"]))
                except BadInput as bad:
                    if spec.on_error == "fail":
                        raise
                    skipped.append({"file": bad.path, "reason": bad.reason})
                    continue
                if spec.resize:
                    gray = cv2.resize(gray, (spec.resize, spec.resize), interpolation=cv2.INTER_AREA)
                # An 8-bit gray PNG source is already what the png encoding stores: copy its bytes, skip re-encoding.
                if spec.encoding == "png" and not spec.resize and is_gray_png:
                    components = {"png": data}
                else:
                    components = encode_image(gray, spec)
                key = sample["key"]
                meta = dict(sample["meta"], height=int(gray.shape[0]), width=int(gray.shape[1]))
                components["labels"] = np.asarray(sample["meta"]["labels"], np.uint8).tobytes()
                components["id"] = encode_id(key)
                components["json"] = json.dumps(meta).encode()
                for ext in sorted(components):
                    _add(tar, f"{key}.{ext}", components[ext])
                keys.append(key)
                patients.append(meta["patient_id"])
                image_names.append(meta["image_index"])
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
            "image_index": image_names, "skipped": skipped, "digest": job["digest"]}


# ----------------------------------------------------------------------------------------------------- planning
def find_images(images_dir: Path) -> dict[str, Path]:
    """Image name -> path, searched recursively (NIH ships images_001/images/... folders)."""
    if not images_dir.is_dir():
        raise CxrFastError(f"image folder not found: {images_dir}")
    found: dict[str, Path] = {}
    for root, _dirs, files in os.walk(images_dir, onerror=_raise_unreadable):
        for name in files:
            if name.lower().endswith(IMAGE_SUFFIXES):
                if name in found:
                    raise CxrFastError(f"image name {name} occurs twice: {found[name]} and {Path(root) / name}")
                found[name] = Path(root) / name
    return found


def _raise_unreadable(error: OSError) -> None:
    raise CxrFastError(f"cannot read folder {error.filename}: {error.strerror}")


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


def _digest(spec: ShardSpec, samples: list[dict]) -> str:
    blob = json.dumps({"spec": asdict(spec) | {"on_error": None},
                       "samples": [(s["key"], s["meta"]["labels"], s["size"]) for s in samples]})
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_shards(table: pd.DataFrame, split: pd.Series, found: dict[str, Path], spec: ShardSpec, out: Path):
    """Shard jobs per split, with samples shuffled (seeded) before they are cut into shards."""
    labels = multi_hot(table)
    rng = np.random.default_rng(spec.seed)
    jobs = []
    for split_name in C.SPLITS:
        rows = np.flatnonzero((split == split_name).to_numpy())
        rows = rows[rng.permutation(len(rows))]
        samples = []
        for row in rows:
            image = table.at[row, C.COL_IMAGE]
            key = image.rsplit(".", 1)[0]
            if "." in key or len(key) > ID_BYTES:
                raise CxrFastError(f"image name {image!r}: a sample key may hold no dot and at most {ID_BYTES} chars")
            path = found[image]
            samples.append({
                "key": key, "path": str(path), "size": path.stat().st_size,
                "meta": {"image_index": image, "patient_id": str(table.at[row, C.COL_PATIENT]),
                         "finding_labels": table.at[row, C.COL_LABELS], "labels": labels[row].tolist(),
                         "split": split_name},
            })
        for number, start in enumerate(range(0, len(samples), spec.shard_size)):
            chunk = samples[start:start + spec.shard_size]
            name = f"{split_name}/shard-{number:06d}"
            jobs.append({"name": f"{name}.tar", "tar": str(out / f"{name}.tar"), "idx": str(out / f"{name}.idx"),
                         "spec": asdict(spec), "samples": chunk, "digest": _digest(spec, chunk)})
    return jobs


# ---------------------------------------------------------------------------------------------------- the command
def _load_state(out: Path) -> dict:
    """Records of finished shards, from an interrupted run's progress file or a finished run's manifest."""
    for name in (PROGRESS, MANIFEST):
        try:
            return json.loads((out / name).read_text())["shards"]
        except (OSError, ValueError, KeyError):
            continue
    return {}


def _atomic_json(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _is_done(job: dict, record: dict | None) -> bool:
    tar, idx = Path(job["tar"]), Path(job["idx"])
    return (record is not None and record.get("digest") == job["digest"] and tar.exists() and idx.exists()
            and sha256_file(tar) == record["sha256"])


def write_shards(
    images_dir: str | Path,
    labels_path: str | Path,
    out: str | Path,
    spec: ShardSpec = ShardSpec(),
    workers: int = 1,
    test_list: str | Path | None = None,
    train_val_list: str | Path | None = None,
) -> dict:
    """The `cxr-fast shard` command. Returns the manifest."""
    spec.check()
    images_dir, labels_path, out = Path(images_dir), Path(labels_path), Path(out)
    table = read_label_table(labels_path)
    found = find_images(images_dir)
    if not found:
        raise CxrFastError(f"no .png/.jpg images found below {images_dir}")

    names = set(table[C.COL_IMAGE])
    orphans = sorted(set(found) - names)
    skipped = []
    if orphans:
        if spec.on_error == "fail":
            raise CxrFastError(f"{found[orphans[0]]}: image has no row in {labels_path} "
                               f"({len(orphans)} such image(s)); use --on-error skip to leave them out")
        skipped += [{"file": str(found[n]), "reason": "no row in the label table"} for n in orphans]
    present = table[C.COL_IMAGE].isin(set(found))
    rows_without_image = int((~present).sum())
    if rows_without_image:
        log.info("%d of %d table rows have no image below %s (a partial download is fine)",
                 rows_without_image, len(table), images_dir)
    table = table[present].reset_index(drop=True)

    tests, train_vals, list_source = _split_lists(labels_path, test_list and Path(test_list),
                                                   train_val_list and Path(train_val_list))
    split = plan_split(table, spec.val_fraction, spec.test_fraction, spec.seed, tests, train_vals)
    not_listed = int((split == "").sum())
    if not_listed:
        log.warning("%d image(s) are in neither split list and are left out", not_listed)
        skipped += [{"file": str(found[n]), "reason": "in neither official split list"}
                    for n in table.loc[split == "", C.COL_IMAGE]]

    jobs = plan_shards(table, split, found, spec, out)
    for split_name in C.SPLITS:
        (out / split_name).mkdir(parents=True, exist_ok=True)
    _remove_stale(out, {job["name"] for job in jobs})

    state = _load_state(out)
    done = {job["name"]: state[job["name"]] for job in jobs if _is_done(job, state.get(job["name"]))}
    todo = [job for job in jobs if job["name"] not in done]
    if done:
        log.info("resuming: %d of %d shard(s) already complete and correct", len(done), len(jobs))
    progress = tqdm(total=sum(len(j["samples"]) for j in jobs), desc="shard", unit="img",
                    initial=sum(len(j["samples"]) for j in jobs if j["name"] in done))
    try:
        with multiprocessing.get_context("spawn").Pool(max(1, min(workers, len(todo) or 1))) as pool:
            for record in pool.imap_unordered(_write_shard, todo):
                done[record["name"]] = record
                _atomic_json(out / PROGRESS, {"shards": done})
                progress.update(len(record["keys"]) + len(record["skipped"]))
    except BadInput as bad:  # the pool is terminated by now: no worker can still be writing
        _remove_written(out, todo, had_progress=bool(state))
        raise CxrFastError(f"{bad.path}: {bad.reason}. The shards of this run were removed; fix or remove the file, "
                           "or use --on-error skip to leave such inputs out") from None
    finally:
        progress.close()

    for record in done.values():
        skipped += record["skipped"]
    manifest = _manifest(table, split, jobs, done, spec, images_dir, labels_path, list_source,
                         rows_without_image, skipped)
    _atomic_json(out / MANIFEST, manifest)
    (out / PROGRESS).unlink(missing_ok=True)
    return manifest


def _remove_stale(out: Path, planned: set[str]) -> None:
    """Shards of an earlier plan (other shard size, other data) and temporary files of a killed run."""
    for split_name in C.SPLITS:
        for path in (out / split_name).iterdir():
            name = f"{split_name}/{path.name}"
            if path.name.endswith(".tmp") or (path.name.startswith("shard-") and
                                              name.rsplit(".", 1)[0] + ".tar" not in planned):
                log.info("removing stale %s", path)
                path.unlink()


def _remove_written(out: Path, jobs: list[dict], had_progress: bool) -> None:
    """Undo a failed run: every shard it was to write (finished or not); shards of earlier runs stay."""
    for job in jobs:
        for path in (Path(job["tar"]), Path(job["idx"])):
            path.unlink(missing_ok=True)
            path.with_suffix(path.suffix + ".tmp").unlink(missing_ok=True)
    if not had_progress:
        (out / PROGRESS).unlink(missing_ok=True)
        for split_name in C.SPLITS:
            try:
                (out / split_name).rmdir()
            except OSError:
                pass
        try:
            out.rmdir()
        except OSError:
            pass


def _manifest(table, split, jobs, done, spec, images_dir, labels_path, list_source, rows_without_image, skipped):
    written = {key for record in done.values() for key in record["keys"]}
    keys = table[C.COL_IMAGE].str.rsplit(".", n=1).str[0]
    kept = keys.isin(written)
    summary = split_summary(table[kept].reset_index(drop=True), split[kept].reset_index(drop=True))
    shards = {}
    for job in jobs:
        record = dict(done[job["name"]])
        record["index"] = job["name"][:-4] + ".idx"
        shards[job["name"]] = record
    for split_name in C.SPLITS:
        summary[split_name]["shards"] = [j["name"] for j in jobs if j["name"].startswith(split_name + "/")]
    return {
        "format_version": FORMAT_VERSION,
        "cxr_fast_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(spec) | {"images": str(images_dir), "labels": str(labels_path),
                                  "split_lists": str(list_source) if list_source else None},
        "image_ext": IMAGE_EXT[spec.encoding],
        "classes": list(C.CLASS_NAMES),
        "splits": summary,
        "shards": shards,
        "rows_without_image": rows_without_image,
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------------------- reading
def load_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CxrFastError(f"no {MANIFEST} in {shards_dir}: is this a folder written by `cxr-fast shard`?") from None
    except ValueError as error:
        raise CxrFastError(f"{path} is not valid JSON: {error}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CxrFastError(f"{path}: shard format {manifest.get('format_version')}, this version reads "
                           f"{FORMAT_VERSION}; re-run `cxr-fast shard`")
    return manifest


def split_shards(shards_dir: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    """The tar files of a split, in manifest order; a clear error when the split is missing or empty."""
    manifest = manifest or load_manifest(shards_dir)
    if split not in manifest["splits"]:
        raise CxrFastError(f"unknown split {split!r}; the manifest has {', '.join(manifest['splits'])}")
    names = manifest["splits"][split]["shards"]
    if not names:
        raise CxrFastError(f"split {split!r} in {shards_dir} has no shards (0 images)")
    return [Path(shards_dir) / name for name in names]


def iter_samples(tar_path: Path):
    """(key, {ext: bytes}) for each sample of one tar, in order; a damaged tar raises naming the shard."""
    current, sample = None, {}
    try:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rsplit("/", 1)[-1].partition(".")
                if key != current and sample:
                    yield current, sample
                    sample = {}
                current = key
                sample[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CxrFastError(f"shard {tar_path} is damaged: {error}") from None
    if sample:
        yield current, sample


def verify(shards_dir: str | Path, deep: bool = False) -> list[str]:
    """Check every shard against the manifest (sha256, index, sample count; with deep, every sample decodes and its
    labels agree). Returns the problems found, each naming its shard; an empty list means all is well."""
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    problems = []
    for name, record in tqdm(manifest["shards"].items(), desc="verify", unit="shard"):
        tar, idx = shards_dir / name, shards_dir / record["index"]
        if not tar.exists() or not idx.exists():
            problems.append(f"{name}: missing {'tar' if not tar.exists() else 'index'}")
            continue
        if sha256_file(tar) != record["sha256"]:
            problems.append(f"{name}: sha256 differs from the manifest (the file changed or is damaged)")
            continue
        try:
            if idx.read_text() != dali_index(tar):
                problems.append(f"{name}: index {idx.name} does not match the tar")
        except (tarfile.TarError, OSError) as error:
            problems.append(f"{name}: unreadable tar ({error})")
            continue
        if deep:
            problems += [f"{name}: {p}" for p in _check_samples(tar, record)]
    return problems


def _check_samples(tar: Path, record: dict) -> list[str]:
    problems, count = [], 0
    try:
        for key, sample in iter_samples(tar):
            count += 1
            try:
                image = decode_image(sample)
                meta = json.loads(sample["json"])
                labels = np.frombuffer(sample["labels"], np.uint8).tolist()
            except (ValueError, KeyError) as error:
                problems.append(f"sample {key}: {error}")
                continue
            if labels != meta["labels"] or decode_id(sample["id"]) != key:
                problems.append(f"sample {key}: labels or id disagree with its json")
            if image.shape != (meta["height"], meta["width"]):
                problems.append(f"sample {key}: image is {image.shape}, json says {meta['height']}x{meta['width']}")
    except CxrFastError as error:
        return [str(error)]
    if count != record["samples"]:
        problems.append(f"{count} samples, manifest says {record['samples']}")
    return problems


def sample_table(manifest: dict, split: str) -> dict[str, tuple[str, str]]:
    """key -> (image_index, patient_id) for every sample of a split, from the manifest alone."""
    table = {}
    for name in manifest["splits"][split]["shards"]:
        record = manifest["shards"][name]
        table.update(zip(record["keys"], zip(record["image_index"], record["patients"])))
    return table
