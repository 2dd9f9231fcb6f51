import numpy as np
import pandas as pd
import pytest

from conftest import REAL_TABLE, needs_real_data
from cxr_fast.data.datasets import nih
from cxr_fast import constants as C
from cxr_fast.errors import CxrFastError
from cxr_fast.data.datasets.nih import read_label_table
from cxr_fast.data.datasets.split import check_patient_disjoint, plan_split, split_summary


@needs_real_data
def test_real_table_split_is_patient_disjoint_and_stratified():
    table = read_label_table(REAL_TABLE)
    split = plan_split(nih.to_sample_table(table), val_fraction=0.1, test_fraction=0.2, seed=0)
    assert (split != "").all()
    patients_by_split = {s: set(table.loc[split == s, "Patient ID"]) for s in C.SPLITS}
    assert not patients_by_split["train"] & patients_by_split["val"]
    assert not patients_by_split["train"] & patients_by_split["test"]
    assert not patients_by_split["val"] & patients_by_split["test"]
    summary = split_summary(nih.to_sample_table(table), split)
    print({s: (summary[s]["images"], summary[s]["patients"], summary[s]["positives"]["Hernia"]) for s in C.SPLITS})
    for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(summary[name]["images"] / len(table) - share) < 0.01
        for cls in nih.CLASSES:  # stratified: every class near its global prevalence in every split
            overall = summary["train"]["positives"][cls] + summary["val"]["positives"][cls] + \
                summary["test"]["positives"][cls]
            assert summary[name]["positives"][cls] / overall == pytest.approx(share, abs=0.03), (name, cls)


def test_official_lists_fix_the_test_split():
    table = pd.DataFrame({"Image Index": [f"{p}_{k}.png" for p in range(40) for k in range(3)],
                          "Finding Labels": ["Mass" if p % 4 == 0 else "No Finding" for p in range(40) for _ in range(3)],
                          "Patient ID": [str(p) for p in range(40) for _ in range(3)]})
    test_images = [f"{p}_{k}.png" for p in range(30, 40) for k in range(3)]
    split = plan_split(nih.to_sample_table(table, nih.split_marks(table["Image Index"], test_images)),
                       val_fraction=0.25, seed=1)
    assert set(table.loc[split == "test", "Image Index"]) == set(test_images)
    assert (split == "val").sum() > 0 and (split == "train").sum() > 0
    check_patient_disjoint(table["Patient ID"].to_numpy(), split.to_numpy())


def test_leak_check_names_the_patient():
    with pytest.raises(CxrFastError, match="patient 7"):
        check_patient_disjoint(np.array(["7", "7", "8"]), np.array(["train", "test", "test"]))


def test_fractions_are_checked():
    table = pd.DataFrame({"Image Index": ["a.png"], "Finding Labels": ["Mass"], "Patient ID": ["1"]})
    with pytest.raises(CxrFastError, match="< 1"):
        plan_split(nih.to_sample_table(table), val_fraction=0.6, test_fraction=0.5)
