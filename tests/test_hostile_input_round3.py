"""Hostile input, round 3: each case with bytes, sizes or names of its own, asserting the outcome that must hold —
refused before decoding with bounded memory, an error row or one `Error:` line with exit 2, the user's files
byte-identical, a forged shard set caught by `verify --deep` (docs/RELIABILITY.md, round 3)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_dicom
from cxr_fast.cli import cli
from cxr_fast.config import ShardConfig
from cxr_fast.data.images import dicom
from cxr_fast.data.images.source import image_files, read_gray
from cxr_fast.data.shards.tars import dali_index
from cxr_fast.data.shards.verify import verify
from cxr_fast.data.shards.writer import ShardInput, write_shards
from cxr_fast.errors import BadInput, CxrFastError
from cxr_fast.evaluation.predictor import Predictor


def _run(args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _refused(path: Path, match: str) -> None:
    with pytest.raises(BadInput, match=match):
        read_gray(path, 4_000_000)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _jpeg(side: int = 64, progressive: bool = False) -> bytes:
    gray = (np.random.default_rng(side).random((side, side)) * 255).astype(np.uint8)
    return cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])[1].tobytes()


def _sof(data: bytes) -> int:
    return next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))


# ------------------------------------------------------------------------------------------ memory and time
def test_a_foreign_format_is_not_sized_by_a_marker_found_inside_it(tmp_path):
    fake_siz = b"\xff\x4f\xff\x51" + bytes(2) + (100).to_bytes(4, "big") * 2 + bytes(40)
    before = _peak_mb()
    for name, head in (("tiff.png", b"II*\x00" + bytes(4)), ("bmp.jpg", b"BM" + bytes(30)), ("webp.png",
                       b"RIFF\x00\x00\x00\x00WEBPVP8 ")):
        (tmp_path / name).write_bytes(head + fake_siz + zlib.compress(bytes(5_000_000)))
        _refused(tmp_path / name, "not a PNG, JPEG or DICOM file")
    assert _peak_mb() - before < 50  # refused before anything was decoded


def test_components_and_bits_count_not_only_the_size(tmp_path):
    data = bytearray(_jpeg())
    sof = _sof(data)
    data[sof + 9] = 200  # components
    (tmp_path / "many.jpg").write_bytes(bytes(data))
    _refused(tmp_path / "many.jpg", "200 components")
    png = bytearray(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1].tobytes())
    png[24] = 32  # bit depth in IHDR
    (tmp_path / "deep.png").write_bytes(bytes(png))
    _refused(tmp_path / "deep.png", "32 bits")
    inner = bytearray(_jpeg(32))
    inner[_sof(inner) + 9] = 3  # a three-component image inside a gray DICOM of the right size
    write_dicom(tmp_path / "x.dcm", np.zeros((32, 32), np.uint8), jpeg_bytes=bytes(inner))
    _refused(tmp_path / "x.dcm", "3 component")


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding(tmp_path):
    data = _jpeg(48, progressive=True)
    last = data.rfind(b"\xff\xda")
    (tmp_path / "scans.jpg").write_bytes(data[:last] + data[last:-2] * 150 + b"\xff\xd9")
    _refused(tmp_path / "scans.jpg", "scans")
    assert read_gray(_write(tmp_path / "fine.jpg", data)).gray.shape == (48, 48)  # a normal progressive file


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _deflated(path: Path, group_length: int | None) -> Path:
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    import pydicom
    write_dicom(path, (np.arange(64 * 64) % 256).reshape(64, 64).astype(np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    if group_length is not None:
        data = bytearray(path.read_bytes())
        at = data.index(b"\x02\x00\x00\x00UL") + 8
        data[at:at + 4] = group_length.to_bytes(4, "little")
        path.write_bytes(bytes(data))
    return path


def test_a_deflated_dicom_with_a_lying_meta_length_is_one_bad_input(tmp_path):
    assert read_gray(_deflated(tmp_path / "ok.dcm", None), 4_000_000).gray.shape == (64, 64)
    for length in (9_999_999, 6):
        _refused(_deflated(tmp_path / f"{length}.dcm", length), "group length")


def test_pipes_devices_and_links_to_them_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.mkfifo(tmp_path / "no_suffix")  # the finder looks inside files without a suffix for DICOM's marker
    signal.alarm(20)  # a read that blocks fails the test instead of hanging it
    try:
        for name in ("pipe.png", "zero.jpg"):
            _refused(tmp_path / name, "not a regular file")
        found = sorted(p.name for p in image_files(tmp_path))
    finally:
        signal.alarm(0)
    assert found == ["pipe.png", "zero.jpg"]  # listed by suffix, then each refused as one bad input


def test_yaml_with_anchors_is_refused_and_bad_values_are_cut_short(tmp_path, synth_dir):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
        for i in range(8))
    (tmp_path / "bomb.yaml").write_text(bomb)
    labels = synth_dir / "Data_Entry_2017.csv"
    result = _run(["shard", "--images", synth_dir, "--labels", labels, "--out", tmp_path / "s", "--config",
                   tmp_path / "bomb.yaml"])
    assert result.exit_code == 2 and "anchors and aliases" in result.output
    (tmp_path / "long.yaml").write_text("seed: [" + ", ".join(["999999"] * 100_000) + "]\n")
    result = _run(["shard", "--images", synth_dir, "--labels", labels, "--out", tmp_path / "s", "--config",
                   tmp_path / "long.yaml"])
    assert result.exit_code == 2 and len(result.output) < 600, result.output[:300]
    (tmp_path / "utf16.yaml").write_bytes("seed: 3\n".encode("utf-16"))
    result = _run(["shard", "--images", synth_dir, "--labels", labels, "--out", tmp_path / "s", "--config",
                   tmp_path / "utf16.yaml"])
    assert result.exit_code == 2 and "Error: " in result.output and "not UTF-8 text" in result.output


# --------------------------------------------------------------------------------- never the user's files
def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


def test_shard_never_writes_through_a_linked_split_folder(synth_dir, tmp_path):
    other = tmp_path / "other_tool"
    other.mkdir()
    for number in (0, 7):
        (other / f"shard-{number:06d}.tar").write_bytes(b"another tool's data %d" % number)
    out = tmp_path / "s"
    out.mkdir()
    os.symlink(other, out / "train")
    before = _tree(other)
    result = _run(["shard", "--images", synth_dir, "--labels", synth_dir / "Data_Entry_2017.csv", "--out", out,
                   "--overwrite"])
    assert result.exit_code == 2 and "is a link" in result.output and _tree(other) == before


def test_synth_eda_and_preview_never_write_over_data_or_results(synth_dir, synth_shards, tmp_path):
    real = tmp_path / "nih"
    (real / "images").mkdir(parents=True)
    (real / "Data_Entry_2017.csv").write_text("Image Index,Finding Labels,Patient ID\n00000001_000.png,Mass,1\n")
    shutil.copy(sorted((synth_dir / "images_001/images").glob("*.png"))[0], real / "images" / "00000001_000.png")
    analysis = tmp_path / "analysis"
    analysis.mkdir()
    (analysis / "report.md").write_text("an analysis")
    (analysis / ".cxr-fast").write_text("analyze\n")
    before = {folder: _tree(folder) for folder in (real, analysis)}
    for args in (["synth", "--out", real, "--n-images", "10"],
                 ["eda", "--labels", synth_dir / "Data_Entry_2017.csv", "--out", analysis],
                 ["preview", "--shards", synth_shards, "--out", real / "images", "--n", "2", "--loader", "torch"],
                 ["preview", "--shards", synth_shards, "--out", synth_shards, "--n", "2", "--loader", "torch"]):
        result = _run(args)
        assert result.exit_code == 2 and result.output.startswith("Error: "), (args, result.output)
    assert {folder: _tree(folder) for folder in (real, analysis)} == before
    assert _run(["synth", "--out", tmp_path / "again", "--n-images", "10", "--source-size", "64"]).exit_code == 0
    assert _run(["synth", "--out", tmp_path / "again", "--n-images", "12", "--source-size", "64"]).exit_code == 0
    assert len(list((tmp_path / "again").rglob("*.png"))) == 12  # its own earlier set replaced, nothing mixed


def test_analyze_and_predict_refuse_another_commands_folder(tiny_run, synth_dir, tmp_path):
    image = sorted((synth_dir / "images_001/images").glob("*.png"))[0]
    checkpoint = tiny_run / "checkpoints/best.pt"
    scored = tmp_path / "scored"
    assert _run(["predict", image, "--checkpoint", checkpoint, "--out", scored]).exit_code == 0
    before = _tree(scored)
    result = _run(["analyze", "--checkpoint", checkpoint, "--predictions", scored / "predictions.csv", "--labels",
                   synth_dir / "Data_Entry_2017.csv", "--out", scored, "--overwrite", "--bootstrap", "0"])
    assert result.exit_code == 2 and "reads" in result.output and _tree(scored) == before
    mine = tmp_path / "mine"
    (mine / "cam").mkdir(parents=True)
    (mine / "cam" / "drawing.png").write_bytes(b"the user's")
    result = _run(["predict", image, "--checkpoint", checkpoint, "--out", mine, "--overwrite"])
    assert result.exit_code == 2 and (mine / "cam" / "drawing.png").read_bytes() == b"the user's"


# ---------------------------------------------------------------------------------------- forged shard sets
def _reseal(shards: Path, manifest: dict) -> None:
    """What a forger does after changing tars: new sha256 and indexes in the manifest, so only deep checks can
    tell."""
    for name, record in manifest["shards"].items():
        tar = shards / name
        record["sha256"] = hashlib.sha256(tar.read_bytes()).hexdigest()
        (shards / record["index"]).write_text(dali_index(tar))
    (shards / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def forged(synth_shards, tmp_path) -> tuple[Path, dict]:
    copy = tmp_path / "forged"
    shutil.copytree(synth_shards, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


def test_verify_deep_catches_swapped_splits(forged):
    shards, manifest = forged
    os.rename(shards / "val", shards / "tmp")
    os.rename(shards / "test", shards / "val")
    os.rename(shards / "tmp", shards / "test")
    rename = {"val/": "test/", "test/": "val/"}
    swap = lambda name: rename.get(name[:name.index("/") + 1], "") + name[name.index("/") + 1:] \
        if name[:name.index("/") + 1] in rename else name  # noqa: E731
    manifest["shards"] = {swap(n): dict(r, index=swap(r["index"])) for n, r in manifest["shards"].items()}
    manifest["splits"]["val"], manifest["splits"]["test"] = manifest["splits"]["test"], manifest["splits"]["val"]
    for split in ("val", "test"):
        manifest["splits"][split]["shards"] = [swap(n) for n in manifest["splits"][split]["shards"]]
    _reseal(shards, manifest)
    assert verify(shards) == []  # every shallow check passes
    assert any("says it belongs to" in p for p in verify(shards, deep=True))


def test_verify_deep_catches_swapped_class_names_and_a_format_relabel(forged):
    shards, manifest = forged
    classes = manifest["classes"]
    e, i = classes.index("Effusion"), classes.index("Infiltration")
    classes[e], classes[i] = classes[i], classes[e]
    _reseal(shards, manifest)
    assert any("class names swapped" in p for p in verify(shards, deep=True))
    classes[e], classes[i] = classes[i], classes[e]
    manifest["format_version"] = 2
    _reseal(shards, manifest)
    assert any("carries masks" in p for p in verify(shards, deep=True))
    manifest["format_version"], manifest["classes"] = 3, classes[:-1]
    _reseal(shards, manifest)
    assert any("14 labels, the manifest names 13" in p for p in verify(shards, deep=True))


def test_a_huge_image_forged_into_a_shard_is_refused_before_decoding(forged, tmp_path):
    import tarfile

    shards, manifest = forged
    name = manifest["splits"]["val"]["shards"][0]
    png = bytearray(cv2.imencode(".png", np.zeros((4, 4), np.uint8))[1].tobytes())
    png[16:24] = (30_000).to_bytes(4, "big") * 2  # IHDR claims 30000 x 30000
    members, forged_one = [], False
    with tarfile.open(shards / name) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name.endswith(".png") and not forged_one:
                data, forged_one = bytes(png), True
            members.append((member.name, data))
    with tarfile.open(shards / name, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member_name, data in members:
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    _reseal(shards, manifest)
    before = _peak_mb()
    problems = verify(shards, deep=True)
    assert any("30000 x 30000" in p and "refused before decoding" in p for p in problems)
    assert _peak_mb() - before < 200


# ------------------------------------------------------------------------------------------- model files
@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export3") / "onnx"
    assert _run(["export", "--checkpoint", tiny_run / "checkpoints/best.pt", "--out", out]).exit_code == 0
    return out


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(classes=m["classes"][::-1]), "classes are not those exported"),
    (lambda m: m["classes"].__setitem__(0, "Atelectasis (renamed)"), "classes are not those exported"),
    (lambda m: m.update(classes=m["classes"][:13], thresholds=m["thresholds"][:13],
                        operating_points={k: v[:13] for k, v in m["operating_points"].items()},
                        calibration=None), "13 classes"),
    (lambda m: m["preprocessing"].update(image_size=96), "model.json does not describe"),
])
def test_model_json_must_describe_the_model_it_sits_beside(exported, tmp_path, edit, message):
    copy = tmp_path / "onnx"
    shutil.copytree(exported, copy)
    meta = json.loads((copy / "model.json").read_text())
    edit(meta)
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CxrFastError, match=message):
        Predictor.load(copy / "model.onnx")


def test_predictor_refuses_non_finite_and_empty_input_one_item_at_a_time(tiny_run, synth_dir):
    predictor = Predictor.load(tiny_run / "checkpoints/best.pt")
    side = predictor.data.image_size
    with pytest.raises(CxrFastError, match="NaN or infinite"):
        predictor.probabilities(torch.full((1, predictor.data.in_chans, side, side), float("nan")))
    image = sorted((synth_dir / "images_001/images").glob("*.png"))[0]
    good, empty, flat = predictor.predict_batch([image, np.zeros((0, 0), np.uint8), np.zeros((1, 5), np.uint8)])
    assert good.probabilities and "at least 2 x 2" in empty and "at least 2 x 2" in flat


def test_a_decoder_that_calls_the_data_corrupt_makes_a_bad_input_and_prints_nothing(tmp_path, capsys):
    class Lenient:  # pydicom's first plugin fails (and logs it), a lenient one then decodes something
        file_meta = None

        @property
        def pixel_array(self):
            logging.getLogger("pydicom.pixels.decoders.base").error("libjpeg: corrupt data", exc_info=False)
            return np.zeros((8, 8), np.uint8)

    with pytest.raises(BadInput, match="corrupt data"):
        dicom._pixels(Lenient(), tmp_path / "x.dcm")
    assert "corrupt data" not in capsys.readouterr().err


# ---------------------------------------------------------------------------- tables, policies and names
def test_table_mistakes_are_errors_that_name_the_row_column_or_value(chexpert_dir, mimic_dir, tmp_path):
    import gzip

    import pandas as pd

    root = chexpert_dir / "CheXpert-v1.0-small"
    cases = []
    train = pd.read_csv(root / "train.csv", dtype=str)
    bad = tmp_path / "space" / "CheXpert-v1.0-small"
    bad.mkdir(parents=True)
    train.assign(Edema=train["Edema"].where(train.index != 3, " ")).to_csv(bad / "train.csv", index=False)
    shutil.copy(root / "valid.csv", bad)
    cases.append((["--dataset", "chexpert", "--images", chexpert_dir, "--labels", bad / "train.csv"],
                  "column 'Edema', value ' '"))
    cases.append((["--dataset", "chexpert", "--images", chexpert_dir, "--labels", root / "valid.csv"],
                  "give CheXpert's train.csv"))
    for views in ("PA;AP", "PA,APP", ""):
        cases.append((["--dataset", "chexpert", "--images", chexpert_dir, "--labels", root / "train.csv", "--views",
                       views], "--views"))
    for policy in ("ones:* zeros:*", "ones:Efusion zeros:*", ""):
        cases.append((["--dataset", "chexpert", "--images", chexpert_dir, "--labels", root / "train.csv",
                       "--uncertain", policy], "--uncertain"))
    cases.append((["--dataset", "chexpert", "--images", chexpert_dir, "--labels", root / "train.csv", "--views",
                   "AP_HORIZONTAL", "--uncertain", "ones:Pleural Effusion zeros:*"], "no image is left for the train"))
    tables = tmp_path / "mimic"
    shutil.copytree(mimic_dir, tables, ignore=shutil.ignore_patterns("files"))
    with gzip.open(tables / "mimic-cxr-2.0.0-split.csv.gz", "rt") as handle:
        lines = handle.read().splitlines()
    with gzip.open(tables / "mimic-cxr-2.0.0-split.csv.gz", "wt") as handle:
        handle.write("\n".join(lines + lines[1:2]) + "\n")
    cases.append((["--dataset", "mimic-cxr-jpg", "--images", mimic_dir, "--labels",
                   tables / "mimic-cxr-2.0.0-chexpert.csv.gz"], "dicom_id listed twice"))
    for number, (args, message) in enumerate(cases):
        result = _run(["shard", *args, "--out", tmp_path / f"s{number}"])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, \
            (args, result.output)


def test_a_12_bit_jpeg_is_named_as_such(tmp_path):
    data = bytearray(_jpeg())
    data[_sof(data) + 4] = 12
    _refused(_write(tmp_path / "deep.jpg", bytes(data)), "12-bit JPEG")


def test_spec_values_of_the_wrong_type_are_errors(synth_dir, tmp_path):
    (tmp_path / "spec.yaml").write_text("image: [Image Index]\npatient: Patient ID\nclasses: [Mass]\n")
    result = _run(["shard", "--dataset", "table", "--spec", tmp_path / "spec.yaml", "--images", synth_dir,
                   "--labels", synth_dir / "Data_Entry_2017.csv", "--out", tmp_path / "s"])
    assert result.exit_code == 2 and "must name one column" in result.output


def test_unreadable_nih_images_through_links_are_skipped_not_read(synth_dir, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(synth_dir / "images_001" / "images", images)
    victim = sorted(images.glob("*.png"))[0]
    victim.unlink()
    os.symlink("/dev/zero", victim)
    signal.alarm(60)
    try:
        manifest = write_shards(ShardInput(images, synth_dir / "Data_Entry_2017.csv"),
                                ShardConfig(out=str(tmp_path / "s"), on_error="skip"))
    finally:
        signal.alarm(0)
    assert any(s["file"] == str(victim) and "not a regular file" in s["reason"] for s in manifest["skipped"])
    assert manifest["dropped"]["unreadable image"]["count"] == 1


def test_a_jpeg_with_corrupt_entropy_data_is_a_bad_input(tmp_path):
    data = bytearray(_jpeg(128))
    for position in range(data.rfind(b"\xff\xda") + 100, len(data) - 100, 211):
        data[position] ^= 0x5A  # OpenCV decodes this with a printed warning only
    assert cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_GRAYSCALE) is not None
    _refused(_write(tmp_path / "corrupt.jpg", bytes(data)), "corrupt JPEG data")
    assert read_gray(_write(tmp_path / "fine.jpg", _jpeg(128))).gray.shape == (128, 128)
