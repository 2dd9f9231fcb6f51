"""Per-class metrics in pure numpy: AUROC, average precision, F1/precision/recall/specificity at thresholds chosen on
validation, macro and micro means, and bootstrap intervals for AUROC that resample patients (images of one patient
are correlated, so resampling images would make the intervals too narrow).

Labels are 1, 0 or NaN (not stated: an uncertain label under `ignore`, a blank one under `--blank masked`, a class
the image's data set lacks). Every per-class number uses the images where that class is stated; with every label
stated it is the number over all images. A class without positives (or without negatives) has no AUROC: it is
reported as undefined with the reason.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm



def stated(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The labels (as bool) and scores of the images where the label is stated."""
    y = np.asarray(y, dtype=np.float64)
    keep = ~np.isnan(y)
    return y[keep].astype(bool), np.asarray(scores)[keep]


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    boundaries = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1, len(values)]
    ranks = np.empty(len(values))
    for start, stop in zip(boundaries[:-1], boundaries[1:]):
        ranks[order[start:stop]] = (start + stop + 1) / 2.0
    return ranks


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); nan when only one class is present."""
    y, scores = stated(y, scores)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _cumulative_counts(y: np.ndarray, scores: np.ndarray):
    """Descending distinct thresholds with true and false positives at each (prediction: score >= threshold)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, t = np.asarray(scores, dtype=np.float64)[order], np.asarray(y, dtype=bool)[order]
    last_of_each = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(t)[last_of_each]
    fps = last_of_each + 1 - tps
    return s[last_of_each], tps, fps


def roc_curve(y: np.ndarray, scores: np.ndarray):
    y, scores = stated(y, scores)
    thresholds, tps, fps = _cumulative_counts(y, scores)
    return np.r_[0, fps / max(fps[-1], 1)], np.r_[0, tps / max(tps[-1], 1)], np.r_[np.inf, thresholds]


def precision_recall_curve(y: np.ndarray, scores: np.ndarray):
    y, scores = stated(y, scores)
    thresholds, tps, fps = _cumulative_counts(y, scores)
    return tps / (tps + fps), tps / max(tps[-1], 1), thresholds


def average_precision(y: np.ndarray, scores: np.ndarray) -> float:
    """Sum over thresholds of (R_k - R_{k-1}) * P_k, as scikit-learn defines it; nan without positives."""
    y, scores = stated(y, scores)
    if not y.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(y, scores)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_f1_threshold(y: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold that maximises F1 on these labels (meant for validation data); 0.5 without positives."""
    y, scores = stated(y, scores)
    if not y.any():
        return 0.5
    thresholds, tps, fps = _cumulative_counts(y, scores)
    f1 = 2 * tps / (2 * tps + fps + (y.sum() - tps))
    return float(thresholds[int(np.argmax(f1))])


def confusion_stats(y: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    y, scores = stated(y, scores)
    pred = scores >= threshold
    tp, fp = int((pred & y).sum()), int((pred & ~y).sum())
    fn, tn = int((~pred & y).sum()), int((~pred & ~y).sum())

    def ratio(a, b):
        return a / b if b else float("nan")

    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall,
            "specificity": ratio(tn, tn + fp), "npv": ratio(tn, tn + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}


def threshold_for_sensitivity(y: np.ndarray, scores: np.ndarray, target: float = 0.9) -> float:
    """The highest threshold whose sensitivity on these labels is at least `target` (so the most specific such
    operating point); 0.5 without positives."""
    y, scores = stated(y, scores)
    if not y.any():
        return 0.5
    thresholds, tps, _fps = _cumulative_counts(y, scores)
    return float(thresholds[int(np.argmax(tps / y.sum() >= target - 1e-12))])


def threshold_for_specificity(y: np.ndarray, scores: np.ndarray, target: float = 0.9) -> float:
    """The lowest threshold whose specificity on these labels is at least `target` (so the most sensitive such
    operating point); just above the top score when none reaches it, 0.5 without negatives."""
    y, scores = stated(y, scores)
    if y.all():
        return 0.5
    thresholds, _tps, fps = _cumulative_counts(y, scores)
    meets = np.flatnonzero(1 - fps / (~y).sum() >= target - 1e-12)
    return float(thresholds[meets[-1]]) if len(meets) else float(np.nextafter(thresholds[0], np.inf))


OPERATING_POINTS = {"max_f1": best_f1_threshold, "sensitivity_90": threshold_for_sensitivity,
                    "specificity_90": threshold_for_specificity}


def operating_points(y: np.ndarray, probs: np.ndarray) -> dict[str, list[float]]:
    """Per operating point, the per-class thresholds chosen on these labels (meant for validation data)."""
    return {name: [choose(y[:, c], probs[:, c]) for c in range(y.shape[1])] for name, choose in
            OPERATING_POINTS.items()}


def bootstrap_auc_intervals(y: np.ndarray, probs: np.ndarray, groups: np.ndarray, n_boot: int = 500,
                            seed: int = 0, level: float = 0.95) -> np.ndarray:
    """(classes, 2) percentile intervals of AUROC over bootstrap resamples of the groups (patients)."""
    rng = np.random.default_rng(seed)
    _, group_index = np.unique(groups, return_inverse=True)
    members = np.split(np.argsort(group_index, kind="mergesort"), np.cumsum(np.bincount(group_index))[:-1])
    samples = np.full((n_boot, y.shape[1]), np.nan)
    for b in tqdm(range(n_boot), desc="bootstrap", unit="resample", leave=False, disable=n_boot < 50):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        for c in range(y.shape[1]):
            samples[b, c] = roc_auc(y[rows, c], probs[rows, c])
    alpha = (1 - level) / 2
    with np.errstate(all="ignore"):
        out = np.full((y.shape[1], 2), np.nan)
        for c in range(y.shape[1]):
            finite = samples[:, c][np.isfinite(samples[:, c])]
            if len(finite) >= n_boot // 2:
                out[c] = np.quantile(finite, [alpha, 1 - alpha])
    return out


def macro_auc(y: np.ndarray, probs: np.ndarray) -> tuple[float, list[float]]:
    """Mean AUROC over the classes where it is defined, and the per-class values."""
    per_class = [roc_auc(y[:, c], probs[:, c]) for c in range(y.shape[1])]
    defined = [a for a in per_class if np.isfinite(a)]
    return (float(np.mean(defined)) if defined else float("nan")), per_class


def per_class_report(y: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, names: list[str],
                     groups: np.ndarray | None = None, n_boot: int = 500) -> dict:
    """Everything `analyze` reports, per class (`names`) and averaged. y, probs: (images, classes); thresholds:
    (classes,). `images` per class is where it is stated; the report's `images`, all of them."""
    intervals = bootstrap_auc_intervals(y, probs, groups, n_boot) if groups is not None and n_boot else None
    classes = {}
    for c, name in enumerate(names):
        labelled = int((~np.isnan(y[:, c])).sum())
        positives = int(np.nansum(y[:, c]))
        entry = {"support": positives, "images": labelled,
                 "prevalence": positives / labelled if labelled else float("nan"),
                 "threshold": float(thresholds[c]), "auroc": roc_auc(y[:, c], probs[:, c]),
                 "average_precision": average_precision(y[:, c], probs[:, c])}
        entry |= confusion_stats(y[:, c], probs[:, c], thresholds[c])
        if labelled == 0:
            entry["undefined"] = "not stated for any image in this split: no metric is defined"
        elif positives == 0:
            entry["undefined"] = "no positive images in this split: AUROC, AP and recall are undefined"
        elif positives == labelled:
            entry["undefined"] = "no negative images in this split: AUROC is undefined"
        if intervals is not None:
            entry["auroc_ci95"] = intervals[c].tolist()
        classes[name] = entry

    def mean_of(key):
        values = [v[key] for v in classes.values() if np.isfinite(v[key])]
        return float(np.mean(values)) if values else float("nan")

    pred = probs >= thresholds[None, :]
    micro = confusion_stats(y.ravel(), pred.ravel().astype(float), 0.5)
    return {
        "classes": classes,
        "macro": {k: mean_of(k) for k in ("auroc", "average_precision", "f1", "precision", "recall", "specificity")},
        "micro": {"auroc": roc_auc(y.ravel(), probs.ravel()), "average_precision": average_precision(y.ravel(),
                                                                                                   probs.ravel()),
                  "f1": micro["f1"], "precision": micro["precision"], "recall": micro["recall"]},
        "images": int(len(y)),
    }
