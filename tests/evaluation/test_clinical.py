"""Clinical evaluation, each number against an independent recomputation: metadata in the shards against the
table, Platt scaling against scikit-learn, ECE by hand, operating points at the stored thresholds, and the subgroup
audit against scikit-learn's AUROC on the subgroup's rows; on synthetic shards and on the real sample."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from conftest import REAL_TABLE
from cxr_fast.data.datasets import nih
from cxr_fast import constants as C
from cxr_fast.calibration import apply_calibration, expected_calibration_error, fit_calibration, fit_platt, logit
from cxr_fast.data.datasets.labels import age_band
from cxr_fast.data.datasets.nih import read_label_table
from cxr_fast.data.shards.manifest import load_manifest, split_shards
from cxr_fast.data.shards.tars import walk_tar
from cxr_fast.config import AnalyzeConfig
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluation.analyze import run_analysis
from cxr_fast.evaluation.clinical import subgroup_audit
from cxr_fast.metrics import confusion_stats


def _samples(shards, split):
    rows = {}
    for tar in split_shards(shards, split):
        for _key, sample in walk_tar(tar):
            meta = json.loads(sample["json"])
            rows[meta["image_index"]] = meta
    return rows


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_samples_and_manifest_carry_the_demographics(which, synth_dir, synth_shards, request):
    shards = synth_shards if which == "synthetic" else request.getfixturevalue("real_shards")
    table = read_label_table(synth_dir / "Data_Entry_2017.csv" if which == "synthetic" else REAL_TABLE)
    table = table.set_index("Image Index")
    manifest = load_manifest(shards)
    for split in C.SPLITS:
        samples = _samples(shards, split)
        for name, meta in samples.items():
            row = table.loc[name]
            assert meta["sex"] == row["Patient Gender"] and meta["view"] == row["View Position"]
            assert meta["age"] == int(str(row["Patient Age"]).rstrip("Y")) and meta["follow_up"] == row["Follow-up #"]
        people = pd.DataFrame(samples.values())
        summary = manifest["splits"][split]["demographics"]
        assert all(summary["sex"][sex] == (people["sex"] == sex).sum() for sex in C.SEXES)
        bands = people["age"].map(age_band).value_counts()
        assert all(summary["age_band"][b] == bands.get(b, 0) for b in C.AGE_BANDS)
        assert summary["view"]["PA"] == (people["view"] == "PA").sum()
        assert summary["age_median"] == pytest.approx(people["age"].median())


def test_older_shards_are_told_to_reshard(synth_shards, tmp_path):
    manifest = json.loads((synth_shards / "manifest.json").read_text())
    manifest["format_version"] = 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CxrFastError, match="shard format 1.*re-run `cxr-fast shard`"):
        load_manifest(tmp_path)


def test_platt_scaling_matches_scikit_learn_and_keeps_the_ranking():
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.1
    raw = 1 / (1 + np.exp(-(3.0 * y - 1.0 + rng.normal(0, 1.2, 2000))))  # over-confident and shifted
    a, b = fit_platt(y, logit(raw), ridge=0.0)
    reference = LogisticRegression(C=1e9, tol=1e-10, max_iter=1000).fit(logit(raw)[:, None], y)
    assert a == pytest.approx(reference.coef_[0, 0], rel=1e-4) and b == pytest.approx(reference.intercept_[0],
                                                                                       abs=1e-4)
    calibration = fit_calibration(np.stack([y] * 14, axis=1), np.stack([raw] * 14, axis=1), list(nih.CLASSES))
    calibrated = apply_calibration(np.stack([raw] * 14, axis=1), calibration)[:, 0]
    assert roc_auc_score(y, calibrated) == pytest.approx(roc_auc_score(y, raw))
    assert expected_calibration_error(y, calibrated) < expected_calibration_error(y, raw)


def _ece_by_hand(y, p, bins=15):
    total = 0.0
    for i in range(bins):
        low, high = i / bins, (i + 1) / bins
        inside = (p >= low) & ((p < high) if i < bins - 1 else (p <= high))
        if inside.any():
            total += inside.sum() / len(p) * abs(y[inside].mean() - p[inside].mean())
    return total


def test_ece_matches_a_hand_count():
    rng = np.random.default_rng(1)
    p = rng.random(500)
    y = rng.random(500) < p ** 2
    assert expected_calibration_error(y, p) == pytest.approx(_ece_by_hand(y, p))


def _truth(shards, split, image_index):
    samples = _samples(shards, split)
    return np.array([samples[name]["labels"] for name in image_index]), pd.DataFrame(
        [samples[name] for name in image_index])


@pytest.mark.parametrize("which", ["synthetic", "real"])
def test_analysis_numbers_recomputed_independently(which, tiny_run, synth_shards, tmp_path, request):
    shards = synth_shards if which == "synthetic" else request.getfixturevalue("real_shards")
    metrics = run_analysis(tiny_run / "checkpoints/best.pt", shards, tmp_path / "a", AnalyzeConfig(top_k=0,
                                                                                                   bootstrap=20))
    predictions = pd.read_csv(tmp_path / "a/predictions.csv")
    y, people = _truth(shards, "test", predictions["image_index"])
    probs = predictions[[f"prob_{c}" for c in nih.CLASSES]].to_numpy()
    calibrated = predictions[[f"calibrated_{c}" for c in nih.CLASSES]].to_numpy()
    from cxr_fast.training.checkpoint import load_model

    _model, info = load_model(tiny_run / "checkpoints/best.pt")
    np.testing.assert_allclose(calibrated, apply_calibration(probs, info.calibration), atol=1e-6)
    for c, name in enumerate(nih.CLASSES):
        entry = metrics["calibration"][name]
        assert entry["ece_uncalibrated"] == pytest.approx(_ece_by_hand(y[:, c], probs[:, c]), abs=1e-6)
        assert entry["ece"] == pytest.approx(_ece_by_hand(y[:, c], calibrated[:, c]), abs=1e-6)
        for point, thresholds in info.operating_points.items():
            stats, expected = metrics["operating_points"][name][point], confusion_stats(y[:, c], probs[:, c],
                                                                                        thresholds[c])
            called = probs[:, c] >= thresholds[c]
            if y[:, c].any():
                assert stats["sensitivity"] == pytest.approx((called & (y[:, c] == 1)).sum() / y[:, c].sum())
            assert stats["specificity"] == pytest.approx(expected["specificity"], nan_ok=True)
            assert stats["threshold"] == thresholds[c]
    for attr, column in (("sex", people["sex"]), ("view", people["view"]), ("age", people["age"].map(age_band))):
        for group, entry in metrics["subgroups"][attr].items():
            rows = (column == group).to_numpy()
            assert entry["images"] == rows.sum() and entry["patients"] == people.loc[rows, "patient_id"].nunique()
            if not rows.any():
                continue
            for c, name in enumerate(nih.CLASSES):
                yc = y[rows, c]
                expected = roc_auc_score(yc, probs[rows, c]) if 0 < yc.sum() < len(yc) else None
                if expected is None:
                    assert entry["auroc"][name] is None
                else:
                    assert entry["auroc"][name] == pytest.approx(expected, abs=1e-9)
                called = probs[rows, c] >= info.thresholds[c]
                if yc.any():
                    assert entry["tpr"][name] == pytest.approx(called[yc == 1].mean())
            ill = y[rows].any(axis=1)
            missed = ~(probs[rows][ill] >= info.thresholds).any(axis=1)
            assert entry["underdiagnosis"] == (pytest.approx(missed.mean()) if ill.any() else None)
    report = (tmp_path / "a/report.md").read_text()
    for section in ("## Data and partitions (CLAIM summary)", "## Calibration", "## Operating points",
                    "## Subgroup audit", "curves/reliability.png", "curves/subgroups.png"):
        assert section in report
    assert (tmp_path / "a/curves/reliability.png").exists() and (tmp_path / "a/curves/subgroups.png").exists()


def test_underdiagnosis_is_the_no_finding_output_on_images_with_a_finding_where_the_model_has_one():
    """Seyyed-Kalantari et al. 2021: among images with at least one finding, the share called "no finding" — by the
    No Finding output where there is one (a CheXpert-style model), by no finding called where there is not (NIH)."""
    rng = np.random.default_rng(3)
    n, classes = 400, ["Edema", "No Finding", "Effusion"]
    y = (rng.random((n, 3)) < 0.3).astype(float)
    y[:, 1] = y[:, [0, 2]].sum(axis=1) == 0
    y[rng.random((n, 3)) < 0.1] = np.nan  # some labels not stated
    probs, thresholds = rng.random((n, 3)), np.array([0.5, 0.6, 0.4])
    samples = pd.DataFrame({"patient_id": np.arange(n).astype(str), "sex": rng.choice(["M", "F"], n),
                            "age": rng.integers(20, 90, n).astype(float), "view": "PA"})
    with_state, _ = subgroup_audit(y, probs, thresholds, samples, classes, n_boot=0)
    without, _ = subgroup_audit(y[:, [0, 2]], probs[:, [0, 2]], thresholds[[0, 2]], samples, ["Edema", "Effusion"],
                                n_boot=0)
    for sex in ("M", "F"):
        rows = (samples["sex"] == sex).to_numpy()
        ill = ((y[rows][:, [0, 2]] == 1).any(axis=1))
        assert with_state["sex"][sex]["underdiagnosis"] == pytest.approx((probs[rows][ill, 1] >= 0.6).mean())
        nothing = ~(probs[rows][ill][:, [0, 2]] >= thresholds[[0, 2]]).any(axis=1)
        assert without["sex"][sex]["underdiagnosis"] == pytest.approx(nothing.mean())
        assert with_state["sex"][sex]["underdiagnosis"] != without["sex"][sex]["underdiagnosis"]
