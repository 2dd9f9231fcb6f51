"""Hostile input, round 2 (docs/RELIABILITY.md): decompression bombs past the pixel limit refused before any
decoding, shard sets the user had never lost, tampered manifests caught by verify --deep and refused by analyze,
metadata read as it is written, a resume with the command line the job started with, and the small ones. Every file
is made in the test."""

from __future__ import annotations

import json
import shutil
import tarfile
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from conftest import write_dicom
from cxr_fast.cli import cli
from cxr_fast.config import ShardConfig
from cxr_fast.data.images import dicom as dicom_module
from cxr_fast.data.images import source as source_module
from cxr_fast.data.shards.verify import verify
from cxr_fast.data.shards.writer import ShardInput, write_shards
from cxr_fast.errors import BadInput, CxrFastError

TINY_FLAGS = ["--model", "convnext_atto", "--no-pretrained", "--image-size", "64", "--workers", "0"]


def _run(args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _jpeg_claiming(width: int, height: int, junk: bytes = b"") -> bytes:
    """A small real JPEG whose start-of-frame says width x height (a decompression bomb's header)."""
    _ok, buf = cv2.imencode(".jpg", np.full((16, 16), 128, np.uint8))
    data = bytearray(buf.tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data[:2]) + junk + bytes(data[2:])


def _never(*_args, **_kwargs):
    raise AssertionError("a decoder was reached")


# 1 ------------------------------------------------------------------------ memory exhaustion past --max-pixels
def test_jpeg_inside_a_dicom_is_sized_from_its_own_header(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "bomb.dcm", np.zeros((1024, 1024), np.uint8), jpeg_bytes=_jpeg_claiming(40000,
                                                                                                          40000))
    monkeypatch.setattr(dicom_module, "_pixels", _never)
    with pytest.raises(BadInput, match="compressed image is 40000 x 40000 pixels, but the header says 1024 x 1024"):
        dicom_module.read_dicom(path, max_pixels=64_000_000)


def test_a_deflated_dicom_is_inflated_within_a_bound_before_it_is_read(tmp_path, monkeypatch):
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = write_dicom(tmp_path / "plain.dcm", np.zeros((4200, 4200), np.uint8))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    assert (tmp_path / "deflated.dcm").stat().st_size < 200_000  # 17.6 MB of pixels, deflated
    monkeypatch.setattr(pydicom, "dcmread", _never)  # nothing may inflate it whole
    with pytest.raises(BadInput, match="deflated DICOM data inflates past"):
        dicom_module.read_dicom(tmp_path / "deflated.dcm", max_pixels=100_000)
    monkeypatch.undo()
    assert dicom_module.read_dicom(tmp_path / "deflated.dcm", max_pixels=20_000_000).shape == (4200, 4200)


def test_the_bounded_inflate_ends_on_a_chunk_boundary_with_bytes_after_the_stream():
    from cxr_fast.data.images.headers import inflated_size_within

    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    blob = deflate.compress(bytes(3 << 20)) + deflate.flush() + b"\0"  # 3 MiB: the output ends on a 1 MiB chunk
    assert inflated_size_within(blob, 4 << 20) and not inflated_size_within(blob, 2 << 20)
    assert inflated_size_within(blob[:100], 4 << 20)  # a truncated stream ends the count too


@pytest.mark.parametrize("junk", [b"", b"\x00\x01\x02"])
def test_a_jpeg_header_is_found_past_junk_bytes(tmp_path, monkeypatch, junk):
    path = tmp_path / "bomb.jpg"
    path.write_bytes(_jpeg_claiming(30000, 30000, junk))
    monkeypatch.setattr(source_module.cv2, "imdecode", _never)
    with pytest.raises(BadInput, match="claims 30000 x 30000 pixels, more than --max-pixels"):
        source_module.read_gray(path, max_pixels=64_000_000)


def test_a_file_whose_size_cannot_be_read_is_refused_before_decoding(tmp_path, monkeypatch):
    cv2.imwrite(str(tmp_path / "x.bmp"), np.zeros((8, 8), np.uint8))
    (tmp_path / "x.png").write_bytes((tmp_path / "x.bmp").read_bytes())  # a BMP behind a .png name
    monkeypatch.setattr(source_module.cv2, "imdecode", _never)
    with pytest.raises(BadInput, match="not a PNG, JPEG or DICOM file: refused before decoding"):
        source_module.read_gray(tmp_path / "x.png", max_pixels=1000)


# 2 ----------------------------------------------------------------------------------- nothing lost that the user had
def test_shard_files_no_manifest_describes_are_never_replaced(synth_dir, tmp_path):
    out = tmp_path / "out"
    for split in ("train", "val"):
        (out / split).mkdir(parents=True)
        for n in range(3):
            (out / split / f"shard-{n:06d}.tar").write_bytes(b"another tool's shard")
    before = _tree(out)
    result = _run(["shard", "--images", synth_dir / "images_001", "--labels", synth_dir / "Data_Entry_2017.csv",
                   "--out", out])
    assert result.exit_code == 2 and "shard files that no manifest describes" in result.output
    assert _tree(out) == before


def test_a_failing_overwrite_keeps_the_old_set_readable_and_a_good_one_swaps_it(synth_dir, tmp_path):
    images, labels = synth_dir / "images_001", synth_dir / "Data_Entry_2017.csv"
    out = tmp_path / "out"
    write_shards(ShardInput(images, labels), ShardConfig(out=str(out), shard_size=16))
    before = _tree(out)
    broken = tmp_path / "images"
    shutil.copytree(images, broken)
    next(broken.rglob("*.png")).write_bytes(b"not an image")
    with pytest.raises(CxrFastError, match="not a PNG, JPEG or DICOM file"):
        write_shards(ShardInput(broken, labels), ShardConfig(out=str(out), shard_size=8), overwrite=True)
    assert _tree(out) == before and verify(out, deep=True) == []
    manifest = write_shards(ShardInput(images, labels), ShardConfig(out=str(out), shard_size=8), overwrite=True)
    assert manifest["config"]["shard_size"] == 8 and verify(out, deep=True) == []
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test", "train", "val"]


def test_bad_dicom_headers_are_skipped_like_unreadable_images(synth_dir, tmp_path):
    import pydicom

    images, rows = tmp_path / "images", []
    images.mkdir()
    pixels = cv2.imread(str(next((synth_dir / "images_001/images").glob("*.png"))), cv2.IMREAD_GRAYSCALE)
    for i in range(12):
        path = write_dicom(images / f"im{i:02d}.dcm", pixels)
        rows.append((path.name, "No Finding", str(i)))
    for name, change in (("im00.dcm", ("WindowCenter", "DS", "abc")), ("im01.dcm", ("NumberOfFrames", "IS", "x")),
                         ("im02.dcm", None)):
        ds = pydicom.dcmread(images / name)
        if change:
            ds.add_new(change[0], change[1], "1")
            ds[change[0]]._value = change[2]  # as a careless or hostile export writes it
            if change[0] == "WindowCenter":
                ds.add_new("WindowWidth", "DS", "100")
        else:
            ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6"  # a private transfer syntax
        ds.save_as(images / name, enforce_file_format=True)
    pd.DataFrame(rows, columns=["Image Index", "Finding Labels", "Patient ID"]).to_csv(tmp_path / "t.csv",
                                                                                         index=False)
    manifest = write_shards(ShardInput(images, tmp_path / "t.csv"), ShardConfig(out=str(tmp_path / "s"), on_error="skip",
                                                                    shard_size=4, val_fraction=0.2))
    skipped = {Path(s["file"]).name: s["reason"] for s in manifest["skipped"]}
    assert set(skipped) == {"im00.dcm", "im01.dcm", "im02.dcm"}, skipped
    assert not list((tmp_path / "s").rglob("*.tmp"))


def test_dicom_files_named_by_uid_are_found(synth_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    pixels = cv2.imread(str(next((synth_dir / "images_001/images").glob("*.png"))), cv2.IMREAD_GRAYSCALE)
    names = [f"1.2.840.113619.2.55.3.{i}.{100 + i}" for i in range(10)]
    for name in names:
        write_dicom(images / name, pixels)
    pd.DataFrame({"Image Index": names, "Finding Labels": "No Finding", "Patient ID": [str(i) for i in range(10)]}
                 ).to_csv(tmp_path / "t.csv", index=False)
    manifest = write_shards(ShardInput(images, tmp_path / "t.csv"), ShardConfig(out=str(tmp_path / "s"), val_fraction=0.2))
    assert manifest["dropped"] == {} and sum(s["images"] for s in manifest["splits"].values()) == 10


# 3 ------------------------------------------------------------------------------ tampered manifests and members
def _copy(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    return copy, json.loads((copy / "manifest.json").read_text())


def _save(copy, manifest):
    (copy / "manifest.json").write_text(json.dumps(manifest))


def test_verify_deep_catches_a_sample_copied_into_another_split(synth_shards, tmp_path):
    """A careful tamperer: a validation sample appended to a test shard, with the shard's sha256, index, counts and
    key lists updated to match, so every shallow check passes; the bytes still tell."""
    from cxr_fast.data.shards.tars import add_member, dali_index
    from cxr_fast.files import sha256_file

    copy, manifest = _copy(synth_shards, tmp_path)
    val, test = manifest["splits"]["val"]["shards"][0], manifest["splits"]["test"]["shards"][0]
    with tarfile.open(copy / val) as tar:
        members = tar.getmembers()
        key = members[0].name.split(".")[0]
        payload = {m.name: tar.extractfile(m).read() for m in members if m.name.split(".")[0] == key}
    with tarfile.open(copy / test, "a") as tar:
        for name, data in payload.items():
            add_member(tar, name, data)
    record, source = manifest["shards"][test], manifest["shards"][val]
    meta = json.loads(payload[f"{key}.json"])
    record["sha256"], record["samples"] = sha256_file(copy / test), record["samples"] + 1
    for field, value in (("keys", key), ("image_index", meta["image_index"]), ("patients", meta["patient_id"]),
                         ("age", source["age"][0]), ("sex", source["sex"][0]), ("view", source["view"][0])):
        record[field].append(value)
    manifest["splits"]["test"]["images"] += 1
    (copy / record["index"]).write_text(dali_index(copy / test))
    _save(copy, manifest)
    assert verify(copy) == []  # the shallow checks are fooled
    problems = " ".join(verify(copy, deep=True))
    assert f"sample {key}: found in val too" in problems and "patient leak" in problems


def test_verify_deep_catches_swapped_image_names_and_analyze_refuses_duplicate_keys(synth_shards, tiny_run,
                                                                                      tmp_path):
    copy, manifest = _copy(synth_shards, tmp_path)
    record = manifest["shards"][manifest["splits"]["test"]["shards"][0]]
    record["image_index"][0], record["image_index"][1] = record["image_index"][1], record["image_index"][0]
    _save(copy, manifest)
    assert any("the manifest lists" in p for p in verify(copy, deep=True))
    copy2, manifest = _copy(synth_shards, tmp_path / "two")
    shards = manifest["splits"]["test"]["shards"]
    manifest["splits"]["test"]["shards"] = shards + shards[:1]  # a shard listed twice
    _save(copy2, manifest)
    result = _run(["analyze", "--checkpoint", tiny_run / "checkpoints/best.pt", "--shards", copy2, "--out",
                   tmp_path / "a", "--bootstrap", "0", "--top-k", "0"])
    assert result.exit_code == 2 and "is listed twice in split 'test'" in result.output


@pytest.mark.parametrize("kind", ["empty", "symlink"])
def test_an_empty_or_linked_member_is_named(synth_shards, tmp_path, kind):
    from cxr_fast.data.shards.tars import walk_tar

    tar_path = tmp_path / "bad.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("k1.labels")
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info, __import__("io").BytesIO(b""))
    with pytest.raises(CxrFastError, match=f"member 'k1.labels' is {'empty' if kind == 'empty' else 'not a regular'}"):
        list(walk_tar(tar_path))


# 4 ------------------------------------------------------------------------------------ metadata read as written
def test_ages_and_sexes_are_read_as_written_and_what_is_lost_is_counted(synth_dir, tmp_path):
    from cxr_fast.data.datasets.labels import demographics, unusable_values

    table = pd.DataFrame({"Patient Age": ["058Y", "045M", "12D", "-5", "414", "60", "", "3W"],
                          "Patient Gender": ["M", "male", "Female", "x", "F", "WOMAN", "", "m"]})
    given = {"age": table["Patient Age"], "sex": table["Patient Gender"]}
    parsed = demographics(given["age"], given["sex"], None, len(table))
    np.testing.assert_allclose(parsed["age"].to_numpy()[:3], [58, 3.75, 12 / 365.25])
    assert parsed["age"].isna().tolist() == [False, False, False, True, True, False, True, False]
    assert parsed["sex"].tolist() == ["M", "M", "F", None, "F", "F", None, "M"]
    report = unusable_values(given, parsed)
    assert report == {"age": {"count": 2, "examples": ["-5", "414"]}, "sex": {"count": 1, "examples": ["x"]}}


# 5 ----------------------------------------------------------------------- resume with the original command line
def test_a_requeued_job_resumes_with_the_command_line_it_started_with(synth_shards, tmp_path):
    start = ["train", "--shards", synth_shards, "--out", tmp_path / "run", *TINY_FLAGS, "--batch-size", "4",
             "--accum", "2", "--epochs", "2", "--lr", "1e-3", "--seed", "3", "--loader", "torch", "--amp", "off",
             "--in-chans", "1", "--effective-batch", "8", "--ema", "0", "--val-every", "1", "--no-compile",
             "--device", "cpu"]
    assert _run(start + ["--max-steps", "2"]).exit_code == 0
    result = _run(start + ["--resume"])
    assert result.exit_code == 0, result.output
    auto = ["train", "--shards", synth_shards, "--out", tmp_path / "auto", *TINY_FLAGS, "--batch-size", "auto",
            "--epochs", "1", "--device", "cpu"]
    assert _run(auto + ["--max-steps", "1"]).exit_code == 0
    assert _run(auto + ["--resume"]).exit_code == 0  # auto matches the 32 it resolved to
    refused = _run(start + ["--resume", "--lr", "2e-3"])
    assert refused.exit_code == 2 and "--lr 0.002 differs from its 0.001" in refused.output


# 6 ---------------------------------------------------------------------------------------------- the small ones
def test_a_seed_past_32_bits_is_refused_before_any_work(synth_shards, tmp_path):
    result = _run(["train", "--shards", synth_shards, "--out", tmp_path / "run", "--seed", str(2 ** 32)])
    assert result.exit_code == 2 and "must be <= 4294967295" in result.output and not (tmp_path / "run").exists()


def test_a_checkpoint_with_a_bad_stored_config_or_thresholds_is_named(tiny_run, tmp_path):
    from cxr_fast.training.checkpoint import load_checkpoint, load_model, save_checkpoint

    payload = load_checkpoint(tiny_run / "checkpoints/best.pt")
    bad = dict(payload, config=dict(payload["config"], optim=dict(payload["config"]["optim"], lr=-1.0)))
    save_checkpoint(bad, tmp_path / "config.pt")
    with pytest.raises(CxrFastError, match=r"config.pt: its stored config.*optim.lr must be > 0") as error:
        load_model(tmp_path / "config.pt")
    assert "--lr" not in str(error.value)
    old = {k: v for k, v in payload.items() if k not in ("format", "format_version", "checksum")}
    old["thresholds"] = [float("nan")] * len(old["thresholds"])
    torch.save(old, tmp_path / "v1.pt")
    with pytest.raises(CxrFastError, match="thresholds must be 14 finite numbers in"):
        load_model(tmp_path / "v1.pt")


def test_a_box_outside_the_image_is_an_error(tmp_path):
    from cxr_fast.evaluation.analyze import read_boxes

    (tmp_path / "b.csv").write_text("Image Index,Finding Label,x,y,w,h\na.png,Mass,1000,10,100,50\n")
    with pytest.raises(CxrFastError, match="row 2 has a box reaching past the 1024 x 1024"):
        read_boxes(tmp_path / "b.csv")
