"""EDA of a data set's labels (`cxr-fast eda`), read through its description with the same policies as `shard`:
per source table and class the positive, negative, uncertain and blank counts, prevalence, co-occurrence, labels
per image, images per patient, age, sex and view position, as report.md with figures."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on GPU nodes or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxr_fast.data.datasets import SampleTable  # noqa: E402
from cxr_fast.data.datasets.vocabulary import NO_FINDING  # noqa: E402
from cxr_fast.files import claim_whole_folder  # noqa: E402


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def eda_statistics(table: SampleTable) -> dict:
    labels = _positives(table)
    per_patient = table.frame.groupby("patient").size()
    totals = table.totals()
    return {
        "images": len(table.frame),
        "patients": int(per_patient.size),
        "no_finding": no_finding_count(table),
        "positives": {c: int(v) for c, v in totals["trained_positive"].items()},
        "stated": {c: int(v) for c, v in totals["stated"].items()},
        "labels_per_image": np.bincount(labels.sum(axis=1), minlength=1).tolist(),
        "images_per_patient_median": float(per_patient.median()),
        "images_per_patient_max": int(per_patient.max()),
        "per_source": {str(name): table.subset((table.frame["source"] == name).to_numpy()).totals()
                       .astype(int).to_dict(orient="index") for name in table.frame["source"].unique()},
        "dropped": table.dropped,
    }


def no_finding_count(table: SampleTable) -> dict:
    """Images in the "no finding" state, counted one way: by the data set's No Finding class where it has one (its
    table's 1s), else the images without a positive finding."""
    if NO_FINDING in table.classes:
        return {"images": int((table.raw[:, table.classes.index(NO_FINDING)] == 1).sum()),
                "by": f"the table's {NO_FINDING} = 1"}
    return {"images": int((_positives(table).sum(axis=1) == 0).sum()), "by": "no positive finding"}


def _positives(table: SampleTable) -> np.ndarray:
    """(images, classes) int: 1 where the label is positive after the policies, the No Finding class left out."""
    findings = np.array([c != NO_FINDING for c in table.classes], dtype=bool)
    return (np.nan_to_num(table.labels, nan=0.0) > 0)[:, findings].astype(np.int64)


def write_eda_report(table: SampleTable, out: str | Path, source: str) -> Path:
    """EDA of a data set's labels: report.md with, per source table, each class's positive, negative, uncertain and
    blank counts in the table and its prevalence among the images where it is stated after the policies;
    co-occurrence, labels per image, images per patient, age, sex and view position."""
    out = Path(out)
    claim_whole_folder(out, "eda", (Path(source).parent,))
    (out / "figures").mkdir()
    stats = eda_statistics(table)
    findings = tuple(c for c in table.classes if c != NO_FINDING)
    _plot_labels(stats, _positives(table), findings, out / "figures")
    _plot_demographics(table, _positives(table), out / "figures" / "demographics.png")
    n, none = stats["images"], stats["no_finding"]
    dropped = "; ".join(f"{r}: {e['count']:,}" for r, e in stats["dropped"].items()) or "none"
    report = f"""# Label table EDA

Source: `{source}` ({table.dataset}; uncertain: `{table.applied.get('uncertain')}`, blank: \
`{table.applied.get('blank')}`, views: `{table.applied.get('views')}`)

- **{n:,} images** of **{stats['patients']:,} patients** (median {stats['images_per_patient_median']:.0f}, max
  {stats['images_per_patient_max']} images per patient): splits must be by patient. Rows left out: {dropped}.
- **No Finding: {none['images']:,}** images ({none['images'] / max(n, 1):.1%}), counted by {none['by']}.
- Findings per image (0, 1, 2, ...): {', '.join(f'{v:,}' for v in stats['labels_per_image'])}.

{_source_tables(stats)}
![prevalence](figures/prevalence.png)

![co-occurrence](figures/cooccurrence.png)

![demographics](figures/demographics.png)
"""
    path = out / "report.md"
    path.write_text(report)
    return path


def _source_tables(stats: dict) -> str:
    """One table per source file: the table's own values per class, then what training sees after the policies."""
    parts = []
    for name, totals in stats["per_source"].items():
        rows = "\n".join(f"| {c} | {t['positive']:,} | {t['negative']:,} | {t['uncertain']:,} | {t['blank']:,} | "
                         f"{t['stated']:,} | {t['trained_positive'] / max(t['stated'], 1):.2%} |"
                         for c, t in totals.items())
        parts.append(f"## {name}\n\n| class | positive | negative | uncertain | blank | stated (after policies) "
                     f"| prevalence |\n|---|---:|---:|---:|---:|---:|---:|\n{rows}\n")
    return "\n".join(parts)


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
