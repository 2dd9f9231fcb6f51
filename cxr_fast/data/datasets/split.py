"""Patient-level train/val/test splits: never one patient in two splits.

A data set's official split is kept (NIH's test list, CheXpert's valid.csv as test, MIMIC-CXR-JPG's three splits);
what it leaves open is carved out by patient: validation out of train_val, validation and test out of a data set
without a split. Carving is stratified at patient level (a greedy form of
iterative stratification, Sechidis et al. 2011): patients are placed rarest finding first, each into the split that
still lacks most of that finding, so rare classes such as Hernia (227 of 112,120 images) have positives in every split.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_fast import constants as C
from cxr_fast.errors import CxrFastError
from cxr_fast.data.datasets.base import SPLIT_MARKS, SampleTable
from cxr_fast.data.datasets.labels import age_band


def carve_by_patient(
    patients: np.ndarray, labels: np.ndarray, fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Assign each patient to one split so that image counts and per-class positives follow `fractions`.

    patients: (images,) patient ids; labels: (images, classes) multi-hot. Returns patient id -> split name.
    """
    names = list(fractions)
    share = np.array([fractions[n] for n in names], dtype=float)
    if np.any(share < 0) or abs(share.sum() - 1.0) > 1e-6:
        raise CxrFastError(f"split fractions must be >= 0 and sum to 1, got {fractions}")
    frame = pd.DataFrame(labels, columns=range(labels.shape[1]))
    frame["patient"] = patients
    per_patient = frame.groupby("patient", sort=True)
    positives = per_patient.sum().to_numpy(dtype=float)  # (patients, classes): images with each finding
    n_images = per_patient.size().to_numpy(dtype=float)
    patient_ids = np.array(list(per_patient.groups.keys()))

    class_totals = positives.sum(axis=0)
    wanted_pos = share[:, None] * class_totals[None, :]  # (splits, classes) still to place
    wanted_img = share * n_images.sum()

    rng = np.random.default_rng(seed)
    # Rarest finding of each patient (by global count); patients without findings go last.
    rarity = np.where(positives > 0, class_totals[None, :], np.inf)
    rarest_class = rarity.argmin(axis=1)
    rarest_count = rarity.min(axis=1)
    order = np.lexsort((rng.random(len(patient_ids)), rarest_count))

    assignment = {}
    for p in order:
        if np.isfinite(rarest_count[p]):
            need = wanted_pos[:, rarest_class[p]]
        else:
            need = wanted_img
        # Most-lacking split first; ties go to the split lacking most images, then at random.
        key = np.lexsort((rng.random(len(names)), -wanted_img, -need))
        chosen = key[0] if share[key[0]] > 0 else int(np.argmax(share))
        wanted_pos[chosen] -= positives[p]
        wanted_img[chosen] -= n_images[p]
        assignment[patient_ids[p]] = names[chosen]
    return assignment


def plan_split(table: SampleTable, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> pd.Series:
    """The split of every row of a sample table (index aligned with its frame), from its official marks: train, val
    and test stay; validation is carved out of train_val by patient; validation and test out of pool; "" stays out.
    The carving is stratified on the table's own positives (its 1s, before any uncertain or blank policy), so the
    split is a property of the patients: the same table under any policy gives the same split."""
    for name, value in (("val fraction", val_fraction), ("test fraction", test_fraction)):
        if not 0 <= value < 1:
            raise CxrFastError(f"{name} must be in [0, 1), got {value}")
    marks = table.frame["split"].to_numpy()
    unknown = set(marks) - set(SPLIT_MARKS)
    if unknown:
        raise CxrFastError(f"{table.dataset}: unknown split mark(s) {sorted(unknown)}")
    labels = (table.raw == 1).astype(np.uint8)
    patients = table.frame["patient"].to_numpy()
    split = pd.Series(np.where(np.isin(marks, C.SPLITS), marks, ""), index=table.frame.index, dtype=object)
    carve = {"train_val": {"train": 1 - val_fraction, "val": val_fraction},
             "pool": {"train": 1 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}}
    for mark, fractions in carve.items():
        pool = marks == mark
        if not pool.any():
            continue
        if mark == "pool" and val_fraction + test_fraction >= 1:
            raise CxrFastError("val fraction + test fraction must be < 1")
        assignment = carve_by_patient(patients[pool], labels[pool], fractions, seed)
        split[pool] = [assignment[p] for p in patients[pool]]
    check_patient_disjoint(patients, split.to_numpy())
    return split


def check_patient_disjoint(patients: np.ndarray, split: np.ndarray) -> None:
    """Raise if any patient has images in two splits (the official lists are checked by this too)."""
    frame = pd.DataFrame({"patient": patients, "split": split})
    frame = frame[frame["split"] != ""]
    counts = frame.groupby("patient")["split"].nunique()
    leaked = counts[counts > 1]
    if len(leaked):
        raise CxrFastError(
            f"patient leak: {len(leaked)} patient(s) appear in more than one split, e.g. patient {leaked.index[0]}"
        )


def split_summary(table: SampleTable, split: pd.Series) -> dict[str, dict]:
    """Per split: images, patients, per class the images where it is stated, positives and prevalence among them,
    and the demographics (sex, age band, view position, age), as a reporting checklist (CLAIM) asks of each
    partition; with several data sets, the images of each."""
    per_image = table.frame[["age", "sex", "view"]].copy()
    per_image["age_band"] = per_image["age"].map(age_band)
    datasets = table.frame["dataset"] if "dataset" in table.frame else pd.Series(table.dataset, index=per_image.index)
    summary = {}
    for name in C.SPLITS:
        mask = (split == name).to_numpy()
        count = int(mask.sum())
        stated = np.isfinite(table.labels[mask]).sum(axis=0)
        positives = np.nansum(table.labels[mask], axis=0)
        summary[name] = {
            "images": count,
            "patients": int(table.frame.loc[mask, "patient"].nunique()),
            "datasets": {str(k): int(v) for k, v in datasets[mask].value_counts(sort=False).items()},
            "stated": {c: int(v) for c, v in zip(table.classes, stated)},
            "positives": {c: int(v) for c, v in zip(table.classes, positives)},
            "prevalence": {c: (float(p) / n if n else 0.0) for c, p, n in zip(table.classes, positives, stated)},
            "demographics": _demographics(per_image[mask]),
        }
    return summary


def _demographics(per_image: pd.DataFrame) -> dict:
    def counts(column: str, groups: tuple) -> dict:
        values = per_image[column]
        return {g: int((values == g).sum()) for g in groups} | {"unknown": int(values.isna().sum())}

    ages = per_image["age"].dropna()
    return {"sex": counts("sex", C.SEXES), "age_band": counts("age_band", C.AGE_BANDS),
            "view": counts("view", C.VIEWS) | {"other": int((~per_image["view"].isin(C.VIEWS) &
                                                            per_image["view"].notna()).sum())},
            "age_mean": float(ages.mean()) if len(ages) else None,
            "age_median": float(ages.median()) if len(ages) else None}

