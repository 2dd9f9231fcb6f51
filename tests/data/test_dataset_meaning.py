"""What a data set means once read: a split no label policy moves, every table row accounted for, errors that say
which folder to pass, EDA per source table under the shard policies, PadChest read sample by sample, and the join
of an external set by path."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from cxr_fast.cli import cli
from cxr_fast.config import ShardConfig, SynthConfig
from cxr_fast.data.datasets import Request, mimic, padchest, read_dataset
from cxr_fast.data.datasets.vocabulary import warn_near_duplicates
from cxr_fast.data.shards.inputs import read_inputs
from cxr_fast.data.shards.writer import ShardInput, write_shards
from cxr_fast.data.synth import write_synthetic_dataset
from cxr_fast.errors import CxrFastError
from cxr_fast.evaluation.external import join_by_path


def _chexpert(folder: Path) -> ShardInput:
    return ShardInput(folder, folder / "CheXpert-v1.0-small" / "train.csv", "chexpert")


def test_four_label_policies_give_one_split(chexpert_dir):
    splits = []
    for uncertain, blank in ((None, "negative"), ("ones:*", "negative"), ("zeros:*", "masked"),
                             ("ignore:*", "masked-all")):
        table, _ = read_inputs([_chexpert(chexpert_dir)], ShardConfig(uncertain=uncertain, blank=blank))
        splits.append(dict(zip(table.frame["key"], table.frame["final_split"])))
        assert set(splits[-1].values()) == {"train", "val", "test"}
    assert all(split == splits[0] for split in splits[1:])


def _mimic_tables(mimic_dir: Path, out: Path) -> Path:
    """MIMIC's tables in `out`, uncompressed (.csv), with one study's label row taken out and one image added to
    the metadata that has no file."""
    out.mkdir()
    for name in (mimic.METADATA, mimic.SPLIT, mimic.PATIENTS, f"{mimic.PREFIX}chexpert.csv.gz"):
        with gzip.open(mimic_dir / name, "rt") as handle:
            (out / name.removesuffix(".gz")).write_text(handle.read())
    labels = pd.read_csv(out / f"{mimic.PREFIX}chexpert.csv", dtype=str)
    labels.iloc[1:].to_csv(out / f"{mimic.PREFIX}chexpert.csv", index=False)
    meta, split = pd.read_csv(out / mimic.METADATA.removesuffix(".gz"), dtype=str), \
        pd.read_csv(out / mimic.SPLIT.removesuffix(".gz"), dtype=str)
    ghost = meta[meta["study_id"] == labels["study_id"].iloc[1]].iloc[:1].assign(dicom_id="ghost", ViewPosition="PA")
    pd.concat([meta, ghost]).to_csv(out / mimic.METADATA.removesuffix(".gz"), index=False)
    pd.concat([split, split[split["study_id"] == labels["study_id"].iloc[1]].iloc[:1].assign(dicom_id="ghost")]
              ).to_csv(out / mimic.SPLIT.removesuffix(".gz"), index=False)
    return out / f"{mimic.PREFIX}chexpert.csv"


def test_every_mimic_row_is_accounted_for_and_plain_csv_tables_are_read(mimic_dir, tmp_path):
    labels = _mimic_tables(mimic_dir, tmp_path / "tables")
    manifest = write_shards(ShardInput(mimic_dir, labels, "mimic-cxr-jpg"), ShardConfig(out=str(tmp_path / "s")))
    meta = pd.read_csv(labels.parent / "mimic-cxr-2.0.0-metadata.csv", dtype=str)
    unlabelled = meta["study_id"] == pd.read_csv(gzip.open(mimic_dir / f"{mimic.PREFIX}chexpert.csv.gz"),
                                                  dtype=str)["study_id"].iloc[0]
    labelled = meta[~unlabelled]
    dropped = {reason: entry["count"] for reason, entry in manifest["dropped"].items()}
    assert dropped == {"no label row": int(unlabelled.sum()), "no image": 1,
                       "view not kept (--views)": int((~labelled["ViewPosition"].isin(["PA", "AP"])).sum())}
    kept = sum(s["images"] for s in manifest["splits"].values())
    assert manifest["table_rows"] == len(meta) == kept + sum(dropped.values())
    assert manifest["dropped"]["no image"]["examples"] == ["ghost"]
    applied = manifest["datasets"][0]["applied"]
    assert applied["uncertain"] == mimic.DEFAULT_UNCERTAIN and applied["blank"] == "negative"
    assert applied["views"] == ["PA", "AP"]


def test_a_folder_one_level_off_is_an_error_saying_which_to_pass(chexpert_dir, mimic_dir, tmp_path):
    cases = [("chexpert", chexpert_dir / "CheXpert-v1.0-small", chexpert_dir / "CheXpert-v1.0-small" / "train.csv",
              "holds CheXpert-v1.0-small/"),
             ("chexpert", chexpert_dir.parent, chexpert_dir / "CheXpert-v1.0-small" / "train.csv", str(chexpert_dir)),
             ("mimic-cxr-jpg", mimic_dir / "files", mimic_dir / f"{mimic.PREFIX}chexpert.csv.gz", "holds files/")]
    for number, (name, images, labels, hint) in enumerate(cases):
        result = CliRunner().invoke(cli, ["shard", "--dataset", name, "--images", str(images), "--labels",
                                          str(labels), "--out", str(tmp_path / f"s{number}")])
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error: ") and hint in result.output and "Traceback" not in result.output


def test_an_empty_split_is_a_warning(chexpert_dir, tmp_path, caplog):
    copy = tmp_path / "CheXpert-v1.0-small"
    copy.mkdir()
    shutil.copy(chexpert_dir / "CheXpert-v1.0-small" / "train.csv", copy)
    valid = pd.read_csv(chexpert_dir / "CheXpert-v1.0-small" / "valid.csv", dtype=str)
    valid.assign(Path=valid["Path"].str.replace("/valid/", "/absent/")).to_csv(copy / "valid.csv", index=False)
    with caplog.at_level(logging.WARNING):
        table, _ = read_inputs([ShardInput(chexpert_dir, copy / "train.csv", "chexpert")], ShardConfig())
    assert "the test split is empty" in caplog.text and not (table.frame["final_split"] == "test").any()
    assert table.dropped["no image"]["count"] == (valid["Frontal/Lateral"] == "Frontal").sum()  # laterals: views


def test_eda_counts_each_source_table_under_the_shard_policies(chexpert_dir, tmp_path):
    root = chexpert_dir / "CheXpert-v1.0-small"
    result = CliRunner().invoke(cli, ["eda", "--dataset", "chexpert", "--labels", str(root / "train.csv"),
                                      "--uncertain", "ignore:*", "--blank", "masked-all", "--views", "all", "--out",
                                      str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "e" / "report.md").read_text()
    assert "## train.csv" in report and "## valid.csv" in report and "uncertain: `ignore:*`" in report
    for source in ("train.csv", "valid.csv"):
        table = pd.read_csv(root / source)
        edema = table["Edema"]
        section = report.split(f"## {source}")[1].split("## ")[0]
        row = f"| Edema | {(edema == 1).sum()} | {(edema == 0).sum()} | {(edema == -1).sum()} | {edema.isna().sum()} "
        assert row + f"| {edema.isin([0, 1]).sum()} |" in section  # stated: uncertain and blank masked
    table = pd.concat([pd.read_csv(root / "train.csv"), pd.read_csv(root / "valid.csv")])
    assert f"No Finding: {(table['No Finding'] == 1).sum()}** images" in report


def test_near_duplicate_class_names_are_warned(caplog):
    with caplog.at_level(logging.WARNING):
        pairs = warn_near_duplicates(("Pleural Effusion", "Pleural_Effusion", "cardiomegaly", "Cardiomegaly", "Mass"))
    assert pairs == [("Pleural Effusion", "Pleural_Effusion"), ("cardiomegaly", "Cardiomegaly")]
    assert "--relabel" in caplog.text


def test_a_relabel_file_with_aliases_is_refused(chexpert_dir, tmp_path):
    (tmp_path / "map.yaml").write_text("a: &x Effusion\nb: *x\n")
    with pytest.raises(CxrFastError, match="anchors and aliases"):
        read_inputs([_chexpert(chexpert_dir)], ShardConfig(relabel=str(tmp_path / "map.yaml")))


@pytest.fixture(scope="module")
def padchest_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("padchest")
    write_synthetic_dataset(out, SynthConfig(layout="padchest", n_images=48, source_size=64, seed=9, workers=2))
    return out


def test_padchest_shards_with_labels_equal_to_its_table(padchest_dir, tmp_path):
    table_path = padchest_dir / "PADCHEST_chest_x_ray_images_labels_160K.csv"
    table = pd.read_csv(table_path, dtype=str)
    bad = table.iloc[:2].assign(ImageID=["bad1.png", "bad2.png"], Labels=["['pleural effusion'", "__import__('os')"])
    pd.concat([table, bad]).to_csv(tmp_path / "labels.csv", index=False)
    manifest = write_shards(ShardInput(padchest_dir, tmp_path / "labels.csv", "padchest"),
                            ShardConfig(out=str(tmp_path / "s"), encoding="png"))
    classes = manifest["classes"]
    assert {"Effusion", "No Finding", "aortic elongation"} <= set(classes) and "normal" not in classes
    assert manifest["dropped"]["malformed Labels list"]["count"] == 2
    lateral = (table["Projection"] == "L").sum()
    assert manifest["dropped"]["view not kept (--views)"]["count"] == lateral
    rows = table.set_index("ImageID")
    seen = 0
    for tar_path in sorted((tmp_path / "s").glob("*/*.tar")):
        with tarfile.open(tar_path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in (n for n in members if n.endswith(".json")):
            meta = json.loads(members[name])
            listed = {padchest.SYNONYMS.get(n, n) for n in padchest.parse_labels(rows.loc[meta["image_index"],
                                                                                          "Labels"])}
            assert {c for c, v in zip(classes, meta["labels"]) if v} == listed and all(meta["mask"])
            source = cv2.imread(str(padchest_dir / rows.loc[meta["image_index"], "ImageDir"] / meta["image_index"]),
                                cv2.IMREAD_UNCHANGED)
            stored = cv2.imdecode(np.frombuffer(members[name[:-5] + ".png"], np.uint8), cv2.IMREAD_UNCHANGED)
            assert source.dtype == np.uint16 and stored.dtype == np.uint8  # 16 bits read over their range
            spread = (source.astype(float) - source.min()) * 255 / (source.max() - source.min())
            assert np.abs(stored - spread).max() <= 1
            seen += 1
    assert seen == len(table) - lateral


def test_padchest_label_lists_are_parsed_as_text_never_evaluated():
    assert padchest.parse_labels("['pleural effusion', ' cardiomegaly', '']") == ["pleural effusion", "cardiomegaly"]
    assert padchest.parse_labels('["normal"]') == ["normal"]
    for bad in ("__import__('os').system('x')", "['a', b]", "['a'", None, "{'a'}"):
        assert padchest.parse_labels(bad) is None


def test_an_external_set_joins_by_the_path_below_the_images_folder(chexpert_dir):
    root = chexpert_dir / "CheXpert-v1.0-small"
    table = read_dataset("chexpert", Request(chexpert_dir, root / "train.csv", views="all"))
    paths = table.frame["path"].iloc[:6].tolist()  # view1_frontal.jpg in many studies
    scored = pd.Index([f"/hospital/export/{p}" for p in paths] + ["/elsewhere/unknown.jpg"])
    names, rows = join_by_path(scored, table, root / "train.csv")
    assert names == list(scored[:6]) and table.frame["path"].iloc[rows].tolist() == paths
    assert pd.Series(paths).map(lambda p: p.rsplit("/", 1)[1]).duplicated().any()  # not joinable by file name
