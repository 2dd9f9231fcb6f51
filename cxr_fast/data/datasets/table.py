"""Any data set nobody has described yet (VinDr-CXR's DICOMs, PadChest's 16-bit PNGs, a hospital's export): a
table whose columns a small YAML file names (`cxr-fast shard --dataset table --spec spec.yaml`).

    image: Path              # required: the image's path relative to --images
    patient: PatientID       # required: images of one patient never cross splits
    classes: [Effusion, Nodule, Pneumothorax]   # required: one column per class, 1 / 0 / -1 uncertain / blank
    age: Age                 # optional columns: age (years or a DICOM age string), sex, view
    sex: Sex
    view: ViewPosition
    split: Split             # optional: train / val (or validate) / test; without it validation and test are carved
    uncertain: "zeros:*"     # optional: the default policy for -1 (--uncertain overrides it)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_fast.data.datasets.base import (Request, SampleTable, apply_policies, check_unique_images, label_values,
                                         read_table, row_numbers)
from cxr_fast.data.datasets.labels import demographics, unusable_values
from cxr_fast.errors import CxrFastError
from cxr_fast.settings import load_plain_yaml

NAME = "table"
CLASSES = None  # named by the spec
DEFAULT_VIEWS = None
NO_FINDING = None
SYNONYMS: dict[str, str] = {}  # a spec's columns keep their names; --relabel maps them into the vocabulary
LABEL_SOURCE = {split: "as the table gives them (their origin is not recorded)" for split in ("train", "val", "test")}
SPEC_KEYS = {"image", "patient", "classes", "age", "sex", "view", "split", "uncertain"}
SPLIT_NAMES = {"train": "train", "val": "val", "validate": "val", "validation": "val", "test": "test"}


def read_spec(path: Path | None) -> dict:
    if path is None:
        raise CxrFastError("--dataset table needs --spec FILE naming the table's columns (README, 'Other data sets')")
    spec = load_plain_yaml(path, "spec")
    if not isinstance(spec, dict) or not {"image", "patient", "classes"} <= set(spec) or set(spec) - SPEC_KEYS:
        raise CxrFastError(f"{path}: a spec names image, patient and classes (a list of label columns), and "
                           f"optionally age, sex, view, split, uncertain; got {spec!r:.200}")
    wrong = [k for k in SPEC_KEYS - {"classes"} if spec.get(k) is not None and not isinstance(spec[k], str)]
    if wrong:
        raise CxrFastError(f"{path}: {', '.join(sorted(wrong))} must name one column (a text), got "
                           f"{', '.join(f'{spec[k]!r:.60}' for k in sorted(wrong))}")
    classes = spec["classes"]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes) or \
            len(set(classes)) != len(classes):
        raise CxrFastError(f"{path}: classes must be a list of distinct column names, got {classes!r:.200}")
    return spec


def read(request: Request) -> SampleTable:
    spec = read_spec(request.spec)
    classes = tuple(spec["classes"])
    optional = [spec[k] for k in ("age", "sex", "view", "split") if spec.get(k)]
    table = read_table(request.labels, (spec["image"], spec["patient"], *classes, *optional), "spec'd")
    for key in ("image", "patient"):
        empty = table[spec[key]].fillna("").str.strip() == ""
        if empty.any():
            raise CxrFastError(f"{request.labels}: empty {spec[key]!r} in row(s) {row_numbers(empty)}")
    column = {k: table[spec[k]] if spec.get(k) else None for k in ("age", "sex", "view")}
    frame = demographics(column["age"], column["sex"], column["view"], len(table))
    paths = table[spec["image"]].str.strip()
    frame.insert(0, "image", paths)
    frame.insert(1, "path", paths)
    frame.insert(2, "patient", table[spec["patient"]].str.strip())
    frame["follow_up"] = np.nan
    frame["split"] = _split(table[spec["split"]], request.labels) if spec.get("split") else "pool"
    values = label_values(table, classes, request.labels)
    frame["finding_labels"] = ["|".join(classes[c] for c in np.flatnonzero(row == 1)) for row in values]
    frame["source"] = request.labels.name
    check_unique_images(frame, request.labels)
    default = spec.get("uncertain") or "zeros:*"
    labels = apply_policies(values, classes, request, default)
    given = {k: column[k] for k in ("age", "sex") if column[k] is not None}
    return SampleTable(frame, labels, classes, NAME, unusable_values(given, frame), values,
                       applied=request.policies(default))


def _split(values, where):
    names = values.fillna("").str.strip().str.lower()
    bad = ~names.isin(list(SPLIT_NAMES))
    if bad.any():
        raise CxrFastError(f"{where}: split must be one of {', '.join(SPLIT_NAMES)}; row(s) {row_numbers(bad)}")
    return names.map(SPLIT_NAMES)
