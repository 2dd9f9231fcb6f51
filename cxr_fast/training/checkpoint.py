"""The checkpoint: its schema, written and read side by side, and the one way to get a trained model (`load_model`).

A checkpoint is a `torch.save` file of tensors and plain data only (dict, list, tuple, str, int, float, bool,
None), so it is read with `weights_only=True`: opening a file someone shared cannot run code it carries. It holds

  format, format_version, cxr_fast_version, class_names, config (the resolved RunConfig as a dict)
  model, ema                      state dicts (ema: None unless the run kept an EMA)
  optimizer, scheduler, scaler    state dicts, for exact resume
  epoch, step, batch_in_epoch, history, best_auc, rng (per rank)   the position in the run
  thresholds, val                 per-class F1-optimal thresholds and the record of the validation they came from
  side_schedule                   the training side of each epoch (progressive resolution; the config decides it)
  operating_points                per-class thresholds for max F1, sensitivity >= 0.90 and specificity >= 0.90
  calibration                     per-class Platt parameters fitted on that validation (None before the first one)
  checksum                        sha256 over everything else, verified on load: a damaged file is refused

Writes are atomic (temporary file, fsync, `os.replace`). Format 1 (cxr-fast 0.1, numpy RNG state, no checksum) is
still read: its numpy arrays are allowed as data, and it is converted in memory.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxr_fast import __version__
from cxr_fast.data.datasets import nih
from cxr_fast.config import RunConfig, from_dict, to_dict
from cxr_fast.errors import CxrFastError
from cxr_fast.training.engine import unwrap
from cxr_fast.training.model import create_model
from cxr_fast.training.resolution import side_schedule

CHECKPOINT_FORMAT = "cxr_fast.checkpoint"
CHECKPOINT_FORMAT_VERSION = 2
_PLAIN = (str, int, float, bool, type(None))


# ------------------------------------------------------------------------------------------------------- writing
def _digest(value, h, where: str = "checkpoint") -> None:
    """Feed a canonical serialisation of `value` to `h`; anything but tensors and plain data is an error."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{tensor.dtype}{tuple(value.shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            h.update(repr(key).encode())
            _digest(value[key], h, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for i, item in enumerate(value):
            _digest(item, h, f"{where}[{i}]")
    elif isinstance(value, _PLAIN):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"{where} is a {type(value).__name__}: a checkpoint holds tensors and plain data only")


def checksum(payload: dict) -> str:
    h = hashlib.sha256()
    _digest({k: v for k, v in payload.items() if k != "checksum"}, h)
    return h.hexdigest()


def save_checkpoint(payload: dict, path: str | Path) -> None:
    """Stamp format, version and checksum, then write atomically. Raises TypeError for non-plain content."""
    path = Path(path)
    payload = dict(payload, format=CHECKPOINT_FORMAT, format_version=CHECKPOINT_FORMAT_VERSION,
                   cxr_fast_version=__version__)
    payload["checksum"] = checksum(payload)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CxrFastError(f"cannot write checkpoint {path}: {error.strerror or error}") from None


# ------------------------------------------------------------------------------------------------------- reading
def _numpy_globals() -> list:
    """What a pickled numpy array needs (format 1 stored numpy's RNG state): data constructors, no code."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_checkpoint(path: str | Path) -> dict:
    """The payload of a cxr-fast checkpoint, checked: safe to open, undamaged, of this version's classes."""
    path = Path(path)
    if not path.is_file():
        raise CxrFastError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        foreign = re.search(r"GLOBAL ([\w.]+)", str(error))
        if foreign is None:
            raise CxrFastError(f"cannot read checkpoint {path}: damaged or not a checkpoint") from None
        raise CxrFastError(
            f"{path} holds objects other than tensors and plain data (it refers to {foreign.group(1)}); cxr-fast "
            "does not open it, because loading such a file can run code it carries. If it is a model you trust from "
            "another tool, load it there and save its state_dict.") from None
    except Exception as error:  # torch.load raises many types for a damaged file; all mean the same to the user
        raise CxrFastError(f"cannot read checkpoint {path}: damaged or not a checkpoint "
                           f"({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CxrFastError(f"{path} is not a cxr-fast checkpoint (no 'model' entry)")
    version = payload.get("format_version", 1)
    if not isinstance(version, int) or version > CHECKPOINT_FORMAT_VERSION:
        raise CxrFastError(f"{path} has checkpoint format {version}; this cxr-fast reads up to {CHECKPOINT_FORMAT_VERSION}: "
                           "upgrade cxr-fast")
    if version >= 2:
        try:
            intact = payload.get("checksum") == checksum(payload)
        except TypeError:
            intact = False
        if not intact:
            raise CxrFastError(f"{path} is damaged: its content does not match its checksum. Use the other "
                               "checkpoint of the run (best.pt / last.pt) or an earlier copy")
    else:
        payload = _from_format_1(payload)
    classes = payload.setdefault("class_names", list(nih.CLASSES))  # checkpoints older than class names: NIH's
    if not isinstance(classes, list) or not classes or len(set(classes)) != len(classes) or \
            not all(isinstance(c, str) and c for c in classes):
        raise CxrFastError(f"{path}: class_names must be a list of distinct names, got {str(classes)[:200]}")
    return payload


def _from_format_1(payload: dict) -> dict:
    rng = payload.get("rng")
    if rng is not None:
        payload["rng"] = [_rng_from_numpy(r) for r in rng] if isinstance(rng, list) else _rng_from_numpy(rng)
    payload.setdefault("calibration", None)
    return payload


def _rng_from_numpy(states: dict) -> dict:
    if isinstance(states.get("numpy"), tuple):
        name, keys, pos, has_gauss, cached = states["numpy"]
        states = dict(states, numpy={"name": name, "keys": torch.from_numpy(np.asarray(keys, np.int64)), "pos": pos,
                                     "has_gauss": has_gauss, "cached_gaussian": cached})
    return states


# -------------------------------------------------------------------------------------------------- RNG states
def rng_states() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def stored_config(payload: dict, path: str | Path) -> RunConfig:
    """The RunConfig a checkpoint holds; a bad stored value is an error naming the checkpoint and the field."""
    try:
        stored = payload["config"]
        if isinstance(stored.get("data"), dict) and "fit" not in stored["data"]:  # from before --fit: squashed
            stored = {**stored, "data": {**stored["data"], "fit": "squash"}}
        return from_dict(RunConfig, stored, where="config")
    except CxrFastError as error:
        field = re.sub(r" \(--[a-z-]+\)", "", str(error))  # the field, not a flag the user never gave
        raise CxrFastError(f"{path}: its stored config is not valid: {field}; the checkpoint is damaged or was "
                           "edited") from None
    except (KeyError, TypeError, AttributeError):
        raise CxrFastError(f"{path}: no readable stored config; the checkpoint is damaged or was edited") from None


def check_thresholds(thresholds, classes: int, where: str) -> None:
    """One finite threshold in [0, 1] per class, or an error naming where they came from."""
    values = np.asarray(thresholds, dtype=np.float64) if isinstance(thresholds, (list, tuple)) else None
    if values is None or values.shape != (classes,) or not np.all(np.isfinite(values)) or \
            np.any((values < 0) | (values > 1)):
        raise CxrFastError(f"{where}: thresholds must be {classes} finite numbers in [0, 1], got "
                           f"{str(thresholds)[:120]}")


# ------------------------------------------------------------------------------------------------ trained model
@dataclass(frozen=True)
class ModelInfo:
    """What scoring with a trained model needs besides its weights."""

    path: Path
    config: RunConfig
    classes: list[str]
    thresholds: np.ndarray | None  # per class, F1-optimal on validation; None before the first validation
    calibration: dict | None  # {"method": "platt", "a": [14], "b": [14]} (calibration.py), fitted on validation
    operating_points: dict | None  # {"max_f1" | "sensitivity_90" | "specificity_90": [14 thresholds]}
    epoch: int
    val: dict | None
    weights: str  # "ema" or "model": which state the thresholds were chosen with


def load_model(path: str | Path, device: torch.device | str = "cpu", need_thresholds: bool = True):
    """(model in eval mode on `device`, ModelInfo) from a checkpoint. The EMA weights are used where the run kept
    them, since validation (and so the thresholds) used them."""
    payload = load_checkpoint(path)
    if need_thresholds and payload.get("thresholds") is None:
        raise CxrFastError(f"{path} has no validation thresholds (saved before the first validation); use best.pt "
                           "or a last.pt written at an epoch end")
    if payload.get("thresholds") is not None:
        check_thresholds(payload["thresholds"], len(payload["class_names"]), f"{path}")
    config = stored_config(payload, path)
    model = create_model(config.model, config.data.in_chans, len(payload["class_names"]), pretrained=False)
    weights = "ema" if payload.get("ema") is not None else "model"
    try:
        model.load_state_dict(payload[weights])
    except RuntimeError as error:
        raise CxrFastError(f"{path}: the weights do not fit {config.model.name}: {str(error)[:300]}") from None
    thresholds = payload.get("thresholds")
    info = ModelInfo(Path(path), config, list(payload["class_names"]),
                     None if thresholds is None else np.asarray(thresholds, dtype=np.float64),
                     payload.get("calibration"), payload.get("operating_points"), int(payload.get("epoch", 0)),
                     payload.get("val"), weights)
    return model.to(device).eval(), info


# ------------------------------------------------------------------------------------------------- a run's state
def training_payload(state, config: RunConfig, rng: list | dict, best_auc: float, chosen: dict | None = None,
                     val: dict | None = None) -> dict:
    """The checkpoint of a run at a step boundary (`state` is the engine's TrainState). `chosen` holds what the
    latest validation chose: thresholds (max-F1), operating_points and calibration."""
    chosen = chosen or {}
    return {"model": unwrap(state.model).state_dict(), "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
            "ema": state.ema.module.state_dict() if state.ema is not None else None, "epoch": state.epoch,
            "step": state.step, "batch_in_epoch": state.batch_in_epoch, "history": dict(state.history), "rng": rng,
            "config": to_dict(config), "class_names": list(state.classes), "best_auc": float(best_auc),
            "thresholds": chosen.get("thresholds"), "operating_points": chosen.get("operating_points"),
            "calibration": chosen.get("calibration"), "val": val,
            "side_schedule": side_schedule(config.data.image_size, config.optim.epochs, config.optim.progressive,
                                           config.optim.progressive_final_epochs)}


def chosen_on_validation(payload: dict) -> dict | None:
    """What a checkpoint's validation chose (see training_payload), or None before the first one."""
    if payload.get("thresholds") is None:
        return None
    return {key: payload.get(key) for key in ("thresholds", "operating_points", "calibration")}


def restore_training(payload: dict, state, rank: int) -> float:
    """Put a resumed run's optimizer, scheduler, scaler, EMA, position and this rank's RNG back; returns best_auc.
    The model's weights are loaded before it is wrapped (DDP, compile), by the caller."""
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    state.scaler.load_state_dict(payload["scaler"])
    if state.ema is not None and payload.get("ema") is not None:
        state.ema.module.load_state_dict(payload["ema"])
    state.epoch, state.step, state.batch_in_epoch = payload["epoch"], payload["step"], payload["batch_in_epoch"]
    state.history = dict(payload["history"])
    rng = payload["rng"]
    restore_rng_states(rng[rank] if isinstance(rng, list) else rng)
    return float(payload.get("best_auc", -1.0))


class CheckpointSaver:
    """A run's checkpoint files: `<run>/checkpoints/last.pt` (every epoch end and every stop) and `best.pt` (the
    epoch with the best validation macro AUROC so far)."""

    def __init__(self, run_dir: str | Path):
        self.folder = Path(run_dir) / "checkpoints"
        self.last, self.best = self.folder / "last.pt", self.folder / "best.pt"

    def save(self, payload: dict, best: bool = False) -> None:
        save_checkpoint(payload, self.last)
        if best:  # the same bytes: a hard link (last.pt is replaced, never rewritten in place), else a copy
            tmp = self.best.with_name(self.best.name + ".tmp")
            try:
                tmp.unlink(missing_ok=True)
                try:
                    os.link(self.last, tmp)
                except OSError:  # a file system without hard links
                    shutil.copyfile(self.last, tmp)
                os.replace(tmp, self.best)
            except OSError as error:
                tmp.unlink(missing_ok=True)
                raise CxrFastError(f"cannot write checkpoint {self.best}: {error.strerror or error}") from None

    def load_last(self) -> dict:
        if not self.last.exists():
            raise CxrFastError(f"--resume: no {self.last}; start without --resume")
        return load_checkpoint(self.last)
