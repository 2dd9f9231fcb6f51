"""The output folder of `cxr-fast shard`: what may already be there, what a run may remove, and its progress.

A run writes into an empty folder, finishes an interrupted run of its own (`.progress.json`), or finds a complete
shard set (`manifest.json`): the same plan is kept (damaged or missing shards are rewritten), another plan is
refused unless `--overwrite`. With `--overwrite` the new set is built beside the old one, in `OUT/.next/`, and swapped
in only when it is complete, so a run that fails or is killed leaves the old set readable (a killed one resumes from
`.next/`). Files cxr-fast did not write are never touched: a folder holding any is refused, and so are shard files
that no manifest or progress file describes (another tool's, an older layout), unless `--overwrite`. A failed run
removes what it wrote, nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from cxr_fast import constants as C
from cxr_fast.data.shards.manifest import MANIFEST
from cxr_fast.files import sha256_file
from cxr_fast.errors import CxrFastError
from cxr_fast.files import atomic_json

log = logging.getLogger(__name__)

PROGRESS = ".progress.json"
NEXT, PREVIOUS = ".next", ".previous"  # the set being built by --overwrite; the old one while they are swapped
_SHARD_FILE = re.compile(r"shard-\d{6}\.(tar|idx)(\.tmp)?")


class ShardFolder:
    def __init__(self, out: Path, overwrite: bool = False):
        self.out, self.overwrite = out, overwrite
        self.work = out  # where this run writes: OUT, or OUT/.next when it replaces a complete set
        self.records: dict = {}  # of shards finished before this run (interrupted run or complete set)
        self.complete: dict | None = None  # the manifest of a complete set found here

    def _ours(self, path: Path) -> bool:
        relative = path.relative_to(self.out).parts
        if relative[0] in (NEXT, PREVIOUS):
            relative = relative[1:]
        if len(relative) <= 1:
            return not relative or relative[0] in (MANIFEST, PROGRESS, MANIFEST + ".tmp", PROGRESS + ".tmp",
                                                   *C.SPLITS)
        return len(relative) == 2 and relative[0] in C.SPLITS and bool(_SHARD_FILE.fullmatch(relative[1]))

    def claim(self) -> None:
        """Check what is in the folder before any work: only cxr-fast's own files, readable state."""
        paths = list(self.out.rglob("*"))
        links = [p for p in paths if p.is_symlink()]
        if links:  # a split folder linked elsewhere would make this run write (and remove) shards in another folder
            raise CxrFastError(f"{links[0]} is a link: shard writes only into real folders below --out, never "
                               "through a link into another tool's files; remove the link or choose another --out")
        foreign = sorted(str(p.relative_to(self.out)) for p in paths if not self._ours(p))
        if foreign:
            raise CxrFastError(f"{self.out} holds files cxr-fast did not write ({', '.join(foreign[:3])}"
                               f"{' …' if len(foreign) > 3 else ''}); choose an empty or new --out")
        # A manifest marks a complete set; a progress file, more recent, the shards a later run has finished since.
        self.complete, progress = self._read(self.out / MANIFEST), self._read(self.out / PROGRESS)
        self.records = dict((progress or self.complete or {"shards": {}})["shards"])
        undescribed = [p for p in paths if p.suffix in (".tar", ".idx") and p.parent.parent == self.out]
        if undescribed and self.complete is None and progress is None and not self.overwrite:
            raise CxrFastError(f"{self.out} holds shard files that no manifest describes ({undescribed[0]} …): "
                               "another tool's or an older layout. Choose another --out, or pass --overwrite to "
                               "replace them")

    def _read(self, path: Path) -> dict | None:
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
            dict(state["shards"])
            return state
        except (OSError, ValueError, KeyError, TypeError):
            raise CxrFastError(f"{path} is unreadable or not cxr-fast's; remove it or choose another --out") from None

    def prepare(self, jobs: list[dict]) -> dict:
        """Make room for the plan and point its jobs at the folder they are written to; returns the records of
        shards already complete and correct."""
        planned = {job["name"]: job for job in jobs}
        if self.complete is not None:
            same_plan = set(self.records) == set(planned) and all(
                self.records[name].get("digest") == job["digest"] for name, job in planned.items())
            if not same_plan and not self.overwrite:
                raise CxrFastError(f"{self.out} holds a complete shard set made with other settings or data; pass "
                                   "--overwrite to replace it, or choose another --out")
            if not same_plan:
                log.info("--overwrite: building the new shard set in %s; the old one stays until it is complete",
                         self.out / NEXT)
                self.work = self.out / NEXT
                self.records = dict((self._read(self.work / PROGRESS) or {"shards": {}})["shards"])
        for job in jobs:
            job["tar"], job["idx"] = str(self.work / job["name"]), str(self.work / (job["name"][:-4] + ".idx"))
        for split in C.SPLITS:
            (self.work / split).mkdir(parents=True, exist_ok=True)
            for path in (self.work / split).iterdir():
                stale = f"{split}/{path.name.split('.')[0]}.tar" not in planned
                if _SHARD_FILE.fullmatch(path.name) and (stale or path.name.endswith(".tmp")):
                    log.info("removing stale %s", path)
                    path.unlink()
        return {name: self.records[name] for name, job in planned.items()
                if _is_done(job, self.records.get(name))}

    def save_progress(self, done: dict) -> None:
        atomic_json(self.work / PROGRESS, {"shards": done})

    def undo(self, attempted: list[dict], existed: set[str], written: set[str]) -> None:
        """Remove what a failed run wrote: shards it finished (`written`), shards a worker finished as the run was
        stopped (any planned file that did not exist before), temporary files; earlier work and its state stay."""
        if self.work != self.out:  # a replacement that failed: the old set is untouched, the new one goes
            shutil.rmtree(self.work, ignore_errors=True)
            return
        for job in attempted:
            for path in (job["tar"], job["idx"]):
                if job["name"] in written or path not in existed:
                    Path(path).unlink(missing_ok=True)
                Path(path + ".tmp").unlink(missing_ok=True)
        if self.complete is not None:
            return
        if self.records:
            self.save_progress(self.records)
            return
        (self.out / PROGRESS).unlink(missing_ok=True)
        for path in [*(self.out / split for split in C.SPLITS), self.out]:
            try:
                path.rmdir()  # only if empty
            except OSError:
                pass

    def finish(self, manifest: dict) -> None:
        """Write the manifest; a replacement is swapped in: the old splits move aside, the new ones in, the manifest
        last (one rename), and the old set is removed."""
        if self.work == self.out:
            atomic_json(self.out / MANIFEST, manifest)
            (self.out / PROGRESS).unlink(missing_ok=True)
            return
        previous = self.out / PREVIOUS
        shutil.rmtree(previous, ignore_errors=True)
        previous.mkdir()
        atomic_json(self.work / MANIFEST, manifest)
        for split in C.SPLITS:
            if (self.out / split).exists():
                os.replace(self.out / split, previous / split)
            os.replace(self.work / split, self.out / split)
        os.replace(self.work / MANIFEST, self.out / MANIFEST)
        (self.out / PROGRESS).unlink(missing_ok=True)
        shutil.rmtree(self.work)
        shutil.rmtree(previous)


def _is_done(job: dict, record: dict | None) -> bool:
    tar, idx = Path(job["tar"]), Path(job["idx"])
    return (record is not None and record.get("digest") == job["digest"] and tar.exists() and idx.exists()
            and sha256_file(tar) == record["sha256"])
