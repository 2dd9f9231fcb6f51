"""`cxr-fast analyze --predictions predictions.csv --labels table.csv`: an external test set (another hospital's
images run through `predict`) scored against its label table with the metrics, calibration, operating points,
subgroup audit and report of `analyze`, without sharding it. Thresholds, operating points and calibration are the
checkpoint's, chosen on its validation split, as for `analyze`. Predictions and table are joined by image name (the
file name of `image`, or `image_index` as `analyze` writes it); rows with an error, and images without a label, are
left out and counted in the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cxr_fast import constants as C
from cxr_fast.config import AnalyzeConfig
from cxr_fast.data.labels import demographics, multi_hot, read_label_table
from cxr_fast.data.split import split_summary
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluation.analyze import OWN_FILES, ScoredSplit, clinical_sections
from cxr_fast.evaluation.report import plot_curves, write_analysis_report
from cxr_fast.files import claim_output, folder_lock, make_folder
from cxr_fast.metrics import per_class_report
from cxr_fast.training.checkpoint import load_model

log = logging.getLogger(__name__)


def read_predictions(path: Path) -> pd.DataFrame:
    """predict's or analyze's predictions.csv, indexed by image name, with the 14 probabilities; error rows out."""
    try:
        table = pd.read_csv(path, dtype={"error": str})
    except (OSError, ValueError) as error:
        raise CxrFastError(f"cannot read predictions {path}: {error}") from None
    names = table["image_index"] if "image_index" in table else table.get("image")
    missing = [f"prob_{c}" for c in C.CLASS_NAMES if f"prob_{c}" not in table]
    if names is None or missing:
        raise CxrFastError(f"{path}: expected predict's or analyze's predictions.csv (image or image_index, "
                           f"prob_<Class>); missing {', '.join(missing[:3]) or 'image'}")
    if "error" in table:
        table = table[table["error"].fillna("") == ""]
        names = names[table.index]
    table = table.assign(name=names.astype(str).map(lambda n: Path(n).name)).set_index("name")
    if table.index.duplicated().any():
        raise CxrFastError(f"{path}: image name {table.index[table.index.duplicated()][0]!r} occurs twice")
    return table


def run_external_analysis(checkpoint: Path, predictions: Path, labels: Path, out: Path,
                          config: AnalyzeConfig = AnalyzeConfig(), overwrite: bool = False) -> dict:
    _model, info = load_model(checkpoint, "cpu")
    scored_table = read_predictions(Path(predictions))
    table = read_label_table(labels)
    table = table[table[C.COL_IMAGE].isin(scored_table.index)].reset_index(drop=True)
    if table.empty:
        raise CxrFastError(f"no image of {predictions} has a row in {labels} (joined by file name)")
    probs = scored_table.loc[table[C.COL_IMAGE], [f"prob_{c}" for c in C.CLASS_NAMES]].to_numpy(np.float64)
    people = demographics(table)
    rows = pd.DataFrame({"image_index": table[C.COL_IMAGE], "patient_id": table[C.COL_PATIENT],
                         "age": people["age"], "sex": people["sex"], "view": people["view"]})
    keys = list(table[C.COL_IMAGE])
    scored = ScoredSplit(keys, rows.set_index(pd.Index(keys)), multi_hot(table).astype(np.float64), probs, None,
                         info, None, {})
    summary = split_summary(table, pd.Series("test", index=table.index))["test"]
    manifest = {"config": {"labels": str(labels), "images": f"the images scored in {predictions}",
                           "split_lists": "an external test set"}, "splits": {"external": summary}}
    out = make_folder(Path(out))
    with folder_lock(out, "an analysis"):
        claim_output(out, OWN_FILES, overwrite)
        metrics = per_class_report(scored.targets, probs, info.thresholds, groups=rows["patient_id"].to_numpy(),
                                   n_boot=config.bootstrap)
        metrics |= {"split": "external", "checkpoint": str(checkpoint), "checkpoint_epoch": info.epoch,
                    "predictions": str(predictions), "labels": str(labels), "images_left_out":
                    int(len(scored_table) - len(table)), "inference_images_per_second": float("nan"),
                    "device": "external", "loader": "none",
                    "threshold_source": "F1-optimal per class on the validation split, stored in the checkpoint"}
        kept = scored_table.loc[keys].drop(columns=["image_index", "image"], errors="ignore")
        kept.reset_index(names="image_index").to_csv(out / "predictions.csv", index=False)
        curves = plot_curves(scored.targets, probs, info.thresholds, out / "curves")
        clinical = clinical_sections(metrics, scored, manifest, config, out / "curves")
        metrics["localization"] = None
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
        write_analysis_report(out, metrics, curves, {"fp": [], "fn": []}, None, clinical)
    log.info("external analysis of %d images: macro AUROC %.4f", len(keys), metrics["macro"]["auroc"])
    return metrics
