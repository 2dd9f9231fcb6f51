"""NIH ChestX-ray14 (Wang et al. 2017): 112,120 frontal PNGs of 30,805 patients, 14 findings.

Table: `Data_Entry_2017.csv` (`Image Index`, `Finding Labels` as "Effusion|Mass" or "No Finding", `Patient ID`,
`Patient Age`, `Patient Gender`, `View Position`, `Follow-up #`); images found by file name below --images
(NIH ships images_001/images/...). Official split: `test_list.txt` and `train_val_list.txt` (from flags or beside
the table), validation carved out of train_val by patient; without them validation and test are both carved out.
Every label is stated: the table lists the findings present, so each class not listed is negative.

The table is normalised and checked where it enters: image names, patient IDs and finding names are trimmed
(`" 3"` and `"3"` are one patient; `"Effusion | Mass"` is Effusion and Mass), and missing columns, empty cells,
unknown or empty finding names, "No Finding" beside a finding, and duplicate image names are errors naming the file
and the row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.data.datasets.base import (NOT_APPLICABLE, Request, SampleTable, check_unique_images, read_table,
                                         row_numbers)
from cxr_fast.data.datasets.labels import demographics, read_split_list, unusable_values
from cxr_fast.errors import CxrFastError

NAME = "nih"
# The 14 findings in the order of the NIH release (Wang et al. 2017, Table 1).
CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
           "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")
# "No Finding" is not a class here: NIH writes it for the all-zero label vector (its text, not a column).
NO_FINDING_TEXT = "No Finding"
NO_FINDING = None
SYNONYMS: dict[str, str] = {}  # NIH's names are the shared vocabulary's (vocabulary.py)
LABEL_SOURCE = {split: "text-mined from the radiology reports by natural-language processing (Wang et al. 2017)"
                for split in ("train", "val", "test")}
DEFAULT_VIEWS = None  # every image is frontal (PA or AP)

# Real prevalence per class (images with the finding / 112,120), from Data_Entry_2017.csv: the synthetic data set
# draws its labels from these numbers.
REAL_PREVALENCE = {
    "Atelectasis": 0.1031, "Cardiomegaly": 0.0248, "Effusion": 0.1188, "Infiltration": 0.1774, "Mass": 0.0516,
    "Nodule": 0.0565, "Pneumonia": 0.0128, "Pneumothorax": 0.0473, "Consolidation": 0.0416, "Edema": 0.0205,
    "Emphysema": 0.0224, "Fibrosis": 0.0150, "Pleural_Thickening": 0.0302, "Hernia": 0.0020,
}

COL_IMAGE = "Image Index"
COL_LABELS = "Finding Labels"
COL_PATIENT = "Patient ID"
COL_AGE = "Patient Age"
COL_SEX = "Patient Gender"
COL_VIEW = "View Position"
COL_FOLLOWUP = "Follow-up #"
REQUIRED_COLUMNS = (COL_IMAGE, COL_LABELS, COL_PATIENT)
LABEL_TABLE_NAME = "Data_Entry_2017.csv"
BOX_SPACE = 1024  # BBox_List_2017.csv gives box coordinates in the 1024 x 1024 pixel space of the PNGs
_CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}


def parse_finding_labels(text: str) -> np.ndarray:
    """'Effusion|Mass' -> multi-hot uint8 vector in canonical order; 'No Finding' -> all zeros."""
    vector = np.zeros(len(CLASSES), dtype=np.uint8)
    for name in str(text).split("|"):
        name = name.strip()
        if name == NO_FINDING_TEXT:
            continue
        if name not in _CLASS_INDEX:
            raise CxrFastError(f"unknown finding {name!r}; known: {', '.join(CLASSES)} and {NO_FINDING_TEXT!r}")
        vector[_CLASS_INDEX[name]] = 1
    return vector


def format_finding_labels(vector: np.ndarray) -> str:
    """Inverse of `parse_finding_labels`."""
    names = [CLASSES[i] for i in np.flatnonzero(vector)]
    return "|".join(names) if names else NO_FINDING_TEXT


def read_label_table(path: str | Path) -> pd.DataFrame:
    """Read and validate the NIH table (.csv or .csv.gz). Adds no columns; see `multi_hot` for the labels."""
    path = Path(path)
    table = read_table(path, REQUIRED_COLUMNS, "NIH Data_Entry_2017.csv", keep_default_na=True, na_values=None,
                       dtype={COL_IMAGE: str, COL_LABELS: str, COL_PATIENT: str})
    table = table.loc[:, [c for c in table.columns if not c.startswith("Unnamed")]]
    for column in REQUIRED_COLUMNS:
        table[column] = table[column].str.strip().replace("", np.nan)
    empty = table[list(REQUIRED_COLUMNS)].isna().any(axis=1)
    if empty.any():
        raise CxrFastError(f"{path}: empty {'/'.join(REQUIRED_COLUMNS)} in row(s) {row_numbers(empty)}")
    check_unique_images(table.rename(columns={COL_IMAGE: "image"}), path)
    table[COL_LABELS] = _canonical_labels(table, path)
    return table.reset_index(drop=True)


def _canonical_labels(table: pd.DataFrame, path: Path) -> pd.Series:
    """`Finding Labels` with every name trimmed, after checking each name is known and "No Finding" stands alone."""
    names = table[COL_LABELS].str.split("|").map(lambda parts: [part.strip() for part in parts])
    exploded = names.explode()
    bad = ~exploded.isin(set(CLASSES) | {NO_FINDING_TEXT})
    if bad.any():
        first = exploded[bad].index[0]
        shown = sorted(set(exploded[bad]))
        raise CxrFastError(
            f"{path}: unknown finding name(s) {', '.join(map(repr, shown[:5]))} (first in row {first + 2}, "
            f"image {table.at[first, COL_IMAGE]}); known: {', '.join(CLASSES)} and {NO_FINDING_TEXT!r}"
        )
    mixed = names.map(lambda parts: NO_FINDING_TEXT in parts and len(parts) > 1)
    if mixed.any():
        first = int(np.flatnonzero(mixed.to_numpy())[0])
        raise CxrFastError(f"{path}: row {first + 2} (image {table.at[first, COL_IMAGE]}) says {NO_FINDING_TEXT!r} "
                           "beside a finding")
    return names.map("|".join)


def multi_hot(table: pd.DataFrame) -> np.ndarray:
    """(rows, 14) uint8 multi-hot matrix for a validated table, vectorised (the full table takes well under 1 s)."""
    strings = table[COL_LABELS].astype(str)
    return np.stack([strings.str.contains(rf"(?:^|\|){name}(?:\||$)", regex=True) for name in CLASSES], axis=1
                    ).astype(np.uint8)


def split_lists(labels_path: Path, given: tuple) -> tuple:
    """The official (test, train_val) lists, from flags, else from beside the table ((None, None) without them),
    and the paths they were read from."""
    test_list, train_val_list = (Path(p) if p else None for p in given)
    if test_list is None and (labels_path.parent / "test_list.txt").exists():
        test_list = labels_path.parent / "test_list.txt"
        if train_val_list is None and (labels_path.parent / "train_val_list.txt").exists():
            train_val_list = labels_path.parent / "train_val_list.txt"
    if test_list is None:
        if train_val_list is not None:
            raise CxrFastError("--train-val-list needs --test-list")
        return None, None, (None, None)
    return (read_split_list(test_list), read_split_list(train_val_list) if train_val_list else None,
            (test_list, train_val_list))


def split_marks(images: pd.Series, test_list: list[str] | None, train_val_list: list[str] | None = None) -> pd.Series:
    """test / train_val / "" (in neither list) from the official lists; "pool" for every image without them."""
    if test_list is None:
        return pd.Series("pool", index=images.index, dtype=object)
    in_test = images.isin(set(test_list))
    in_train_val = images.isin(set(train_val_list)) if train_val_list is not None else ~in_test
    both = in_test & in_train_val
    if both.any():
        raise CxrFastError(f"image {images[both].iloc[0]} is in both the test list and the train_val list")
    return pd.Series(np.where(in_test, "test", np.where(in_train_val, "train_val", "")), index=images.index,
                     dtype=object)


def to_sample_table(table: pd.DataFrame, marks: pd.Series | None = None) -> SampleTable:
    """A validated NIH table in the common form; `marks` the official split (default: none, "pool")."""
    given = {"age": table.get(COL_AGE), "sex": table.get(COL_SEX)}
    frame = demographics(given["age"], given["sex"], table.get(COL_VIEW), len(table))
    frame.insert(0, "image", table[COL_IMAGE])
    frame.insert(1, "path", None)
    frame.insert(2, "patient", table[COL_PATIENT])
    frame["follow_up"] = pd.to_numeric(table[COL_FOLLOWUP], errors="coerce") if COL_FOLLOWUP in table else np.nan
    frame["split"] = marks if marks is not None else split_marks(table[COL_IMAGE], None)
    frame["finding_labels"] = table[COL_LABELS]
    frame["source"] = LABEL_TABLE_NAME
    return SampleTable(frame, multi_hot(table).astype(np.float32), CLASSES, NAME, unusable_values(given, frame),
                       applied={"uncertain": NOT_APPLICABLE, "blank": NOT_APPLICABLE})


def read(request: Request) -> SampleTable:
    table = read_label_table(request.labels)
    lists = split_lists(request.labels, request.split_lists)
    samples = to_sample_table(table, split_marks(table[COL_IMAGE], *lists[:2]))
    samples.frame["source"] = request.labels.name
    samples.applied["split_lists"] = [str(p) if p else None for p in lists[2]]
    return samples


def read_boxes(path: str | Path) -> pd.DataFrame:
    """NIH BBox_List_2017.csv → columns image, finding, x, y, w, h (1024-pixel space), checked: numeric, positive
    sizes, inside the image (the analysis keeps the boxes of the model's classes)."""
    try:
        raw = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise CxrFastError(f"cannot read box list {path}: {error}") from None
    if raw.shape[1] < 6:
        raise CxrFastError(f"{path}: expected NIH's BBox_List_2017.csv (image, finding, x, y, w, h)")
    boxes = raw.iloc[:, :6].copy()
    boxes.columns = ["image", "finding", "x", "y", "w", "h"]
    for column in ("x", "y", "w", "h"):
        values = pd.to_numeric(boxes[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values) | ((values <= 0) if column in ("w", "h") else (values < 0))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CxrFastError(f"{path}: row {row + 2} has an invalid box {column} ({boxes[column].iloc[row]!r}); "
                               "x, y must be numbers >= 0 and w, h > 0")
        boxes[column] = values
    outside = (boxes["x"] + boxes["w"] > BOX_SPACE) | (boxes["y"] + boxes["h"] > BOX_SPACE)
    if outside.any():
        row = int(np.flatnonzero(outside.to_numpy())[0])
        raise CxrFastError(f"{path}: row {row + 2} has a box reaching past the {BOX_SPACE} x {BOX_SPACE} pixel "
                           f"space of NIH's images (x {boxes['x'].iloc[row]}, w {boxes['w'].iloc[row]}, y "
                           f"{boxes['y'].iloc[row]}, h {boxes['h'].iloc[row]})")
    boxes["image"] = boxes["image"].astype(str).str.strip()
    boxes["finding"] = boxes["finding"].astype(str).str.strip().replace({"Infiltrate": "Infiltration"})
    return boxes
