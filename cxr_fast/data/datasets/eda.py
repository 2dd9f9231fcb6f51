"""EDA of a label table (`cxr-fast eda`): prevalence, co-occurrence, labels per image, images per patient, age,
sex and view position, as report.md with figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on GPU nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxr_fast.data.datasets import SampleTable  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eda_statistics(table: SampleTable) -> dict:
    labels = _positives(table)
    per_patient = table.frame.groupby("patient").size()
    return {
        "images": len(table.frame),
        "patients": int(per_patient.size),
        "no_finding": int((labels.sum(axis=1) == 0).sum()),
        "positives": {c: int(v) for c, v in zip(table.classes, labels.sum(axis=0))},
        "stated": {c: int(v) for c, v in zip(table.classes, np.isfinite(table.labels).sum(axis=0))},
        "labels_per_image": np.bincount(labels.sum(axis=1)).tolist(),
        "images_per_patient_median": float(per_patient.median()),
        "images_per_patient_max": int(per_patient.max()),
    }


def _positives(table: SampleTable) -> np.ndarray:
    """(images, classes) int: 1 where the label is stated positive."""
    return (np.nan_to_num(table.labels, nan=0.0) > 0).astype(np.int64)


def write_eda_report(table: SampleTable, out: str | Path, source: str) -> Path:
    """EDA of a data set's labels: report.md with prevalence (among the images where each class is stated),
    co-occurrence, labels per image, images per patient, age, sex and view position."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    stats = eda_statistics(table)
    labels = _positives(table)
    _plot_labels(stats, labels, table.classes, out / "figures")
    _plot_demographics(table, labels, out / "figures" / "demographics.png")
    n = stats["images"]
    rows = "\n".join(f"| {c} | {stats['positives'][c]:,} | {stats['stated'][c]:,} | "
                     f"{stats['positives'][c] / max(stats['stated'][c], 1):.2%} |" for c in table.classes)
    report = f"""# Label table EDA

Source: `{source}`

- **{n:,} images** of **{stats['patients']:,} patients** (median {stats['images_per_patient_median']:.0f}, max
  {stats['images_per_patient_max']} images per patient): splits must be by patient.
- **No Finding: {stats['no_finding']:,}** images ({stats['no_finding'] / n:.1%}), without a positive label.
- Findings per image (0, 1, 2, ...): {', '.join(f'{v:,}' for v in stats['labels_per_image'])}.

| finding | images | stated in | prevalence |
|---|---:|---:|---:|
{rows}

![prevalence](figures/prevalence.png)

![co-occurrence](figures/cooccurrence.png)

![demographics](figures/demographics.png)
"""
    path = out / "report.md"
    path.write_text(report)
    return path


def _plot_labels(stats: dict, labels: np.ndarray, classes: tuple[str, ...], folder: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    counts = np.array([stats["positives"][c] / max(stats["stated"][c], 1) for c in classes])
    ax.barh(classes[::-1], counts[::-1] * 100)
    ax.set_xlabel("% of images")
    ax.set_title("Prevalence per finding")
    _save(fig, folder / "prevalence.png")

    co = labels.T @ labels
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    image = ax.imshow(np.log10(co + 1), cmap="viridis")
    ax.set_xticks(range(len(classes)), classes, rotation=90)
    ax.set_yticks(range(len(classes)), classes)
    fig.colorbar(image, label="log10(images + 1)")
    ax.set_title("Co-occurrence (diagonal: images with the finding)")
    _save(fig, folder / "cooccurrence.png")


def _plot_demographics(table: SampleTable, labels: np.ndarray, path: Path) -> None:
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    per_image = labels.sum(axis=1)
    axes[0, 0].bar(range(per_image.max() + 1), np.bincount(per_image))
    axes[0, 0].set_title("Findings per image")
    frame = table.frame
    per_patient = frame.groupby("patient").size()
    axes[0, 1].hist(per_patient, bins=np.arange(1, min(per_patient.max(), 60) + 2), log=True)
    axes[0, 1].set_title("Images per patient (log)")
    if frame["age"].notna().any():
        axes[0, 2].hist(frame["age"].dropna(), bins=40)
        axes[0, 2].set_title("Patient age (years)")
    for ax, column in ((axes[1, 0], "sex"), (axes[1, 1], "view")):
        if frame[column].notna().any():
            frame[column].value_counts().plot.bar(ax=ax, rot=0)
            ax.set_title(column)
    axes[1, 2].axis("off")
    _save(fig, path)
