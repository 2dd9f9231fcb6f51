"""Where a run's wall time goes, epoch by epoch: each epoch's record carries its wall seconds and their parts, so that
anyone can add the parts up to the wall time and the epochs up to the run's.

An epoch's span runs from the moment the previous epoch's record was made (the run's start, for the first) to the
moment its own is made. Its parts: `start` (the run's set-up in the first epoch: checkpoint loading, the model, the
batch-size probe; later, writing the previous record, its curves and TensorBoard scalars), `loader_build` (waiting for
the epoch's train loader: a build, or nothing when it lives on), `loader_start` (asking for its iterator until the
first batch), `warmup` (the steps before the timed window opened, with any batches a resume skips; compilation and
autotuning happen here), `timed` (the window images/s is computed from), `validation` and `checkpoint`. What is left
(`unaccounted_seconds`) is the bookkeeping between them.
"""

from __future__ import annotations

import contextlib
import time

PARTS = ("start", "loader_build", "loader_start", "warmup", "timed", "validation", "checkpoint")


class EpochLedger:
    def __init__(self, started: float | None = None):
        self.mark = time.perf_counter() if started is None else started
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.began = False

    def begin(self) -> None:
        """The epoch's first part ends here: everything since the previous record is its `start`."""
        if not self.began:
            self.parts["start"] = time.perf_counter() - self.mark
            self.began = True

    def add(self, part: str, seconds: float) -> None:
        self.begin()
        self.parts[part] += seconds

    @contextlib.contextmanager
    def timing(self, part: str):
        self.begin()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.parts[part] += time.perf_counter() - started

    def close(self) -> dict:
        """The epoch's time fields; the next epoch's span starts now."""
        self.begin()
        now = time.perf_counter()
        wall = now - self.mark
        fields = {"epoch_seconds": wall, "seconds": dict(self.parts),
                  "unaccounted_seconds": wall - sum(self.parts.values())}
        self.mark, self.parts, self.began = now, dict.fromkeys(PARTS, 0.0), False
        return fields
