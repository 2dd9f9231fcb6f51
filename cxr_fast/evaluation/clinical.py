"""What a clinical reader asks after discrimination: are the probabilities calibrated, how does the model do at
operating points chosen on validation, and does it fail some patients more than others.

- Calibration: ECE (15 equal-width bins) per class and macro, before and after the checkpoint's Platt scaling.
- Operating points: max-F1, sensitivity >= 0.90 and specificity >= 0.90, each chosen on validation (stored in the
  checkpoint) and reported on the analysed split with sensitivity, specificity, PPV and NPV.
- Subgroups (sex, age band, view): per class AUROC with patient-bootstrap 95% intervals, true- and false-positive
  rates at the max-F1 threshold, under-diagnosis as Seyyed-Kalantari et al. (2021) define it — among images with at
  least one finding, the share the model calls "no finding" (its No Finding output where it has one, else no finding
  called) — and the gaps between groups. Small groups are reported with their counts and marked, never
  dropped.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cxr_fast import constants as C
from cxr_fast.calibration import apply_calibration, expected_calibration_error, reliability
from cxr_fast.data.datasets.labels import age_band
from cxr_fast.data.datasets.vocabulary import findings_of, no_finding_called
from cxr_fast.metrics import bootstrap_auc_intervals, confusion_stats, roc_auc

# Below these counts a group's rates rest on too few images to compare: shown, marked small, left out of gaps.
SMALL_GROUP_IMAGES = 50
SMALL_GROUP_POSITIVES = 10


def _finite(value: float) -> float | None:
    return float(value) if value is not None and np.isfinite(value) else None


def calibration_report(y: np.ndarray, probs: np.ndarray, calibration: dict | None, classes: list[str]) -> dict:
    """{class: {ece_uncalibrated, ece, method, a, b}} and "macro"; ece equals ece_uncalibrated without one."""
    calibrated = apply_calibration(probs, calibration)
    report = {}
    for c, name in enumerate(classes):
        report[name] = {"ece_uncalibrated": expected_calibration_error(y[:, c], probs[:, c]),
                        "ece": expected_calibration_error(y[:, c], calibrated[:, c]),
                        "method": calibration["method"] if calibration else None,
                        **({"a": calibration["a"][c], "b": calibration["b"][c]} if calibration else {})}
    report["macro"] = {key: float(np.nanmean([report[n][key] for n in classes]))
                       for key in ("ece_uncalibrated", "ece")}
    report["reliability"] = {"uncalibrated": reliability(y.ravel(), probs.ravel()),
                             "calibrated": reliability(y.ravel(), calibrated.ravel())}
    return report


def operating_point_report(y: np.ndarray, probs: np.ndarray, points: dict, classes: list[str]) -> dict:
    """{class: {point: {threshold, sensitivity, specificity, ppv, npv}}} at thresholds chosen on validation."""
    report = {}
    for c, name in enumerate(classes):
        report[name] = {}
        for point, thresholds in points.items():
            stats = confusion_stats(y[:, c], probs[:, c], thresholds[c])
            report[name][point] = {"threshold": float(thresholds[c]), "sensitivity": _finite(stats["recall"]),
                                   "specificity": _finite(stats["specificity"]), "ppv": _finite(stats["precision"]),
                                   "npv": _finite(stats["npv"])}
    return report


def subgroup_columns(samples: pd.DataFrame) -> dict[str, pd.Series]:
    """The audit's attributes per image: sex, age band, view (None where the table did not say)."""
    return {"sex": samples["sex"], "age": samples["age"].map(age_band), "view": samples["view"]}


def _group(y, probs, thresholds, patients, n_boot: int, classes: list[str]) -> dict:
    positives = np.nansum(y, axis=0).astype(int)
    intervals = bootstrap_auc_intervals(y, probs, patients, n_boot) if n_boot else None
    ill = (np.nan_to_num(y[:, findings_of(classes)]) > 0).any(axis=1)  # a stated finding (No Finding is none)
    healthy_called = no_finding_called(classes, probs >= thresholds[None, :])
    entry = {"images": int(len(y)), "patients": int(len(np.unique(patients))),
             "positives": {n: int(p) for n, p in zip(classes, positives)}, "auroc": {}, "auroc_ci95": {},
             "tpr": {}, "fpr": {},
             "underdiagnosis": _finite(healthy_called[ill].mean() if ill.any() else np.nan),
             "images_with_a_finding": int(ill.sum()), "small": bool(len(y) < SMALL_GROUP_IMAGES)}
    for c, name in enumerate(classes):
        stats = confusion_stats(y[:, c], probs[:, c], thresholds[c])
        entry["auroc"][name] = _finite(roc_auc(y[:, c], probs[:, c]))
        entry["auroc_ci95"][name] = [_finite(v) for v in intervals[c]] if intervals is not None and \
            np.isfinite(intervals[c]).all() else None
        entry["tpr"][name], entry["fpr"][name] = _finite(stats["recall"]), _finite(1 - stats["specificity"])
    return entry


def subgroup_audit(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, samples: pd.DataFrame,
                   classes: list[str], n_boot: int = 200) -> tuple[dict, dict]:
    """(subgroups[attr][group], gaps[attr][class]): per group the numbers above; per class the largest difference
    between groups of TPR, FPR and AUROC, over groups with enough images and positives."""
    groups = {"sex": C.SEXES, "age": C.AGE_BANDS, "view": C.VIEWS}
    patients = samples["patient_id"].to_numpy()
    audit, gaps = {}, {}
    for attr, values in subgroup_columns(samples).items():
        audit[attr] = {}
        for group in groups[attr]:
            mask = (values == group).to_numpy()
            if mask.any():
                audit[attr][group] = _group(y[mask], probs[mask], thresholds, patients[mask], n_boot, classes)
            else:
                audit[attr][group] = {"images": 0, "patients": 0, "small": True, "auroc": {}, "tpr": {}, "fpr": {},
                                      "underdiagnosis": None}
        gaps[attr] = _gaps(audit[attr], classes)
    return audit, gaps


def _gaps(groups: dict, classes: list[str]) -> dict:
    gaps = {}
    for name in classes:
        usable = {g: e for g, e in groups.items() if not e["small"] and
                  e.get("positives", {}).get(name, 0) >= SMALL_GROUP_POSITIVES}
        entry = {"groups": sorted(usable)}
        for key in ("tpr", "fpr", "auroc"):
            values = [e[key][name] for e in usable.values() if e[key].get(name) is not None]
            entry[key] = float(max(values) - min(values)) if len(values) >= 2 else None
        gaps[name] = entry
    under = [e["underdiagnosis"] for e in groups.values() if not e["small"] and e["underdiagnosis"] is not None]
    gaps["underdiagnosis"] = float(max(under) - min(under)) if len(under) >= 2 else None
    return gaps
