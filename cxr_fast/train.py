"""The `cxr-fast train` run: set-up (device, DDP, seeds), epochs of train + validation, checkpoints, metrics.jsonl.

Multi-GPU runs go through `torchrun` and PyTorch DDP (NCCL on GPUs, gloo on the CPU): each rank reads its own reader
shard, validation predictions are gathered so metrics cover every sample once, and only rank 0 writes files.

Exact resume: the train loader of epoch e is seeded by (seed, e, rank), so an interrupted epoch can be replayed and
the batches already trained on skipped; model, optimizer, scheduler, scaler, EMA and RNG states come from last.pt.
SIGTERM (preemption) finishes the current optimizer step, saves last.pt and exits cleanly.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cxr_fast import constants as C
from cxr_fast.checkpoint import load_checkpoint, restore_rng_states, rng_states, save_checkpoint
from cxr_fast.config import RunConfig, dump_yaml, from_dict, to_dict
from cxr_fast.engine import (NonFiniteLoss, TrainState, evaluate, resolve_amp, resolve_device, train_one_epoch,
                             warmup_cosine)
from cxr_fast.errors import CxrFastError
from cxr_fast.loader import create_loader
from cxr_fast.losses import FocalLoss, inverse_frequency_weights
from cxr_fast.metrics import best_f1_threshold, macro_auc
from cxr_fast.model import create_model
from cxr_fast.shards import load_manifest

log = logging.getLogger(__name__)


class _StopFlag:
    """Set by SIGTERM; agreed across ranks at step boundaries so all ranks stop at the same step."""

    def __init__(self, max_steps: int | None, state: TrainState, distributed: bool):
        self.requested, self.max_steps, self.state, self.distributed = False, max_steps, state, distributed
        self.reason = ""

    def __call__(self) -> bool:
        stop = self.requested or (self.max_steps is not None and self.state.step >= self.max_steps)
        if self.distributed:
            flag = torch.tensor([int(stop)], device="cpu" if dist.get_backend() == "gloo" else "cuda")
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop and not self.reason:
            self.reason = "SIGTERM" if self.requested else f"--max-steps {self.max_steps}"
        return stop


def _setup_distributed(device_choice: str) -> tuple[int, int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, local_rank, device


def _loader_seed(seed: int, epoch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2 ** 31)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    # No weight decay on norms and biases (1-d parameters), as timm does.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def run_training(cfg: RunConfig, shards_dir: str | Path, out_dir: str | Path, resume: bool = False,
                 show_progress: bool = True) -> dict:
    """Train; returns the last validation record. Writes <out>/checkpoints/{best,last}.pt, metrics.jsonl,
    config.yaml."""
    out_dir = Path(out_dir)
    last_path, best_path = out_dir / "checkpoints" / "last.pt", out_dir / "checkpoints" / "best.pt"
    resumed = None
    if resume:
        if not last_path.exists():
            raise CxrFastError(f"--resume: no {last_path}; start without --resume")
        resumed = load_checkpoint(last_path)
        # The run's identity comes from the checkpoint; only how far to go may change.
        cfg = from_dict(RunConfig, resumed["config"] | {"max_steps": cfg.max_steps})
    rank, world, _local, device = _setup_distributed(cfg.device)
    distributed, is_main = world > 1, rank == 0
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    manifest = load_manifest(shards_dir)
    n_train = manifest["splits"]["train"]["images"]
    batch, accum = cfg.optim.batch_size, cfg.optim.accum
    per_rank = n_train // world
    steps_per_epoch = per_rank // batch // accum
    if steps_per_epoch < 1:
        raise CxrFastError(f"{n_train} training images are too few for batch {batch} x accum {accum} x {world} "
                           "rank(s); lower --batch-size or --accum")
    batches_per_epoch = steps_per_epoch * accum
    total_steps = steps_per_epoch * cfg.optim.epochs

    model = create_model(cfg.model, cfg.data.in_chans, pretrained=None if resumed is None else False).to(device)
    if resumed is not None:
        model.load_state_dict(resumed["model"])
    ema = None
    if cfg.optim.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.optim.ema_decay)
    train_model = torch.compile(model) if cfg.model.compile else model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(
        total_steps, int(cfg.optim.warmup_fraction * total_steps), cfg.optim.min_lr_ratio))
    amp_dtype = resolve_amp(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = TrainState(train_model, optimizer, scheduler, scaler, amp_dtype, accum, cfg.optim.clip_grad_norm, ema)
    best_auc = -1.0
    if resumed is not None:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        scaler.load_state_dict(resumed["scaler"])
        if ema is not None and resumed.get("ema") is not None:
            ema.module.load_state_dict(resumed["ema"])
        state.epoch, state.step, state.batch_in_epoch = resumed["epoch"], resumed["step"], resumed["batch_in_epoch"]
        state.history = resumed["history"]
        best_auc = resumed.get("best_auc", -1.0)
        restore_rng_states(resumed["rng"][rank] if isinstance(resumed["rng"], list) else resumed["rng"])
        log.info("resuming at epoch %d, step %d", state.epoch + 1, state.step)

    weights = inverse_frequency_weights(manifest["splits"]["train"]["prevalence"], n_train) \
        if cfg.optim.class_weighting == "inverse_frequency" else None
    loss_fn = FocalLoss(cfg.optim.focal_gamma, weights).to(device)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, out_dir / "config.yaml")
        log.info("training %s on %s (%d rank(s)): %d images, %d steps/epoch of %d x %d x %d, %d epochs",
                 cfg.model.name, device, world, n_train, steps_per_epoch, batch, accum, world, cfg.optim.epochs)

    stop = _StopFlag(cfg.max_steps, state, distributed)
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(stop, "requested", True))

    def checkpoint(kind_paths: list[Path], thresholds=None, record=None) -> None:
        rng = rng_states()
        if distributed:
            gathered = [None] * world
            dist.all_gather_object(gathered, rng)
            rng = gathered
        if not is_main:
            return
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                   "ema": ema.module.state_dict() if ema is not None else None, "epoch": state.epoch,
                   "step": state.step, "batch_in_epoch": state.batch_in_epoch, "history": state.history,
                   "rng": rng, "config": to_dict(cfg), "class_names": list(C.CLASS_NAMES), "best_auc": best_auc,
                   "thresholds": thresholds,
                   "val": record}
        for path in kind_paths:
            save_checkpoint(payload, path)

    record = None
    try:
        while state.epoch < cfg.optim.epochs:
            if state.step and state.batch_in_epoch == 0 and stop():  # at an epoch end: last.pt is already saved
                log.info("stopped by %s at step %d (continue with --resume)", stop.reason, state.step)
                return {"stopped": stop.reason, "step": state.step}
            loader = create_loader(cfg.loader, shards_dir, "train", cfg.data, batch_size=batch, train=True,
                                   device=device, seed=_loader_seed(cfg.seed, state.epoch, rank), rank=rank,
                                   world_size=world)
            started = time.perf_counter()
            try:
                train_loss, stopped = train_one_epoch(state, loader, loss_fn, device, batches_per_epoch, stop,
                                                      show_progress and is_main)
            except NonFiniteLoss as error:
                # The weights are those of the last good optimizer step; resuming replays the current one.
                state.batch_in_epoch -= state.batch_in_epoch % accum
                checkpoint([last_path])
                raise NonFiniteLoss(f"{error}. The last good state is saved in {last_path}") from None
            finally:
                del loader
            if stopped:
                checkpoint([last_path])
                if is_main:
                    log.info("stopped by %s at step %d; saved %s (continue with --resume)", stop.reason,
                             state.step, last_path)
                return {"stopped": stop.reason, "step": state.step}
            if distributed:
                total = torch.tensor([train_loss], dtype=torch.float64, device=device)
                dist.all_reduce(total)  # in place: on CUDA a `.to(device)` copy would be reduced and dropped
                train_loss = float(total.item()) / world
            elapsed = time.perf_counter() - started
            val_loader = create_loader(cfg.loader, shards_dir, "val", cfg.data, batch_size=batch * 2, train=False,
                                       device=device, rank=rank, world_size=world)
            eval_model = ema.module if ema is not None else model
            result = evaluate(eval_model, val_loader, loss_fn, device, amp_dtype, distributed,
                              show_progress and is_main)
            del val_loader
            auc, per_class = macro_auc(result["targets"], result["probs"])
            thresholds = [best_f1_threshold(result["targets"][:, c], result["probs"][:, c])
                          for c in range(C.NUM_CLASSES)]
            state.epoch += 1
            state.batch_in_epoch = 0
            record = {"epoch": state.epoch, "step": state.step, "train_loss": train_loss,
                      "val_loss": result["loss"], "val_macro_auc": auc,
                      "val_auc": {c: (a if np.isfinite(a) else None) for c, a in zip(C.CLASS_NAMES, per_class)},
                      "val_images": len(result["keys"]), "lr": scheduler.get_last_lr()[0],
                      "train_images_per_second": batches_per_epoch * batch * world / elapsed}
            improved = auc > best_auc
            best_auc = max(best_auc, auc)
            if is_main:
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("epoch %d: train loss %.4f, val loss %.4f, val macro AUC %.4f%s", state.epoch, train_loss,
                         result["loss"], auc, " (best)" if improved else "")
            checkpoint([last_path, best_path] if improved else [last_path], thresholds, record)
        return record
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
