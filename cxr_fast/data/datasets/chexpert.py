"""CheXpert (Irvin et al. 2019): 224,316 chest radiographs (JPEG) of 65,240 patients, 14 observations labelled from
the reports as positive (1), negative (0), uncertain (-1) or not mentioned (blank).

Layout: `--images` is the folder holding `CheXpert-v1.0-small/` (or `CheXpert-v1.0/`), `--labels` its `train.csv`;
`valid.csv` beside it is read too. Columns: `Path` (relative to --images), `Sex`, `Age`, `Frontal/Lateral`,
`AP/PA`, then the 14 observations. The patient is the `patientNNNNN` part of the path. The official validation set
(200 studies read by radiologists) is the test split here; validation is carved out of train by patient.
Uncertain labels follow the paper's policies (`--uncertain`; default U-Ones for Atelectasis and Edema, the paper's
best for both, U-Zeros for the rest); blank is negative, as the paper trains (`--blank masked` to mask it). Frontal
views only unless `--views` asks for more (views: PA, AP, FRONTAL for a frontal without AP/PA, LATERAL).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_fast.data.datasets.base import (Request, SampleTable, apply_policies, check_unique_images, label_values,
                                         read_table, row_numbers)
from cxr_fast.data.datasets.labels import demographics, unusable_values
from cxr_fast.errors import CxrFastError

NAME = "chexpert"
CLASSES = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
           "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
           "Fracture", "Support Devices")
NO_FINDING = "No Finding"
SYNONYMS = {"Pleural Effusion": "Effusion"}  # into the shared vocabulary (vocabulary.py)
LABEL_SOURCE = {"train": "text-mined from the radiology reports by the CheXpert labeler",
                "val": "text-mined from the radiology reports by the CheXpert labeler",
                "test": "read from the images by a consensus of three radiologists (valid.csv)"}
DEFAULT_UNCERTAIN = "ones:Atelectasis,Edema zeros:*"
DEFAULT_VIEWS = ("PA", "AP", "FRONTAL")
COLUMNS = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + CLASSES
VALID_TABLE = "valid.csv"


def views(table: pd.DataFrame) -> pd.Series:
    """LATERAL for a lateral view, else the AP/PA column (FRONTAL where it is empty)."""
    ap_pa = table["AP/PA"].fillna("").str.strip().str.upper().replace("", "FRONTAL")
    lateral = table["Frontal/Lateral"].fillna("").str.strip().str.lower() == "lateral"
    return ap_pa.where(~lateral, "LATERAL")


def patients(paths: pd.Series, where) -> pd.Series:
    found = paths.str.extract(r"(?:^|/)(patient\d+)/", expand=False)
    if found.isna().any():
        raise CxrFastError(f"{where}: no patientNNNNN folder in Path, row(s) {row_numbers(found.isna())}")
    return found


def read(request: Request) -> SampleTable:
    if request.labels.name == VALID_TABLE:
        raise CxrFastError(f"--labels {request.labels}: give CheXpert's train.csv; {VALID_TABLE} beside it is read "
                           "as the test split")
    parts, values = [], []
    for path, split in ((request.labels, "train_val"), (request.labels.parent / VALID_TABLE, "test")):
        if split == "test" and not path.exists():
            raise CxrFastError(f"{path} not found: CheXpert's {VALID_TABLE} belongs beside {request.labels.name}")
        part = read_table(path, COLUMNS, "CheXpert train.csv / valid.csv")
        part["Path"] = part["Path"].str.strip()
        part["_split"], part["_patient"], part["_source"] = split, patients(part["Path"], path), path.name
        parts.append(part)
        values.append(label_values(part, CLASSES, path))
    table = pd.concat(parts, ignore_index=True)
    given = {"age": table["Age"], "sex": table["Sex"]}
    frame = demographics(table["Age"], table["Sex"], views(table), len(table))
    frame.insert(0, "image", table["Path"].str.split("/", n=1).str[1])  # without the release folder's name
    frame.insert(1, "path", table["Path"])
    frame.insert(2, "patient", table["_patient"])
    frame["follow_up"], frame["split"], frame["source"] = np.nan, table["_split"], table["_source"]
    values = np.concatenate(values)
    frame["finding_labels"] = findings_text(values)
    check_unique_images(frame, request.labels)
    labels = apply_policies(values, CLASSES, request, DEFAULT_UNCERTAIN, NO_FINDING)
    return SampleTable(frame, labels, CLASSES, NAME, unusable_values(given, frame), values,
                       applied=request.policies(DEFAULT_UNCERTAIN))


def findings_text(values: np.ndarray) -> list[str]:
    """The raw labels as text, for each sample's metadata: positives, then uncertain ones marked with '?'."""
    return ["|".join([CLASSES[c] for c in np.flatnonzero(row == 1)] +
                     [CLASSES[c] + "?" for c in np.flatnonzero(row == -1)]) for row in values]
