"""`cxr-fast analyze`: one pass over a split with a trained model → predictions → metrics → Grad-CAM++ galleries of
the worst errors → localisation against NIH boxes → report.md.

Thresholds are the checkpoint's, chosen on validation when it was saved, and never on the split reported here. Since
they are known before scoring, the most confident errors are collected while the split is scored, with the very
images the model scored: the maps are drawn on those, and nothing is read twice.
"""

from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cxr_fast.calibration import apply_calibration
from cxr_fast.config import AnalyzeConfig, DataConfig
from cxr_fast.data.datasets.nih import BOX_SPACE as NIH_BOX_SPACE
from cxr_fast.data.datasets.nih import read_boxes
from cxr_fast.data.loaders.loader import LoaderSpec, create_loader, resolve_loader
from cxr_fast.data.shards.manifest import load_manifest, sample_table
from cxr_fast.data.images.preprocess import Preprocessing, gray8_from_input
from cxr_fast.errors import CxrFastError
from cxr_fast.files import claim_output, dump_json, folder_lock, make_folder
from cxr_fast.evaluation.cam import IOBB_THRESHOLDS, CamExplainer, cam_box, iobb, overlay, pointing_hit
from cxr_fast.evaluation.clinical import calibration_report, operating_point_report, subgroup_audit
from cxr_fast.evaluation.clinical_report import (calibration_section, claim_section, operating_points_section,
                                                plot_reliability, plot_subgroups, subgroup_section)
from cxr_fast.evaluation.report import file_stem, finding_names, plot_curves, write_analysis_report
from cxr_fast.metrics import per_class_report
from cxr_fast.training.checkpoint import ModelInfo, load_model
from cxr_fast.training.engine import evaluate, resolve_amp, resolve_device
from cxr_fast.training.losses import FocalLoss

log = logging.getLogger(__name__)
GALLERY_MIN_SIDE = 384


class ErrorCollector:
    """While a split is scored: per class, the top-k most confident false positives (highest probability) and
    false negatives (lowest), and the images of boxed keys, kept as the uint8 images the model saw."""

    def __init__(self, thresholds: np.ndarray, top_k: int, box_keys: set[str], classes: list[str]):
        self.thresholds, self.top_k, self.box_keys, self.classes = thresholds, top_k, box_keys, classes
        self.heaps = {kind: {name: [] for name in classes} for kind in ("fp", "fn")}
        self.images: dict[str, np.ndarray] = {}

    def __call__(self, batch, probs: torch.Tensor) -> None:
        probs, targets = probs.cpu().numpy(), batch.targets.cpu().numpy()
        wanted = set()
        for row, key in enumerate(batch.keys):
            for c, name in enumerate(self.classes):
                predicted, p = probs[row, c] >= self.thresholds[c], float(probs[row, c])
                if not np.isnan(targets[row, c]) and predicted != (targets[row, c] > 0.5):  # stated and wrong
                    kind, score = ("fp", p) if predicted else ("fn", -p)  # heap keeps the k largest scores
                    heap = self.heaps[kind][name]
                    item = (score, key, p)
                    if len(heap) < self.top_k:
                        heapq.heappush(heap, item)
                        wanted.add(row)
                    elif self.top_k and item > heap[0]:
                        heapq.heapreplace(heap, item)
                        wanted.add(row)
            if key in self.box_keys:
                wanted.add(row)
        for row in wanted:
            self.images[batch.keys[row]] = gray8_from_input(batch.images[row])

    def errors(self) -> dict:
        """{fp|fn: {class: [(key, probability), ...]}}, most confident first; prunes images no longer needed."""
        chosen = {kind: {name: [(key, p) for _score, key, p in sorted(heap, reverse=True)]
                         for name, heap in per_class.items()} for kind, per_class in self.heaps.items()}
        keep = {key for per_class in chosen.values() for rows in per_class.values() for key, _ in rows}
        self.images = {k: v for k, v in self.images.items() if k in keep or k in self.box_keys}
        return chosen


@dataclass
class ScoredSplit:
    """A split as scored: keys in order, their image names and rows of the sample table, targets, probabilities,
    the model and what it was trained with, and the processed images the collector kept."""

    keys: list[str]
    rows: pd.DataFrame  # sample_table rows in key order: image_index, patient_id, age, sex, view
    targets: np.ndarray
    probs: np.ndarray
    model: torch.nn.Module
    info: ModelInfo
    device: torch.device
    images: dict[str, np.ndarray]

    @property
    def image_index(self) -> list[str]:
        return list(self.rows["image_index"])


OWN_FILES = ("report.md", "predictions.csv", "metrics.json", "curves", "visualizations")


@dataclass
class Inputs:
    """What an analysis reads, checked before its output folder is touched."""

    checkpoint: Path
    shards_dir: Path
    manifest: dict
    boxes: pd.DataFrame | None
    model: torch.nn.Module
    info: ModelInfo
    device: torch.device


def run_analysis(checkpoint: str | Path, shards_dir: str | Path, out: str | Path,
                 config: AnalyzeConfig = AnalyzeConfig(), overwrite: bool = False) -> dict:
    """The `cxr-fast analyze` command; returns metrics.json's content. The inputs are checked first; then the output
    folder is locked, and refused when occupied unless `overwrite` (which clears only this command's files)."""
    target = resolve_device(config.device)
    manifest = load_manifest(shards_dir)
    if config.split not in manifest["splits"] or not manifest["splits"][config.split]["images"]:
        raise CxrFastError(f"split {config.split!r} is missing or empty in {shards_dir}")
    boxes = read_boxes(config.bbox) if config.bbox else None
    model, info = load_model(checkpoint, target)
    if list(info.classes) != list(manifest["classes"]):
        raise CxrFastError(f"{checkpoint} was trained on other classes ({', '.join(info.classes)[:200]}) than "
                           f"{shards_dir} holds ({', '.join(manifest['classes'])[:200]})")
    inputs = Inputs(Path(checkpoint), Path(shards_dir), manifest, boxes, model, info, target)
    out = make_folder(Path(out))
    with folder_lock(out, "an analysis"):
        claim_output(out, OWN_FILES, overwrite, "analyze", (shards_dir,))
        return _analyze(inputs, out, config)


def _analyze(inputs: Inputs, out: Path, config: AnalyzeConfig) -> dict:
    manifest, boxes, model, info, target = inputs.manifest, inputs.boxes, inputs.model, inputs.info, inputs.device
    checkpoint, shards_dir, split = inputs.checkpoint, inputs.shards_dir, config.split
    samples = sample_table(manifest, split)
    boxes = boxes[boxes["finding"].isin(info.classes)] if boxes is not None else None
    boxed = set(boxes["image"]) if boxes is not None else set()
    collector = ErrorCollector(info.thresholds, config.top_k, set(samples.index[samples["image_index"].isin(boxed)]),
                               info.classes)
    loader = create_loader(LoaderSpec(shards_dir, split, info.config.data, batch_size=config.batch_size,
                                      loader=config.loader, device=target))
    started = time.perf_counter()
    result = evaluate(model, loader, FocalLoss(info.config.optim.focal_gamma), resolve_amp(info.config.amp, target),
                      on_batch=collector)
    seconds = time.perf_counter() - started
    keys = result["keys"]
    scored = ScoredSplit(keys, samples.loc[keys], result["targets"], result["probs"], model, info, target, {})
    _write_predictions(out / "predictions.csv", scored.rows["image_index"], scored.probs, info)

    metrics = per_class_report(scored.targets, scored.probs, info.thresholds, info.classes,
                               groups=scored.rows["patient_id"].to_numpy(), n_boot=config.bootstrap)
    metrics["datasets"] = per_dataset(scored)
    metrics |= {"split": split, "checkpoint": str(checkpoint), "checkpoint_epoch": info.epoch,
                "threshold_source": "F1-optimal per class on the validation split, stored in the checkpoint",
                "inference_images_per_second": len(keys) / seconds, "device": str(target),
                "loader": resolve_loader(config.loader, target)}
    curves = plot_curves(scored.targets, scored.probs, info.thresholds, info.classes, out / "curves")
    clinical = clinical_sections(metrics, scored, manifest, config, out / "curves")
    gallery, localization = _explain(scored, collector, boxes, out / "visualizations")
    metrics["localization"] = localization
    (out / "metrics.json").write_text(dump_json(metrics))
    report = write_analysis_report(out, metrics, curves, gallery, localization, clinical)
    log.info("analysis of %d %s images: macro AUROC %.4f; report %s", len(keys), split,
             metrics["macro"]["auroc"], report)
    return metrics


def per_dataset(scored: ScoredSplit) -> dict | None:
    """With samples of several data sets: per data set its images and its macro and per-class AUROC (over the
    classes it states); None for one."""
    datasets = scored.rows["dataset"].to_numpy()
    if len(set(datasets)) < 2:
        return None
    out = {}
    for name in sorted(set(datasets)):
        rows = datasets == name
        report = per_class_report(scored.targets[rows], scored.probs[rows], scored.info.thresholds,
                                  scored.info.classes, n_boot=0)
        out[name] = {"images": int(rows.sum()), "macro_auroc": report["macro"]["auroc"],
                     "auroc": {c: v["auroc"] for c, v in report["classes"].items() if v["images"]}}
    return out


def _write_predictions(path: Path, image_index: pd.Series, probs: np.ndarray, info) -> None:
    """image_index, prob_<Class> (the model's output) and, with a calibration, calibrated_<Class>."""
    frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in info.classes])
    if info.calibration:
        calibrated = apply_calibration(probs, info.calibration)
        frame[[f"calibrated_{c}" for c in info.classes]] = calibrated
    frame.insert(0, "image_index", list(image_index))
    frame.to_csv(path, index=False)


def clinical_sections(metrics: dict, scored: ScoredSplit, manifest: dict, config: AnalyzeConfig, folder: Path
                      ) -> list[str]:
    """Calibration, operating points and the subgroup audit into `metrics`; their report sections."""
    targets, probs, info = scored.targets, scored.probs, scored.info
    metrics["calibration"] = calibration_report(targets, probs, info.calibration, info.classes)
    points = info.operating_points or {"max_f1": info.thresholds.tolist()}
    metrics["operating_points"] = operating_point_report(targets, probs, points, info.classes)
    metrics["subgroups"], metrics["subgroup_gaps"] = subgroup_audit(targets, probs, info.thresholds, scored.rows,
                                                                    info.classes, min(config.bootstrap, 200))
    return [*claim_section(manifest, metrics["split"]),
            *calibration_section(metrics["calibration"], plot_reliability(metrics["calibration"],
                                                                          folder / "reliability.png")),
            *operating_points_section(metrics["operating_points"]),
            *subgroup_section(metrics["subgroups"], metrics["subgroup_gaps"],
                              plot_subgroups(metrics["subgroups"], folder / "subgroups.png"))]


def _explain(scored: ScoredSplit, collector: ErrorCollector, boxes: pd.DataFrame | None, folder: Path):
    """The Grad-CAM++ gallery of the collected errors and the localisation against the boxes."""
    row_of = {key: row for row, key in enumerate(scored.keys)}
    errors = {kind: {name: [(row_of[key], p) for key, p in chosen] for name, chosen in per_class.items()}
              for kind, per_class in collector.errors().items()}
    scored.images = collector.images
    explainer = CamExplainer(scored.model)
    gallery = _write_gallery(scored, errors, explainer, folder)
    localization = _localization(scored, boxes, explainer) if boxes is not None else None
    return gallery, localization


def model_input(gray: np.ndarray, data: DataConfig, device: torch.device) -> torch.Tensor:
    """The normalised model input of a processed uint8 image, as the loader made it."""
    return Preprocessing.of(data).normalize(torch.from_numpy(gray)[None, None].to(device))


def _cam(explainer: CamExplainer, scored: ScoredSplit, gray: np.ndarray, class_index: int) -> np.ndarray:
    return explainer(model_input(gray, scored.info.config.data, scored.device), class_index)


def _write_gallery(scored: ScoredSplit, errors: dict, explainer: CamExplainer, folder: Path) -> dict:
    """visualizations/{fp,fn}/<Class>_<rank>_<image>.png: processed input beside its Grad-CAM++ overlay."""
    gallery = {"fp": [], "fn": []}
    thresholds, image_index = scored.info.thresholds, scored.image_index
    progress = tqdm(total=sum(len(rows) for per_class in errors.values() for rows in per_class.values()),
                    desc="Grad-CAM++", unit="map", leave=False)
    for kind, per_class in errors.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for name, rows in per_class.items():
            c = scored.info.classes.index(name)
            for rank, (row, probability) in enumerate(rows, 1):
                gray = scored.images[scored.keys[row]]
                cam = _cam(explainer, scored, gray, c)
                if gray.shape[0] < GALLERY_MIN_SIDE:  # small training sizes: enlarge so the captions stay legible
                    side = (GALLERY_MIN_SIDE, GALLERY_MIN_SIDE)
                    gray, cam = cv2.resize(gray, side), cv2.resize(cam, side)
                panel = np.hstack([cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), overlay(gray, cam)])
                truth = finding_names(scored.info.classes, scored.targets[row] > 0.5)
                predicted = finding_names(scored.info.classes, scored.probs[row] >= thresholds)
                panel = _caption(panel, [f"{kind.upper()} {name}: p={probability:.3f} (threshold "
                                         f"{thresholds[c]:.3f})", f"true: {truth}", f"predicted: {predicted}"])
                path = folder / kind / f"{file_stem(name)}_{rank}_{file_stem(Path(image_index[row]).stem)}.png"
                cv2.imwrite(str(path), panel)
                gallery[kind].append({"class": name, "image": image_index[row], "probability": probability,
                                      "true": truth, "predicted": predicted,
                                      "file": str(path.relative_to(folder.parent))})
                progress.update()
    progress.close()
    return gallery


def _caption(panel: np.ndarray, lines: list[str]) -> np.ndarray:
    scale = max(0.4, panel.shape[0] / 700)
    band = np.full((int(26 * scale * len(lines)) + 8, panel.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(band, line[:110], (6, int(26 * scale * (i + 1))), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([band, panel])


def _localization(scored: ScoredSplit, boxes: pd.DataFrame, explainer: CamExplainer) -> dict:
    """Per class with boxes in this split: IoBB accuracy at 0.1/0.25/0.5 and pointing-game hit rate."""
    scale = scored.info.config.data.image_size / NIH_BOX_SPACE
    row_of = {name: i for i, name in enumerate(scored.image_index)}
    per_class: dict[str, dict] = {}
    for box in boxes.itertuples():
        if box.image not in row_of:
            continue
        gray = scored.images[scored.keys[row_of[box.image]]]
        cam = _cam(explainer, scored, gray, scored.info.classes.index(box.finding))
        truth = (box.x * scale, box.y * scale, box.w * scale, box.h * scale)
        score = iobb(cam_box(cam), truth)
        entry = per_class.setdefault(box.finding, {"boxes": 0, "hits": 0, **{f"iobb>{t}": 0 for t in IOBB_THRESHOLDS}})
        entry["boxes"] += 1
        entry["hits"] += int(pointing_hit(cam, truth))
        for t in IOBB_THRESHOLDS:
            entry[f"iobb>{t}"] += int(score > t)
    for entry in per_class.values():
        n = entry["boxes"]
        entry["pointing_game"] = entry.pop("hits") / n
        for t in IOBB_THRESHOLDS:
            entry[f"iobb>{t}"] /= n
    return per_class
