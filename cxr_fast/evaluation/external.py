"""`cxr-fast analyze --predictions predictions.csv --labels table.csv`: an external test set (another hospital's
images run through `predict`) scored against its label table with the metrics, calibration, operating points,
subgroup audit and report of `analyze`, without sharding it. Thresholds, operating points and calibration are the
checkpoint's, chosen on its validation split, as for `analyze`. The table is read by a data-set description
(`--dataset`, NIH's by default); the checkpoint's classes the table lacks count as not stated. Predictions and table
are joined by path: a prediction's `image` (or `image_index` as `analyze` writes it) matches the table row whose
image path (relative to the images folder) or image name is the longest tail of it, so CheXpert's
`view1_frontal.jpg` in every study joins by its study's path; rows with an error, and images without a label, are
left out and counted in the report."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast.config import AnalyzeConfig
from cxr_fast.data.datasets import Request, SampleTable, read_dataset
from cxr_fast.data.datasets.split import split_summary
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluation.analyze import OWN_FILES, ScoredSplit, clinical_sections
from cxr_fast.evaluation.report import plot_curves, write_analysis_report
from cxr_fast.files import claim_output, dump_json, folder_lock, make_folder
from cxr_fast.metrics import per_class_report
from cxr_fast.training.checkpoint import load_model

log = logging.getLogger(__name__)


def read_predictions(path: Path, classes: list[str]) -> pd.DataFrame:
    """predict's or analyze's predictions.csv, indexed by image name, with a probability per class; error rows
    out."""
    try:
        table = pd.read_csv(path, dtype={"error": str})
    except (OSError, ValueError) as error:
        raise CxrFastError(f"cannot read predictions {path}: {error}") from None
    names = table["image_index"] if "image_index" in table else table.get("image")
    missing = [f"prob_{c}" for c in classes if f"prob_{c}" not in table]
    if names is None or missing:
        raise CxrFastError(f"{path}: expected predict's or analyze's predictions.csv (image or image_index, "
                           f"prob_<Class>); missing {', '.join(missing[:3]) or 'image'}")
    if "error" in table:
        table = table[table["error"].fillna("") == ""]
        names = names[table.index]
    table = table.assign(name=names.astype(str).map(lambda n: Path(n).as_posix())).set_index("name")
    if table.index.duplicated().any():
        raise CxrFastError(f"{path}: image {table.index[table.index.duplicated()][0]!r} occurs twice")
    return table


def join_by_path(scored: pd.Index, table: SampleTable, labels: Path) -> tuple[list[str], np.ndarray]:
    """(prediction names, table rows) matched: each prediction to the table row whose path or image name is the
    longest tail of the prediction's path (whole components); a table row matched twice is an error."""
    tails: dict[str, int] = {}
    for column in ("image", "path"):
        for row, value in enumerate(table.frame[column]):
            if isinstance(value, str) and value:
                tails.setdefault(Path(value).as_posix(), row)
    names, rows = [], []
    for name in scored:
        parts = Path(name).parts
        found = next((tails[t] for k in range(len(parts)) if (t := "/".join(parts[k:])) in tails), None)
        if found is not None:
            names.append(name)
            rows.append(found)
    if len(set(rows)) != len(rows):
        twice = next(r for r in rows if rows.count(r) > 1)
        raise CxrFastError(f"{labels}: image {table.frame['image'].iloc[twice]!r} matches two predictions; give "
                           "predict the images below one folder per image path")
    return names, np.array(rows, dtype=int)


def labelled(table: SampleTable, classes: list[str]) -> np.ndarray:
    """The table's labels in the order of `classes`; a class it does not have, not stated."""
    out = np.full((len(table.frame), len(classes)), np.nan)
    for c, name in enumerate(classes):
        if name in table.classes:
            out[:, c] = table.labels[:, table.classes.index(name)]
    return out


def run_external_analysis(checkpoint: Path, predictions: Path, labels: Path, out: Path,
                          config: AnalyzeConfig = AnalyzeConfig(), overwrite: bool = False) -> dict:
    _model, info = load_model(checkpoint, "cpu")
    scored_table = read_predictions(Path(predictions), info.classes)
    table = read_dataset(config.dataset, Request(Path(labels).parent, Path(labels)))
    keys, rows = join_by_path(scored_table.index, table, Path(labels))
    if not keys:
        raise CxrFastError(f"no image of {predictions} has a row in {labels} (joined by the image's path)")
    table = table.subset(rows)
    probs = scored_table.loc[keys, [f"prob_{c}" for c in info.classes]].to_numpy(np.float64)
    rows = pd.DataFrame({"image_index": keys, "patient_id": table.frame["patient"].to_numpy(),
                         "age": table.frame["age"].to_numpy(), "sex": table.frame["sex"].to_numpy(),
                         "view": table.frame["view"].to_numpy(), "dataset": table.dataset}, index=pd.Index(keys))
    scored = ScoredSplit(keys, rows, labelled(table, info.classes), probs, None, info, None, {})
    summary = split_summary(table, pd.Series("test", index=table.frame.index))["test"]
    manifest = {"config": {"labels": str(labels), "images": f"the images scored in {predictions}",
                           "split_lists": "an external test set"}, "splits": {"external": summary}}
    out = make_folder(Path(out))
    with folder_lock(out, "an analysis"):
        claim_output(out, OWN_FILES, overwrite, "analyze", (Path(predictions).parent,))
        metrics = per_class_report(scored.targets, probs, info.thresholds, info.classes,
                                   groups=rows["patient_id"].to_numpy(),
                                   n_boot=config.bootstrap)
        metrics |= {"split": "external", "checkpoint": str(checkpoint), "checkpoint_epoch": info.epoch,
                    "predictions": str(predictions), "labels": str(labels), "images_left_out":
                    int(len(scored_table) - len(table.frame)), "inference_images_per_second": float("nan"),
                    "device": "external", "loader": "none",
                    "threshold_source": "F1-optimal per class on the validation split, stored in the checkpoint"}
        kept = scored_table.loc[keys].drop(columns=["image_index", "image"], errors="ignore")
        kept.reset_index(names="image_index").to_csv(out / "predictions.csv", index=False)
        curves = plot_curves(scored.targets, probs, info.thresholds, info.classes, out / "curves")
        clinical = clinical_sections(metrics, scored, manifest, config, out / "curves")
        metrics["localization"] = None
        (out / "metrics.json").write_text(dump_json(metrics))
        write_analysis_report(out, metrics, curves, {"fp": [], "fn": []}, None, clinical)
    log.info("external analysis of %d images: macro AUROC %.4f", len(keys), metrics["macro"]["auroc"])
    return metrics
