"""`cxr-fast predict`: score new images (PNG, JPEG or DICOM files, or folders of them) with a trained checkpoint or
an exported ONNX model, and write DIR/predictions.csv.

Preprocessing is the evaluation path the model was validated with: decode → gray → resize (INTER_AREA) → CLAHE →
normalise, the same numbers as the OpenCV loader gives `analyze`. Images are read and processed by a thread pool
while the model scores batches (on the GPU when present). An input that cannot be read gets a row with its error
and the others are still scored; the command then exits with code 1.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cxr_fast import constants as C
from cxr_fast.calibration import apply_calibration
from cxr_fast.config import DataConfig, PredictConfig
from cxr_fast.data.source import image_files, read_gray
from cxr_fast.data.labels import format_finding_labels
from cxr_fast.data.transforms import normalize, process_gray
from cxr_fast.errors import BadInput, CxrFastError
from cxr_fast.evaluation.cam import CamExplainer, overlay
from cxr_fast.evaluation.export import read_metadata
from cxr_fast.files import make_folder
from cxr_fast.training.checkpoint import load_model
from cxr_fast.training.engine import autocast, resolve_amp, resolve_device

log = logging.getLogger(__name__)


@dataclass
class Scorer:
    """A trained model to score with: its logits function and what scoring needs around it."""

    logits: object  # (N, C, H, W) float32 tensor on `device` -> (N, 14) logits as numpy
    data: DataConfig
    thresholds: np.ndarray
    calibration: dict | None
    device: torch.device
    model: torch.nn.Module | None = None  # the PyTorch model, for Grad-CAM++ (None for ONNX)


def torch_scorer(checkpoint: Path, device: torch.device) -> Scorer:
    model, info = load_model(checkpoint, device)
    amp = resolve_amp(info.config.amp, device)

    @torch.no_grad()
    def logits(batch: torch.Tensor) -> np.ndarray:
        with autocast(device, amp):
            return model(batch).float().cpu().numpy()

    return Scorer(logits, info.config.data, info.thresholds, info.calibration, device, model)


def onnx_scorer(path: Path, device: torch.device) -> Scorer:
    try:  # ONNX Runtime is imported only when an ONNX model is scored: it is heavy and not needed otherwise
        import onnxruntime
    except ImportError:
        raise CxrFastError("scoring an ONNX model needs onnxruntime: pip install onnxruntime") from None
    meta = read_metadata(path)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else \
        ["CPUExecutionProvider"]
    available = set(onnxruntime.get_available_providers())
    session = onnxruntime.InferenceSession(str(path), providers=[p for p in providers if p in available])

    def logits(batch: torch.Tensor) -> np.ndarray:
        return session.run(["logits"], {"image": batch.contiguous().cpu().numpy()})[0]

    pre = meta["preprocessing"]
    data = DataConfig(image_size=pre["image_size"], in_chans=pre["in_chans"], clahe_clip_limit=pre["clahe_clip_limit"],
                      clahe_tiles=pre["clahe_tiles"])
    return Scorer(logits, data, np.asarray(meta["thresholds"]), meta.get("calibration"), torch.device("cpu"))


def find_inputs(inputs: list[Path]) -> list[Path]:
    """The image files named, and those below the folders named (recursively, in a stable order)."""
    files = []
    for item in inputs:
        if item.is_dir():
            below = list(image_files(item))
            if not below:
                raise CxrFastError(f"no PNG, JPEG or DICOM image below {item}")
            files += below
        else:
            files.append(item)
    return files


def _prepare(path: Path, config: DataConfig, max_pixels: int) -> tuple[np.ndarray | None, str]:
    try:
        gray, _data, _ = read_gray(path, max_pixels)
    except BadInput as bad:
        return None, bad.reason
    return process_gray(gray, config), ""


def predict(model_path: Path, inputs: list[Path], out: Path, config: PredictConfig = PredictConfig()
            ) -> pd.DataFrame:
    """Score every input; writes out/predictions.csv (and out/cam/ with `config.cam`). Returns the table."""
    device, cam, batch_size, max_pixels = resolve_device(config.device), config.cam, config.batch_size, \
        config.max_pixels
    scorer = onnx_scorer(model_path, device) if model_path.suffix == ".onnx" else torch_scorer(model_path, device)
    if cam and scorer.model is None:
        raise CxrFastError("--cam needs the PyTorch checkpoint (Grad-CAM++ takes gradients); an ONNX model has none")
    files = find_inputs(inputs)
    make_folder(out)
    rows, explainer = [], None
    if cam:
        explainer = CamExplainer(scorer.model)
    chunks = [files[start:start + batch_size] for start in range(0, len(files), batch_size)]
    with ThreadPoolExecutor(config.workers or os.cpu_count()) as pool, tqdm(total=len(files), unit="img",
                                                                     desc="predict") as progress:
        def submit(chunk):  # Executor.map starts the work at once: the next chunk is read while this one scores
            return pool.map(lambda p: _prepare(p, scorer.data, max_pixels), chunk)

        queued = submit(chunks[0])
        for index, chunk in enumerate(chunks):
            prepared = list(queued)
            if index + 1 < len(chunks):
                queued = submit(chunks[index + 1])
            rows += _score(scorer, chunk, prepared, explainer, out)
            progress.update(len(chunk))
    table = pd.DataFrame(rows)
    table.to_csv(out / "predictions.csv", index=False)
    failed = int(table["error"].astype(bool).sum())
    log.info("scored %d of %d image(s); predictions in %s", len(table) - failed, len(table), out / "predictions.csv")
    return table


def _score(scorer: Scorer, paths: list[Path], prepared: list, explainer, out: Path) -> list[dict]:
    good = [i for i, (image, _) in enumerate(prepared) if image is not None]
    probs = np.zeros((0, C.NUM_CLASSES))
    if good:
        batch = torch.from_numpy(np.stack([prepared[i][0] for i in good])[:, None]).to(scorer.device)
        inputs = normalize(batch, scorer.data.in_chans)
        probs = 1.0 / (1.0 + np.exp(-scorer.logits(inputs).astype(np.float64)))
    calibrated = apply_calibration(probs, scorer.calibration) if scorer.calibration else None
    rows = []
    for i, path in enumerate(paths):
        row = {"image": str(path)}
        if i in good:
            k = good.index(i)
            positive = probs[k] >= scorer.thresholds
            row |= {f"prob_{c}": float(p) for c, p in zip(C.CLASS_NAMES, probs[k])}
            if calibrated is not None:
                row |= {f"calibrated_{c}": float(p) for c, p in zip(C.CLASS_NAMES, calibrated[k])}
            row |= {"findings": format_finding_labels(positive), "error": ""}
            if explainer is not None:
                _write_cams(explainer, inputs[k:k + 1], prepared[i][0], positive, path, out / "cam")
        else:
            row |= {f"prob_{c}": None for c in C.CLASS_NAMES} | {"findings": "", "error": prepared[i][1]}
        rows.append(row)
    return rows


def _write_cams(explainer, model_input: torch.Tensor, gray: np.ndarray, positive: np.ndarray, path: Path,
                folder: Path) -> None:
    """One Grad-CAM++ overlay per finding called positive: cam/<image>_<Class>.png."""
    folder.mkdir(exist_ok=True)
    for c in np.flatnonzero(positive):
        heat = explainer(model_input, int(c))
        cv2.imwrite(str(folder / f"{path.stem}_{C.CLASS_NAMES[c]}.png"), overlay(gray, heat))


def write_summary(table: pd.DataFrame) -> str:
    failed = table[table["error"].astype(bool)]
    lines = [f"{len(table) - len(failed)} of {len(table)} image(s) scored"]
    lines += [f"  could not score {row.image}: {row.error}" for row in failed.itertuples()]
    return "\n".join(lines)

