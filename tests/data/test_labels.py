import gzip

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import REAL_TABLE, needs_real_data
from cxr_fast.data.datasets import nih
from cxr_fast.cli import cli
from cxr_fast.errors import CxrFastError
from cxr_fast.data.datasets.nih import format_finding_labels, multi_hot, parse_finding_labels, read_label_table


def _table(tmp_path, rows, columns=("Image Index", "Finding Labels", "Patient ID")):
    path = tmp_path / "Data_Entry_2017.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return path


def test_no_finding_is_all_zero_and_order_is_canonical():
    assert parse_finding_labels("No Finding").sum() == 0
    vector = parse_finding_labels("Hernia|Atelectasis")
    assert vector[0] == 1 and vector[nih.CLASSES.index("Hernia")] == 1 and vector.sum() == 2
    assert format_finding_labels(vector) == "Atelectasis|Hernia"


def test_multi_hot_matches_parse(tmp_path):
    rows = [("a.png", "Mass|Nodule", 1), ("b.png", "No Finding", 1), ("c.png", "Pleural_Thickening", 2)]
    table = read_label_table(_table(tmp_path, rows))
    expected = np.stack([parse_finding_labels(r[1]) for r in rows])
    np.testing.assert_array_equal(multi_hot(table), expected)


@pytest.mark.parametrize("rows, columns, message", [
    ([("a.png", "Mass", 1)], ("Image Index", "Labels", "Patient ID"), "missing column(s) 'Finding Labels'"),
    ([("a.png", "Mass", 1), ("b.png", "Tumour|Mass", 2)], None, "unknown finding name(s) 'Tumour' (first in row 3"),
    ([("a.png", "Mass", 1), ("a.png", "Nodule", 2)], None, "duplicate image name(s) a.png"),
])
def test_bad_tables_say_what_is_wrong(tmp_path, rows, columns, message):
    path = _table(tmp_path, rows, columns or ("Image Index", "Finding Labels", "Patient ID"))
    with pytest.raises(CxrFastError, match=None) as error:
        read_label_table(path)
    assert message in str(error.value)


def test_bad_table_on_the_command_line_exits_2_without_traceback(tmp_path):
    path = _table(tmp_path, [("a.png", "Tumour", 1)])
    images = tmp_path / "images"
    images.mkdir()
    result = CliRunner().invoke(cli, ["shard", "--images", str(images), "--labels", str(path),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown finding name(s) 'Tumour'" in result.output
    assert "Traceback" not in result.output


@needs_real_data
def test_real_table_reads_with_the_published_counts():
    table = read_label_table(REAL_TABLE)
    labels = multi_hot(table)
    assert len(table) == 112_120
    assert table["Patient ID"].nunique() == 30_805
    assert (labels.sum(axis=1) == 0).sum() == 60_361
    assert labels[:, nih.CLASSES.index("Infiltration")].sum() == 19_894
    assert labels[:, nih.CLASSES.index("Hernia")].sum() == 227


def test_gzipped_table_reads(tmp_path):
    plain = _table(tmp_path, [("a.png", "Mass", 1)])
    packed = tmp_path / "t.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_label_table(packed)["Image Index"].tolist() == ["a.png"]


def test_whitespace_is_trimmed_where_the_table_enters(tmp_path):
    rows = [(" a.png", "Effusion | Mass", " 3"), ("b.png ", " Cardiomegaly", "3"), ("c.png", "No Finding ", "4 ")]
    table = read_label_table(_table(tmp_path, rows))
    assert table["Image Index"].tolist() == ["a.png", "b.png", "c.png"]
    assert table["Patient ID"].tolist() == ["3", "3", "4"]  # one patient, not two
    assert table["Finding Labels"].tolist() == ["Effusion|Mass", "Cardiomegaly", "No Finding"]
    labels = multi_hot(table)
    np.testing.assert_array_equal(labels, np.stack([parse_finding_labels(r[1]) for r in rows]))
    assert labels[0].sum() == 2 and labels[1].sum() == 1  # nothing silently lost


@pytest.mark.parametrize("text, message", [("Mass|", "unknown finding name(s) ''"),
                                           ("No Finding|Mass", "says 'No Finding' beside a finding"),
                                           ("   ", "empty Image Index/Finding Labels/Patient ID in row(s) 2")])
def test_malformed_label_strings_are_refused(tmp_path, text, message):
    with pytest.raises(CxrFastError) as error:
        read_label_table(_table(tmp_path, [("a.png", text, 1)]))
    assert message in str(error.value)
