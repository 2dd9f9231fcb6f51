"""`cxr-fast export`: a trained checkpoint as DIR/model.onnx plus DIR/model.json, everything scoring needs outside
this package: class names, validation thresholds, calibration, preprocessing and versions.

The ONNX graph takes the normalised image (N x C x H x W float32, any N) and returns a logit per class. Before it reports
success the export scores the same inputs with ONNX Runtime and with PyTorch and requires the probabilities to agree
within 1e-3; otherwise nothing is left behind.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from cxr_fast import __version__
from cxr_fast.data.images.preprocess import Preprocessing, gray8
from cxr_fast.config import DataConfig
from cxr_fast.files import sha256_file
from cxr_fast.errors import CxrFastError
from cxr_fast.files import atomic_json, claim_output, folder_lock, make_folder
from cxr_fast.training.checkpoint import check_thresholds, load_model

log = logging.getLogger(__name__)
EXPORT_FORMAT = "cxr_fast.onnx"
EXPORT_FORMAT_VERSION = 1
TOLERANCE = 1e-3
OPSET = 17


def _parity(model: torch.nn.Module, path: Path, inputs: torch.Tensor) -> float:
    """Largest difference of the probabilities, ONNX Runtime (CPU) against PyTorch (fp32, CPU)."""
    import onnxruntime  # heavy, and only needed here: imported when an export is checked

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx = session.run(["logits"], {"image": inputs.numpy()})[0]
    with torch.no_grad():
        reference = model(inputs.contiguous(memory_format=torch.channels_last)).numpy()
    return float(np.abs(1 / (1 + np.exp(-onnx)) - 1 / (1 + np.exp(-reference))).max())


def parity_inputs(data: DataConfig, count: int = 4) -> torch.Tensor:
    """Inputs like the real ones: processed gray images (smooth structure plus noise), normalised."""
    rng, size = np.random.default_rng(0), data.image_size
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = [gray8(128 + 80 * np.sin(6 * xx + k) * np.cos(4 * yy - k) + rng.normal(0, 20, (size, size)))
              for k in range(count)]
    return Preprocessing.of(data).normalize(torch.from_numpy(np.stack(images)[:, None])).contiguous()


def export_onnx(checkpoint: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write out/model.onnx and out/model.json (locked folder, refused when occupied unless `overwrite`); returns
    the metadata."""
    out = make_folder(Path(out))
    with folder_lock(out, "an export"):
        claim_output(out, ("model.onnx", "model.json"), overwrite, "export", (Path(checkpoint).parent,))
        return _export(checkpoint, out)


def _export(checkpoint: str | Path, out: Path) -> dict:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise CxrFastError(f"export needs onnx and onnxruntime ({', '.join(missing)} missing): pip install onnx "
                           "onnxruntime")
    model, info = load_model(checkpoint, "cpu")
    model = model.float().eval()
    data = info.config.data
    sample = parity_inputs(data)
    tmp = out / "model.onnx.tmp"
    try:
        with warnings.catch_warnings():  # the TorchScript-based exporter warns that it is the legacy one
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (sample[:2],), str(tmp), input_names=["image"], output_names=["logits"],
                              dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=OPSET,
                              dynamo=False)
        _sign(tmp, list(info.classes), Preprocessing.of(data).describe())
        difference = _parity(model, tmp, sample)
        if not difference <= TOLERANCE:
            raise CxrFastError(f"the ONNX model's probabilities differ from PyTorch's by {difference:.2e} (more "
                               f"than {TOLERANCE}); nothing was exported")
        os.replace(tmp, out / "model.onnx")
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION, "cxr_fast_version": __version__,
            "checkpoint": Path(checkpoint).name, "epoch": info.epoch, "model": info.config.model.name,
            "weights": info.weights, "classes": list(info.classes),
            "thresholds": None if info.thresholds is None else info.thresholds.tolist(),
            "operating_points": info.operating_points or {"max_f1": info.thresholds.tolist()},
            "validation": _validation_summary(info.val), "calibration": info.calibration,
            "sha256": sha256_file(out / "model.onnx"), "input": {"name": "image", "shape": ["batch", data.in_chans,
                                                                                 data.image_size, data.image_size],
                                                        "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", len(info.classes)], "activation": "sigmoid"},
            "preprocessing": Preprocessing.of(data).describe(),
            "opset": OPSET, "parity_max_abs_difference": difference, "parity_tolerance": TOLERANCE}
    atomic_json(out / "model.json", meta)
    log.info("exported %s (probabilities within %.1e of PyTorch)", out / "model.onnx", difference)
    return meta


def _validation_summary(val: dict | None) -> dict | None:
    """The validation the thresholds and operating points were chosen on: its epoch, images and AUROC."""
    if not val:
        return None
    return {key: val.get(key) for key in ("epoch", "val_images", "val_macro_auc", "val_auc", "val_loss")}


def _sign(path: Path, classes: list[str], preprocessing: dict) -> None:
    """Write the class names and preprocessing into the ONNX file's own metadata, so that the sha256 in model.json
    covers them: a model.json whose names were swapped or renamed no longer matches the model it describes."""
    import onnx

    model = onnx.load(str(path))
    for key, value in (("cxr_fast.classes", classes), ("cxr_fast.preprocessing", preprocessing)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(model, str(path))


def read_metadata(onnx_path: Path) -> dict:
    """model.json beside an exported model.onnx, checked against the model's bytes (sha256) and field by field:
    what a file says about itself is not trusted until it is checked, and an error names the file and the field."""
    path = onnx_path.with_name("model.json")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CxrFastError(f"{onnx_path} needs its {path.name} beside it (written by `cxr-fast export`): "
                           f"{error}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or \
            not isinstance(meta.get("format_version"), int) or meta["format_version"] > EXPORT_FORMAT_VERSION:
        raise CxrFastError(f"{path} is not a cxr-fast export of a version this cxr-fast reads")
    if meta.get("thresholds") is None:
        raise CxrFastError(f"{path} has no thresholds: export a checkpoint saved at an epoch end (best.pt)")
    if meta.get("sha256") != sha256_file(onnx_path):
        raise CxrFastError(f"{onnx_path} does not match the sha256 in {path.name}: the model file was changed or "
                           "damaged; export it again")
    _check_fields(meta, path)
    return meta


def _check_fields(meta: dict, path: Path) -> None:
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c for c in classes) or \
            len(set(classes)) != len(classes):
        raise CxrFastError(f"{path}: classes must be a list of distinct names, got {str(classes)[:120]}")
    check_thresholds(meta["thresholds"], len(classes), f"{path}: thresholds")
    points = meta.get("operating_points")
    if not isinstance(points, dict) or "max_f1" not in points:
        raise CxrFastError(f"{path}: operating_points must hold max_f1 (and sensitivity_90, specificity_90)")
    for name, values in points.items():
        check_thresholds(values, len(classes), f"{path}: operating_points.{name}")
    calibration = meta.get("calibration")
    if calibration is not None:
        for key in ("a", "b"):
            values = np.asarray(calibration.get(key) if isinstance(calibration, dict) else None, dtype=object)
            if values.shape != (len(classes),) or not all(isinstance(v, (int, float)) and np.isfinite(v)
                                                          for v in values):
                raise CxrFastError(f"{path}: calibration.{key} must be {len(classes)} finite numbers")
        if any(a <= 0 for a in calibration["a"]):
            raise CxrFastError(f"{path}: calibration.a must be > 0 (an increasing map)")
    pre = meta.get("preprocessing") or {}
    try:
        DataConfig(image_size=pre["image_size"], in_chans=pre["in_chans"], clahe_clip_limit=pre["clahe_clip_limit"],
                   clahe_tiles=pre["clahe_tiles"], fit=pre.get("fit", "squash"))
    except (KeyError, TypeError) as error:
        raise CxrFastError(f"{path}: preprocessing lacks {error}") from None
    except CxrFastError as error:
        raise CxrFastError(f"{path}: preprocessing: {error}") from None
