"""MIMIC-CXR-JPG 2.0 (Johnson et al. 2019): 377,110 JPEGs of 227,827 studies of 65,379 patients, labelled per
study by the CheXpert labeler (1, 0, -1 uncertain, blank).

Layout: `--images` is the folder holding `files/` (images at `files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg`), `--labels`
the `mimic-cxr-2.0.0-chexpert.csv.gz` table (`subject_id`, `study_id`, the 14 observations); beside it
`mimic-cxr-2.0.0-metadata.csv.gz` (`dicom_id`, `subject_id`, `study_id`, `ViewPosition`, ...) and
`mimic-cxr-2.0.0-split.csv.gz` (`dicom_id`, `study_id`, `subject_id`, `split`: train, validate, test), and, when
present, MIMIC-IV's `patients.csv.gz` (`subject_id`, `gender`, `anchor_age`) for sex and age; every table may
be `.csv` or `.csv.gz`. Each image takes the labels of its study (an image whose study has no label row is left
out and counted); the official split is kept (patients never cross it); PA and AP views unless `--views` asks for
more. Uncertain and blank labels follow the same policies as CheXpert's.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_fast import constants as C
from cxr_fast.data.datasets import chexpert
from cxr_fast.data.datasets.base import (Request, SampleTable, apply_policies, count_dropped, label_values,
                                         read_table, row_numbers)
from cxr_fast.data.datasets.labels import demographics, unusable_values
from cxr_fast.errors import CxrFastError

NAME = "mimic-cxr-jpg"
CLASSES = chexpert.CLASSES  # the same labeler, the same 14 observations: merged sets share the classes
DEFAULT_UNCERTAIN = chexpert.DEFAULT_UNCERTAIN
NO_FINDING, SYNONYMS = chexpert.NO_FINDING, chexpert.SYNONYMS
LABEL_SOURCE = {split: "text-mined from the radiology reports by the CheXpert labeler" for split in C.SPLITS}
DEFAULT_VIEWS = ("PA", "AP")
PREFIX = "mimic-cxr-2.0.0-"
METADATA, SPLIT, PATIENTS = f"{PREFIX}metadata.csv.gz", f"{PREFIX}split.csv.gz", "patients.csv.gz"
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}
STUDY = ["subject_id", "study_id"]


def read(request: Request) -> SampleTable:
    folder = request.labels.parent
    labels = read_table(request.labels, tuple(STUDY) + CLASSES, "MIMIC-CXR-JPG chexpert.csv.gz")
    meta = read_table(beside(folder, METADATA), ("dicom_id", "subject_id", "study_id", "ViewPosition"),
                      "MIMIC-CXR-JPG metadata.csv.gz")
    split = read_table(beside(folder, SPLIT), ("dicom_id", "split"), "MIMIC-CXR-JPG split.csv.gz")
    for table in (labels, meta, split):
        for column in set(STUDY + ["dicom_id"]) & set(table):
            table[column] = table[column].str.strip()
    if labels.duplicated(STUDY).any():
        raise CxrFastError(f"{request.labels}: study listed twice, row(s) {row_numbers(labels.duplicated(STUDY))}")
    for table, name in ((meta, METADATA), (split, SPLIT)):
        if table["dicom_id"].duplicated().any():
            raise CxrFastError(f"{beside(folder, name)}: dicom_id listed twice, row(s) "
                               f"{row_numbers(table['dicom_id'].duplicated())}")
    table = meta.merge(labels, on=STUDY, how="left", validate="many_to_one", indicator=True)
    unlabelled = (table.pop("_merge") == "left_only").to_numpy()
    dropped = count_dropped({}, "no label row", table.loc[unlabelled, "dicom_id"])
    table = table[~unlabelled].reset_index(drop=True)
    table = table.merge(split[["dicom_id", "split"]], on="dicom_id", how="left", validate="one_to_one")
    unknown = ~table["split"].isin(list(SPLIT_NAMES))
    if unknown.any():
        raise CxrFastError(f"{folder / SPLIT}: image {table.loc[unknown, 'dicom_id'].iloc[0]} has no split or an "
                           f"unknown one; expected {', '.join(SPLIT_NAMES)}")
    ages, sexes = _patients(folder, table["subject_id"])
    frame = demographics(ages, sexes, table["ViewPosition"], len(table))
    frame.insert(0, "image", table["dicom_id"])
    frame.insert(1, "path", "files/p" + table["subject_id"].str[:2] + "/p" + table["subject_id"] + "/s" +
                 table["study_id"] + "/" + table["dicom_id"] + ".jpg")
    frame.insert(2, "patient", table["subject_id"])
    frame["follow_up"], frame["split"] = np.nan, table["split"].map(SPLIT_NAMES)
    frame["source"] = request.labels.name
    values = label_values(table, CLASSES, request.labels)
    frame["finding_labels"] = chexpert.findings_text(values)
    given = {"age": ages, "sex": sexes} if ages is not None else {}
    return SampleTable(frame, apply_policies(values, CLASSES, request, DEFAULT_UNCERTAIN, NO_FINDING), CLASSES,
                       NAME, unusable_values(given, frame), values, dropped, request.policies(DEFAULT_UNCERTAIN))


def beside(folder, name: str):
    """The table `name` (.csv.gz) in `folder`, or the same table uncompressed (.csv) where only that exists."""
    packed, plain = folder / name, folder / name.removesuffix(".gz")
    return plain if not packed.exists() and plain.exists() else packed


def _patients(folder, subjects: pd.Series):
    """Age (MIMIC-IV's anchor_age) and sex per image from patients.csv.gz beside the table; None, None without it."""
    path = beside(folder, PATIENTS)
    if not path.exists():
        return None, None
    table = read_table(path, ("subject_id", "gender", "anchor_age"), "MIMIC-IV patients.csv.gz")
    table["subject_id"] = table["subject_id"].str.strip()
    if table["subject_id"].duplicated().any():
        raise CxrFastError(f"{path}: subject_id listed twice, row(s) {row_numbers(table['subject_id'].duplicated())}")
    table = table.set_index("subject_id")
    return subjects.map(table["anchor_age"]), subjects.map(table["gender"])
