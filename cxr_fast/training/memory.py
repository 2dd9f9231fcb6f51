"""`--batch-size auto`: the largest micro-batch that fits the GPU, found by trying one training step at each size
(32, 16, 8, ... down to 1) and falling back on out-of-memory; accumulation makes up the effective batch."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from cxr_fast.config import RunConfig, replace
from cxr_fast.errors import CxrFastError
from cxr_fast.training.engine import autocast

log = logging.getLogger(__name__)
# The step's peak must leave room for what the probe does not allocate: AdamW's two moments, the loader's buffers
# and the allocator's fragmentation over a long run.
HEADROOM = 0.85


def candidates(effective: int) -> list[int]:
    """Micro-batches that divide the effective batch, largest first: 32 → 32, 16, 8, 4, 2, 1."""
    sizes = []
    size = effective
    while size >= 1:
        if effective % size == 0 and size not in sizes:
            sizes.append(size)
        size //= 2
    return sizes + ([1] if 1 not in sizes else [])


def _step_peak(model: nn.Module, config: RunConfig, batch: int, device: torch.device, amp_dtype) -> int:
    """Peak memory (bytes) of one forward and backward pass at this micro-batch."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    size, chans = config.data.image_size, config.data.in_chans
    x = torch.randn(batch, chans, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with autocast(device, amp_dtype):
        out = model(x)
    out.float().sum().backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def probe_micro_batch(model: nn.Module, config: RunConfig, device: torch.device, amp_dtype) -> int:
    total = torch.cuda.get_device_properties(device).total_memory
    for batch in candidates(config.optim.effective_batch):
        try:
            peak = _step_peak(model, config, batch, device, amp_dtype)
            fits = peak < HEADROOM * total
            log.info("micro-batch %d: peak %.1f GiB of %.1f%s", batch, peak / 2 ** 30, total / 2 ** 30,
                     "" if fits else " (too close to the limit)")
        except torch.OutOfMemoryError:
            fits = False
            log.info("micro-batch %d: out of memory", batch)
        finally:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        if fits:
            return batch
    raise CxrFastError(f"not even a micro-batch of 1 fits {torch.cuda.get_device_name(device)} at "
                       f"--image-size {config.data.image_size}; lower it or use a smaller --model")


def resolve_batch(config: RunConfig, model: nn.Module, device: torch.device, amp_dtype) -> RunConfig:
    """The config with a whole micro-batch and accumulation (`auto` resolved; the same on every rank)."""
    optim = config.optim
    batch = optim.batch_size
    if batch == "auto":
        batch = probe_micro_batch(model, config, device, amp_dtype) if device.type == "cuda" else optim.effective_batch
        if dist.is_available() and dist.is_initialized():
            agreed = torch.tensor([batch], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            batch = int(agreed.item())
    accum = optim.effective_batch // batch if optim.accum == "auto" else optim.accum
    if optim.batch_size == "auto":
        log.info("--batch-size auto: %d x %d per optimizer step on %s", batch, accum, device)
    return replace(config, **{"optim.batch_size": batch, "optim.accum": accum})
