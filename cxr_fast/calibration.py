"""Probability calibration in pure numpy: per-class Platt scaling fitted on validation, and the expected calibration
error (ECE) that shows whether it helped.

Why Platt scaling (p' = sigmoid(a * logit + b), a > 0) and not a temperature (b = 0): the training loss weights each
class by its inverse prevalence and focal loss down-weights confident predictions, and both move the logits by an
offset as well as a scale (a rare class gets inflated probabilities). A temperature can only rescale; the offset
needs b. With a > 0 the map is increasing, so AUROC and every operating point are unchanged: a threshold on the
uncalibrated probability is the same decision as its image on the calibrated one.
"""

from __future__ import annotations

import numpy as np

from cxr_fast.metrics import stated

ECE_BINS = 15


def logit(probs: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fit_platt(y: np.ndarray, logits: np.ndarray, ridge: float = 1e-3, iterations: int = 50) -> tuple[float, float]:
    """(a, b) minimising the log loss of sigmoid(a * logit + b) on these labels, by Newton's method, with a small
    ridge towards the identity (a = 1, b = 0) so a separable or tiny class stays finite. Identity when the labels
    hold one class only (or none is stated)."""
    y, x = stated(y, logits)
    y, x = y.astype(np.float64), np.asarray(x, dtype=np.float64)
    if len(y) == 0 or y.min() == y.max():
        return 1.0, 0.0
    a, b = 1.0, 0.0
    for _ in range(iterations):
        p = _sigmoid(a * x + b)
        w = p * (1 - p)
        gradient = np.array([np.sum((p - y) * x) + ridge * (a - 1), np.sum(p - y) + ridge * b])
        hessian = np.array([[np.sum(w * x * x) + ridge, np.sum(w * x)], [np.sum(w * x), np.sum(w) + ridge]])
        step = np.linalg.solve(hessian, gradient)
        a, b = a - step[0], b - step[1]
        if np.abs(step).max() < 1e-8:
            break
    return (float(a), float(b)) if a > 0 else (1.0, 0.0)  # a decreasing map would reorder the images


def fit_calibration(y: np.ndarray, probs: np.ndarray, names: list[str]) -> dict:
    """Per-class Platt parameters from validation labels and (uncalibrated) probabilities, for the classes `names`:
    the checkpoint's `calibration` entry."""
    params = [fit_platt(y[:, c], logit(probs[:, c])) for c in range(y.shape[1])]
    return {"method": "platt", "a": [p[0] for p in params], "b": [p[1] for p in params],
            "fitted_on": "validation", "classes": list(names)}


def apply_calibration(probs: np.ndarray, calibration: dict | None) -> np.ndarray:
    """Calibrated probabilities (images, classes); the input unchanged when there is no calibration."""
    if not calibration:
        return np.asarray(probs, dtype=np.float64)
    a, b = np.asarray(calibration["a"])[None, :], np.asarray(calibration["b"])[None, :]
    return _sigmoid(a * logit(probs) + b)


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of one class: the image-weighted mean over equal-width probability bins of |positive rate - mean
    probability|, over the images where the label is stated. nan for an empty set."""
    y, p = stated(y, probs)
    y, p = y.astype(np.float64), np.asarray(p, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    index = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    positives = np.bincount(index, weights=y, minlength=bins)
    confidence = np.bincount(index, weights=p, minlength=bins)
    used = counts > 0
    return float(np.sum(np.abs(positives[used] - confidence[used])) / len(y))


def reliability(y: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> dict:
    """Per bin: images, mean probability and positive rate (the points of a reliability diagram), over the images
    where the label is stated."""
    y, p = stated(y, probs)
    y, p = y.astype(np.float64), np.asarray(p, dtype=np.float64)
    index = np.minimum((p * bins).astype(int), bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"images": counts.tolist(),
                "mean_probability": (np.bincount(index, weights=p, minlength=bins) / counts).tolist(),
                "positive_rate": (np.bincount(index, weights=y, minlength=bins) / counts).tolist()}
