"""Scoring new images safely: wrong input never looks like a result (other modalities, dark or flat renderings,
damaged data, turned JPEGs), files are found, earlier results are never replaced by accident, model.json is checked,
the Python API equals the CLI, and an external test set is analysed like a shard split. Every file is made here."""

from __future__ import annotations

import json
import shutil
import struct

import cv2
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from click.testing import CliRunner

from conftest import write_dicom
from cxr_fast.data.datasets import nih
from cxr_fast.cli import cli
from cxr_fast.data.images.dicom import read_dicom, window
from cxr_fast.errors import CxrFastError

PROBS = [f"prob_{c}" for c in nih.CLASSES]


def _run(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def gray(synth_dir):
    return cv2.imread(str(sorted((synth_dir / "images_001/images").glob("*.png"))[0]), cv2.IMREAD_GRAYSCALE)


def _predict(tiny_run, inputs, out, *flags):
    result = _run(["predict", *inputs, "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out, *flags])
    table = pd.read_csv(out / "predictions.csv", dtype={"error": str, "warning": str}).fillna({"error": "",
                                                                                               "warning": ""})
    return result, table.set_index("image")


def _edit(path, **tags):
    ds = pydicom.dcmread(path)
    for tag, value in tags.items():
        setattr(ds, tag, value)
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------- not a chest radiograph
def test_other_modalities_are_refused_scanned_films_and_other_body_parts_warned(tiny_run, gray, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    ct = _edit(write_dicom(folder / "ct.dcm", gray), Modality="CT")
    ot = _edit(write_dicom(folder / "ot.dcm", gray), Modality="OT")
    knee = _edit(write_dicom(folder / "knee.dcm", gray), BodyPartExamined="KNEE", ViewPosition="PA")
    result, table = _predict(tiny_run, [folder], tmp_path / "p")
    assert result.exit_code == 1 and table.loc[str(ct), "error"].startswith("modality CT is not a projection")
    assert "scanned film" in table.loc[str(ot), "warning"] and table.loc[str(ot), "error"] == ""
    assert "body part KNEE" in table.loc[str(knee), "warning"] and table.loc[str(knee), "view_position"] == "PA"
    assert table.loc[str(knee), "sop_instance_uid"] == pydicom.dcmread(knee).SOPInstanceUID
    result, table = _predict(tiny_run, [ct], tmp_path / "any", "--any-modality")
    assert result.exit_code == 0 and table.loc[str(ct), "error"] == ""


# ------------------------------------------------------------------------------------------- dark or flat images
def test_deep_data_without_a_window_is_rendered_over_the_range_present(gray, tmp_path):
    quarter = (gray.astype(np.uint16) * 4)  # 12-bit data using a quarter of its range (0-1020 of 0-4095)
    rendered = read_dicom(write_dicom(tmp_path / "q.dcm", quarter, bits=12))
    expected = np.rint((quarter - quarter.min()) * 255.0 / (quarter.max() - quarter.min())).astype(np.uint8)
    np.testing.assert_array_equal(rendered, expected)
    rescaled = _edit(write_dicom(tmp_path / "r.dcm", quarter, bits=12), RescaleSlope="2", RescaleIntercept="-1024")
    np.testing.assert_array_equal(read_dicom(rescaled), expected)


def test_a_16_bit_png_holding_12_bit_data_is_windowed_not_cut_to_its_high_byte(gray, tmp_path):
    from cxr_fast.data.images.source import read_gray

    cv2.imwrite(str(tmp_path / "x.png"), gray.astype(np.uint16) * 16)
    source = read_gray(tmp_path / "x.png")
    low, high = int(gray.min()), int(gray.max())
    np.testing.assert_allclose(source.gray, np.rint((gray - low) * 255.0 / (high - low)), atol=1)
    assert source.stored_as is None


def test_a_voi_lut_stating_16_bits_but_holding_12_and_a_modality_lut_sequence(gray, tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    data = gray.astype(np.uint16) * 16  # 12-bit stored values
    path = write_dicom(tmp_path / "lut.dcm", data, bits=12)
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]  # says 16 bits...
    item.add_new("LUTData", "US", list(range(4096)))  # ...holds 12-bit values: the identity
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)
    np.testing.assert_allclose(read_dicom(path), np.rint(data / 4095 * 255), atol=1)  # not 1/16 of the range
    path = write_dicom(tmp_path / "mlut.dcm", data, bits=12)
    ds = pydicom.dcmread(path)
    mod = Dataset()
    mod.LUTDescriptor, mod.ModalityLUTType = [4096, 0, 16], "OD"
    mod.add_new("LUTData", "US", [v // 4 for v in range(4096)])  # output 0-1023
    ds.ModalityLUTSequence = Sequence([mod])
    ds.save_as(path, enforce_file_format=True)
    rendered = read_dicom(path)
    assert rendered.max() == 255 and rendered.min() == 0  # over the LUT output present, not near-black


@pytest.mark.parametrize("function", ["SIGMOID", "LINEAR_EXACT", "LINEAR"])
def test_voi_functions_match_pydicom(function):
    from pydicom.pixels import apply_voi_lut

    values = np.arange(0, 4096, dtype=np.float64)
    ds = pydicom.Dataset()
    ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 2000.0, 1200.0, function
    ds.BitsStored, ds.PixelRepresentation, ds.PhotometricInterpretation = 12, 0, "MONOCHROME2"
    reference = apply_voi_lut(values.astype(np.uint16), ds)
    ours = window(values, 2000.0, 1200.0, function)
    np.testing.assert_allclose(ours * 4095, reference, atol=0.5)


def test_zero_slope_zero_width_and_damaged_data_are_error_rows(tiny_run, gray, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    slope = _edit(write_dicom(folder / "slope.dcm", gray), RescaleSlope="0", RescaleIntercept="0")
    width = write_dicom(folder / "width.dcm", gray, window=(128, 0))
    _ok, jpeg = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
    truncated = write_dicom(folder / "cut.dcm", gray, jpeg_bytes=jpeg.tobytes()[: len(jpeg) * 2 // 3])
    good = write_dicom(folder / "good.dcm", gray)
    bad = _edit(write_dicom(folder / "text.dcm", gray), WindowWidth="100")
    ds = pydicom.dcmread(bad)
    ds.add_new("WindowCenter", "DS", "1")
    ds["WindowCenter"]._value = "abc"
    ds.save_as(bad, enforce_file_format=True)
    result, table = _predict(tiny_run, [folder], tmp_path / "p")
    assert result.exit_code == 1 and table.loc[str(good), "error"] == ""
    assert "RescaleSlope is 0" in table.loc[str(slope), "error"]
    assert "WindowWidth 0" in table.loc[str(width), "error"]
    assert "truncated" in table.loc[str(truncated), "error"]
    assert "unusable DICOM header" in table.loc[str(bad), "error"]


def _with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    ifd = struct.pack("<HHHIHH", 1, 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    app1 = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]


def test_jpeg_exif_orientation_is_applied(tmp_path):
    from cxr_fast.data.images.source import read_gray

    image = np.zeros((40, 60), np.uint8)
    image[:10, :] = 255  # bright top band
    _ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 100])
    (tmp_path / "turned.jpg").write_bytes(_with_exif_orientation(jpeg.tobytes(), 6))  # display: 90° clockwise
    gray = read_gray(tmp_path / "turned.jpg").gray
    assert gray.shape == (60, 40) and gray[:, -10:].mean() > 200 and gray[:, :10].mean() < 50


# ---------------------------------------------------------------------------------------------- finding the files
def test_uid_names_symlinked_folders_and_never_its_own_output(tiny_run, synth_dir, gray, tmp_path):
    folder = tmp_path / "in"
    (folder / "real").mkdir(parents=True)
    uid = write_dicom(folder / "real" / "1.2.840.113619.2.55.3.1", gray)
    (folder / "linked").symlink_to(folder / "real")
    shutil.copy(sorted((synth_dir / "images_001/images").glob("*.png"))[0], folder / "a.png")
    out = folder / "scored"
    result, table = _predict(tiny_run, [folder], out, "--cam")
    found = [name for name in table.index if name.endswith(uid.name)]
    assert result.exit_code == 0 and len(found) == 1 and len(table) == 2  # found once, through one of its paths
    again, table = _predict(tiny_run, [folder], out, "--overwrite")
    assert again.exit_code == 0 and len(table) == 2  # its own overlays in out/cam are not inputs


def test_same_file_names_in_two_folders_get_two_overlays(tiny_run, synth_dir, tmp_path):
    png = sorted((synth_dir / "images_001/images").glob("*.png"))
    for folder, source in (("a", png[0]), ("b", png[1])):
        (tmp_path / folder).mkdir()
        shutil.copy(source, tmp_path / folder / "x.png")
    result, table = _predict(tiny_run, [tmp_path / "a", tmp_path / "b"], tmp_path / "p", "--cam",
                             "--operating-point", "sensitivity_90")
    positives = sum(len(f.split("|")) for f in table["findings"] if f != "No Finding")
    assert result.exit_code == 0 and len(list((tmp_path / "p/cam").glob("x_*.png"))) == positives > 0
    assert (table["operating_point"] == "sensitivity_90").all()


# ------------------------------------------------------------------------------- nothing overwritten or ambiguous
def test_an_occupied_out_is_refused_and_overwrite_clears_only_its_own_files(tiny_run, synth_dir, tmp_path):
    from cxr_fast.files import folder_lock

    image = sorted((synth_dir / "images_001/images").glob("*.png"))[0]
    out = tmp_path / "p"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _run(["predict", image, "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out])
    assert result.exit_code == 2 and "is not empty" in result.output
    refused = _run(["predict", image, "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out, "--overwrite"])
    assert refused.exit_code == 2 and "did not write" in refused.output  # the user's folder, not predict's
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert _run(["predict", image, "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out]).exit_code == 0
    (out / "notes.txt").write_text("mine")  # added to predict's own folder later: kept by --overwrite
    assert _run(["predict", image, "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out,
                 "--overwrite"]).exit_code == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "predictions.csv").exists()
    with folder_lock(out, "predictions"):  # another predict (or export) writing there
        busy = _run(["predict", image, "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out,
                     "--overwrite"])
        assert busy.exit_code == 2 and "in use" in busy.output
        busy = _run(["export", "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out, "--overwrite"])
        assert busy.exit_code == 2 and "in use" in busy.output


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert _run(["export", "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out]).exit_code == 0
    return out


def test_model_json_holds_no_machine_path_and_its_operating_points(exported):
    meta = json.loads((exported / "model.json").read_text())
    assert "/" not in meta["checkpoint"] and set(meta["operating_points"]) == {"max_f1", "sensitivity_90",
                                                                               "specificity_90"}
    assert meta["validation"]["val_macro_auc"] is not None and len(meta["sha256"]) == 64


@pytest.mark.parametrize("damage, message", [
    ("zeros", "does not match the sha256"),
    ("not_onnx", "is not a usable ONNX model"),
    ("nan_threshold", "thresholds must be 14 finite numbers"),
    ("short_points", "operating_points.sensitivity_90: thresholds must be 14"),
    ("calibration", "calibration.a must be > 0"),
    ("classes", "classes must be a list of distinct names"),
    ("preprocessing", "preprocessing: data.image_size"),
])
def test_a_tampered_model_or_model_json_is_an_error_naming_the_field(exported, tmp_path, synth_dir, damage,
                                                                       message):
    from cxr_fast.files import sha256_file

    copy = tmp_path / "onnx"
    shutil.copytree(exported, copy)
    meta = json.loads((copy / "model.json").read_text())
    if damage == "zeros":
        data = bytearray((copy / "model.onnx").read_bytes())
        data[1000:1064] = bytes(64)
        (copy / "model.onnx").write_bytes(bytes(data))
    elif damage == "not_onnx":
        (copy / "model.onnx").write_bytes(b"not a model" * 100)
        meta["sha256"] = sha256_file(copy / "model.onnx")
    elif damage == "nan_threshold":
        meta["thresholds"][3] = float("nan")
    elif damage == "short_points":
        meta["operating_points"]["sensitivity_90"] = meta["operating_points"]["sensitivity_90"][:5]
    elif damage == "calibration":
        meta["calibration"]["a"][0] = -1.0
    elif damage == "classes":
        meta["classes"][1] = meta["classes"][0]
    else:
        meta["preprocessing"]["image_size"] = 7
    (copy / "model.json").write_text(json.dumps(meta))
    image = sorted((synth_dir / "images_001/images").glob("*.png"))[0]
    result = _run(["predict", image, "--checkpoint", copy / "model.onnx", "--out", tmp_path / "p"])
    assert result.exit_code == 2 and message in result.output, result.output


# ---------------------------------------------------------------------------------------- using it from Python
def test_the_predictor_equals_the_cli_and_refuses_an_unprocessed_tensor(tiny_run, synth_dir, gray, tmp_path):
    from cxr_fast import Predictor

    images = sorted((synth_dir / "images_001/images").glob("*.png"))[:4]
    _result, table = _predict(tiny_run, images, tmp_path / "p")
    predictor = Predictor.load(tiny_run / "checkpoints/best.pt")
    for path in images:
        result = predictor.predict(path)
        assert max(abs(result.probabilities[c] - table.loc[str(path), f"prob_{c}"]) for c in nih.CLASSES) < 1e-6
    from_array = predictor.predict(cv2.imread(str(images[0]), cv2.IMREAD_GRAYSCALE))
    from_dataset = predictor.predict(pydicom.dcmread(write_dicom(tmp_path / "x.dcm", cv2.imread(str(images[0]), 0))))
    assert from_array.probabilities == pytest.approx(predictor.predict(images[0]).probabilities, abs=1e-6)
    assert from_dataset.probabilities == pytest.approx(from_array.probabilities, abs=1e-6)
    assert predictor.embed(images[0]).ndim == 1
    side = predictor.data.image_size
    with pytest.raises(CxrFastError, match="must be a float tensor N x 1 x 64 x 64"):
        predictor.probabilities(torch.zeros(1, 1, side * 2, side * 2))
    with pytest.raises(CxrFastError, match="not preprocessed"):
        predictor.probabilities(torch.full((1, 1, side, side), 200.0))  # raw gray levels
    with pytest.raises(CxrFastError, match="modality CT"):
        ct = write_dicom(tmp_path / "ct.dcm", gray)
        predictor.predict(_edit(ct, Modality="CT"))


def test_an_external_test_set_is_analysed_like_a_shard_split(tiny_run, synth_dir, synth_shards, tmp_path):
    checkpoint = tiny_run / "checkpoints/best.pt"
    assert _run(["analyze", "--checkpoint", checkpoint, "--shards", synth_shards, "--out", tmp_path / "shards",
                 "--bootstrap", "0", "--top-k", "0"]).exit_code == 0
    result = _run(["analyze", "--checkpoint", checkpoint, "--predictions", tmp_path / "shards/predictions.csv",
                   "--labels", synth_dir / "Data_Entry_2017.csv", "--out", tmp_path / "external", "--bootstrap",
                   "0"])
    assert result.exit_code == 0, result.output
    a = json.loads((tmp_path / "shards/metrics.json").read_text())
    b = json.loads((tmp_path / "external/metrics.json").read_text())
    assert b["images"] == a["images"] and b["macro"]["auroc"] == pytest.approx(a["macro"]["auroc"], abs=1e-12)
    for name in nih.CLASSES:
        for key in ("auroc", "f1", "precision", "recall"):
            assert b["classes"][name][key] == pytest.approx(a["classes"][name][key], nan_ok=True), (name, key)
    assert b["operating_points"] == a["operating_points"] and "Calibration" in (tmp_path / "external/report.md"
                                                                                ).read_text()


def test_a_model_that_cannot_take_the_image_size_is_an_error(synth_shards, tmp_path):
    result = _run(["train", "--shards", synth_shards, "--out", tmp_path / "run", "--model", "vit_tiny_patch16_224",
                   "--no-pretrained", "--image-size", "64", "--batch-size", "4"])
    assert result.exit_code == 2 and "takes 224 x 224 inputs only, not 64 px" in result.output
