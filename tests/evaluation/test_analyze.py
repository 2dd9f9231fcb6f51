import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.metrics import f1_score

from conftest import REAL_BOXES
from cxr_fast.data.datasets import nih
from cxr_fast.data.images.preprocess import GRAY_MEAN, GRAY_STD
from cxr_fast.data.loaders.loader import Batch
from cxr_fast.evaluation.analyze import ErrorCollector, run_analysis
from cxr_fast.evaluation.cam import CamExplainer, cam_box, iobb, pointing_hit
from cxr_fast.training.checkpoint import load_checkpoint, save_checkpoint
from cxr_fast.cli import cli
from cxr_fast.config import AnalyzeConfig, ModelConfig
from cxr_fast.errors import CxrFastError
from cxr_fast.metrics import per_class_report
from cxr_fast.training.model import create_model
from cxr_fast.evaluation.report import plot_curves, write_analysis_report


def test_whole_command_on_the_cpu(tiny_run, synth_shards, tmp_path):
    out = tmp_path / "analysis"
    args = ["analyze", "--checkpoint", str(tiny_run / "checkpoints/best.pt"), "--shards", str(synth_shards),
            "--out", str(out), "--top-k", "2", "--bootstrap", "50"]
    if REAL_BOXES.exists():
        args += ["--bbox", str(REAL_BOXES)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    predictions = pd.read_csv(out / "predictions.csv")
    test_count = json.loads((synth_shards / "manifest.json").read_text())["splits"]["test"]["images"]
    assert len(predictions) == test_count and predictions["image_index"].is_unique
    assert list(predictions.columns) == ["image_index"] + [f"{kind}_{c}" for kind in ("prob", "calibrated")
                                                            for c in nih.CLASSES]
    def refuse(constant):  # NaN and Infinity are not JSON: a strict parser (JavaScript's) fails on them
        raise ValueError(f"metrics.json holds {constant}")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    assert set(metrics["classes"]) == set(nih.CLASSES)
    undefined = [c for c, m in metrics["classes"].items() if m.get("auroc") is None]
    assert all(m["auroc"] is None or 0 <= m["auroc"] <= 1 for m in metrics["classes"].values()), undefined
    report = (out / "report.md").read_text()
    assert all(f"| {c} |" in report for c in nih.CLASSES)
    assert (out / "curves/roc_all.png").exists() and (out / "curves/pr_Hernia.png").exists()
    overlays = list((out / "visualizations").rglob("*.png"))
    assert overlays and {p.parent.name for p in overlays} <= {"fp", "fn"}


def test_thresholds_come_from_validation_not_from_the_reported_split(tiny_run, synth_shards, tmp_path):
    checkpoint = load_checkpoint(tiny_run / "checkpoints/best.pt")
    planted = np.linspace(0.05, 0.6, 14)
    checkpoint["thresholds"] = planted.tolist()
    save_checkpoint(checkpoint, tmp_path / "planted.pt")
    metrics = run_analysis(tmp_path / "planted.pt", synth_shards, tmp_path / "out", AnalyzeConfig(top_k=0, bootstrap=0))
    predictions = pd.read_csv(tmp_path / "out/predictions.csv")
    for c, name in enumerate(nih.CLASSES):
        assert metrics["classes"][name]["threshold"] == pytest.approx(planted[c])
    # F1 at the planted thresholds, recomputed with scikit-learn from predictions.csv and the shard labels.
    from cxr_fast.data.shards.manifest import split_shards
    from cxr_fast.data.shards.tars import walk_tar

    labels = {}
    for tar in split_shards(synth_shards, "test"):
        for key, sample in walk_tar(tar):
            labels[json.loads(sample["json"])["image_index"]] = json.loads(sample["json"])["labels"]
    y = np.array([labels[i] for i in predictions["image_index"]])
    for c, name in enumerate(nih.CLASSES):
        if y[:, c].any():
            pred = predictions[f"prob_{name}"].to_numpy() >= planted[c]
            assert metrics["classes"][name]["f1"] == pytest.approx(f1_score(y[:, c], pred))


def test_cam_maps_have_the_input_size_and_stay_in_unit_range():
    model = create_model(ModelConfig(name="convnext_atto", pretrained=False), in_chans=1, num_classes=14).eval()
    explainer = CamExplainer(model)
    for size in (64, 96):
        image = torch.randn(1, 1, size, size).contiguous(memory_format=torch.channels_last)
        for c in (0, 13):
            cam = explainer(image, c)
            assert cam.shape == (size, size) and cam.min() >= 0 and cam.max() <= 1


def test_localization_scores():
    cam = np.zeros((100, 100), np.float32)
    cam[20:40, 30:60] = 1.0
    assert cam_box(cam) == (30, 20, 30, 20)
    assert iobb((30, 20, 30, 20), (30, 20, 60, 40)) == pytest.approx(1.0)  # predicted box inside the truth
    assert iobb((30, 20, 30, 20), (45, 20, 30, 20)) == pytest.approx(0.5)
    assert pointing_hit(cam, (25, 15, 40, 30)) and not pointing_hit(cam, (70, 70, 10, 10))


def test_report_renders_all_classes_with_one_absent(tmp_path):
    rng = np.random.default_rng(0)
    y = (rng.random((60, 14)) < 0.3).astype(float)
    y[:, nih.CLASSES.index("Hernia")] = 0
    probs = rng.random((60, 14))
    metrics = per_class_report(y, probs, np.full(14, 0.5), list(nih.CLASSES), groups=np.arange(60), n_boot=20)
    metrics |= {"split": "test", "checkpoint": "x.pt", "checkpoint_epoch": 1, "inference_images_per_second": 1.0,
                "device": "cpu", "loader": "dali"}
    curves = plot_curves(y, probs, np.full(14, 0.5), list(nih.CLASSES), tmp_path / "curves")
    gallery = {"fp": [], "fn": []}
    report = write_analysis_report(tmp_path, metrics, curves, gallery, None).read_text()
    assert all(f"| {c} |" in report for c in nih.CLASSES)
    assert "**Hernia**: no positive images" in report


def test_error_selection_is_the_most_confident_mistakes():
    targets = torch.zeros((5, 14))
    targets[0, 0] = targets[1, 0] = 1
    probs = torch.zeros((5, 14))
    probs[:, 0] = torch.tensor([0.1, 0.9, 0.8, 0.95, 0.2])
    images = torch.arange(5, dtype=torch.float32)[:, None, None, None].expand(5, 1, 4, 4)
    collector = ErrorCollector(np.full(14, 0.5), top_k=2, box_keys=set(), classes=list(nih.CLASSES))
    # Scored in two batches, as a loader delivers them.
    for rows in (slice(0, 3), slice(3, 5)):
        keys = [f"img{i}" for i in range(5)][rows]
        collector(Batch((images[rows] - GRAY_MEAN) / GRAY_STD, targets[rows], keys), probs[rows])
    errors = collector.errors()
    assert [key for key, _ in errors["fp"]["Atelectasis"]] == ["img3", "img2"]
    assert [key for key, _ in errors["fn"]["Atelectasis"]] == ["img0"]
    assert set(collector.images) == {"img0", "img2", "img3"}  # the images of chosen errors only
    assert collector.images["img3"].dtype == np.uint8 and (collector.images["img3"] == 3).all()


def test_bad_inputs_give_clear_messages(tiny_run, synth_shards, tmp_path):
    checkpoint = load_checkpoint(tiny_run / "checkpoints/best.pt")
    checkpoint["class_names"] = [f"Cat {i}" for i in range(14)]  # a model of other classes than the shards'
    save_checkpoint(checkpoint, tmp_path / "other.pt")
    with pytest.raises(CxrFastError, match="trained on other classes"):
        run_analysis(tmp_path / "other.pt", synth_shards, tmp_path / "o1")
    result = CliRunner().invoke(cli, ["analyze", "--checkpoint", str(tiny_run / "checkpoints/best.pt"),
                                      "--shards", str(synth_shards), "--split", "holdout", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "split 'holdout' is missing" in result.output


def test_gradcam_inputs_are_the_images_the_model_scored(tiny_run, synth_shards):
    """The collector keeps, from the one scoring pass, the very inputs: scoring them again gives the same numbers."""
    from cxr_fast.data.loaders.loader import LoaderSpec, create_loader
    from cxr_fast.evaluation.analyze import model_input
    from cxr_fast.training.checkpoint import load_model
    from cxr_fast.training.engine import evaluate
    from cxr_fast.training.losses import FocalLoss

    model, info = load_model(tiny_run / "checkpoints/best.pt")
    collector = ErrorCollector(info.thresholds, top_k=2, box_keys=set(), classes=info.classes)
    loader = create_loader(LoaderSpec(synth_shards, "test", info.config.data, batch_size=8, train=False,
                                      loader="torch"))
    result = evaluate(model, loader, FocalLoss(), None, show_progress=False, on_batch=collector)
    errors = collector.errors()
    chosen = {key for per_class in errors.values() for rows in per_class.values() for key, _ in rows}
    assert chosen and set(collector.images) == chosen
    row = {key: i for i, key in enumerate(result["keys"])}
    with torch.no_grad():
        for key in chosen:
            again = torch.sigmoid(model(model_input(collector.images[key], info.config.data, torch.device("cpu"))))
            np.testing.assert_allclose(again[0].numpy(), result["probs"][row[key]], atol=1e-5)


def test_undefined_numbers_are_written_as_null():
    import numpy as np

    from cxr_fast.files import dump_json

    text = dump_json({"auroc": float("nan"), "ece": np.float32(0.5), "rows": np.array([1.0, np.inf])})
    assert json.loads(text, parse_constant=lambda c: 1 / 0) == {"auroc": None, "ece": 0.5, "rows": [1.0, None]}
