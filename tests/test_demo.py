"""End to end, as the README's first command runs it: the demo on the CPU, on 800 synthetic images.

This is also the trainer's acceptance check: a tiny ConvNeXt trained from scratch at 128 px (through the loader
`auto` picks, the DataLoader on the CPU) must reach a validation macro AUROC of at least 0.85, and the calibration
fitted on validation must not make the test split's macro ECE worse.
"""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_the_tiny_convnext_learns(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "cxr_fast", "demo", "--out", str(out)], capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Demo finished" in result.stdout
    for artefact in ("shards/manifest.json", "eda/report.md", "run/checkpoints/best.pt", "run/checkpoints/last.pt",
                     "run/metrics.jsonl", "run/config.yaml", "analysis/report.md", "analysis/predictions.csv",
                     "analysis/metrics.json", "analysis/curves/roc_all.png", "bench-loader.json"):
        assert (out / artefact).exists(), artefact
    assert list((out / "analysis/visualizations").glob("f[pn]/*.png"))
    records = [json.loads(line) for line in (out / "run/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8
    print("validation macro AUROC per epoch:", [round(r["val_macro_auc"], 3) for r in records])
    assert records[-1]["val_macro_auc"] >= 0.85
    config = (out / "run/config.yaml").read_text()
    assert "loader: auto" in config and "image_size: 128" in config and "name: convnext_atto" in config
    metrics = json.loads((out / "analysis/metrics.json").read_text())
    print("test macro ECE before/after calibration:", metrics["calibration"]["macro"])
    assert metrics["calibration"]["macro"]["ece"] <= metrics["calibration"]["macro"]["ece_uncalibrated"]
    report = (out / "analysis/report.md").read_text()
    assert "curves/reliability.png" in report and "curves/subgroups.png" in report
    assert (out / "analysis/curves/reliability.png").exists() and (out / "analysis/curves/subgroups.png").exists()
    assert json.loads((out / "bench-loader.json").read_text())["images_per_second"] > 0
