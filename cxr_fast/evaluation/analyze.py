"""`cxr-fast analyze`: one pass over a split with a trained model → predictions → metrics → Grad-CAM++ galleries of
the worst errors → localisation against NIH boxes → report.md.

Thresholds are the checkpoint's, chosen on validation when it was saved, and never on the split reported here. Since
they are known before scoring, the most confident errors are collected while the split is scored, with the very
images the model scored: the maps are drawn on those, and nothing is read twice.
"""

from __future__ import annotations

import heapq
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from cxr_fast import constants as C
from cxr_fast.data.labels import format_finding_labels
from cxr_fast.data.loader import create_loader, resolve_backend
from cxr_fast.data.reader import load_manifest, sample_table
from cxr_fast.data.transforms import normalize
from cxr_fast.errors import CxrFastError
from cxr_fast.calibration import apply_calibration
from cxr_fast.evaluation.cam import IOBB_THRESHOLDS, CamExplainer, cam_box, iobb, overlay, pointing_hit
from cxr_fast.evaluation.clinical import calibration_report, operating_point_report, subgroup_audit
from cxr_fast.evaluation.clinical_report import (calibration_section, claim_section, operating_points_section,
                                                plot_reliability, plot_subgroups, subgroup_section)
from cxr_fast.evaluation.report import plot_curves, write_analysis_report
from cxr_fast.metrics import per_class_report
from cxr_fast.training.checkpoint import load_model
from cxr_fast.training.engine import evaluate, resolve_amp, resolve_device
from cxr_fast.training.losses import FocalLoss

log = logging.getLogger(__name__)
NIH_BOX_SPACE = 1024  # NIH gives box coordinates in the 1024 x 1024 pixel space of its PNGs
GALLERY_MIN_SIDE = 384


class ErrorCollector:
    """While a split is scored: per class, the top-k most confident false positives (highest probability) and
    false negatives (lowest), and the images of boxed keys, kept as the uint8 images the model saw."""

    def __init__(self, thresholds: np.ndarray, top_k: int, box_keys: set[str]):
        self.thresholds, self.top_k, self.box_keys = thresholds, top_k, box_keys
        self.heaps = {kind: {name: [] for name in C.CLASS_NAMES} for kind in ("fp", "fn")}
        self.images: dict[str, np.ndarray] = {}

    def __call__(self, batch, probs: torch.Tensor) -> None:
        probs, targets = probs.cpu().numpy(), batch.targets.cpu().numpy() > 0.5
        wanted = set()
        for row, key in enumerate(batch.keys):
            for c, name in enumerate(C.CLASS_NAMES):
                predicted, p = probs[row, c] >= self.thresholds[c], float(probs[row, c])
                if predicted != targets[row, c]:
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
            self.images[batch.keys[row]] = _to_uint8(batch.images[row])

    def errors(self) -> dict:
        """{fp|fn: {class: [(key, probability), ...]}}, most confident first; prunes images no longer needed."""
        chosen = {kind: {name: [(key, p) for _score, key, p in sorted(heap, reverse=True)]
                         for name, heap in per_class.items()} for kind, per_class in self.heaps.items()}
        keep = {key for per_class in chosen.values() for rows in per_class.values() for key, _ in rows}
        self.images = {k: v for k, v in self.images.items() if k in keep or k in self.box_keys}
        return chosen


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """The gray uint8 image back from a normalised model input (exact: normalisation is affine on integers)."""
    gray = image[0].float() * C.GRAY_STD + C.GRAY_MEAN
    return gray.round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def read_boxes(path: str | Path) -> pd.DataFrame:
    """NIH BBox_List_2017.csv → columns image, finding, x, y, w, h (1024-pixel space), checked: numeric, positive
    sizes, known findings."""
    try:
        raw = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise CxrFastError(f"cannot read box list {path}: {error}") from None
    if raw.shape[1] < 6:
        raise CxrFastError(f"{path}: expected NIH's BBox_List_2017.csv (image, finding, x, y, w, h)")
    boxes = raw.iloc[:, :6].copy()
    boxes.columns = ["image", "finding", "x", "y", "w", "h"]
    for column in ("x", "y", "w", "h"):
        values = pd.to_numeric(boxes[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values) | ((values <= 0) if column in ("w", "h") else (values < 0))
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise CxrFastError(f"{path}: row {row + 2} has an invalid box {column} ({boxes[column].iloc[row]!r}); "
                               "x, y must be numbers >= 0 and w, h > 0")
        boxes[column] = values
    boxes["image"] = boxes["image"].astype(str).str.strip()
    boxes["finding"] = boxes["finding"].astype(str).str.strip().replace({"Infiltrate": "Infiltration"})
    return boxes[boxes["finding"].isin(C.CLASS_NAMES)]


def run_analysis(checkpoint: str | Path, shards_dir: str | Path, out: str | Path, split: str = "test",
                 device: str = "auto", backend: str = "auto", top_k: int = 3, bbox: str | Path | None = None,
                 batch_size: int = 16, n_boot: int = 500) -> dict:
    out = Path(out)
    target = resolve_device(device)
    manifest = load_manifest(shards_dir)
    if split not in manifest["splits"] or not manifest["splits"][split]["images"]:
        raise CxrFastError(f"split {split!r} is missing or empty in {shards_dir}")
    boxes = read_boxes(bbox) if bbox else None  # checked before the work starts
    model, info = load_model(checkpoint, target)
    samples = sample_table(manifest, split)
    boxed = set(boxes["image"]) if boxes is not None else set()
    collector = ErrorCollector(info.thresholds, top_k, set(samples.index[samples["image_index"].isin(boxed)]))

    loader = create_loader(backend, shards_dir, split, info.config.data, batch_size=batch_size, train=False,
                           device=target)
    started = time.perf_counter()
    result = evaluate(model, loader, FocalLoss(info.config.optim.focal_gamma), target,
                      resolve_amp(info.config.amp, target), on_batch=collector)
    seconds = time.perf_counter() - started
    keys, probs, targets = result["keys"], result["probs"], result["targets"]
    rows = samples.loc[keys]
    out.mkdir(parents=True, exist_ok=True)
    _write_predictions(out / "predictions.csv", rows["image_index"], probs, info.calibration)

    metrics = per_class_report(targets, probs, info.thresholds, groups=rows["patient_id"].to_numpy(), n_boot=n_boot)
    metrics |= {"split": split, "checkpoint": str(checkpoint), "checkpoint_epoch": info.epoch,
                "threshold_source": "F1-optimal per class on the validation split, stored in the checkpoint",
                "inference_images_per_second": len(keys) / seconds, "device": str(target),
                "loader": resolve_backend(backend, target)}
    curves = plot_curves(targets, probs, info.thresholds, out / "curves")
    clinical = _clinical(metrics, targets, probs, info, rows, manifest, split, n_boot, out / "curves")
    gallery, localization = _explain(model, info, collector, keys, list(rows["image_index"]), targets, probs, boxes,
                                     target, out / "visualizations")
    metrics["localization"] = localization
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    report = write_analysis_report(out, metrics, curves, gallery, localization, clinical)
    log.info("analysis of %d %s images: macro AUROC %.4f; report %s", len(keys), split,
             metrics["macro"]["auroc"], report)
    return metrics


def _write_predictions(path: Path, image_index: pd.Series, probs: np.ndarray, calibration: dict | None) -> None:
    """image_index, prob_<Class> (the model's output) and, with a calibration, calibrated_<Class>."""
    frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in C.CLASS_NAMES])
    if calibration:
        calibrated = apply_calibration(probs, calibration)
        frame[[f"calibrated_{c}" for c in C.CLASS_NAMES]] = calibrated
    frame.insert(0, "image_index", list(image_index))
    frame.to_csv(path, index=False)


def _clinical(metrics, targets, probs, info, rows, manifest, split, n_boot, folder) -> list[str]:
    """Calibration, operating points and the subgroup audit into `metrics`; their report sections."""
    metrics["calibration"] = calibration_report(targets, probs, info.calibration)
    points = info.operating_points or {"max_f1": info.thresholds.tolist()}
    metrics["operating_points"] = operating_point_report(targets, probs, points)
    metrics["subgroups"], metrics["subgroup_gaps"] = subgroup_audit(targets, probs, info.thresholds, rows,
                                                                    min(n_boot, 200))
    return [*claim_section(manifest, split),
            *calibration_section(metrics["calibration"], plot_reliability(metrics["calibration"],
                                                                          folder / "reliability.png")),
            *operating_points_section(metrics["operating_points"]),
            *subgroup_section(metrics["subgroups"], metrics["subgroup_gaps"],
                              plot_subgroups(metrics["subgroups"], folder / "subgroups.png"))]


def _explain(model, info, collector, keys, image_index, targets, probs, boxes, device, folder):
    """The Grad-CAM++ gallery of the collected errors and the localisation against the boxes."""
    row_of = {key: row for row, key in enumerate(keys)}
    errors = {kind: {name: [(row_of[key], p) for key, p in chosen] for name, chosen in per_class.items()}
              for kind, per_class in collector.errors().items()}
    explainer = CamExplainer(model)
    gallery = _write_gallery(errors, keys, image_index, targets, probs, info.thresholds, collector.images, explainer,
                             info.config, device, folder)
    localization = _localization(boxes, keys, image_index, collector.images, explainer, info.config, device) \
        if boxes is not None else None
    return gallery, localization


def _model_input(image: np.ndarray, cfg, device: torch.device) -> torch.Tensor:
    return normalize(torch.from_numpy(image)[None, None].to(device), cfg.data.in_chans)


def _write_gallery(errors, keys, image_index, targets, probs, thresholds, images, explainer, cfg, device, folder):
    """visualizations/{fp,fn}/<Class>_<rank>_<image>.png: processed input beside its Grad-CAM++ overlay."""
    gallery = {"fp": [], "fn": []}
    for kind, per_class in errors.items():
        (folder / kind).mkdir(parents=True, exist_ok=True)
        for name, rows in per_class.items():
            c = C.CLASS_NAMES.index(name)
            for rank, (row, probability) in enumerate(rows, 1):
                gray = images[keys[row]]
                cam = explainer(_model_input(gray, cfg, device), c)
                if gray.shape[0] < GALLERY_MIN_SIDE:  # small training sizes: enlarge so the captions stay legible
                    side = (GALLERY_MIN_SIDE, GALLERY_MIN_SIDE)
                    gray, cam = cv2.resize(gray, side), cv2.resize(cam, side)
                panel = np.hstack([cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), overlay(gray, cam)])
                truth = format_finding_labels(targets[row] > 0.5)
                predicted = format_finding_labels(probs[row] >= thresholds)
                panel = _caption(panel, [f"{kind.upper()} {name}: p={probability:.3f} (threshold "
                                         f"{thresholds[c]:.3f})", f"true: {truth}", f"predicted: {predicted}"])
                path = folder / kind / f"{name}_{rank}_{Path(image_index[row]).stem}.png"
                cv2.imwrite(str(path), panel)
                gallery[kind].append({"class": name, "image": image_index[row], "probability": probability,
                                      "true": truth, "predicted": predicted,
                                      "file": str(path.relative_to(folder.parent))})
    return gallery


def _caption(panel: np.ndarray, lines: list[str]) -> np.ndarray:
    scale = max(0.4, panel.shape[0] / 700)
    band = np.full((int(26 * scale * len(lines)) + 8, panel.shape[1], 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(band, line[:110], (6, int(26 * scale * (i + 1))), cv2.FONT_HERSHEY_SIMPLEX, 0.6 * scale,
                    (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([band, panel])


def _localization(boxes, keys, image_index, images, explainer, cfg, device) -> dict:
    """Per class with boxes in this split: IoBB accuracy at 0.1/0.25/0.5 and pointing-game hit rate."""
    scale = cfg.data.image_size / NIH_BOX_SPACE
    row_of = {name: i for i, name in enumerate(image_index)}
    per_class: dict[str, dict] = {}
    for box in boxes.itertuples():
        if box.image not in row_of:
            continue
        gray = images[keys[row_of[box.image]]]
        cam = explainer(_model_input(gray, cfg, device), C.CLASS_NAMES.index(box.finding))
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
