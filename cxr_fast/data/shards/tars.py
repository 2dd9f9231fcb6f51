"""The one tar walker: the DALI index, `verify`, the analysis and the torch loader all read shards through it.

Samples are grouped as WebDataset groups them: a member `dir/key.ext.more` belongs to sample `dir/key` as component
`ext.more`, and a sample's members are consecutive. A component repeated within a sample, a key that comes back
after another sample, a member that is a link or empty, is an error naming the shard and the member (two readers could
otherwise disagree about what a sample holds).
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

from cxr_fast.errors import CxrFastError


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/key.ext' -> ('dir/key', 'ext'); the key ends at the first dot of the last path component."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def walk_tar(path: str | Path, read: bool = True, start: int = 0, stop: int | None = None
             ) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) per sample in tar order; with read=False, {ext: TarInfo} (offsets, sizes, names).

    Only samples start <= i < stop are yielded; the data of the others is skipped over, not read.
    """
    seen, current, sample, index = set(), None, {}, -1
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isfile():  # a link or a device: a reader would follow it out of the shard
                    raise CxrFastError(f"shard {path}: member {member.name!r} is not a regular file")
                if member.size == 0:
                    raise CxrFastError(f"shard {path}: member {member.name!r} is empty")
                key, ext = split_member_name(member.name)
                if key != current:
                    if sample:
                        yield current, sample
                    if key in seen:
                        raise CxrFastError(f"shard {path}: the files of sample {key!r} are not together")
                    seen.add(key)
                    current, sample, index = key, {}, index + 1
                    if stop is not None and index >= stop:
                        return
                if index < start:
                    continue
                if ext in sample:
                    raise CxrFastError(f"shard {path}: sample {key!r} has two {ext!r} components")
                sample[ext] = tar.extractfile(member).read() if read else member
    except (tarfile.TarError, OSError, EOFError) as error:
        raise CxrFastError(f"shard {path} is damaged: {error}") from None
    if sample:
        yield current, sample


def dali_index(tar_path: str | Path) -> str:
    """The DALI webdataset index (format v1.2, as `wds2idx` writes it) of a tar: one line per sample with
    `ext offset size name` per component, offsets pointing at the data after each 512-byte header."""
    lines = [" ".join(f"{ext} {m.offset_data} {m.size} {m.name}" for ext, m in members.items())
             for _key, members in walk_tar(tar_path, read=False)]
    return f"v1.2 {len(lines)}\n" + "".join(line + "\n" for line in lines)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes: the same plan gives the same sha256
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
