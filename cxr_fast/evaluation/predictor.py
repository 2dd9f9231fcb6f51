"""`Predictor`: a trained model (a checkpoint, or an exported `model.onnx` with its checked `model.json`) with the
preprocessing it was validated with, for scoring new images from Python or the `predict` command.

    from cxr_fast import Predictor
    predictor = Predictor.load("outputs/run/checkpoints/best.pt")
    result = predictor.predict("chest.dcm")        # a path, a pydicom dataset or a numpy array of any size
    result.probabilities, result.calibrated, result.findings, result.no_finding_called, result.warnings

Inputs go through what the evaluation used: decode → gray (DICOM rendered as a viewer renders it) → resize
(INTER_AREA) → CLAHE → normalise. DICOM files that are not projection radiographs (CR, DX, DR, RG) are refused
unless `any_modality`; scanned films (OT, secondary capture) and a body part other than the chest are scored with a
warning, as is an image that uses little of the gray range. A tensor handed to `logits` that was not preprocessed
(wrong size or value range) is refused, not scored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cxr_fast.calibration import apply_calibration
from cxr_fast.config import DataConfig, PredictConfig
from cxr_fast.data.datasets.vocabulary import findings_of, no_finding_called
from cxr_fast.data.images.dicom import identifiers, render
from cxr_fast.data.images.source import gray_range_warning, read_gray, to_gray8
from cxr_fast.data.images.preprocess import Preprocessing
from cxr_fast.data.loaders.transforms import process_gray
from cxr_fast.errors import BadInput, CxrFastError
from cxr_fast.evaluation.export import read_metadata
from cxr_fast.training.checkpoint import load_model
from cxr_fast.training.engine import autocast, resolve_amp, resolve_device

RADIOGRAPHS = ("CR", "DX", "DR", "RG")  # projection radiography (DR is retired, still written)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # SOP classes of scanned films start with it
CHEST = ("CHEST", "THORAX", "LUNG", "")


@dataclass
class Prepared:
    """One input made ready for the model: the processed image, or the reason it cannot be scored."""

    image: np.ndarray | None  # uint8 at the model's side, after CLAHE
    gray: np.ndarray | None  # the source in 8-bit gray (for overlays)
    meta: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    error: str = ""


@dataclass
class Prediction:
    probabilities: dict[str, float]
    calibrated: dict[str, float] | None
    findings: list[str]  # the findings at or above the operating point's thresholds (never the No Finding state)
    no_finding_called: bool  # the No Finding output called where the model has one, else no finding called
    operating_point: str
    warnings: list[str]
    meta: dict


class Predictor:
    def __init__(self, model, data: DataConfig, classes: list[str], points: dict, calibration: dict | None,
                 config: PredictConfig):
        self.model, self.data, self.classes, self.calibration = model, data, classes, calibration
        self.preprocessing = Preprocessing.of(data)
        self.points = {name: np.asarray(values, dtype=np.float64) for name, values in points.items()}
        if config.operating_point not in self.points:
            raise CxrFastError(f"--operating-point {config.operating_point}: this model has "
                               f"{', '.join(self.points)}")
        self.config, self.device = config, model.device
        self.thresholds = self.points[config.operating_point]

    @classmethod
    def load(cls, path: str | Path, config: PredictConfig = PredictConfig()) -> "Predictor":
        """A checkpoint (.pt) or an exported model.onnx (its model.json beside it, checked)."""
        path = Path(path)
        if path.suffix == ".onnx":
            meta = read_metadata(path)
            pre = meta["preprocessing"]
            data = DataConfig(image_size=pre["image_size"], in_chans=pre["in_chans"],
                              clahe_clip_limit=pre["clahe_clip_limit"], clahe_tiles=pre["clahe_tiles"],
                              fit=pre.get("fit", "squash"))  # exports older than --fit squashed
            model = OnnxModel(path)
            model.check(meta, path)
            return cls(model, data, meta["classes"], meta["operating_points"], meta.get("calibration"), config)
        device = resolve_device(config.device)
        model, info = load_model(path, device)
        points = info.operating_points or {"max_f1": info.thresholds.tolist()}
        return cls(TorchModel(model, device, resolve_amp(info.config.amp, device)), info.config.data, info.classes,
                   points, info.calibration, config)

    # ------------------------------------------------------------------------------------------------ inputs
    def prepare(self, image) -> Prepared:
        """A path, a pydicom dataset or a numpy array → the model's input; a bad input is a Prepared with its
        error, never an exception (one bad file is one bad row)."""
        try:
            if isinstance(image, (str, Path)):
                source = read_gray(Path(image), self.config.max_pixels)
                gray, meta, warnings = source.gray, source.meta, list(source.warnings)
            elif isinstance(image, np.ndarray):
                if image.ndim < 2 or min(image.shape[:2]) < 2:
                    raise BadInput("array", f"an image array of shape {image.shape}: at least 2 x 2 pixels needed")
                gray, meta, warnings = to_gray8(image, "array"), {}, []
            elif hasattr(image, "PixelData"):  # a pydicom Dataset
                gray, meta, warnings = render(image, "dataset", self.config.max_pixels), identifiers(image), []
            else:
                raise BadInput("input", f"cannot score a {type(image).__name__}: give a path, a pydicom dataset or "
                                        "a numpy array")
            warnings += self._source_warnings(gray, meta)
        except BadInput as bad:
            return Prepared(None, None, {}, [], bad.reason)
        return Prepared(process_gray(gray, self.data), gray, meta, warnings)

    def _source_warnings(self, gray: np.ndarray, meta: dict) -> list[str]:
        """Refuses what is not a projection radiograph (unless any_modality); warns about scanned films, another body
        part and images that use little of the gray range."""
        warnings = []
        modality = meta.get("modality", "")
        scanned = modality == "OT" or meta.get("sop_class_uid", "").startswith(SECONDARY_CAPTURE)
        if modality and modality not in RADIOGRAPHS and not scanned and not self.config.any_modality:
            raise BadInput("input", f"modality {modality} is not a projection radiograph (CR, DX, DR, RG); "
                                    "--any-modality scores it anyway")
        if scanned:
            warnings.append(f"a secondary capture or scanned film (modality {modality or 'unknown'})")
        body = meta.get("body_part", "").upper()
        if body not in CHEST:
            warnings.append(f"body part {body}, not the chest")
        low = gray_range_warning(gray, self.config.min_gray_range)
        return warnings + ([low] if low else [])

    # ------------------------------------------------------------------------------------------------ scoring
    def tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        """Processed uint8 images → the normalised model input on the model's device."""
        batch = torch.from_numpy(np.stack(images)[:, None]).to(self.device)
        return self.preprocessing.normalize(batch)

    def probabilities(self, inputs: torch.Tensor) -> np.ndarray:
        """Sigmoid outputs (N, classes) of normalised inputs; an input that was not preprocessed is refused."""
        side, chans = self.data.image_size, self.data.in_chans
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != (chans, side, side) or not inputs.is_floating_point():
            raise CxrFastError(f"a model input must be a float tensor N x {chans} x {side} x {side} (preprocessed: "
                               f"Predictor.prepare), got {tuple(inputs.shape)} {inputs.dtype}")
        low, high = self.preprocessing.input_range()
        if not bool(torch.isfinite(inputs).all()):
            raise CxrFastError("model inputs hold NaN or infinite values: not a preprocessed image")
        if float(inputs.min()) < low or float(inputs.max()) > high:
            raise CxrFastError(f"model input values must lie in [{low:.3f}, {high:.3f}] (8-bit gray normalised); got "
                               f"[{float(inputs.min()):.3f}, {float(inputs.max()):.3f}]: not preprocessed")
        return 1.0 / (1.0 + np.exp(-self.model.logits(inputs).astype(np.float64)))

    def result(self, probs: np.ndarray, prepared: Prepared) -> Prediction:
        calibrated = apply_calibration(probs[None], self.calibration)[0] if self.calibration else None
        called = probs >= self.thresholds
        return Prediction(dict(zip(self.classes, map(float, probs))),
                          dict(zip(self.classes, map(float, calibrated))) if calibrated is not None else None,
                          [c for c, flag, finding in zip(self.classes, called, findings_of(self.classes))
                           if flag and finding],
                          bool(no_finding_called(self.classes, called[None])[0]),
                          self.config.operating_point, prepared.warnings, prepared.meta)

    def predict(self, image) -> Prediction:
        """One image; a bad input is a CxrFastError saying why."""
        return self.predict_batch([image], strict=True)[0]

    def predict_batch(self, images: list, strict: bool = False) -> list[Prediction | str]:
        """Many images in one forward pass; each result is a Prediction, or the error string of a bad input (an
        error with strict)."""
        prepared = [self.prepare(image) for image in images]
        bad = next((p.error for p in prepared if p.error), None)
        if strict and bad:
            raise CxrFastError(bad)
        good = [p for p in prepared if not p.error]
        probs = self.probabilities(self.tensor([p.image for p in good])) if good else np.zeros((0, len(self.classes)))
        scored = iter(probs)
        return [p.error if p.error else self.result(next(scored), p) for p in prepared]

    def embed(self, image) -> np.ndarray:
        """The pooled features the classifier head sees (before its last Linear), for one image."""
        prepared = self.prepare(image)
        if prepared.error:
            raise CxrFastError(prepared.error)
        return self.model.embed(self.tensor([prepared.image]))[0]


class TorchModel:
    def __init__(self, model: torch.nn.Module, device: torch.device, amp):
        self.module, self.device, self.amp = model, device, amp

    @torch.no_grad()
    def logits(self, inputs: torch.Tensor) -> np.ndarray:
        with autocast(self.device, self.amp):
            return self.module(inputs).float().cpu().numpy()

    @torch.no_grad()
    def embed(self, inputs: torch.Tensor) -> np.ndarray:
        features = self.module.forward_features(inputs)
        return self.module.forward_head(features, pre_logits=True).float().cpu().numpy()


class OnnxModel:
    """An exported model scored with ONNX Runtime (imported here, on purpose: only ONNX scoring needs it)."""

    def __init__(self, path: Path):
        try:
            import onnxruntime
        except ImportError:
            raise CxrFastError("scoring an ONNX model needs onnxruntime: pip install onnxruntime") from None
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # a protobuf or graph error: the file is not a usable ONNX model
            raise CxrFastError(f"{path} is not a usable ONNX model ({type(error).__name__}: "
                               f"{str(error).splitlines()[0][:200]})") from None
        self.device, self.module = torch.device("cpu"), None

    def check(self, meta: dict, path: Path) -> None:
        """model.json against the model itself: the input and output shapes, and the class names and preprocessing
        the export wrote into the model (covered by the sha256 model.json holds)."""
        pre = meta["preprocessing"]
        given = list(self.session.get_inputs()[0].shape[1:]), list(self.session.get_outputs()[0].shape[1:])
        said = [pre["in_chans"], pre["image_size"], pre["image_size"]], [len(meta["classes"])]
        if given != said:
            raise CxrFastError(f"{path.name} takes {given[0]} and gives {given[1]} outputs, but model.json says "
                               f"{said[0]} and {said[1][0]} classes: model.json does not describe this model")
        stored = self.session.get_modelmeta().custom_metadata_map
        for key, value in (("cxr_fast.classes", meta["classes"]), ("cxr_fast.preprocessing", pre)):
            if key in stored and json.loads(stored[key]) != value:
                raise CxrFastError(f"model.json's {key.split('.')[1]} are not those exported into {path.name} "
                                   f"({stored[key][:200]}): model.json was changed; export the checkpoint again")

    def logits(self, inputs: torch.Tensor) -> np.ndarray:
        return self.session.run(["logits"], {"image": inputs.contiguous().cpu().numpy()})[0]

    def embed(self, inputs: torch.Tensor) -> np.ndarray:
        raise CxrFastError("embeddings need the PyTorch checkpoint; an ONNX export holds only the logits")
