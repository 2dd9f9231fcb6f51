"""The one tar walker: grouping as WebDataset groups, ranges without reading the rest, malformed tars refused."""

from __future__ import annotations

import tarfile

import pytest

from cxr_fast.data.shards.tars import add_member, dali_index, split_member_name, walk_tar
from cxr_fast.errors import CxrFastError


def _tar(path, names):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            add_member(tar, name, name.encode())
    return path


def test_members_group_into_samples_as_webdataset_groups_them(tmp_path):
    import webdataset as wds

    path = _tar(tmp_path / "a.tar", ["x.png", "x.labels", "d/y.png", "d/y.seg.png", "z.png"])
    ours = [(key, sorted(sample)) for key, sample in walk_tar(path)]
    reference = [(s["__key__"], sorted(k for k in s if not k.startswith("__")))
                 for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)]
    assert ours == reference == [("x", ["labels", "png"]), ("d/y", ["png", "seg.png"]), ("z", ["png"])]
    assert split_member_name("d/e/key.ext.gz") == ("d/e/key", "ext.gz")


def test_a_range_of_samples_is_read_alone(tmp_path):
    path = _tar(tmp_path / "a.tar", [f"{k}.{e}" for k in "abcde" for e in ("png", "labels")])
    assert [key for key, _ in walk_tar(path, start=1, stop=3)] == ["b", "c"]
    assert [key for key, _ in walk_tar(path, start=4)] == ["e"]
    index = dali_index(path).splitlines()
    assert index[0] == "v1.2 5" and index[1].startswith("png ") and " labels " in index[1]


@pytest.mark.parametrize("names, message", [
    (["a.png", "a.png"], "sample 'a' has two 'png' components"),
    (["a.png", "b.png", "a.labels"], "the files of sample 'a' are not together"),
])
def test_malformed_samples_are_errors_naming_the_shard(tmp_path, names, message):
    path = _tar(tmp_path / "bad.tar", names)
    with pytest.raises(CxrFastError, match=f"bad.tar.*{message}"):
        list(walk_tar(path))
