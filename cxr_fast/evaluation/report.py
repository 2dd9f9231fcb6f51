"""The analysis report: report.md and its ROC/PR figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on GPU nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxr_fast.metrics import confusion_stats, precision_recall_curve, roc_curve, stated  # noqa: E402
from cxr_fast.data.datasets.vocabulary import findings_of  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# What a caption's list of findings reads when it holds none: not a class name ("No Finding" is one in CheXpert).
NONE_CALLED = "(none)"


def finding_names(classes: list[str], flags: np.ndarray) -> str:
    """The names of the flagged findings (the No Finding state left out), "|"-joined as NIH writes them;
    NONE_CALLED when none is flagged."""
    return "|".join(classes[i] for i in np.flatnonzero(flags & findings_of(classes))) or NONE_CALLED


def file_stem(name: str) -> str:
    """A class name as part of a file name (CheXpert's have spaces and a slash-free form is wanted everywhere)."""
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def plot_curves(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, classes: list[str],
                folder: Path) -> dict:
    """ROC and PR curves: one grid of all classes and one figure per class, with the operating point marked."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"grid": {}, "classes": {}}
    columns = int(np.ceil(np.sqrt(len(classes))))
    for kind in ("roc", "pr"):
        grid, axes = plt.subplots(columns, columns, figsize=(3.5 * columns, 3.25 * columns), squeeze=False)
        for c, name in enumerate(classes):
            single, ax_single = plt.subplots(figsize=(4.5, 4.2))
            for ax in (axes.flat[c], ax_single):
                _draw_curve(ax, kind, targets[:, c], probs[:, c], thresholds[c], name)
            path = folder / f"{kind}_{file_stem(name)}.png"
            _save(single, path)
            files["classes"].setdefault(name, {})[kind] = path.name
        for ax in axes.flat[len(classes):]:
            ax.axis("off")
        path = folder / f"{kind}_all.png"
        _save(grid, path)
        files["grid"][kind] = path.name
    return files


def _draw_curve(ax, kind, y, scores, threshold, name):
    ax.set_title(name, fontsize=10)
    y, scores = stated(y, scores)
    if not y.any() or y.all():
        ax.text(0.5, 0.5, "undefined:\nonly one class present", ha="center", va="center")
        return
    stats = confusion_stats(y, scores, threshold)
    if kind == "roc":
        fpr, tpr, _ = roc_curve(y, scores)
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.plot(1 - stats["specificity"], stats["recall"], "ro", label="threshold")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
    else:
        precision, recall, _ = precision_recall_curve(y, scores)
        ax.step(np.r_[0, recall], np.r_[1, precision], where="post")
        ax.axhline(y.mean(), color="k", ls=":", lw=0.8)
        if np.isfinite(stats["precision"]):
            ax.plot(stats["recall"], stats["precision"], "ro", label="threshold")
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)


def fmt(value, digits: int = 3) -> str:
    """A number for a report table, or n/a."""
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def write_analysis_report(out: Path, metrics: dict, curves: dict, gallery: dict, localization: dict | None,
                          clinical: list[str] | None = None) -> Path:
    """report.md: summary, how thresholds were chosen, per-class table, the clinical sections (data, calibration,
    operating points, subgroups), curves, error gallery, localisation."""
    sections = [_summary(metrics), _class_table(metrics), _datasets(metrics), clinical or [],
                _curves(curves), _gallery(gallery), _localization(localization)]
    path = out / "report.md"
    path.write_text("\n".join(line for section in sections for line in section))
    return path


def _summary(metrics: dict) -> list[str]:
    macro, micro = metrics["macro"], metrics["micro"]
    return [
        f"# Analysis of the {metrics['split']} split",
        "",
        f"Checkpoint `{metrics['checkpoint']}` (epoch {metrics['checkpoint_epoch']}), {metrics['images']} images, "
        f"inference {metrics['inference_images_per_second']:.1f} images/s on {metrics['device']} "
        f"({metrics['loader']} loader).",
        "",
        "## Summary",
        f"- Macro AUROC **{fmt(macro['auroc'])}**, macro average precision {fmt(macro['average_precision'])}, "
        f"macro F1 {fmt(macro['f1'])} (means over the classes where each is defined).",
        f"- Micro AUROC {fmt(micro['auroc'])}, micro F1 {fmt(micro['f1'])} (all image-class pairs pooled).",
        "",
        "## How the decision thresholds were chosen",
        "Each class has its own threshold: the one that maximised F1 on the **validation** split when the checkpoint "
        "was saved. Precision, recall, specificity and F1 below apply those thresholds to this split unchanged; no "
        "number here was tuned on the images it reports. AUROC and AP need no threshold. The 95% intervals of AUROC "
        "come from a bootstrap that resamples patients, since images of one patient are not independent.",
        "",
    ]


def _class_table(metrics: dict) -> list[str]:
    rows = []
    for name, m in metrics["classes"].items():
        ci = m.get("auroc_ci95")
        ci_text = f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci and np.isfinite(ci[0]) else ""
        rows.append(f"| {name} | {m['support']} | {m['prevalence']:.2%} | {fmt(m['auroc'])}{ci_text} | "
                    f"{fmt(m['average_precision'])} | {fmt(m['threshold'])} | {fmt(m['f1'])} | "
                    f"{fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['specificity'])} |")
    undefined = [f"- **{n}**: {m['undefined']}" for n, m in metrics["classes"].items() if "undefined" in m]
    return [
        "## Per class",
        "| finding | positives | prevalence | AUROC [95% CI] | AP | threshold | F1 | precision | recall | specificity |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *(["Undefined values:", *undefined, ""] if undefined else []),
    ]


def _datasets(metrics: dict) -> list[str]:
    """Per data set of a merged shard set: its images and AUROC over the classes it states."""
    datasets = metrics.get("datasets")
    if not datasets:
        return []
    classes = [c for c in metrics["classes"] if any(c in d["auroc"] for d in datasets.values())]
    rows = [f"| {name} | {d['images']} | {fmt(d['macro_auroc'])} | " +
            " | ".join(fmt(d["auroc"][c]) if c in d["auroc"] else "-" for c in classes) + " |"
            for name, d in datasets.items()]
    return ["## Per data set", "AUROC on each data set's own images, over the classes it states (- : not stated "
            "there); the tables above pool them.", "",
            "| data set | images | macro AUROC | " + " | ".join(classes) + " |",
            "|---|---:|---:|" + "---:|" * len(classes), *rows, ""]


def _curves(curves: dict) -> list[str]:
    return [
        "## Curves",
        "Red dots mark the operating point at the validation threshold. One figure per class is in `curves/`.",
        "",
        f"![ROC curves](curves/{curves['grid']['roc']})",
        "",
        f"![Precision-recall curves](curves/{curves['grid']['pr']})",
        "",
    ]


def _gallery(gallery: dict) -> list[str]:
    lines = [
        "## The most confident errors, with Grad-CAM++",
        "For each class, the false positives with the highest probability and the false negatives with the lowest, "
        "each shown as the processed input (after CLAHE) beside the Grad-CAM++ map of that class's logit, computed "
        "on the last ConvNeXt stage. Where the map lies tells whether the model looked at the lungs or at "
        "something else (markers, tubes, text).",
        "",
    ]
    for kind, title in (("fp", "False positives"), ("fn", "False negatives")):
        lines += [f"### {title}", ""]
        if not gallery[kind]:
            lines += ["None at these thresholds.", ""]
        for item in gallery[kind]:
            lines += [f"**{item['class']}**, `{item['image']}`, p = {item['probability']:.3f}; true: "
                      f"{item['true']}; predicted: {item['predicted']}", "", f"![]({item['file']})", ""]
    return lines


def _localization(localization: dict | None) -> list[str]:
    lines = ["## Localisation against NIH boxes", ""]
    if localization is None:
        return lines + ["Not computed: run with `--bbox BBox_List_2017.csv`.", ""]
    if not localization:
        return lines + ["No image of this split has an NIH box.", ""]
    lines += ["As in Wang et al. 2017: a box is drawn around the largest region where the class's map is at least "
              "half its maximum; a hit is IoBB (intersection over the drawn box) above the threshold. The "
              "pointing game counts maps whose maximum lies inside the true box.", "",
              "| finding | boxes | IoBB>0.1 | IoBB>0.25 | IoBB>0.5 | pointing game |",
              "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {n} | {e['boxes']} | {e['iobb>0.1']:.2f} | {e['iobb>0.25']:.2f} | {e['iobb>0.5']:.2f} | "
              f"{e['pointing_game']:.2f} |" for n, e in sorted(localization.items())]
    return lines + [""]
