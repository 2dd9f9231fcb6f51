import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from cxr_fast.data.datasets import nih
from cxr_fast.metrics import (average_precision, best_f1_threshold, bootstrap_auc_intervals, confusion_stats,
                              per_class_report, roc_auc)


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_ap_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.2
    scores = np.round(rng.random(300) + y * 0.3, 2)  # rounding makes ties, which both must handle alike
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert average_precision(y, scores) == pytest.approx(average_precision_score(y, scores), abs=1e-12)


def test_confusion_stats_equal_sklearn():
    rng = np.random.default_rng(1)
    y, scores = rng.random(200) < 0.3, rng.random(200)
    stats = confusion_stats(y, scores, 0.4)
    pred = scores >= 0.4
    assert stats["precision"] == pytest.approx(precision_score(y, pred))
    assert stats["recall"] == pytest.approx(recall_score(y, pred))
    assert stats["f1"] == pytest.approx(f1_score(y, pred))
    assert stats["specificity"] == pytest.approx(recall_score(~y, ~pred))


def test_best_f1_threshold_is_the_argmax_over_thresholds():
    rng = np.random.default_rng(2)
    y, scores = rng.random(150) < 0.25, rng.random(150)
    threshold = best_f1_threshold(y, scores)
    best = max(f1_score(y, scores >= t) for t in np.unique(scores))
    assert f1_score(y, scores >= threshold) == pytest.approx(best)


def test_undefined_class_is_reported_not_a_crash():
    rng = np.random.default_rng(3)
    y = (rng.random((50, 14)) < 0.3).astype(float)
    y[:, nih.CLASSES.index("Hernia")] = 0
    report = per_class_report(y, rng.random((50, 14)), np.full(14, 0.5), list(nih.CLASSES), groups=np.arange(50) // 2, n_boot=50)
    hernia = report["classes"]["Hernia"]
    assert np.isnan(hernia["auroc"]) and "no positive images" in hernia["undefined"]
    assert len(report["classes"]) == 14 and np.isfinite(report["macro"]["auroc"])


def test_bootstrap_resamples_patients():
    rng = np.random.default_rng(4)
    y = (rng.random((400, 2)) < 0.3).astype(float)
    probs = np.clip(y * 0.4 + rng.random((400, 2)) * 0.7, 0, 1)
    intervals = bootstrap_auc_intervals(y, probs, np.arange(400) // 4, n_boot=200)
    for c in range(2):
        assert intervals[c, 0] < roc_auc(y[:, c], probs[:, c]) < intervals[c, 1]
    # A patient's images are one unit: with 4 identical images per patient the interval matches 100 independent
    # patients, and is wider than pretending the 400 images were independent.
    y_dup, p_dup = np.repeat(y[:100], 4, axis=0), np.repeat(probs[:100], 4, axis=0)
    by_patient = bootstrap_auc_intervals(y_dup, p_dup, np.arange(400) // 4, n_boot=300)
    by_image = bootstrap_auc_intervals(y_dup, p_dup, np.arange(400), n_boot=300)
    assert (by_patient[:, 1] - by_patient[:, 0] > by_image[:, 1] - by_image[:, 0]).all()
