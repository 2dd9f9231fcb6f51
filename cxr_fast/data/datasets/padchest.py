"""PadChest (Bustos et al. 2020): 160,868 chest radiographs (16-bit PNG) of 67,625 patients at Hospital San Juan,
Alicante, labelled with 174 findings and 19 diagnoses from the Spanish reports — 27% by physicians, the rest by a
neural network trained on those (`MethodLabel`: Physician or RNN_model).

Layout: `--labels` is `PADCHEST_chest_x_ray_images_labels_160K.csv` (`ImageID`, `ImageDir`, `PatientID`, `StudyID`,
`Projection`, `MethodLabel`, `Labels` as a Python list's text, `['pleural effusion', 'cardiomegaly']`; optional
`PatientSex_DICOM`, `PatientBirth`, `StudyDate_DICOM`), `--images` the folder holding the numbered folders:
images at `<images>/<ImageDir>/<ImageID>`, read over their 16-bit range as every 16-bit source is. The list is
parsed as text, never evaluated; a row whose list is malformed or empty is left out and counted. Each name listed
is positive and every other class negative (like NIH); "normal" is the "no finding" state. Classes are the names
the table uses; those with a synonym take the shared name (SYNONYMS), the rest keep theirs (`--classes` picks a
subset). No official split: validation and test are carved out by patient. Frontal projections by default (PA,
AP, AP_horizontal).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from cxr_fast.data.datasets.base import (NOT_APPLICABLE, Request, SampleTable, check_unique_images, count_dropped,
                                         read_table)
from cxr_fast.data.datasets.labels import demographics, unusable_values
from cxr_fast.data.datasets.vocabulary import VOCABULARY

NAME = "padchest"
CLASSES = None  # the names the table uses
NO_FINDING = "normal"
DEFAULT_VIEWS = ("PA", "AP", "AP_HORIZONTAL")
SYNONYMS = {"normal": "No Finding", "cardiomegaly": "Cardiomegaly", "pleural effusion": "Effusion",
            "pneumothorax": "Pneumothorax", "atelectasis": "Atelectasis", "nodule": "Nodule", "mass": "Mass",
            "consolidation": "Consolidation", "pneumonia": "Pneumonia", "emphysema": "Emphysema",
            "pulmonary fibrosis": "Fibrosis", "hiatal hernia": "Hernia", "pleural thickening": "Pleural_Thickening",
            "infiltrates": "Infiltration", "pulmonary edema": "Edema", "fracture": "Fracture"}
LABEL_SOURCE = {split: "extracted from the radiology reports, by physicians for 27% of the images and by a neural "
                       "network trained on theirs for the rest" for split in ("train", "val", "test")}
COLUMNS = ("ImageID", "ImageDir", "PatientID", "StudyID", "Projection", "MethodLabel", "Labels")
_LIST = re.compile(r"""^\[\s*(?:(?:'[^']*'|"[^"]*")\s*(?:,\s*(?:'[^']*'|"[^"]*")\s*)*,?\s*)?\]$""")
_ITEM = re.compile(r"""'([^']*)'|"([^"]*)\"""")


def parse_labels(text) -> list[str] | None:
    """The names of a `Labels` cell (`['pleural effusion', 'cardiomegaly']`), trimmed, empty ones left out; None
    when the cell is not such a list. Read as text: nothing in a cell is ever evaluated."""
    if not isinstance(text, str) or not _LIST.match(text.strip()):
        return None
    return [name for a, b in _ITEM.findall(text) if (name := (a or b).strip())]


def read(request: Request) -> SampleTable:
    table = read_table(request.labels, COLUMNS, "PadChest PADCHEST_chest_x_ray_images_labels_160K.csv")
    names = table["Labels"].map(parse_labels)
    malformed = names.isna().to_numpy()
    empty = names.map(lambda n: n is not None and not n).to_numpy(dtype=bool)
    dropped = count_dropped({}, "malformed Labels list", table.loc[malformed, "ImageID"])
    dropped = count_dropped(dropped, "no label listed", table.loc[empty, "ImageID"])
    keep = ~(malformed | empty)
    table, names = table[keep].reset_index(drop=True), names[keep].reset_index(drop=True)
    classes = tuple(sorted({n for row in names for n in row}, key=_order))
    index = {name: c for c, name in enumerate(classes)}
    values = np.zeros((len(table), len(classes)), dtype=np.float32)
    for row, listed in enumerate(names):
        values[row, [index[n] for n in listed]] = 1.0
    given = {"age": _ages(table), "sex": table.get("PatientSex_DICOM")}
    frame = demographics(given["age"], given["sex"], table["Projection"], len(table))
    frame.insert(0, "image", table["ImageID"].str.strip())
    frame.insert(1, "path", table["ImageDir"].str.strip() + "/" + frame["image"])
    frame.insert(2, "patient", table["PatientID"].str.strip())
    frame["follow_up"], frame["split"], frame["source"] = np.nan, "pool", request.labels.name
    frame["finding_labels"] = names.map("|".join)
    check_unique_images(frame, request.labels)
    unknown = unusable_values({k: v for k, v in given.items() if v is not None}, frame)
    return SampleTable(frame, values, classes, NAME, unknown, values.copy(), dropped,
                       {"uncertain": NOT_APPLICABLE, "blank": NOT_APPLICABLE})


def _order(name: str) -> tuple:
    """Names with a shared synonym first, in the vocabulary's order; PadChest's own after them, alphabetically."""
    return (0, VOCABULARY.index(SYNONYMS[name]), "") if name in SYNONYMS else (1, 0, name)


def _ages(table: pd.DataFrame) -> pd.Series | None:
    """Age at the study in whole years, from the birth year and the study date, where the table has both."""
    if "PatientBirth" not in table or "StudyDate_DICOM" not in table:
        return None
    born = pd.to_numeric(table["PatientBirth"], errors="coerce")
    year = pd.to_numeric(table["StudyDate_DICOM"].str.strip().str[:4], errors="coerce")
    return (year - born).map(lambda v: "" if pd.isna(v) else str(int(v)))
