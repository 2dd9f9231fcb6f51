"""What a run folder may hold and what a resumed run may change.

`train` into a folder that holds a run needs --resume (continue it) or --overwrite (replace its files, and only
those); a resumed run keeps the settings in its last.pt, except those that only say how far to go, how fast or how
often (`RESUMABLE`: --epochs, re-planning the schedule; --max-steps, --workers, --tensorboard, --cudnn-benchmark,
--val-every, --compile, --compile-mode, --compile-cache). Any other flag that differs is an error naming it: changing
it would make another run, which belongs in another folder.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cxr_fast.config import RunConfig, describe, replace
from cxr_fast.errors import CxrFastError

log = logging.getLogger(__name__)

RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml", "curves.png", "tensorboard")


def claim_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> list[Path]:
    """The earlier run's files that --overwrite will replace; an occupied folder without --resume or --overwrite is
    an error, so a finished run is never replaced by accident. Files other than a run's are left alone."""
    if resume and overwrite:
        raise CxrFastError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    existing = [out_dir / name for name in RUN_FILES if (out_dir / name).exists()]
    if existing and not resume and not overwrite:
        raise CxrFastError(f"{out_dir} already holds a run ({', '.join(p.name for p in existing)}); continue it with "
                           "--resume, replace it with --overwrite, or choose another --out")
    return existing if overwrite else []


RESUMABLE = ("optim.epochs", "max_steps", "data.workers", "tensorboard", "cudnn_benchmark", "val_every",
             "model.compile", "model.compile_mode", "model.compile_cache")
# Settings whose `auto` the run resolved and stored as a number: `auto` given again matches what it resolved to.
RESOLVED_AUTO = ("optim.batch_size", "optim.accum")


def resumed_config(saved: RunConfig, changes: dict, at_epoch: int) -> RunConfig:
    """The saved run's config with the changes a resume may make; any other change is an error naming its flag."""
    for path, value in changes.items():
        old = getattr_path(saved, path)
        if path in RESUMABLE or (path in RESOLVED_AUTO and value == "auto"):
            continue
        try:  # compared as the config types it: "16" from the command line is the stored 16
            typed = getattr_path(replace(saved, **{path: value}), path)
        except CxrFastError:
            typed = value
        if typed != old:
            flag = describe(RunConfig, path)[1].metadata.get("flag") or path
            raise CxrFastError(f"--resume continues the run as it was set up: {flag} {value} differs from its "
                               f"{old}. Start a new run (another --out) to change it")
    epochs = changes.get("optim.epochs", saved.optim.epochs)
    if epochs != saved.optim.epochs:
        if epochs < at_epoch + (1 if at_epoch < saved.optim.epochs else 0):
            raise CxrFastError(f"--epochs {epochs}: the run has done {at_epoch} epoch(s) already")
        log.warning("--epochs %d instead of %d: the cosine schedule is re-planned over %d epochs from the current "
                    "step (the learning rate from here on follows the new schedule)", epochs, saved.optim.epochs,
                    epochs)
    kept = {path: value for path, value in changes.items() if path in RESUMABLE}
    return replace(saved, **kept | {"max_steps": changes.get("max_steps")})


def getattr_path(config, path: str):
    for part in path.split("."):
        config = getattr(config, part)
    return config
