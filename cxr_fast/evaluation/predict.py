"""`cxr-fast predict`: score new images (PNG, JPEG or DICOM files, or folders of them) with a trained checkpoint or
an exported ONNX model through `Predictor`, and write DIR/predictions.csv.

Images are read and processed by a thread pool while the model scores batches (on the GPU when present). An input
that cannot be scored gets a row with its error and the others are still scored; the command then exits with code
1. The output folder follows the rules of every command that writes one: refused when occupied unless
--overwrite (which clears only this command's files), one writer at a time, the table written atomically.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from cxr_fast.config import PredictConfig
from cxr_fast.data.images.source import image_files
from cxr_fast.errors import CxrFastError
from cxr_fast.data.loaders.transforms import map_to_source
from cxr_fast.evaluation.report import file_stem
from cxr_fast.evaluation.cam import CamExplainer, overlay
from cxr_fast.evaluation.predictor import Predictor, Prepared
from cxr_fast.files import atomic_write, claim_output, folder_lock, make_folder

log = logging.getLogger(__name__)
OWN_FILES = ("predictions.csv", "cam")
ID_COLUMNS = ("sop_instance_uid", "study_instance_uid", "view_position")


def find_inputs(inputs: list[Path], out: Path) -> list[Path]:
    """The image files named, and those below the folders named (recursively, symlinked folders followed, in a
    stable order), never those below `out` (the command's own overlays)."""
    files = []
    for item in inputs:
        if item.is_dir():
            below = list(image_files(item, exclude=out))
            if not below:
                raise CxrFastError(f"no PNG, JPEG or DICOM image below {item}")
            files += below
        else:
            files.append(item)
    return files


def predict(model_path: Path, inputs: list[Path], out: Path, config: PredictConfig = PredictConfig(),
            overwrite: bool = False) -> pd.DataFrame:
    """Score every input; writes out/predictions.csv (and out/cam/ with `config.cam`). Returns the table."""
    predictor = Predictor.load(model_path, config)
    if config.cam and predictor.model.module is None:
        raise CxrFastError("--cam needs the PyTorch checkpoint (Grad-CAM++ takes gradients); an ONNX model has none")
    files = find_inputs(inputs, out)
    make_folder(out)
    with folder_lock(out, "predictions"):
        claim_output(out, OWN_FILES, overwrite, "predict", [i for i in inputs if i.is_dir()])
        cams = CamWriter(CamExplainer(predictor.model.module), cam_stems(files), out / "cam") if config.cam else None
        rows = _score_all(predictor, files, cams)
        table = pd.DataFrame(rows)
        atomic_write(out / "predictions.csv", lambda tmp: table.to_csv(tmp, index=False))
    failed = int(table["error"].astype(bool).sum())
    log.info("scored %d of %d image(s); predictions in %s", len(table) - failed, len(table), out / "predictions.csv")
    return table


@dataclass
class CamWriter:
    """What --cam needs: the explainer, the overlay name of each input and the folder."""

    explainer: CamExplainer
    stems: dict[Path, str]
    folder: Path


def _score_all(predictor: Predictor, files: list[Path], cams: CamWriter | None) -> list[dict]:
    config = predictor.config
    chunks = [files[start:start + config.batch_size] for start in range(0, len(files), config.batch_size)]
    rows = []
    with ThreadPoolExecutor(config.workers or os.cpu_count()) as pool, tqdm(total=len(files), unit="img",
                                                                            desc="predict") as progress:
        def submit(chunk):  # Executor.map starts the work at once: the next chunk is read while this one scores
            return pool.map(predictor.prepare, chunk)

        queued = submit(chunks[0]) if chunks else iter(())
        for index, chunk in enumerate(chunks):
            prepared = list(queued)
            if index + 1 < len(chunks):
                queued = submit(chunks[index + 1])
            rows += _score(predictor, chunk, prepared, cams)
            progress.update(len(chunk))
    return rows


def _score(predictor: Predictor, paths: list[Path], prepared: list[Prepared], cams: CamWriter | None) -> list[dict]:
    good = [i for i, p in enumerate(prepared) if not p.error]
    inputs = predictor.tensor([prepared[i].image for i in good]) if good else None
    probs = predictor.probabilities(inputs) if good else np.zeros((0, len(predictor.classes)))
    rows = []
    for i, path in enumerate(paths):
        item = prepared[i]
        row = {"image": str(path)}
        if item.error:
            row |= {f"prob_{c}": None for c in predictor.classes} | {"findings": "", "no_finding_called": "",
                                                                     "error": item.error}
        else:
            k = good.index(i)
            result = predictor.result(probs[k], item)
            row |= {f"prob_{c}": p for c, p in result.probabilities.items()}
            row |= {f"calibrated_{c}": p for c, p in (result.calibrated or {}).items()}
            row |= {"findings": "|".join(result.findings), "no_finding_called": result.no_finding_called,
                    "error": ""}
            if cams is not None:
                _write_cams(cams.explainer, inputs[k:k + 1], item.gray, result.findings, predictor,
                            cams.folder / cams.stems[path])
        row |= {"operating_point": predictor.config.operating_point, "warning": "; ".join(item.warnings)}
        row |= {column: item.meta.get(column, "") for column in ID_COLUMNS}
        rows.append(row)
    return rows


def cam_stems(files: list[Path]) -> dict[Path, str]:
    """The overlay name of each input: its stem, with 8 hex digits of its full path added where two inputs share a
    stem (a/x.png and b/x.png), so no overlay overwrites another."""
    counts: dict[str, int] = {}
    for path in files:
        counts[path.stem] = counts.get(path.stem, 0) + 1
    return {path: path.stem if counts[path.stem] == 1 else
            f"{path.stem}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}" for path in files}


def _write_cams(explainer, model_input, gray: np.ndarray, findings: list[str], predictor, stem: Path) -> None:
    """One Grad-CAM++ overlay per finding called positive, <stem>_<Class>.png, drawn on the original image (the map
    scaled to it, its padding taken off)."""
    stem.parent.mkdir(exist_ok=True)
    for finding in findings:
        heat = explainer(model_input, predictor.classes.index(finding))
        heat = map_to_source(heat, gray.shape, predictor.data.fit)
        target = stem.parent / f"{stem.name}_{file_stem(finding)}.png"
        if not cv2.imwrite(str(target), overlay(gray, heat)):
            raise CxrFastError(f"cannot write the Grad-CAM++ overlay {target} (disk full or not writable)")


def write_summary(table: pd.DataFrame) -> str:
    failed = table[table["error"].astype(bool)]
    lines = [f"{len(table) - len(failed)} of {len(table)} image(s) scored"]
    lines += [f"  could not score {row.image}: {row.error}" for row in failed.itertuples()]
    return "\n".join(lines)
