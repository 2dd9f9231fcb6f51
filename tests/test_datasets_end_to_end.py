"""Masked labels through loss and metrics, and the whole workflow on CheXpert's, MIMIC-CXR-JPG's and a merged
NIH + CheXpert layout: shard → train → analyze → predict → export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr_fast.calibration import expected_calibration_error
from cxr_fast.cli import cli
from cxr_fast.config import SynthConfig
from cxr_fast.data.datasets import nih
from cxr_fast.data.datasets.vocabulary import NO_FINDING
from cxr_fast.data.synth import write_synthetic_dataset
from cxr_fast.metrics import average_precision, per_class_report, roc_auc
from cxr_fast.training.checkpoint import load_checkpoint
from cxr_fast.training.losses import FocalLoss

TINY = ["--model", "convnext_atto", "--no-pretrained", "--image-size", "64", "--batch-size", "8", "--accum", "1",
        "--epochs", "1"]


def _run(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def _masked(rng, shape, share=0.3):
    y = (rng.random(shape) < 0.3).astype(np.float64)
    y[rng.random(shape) < share] = np.nan
    return y


def test_a_masked_loss_is_the_loss_over_stated_labels_only():
    torch.manual_seed(0)
    logits, targets = torch.randn(16, 5) * 2, (torch.rand(16, 5) > 0.6).float()
    weights = torch.tensor([0.5, 1.0, 1.5, 0.8, 1.2])
    stated = torch.rand(16, 5) > 0.3
    masked = torch.where(stated, targets, float("nan"))
    loss = FocalLoss(2.0, weights)(logits, masked)
    p = torch.sigmoid(logits)
    p_t = p * targets + (1 - p) * (1 - targets)
    each = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * (1 - p_t) ** 2 * weights
    assert loss.item() == pytest.approx(each[stated].mean().item(), rel=1e-6)
    # nothing masked: exactly the unmasked mean, as before masks existed
    assert FocalLoss(2.0, weights)(logits, targets).item() == each.mean().item()
    none = FocalLoss(2.0)(logits, torch.full_like(targets, float("nan")))
    assert none.item() == 0.0  # a batch without a stated label adds nothing, and no NaN


def test_metrics_skip_unstated_labels_and_equal_sklearn_on_the_stated_ones():
    rng = np.random.default_rng(1)
    y, probs = _masked(rng, (300, 4)), rng.random((300, 4))
    report = per_class_report(y, probs, np.full(4, 0.5), ["a", "b", "c", "d"], n_boot=0)
    for c, name in enumerate("abcd"):
        keep = ~np.isnan(y[:, c])
        assert roc_auc(y[:, c], probs[:, c]) == pytest.approx(roc_auc_score(y[keep, c], probs[keep, c]))
        assert average_precision(y[:, c], probs[:, c]) == pytest.approx(
            average_precision_score(y[keep, c], probs[keep, c]))
        entry = report["classes"][name]
        assert entry["images"] == keep.sum() and entry["support"] == int(y[keep, c].sum())
        assert entry["tp"] + entry["fp"] + entry["fn"] + entry["tn"] == keep.sum()
        assert expected_calibration_error(y[:, c], probs[:, c]) == pytest.approx(
            expected_calibration_error(y[keep, c], probs[keep, c]))
    keep = ~np.isnan(y.ravel())
    assert report["micro"]["auroc"] == pytest.approx(roc_auc_score(y.ravel()[keep], probs.ravel()[keep]))
    y[:, 3] = np.nan
    assert "not stated" in per_class_report(y, probs, np.full(4, 0.5), list("abcd"), n_boot=0)["classes"]["d"][
        "undefined"]


@pytest.mark.parametrize("layout, fit", [("chexpert", "pad"), ("mimic-cxr-jpg", "squash"), ("padchest", "pad")])
def test_shard_train_analyze_predict_export_on_a_layout(layout, fit, tmp_path):
    labels = write_synthetic_dataset(tmp_path / "data", SynthConfig(layout=layout, n_images=80, source_size=96,
                                                                    seed=2, workers=2))
    policy = ["--uncertain", "ignore:Edema zeros:*"] if layout != "padchest" else []
    _run(["shard", "--dataset", layout, "--images", tmp_path / "data", "--labels", labels, "--out",
          tmp_path / "shards", *policy, "--val-fraction", "0.25", "--shard-size", "32"])
    classes = json.loads((tmp_path / "shards" / "manifest.json").read_text())["classes"]
    assert {"Effusion", NO_FINDING} <= set(classes) and "Pleural Effusion" not in classes  # the shared names
    _run(["train", "--shards", tmp_path / "shards", "--out", tmp_path / "run", *TINY, "--fit", fit])
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    payload = load_checkpoint(checkpoint)
    assert payload["class_names"] == classes and payload["config"]["data"]["fit"] == fit
    _run(["analyze", "--checkpoint", checkpoint, "--shards", tmp_path / "shards", "--out", tmp_path / "analysis",
          "--bootstrap", "0", "--top-k", "1"])
    metrics = json.loads((tmp_path / "analysis" / "metrics.json").read_text())
    assert list(metrics["classes"]) == classes
    assert metrics["classes"]["Edema"]["images"] <= metrics["images"]
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert "| Effusion |" in report
    said = {"chexpert": "consensus of three radiologists", "mimic-cxr-jpg": "by the CheXpert labeler",
            "padchest": "by physicians for 27%"}[layout]
    assert f"Labels of the **test** partition — {layout}: " in report and said in report  # the test split's source
    films = sorted(p for p in (tmp_path / "data").rglob("*") if p.suffix in (".jpg", ".png"))[:3]
    (tmp_path / "new").mkdir()
    for number, film in enumerate(films):
        (tmp_path / "new" / f"{number}{film.suffix}").write_bytes(film.read_bytes())
    _run(["predict", "--checkpoint", checkpoint, "--out", tmp_path / "predictions", "--cam", tmp_path / "new"])
    table = pd.read_csv(tmp_path / "predictions" / "predictions.csv", keep_default_na=False)
    assert [f"prob_{c}" for c in classes] == [c for c in table.columns if c.startswith("prob_")]
    assert (table["error"] == "").all()
    assert not any(NO_FINDING in findings.split("|") for findings in table["findings"])  # a state, not a finding
    _run(["export", "--checkpoint", checkpoint, "--out", tmp_path / "export"])
    exported = json.loads((tmp_path / "export" / "model.json").read_text())
    assert exported["classes"] == classes and exported["preprocessing"]["fit"] == fit
    _run(["predict", "--checkpoint", tmp_path / "export" / "model.onnx", "--out", tmp_path / "onnx", tmp_path / "new"])
    onnx = pd.read_csv(tmp_path / "onnx" / "predictions.csv")
    columns = [f"prob_{c}" for c in classes]
    np.testing.assert_allclose(onnx[columns].to_numpy(), table[columns].to_numpy(), atol=1e-3)


def test_a_merged_nih_and_chexpert_set_trains_on_the_union_and_reports_each(synth_dir, tmp_path):
    labels = write_synthetic_dataset(tmp_path / "cx", SynthConfig(layout="chexpert", n_images=60, source_size=96,
                                                                  seed=4, workers=2))
    _run(["shard", "--dataset", "nih", "--dataset", "chexpert", "--images", synth_dir, "--images", tmp_path / "cx",
          "--labels", synth_dir / "Data_Entry_2017.csv", "--labels", labels, "--out", tmp_path / "shards",
          "--val-fraction", "0.25"])
    _run(["train", "--shards", tmp_path / "shards", "--out", tmp_path / "run", *TINY])
    checkpoint = tmp_path / "run" / "checkpoints" / "best.pt"
    classes = load_checkpoint(checkpoint)["class_names"]
    assert classes[:14] == list(nih.CLASSES) and "Pleural Effusion" not in classes
    _run(["analyze", "--checkpoint", checkpoint, "--shards", tmp_path / "shards", "--out", tmp_path / "analysis",
          "--bootstrap", "0", "--top-k", "0"])
    metrics = json.loads((tmp_path / "analysis" / "metrics.json").read_text())
    assert set(metrics["datasets"]) == {"nih", "chexpert"}
    assert "Hernia" not in metrics["datasets"]["chexpert"]["auroc"]  # not stated there
    assert all("Effusion" in metrics["datasets"][name]["auroc"] for name in ("nih", "chexpert"))  # one effusion
    report = (tmp_path / "analysis" / "report.md").read_text()
    assert "## Per data set" in report and "Pleural Effusion" not in report
