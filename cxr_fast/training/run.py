"""The `cxr-fast train` run: set-up (device, DDP, seeds), then epochs of training and validation, each ending with
checkpoints and a line of metrics.jsonl.

Multi-GPU runs go through `torchrun` and PyTorch DDP (NCCL on GPUs, gloo on the CPU): each rank reads its own part
of the split, validation predictions are gathered so metrics cover every sample once, and only rank 0 writes files.

Exact resume: the train loader of epoch e is seeded by (seed, e, rank), so an interrupted epoch can be replayed and
the batches already trained on skipped; model, optimizer, scheduler, scaler, EMA and RNG states come from last.pt.
SIGTERM (preemption) finishes the current optimizer step, saves last.pt and exits cleanly. The loaders live for the
run (`feed.py`); each epoch's record says where its wall time went (`monitor.EpochLedger`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cxr_fast.calibration import fit_calibration
from cxr_fast.config import RunConfig, dump_yaml
from cxr_fast.data.shards.manifest import load_manifest
from cxr_fast.files import folder_lock
from cxr_fast.metrics import macro_auc, operating_points
from cxr_fast.training.checkpoint import (CheckpointSaver, chosen_on_validation, rng_states, stored_config,
                                          training_payload)
from cxr_fast.training.compiled import compiled_graphs, resolve_compile
from cxr_fast.training.engine import EpochStats, NonFiniteLoss, TrainState, evaluate, train_one_epoch, unwrap
from cxr_fast.training.feed import RunLoaders
from cxr_fast.training.flops import device_peak, training_flops_per_image
from cxr_fast.training.monitor import EpochLedger, RunMonitor
from cxr_fast.training.resume import claim_run_folder, resumed_config
from cxr_fast.training.setup import Env, set_up_training, setup_distributed, validated_epochs

log = logging.getLogger(__name__)
# Optimizer steps of every epoch left out of its timed window: the loader's start, and at a new side cuDNN's
# autotuning and torch.compile, happen there; the window opens after them with a device sync.
WARMUP_STEPS = 1


class _StopFlag:
    """Set by SIGTERM; agreed across ranks at step boundaries so all ranks stop at the same step."""

    def __init__(self, max_steps: int | None, state: TrainState, env: Env):
        self.requested, self.max_steps, self.state, self.env = False, max_steps, state, env
        self.reason = ""

    def local(self, after_step: int | None = None) -> bool:
        """This rank's wish to stop once `after_step` optimizer steps are done (default: now); the engine agrees on
        it across ranks in its per-step sync."""
        steps = self.state.step if after_step is None else after_step
        stop = self.requested or (self.max_steps is not None and steps >= self.max_steps)
        if stop and not self.reason:
            self.reason = "SIGTERM" if self.requested else f"--max-steps {self.max_steps}"
        return stop

    def __call__(self) -> bool:
        stop = self.local()
        if self.env.distributed:
            flag = torch.tensor([int(stop)], device="cpu" if dist.get_backend() == "gloo" else self.env.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop and not self.reason:
            self.reason = "SIGTERM" if self.requested else f"--max-steps {self.max_steps}"
        return stop


class Run:
    """One training run, epoch by epoch; see `run_training`."""

    def __init__(self, config: RunConfig, shards_dir: Path, out_dir: Path, env: Env, resumed: dict | None,
                 show_progress: bool):
        self.config, self.shards_dir, self.out_dir, self.env = config, shards_dir, out_dir, env
        self.show_progress = show_progress and env.is_main
        config, self.plan, self.state, model, self.best_auc = set_up_training(config, load_manifest(shards_dir), env,
                                                                               resumed)
        self.config, self.loss_fn = config, self.state.loss_fn
        self.chosen = chosen_on_validation(resumed) if resumed is not None else None  # kept in every last.pt
        self.saver = CheckpointSaver(out_dir)
        self.monitor = RunMonitor(out_dir, config.tensorboard) if env.is_main else None
        if self.monitor is not None and config.tensorboard:
            images_per_step = config.optim.batch_size * config.optim.accum * env.world_size
            self.state.on_step = lambda step, loss, lr: self.monitor.step(step, loss, lr, images_per_step)
        self.stop = _StopFlag(config.max_steps, self.state, env)
        self.sides = self.plan.sides
        self.loaders, self.ledger = RunLoaders(shards_dir, config, env), EpochLedger()
        self.peak = device_peak(env.device)[1]  # FLOP/s, None where not known (a CPU)
        self.flops = self._flops(model)
        self.validated = validated_epochs(config.optim.epochs, config.val_every)
        self.last_val = resumed.get("val") if resumed is not None else None  # the record `chosen` came from
        if resumed is not None:
            log.info("resuming at epoch %d, step %d", self.state.epoch + 1, self.state.step)

    def start(self, replaced: list[Path]) -> None:
        """Write the run's config (and remove the files of the run it replaces: the checks have passed)."""
        if not self.env.is_main:
            return
        for path in replaced:
            log.info("--overwrite: removing %s", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        dump_yaml(self.config, self.out_dir / "config.yaml")
        p, o = self.plan, self.config.optim
        log.info("training %s on %s (%d rank(s)): %d images, %d steps/epoch of %d x %d x %d, %d epochs",
                 self.config.model.name, self.env.device, self.env.world_size, p.train_images, p.steps_per_epoch,
                 o.batch_size, o.accum, self.env.world_size, o.epochs)

    def save(self, best: bool = False) -> None:
        rng = rng_states()
        if self.env.distributed:
            gathered = [None] * self.env.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        if self.env.is_main:
            self.saver.save(training_payload(self.state, self.config, rng, self.best_auc, self.chosen, self.last_val),
                            best)

    def train_epoch(self) -> EpochStats | None:
        """Train the rest of the current epoch; None when the loader failed after SIGTERM (a stop). The loader is the
        run's (`feed.RunLoaders`), seeded for this epoch; once trained, the next epoch's is prepared."""
        state, epoch = self.state, self.state.epoch
        self.ledger.begin()
        loader, waited = self.loaders.train(epoch, self.sides[epoch])
        self.ledger.add("loader_build", waited)
        try:
            stats = train_one_epoch(state, loader, self.plan.batches_per_epoch, self.stop.local, self.show_progress,
                                    WARMUP_STEPS)
        except NonFiniteLoss as error:
            # The weights are those of the last good optimizer step; resuming replays the current one.
            state.batch_in_epoch -= state.batch_in_epoch % state.accum
            self.save()
            raise NonFiniteLoss(f"{error}. The last good state is saved in {self.saver.last}") from None
        except Exception as error:
            if not self.stop.requested:
                raise
            # Preemption can reach the loader's workers too: stop at the last optimizer step, as for SIGTERM alone.
            log.warning("the loader failed after SIGTERM (%s); stopping at step %d", type(error).__name__, state.step)
            return None
        for part, seconds in (("loader_start", stats.loader_start_seconds), ("warmup", stats.warmup_seconds),
                              ("timed", stats.timed_seconds)):
            self.ledger.add(part, seconds)
        if not stats.stopped and epoch + 1 < len(self.sides):
            self.loaders.prepare(epoch + 1, self.sides[epoch + 1])
        return stats

    def validate(self) -> dict:
        """Metrics of the validation split (every sample once across ranks); sets `self.chosen`: the per-class
        thresholds of the three operating points and the calibration, all fitted on these predictions."""
        model = self.state.ema.module if self.state.ema is not None else self.state.model
        result = evaluate(model, self.loaders.val(), self.loss_fn, self.state.amp_dtype, self.show_progress)
        targets, probs = result["targets"], result["probs"]
        auc, per_class = macro_auc(targets, probs)
        points = operating_points(targets, probs)
        self.chosen = {"thresholds": [float(t) for t in points["max_f1"]], "calibration":
                       fit_calibration(targets, probs, self.plan.classes),
                       "operating_points": {k: [float(t) for t in v] for k, v in points.items()}}
        return {"val_loss": float(result["loss"]), "val_macro_auc": float(auc),
                "val_auc": {c: (float(a) if np.isfinite(a) else None) for c, a in zip(self.plan.classes, per_class)},
                "val_images": len(result["keys"])}

    def epoch_end(self, stats: EpochStats | None) -> dict:
        """Validate (on the epochs --val-every names), then write the epoch's record and checkpoints. `stats` is None
        when the epoch's training was done before a resume (only its validation was left)."""
        history, state = self.state.history, self.state
        record = {"epoch": state.epoch + 1, "train_loss": history["loss_sum"] / max(1, history["loss_count"])}
        if state.epoch + 1 in self.validated:
            with self.ledger.timing("validation"):
                record |= self.validate()
        state.epoch += 1
        state.batch_in_epoch = 0
        record |= {"step": state.step, "lr": float(state.scheduler.get_last_lr()[0]),
                   "image_side": self.sides[state.epoch - 1], **self._speed(stats)}
        if self.env.device.type == "cuda":
            record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2 ** 30
        improved = "val_macro_auc" in record and record["val_macro_auc"] > self.best_auc
        if "val_macro_auc" in record:
            self.best_auc, self.last_val = max(self.best_auc, record["val_macro_auc"]), record
        with self.ledger.timing("checkpoint"):
            self.save(best=improved)
        record |= self.ledger.close()  # written after the checkpoints, so that it holds their time
        if self.env.is_main:
            self.monitor.epoch(record)
            validation = (f", val loss {record['val_loss']:.4f}, val macro AUC {record['val_macro_auc']:.4f}"
                          f"{' (best)' if improved else ''}") if "val_macro_auc" in record else " (not validated)"
            log.info("epoch %d at %d px: train loss %.4f%s (%.1f s)", state.epoch, record["image_side"],
                     record["train_loss"], validation, record["epoch_seconds"])
        return record

    def _flops(self, model) -> dict[int, float]:
        """Training FLOPs per image at each side of the schedule, where the device's peak is known (MFU's parts);
        counted on the plain model with the RNG put back, so the run trains as it would without them."""
        if self.peak is None:
            return {}
        with torch.random.fork_rng(devices=[self.env.device] if self.env.device.type == "cuda" else []):
            return {side: training_flops_per_image(unwrap(model), self.config.data.in_chans, side,
                                                    self.env.device)["flops_per_image"] for side in set(self.sides)}

    def _speed(self, stats: EpochStats | None) -> dict:
        """The epoch's speed fields of metrics.jsonl (None where its training was done before a resume): the rate
        with the timed images, seconds and steps it comes from, the data wait, compilation and MFU."""
        if stats is None:
            return {"train_images_per_second": None, "data_wait_fraction": None, "warmup_steps": None}
        compiled = resolve_compile(self.config.model, self.env.device)
        flops = self.flops.get(self.sides[self.state.epoch - 1])
        rate = stats.images_per_second
        return {"train_images_per_second": rate, "data_wait_fraction": stats.data_wait_fraction,
                "timed_images": stats.timed_images, "timed_seconds": stats.timed_seconds,
                "timed_steps": stats.timed_steps, "warmup_steps": stats.warmup_steps, "train_images": stats.images,
                "compile_seconds": stats.warmup_overhead_seconds if compiled else None,
                "compiled_graphs": compiled_graphs() if compiled else None,
                "mfu": rate * flops / (self.peak * self.env.world_size) if flops else None}

    def stopped(self) -> dict:
        self.save()
        if self.env.is_main:
            log.info("stopped by %s at step %d; saved %s (continue with --resume)", self.stop.reason or "SIGTERM",
                     self.state.step, self.saver.last)
        return {"stopped": self.stop.reason or "SIGTERM", "step": self.state.step}

    def loop(self) -> dict:
        record = None
        while self.state.epoch < self.config.optim.epochs:
            if self.state.step and self.state.batch_in_epoch == 0 and self.stop():  # last.pt already saved
                log.info("stopped by %s at step %d (continue with --resume)", self.stop.reason, self.state.step)
                return {"stopped": self.stop.reason, "step": self.state.step}
            stats = None
            if self.state.batch_in_epoch < self.plan.batches_per_epoch:  # else: trained, stopped in validation
                stats = self.train_epoch()
                if stats is None or stats.stopped:
                    return self.stopped()
            try:
                record = self.epoch_end(stats)
            except Exception:
                if not self.stop.requested:
                    raise
                log.warning("validation failed after SIGTERM; the epoch's training is saved, validation will rerun")
                return self.stopped()
        return record


def run_training(config: RunConfig, shards_dir: str | Path, out_dir: str | Path, resume: dict | None = None,
                 show_progress: bool = True, overwrite: bool = False) -> dict:
    """Train; returns the last validation record (or {"stopped": reason, "step": n}). Writes
    <out>/checkpoints/{best,last}.pt, metrics.jsonl, config.yaml. Rank 0 holds a lock on the run folder.

    resume None starts a run; a dict continues the run in `out_dir` with those changes (dotted config paths → values,
    the flags given; {} for none): its config comes from last.pt and `config` is not used; the changes may change what
    `resume.RESUMABLE` lists, and any other change is an error."""
    started = time.perf_counter()
    changes = resume or {}
    out_dir = Path(out_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(out_dir, "a training run") if is_main else contextlib.nullcontext():
        replaced = claim_run_folder(out_dir, resume is not None, overwrite) if is_main else []
        resumed = CheckpointSaver(out_dir).load_last() if resume is not None else None
        if resumed is not None:
            saved = stored_config(resumed, CheckpointSaver(out_dir).last)
            config = resumed_config(saved, changes, resumed["epoch"])
        env = setup_distributed(config.device, config.cudnn_benchmark, config.amp)
        np.random.seed(config.seed + env.rank)
        previous_handler = run = None
        try:
            run = Run(config, Path(shards_dir), out_dir, env, resumed, show_progress)
            run.ledger.mark = started  # the first epoch's `start` counts the whole set-up, from here
            run.start(replaced)
            previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(run.stop, "requested", True))
            return run.loop()
        finally:
            if run is not None:
                run.loaders.close()
                if run.monitor is not None:
                    run.monitor.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            if env.distributed and dist.is_initialized():
                dist.destroy_process_group()
