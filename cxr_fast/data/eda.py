"""EDA of a label table (`cxr-fast eda`): prevalence, co-occurrence, labels per image, images per patient, age,
sex and view position, as report.md with figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on GPU nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cxr_fast import constants as C  # noqa: E402
from cxr_fast.data.labels import demographics, multi_hot  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eda_statistics(table: pd.DataFrame) -> dict:
    labels = multi_hot(table)
    per_patient = table.groupby(C.COL_PATIENT).size()
    return {
        "images": len(table),
        "patients": int(per_patient.size),
        "no_finding": int((labels.sum(axis=1) == 0).sum()),
        "positives": {c: int(v) for c, v in zip(C.CLASS_NAMES, labels.sum(axis=0))},
        "labels_per_image": np.bincount(labels.sum(axis=1)).tolist(),
        "images_per_patient_median": float(per_patient.median()),
        "images_per_patient_max": int(per_patient.max()),
    }


def write_eda_report(table: pd.DataFrame, out: str | Path, source: str) -> Path:
    """EDA of a label table: report.md with prevalence, co-occurrence, labels per image, images per patient, age,
    sex and view position."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    stats = eda_statistics(table)
    labels = multi_hot(table).astype(np.int64)
    _plot_labels(stats, labels, out / "figures")
    _plot_demographics(table, labels, out / "figures" / "demographics.png")
    n = stats["images"]
    rows = "\n".join(f"| {c} | {stats['positives'][c]:,} | {stats['positives'][c] / n:.2%} |" for c in C.CLASS_NAMES)
    report = f"""# Label table EDA

Source: `{source}`

- **{n:,} images** of **{stats['patients']:,} patients** (median {stats['images_per_patient_median']:.0f}, max
  {stats['images_per_patient_max']} images per patient): splits must be by patient.
- **No Finding: {stats['no_finding']:,}** images ({stats['no_finding'] / n:.1%}), the all-zero label vector.
- Findings per image (0, 1, 2, ...): {', '.join(f'{v:,}' for v in stats['labels_per_image'])}.

| finding | images | prevalence |
|---|---:|---:|
{rows}

![prevalence](figures/prevalence.png)

![co-occurrence](figures/cooccurrence.png)

![demographics](figures/demographics.png)
"""
    path = out / "report.md"
    path.write_text(report)
    return path


def _plot_labels(stats: dict, labels: np.ndarray, folder: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    counts = np.array([stats["positives"][c] for c in C.CLASS_NAMES])
    ax.barh(C.CLASS_NAMES[::-1], counts[::-1] / stats["images"] * 100)
    ax.set_xlabel("% of images")
    ax.set_title("Prevalence per finding")
    _save(fig, folder / "prevalence.png")

    co = labels.T @ labels
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(np.log10(co + 1), cmap="viridis")
    ax.set_xticks(range(C.NUM_CLASSES), C.CLASS_NAMES, rotation=90)
    ax.set_yticks(range(C.NUM_CLASSES), C.CLASS_NAMES)
    fig.colorbar(image, label="log10(images + 1)")
    ax.set_title("Co-occurrence (diagonal: images with the finding)")
    _save(fig, folder / "cooccurrence.png")


def _plot_demographics(table: pd.DataFrame, labels: np.ndarray, path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    per_image = labels.sum(axis=1)
    axes[0, 0].bar(range(per_image.max() + 1), np.bincount(per_image))
    axes[0, 0].set_title("Findings per image")
    per_patient = table.groupby(C.COL_PATIENT).size()
    axes[0, 1].hist(per_patient, bins=np.arange(1, min(per_patient.max(), 60) + 2), log=True)
    axes[0, 1].set_title("Images per patient (log)")
    if C.COL_AGE in table:
        ages = demographics(table)["age"]
        axes[0, 2].hist(ages.dropna(), bins=40)
        axes[0, 2].set_title("Patient age (years)")
    for ax, column in ((axes[1, 0], C.COL_SEX), (axes[1, 1], C.COL_VIEW)):
        if column in table:
            table[column].value_counts().plot.bar(ax=ax, rot=0)
            ax.set_title(column)
    axes[1, 2].axis("off")
    _save(fig, path)
