"""Output folders that are safe to write: one writer at a time (an advisory lock), atomic small files, and the
filesystem's errors turned into messages that name the path."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
from pathlib import Path

from cxr_fast.errors import CxrFastError

log = logging.getLogger(__name__)


def make_folder(path: Path) -> Path:
    """`path` as a folder that exists, or a CxrFastError saying why it cannot be."""
    if path.exists() and not path.is_dir():
        raise CxrFastError(f"{path} is a file, not a folder: choose another output folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CxrFastError(f"cannot create folder {path}: {error.strerror or error}") from None
    return path


@contextlib.contextmanager
def folder_lock(folder: Path, what: str):
    """Hold an exclusive lock on `folder` itself (flock on the directory) while the block runs: a second cxr-fast
    process writing `what` there gets an error instead of interleaving with this one. The lock goes with the
    process, so a killed run leaves none behind, and no lock file is left in the folder."""
    make_folder(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CxrFastError(f"{folder} is in use: another cxr-fast process is writing {what} there. Wait for it "
                               "to finish, or choose another output folder") from None
        except OSError as error:  # a filesystem without flock on folders (some network mounts)
            log.warning("cannot lock %s (%s); make sure no other process writes there", folder, error.strerror)
        yield
    finally:
        os.close(fd)  # releases the lock


def plain_json(value):
    """`value` as strict JSON holds it: numpy numbers as Python ones, and an undefined number (NaN, infinite: an AUROC
    of a class without positives) as null, which every JSON parser reads (a bare NaN is not JSON)."""
    if isinstance(value, dict):
        return {key: plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalars and arrays
        return plain_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dump_json(payload) -> str:
    return json.dumps(plain_json(payload), indent=1, allow_nan=False)


def atomic_json(path: Path, payload: dict) -> None:
    """Write JSON through a temporary file and a rename: readers see the old or the new file, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(dump_json(payload))
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CxrFastError(f"cannot write {path}: {error.strerror or error}") from None


OWNER = ".cxr-fast"  # in a command's output folder: the name of the command that wrote it


def claim_output(folder: Path, own: tuple[str, ...], overwrite: bool, command: str, inputs=()) -> None:
    """A command's output folder, already locked: empty or new, or, with --overwrite, one that `command` wrote
    itself (its name in OWNER), cleared of the files it writes (`own`) and only those. Another command's folder, a
    folder it did not write (even one holding only names it uses: the user's own cam/), or one of the command's
    `inputs` is refused."""
    for given in inputs:
        if Path(given).resolve() == folder.resolve():
            raise CxrFastError(f"--out {folder} is a folder this command reads: choose another --out (no command "
                               "writes into its inputs)")
    present = sorted(p.name for p in folder.iterdir() if p.name != OWNER) if folder.is_dir() else []
    owner = _owner(folder)
    if present and not overwrite:
        raise CxrFastError(f"{folder} is not empty ({', '.join(present[:3])}{' …' if len(present) > 3 else ''}); "
                           "choose another --out, or pass --overwrite to replace this command's earlier results")
    if present and owner != command:
        written = f"cxr-fast {owner}'s results" if owner else f"files cxr-fast {command} did not write"
        raise CxrFastError(f"{folder} holds {written} ({', '.join(present[:3])}); --overwrite replaces only "
                           f"cxr-fast {command}'s own results: choose another --out")
    for name in own:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    (folder / OWNER).write_text(command + "\n")


def claim_whole_folder(folder: Path, command: str, inputs=()) -> None:
    """The output folder of a command that owns all of it (synth, eda, preview): new or empty, or one it wrote
    before (OWNER says so), which is emptied first; any other folder is refused, so a real data set, a source image
    folder or another command's results are never overwritten."""
    make_folder(folder)
    present = tuple(p.name for p in folder.iterdir() if p.name != OWNER)
    claim_output(folder, present if _owner(folder) == command else (), _owner(folder) == command, command, inputs)


def _owner(folder: Path) -> str | None:
    try:
        return (folder / OWNER).read_text().strip() or None
    except OSError:
        return None


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` then a rename: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise CxrFastError(f"cannot write {path}: {error.strerror or error}") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
