"""`cxr-fast analyze`: one pass over a split with a checkpoint → predictions → metrics → Grad-CAM++ galleries of the
worst errors → localisation against NIH boxes → report.md.

Thresholds are the checkpoint's, chosen on validation when it was saved, and never on the split reported here.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch

from cxr_fast import constants as C
from cxr_fast.cam import IOBB_THRESHOLDS, CamExplainer, cam_box, iobb, overlay, pointing_hit
from cxr_fast.checkpoint import load_checkpoint
from cxr_fast.config import RunConfig, from_dict
from cxr_fast.engine import evaluate, resolve_amp, resolve_device
from cxr_fast.errors import CxrFastError
from cxr_fast.labels import format_finding_labels
from cxr_fast.loader import create_loader, load_processed, normalize
from cxr_fast.losses import FocalLoss
from cxr_fast.metrics import per_class_report
from cxr_fast.model import create_model
from cxr_fast.report import plot_curves, write_analysis_report
from cxr_fast.shards import load_manifest, sample_table

log = logging.getLogger(__name__)
NIH_BOX_SPACE = 1024  # NIH gives box coordinates in the 1024 x 1024 pixel space of its PNGs
GALLERY_MIN_SIDE = 384


def select_errors(targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, top_k: int) -> dict:
    """Per class, the top-k most confident false positives and false negatives: [(row, probability), ...]."""
    errors = {"fp": {}, "fn": {}}
    for c, name in enumerate(C.CLASS_NAMES):
        positive, predicted = targets[:, c] > 0.5, probs[:, c] >= thresholds[c]
        fp = np.flatnonzero(predicted & ~positive)
        fn = np.flatnonzero(~predicted & positive)
        errors["fp"][name] = [(int(i), float(probs[i, c])) for i in fp[np.argsort(-probs[fp, c])][:top_k]]
        errors["fn"][name] = [(int(i), float(probs[i, c])) for i in fn[np.argsort(probs[fn, c])][:top_k]]
    return errors


def read_boxes(path: str | Path) -> pd.DataFrame:
    """NIH BBox_List_2017.csv → columns image, finding, x, y, w, h (1024-pixel space)."""
    try:
        raw = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise CxrFastError(f"cannot read box list {path}: {error}") from None
    if raw.shape[1] < 6:
        raise CxrFastError(f"{path}: expected NIH's BBox_List_2017.csv (image, finding, x, y, w, h)")
    boxes = raw.iloc[:, :6].copy()
    boxes.columns = ["image", "finding", "x", "y", "w", "h"]
    boxes["finding"] = boxes["finding"].replace({"Infiltrate": "Infiltration"})  # the box list's spelling
    return boxes[boxes["finding"].isin(C.CLASS_NAMES)]


def run_analysis(checkpoint: str | Path, shards_dir: str | Path, out: str | Path, split: str = "test",
                 device: str = "auto", backend: str = "dali", top_k: int = 3, bbox: str | Path | None = None,
                 batch_size: int = 16, n_boot: int = 500) -> dict:
    out = Path(out)
    ckpt = load_checkpoint(checkpoint)
    if ckpt.get("thresholds") is None:
        raise CxrFastError(f"{checkpoint} has no validation thresholds (saved before the first validation); "
                           "use best.pt or a last.pt written at an epoch end")
    cfg = from_dict(RunConfig, ckpt["config"])
    manifest = load_manifest(shards_dir)
    if split not in manifest["splits"] or not manifest["splits"][split]["images"]:
        raise CxrFastError(f"split {split!r} is missing or empty in {shards_dir}")
    target = resolve_device(device)
    model = create_model(cfg.model, cfg.data.in_chans, pretrained=False)
    model.load_state_dict(ckpt["model"])
    model = model.to(target).eval()
    thresholds = np.asarray(ckpt["thresholds"], dtype=np.float64)

    loader = create_loader(backend, shards_dir, split, cfg.data, batch_size=batch_size, train=False, device=target)
    started = time.perf_counter()
    result = evaluate(model, loader, FocalLoss(cfg.optim.focal_gamma), target, resolve_amp(cfg.amp, target))
    seconds = time.perf_counter() - started
    keys, probs, targets = result["keys"], result["probs"], result["targets"]
    samples = sample_table(manifest, split)
    image_index = [samples[k][0] for k in keys]
    patients = np.array([samples[k][1] for k in keys])
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in C.CLASS_NAMES])
    frame.insert(0, "image_index", image_index)
    frame.to_csv(out / "predictions.csv", index=False)

    metrics = per_class_report(targets, probs, thresholds, groups=patients, n_boot=n_boot)
    metrics |= {"split": split, "checkpoint": str(checkpoint), "checkpoint_epoch": ckpt.get("epoch"),
                "threshold_source": "F1-optimal per class on the validation split, stored in the checkpoint",
                "inference_images_per_second": len(keys) / seconds, "device": str(target), "loader": backend}
    curves = plot_curves(targets, probs, thresholds, out / "curves")

    errors = select_errors(targets, probs, thresholds, top_k)
    wanted = {keys[row] for kind in errors.values() for rows in kind.values() for row, _ in rows}
    boxes = read_boxes(bbox) if bbox else None
    if boxes is not None:
        wanted |= {k for k, name in zip(keys, image_index) if name in set(boxes["image"])}
    images = load_processed(shards_dir, split, wanted, cfg.data)
    explainer = CamExplainer(model)
    gallery = _write_gallery(errors, keys, image_index, targets, probs, thresholds, images, explainer, cfg, target,
                             out / "visualizations")
    localization = _localization(boxes, keys, image_index, images, explainer, cfg, target) \
        if boxes is not None else None
    metrics["localization"] = localization
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    report = write_analysis_report(out, metrics, curves, gallery, localization)
    log.info("analysis of %d %s images: macro AUROC %.4f; report %s", len(keys), split,
             metrics["macro"]["auroc"], report)
    return metrics


def _model_input(image: np.ndarray, cfg: RunConfig, device: torch.device) -> torch.Tensor:
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
