"""Using a trained model: predict on PNG, JPEG and DICOM inputs (the same numbers as analyze), DICOM done right
(compared with the PNG twin), export to ONNX (compared with PyTorch), and sharding a folder of DICOM files."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import REAL_IMAGES, needs_real_data, write_dicom
from cxr_fast.data.datasets import nih
from cxr_fast import constants as C
from cxr_fast.cli import cli
from cxr_fast.data.images.dicom import read_dicom

PROBS = [f"prob_{c}" for c in nih.CLASSES]


def _run(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _dicom_twins(gray, folder):
    """The same image as DICOM four ways: 8-bit MONOCHROME2, MONOCHROME1 inverted, 12-bit with a window that maps
    it back exactly, and RLE-compressed."""
    folder.mkdir(parents=True, exist_ok=True)
    return [write_dicom(folder / "m2.dcm", gray),
            write_dicom(folder / "m1.dcm", 255 - gray, photometric="MONOCHROME1"),
            write_dicom(folder / "w12.dcm", gray.astype(np.uint16) * 16, bits=12, window=(2040.5, 4081)),
            write_dicom(folder / "rle.dcm", gray, rle=True)]


def test_predict_matches_analyze_on_the_same_images(tiny_run, synth_dir, synth_shards, tmp_path):
    analysis = tmp_path / "analysis"
    assert _run(["analyze", "--checkpoint", tiny_run / "checkpoints/best.pt", "--shards", synth_shards,
                 "--out", analysis, "--top-k", "0", "--bootstrap", "0"]).exit_code == 0
    scored = pd.read_csv(analysis / "predictions.csv").set_index("image_index")
    images = synth_dir / "images_001/images"
    names = list(scored.index[:12])
    result = _run(["predict", *[images / n for n in names], "--checkpoint", tiny_run / "checkpoints/best.pt",
                   "--out", tmp_path / "p", "--batch-size", "5"])
    assert result.exit_code == 0, result.output
    predicted = pd.read_csv(tmp_path / "p/predictions.csv", keep_default_na=False)
    assert list(predicted.columns[:15]) == ["image", *PROBS] and (predicted["error"] == "").all()
    for row in predicted.itertuples():
        name = row.image.rsplit("/", 1)[1]
        assert np.abs(np.array([getattr(row, p) for p in PROBS]) - scored.loc[name, PROBS].to_numpy()).max() < 0.01
    thresholds = np.array(json.loads(json.dumps(_thresholds(tiny_run))))
    for _, row in predicted.iterrows():  # NIH has no No Finding output: the state is "no finding called"
        called = [c for c, p in zip(nih.CLASSES, row[PROBS]) if p >= thresholds[nih.CLASSES.index(c)]]
        assert row["findings"] == "|".join(called) and row["no_finding_called"] == (not called)


def _thresholds(run):
    from cxr_fast.training.checkpoint import load_checkpoint

    return load_checkpoint(run / "checkpoints/best.pt")["thresholds"]


@pytest.mark.parametrize("source", ["synthetic", pytest.param("real", marks=needs_real_data)])
def test_dicom_twins_read_and_score_like_the_png(tiny_run, synth_dir, tmp_path, source):
    png = (sorted(REAL_IMAGES.glob("*.png"))[0] if source == "real"
           else sorted((synth_dir / "images_001/images").glob("*.png"))[0])
    gray = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    twins = _dicom_twins(gray, tmp_path / "dicom")
    for twin in twins:
        np.testing.assert_array_equal(read_dicom(twin), gray, err_msg=twin.name)
    result = _run(["predict", png, tmp_path / "dicom", "--checkpoint", tiny_run / "checkpoints/best.pt", "--out",
                   tmp_path / "p"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "p/predictions.csv").set_index("image")
    reference = table.loc[str(png), PROBS].to_numpy(dtype=float)
    for twin in twins:
        assert np.abs(table.loc[str(twin), PROBS].to_numpy(dtype=float) - reference).max() < 0.02, twin.name


def test_bad_inputs_get_a_line_and_the_rest_is_scored(tiny_run, synth_dir, tmp_path):
    gray = cv2.imread(str(sorted((synth_dir / "images_001/images").glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)
    folder = tmp_path / "in"
    folder.mkdir()
    good = write_dicom(folder / "good.dcm", gray)
    write_dicom(folder / "colour.dcm", np.stack([gray] * 3, axis=-1))
    write_dicom(folder / "frames.dcm", np.stack([gray, gray]), frames=2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "garbage.dcm").write_bytes(b"garbage" * 40)
    ok, jpeg = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
    write_dicom(folder / "jpeg.dcm", gray, jpeg_bytes=jpeg.tobytes())  # decoded by pylibjpeg (a dev dependency)
    result = _run(["predict", folder, "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", tmp_path / "p"])
    assert result.exit_code == 1 and "2 of 6 image(s) scored" in result.output
    table = pd.read_csv(tmp_path / "p/predictions.csv", dtype={"error": str}).set_index("image")
    table["error"] = table["error"].fillna("")
    assert table.loc[str(folder / "colour.dcm"), "error"].startswith("colour DICOM (RGB)")
    assert table.loc[str(folder / "frames.dcm"), "error"].startswith("multi-frame DICOM (2 frames)")
    assert "not a decodable image" in table.loc[str(folder / "broken.png"), "error"]
    assert "not a DICOM file" in table.loc[str(folder / "garbage.dcm"), "error"]
    assert table.loc[str(good), "error"] == "" and table.loc[str(folder / "jpeg.dcm"), "error"] == ""


def test_a_missing_decoder_is_named():
    from pydicom.uid import JPEG2000

    from cxr_fast.errors import BadInput
    from cxr_fast.data.images.dicom import _pixels

    class Compressed:
        file_meta = {"TransferSyntaxUID": JPEG2000}

        @property
        def pixel_array(self):
            raise RuntimeError("Unable to decompress: no plugin available")

    with pytest.raises(BadInput, match="JPEG 2000.*install pylibjpeg .*python-gdcm"):
        _pixels(Compressed(), "x.dcm")


def test_export_to_onnx_agrees_with_pytorch(tiny_run, synth_dir, tmp_path):
    export = _run(["export", "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", tmp_path / "onnx"])
    assert export.exit_code == 0, export.output
    meta = json.loads((tmp_path / "onnx/model.json").read_text())
    assert meta["classes"] == list(nih.CLASSES) and len(meta["thresholds"]) == 14
    assert meta["preprocessing"]["image_size"] == 64 and meta["parity_max_abs_difference"] <= 1e-3
    images = sorted((synth_dir / "images_001/images").glob("*.png"))[:7]
    for model, out in ((tiny_run / "checkpoints/best.pt", "torch"), (tmp_path / "onnx/model.onnx", "scored")):
        assert _run(["predict", *images, "--checkpoint", model, "--out", tmp_path / out]).exit_code == 0
    a = pd.read_csv(tmp_path / "torch/predictions.csv")
    b = pd.read_csv(tmp_path / "scored/predictions.csv")
    assert np.abs(a[PROBS].to_numpy() - b[PROBS].to_numpy()).max() < 1e-3
    assert (a["findings"] == b["findings"]).mean() >= 6 / 7  # a probability at a threshold may flip, no more


def test_cam_overlays_for_positive_findings(tiny_run, synth_dir, tmp_path):
    images = sorted((synth_dir / "images_001/images").glob("*.png"))[:3]
    assert _run(["predict", *images, "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", tmp_path / "p",
                 "--cam"]).exit_code == 0
    table = pd.read_csv(tmp_path / "p/predictions.csv", keep_default_na=False)
    expected = {f"{row.image.rsplit('/', 1)[1][:-4]}_{c}.png" for row in table.itertuples()
                for c in row.findings.split("|") if c}
    assert {p.name for p in (tmp_path / "p/cam").glob("*.png")} == expected


def test_shard_accepts_a_folder_of_dicom_files(synth_dir, tmp_path):
    from cxr_fast.data.shards.manifest import load_manifest, split_shards
    from cxr_fast.data.shards.tars import walk_tar
    from cxr_fast.data.shards.sample import decode_image

    table = pd.read_csv(synth_dir / "Data_Entry_2017.csv").head(30)
    folder = tmp_path / "dicom"
    folder.mkdir()
    sources = {}
    for i, name in enumerate(table["Image Index"]):
        gray = cv2.imread(str(synth_dir / "images_001/images" / name), cv2.IMREAD_GRAYSCALE)
        stem = name[:-4]
        # Half named like the table entry with .dcm, half without an extension (both as hospitals export them).
        write_dicom(folder / (f"{stem}.dcm" if i % 2 else stem), gray)
        sources[stem] = gray
    table["Image Index"] = table["Image Index"].str[:-4]  # the table names the images without a suffix
    table.to_csv(tmp_path / "table.csv", index=False)
    out = tmp_path / "shards"
    result = _run(["shard", "--images", folder, "--labels", tmp_path / "table.csv", "--out", out,
                   "--val-fraction", "0.2", "--test-fraction", "0.2", "--shard-size", "8"])
    assert result.exit_code == 0, result.output
    seen = {}
    for split in C.SPLITS:
        for tar in split_shards(out, split):
            for key, sample in walk_tar(tar):
                seen[key] = decode_image(sample)
    assert sorted(seen) == sorted(sources) and load_manifest(out)["skipped"] == []
    assert all(np.array_equal(seen[k], sources[k]) for k in seen)
