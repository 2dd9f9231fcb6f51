"""Data-set descriptions: CheXpert's and MIMIC-CXR-JPG's layouts (synthetic, with their real column names and
folders), uncertain-label policies, masks in shards, a table spec, merged data sets, pad-to-square, JPEG
pass-through."""

from __future__ import annotations

import gzip
from dataclasses import replace
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_fast.config import DataConfig, ShardConfig, load_yaml
from cxr_fast.data.datasets import chexpert, mimic, nih
from cxr_fast.data.datasets.base import Request, apply_policies
from cxr_fast.data.loaders.loader import LoaderSpec, create_loader
from cxr_fast.data.shards.verify import verify
from cxr_fast.data.loaders.transforms import map_to_source, pad_to_square, process_gray
from cxr_fast.data.shards.writer import ShardInput, write_shards
from cxr_fast.errors import CxrFastError


# CheXpert's classes in the shared vocabulary: its "Pleural Effusion" is NIH's "Effusion".
SHARED_CHEXPERT = [chexpert.SYNONYMS.get(c, c) for c in chexpert.CLASSES]


def _chexpert_input(folder: Path) -> ShardInput:
    return ShardInput(folder, folder / "CheXpert-v1.0-small" / "train.csv", "chexpert")


def _mimic_input(folder: Path) -> ShardInput:
    return ShardInput(folder, folder / "mimic-cxr-2.0.0-chexpert.csv.gz", "mimic-cxr-jpg")


def _samples(shards: Path) -> dict[str, dict]:
    """key -> {ext: bytes} over every tar of a shard set."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(shards.glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


# ------------------------------------------------------------------------------------------ uncertainty policies
def test_uncertainty_policies_give_the_labels_and_masks_of_the_paper():
    classes = ("Atelectasis", "Edema", "Fracture")
    nan = np.nan
    raw = np.array([[1, 0, -1], [-1, -1, nan], [0, nan, 1]], dtype=float)
    expected = {  # (--uncertain, --blank) -> labels, NaN = masked (not stated)
        ("ignore:*", "negative"): [[1, 0, nan], [nan, nan, 0], [0, 0, 1]],
        ("zeros:*", "negative"): [[1, 0, 0], [0, 0, 0], [0, 0, 1]],
        ("ones:*", "negative"): [[1, 0, 1], [1, 1, 0], [0, 0, 1]],
        ("ones:*", "masked"): [[1, 0, 1], [1, 1, nan], [0, nan, 1]],
        ("ones:Atelectasis,Edema zeros:*", "negative"): [[1, 0, 0], [1, 1, 0], [0, 0, 1]],
        ("ignore:Edema;ones:Fracture", "masked"): [[1, 0, 1], [0, nan, nan], [0, nan, 1]],
    }
    for (uncertain, blank), labels in expected.items():
        np.testing.assert_array_equal(_policies(raw, classes, uncertain, blank), labels,
                                      err_msg=f"{uncertain} / {blank}")
    # CheXpert's default: the paper's U-Ones for Atelectasis and Edema, U-Zeros for the rest.
    np.testing.assert_array_equal(_policies(raw, classes, None, "negative", chexpert.DEFAULT_UNCERTAIN),
                                  expected[("ones:Atelectasis,Edema zeros:*", "negative")])
    for bad, message in (("maybe:Edema", "POLICY"), ("ones:* zeros:*", "two policies"),
                         ("ones:Edema ignore:Edema", "two policies"), ("", "empty"), ("  ; ", "empty")):
        with pytest.raises(CxrFastError, match=message):
            _policies(raw, classes, bad, "negative")


def _policies(raw, classes, uncertain, blank, default="zeros:*", no_finding=None):
    return apply_policies(raw, classes, Request(Path("."), Path("."), uncertain, blank), default, no_finding)


def test_masked_blanks_are_negative_on_no_finding_images_unless_masked_all():
    classes = ("No Finding", "Edema", "Fracture")
    nan = np.nan
    raw = np.array([[1, nan, nan], [nan, 1, nan], [1, -1, nan]], dtype=float)
    np.testing.assert_array_equal(_policies(raw, classes, "ignore:*", "masked", no_finding="No Finding"),
                                  [[1, 0, 0], [nan, 1, nan], [1, nan, 0]])
    np.testing.assert_array_equal(_policies(raw, classes, "ignore:*", "masked-all", no_finding="No Finding"),
                                  [[1, nan, nan], [nan, 1, nan], [1, nan, nan]])


def test_an_uncertain_policy_for_no_class_of_the_set_is_an_error(chexpert_dir, tmp_path):
    with pytest.raises(CxrFastError, match="Efusion"):
        write_shards(_chexpert_input(chexpert_dir), ShardConfig(out=str(tmp_path / "s"), uncertain="ones:Efusion"))


# --------------------------------------------------------------------------------------------------- CheXpert
def test_chexpert_layout_shards_with_its_split_views_labels_and_masks(chexpert_dir, tmp_path):
    root = chexpert_dir / "CheXpert-v1.0-small"
    train, valid = pd.read_csv(root / "train.csv"), pd.read_csv(root / "valid.csv")
    assert list(train.columns) == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *chexpert.CLASSES]
    manifest = write_shards(_chexpert_input(chexpert_dir),
                            ShardConfig(out=str(tmp_path / "s"), uncertain="ignore:*", blank="masked", shard_size=16))
    assert manifest["format_version"] == 3 and manifest["classes"] == SHARED_CHEXPERT
    assert manifest["image_ext"] == "jpg" and manifest["config"]["encoding"] == "jpeg"
    table = pd.concat([train, valid], ignore_index=True).set_index("Path")
    samples = _samples(tmp_path / "s")
    frontal = table[table["Frontal/Lateral"] == "Frontal"]
    assert len(samples) == len(frontal)  # laterals left out by default
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        path = f"CheXpert-v1.0-small/{meta['image_index']}"
        raw = table.loc[path, list(chexpert.CLASSES)].to_numpy(float)
        mask = np.frombuffer(sample["mask"], np.uint8)
        normal = raw[chexpert.CLASSES.index("No Finding")] == 1  # its blanks are negative (torchxrayvision's rule)
        np.testing.assert_array_equal(mask, (np.isin(raw, (0, 1)) | normal & np.isnan(raw)).astype(np.uint8))
        np.testing.assert_array_equal(np.frombuffer(sample["labels"], np.uint8), (raw == 1).astype(np.uint8))
        assert meta["split"] == "test" if path.split("/")[1] == "valid" else meta["split"] in ("train", "val")
        assert sample["jpg"] == (chexpert_dir / path).read_bytes()  # stored as it came: no second lossy generation
        assert meta["patient_id"] == path.split("/")[2] and meta["view"] in ("PA", "AP")
    assert manifest["splits"]["train"]["stated"]["Edema"] < manifest["splits"]["train"]["images"]
    assert verify(tmp_path / "s", deep=True) == []


def test_uncertain_policies_may_be_a_yaml_mapping(tmp_path):
    (tmp_path / "shard.yaml").write_text("uncertain:\n  ones: [Atelectasis, Edema]\n  ignore: '*'\n")
    assert load_yaml(tmp_path / "shard.yaml", ShardConfig).uncertain == "ones:Atelectasis,Edema ignore:*"


def test_chexpert_keeps_laterals_when_asked_and_a_missing_valid_csv_is_named(chexpert_dir, tmp_path):
    manifest = write_shards(_chexpert_input(chexpert_dir), ShardConfig(out=str(tmp_path / "all"), views="all"))
    assert sum(s["images"] for s in manifest["splits"].values()) == 72
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "train.csv").write_bytes((chexpert_dir / "CheXpert-v1.0-small" / "train.csv").read_bytes())
    with pytest.raises(CxrFastError, match="valid.csv"):
        write_shards(ShardInput(chexpert_dir, copy / "train.csv", "chexpert"), ShardConfig(out=str(tmp_path / "x")))


# ---------------------------------------------------------------------------------------------- MIMIC-CXR-JPG
def test_mimic_layout_keeps_the_official_split_and_labels_each_image_by_its_study(mimic_dir, tmp_path):
    manifest = write_shards(_mimic_input(mimic_dir), ShardConfig(out=str(tmp_path / "s"), shard_size=16))
    with gzip.open(mimic_dir / mimic.METADATA) as f:
        meta_table = pd.read_csv(f, dtype=str).set_index("dicom_id")
    with gzip.open(mimic_dir / mimic.SPLIT) as f:
        split_table = pd.read_csv(f, dtype=str).set_index("dicom_id")
    with gzip.open(mimic_dir / "mimic-cxr-2.0.0-chexpert.csv.gz") as f:
        labels = pd.read_csv(f, dtype={"subject_id": str, "study_id": str}).set_index("study_id")
    with gzip.open(mimic_dir / mimic.PATIENTS) as f:
        people = pd.read_csv(f, dtype={"subject_id": str}).set_index("subject_id")
    samples = _samples(tmp_path / "s")
    assert len(samples) == int(meta_table["ViewPosition"].isin(["PA", "AP"]).sum())
    names = {"train": "train", "validate": "val", "test": "test"}
    for key, sample in samples.items():
        meta = json.loads(sample["json"])
        row = meta_table.loc[meta["image_index"]]
        assert meta["split"] == names[split_table.loc[meta["image_index"], "split"]]
        study = labels.loc[row["study_id"], list(chexpert.CLASSES)].to_numpy(float)
        expected = np.where(study == -1, float(0), study)  # U-Zeros except Atelectasis and Edema (U-Ones)
        for name in ("Atelectasis", "Edema"):
            c = chexpert.CLASSES.index(name)
            expected[c] = 1.0 if study[c] == -1 else study[c]
        np.testing.assert_array_equal(np.frombuffer(sample["labels"], np.uint8), np.nan_to_num(expected))
        assert meta["age"] == people.loc[row["subject_id"], "anchor_age"]
        assert meta["sex"] == people.loc[row["subject_id"], "gender"]
        assert sample["jpg"] == (mimic_dir / "files" / f"p{row['subject_id'][:2]}" / f"p{row['subject_id']}" /
                                 f"s{row['study_id']}" / f"{meta['image_index']}.jpg").read_bytes()
    assert all(manifest["splits"][s]["images"] for s in ("train", "val", "test"))


# ----------------------------------------------------------------------------------------------- any table
def test_a_table_spec_names_the_columns_of_any_data_set(chexpert_dir, tmp_path):
    train = pd.read_csv(chexpert_dir / "CheXpert-v1.0-small" / "train.csv")
    table = pd.DataFrame({"file": train["Path"], "pid": train["Path"].str.split("/").str[2],
                          "Pneumo": train["Pneumothorax"], "Opacity": train["Lung Opacity"], "years": train["Age"],
                          "gender": train["Sex"]})
    table.to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "spec.yaml").write_text("image: file\npatient: pid\nclasses: [Pneumo, Opacity]\nage: years\n"
                                        "sex: gender\nuncertain: 'ignore:*'\n")
    manifest = write_shards(ShardInput(chexpert_dir, tmp_path / "t.csv", "table", tmp_path / "spec.yaml"),
                            ShardConfig(out=str(tmp_path / "s")))
    assert manifest["classes"] == ["Pneumo", "Opacity"]
    assert sum(s["images"] for s in manifest["splits"].values()) == len(table)
    stated = sum(s["stated"]["Pneumo"] for s in manifest["splits"].values())
    assert stated == int((train["Pneumothorax"] != -1).sum())  # -1 ignored, blank negative
    (tmp_path / "bad.yaml").write_text("image: file\nclasses: [Pneumo]\n")
    with pytest.raises(CxrFastError, match="patient"):
        write_shards(ShardInput(chexpert_dir, tmp_path / "t.csv", "table", tmp_path / "bad.yaml"),
                     ShardConfig(out=str(tmp_path / "x")))


# ------------------------------------------------------------------------------------------------ merged sets
def test_merged_nih_and_chexpert_share_one_effusion_stated_on_both(synth_dir, chexpert_dir, tmp_path):
    inputs = [ShardInput(synth_dir / "images_001", synth_dir / "Data_Entry_2017.csv"), _chexpert_input(chexpert_dir)]
    manifest = write_shards(inputs, ShardConfig(out=str(tmp_path / "s"), shard_size=32))
    classes = manifest["classes"]
    assert classes[:14] == list(nih.CLASSES) and set(SHARED_CHEXPERT) <= set(classes)
    assert "Pleural Effusion" not in classes and len(classes) == len(set(nih.CLASSES) | set(SHARED_CHEXPERT)) == 21
    assert manifest["image_ext"] == "png"  # not every source is a JPEG: lossless
    assert manifest["datasets"][1]["applied"]["class_map"]["Pleural Effusion"] == "Effusion"
    chexpert_rows = _chexpert_table(chexpert_dir)
    effusion = classes.index("Effusion")
    for sample in _samples(tmp_path / "s").values():
        meta = json.loads(sample["json"])
        own = set(nih.CLASSES if meta["dataset"] == "nih" else SHARED_CHEXPERT)
        mask = np.frombuffer(sample["mask"], np.uint8)
        assert mask.tolist() == [int(c in own) for c in classes] and mask[effusion] == 1
        if meta["dataset"] == "chexpert":  # the merged class holds CheXpert's Pleural Effusion
            raw = chexpert_rows.loc[f"CheXpert-v1.0-small/{meta['image_index']}", "Pleural Effusion"]
            assert np.frombuffer(sample["labels"], np.uint8)[effusion] == int(raw == 1)
        assert meta["patient_id"].startswith(meta["dataset"] + ":")
    for split in ("train", "val", "test"):
        counts = manifest["splits"][split]["datasets"]
        assert set(counts) == {"nih", "chexpert"} and sum(counts.values()) == manifest["splits"][split]["images"]
        assert manifest["splits"][split]["stated"]["Effusion"] == manifest["splits"][split]["images"]


def test_relabel_and_classes_change_the_map_and_the_manifest_records_it(synth_dir, chexpert_dir, tmp_path):
    (tmp_path / "map.yaml").write_text("Pleural Effusion: Pleural Effusion\nLung Lesion: Mass\nSupport Devices: null\n")
    inputs = [ShardInput(synth_dir / "images_001", synth_dir / "Data_Entry_2017.csv"), _chexpert_input(chexpert_dir)]
    config = ShardConfig(out=str(tmp_path / "s"), relabel=str(tmp_path / "map.yaml"))
    manifest = write_shards(inputs, config)
    classes = manifest["classes"]
    assert {"Effusion", "Pleural Effusion", "Mass"} <= set(classes) and "Lung Lesion" not in classes
    assert "Support Devices" not in classes
    applied = manifest["datasets"][1]["applied"]["class_map"]
    assert applied["Lung Lesion"] == "Mass" and applied["Support Devices"] is None
    assert manifest["config"]["relabel"] == str(tmp_path / "map.yaml")
    mass = classes.index("Mass")
    for sample in _samples(tmp_path / "s").values():  # Mass: NIH's, and CheXpert's Lung Lesion, stated on both
        assert np.frombuffer(sample["mask"], np.uint8)[mass] == 1
    chosen = write_shards(inputs, replace(config, out=str(tmp_path / "c"), classes="Effusion,Cardiomegaly"))
    assert chosen["classes"] == ["Effusion", "Cardiomegaly"]
    with pytest.raises(CxrFastError, match="Efusion"):
        write_shards(inputs, replace(config, out=str(tmp_path / "d"), classes="Efusion"))


def _chexpert_table(folder: Path) -> pd.DataFrame:
    root = folder / "CheXpert-v1.0-small"
    return pd.concat([pd.read_csv(root / "train.csv"), pd.read_csv(root / "valid.csv")]).set_index("Path")


# --------------------------------------------------------------------------------------------- pad to square
def test_pad_centres_a_tall_film_on_black_and_squash_does_not():
    gray = np.full((120, 100), 200, np.uint8)
    padded = pad_to_square(gray)
    assert padded.shape == (120, 120) and (padded[:, :10] == 0).all() and (padded[:, 10:110] == 200).all()
    data = DataConfig(image_size=60, augment=DataConfig().augment)
    out_pad = process_gray(gray, data)
    out_squash = process_gray(gray, DataConfig(image_size=60, fit="squash"))
    assert out_pad.shape == out_squash.shape == (60, 60)
    assert out_pad[:, :3].max() < 40 and out_squash[:, :3].min() > 100
    square = np.full((80, 80), 90, np.uint8)
    np.testing.assert_array_equal(process_gray(square, data), process_gray(square, DataConfig(image_size=60,
                                                                                               fit="squash")))
    heat = np.zeros((60, 60), np.float32)
    heat[:, 5:55] = 1.0
    back = map_to_source(heat, gray.shape, "pad")
    assert back.shape == gray.shape and back[:, 5:95].min() > 0.99


def test_dali_pads_as_opencv_does(chexpert_dir, tmp_path):
    pytest.importorskip("nvidia.dali")
    write_shards(_chexpert_input(chexpert_dir), ShardConfig(out=str(tmp_path / "s"), encoding="png"))
    images = {}
    for loader, fit in (("dali", "pad"), ("torch", "pad"), ("torch", "squash")):
        spec = LoaderSpec(tmp_path / "s", "test", DataConfig(image_size=64, workers=0, fit=fit), batch_size=64,
                          loader=loader, normalize=False)
        batch = next(iter(create_loader(spec)))
        images[loader, fit] = dict(zip(batch.keys, batch.images[:, 0].numpy().astype(float)))

    def difference(a, b):
        return np.mean([np.abs(images[a][k] - images[b][k]).mean() for k in images[a]])

    # Within the gray levels that cubic resizing differs from INTER_AREA at this small size, far from squashing.
    assert difference(("dali", "pad"), ("torch", "pad")) < 0.5 * difference(("dali", "pad"), ("torch", "squash"))
    assert all(image[:, :2].mean() < 25 for image in images["dali", "pad"].values())  # the padding is black


# -------------------------------------------------------------------------------------------- older formats
def test_format_2_shards_read_as_every_label_stated(chexpert_dir, tmp_path):
    write_shards(_chexpert_input(chexpert_dir), ShardConfig(out=str(tmp_path / "s"), uncertain="ignore:*"))
    spec = LoaderSpec(tmp_path / "s", "train", DataConfig(image_size=32, workers=0), batch_size=64, loader="torch")
    assert next(iter(create_loader(spec))).targets.isnan().any()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    manifest["format_version"] = 2
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(manifest))
    assert not next(iter(create_loader(spec))).targets.isnan().any()


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.assign(Edema=t["Edema"].astype(object).where(t.index != 3, "2")), r"1, 0, -1 or blank; row\(s\) 5"),
    (lambda t: pd.concat([t, t.iloc[[0]]]), "duplicate image name"),
    (lambda t: t.assign(Path=t["Path"].str.replace("patient", "person")), "no patientNNNNN folder"),
    (lambda t: t.assign(Path="../" + t["Path"]), "leads outside --images"),
])
def test_a_damaged_chexpert_table_is_an_error_naming_the_row(chexpert_dir, tmp_path, damage, message):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    damage(pd.read_csv(chexpert_dir / root.name / "train.csv")).to_csv(root / "train.csv", index=False)
    (root / "valid.csv").write_bytes((chexpert_dir / root.name / "valid.csv").read_bytes())
    with pytest.raises(CxrFastError, match=message):
        write_shards(ShardInput(chexpert_dir, root / "train.csv", "chexpert"), ShardConfig(out=str(tmp_path / "s")))
