"""The `cxr-fast train` run: set-up (device, DDP, seeds), then epochs of training and validation, each ending with
checkpoints and a line of metrics.jsonl.

Multi-GPU runs go through `torchrun` and PyTorch DDP (NCCL on GPUs, gloo on the CPU): each rank reads its own part
of the split, validation predictions are gathered so metrics cover every sample once, and only rank 0 writes files.

Exact resume: the train loader of epoch e is seeded by (seed, e, rank), so an interrupted epoch can be replayed and
the batches already trained on skipped; model, optimizer, scheduler, scaler, EMA and RNG states come from last.pt.
SIGTERM (preemption) finishes the current optimizer step, saves last.pt and exits cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cxr_fast import constants as C
from cxr_fast.calibration import fit_calibration
from cxr_fast.config import RunConfig, dump_yaml, from_dict
from cxr_fast.data.loader import LoaderSpec, create_loader
from cxr_fast.data.reader import load_manifest
from cxr_fast.errors import CxrFastError
from cxr_fast.files import folder_lock
from cxr_fast.metrics import macro_auc, operating_points
from cxr_fast.training.checkpoint import (CheckpointSaver, chosen_on_validation, restore_training, rng_states,
                                          training_payload)
from cxr_fast.training.engine import (EpochStats, NonFiniteLoss, TrainState, evaluate, resolve_amp,
                                      resolve_device, train_one_epoch, warmup_cosine)
from cxr_fast.training.losses import FocalLoss, inverse_frequency_weights
from cxr_fast.training.memory import resolve_batch
from cxr_fast.training.model import create_model
from cxr_fast.training.monitor import RunMonitor
from cxr_fast.training.resume import claim_run_folder, resumed_config

log = logging.getLogger(__name__)
# Optimizer steps at a new input side (a run's first, each change of side) left out of train_images_per_second:
# cuDNN's autotuning and torch.compile run in the first micro-batches at a shape.
WARMUP_STEPS = 1


@dataclass(frozen=True)
class Env:
    """Where this process runs: its rank among `world_size` ranks and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Plan:
    train_images: int
    steps_per_epoch: int  # optimizer steps
    batches_per_epoch: int  # micro-batches per rank

    def total_steps(self, epochs: int) -> int:
        return self.steps_per_epoch * epochs


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


def setup_distributed(device_choice: str, cudnn_benchmark: bool = True) -> Env:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    # A launcher may show each rank only its own GPU (CUDA_VISIBLE_DEVICES per rank): then it is device 0.
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = resolve_device(device_choice, local_rank if visible > 1 else 0)
    if device.type == "cuda" and device.index >= visible:
        raise CxrFastError(f"LOCAL_RANK {local_rank} but only {visible} GPU(s) are visible to this process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = cudnn_benchmark  # fixed input shapes: cuDNN picks its kernels once
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Env(rank, world_size, device)


def check_splits(manifest: dict, world_size: int) -> None:
    """Before any model is built: a training image per rank and a validation split to choose thresholds on."""
    if manifest["splits"]["train"]["images"] < world_size:
        raise CxrFastError(f"{manifest['splits']['train']['images']} training images are too few for {world_size} rank(s)")
    if not manifest["splits"]["val"]["images"]:
        raise CxrFastError("the shards have an empty validation split; re-shard with --val-fraction > 0")


def plan_epochs(config: RunConfig, manifest: dict, world_size: int) -> Plan:
    """Whole optimizer steps per epoch, the same on every rank (each rank's remainder is left for the next epoch's
    shuffle)."""
    n_train = manifest["splits"]["train"]["images"]
    batch, accum = config.optim.batch_size, config.optim.accum
    steps = (n_train // world_size) // batch // accum
    if steps < 1:
        raise CxrFastError(f"{n_train} training images are too few for batch {batch} x accum {accum} x {world_size} "
                           "rank(s); lower --batch-size or --accum")
    return Plan(n_train, steps, steps * accum)


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2 ** 31)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on norms and biases (1-d parameters), as timm does.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_model(config: RunConfig, env: Env, resumed: dict | None):
    """The model with its weights (loaded before any wrapping) and its EMA."""
    model = create_model(config.model, config.data.in_chans,
                         pretrained=None if resumed is None else False).to(env.device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    ema = None
    if config.optim.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.optim.ema_decay)
    return model, ema


def build_state(config: RunConfig, plan: Plan, env: Env, model: torch.nn.Module, ema, loss_fn: torch.nn.Module
                ) -> TrainState:
    """Optimizer (fused AdamW on CUDA), schedule and scaler around the (possibly compiled, DDP-wrapped) model."""
    train_model = torch.compile(model) if config.model.compile else model
    if env.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(param_groups(model, config.optim.weight_decay), lr=config.optim.lr,
                                  fused=env.device.type == "cuda" or None)
    total = plan.total_steps(config.optim.epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        total, int(config.optim.warmup_fraction * total), config.optim.min_lr_ratio))
    amp_dtype = resolve_amp(config.amp, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
    return TrainState(train_model, optimizer, scheduler, scaler, amp_dtype, config.optim.accum,
                      config.optim.clip_grad_norm,
                      loss_fn.to(env.device), env.device, ema)


class Run:
    """One training run, epoch by epoch; see `run_training`."""

    def __init__(self, config: RunConfig, shards_dir: Path, out_dir: Path, env: Env, resumed: dict | None,
                 show_progress: bool):
        self.config, self.shards_dir, self.out_dir, self.env = config, shards_dir, out_dir, env
        self.show_progress = show_progress and env.is_main
        manifest = load_manifest(shards_dir)
        check_splits(manifest, env.world_size)
        torch.manual_seed(config.seed)  # the same initial weights on every rank, so the ranks' EMAs agree
        model, ema = build_model(config, env, resumed)
        torch.manual_seed(config.seed + env.rank)  # then each rank its own dropout and augmentation draws
        self.config = config = resolve_batch(config, model, env.device, resolve_amp(config.amp, env.device))
        self.plan = plan_epochs(config, manifest, env.world_size)
        weights = inverse_frequency_weights(manifest["splits"]["train"]["prevalence"], self.plan.train_images) \
            if config.optim.class_weighting == "inverse_frequency" else None
        self.state = build_state(config, self.plan, env, model, ema, FocalLoss(config.optim.focal_gamma, weights))
        self.loss_fn = self.state.loss_fn
        self.best_auc = restore_training(resumed, self.state, env.rank) if resumed is not None else -1.0
        self.chosen = chosen_on_validation(resumed) if resumed is not None else None  # kept in every last.pt
        self.saver = CheckpointSaver(out_dir)
        self.monitor = RunMonitor(out_dir, config.tensorboard) if env.is_main else None
        self.stop = _StopFlag(config.max_steps, self.state, env)
        self.warm_side: int | None = None  # the input side this process has trained at (autotuned, compiled)
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

    def save(self, record=None, best: bool = False) -> None:
        rng = rng_states()
        if self.env.distributed:
            gathered = [None] * self.env.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        if self.env.is_main:
            self.saver.save(training_payload(self.state, self.config, rng, self.best_auc, self.chosen, record), best)

    def train_epoch(self) -> EpochStats | None:
        """Train the rest of the current epoch; None when the loader failed after SIGTERM (a stop).

        Each epoch gets a loader of its own, seeded by (seed, epoch, rank): that seed is what lets a resumed epoch
        replay the same batches. Building one costs about 2 s (the DALI pipeline, on an H200), against minutes for
        an epoch of ChestX-ray14; `bench loader` keeps one loader across epochs to measure the steady state."""
        config, env, state = self.config, self.env, self.state
        loader = create_loader(LoaderSpec(self.shards_dir, "train", config.data, batch_size=config.optim.batch_size,
                                          train=True, device=env.device, seed=loader_seed(config.seed, state.epoch,
                                          env.rank), rank=env.rank, world_size=env.world_size, loader=config.loader))
        try:
            side = config.data.image_size
            warmup = 0 if side == self.warm_side else WARMUP_STEPS
            self.warm_side = side
            return train_one_epoch(state, loader, self.plan.batches_per_epoch, self.stop.local, self.show_progress,
                                   warmup)
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
        finally:
            del loader

    def validate(self) -> dict:
        """Metrics of the validation split (every sample once across ranks); sets `self.chosen`: the per-class
        thresholds of the three operating points and the calibration, all fitted on these predictions."""
        config, env = self.config, self.env
        loader = create_loader(LoaderSpec(self.shards_dir, "val", config.data,
                                          batch_size=config.optim.batch_size * 2, train=False, device=env.device,
                                          rank=env.rank, world_size=env.world_size, loader=config.loader))
        model = self.state.ema.module if self.state.ema is not None else self.state.model
        result = evaluate(model, loader, self.loss_fn, self.state.amp_dtype, self.show_progress)
        targets, probs = result["targets"], result["probs"]
        auc, per_class = macro_auc(targets, probs)
        points = operating_points(targets, probs)
        self.chosen = {"thresholds": [float(t) for t in points["max_f1"]], "calibration":
                       fit_calibration(targets, probs),
                       "operating_points": {k: [float(t) for t in v] for k, v in points.items()}}
        return {"val_loss": float(result["loss"]), "val_macro_auc": float(auc),
                "val_auc": {c: (float(a) if np.isfinite(a) else None) for c, a in zip(C.CLASS_NAMES, per_class)},
                "val_images": len(result["keys"])}

    def epoch_end(self, stats: EpochStats | None) -> dict:
        """Validate, then write the epoch's record and checkpoints. `stats` is None when the epoch's training was
        done before a resume (only its validation was left)."""
        history = self.state.history
        train_loss = history["loss_sum"] / max(1, history["loss_count"])  # already averaged over ranks
        record = self.validate()
        state = self.state
        state.epoch += 1
        state.batch_in_epoch = 0
        record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss, **record,
                  "lr": float(state.scheduler.get_last_lr()[0]),
                  "train_images_per_second": stats.images_per_second if stats else None,
                  "data_wait_fraction": stats.data_wait_fraction if stats else None,
                  "warmup_steps": stats.warmup_steps if stats else None}
        if self.env.device.type == "cuda":
            record["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2 ** 30
        improved = record["val_macro_auc"] > self.best_auc
        self.best_auc = max(self.best_auc, record["val_macro_auc"])
        if self.env.is_main:
            self.monitor.epoch(record)
            log.info("epoch %d: train loss %.4f, val loss %.4f, val macro AUC %.4f%s", state.epoch, train_loss,
                     record["val_loss"], record["val_macro_auc"], " (best)" if improved else "")
        self.save(record, best=improved)
        return record

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


def run_training(config: RunConfig, shards_dir: str | Path, out_dir: str | Path, resume: bool | dict = False,
                 show_progress: bool = True, overwrite: bool = False) -> dict:
    """Train; returns the last validation record (or {"stopped": reason, "step": n}). Writes
    <out>/checkpoints/{best,last}.pt, metrics.jsonl, config.yaml. Rank 0 holds a lock on the run folder.

    With resume (True, or a dict of changes: dotted config paths → values, the flags given), the run's config comes
    from last.pt and `config` is not used; the changes may change what `resume.RESUMABLE` lists, and any other change is
    an error."""
    changes = resume if isinstance(resume, dict) else {}
    out_dir = Path(out_dir)
    is_main = int(os.environ.get("RANK", "0")) == 0
    with folder_lock(out_dir, "a training run") if is_main else contextlib.nullcontext():
        replaced = claim_run_folder(out_dir, resume, overwrite) if is_main else []
        resumed = CheckpointSaver(out_dir).load_last() if resume else None
        if resumed is not None:
            saved = from_dict(RunConfig, resumed["config"], where=f"{out_dir} checkpoint config")
            config = resumed_config(saved, changes, resumed["epoch"])
        env = setup_distributed(config.device, config.cudnn_benchmark)
        np.random.seed(config.seed + env.rank)
        previous_handler = run = None
        try:
            run = Run(config, Path(shards_dir), out_dir, env, resumed, show_progress)
            run.start(replaced)
            previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(run.stop, "requested", True))
            return run.loop()
        finally:
            if run is not None and run.monitor is not None:
                run.monitor.close()
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            if env.distributed and dist.is_initialized():
                dist.destroy_process_group()
