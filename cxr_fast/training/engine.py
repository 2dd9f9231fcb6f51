"""Train and eval steps: AMP, channels-last inputs, gradient accumulation, clipping, EMA; the LR schedule.

`TrainState` carries what a step changes, instead of a long list of arguments.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from cxr_fast.errors import CxrFastError


class NonFiniteLoss(CxrFastError):
    """The loss became NaN or infinite; the message names the step."""


@dataclass
class TrainState:
    model: nn.Module  # possibly DDP-wrapped or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    accum: int
    clip_grad_norm: float
    loss_fn: nn.Module
    device: torch.device
    classes: tuple[str, ...]  # the names of the model's outputs, in order
    ema: nn.Module | None = None
    on_step: object = None  # called as on_step(step, loss, lr) after each optimizer step (TensorBoard)
    epoch: int = 0
    step: int = 0  # optimizer steps done
    batch_in_epoch: int = 0  # micro-batches of the current epoch done (always a multiple of accum between steps)
    history: dict = field(default_factory=lambda: {"loss_sum": 0.0, "loss_count": 0})  # of the current epoch


def resolve_device(choice: str, index: int = 0) -> torch.device:
    """auto | cuda | cpu → a device; asking for CUDA where there is none is an error that says so."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise CxrFastError("--device cuda, but no CUDA device is visible")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", index)
    return torch.device("cpu")


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the device supports it, fp16 (with a grad scaler) on older GPUs, off on the CPU."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None  # CPU autocast is slower than fp32 on most CPUs


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier per optimizer step: linear warm-up from 0, then cosine down to min_ratio."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class InputWait:
    """How long the device sat idle waiting for input: from the end of one micro-batch's work (its optimizer step
    included) to the start of the next one's. On CUDA the gaps are timed by events on the stream and read after
    the step's own sync, so measuring adds none; on the CPU it is the wall time spent in the loader."""

    def __init__(self, device: torch.device):
        self.cuda, self.seconds, self.pending, self.last_done = device.type == "cuda", 0.0, [], None

    def fetched(self, wall_seconds: float) -> None:
        if not self.cuda:
            self.seconds += wall_seconds
            return
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        if self.last_done is not None:
            self.pending.append((self.last_done, start))

    def computed(self) -> None:
        if self.cuda:
            self.last_done = torch.cuda.Event(enable_timing=True)
            self.last_done.record()

    def collect(self) -> None:
        """After a host sync: every recorded gap has happened."""
        self.seconds += sum(done.elapsed_time(start) for done, start in self.pending) / 1000
        self.pending = []


@dataclass
class EpochStats:
    """One call of `train_one_epoch`: what it trained and where its time went. Its `seconds` are the loader's start
    (asking for the iterator until the first batch), the warm-up (the steps before the window opened, with the
    batches a resume skips) and the timed window, which opens after `warmup_steps` optimizer steps and a device
    sync and closes with a sync."""

    loss: float  # mean of the epoch's micro-batch losses so far (all ranks)
    stopped: bool
    images: int  # trained by this call, all ranks
    seconds: float  # of this call, the device's work finished
    input_wait_seconds: float  # within the timed window
    timed_images: int  # after the warm-up steps: what images/s is computed from
    timed_seconds: float
    warmup_steps: int
    timed_steps: int = 0
    loader_start_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Over the timed window; over the whole call where the epoch was too short to leave the warm-up out."""
        if self.timed_images and self.timed_seconds > 0:
            return self.timed_images / self.timed_seconds
        return self.images / self.seconds

    @property
    def warmup_seconds(self) -> float:
        """The call's time between its first batch and the window's opening (its end, if it never opened)."""
        return max(0.0, self.seconds - self.loader_start_seconds - self.timed_seconds)

    @property
    def warmup_overhead_seconds(self) -> float | None:
        """What the warm-up steps took beyond their images at the steady rate: compilation and autotuning."""
        if not (self.timed_images and self.timed_seconds > 0):
            return None
        warmup_images = self.images - self.timed_images
        return max(0.0, self.warmup_seconds - warmup_images * self.timed_seconds / self.timed_images)

    @property
    def data_wait_fraction(self) -> float:
        if self.timed_images and self.timed_seconds > 0:
            return self.input_wait_seconds / self.timed_seconds
        return self.input_wait_seconds / self.seconds


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def never(_step: int) -> bool:
    return False


def _agree(tensor: torch.Tensor) -> list[float]:
    """Sum `tensor` over the ranks (one collective) and bring it to the host: the step's only sync."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def train_one_epoch(state: TrainState, loader, batches: int, stop_requested=never, show_progress: bool = True,
                    warmup_steps: int = 1) -> EpochStats:
    """Run micro-batches until `batches` (a multiple of accum) are done or a rank's `stop_requested(step)` says so
    for the step about to be taken (it is taken, then the epoch stops). Resumes inside an epoch by skipping the
    `state.batch_in_epoch` batches already trained on.

    Losses stay on the device; once per optimizer step, before the step, one collective brings the step's loss, a
    non-finite flag and the stop requests of all ranks to the host, so all ranks raise or stop together. The first
    `warmup_steps` optimizer steps of this call (autotuning and compilation at a new input shape) are left out of
    the timed window that images/s is computed from: at least one, so that the window opens after a step at this
    epoch's shape (the loader started, the device synchronised), every epoch."""
    if warmup_steps < 1:
        raise ValueError(f"warmup_steps must be at least 1, got {warmup_steps}")
    model, accum, device = state.model, state.accum, state.device
    model.train()
    skip = state.batch_in_epoch
    if skip == 0:
        state.history = {"loss_sum": 0.0, "loss_count": 0}
    world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    progress = tqdm(total=batches, initial=skip, desc=f"epoch {state.epoch + 1}", unit="batch",
                    disable=not show_progress, leave=False)
    wait, recent, images, started = InputWait(device), [], 0, time.perf_counter()
    timer = _Window(device, warmup_steps)
    cycle = torch.zeros((), dtype=torch.float64, device=device)
    iterator, loader_start = iter(loader), None
    for index in range(batches):
        before = time.perf_counter()
        batch = next(iterator, None)
        if batch is None:
            raise CxrFastError(f"the train loader ended after {index} batches, {batches} expected")
        if loader_start is None:
            loader_start = time.perf_counter() - started
        if index < skip:
            continue  # already trained on before the interruption; the loader is seeded, so these are the same
        wait.fetched(time.perf_counter() - before)
        _forward_backward(state, batch, cycle, last_of_step=(index + 1) % accum == 0)
        images += len(batch.keys) * world_size
        if (index + 1) % accum:
            wait.computed()
            continue
        loss_per_batch, stop = _step(state, cycle, world_size, stop_requested, wait, index)
        cycle.zero_()
        state.batch_in_epoch = index + 1
        timer.stepped(images, wait)
        recent = (recent + [loss_per_batch])[-50:]
        progress.update(accum)
        progress.set_postfix(loss=f"{np.mean(recent):.4f}", img_s=f"{images / (time.perf_counter() - started):.1f}")
        if stop:
            break
    progress.close()
    synchronize(device)
    timed_images, timed_seconds, timed_wait = timer.close(images, wait)
    return EpochStats(state.history["loss_sum"] / max(1, state.history["loss_count"]), state.batch_in_epoch < batches,
                      images, time.perf_counter() - started, timed_wait, timed_images, timed_seconds, warmup_steps,
                      max(0, timer.steps - warmup_steps), loader_start or 0.0)


class _Window:
    """The timed window of an epoch: it opens after `warmup` optimizer steps, with the device's work done."""

    def __init__(self, device: torch.device, warmup: int):
        self.device, self.warmup, self.steps = device, warmup, 0
        self.started = None
        self.images = self.wait = 0

    def stepped(self, images: int, wait: InputWait) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            synchronize(self.device)
            wait.collect()
            self.started, self.images, self.wait = time.perf_counter(), images, wait.seconds

    def close(self, images: int, wait: InputWait) -> tuple[int, float, float]:
        """(images, seconds, input-wait seconds) inside the window; for a window that never opened, no images and
        the whole call's input wait."""
        wait.collect()
        if self.started is None:
            return 0, 0.0, wait.seconds
        return images - self.images, time.perf_counter() - self.started, wait.seconds - self.wait


def _forward_backward(state: TrainState, batch, cycle: torch.Tensor, last_of_step: bool) -> None:
    """One micro-batch: forward under autocast, loss, scaled backward (DDP syncs gradients on the last of a step);
    its loss is added to `cycle` on the device."""
    model = state.model
    sync = model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) and not last_of_step \
        else contextlib.nullcontext()
    with sync:
        with autocast(state.device, state.amp_dtype):
            logits = model(batch.images)
        loss = state.loss_fn(logits, batch.targets)
        state.scaler.scale(loss / state.accum).backward()
    cycle += loss.detach().double()


def _step(state: TrainState, cycle: torch.Tensor, world_size: int, stop_requested, wait: InputWait, index: int):
    """End of an accumulation cycle: the one sync (loss, non-finite flag, stop), then the optimizer step.
    Returns (mean micro-batch loss over ranks, whether to stop)."""
    device = cycle.device
    # torch.full is a fill kernel, not a host-to-device copy: nothing here waits for the GPU but tolist().
    stop_flag = torch.full((), float(stop_requested(state.step + 1)), dtype=torch.float64, device=device)
    total, non_finite, stop = _agree(torch.stack([cycle, (~torch.isfinite(cycle)).double(), stop_flag]))
    wait.collect()
    if non_finite:
        raise NonFiniteLoss(f"loss is {'nan' if math.isnan(total) else total} at optimizer step {state.step + 1} "
                            f"(epoch {state.epoch + 1}, batch {index + 1}); try a lower --lr or --amp bf16/off")
    _optimizer_step(state)
    wait.computed()
    # Committed with the step, like batch_in_epoch: a checkpoint never counts a half-done cycle.
    state.history["loss_sum"] += total / world_size
    state.history["loss_count"] += state.accum
    loss = total / world_size / state.accum
    if state.on_step is not None:  # values already on the host: no sync added
        state.on_step(state.step, loss, state.scheduler.get_last_lr()[0])
    return loss, bool(stop)


def _optimizer_step(state: TrainState) -> None:
    state.scaler.unscale_(state.optimizer)
    if state.clip_grad_norm:
        nn.utils.clip_grad_norm_(state.model.parameters(), state.clip_grad_norm)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(unwrap(state.model), step=state.step)
    state.step += 1


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


@torch.no_grad()
def evaluate(model: nn.Module, loader, loss_fn: nn.Module, amp_dtype: torch.dtype | None, show_progress: bool = True,
             on_batch=None) -> dict:
    """Predictions over the whole split on the loader's device, gathered across ranks when a process group is up
    (each sample exactly once): probs, targets, keys (sorted by key, so every rank holds the same arrays) and the mean
    loss. Targets are NaN where a label is not stated. Results stay on the device until the end (one transfer, no sync per batch); `on_batch(batch, probs)` sees
    each batch as it is scored."""
    device = loader.device
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    model.eval()
    probs, targets, keys = [], [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in tqdm(loader, desc="eval", unit="batch", disable=not show_progress, leave=False):
        with autocast(device, amp_dtype):
            logits = model(batch.images)
        batch_probs = torch.sigmoid(logits.float())
        loss_sum += loss_fn(logits, batch.targets).double() * len(batch.keys)
        probs.append(batch_probs)
        targets.append(batch.targets)
        keys += batch.keys
        if on_batch is not None:
            on_batch(batch, batch_probs)
    empty = np.zeros((0, getattr(unwrap(model), "num_classes", 0)), np.float32)  # a rank without samples
    part = (torch.cat(probs).cpu().numpy() if probs else empty, torch.cat(targets).cpu().numpy() if targets else empty,
            keys, float(loss_sum.item()))
    parts = [part]
    if distributed:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, part)
    all_keys = [k for p in parts for k in p[2]]
    order = np.argsort(all_keys, kind="mergesort")
    return {"probs": np.concatenate([p[0] for p in parts])[order],
            "targets": np.concatenate([p[1] for p in parts])[order],
            "keys": [all_keys[i] for i in order],
            "loss": sum(p[3] for p in parts) / max(1, len(all_keys))}
