"""Checkpoints: atomic writes (temporary file, fsync, `os.replace`), so a crash never leaves a half-written file.

A checkpoint holds everything exact resume needs (model, optimizer, scheduler, scaler, EMA, position in the run,
RNG states) and everything the analysis needs (config, class names, decision thresholds chosen on validation).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from cxr_fast import constants as C
from cxr_fast.errors import CxrFastError


def save_checkpoint(payload: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CxrFastError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch.load raises many types for a damaged file; all mean the same to the user
        raise CxrFastError(f"cannot read checkpoint {path}: {type(error).__name__}: {error}") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise CxrFastError(f"{path} is not a cxr-fast checkpoint (no 'model' entry)")
    classes = payload.get("class_names")
    if classes is not None and list(classes) != list(C.CLASS_NAMES):
        raise CxrFastError(f"{path} was trained on other classes ({', '.join(classes)[:200]}); this version "
                           f"expects the 14 NIH findings in canonical order")
    return payload


def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
