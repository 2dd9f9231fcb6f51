"""What `cxr-fast shard` reads: each data set through its description, its images located, its split planned, and
several data sets merged into one sample table on the union of their classes.

Within one data set patients never cross splits. Merged, each data set is split on its own; its classes that
another data set has and it lacks are masked (not stated), and sample keys and patient ids get the data set's name
as a prefix, so two data sets' images and patients never collide.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.config import ShardConfig
from cxr_fast.data.datasets import Request, SampleTable, read_dataset
from cxr_fast.data.datasets.base import check_uncertain_names
from cxr_fast.data.datasets.vocabulary import read_relabel, select_classes, warn_near_duplicates
from cxr_fast.data.shards.sample import ID_BYTES
from cxr_fast.data.images.source import IMAGE_SUFFIXES, image_files
from cxr_fast.data.datasets.split import plan_split
from cxr_fast.errors import CxrFastError

log = logging.getLogger(__name__)
NO_ROW = "no row in the label table"  # an image found below --images that the table does not list


@dataclass(frozen=True)
class ShardInput:
    """One data set to shard: its images folder and label table, the description that reads them (`nih`,
    `chexpert`, `mimic-cxr-jpg`, `table`), a table spec (for `table`) and official split lists (NIH's)."""

    images: Path
    labels: Path
    dataset: str = "nih"
    spec: Path | None = None
    split_lists: tuple = (None, None)


def read_inputs(inputs: list[ShardInput], config: ShardConfig) -> tuple[SampleTable, list[dict]]:
    """The merged sample table of `inputs` with columns file, key, dataset and final_split added (its `dropped`
    counting every table row left out, by reason), and the images found without a row (skipped)."""
    names = [i.dataset for i in inputs]
    if len(set(names)) != len(names) and "table" not in names:
        raise CxrFastError(f"--dataset {', '.join(names)}: each data set once")
    relabel = read_relabel(config.relabel and Path(config.relabel))
    tables, skipped, source_classes = [], [], {}
    for number, source in enumerate(inputs):
        request = Request(Path(source.images), Path(source.labels), config.uncertain, config.blank, config.views,
                          source.spec and Path(source.spec), source.split_lists, relabel)
        table = read_dataset(source.dataset, request)
        source_classes |= dict.fromkeys(table.applied["class_map"])
        table, orphans = _locate(table, request, source.dataset, config)
        skipped += orphans
        table.frame["final_split"] = plan_split(table, config.val_fraction, config.test_fraction, config.seed)
        unlisted = (table.frame["final_split"] == "").to_numpy()
        if unlisted.any():
            log.warning("%d image(s) are in neither split list and are left out", int(unlisted.sum()))
        table = table.keep(~unlisted, "in neither official split list")
        table.frame["dataset"] = f"{source.dataset}-{number}" if names.count(source.dataset) > 1 else source.dataset
        tables.append(table)
    check_uncertain_names(config.uncertain, tuple(source_classes))
    merged = select_classes(merge(tables), config.classes)
    merged.applied = {"per_dataset": [t.applied for t in tables], "classes": config.classes,
                      "relabel": config.relabel}
    warn_near_duplicates(merged.classes)
    _check_splits(merged)
    merged.frame["key"] = [_key(sample_key(image), dataset, len(tables) > 1)
                           for image, dataset in zip(merged.frame["image"], merged.frame["dataset"])]
    _check_keys(merged.frame)
    return merged, skipped


def _check_splits(table: SampleTable) -> None:
    """An empty train split is an error (nothing to train on), saying where the rows went; an empty validation or
    test split a warning."""
    counts = table.frame["final_split"].value_counts()
    if not counts.get("train", 0):
        dropped = ", ".join(f"{reason} {entry['count']}" for reason, entry in table.dropped.items()) or "none"
        raise CxrFastError(f"no image is left for the train split: of {table.table_rows} table row(s), "
                           f"{len(table.frame)} kept ({dict(counts)}); left out: {dropped}")
    for split in ("val", "test"):
        if not counts.get(split, 0):
            log.warning("the %s split is empty%s", split, " (training needs a validation split)" if split == "val"
                        else " (a partial download? analyze --split test will have nothing to score)")


def _locate(table: SampleTable, request: Request, dataset: str, config: ShardConfig) -> tuple[SampleTable, list]:
    """The rows whose image exists, with its path in column `file` (the others dropped as "no image"), and the
    images found without a row; an error saying which folder to pass when no row has an image."""
    skipped = []
    if not len(table.frame):  # every row left out already (by the view filter): nothing to look for
        table.frame["file"] = []
        return table, skipped
    if table.frame["path"].isna().all():
        files = find_images(request.images)
        if not files:
            raise CxrFastError(f"no PNG, JPEG or DICOM images found below {request.images}")
        found = match_images(table.frame["image"], files)
        skipped = _orphans(files, found, request, config)
        located = table.frame["image"].map(found)
    else:
        _check_inside(table.frame["path"], request.labels)
        located = table.frame["path"].map(lambda p: request.images / p)
        located = located.where(located.map(Path.is_file), None)
    present = located.notna().to_numpy()
    if not present.any():
        raise CxrFastError(f"no row of {request.labels} has an image below {request.images}"
                           f"{_folder_hint(request.images, table.frame['path'])}")
    if (~present).any():
        log.info("%d of %d %s table rows have no image below %s (a partial download is fine)",
                 int((~present).sum()), len(present), dataset, request.images)
    table = table.keep(present, "no image")
    table.frame["file"] = located[present].to_numpy()
    return table, skipped


def _folder_hint(images: Path, paths: pd.Series) -> str:
    """Which folder --images should be when the table's paths are found one level above or below it."""
    for path in paths.dropna().iloc[:20]:
        head, _, rest = str(path).partition("/")
        if rest and images.name == head and (images / rest).is_file():
            return f": --images should be the folder that holds {head}/ ({images.parent}), not {head}/ itself"
        matches = [d for d in _subfolders(images) if (d / path).is_file()]
        if matches:
            return f": --images should be {matches[0]}, the folder that holds {head}/"
    return ""


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(d for d in folder.iterdir() if d.is_dir())[:1000]
    except OSError:
        return []


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
    digits, '-' and '_' made '_' (DICOM files are often named by UIDs full of dots, a CheXpert image by its path:
    a key may hold neither)."""
    stem = image_name[: -len(suffix)] if (suffix := Path(image_name).suffix).lower() in IMAGE_SUFFIXES else image_name
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _check_inside(paths: pd.Series, table: Path) -> None:
    """A table's image paths stay below --images: an absolute path or a '..' is refused, naming the first."""
    outside = paths.map(lambda p: Path(p).is_absolute() or ".." in Path(p).parts)
    if outside.any():
        raise CxrFastError(f"{table}: image path {paths[outside].iloc[0]!r} leads outside --images")


def _orphans(files: dict, found: dict, request: Request, config: ShardConfig) -> list[dict]:
    orphans = sorted(set(files) - {path.name for path in found.values()})
    if orphans and config.on_error == "fail":
        raise CxrFastError(f"{files[orphans[0]]}: image has no row in {request.labels} "
                           f"({len(orphans)} such image(s)); use --on-error skip to leave them out")
    return [{"file": str(files[n]), "reason": NO_ROW} for n in orphans]


def merge(tables: list[SampleTable]) -> SampleTable:
    """One table on the union of the classes (in the order first seen); a data set's missing classes not stated.
    Patient ids get the data set's name as a prefix when there are several."""
    if len(tables) == 1:
        return tables[0]
    classes = tuple(dict.fromkeys(c for t in tables for c in t.classes))
    frames, labels, raw, dropped = [], [], [], {}
    for table in tables:
        frame = table.frame.copy()
        frame["patient"] = frame["dataset"] + ":" + frame["patient"].astype(str)
        columns = [classes.index(c) for c in table.classes]
        for matrix, out in ((table.labels, labels), (table.raw, raw)):
            wide = np.full((len(frame), len(classes)), np.nan, dtype=np.float32)
            wide[:, columns] = matrix
            out.append(wide)
        frames.append(frame)
        for reason, entry in table.dropped.items():
            mine = dropped.setdefault(reason, {"count": 0, "examples": []})
            mine["count"], mine["examples"] = mine["count"] + entry["count"], (mine["examples"] + entry["examples"])[:5]
    unknown = {t.frame["dataset"].iloc[0] if len(t.frame) else t.dataset: t.unknown_values for t in tables}
    return SampleTable(pd.concat(frames, ignore_index=True), np.concatenate(labels), classes, "+".join(
        t.dataset for t in tables), unknown, np.concatenate(raw), dropped)


def _key(key: str, dataset: str, prefixed: bool) -> str:
    return f"{dataset}-{key}" if prefixed else key


def _check_keys(frame: pd.DataFrame) -> None:
    long = frame["key"].str.len() > ID_BYTES
    if long.any():
        raise CxrFastError(f"image name {frame.loc[long, 'image'].iloc[0]!r}: a sample key may hold at most "
                           f"{ID_BYTES} characters")
    twice = frame["key"].duplicated(keep=False)
    if twice.any():
        first = frame[twice].sort_values("key").head(2)
        raise CxrFastError(f"image names {first['image'].iloc[0]!r} and {first['image'].iloc[1]!r} give the same "
                           f"sample key {first['key'].iloc[0]!r}")
