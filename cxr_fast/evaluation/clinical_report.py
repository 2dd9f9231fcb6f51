"""The clinical sections of report.md, written for a newcomer, and their figures: the data and its partitions
(a CLAIM-style summary), calibration with a reliability diagram, operating points, and the subgroup audit."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxr_fast import constants as C  # noqa: E402
from cxr_fast.evaluation.clinical import SMALL_GROUP_IMAGES  # noqa: E402
from cxr_fast.evaluation.report import fmt  # noqa: E402

POINT_NAMES = {"max_f1": "max F1", "sensitivity_90": "sensitivity ≥ 0.90", "specificity_90": "specificity ≥ 0.90"}


def plot_reliability(calibration: dict, path: Path) -> str:
    """Pooled over the classes: mean probability against positive rate per bin, before and after."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    for key, label in (("uncalibrated", "model output"), ("calibrated", "calibrated (Platt, on validation)")):
        bins = calibration["reliability"][key]
        used = np.array(bins["images"]) > 0
        ax.plot(np.array(bins["mean_probability"])[used], np.array(bins["positive_rate"])[used], "o-", label=label)
    ax.set_xlabel("mean predicted probability (bin)")
    ax.set_ylabel("fraction positive")
    ax.set_title("Reliability, all classes pooled")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_subgroups(subgroups: dict, path: Path) -> str:
    """True-positive rate per class and group, one panel per attribute: the gaps at a glance."""
    classes = list(dict.fromkeys(n for groups in subgroups.values() for e in groups.values() for n in e["tpr"]))
    fig, axes = plt.subplots(1, len(subgroups), figsize=(6 * len(subgroups), 5), sharey=True)
    for ax, (attr, groups) in zip(np.atleast_1d(axes), subgroups.items()):
        for i, (group, entry) in enumerate(groups.items()):
            tpr = [entry["tpr"].get(name) for name in classes]
            values = [np.nan if v is None else v for v in tpr]
            style = "x" if entry["small"] else "o"
            ax.plot(values, range(len(classes)), style, label=f"{group} (n={entry['images']}"
                    f"{', small' if entry['small'] else ''})", alpha=0.8)
        ax.set_yticks(range(len(classes)), classes)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("true-positive rate at the validation threshold")
        ax.set_title(f"by {attr}")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _source_line(entry: dict) -> str:
    name = f" ({entry['dataset']})" if entry.get("dataset") else ""
    return f"- Source{name}: `{entry.get('labels')}` with images from `{entry.get('images')}`."


def _label_sources(sources: list[dict], split: str) -> str:
    """Where the labels of `split` come from, per data set, as its description says (recorded in the manifest)."""
    parts = []
    for entry in sources:
        said = entry.get("label_source") or {}
        parts.append(f"{entry.get('dataset') or 'the table'}: {said.get(split) or 'as its table gives them'}")
    return (f"- Labels of the **{split}** partition — {'; '.join(parts)}. The analysis reads them from the tables; "
            "no one re-read the images for it.")


def claim_section(manifest: dict, split: str) -> list[str]:
    """Data, partitions and their demographics, as a reporting checklist asks (CLAIM items on data and splits)."""
    sources = manifest.get("datasets") or [{"dataset": "", **manifest["config"]}]
    lines = ["## Data and partitions (CLAIM summary)", "",
             *map(_source_line, sources), _label_sources(sources, split),
             "- Split by patient (no patient in two partitions), keeping a data set's official test split where it "
             "has one (NIH's test list, CheXpert's valid.csv, MIMIC-CXR-JPG's split table); the rest is carved out "
             "by patient, stratified by the tables' own positive findings (so no label policy moves it). This report "
             f"is about the **{split}** partition; thresholds and calibration come from **val**.", "",
             "| partition | images | patients | female | male | age mean (median) | 0-19 | 20-39 | 40-59 | 60-79 | 80+ "
             "| PA | AP |", "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, part in manifest["splits"].items():
        d, n = part["demographics"], max(part["images"], 1)
        ages = " | ".join(f"{d['age_band'][b] / n:.0%}" for b in C.AGE_BANDS)
        lines.append(f"| {name} | {part['images']:,} | {part['patients']:,} | {d['sex']['F'] / n:.0%} | "
                     f"{d['sex']['M'] / n:.0%} | {fmt(d['age_mean'], 1)} ({fmt(d['age_median'], 0)}) | {ages} | "
                     f"{d['view']['PA'] / n:.0%} | {d['view']['AP'] / n:.0%} |")
    return lines + ["", "Shares of each partition's images; unknown values are counted in the manifest.", ""]


def calibration_section(calibration: dict, figure: str) -> list[str]:
    rows = [f"| {name} | {fmt(calibration[name]['ece_uncalibrated'])} | {fmt(calibration[name]['ece'])} |"
            for name in calibration if name not in ("macro", "reliability")]
    macro = calibration["macro"]
    return ["## Calibration", "",
            "Does a probability of 0.3 mean that 3 in 10 such images have the finding? The expected calibration "
            "error (ECE) measures how far off that is: images are put into 15 equal-width bins by their "
            "probability, and the gap between each bin's mean probability and its fraction of positives is averaged, "
            "weighted by the bin's images. The model was trained with focal loss and inverse-frequency class weights, "
            "which both distort probabilities, so a per-class Platt scaling (a scale and an offset of the logit) was "
            "fitted on the validation split when the checkpoint was saved; it keeps the ranking, so AUROC and the "
            "decisions at the operating points do not change. `predictions.csv` has both: `prob_<Class>` is the "
            "model's output, `calibrated_<Class>` the calibrated one.", "",
            f"Macro ECE: **{fmt(macro['ece_uncalibrated'])}** before, **{fmt(macro['ece'])}** after.", "",
            "| finding | ECE, model output | ECE, calibrated |", "|---|---:|---:|", *rows, "",
            f"![Reliability diagram](curves/{figure})", ""]


def operating_points_section(points: dict) -> list[str]:
    lines = ["## Operating points", "",
             "A threshold turns a probability into a yes/no. Three were chosen per class on the **validation** split "
             "and are applied here unchanged: the one with the best F1 (the default of `predict`), the highest "
             "threshold that still finds 90% of the positives (sensitivity ≥ 0.90, for ruling a finding out), and the "
             "lowest threshold that still clears 90% of the negatives (specificity ≥ 0.90, for ruling it in). On "
             "this split the achieved sensitivity and specificity can fall short of 0.90: that is the honest "
             "estimate of how the choice generalises. PPV: of the images called positive, the fraction that are; "
             "NPV: the same for negatives (both depend on the prevalence of this split).", "",
             "| finding | operating point | threshold | sensitivity | specificity | PPV | NPV |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name in points:
        for point, stats in points[name].items():
            lines.append(f"| {name} | {POINT_NAMES.get(point, point)} | {fmt(stats['threshold'])} | "
                         f"{fmt(stats['sensitivity'])} | {fmt(stats['specificity'])} | {fmt(stats['ppv'])} | "
                         f"{fmt(stats['npv'])} |")
    return lines + [""]


def subgroup_section(subgroups: dict, gaps: dict, figure: str) -> list[str]:
    lines = ["## Subgroup audit", "",
             "Does the model fail some patients more than others? Published audits of ChestX-ray14 classifiers "
             "(Seyyed-Kalantari et al. 2021) found true-positive-rate gaps of up to 0.20 between women and men. Per "
             "group below: images, patients, macro AUROC, and the under-diagnosis rate — the share of images with "
             "at least one finding that the model calls \"no finding\" at the max-F1 thresholds (by its No Finding "
             "output where it has one, else by calling no finding). Groups under "
             f"{SMALL_GROUP_IMAGES} images are marked *small*: their numbers are shown but too uncertain to compare; "
             "per-class AUROC with patient-bootstrap 95% intervals, TPR and FPR are in `metrics.json` "
             "(`subgroups`).", "",
             "| attribute | group | images | patients | macro AUROC | under-diagnosis |",
             "|---|---|---:|---:|---:|---:|"]
    for attr, groups in subgroups.items():
        for group, e in groups.items():
            aucs = [v for v in e["auroc"].values() if v is not None]
            macro = float(np.mean(aucs)) if aucs else None
            lines.append(f"| {attr} | {group}{' (small)' if e['small'] else ''} | {e['images']} | {e['patients']} | "
                         f"{fmt(macro)} | {fmt(e['underdiagnosis'])} |")
    lines += ["", "Largest true-positive-rate gap between groups, per class (groups with enough images and at least "
              "10 positives; n/a when fewer than two qualify):", "",
              "| finding | " + " | ".join(f"TPR gap by {a}" for a in gaps) + " |",
              "|---|" + "---:|" * len(gaps)]
    for name in (n for n in next(iter(gaps.values()), {}) if n != "underdiagnosis"):
        lines.append(f"| {name} | " + " | ".join(fmt(gaps[a][name]["tpr"]) for a in gaps) + " |")
    return lines + ["", f"![True-positive rate by subgroup](curves/{figure})", ""]
