"""The synthetic data set written in a data set's layout, from the same drawn pictures and labels (`painter.py`):

  nih            DIR/Data_Entry_2017.csv (NIH's columns), DIR/train_val_list.txt and test_list.txt (official-style,
                 patient-disjoint), DIR/images_001/images/<patient>_<follow-up>.png (8-bit gray PNGs)
  chexpert       CheXpert-v1.0-small's folders, train.csv and valid.csv
  mimic-cxr-jpg  MIMIC-CXR-JPG's files/ tree, its chexpert, metadata and split tables, MIMIC-IV's patients.csv.gz
  padchest       PADCHEST_chest_x_ray_images_labels_160K.csv and DIR/<ImageDir>/<ImageID>.png (16-bit PNGs holding
                 12 bits, as PadChest's detectors give), some lateral projections, PadChest's lower-case names

CheXpert's and MIMIC's films are JPEGs a fifth taller than wide (so pad-to-square matters).

Labels: each NIH finding the painter draws maps to the CheXpert observation that names it (Effusion → Pleural
Effusion, Mass and Nodule → Lung Lesion, ...; Emphysema, Fibrosis and Hernia have none and stay unlabelled, as in
the real reports). The report labeler's habits are imitated: a positive is written as uncertain (-1) one time in
six, a negative is mostly left blank and sometimes written 0 or -1, and No Finding is 1 only without a positive.
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.config import SynthConfig
from cxr_fast.data.datasets import chexpert, mimic, nih
from cxr_fast.data.synth.painter import CLASSES, Drawn, draw, paint
from cxr_fast.errors import CxrFastError
from cxr_fast.files import claim_whole_folder

log = logging.getLogger(__name__)

FROM_NIH = {"Atelectasis": ["Atelectasis"], "Cardiomegaly": ["Cardiomegaly", "Enlarged Cardiomediastinum"],
            "Effusion": ["Pleural Effusion"], "Infiltration": ["Lung Opacity"], "Mass": ["Lung Lesion"],
            "Nodule": ["Lung Lesion"], "Pneumonia": ["Pneumonia", "Lung Opacity"], "Pneumothorax": ["Pneumothorax"],
            "Consolidation": ["Consolidation", "Lung Opacity"], "Edema": ["Edema"],
            "Pleural_Thickening": ["Pleural Other"]}
TALLER = 1.2
NIH_IMAGES = "images_001/images"


def report_labels(nih_labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(images, 14) CheXpert values (1, 0, -1, NaN blank) from the painted NIH findings."""
    truth = np.zeros((len(nih_labels), len(chexpert.CLASSES)), bool)
    for c, name in enumerate(CLASSES):
        for target in FROM_NIH.get(name, []):
            truth[:, chexpert.CLASSES.index(target)] |= nih_labels[:, c] > 0
    values = np.where(truth, np.where(rng.random(truth.shape) < 1 / 6, -1.0, 1.0),
                      rng.choice([np.nan, 0.0, -1.0], size=truth.shape, p=[0.7, 0.25, 0.05]))
    none = chexpert.CLASSES.index("No Finding")
    values[:, none] = np.where(truth.any(axis=1), np.nan, 1.0)
    return values


def _table_values(values: np.ndarray) -> pd.DataFrame:
    """The label columns as the releases write them: 1.0, 0.0, -1.0 or empty."""
    return pd.DataFrame(values, columns=list(chexpert.CLASSES))


def write_chexpert(out: Path, drawn: Drawn, config: SynthConfig, rng: np.random.Generator) -> Path:
    """out/CheXpert-v1.0-small/{train,valid}.csv and {train,valid}/patientNNNNN/studyN/viewN_{frontal,lateral}.jpg;
    the test-fraction of patients in valid. Returns train.csv."""
    root = out / "CheXpert-v1.0-small"
    patients = np.unique(drawn.patients)
    valid = set(rng.choice(patients, size=max(1, round(config.test_fraction * len(patients))), replace=False))
    lateral = rng.random(len(drawn.patients)) < 0.15
    paths, rows = [], []
    for i, (patient, followup) in enumerate(zip(drawn.patients, drawn.followups)):
        part = "valid" if patient in valid else "train"
        view = "view2_lateral" if lateral[i] else "view1_frontal"
        relative = f"{root.name}/{part}/patient{patient:05d}/study{followup + 1}/{view}.jpg"
        paths.append(out / relative)
        rows.append({"Path": relative, "Sex": {"M": "Male", "F": "Female"}[drawn.sexes[i]], "Age": drawn.ages[i],
                     "Frontal/Lateral": "Lateral" if lateral[i] else "Frontal",
                     "AP/PA": "" if lateral[i] else drawn.views[i], "_part": part})
    paint(paths, drawn, config, int(config.source_size * TALLER))
    table = pd.concat([pd.DataFrame(rows), _table_values(report_labels(drawn.labels, rng))], axis=1)
    for part in ("train", "valid"):
        table[table["_part"] == part].drop(columns="_part").to_csv(root / f"{part}.csv", index=False)
    log.info("wrote %d synthetic CheXpert-layout images of %d patients to %s", len(paths), len(patients), out)
    return root / "train.csv"


def write_mimic(out: Path, drawn: Drawn, config: SynthConfig, rng: np.random.Generator) -> Path:
    """out/files/pNN/pSUBJECT/sSTUDY/DICOM_ID.jpg and the chexpert, metadata and split tables (.csv.gz) beside
    patients.csv.gz; each follow-up a study, some with a lateral image too. Returns the chexpert table."""
    subjects = 10_000_000 + drawn.patients
    studies = 50_000_000 + np.arange(len(drawn.patients))
    patients = rng.permutation(np.unique(subjects))
    tests, vals = max(1, round(config.test_fraction * len(patients))), max(1, round(0.1 * len(patients)))
    split = dict(zip(patients, ["test"] * tests + ["validate"] * vals + ["train"] * (len(patients) - tests - vals)))
    meta, paths, image_of = [], [], []
    for i, (subject, study) in enumerate(zip(subjects, studies)):
        for view in [drawn.views[i]] + (["LATERAL"] if rng.random() < 0.2 else []):
            dicom_id = "-".join(f"{v:08x}" for v in rng.integers(0, 2 ** 32, 5))
            meta.append({"dicom_id": dicom_id, "subject_id": subject, "study_id": study, "ViewPosition": view,
                         "Rows": int(config.source_size * TALLER), "Columns": config.source_size})
            paths.append(out / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id}.jpg")
            image_of.append(i)
    paint(paths, drawn.pick(image_of), config, int(config.source_size * TALLER))
    labels = pd.concat([pd.DataFrame({"subject_id": subjects, "study_id": studies}),
                        _table_values(report_labels(drawn.labels, rng))[sorted(mimic.CLASSES)]], axis=1)
    meta = pd.DataFrame(meta)
    meta["split"] = meta["subject_id"].map(split)
    patients_table = pd.DataFrame({"subject_id": subjects, "gender": drawn.sexes, "anchor_age": drawn.ages,
                           "anchor_year": 2150, "anchor_year_group": "2008 - 2010", "dod": ""}
                          ).drop_duplicates("subject_id")
    tables = {f"{mimic.PREFIX}chexpert.csv.gz": labels, mimic.METADATA: meta.drop(columns="split"),
              mimic.SPLIT: meta[["dicom_id", "study_id", "subject_id", "split"]], mimic.PATIENTS: patients_table}
    for name, table in tables.items():
        with gzip.open(out / name, "wt") as handle:
            table.to_csv(handle, index=False)
    log.info("wrote %d synthetic MIMIC-CXR-JPG-layout images of %d patients to %s", len(paths), len(patients), out)
    return out / f"{mimic.PREFIX}chexpert.csv.gz"


def write_nih(out: Path, drawn: Drawn, config: SynthConfig, rng: np.random.Generator) -> Path:
    images_dir = out / NIH_IMAGES
    images_dir.mkdir(parents=True, exist_ok=True)
    patients, followups, labels = drawn.patients, drawn.followups, drawn.labels
    names = [f"{p:08d}_{f:03d}.png" for p, f in zip(patients, followups)]
    paint([images_dir / name for name in names], drawn, config)
    table = pd.DataFrame({
        nih.COL_IMAGE: names,
        nih.COL_LABELS: [nih.format_finding_labels(row) for row in labels],
        nih.COL_FOLLOWUP: followups,
        nih.COL_PATIENT: patients,
        nih.COL_AGE: drawn.ages,
        nih.COL_SEX: drawn.sexes,
        nih.COL_VIEW: drawn.views,
        "OriginalImage[Width": config.source_size,
        "Height]": config.source_size,
        "OriginalImagePixelSpacing[x": 0.143 * 1024 / config.source_size,
        "y]": 0.143 * 1024 / config.source_size,
    })
    table_path = out / nih.LABEL_TABLE_NAME
    table.to_csv(table_path, index=False)

    unique_patients = np.unique(patients)
    test_patients = set(rng.choice(unique_patients, size=max(1, int(round(config.test_fraction * len(unique_patients)))),
                                   replace=False))
    is_test = np.array([p in test_patients for p in patients])
    (out / "test_list.txt").write_text("\n".join(np.array(names)[is_test]) + "\n")
    (out / "train_val_list.txt").write_text("\n".join(np.array(names)[~is_test]) + "\n")
    log.info("wrote %d synthetic images of %d patients to %s", len(names), len(unique_patients), out)
    return table_path


# The painted NIH findings in PadChest's words (its own names; `padchest.SYNONYMS` maps them back).
PADCHEST_NAMES = {"Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Effusion": "pleural effusion",
                  "Infiltration": "infiltrates", "Mass": "mass", "Nodule": "nodule", "Pneumonia": "pneumonia",
                  "Pneumothorax": "pneumothorax", "Consolidation": "consolidation", "Edema": "pulmonary edema",
                  "Emphysema": "emphysema", "Fibrosis": "pulmonary fibrosis",
                  "Pleural_Thickening": "pleural thickening", "Hernia": "hiatal hernia"}
PADCHEST_ONLY = ("aortic elongation", "chronic changes", "scoliosis")  # common PadChest labels no other set has


def write_padchest(out: Path, drawn: Drawn, config: SynthConfig, rng: np.random.Generator) -> Path:
    """out/PADCHEST_chest_x_ray_images_labels_160K.csv and out/<ImageDir>/<ImageID>.png (16-bit); a tenth of the
    images lateral (Projection L); a few PadChest-only labels beside the painted ones, "normal" without any."""
    lateral = rng.random(len(drawn.patients)) < 0.1
    rows, paths = [], []
    for i, (patient, followup) in enumerate(zip(drawn.patients, drawn.followups)):
        image_id = f"2168401113669640{rng.integers(0, 10**15):015d}_{patient:05d}-{followup:03d}.png"
        folder = str(i % 4)
        names = [PADCHEST_NAMES[CLASSES[c]] for c in np.flatnonzero(drawn.labels[i])]
        names += [n for n in PADCHEST_ONLY if rng.random() < 0.15]
        rows.append({"ImageID": image_id, "ImageDir": folder, "StudyDate_DICOM": 20100000 + followup * 10000 + 101,
                     "StudyID": f"study{patient}-{followup}", "PatientID": f"pat{patient}",
                     "PatientBirth": 2010 + followup - drawn.ages[i], "PatientSex_DICOM": drawn.sexes[i],
                     "ViewPosition_DICOM": drawn.views[i], "Projection": "L" if lateral[i] else drawn.views[i],
                     "MethodProjection": "Manual review of DICOM fields",
                     "MethodLabel": "Physician" if rng.random() < 0.27 else "RNN_model",
                     "Labels": repr(names or ["normal"])})
        paths.append(out / folder / image_id)
    paint(paths, drawn, config, bits=12)
    table = out / "PADCHEST_chest_x_ray_images_labels_160K.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    log.info("wrote %d synthetic PadChest-layout images to %s", len(paths), out)
    return table


LAYOUTS = {"nih": write_nih, "chexpert": write_chexpert, "mimic-cxr-jpg": write_mimic, "padchest": write_padchest}


def write_synthetic_dataset(out: str | Path, config: SynthConfig = SynthConfig()) -> Path:
    """Write the data set below `out` in `config.layout` and return the path of its label table (what `shard`
    takes as --labels; --images is `out`). `out` is new, empty or an earlier synthetic set (emptied first): never a
    folder of real data, whose table and images would be replaced."""
    if config.layout not in LAYOUTS:
        raise CxrFastError(f"unknown layout {config.layout!r}: use {', '.join(LAYOUTS)}")
    claim_whole_folder(Path(out), "synth")
    rng = np.random.default_rng(config.seed)
    drawn = draw(config, rng)
    return LAYOUTS[config.layout](Path(out), drawn, config, rng)
