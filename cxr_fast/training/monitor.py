"""What a person watching a run sees: each epoch's record appended to metrics.jsonl, the training curves redrawn in
curves.png (losses, validation AUROC, learning rate), and with --tensorboard the same as TensorBoard scalars; and
where each epoch's wall time went (`EpochLedger`).

Where a run's wall time goes, epoch by epoch: each epoch's record carries its wall seconds and their parts, so that
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
import json
import time
from pathlib import Path

from cxr_fast.errors import CxrFastError

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class RunMonitor:
    def __init__(self, out_dir: Path, tensorboard: bool):
        self.out_dir, self.writer, self.last_step = out_dir, None, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise CxrFastError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def step(self, step: int, loss: float, lr: float, images: int) -> None:
        """TensorBoard scalars per optimizer step: loss, learning rate and images/s since the previous step."""
        if self.writer is None:
            return
        now = time.perf_counter()
        self.writer.add_scalar("step/loss", loss, step)
        self.writer.add_scalar("step/lr", lr, step)
        if self.last_step is not None and now > self.last_step:
            self.writer.add_scalar("step/images_per_second", images / (now - self.last_step), step)
        self.last_step = now

    def epoch(self, record: dict) -> None:
        with open(self.out_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        plot_curves(read_metrics(self.out_dir), self.out_dir / CURVES)
        if self.writer is not None:
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        step, add = record["step"], self.writer.add_scalar
        add("loss/train", record["train_loss"], step)
        if "val_loss" in record:  # a validated epoch (--val-every)
            add("loss/val", record["val_loss"], step)
            add("auroc/macro", record["val_macro_auc"], step)
            for name, value in record["val_auc"].items():
                if value is not None:
                    add(f"auroc/{name}", value, step)
        add("lr", record["lr"], step)
        for key in ("train_images_per_second", "data_wait_fraction", "peak_gpu_memory_gib", "image_side"):
            if record.get(key) is not None:
                add(f"speed/{key}", record[key], step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(out_dir: Path) -> list[dict]:
    path = out_dir / METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    validated = [r for r in records if "val_loss" in r]  # --val-every leaves some epochs without validation
    val_epochs = [r["epoch"] for r in validated]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    axes[0].plot(epochs, [r["train_loss"] for r in records], "o-", label="train")
    axes[0].plot(val_epochs, [r["val_loss"] for r in validated], "o-", label="validation")
    axes[0].set_title("Loss (focal)")
    axes[0].legend()
    for name in validated[-1]["val_auc"] if validated else []:
        axes[1].plot(val_epochs, [r["val_auc"].get(name) for r in validated], color="0.8", lw=0.8)
    axes[1].plot(val_epochs, [r["val_macro_auc"] for r in validated], "o-", color="C2",
                 label="macro (grey: per class)")
    axes[1].set_title("Validation AUROC")
    axes[1].legend()
    axes[2].plot(epochs, [r["lr"] for r in records], "o-", color="C3")
    axes[2].set_title("Learning rate at the epoch's end")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


PARTS = ("start", "loader_build", "loader_start", "warmup", "timed", "validation", "checkpoint")


class EpochLedger:
    def __init__(self):
        self.mark = time.perf_counter()  # where the current epoch's span began
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
